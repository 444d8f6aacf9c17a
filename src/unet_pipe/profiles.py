"""Install the repository's Snakemake profiles where ``snakemake --profile NAME`` finds them by name.

Snakemake 9 (``snakemake.cli.get_profile_dir``) resolves ``--profile NAME``
that is not an existing path by looking for ``NAME/`` holding ``profile.yaml``
or ``config.yaml`` (optionally ``profile.v9+.yaml``) in, in order: the current
directory, the user config folder and the site config folder of
``platformdirs.AppDirs("snakemake", "snakemake")``: on Linux
``$XDG_CONFIG_HOME/snakemake`` (default ``~/.config/snakemake``), then the first
folder of ``$XDG_CONFIG_DIRS`` + ``/snakemake`` (default ``/etc/xdg/snakemake``).
:func:`profile_search_dir` uses the same ``platformdirs`` call, so the installed
profile is found wherever Snakemake looks (macOS and Windows included).

Data safety: the installed folder carries a marker (``.unet-pipe-profile``)
that records the sha256 of every file written.  A folder of that name without
the marker is the user's own profile and is refused, never replaced; a marked
one is replaced only while its files are exactly as installed (an edited copy
is refused too).  The new folder is built beside it and swapped in by rename.

Relative values in the profile that name a file of the source profile folder
are rewritten to absolute paths, as Snakemake would resolve them next to the
repository's profile: they keep pointing into the repository.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import yaml

from unet_pipe.atomic import exchange
from unet_pipe.errors import ConfigError, OutputError

PROFILE_MARKER = ".unet-pipe-profile"
PARTITION_ENV = {"cpu": "UNET_PIPE_PARTITION_CPU", "gpu": "UNET_PIPE_PARTITION_GPU"}
ACCOUNT_ENV = "UNET_PIPE_SLURM_ACCOUNT"
# SLURM partition and account names (a comma-separated list of partitions is valid for sbatch -p).
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$")
_PARTITION_LINE = re.compile(r"^(\s*slurm_partition:\s*)(cpu|gpu)(\s*(#.*)?)$")
_ACCOUNT_LINE = re.compile(r"^(\s*)# slurm_account: \S+\s*$")


def repository_profiles() -> Path:
    """``profiles/`` of the repository this package was installed from (editable install)."""
    root = Path(os.environ.get("UNET_PIPE_ROOT", Path(__file__).resolve().parents[2]))
    return root / "profiles"


def profile_search_dir(site: bool = False) -> Path:
    """Where Snakemake looks up profiles by name: the user folder, or the site-wide one."""
    from platformdirs import AppDirs

    dirs = AppDirs("snakemake", "snakemake")
    return Path(dirs.site_config_dir if site else dirs.user_config_dir)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` but the marker, by relative path."""
    return {
        p.relative_to(folder).as_posix(): _sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != PROFILE_MARKER
    }


def check_replaceable(dest: Path) -> None:
    """Raise :class:`OutputError` unless ``dest`` is absent or a profile we installed and nobody changed."""
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        raise OutputError(dest, "exists and is not a profile unet-pipe installed; move it away first (nothing changed)")
    marker = dest / PROFILE_MARKER
    if not marker.is_file():
        raise OutputError(dest, "is a Snakemake profile unet-pipe did not install (no marker); "
                          "refusing to replace it: move it away or pass another --name")
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise OutputError(dest, f"unreadable marker {PROFILE_MARKER}; refusing to replace the folder") from None
    if _files(dest) != recorded:
        raise OutputError(dest, "was edited since unet-pipe installed it; refusing to replace your changes "
                          "(move it away first)")


def customise(text: str, partitions: dict[str, str], account: str | None) -> str:
    """The profile text with its ``cpu``/``gpu`` partitions (and optionally the account) set."""
    for kind, name in partitions.items():
        if not _SLURM_NAME.match(name):
            raise ConfigError(None, f"partition name {name!r} ({kind}) is not a SLURM partition name")
    if account is not None and not _SLURM_NAME.match(account):
        raise ConfigError(None, f"account name {account!r} is not a SLURM account name")
    lines = []
    for line in text.splitlines():
        if m := _PARTITION_LINE.match(line):
            line = f"{m.group(1)}{partitions[m.group(2)]}{m.group(3)}"
        elif account is not None and (m := _ACCOUNT_LINE.match(line)):
            line = f"{m.group(1)}slurm_account: {account}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _absolute_paths(text: str, source: Path) -> str:
    """Top-level values naming a file of ``source`` become absolute (Snakemake resolves them there)."""
    parsed = yaml.safe_load(text) or {}
    lines = text.splitlines()
    for key, value in parsed.items():
        if isinstance(value, str) and not os.path.isabs(value) and (source / value).exists():
            pattern = re.compile(rf"^({re.escape(key)}:\s*)['\"]?{re.escape(value)}['\"]?(\s*(#.*)?)$")
            lines = [pattern.sub(lambda m: f"{m.group(1)}{json.dumps(str(source / value))}{m.group(2)}", ln)
                     for ln in lines]
    return "\n".join(lines) + "\n"


def install_profile(
    name: str,
    dest_root: Path,
    partitions: dict[str, str] | None = None,
    account: str | None = None,
    source: Path | None = None,
) -> Path:
    """Install ``profiles/NAME`` as ``dest_root/NAME``; return the installed folder.

    ``partitions`` (``{"cpu": ..., "gpu": ...}``) and ``account`` are written into
    a SLURM profile's ``slurm_partition``/``slurm_account`` entries.
    """
    source = (source or repository_profiles() / name).resolve()
    config = source / "config.yaml"
    if not config.is_file():
        raise ConfigError(config, "no such profile in the repository")
    dest = Path(dest_root) / name
    check_replaceable(dest)
    text = config.read_text(encoding="utf-8")
    if partitions:
        text = customise(text, partitions, account)
        parsed = yaml.safe_load(text)
        wanted = {parsed["default-resources"]["slurm_partition"]} | {
            res["slurm_partition"] for res in parsed.get("set-resources", {}).values() if "slurm_partition" in res
        }
        if not wanted <= set(partitions.values()):
            raise ConfigError(config, f"partitions {sorted(wanted)} left unset; expected only {sorted(partitions.values())}")
    header = (
        f"# Installed by `unet-pipe install-profile {name}` from {source}\n"
        f"# (reinstalling replaces this folder only while it is unchanged). Run Snakemake from the\n"
        f"# repository root: snakemake --profile {name}\n"
    )
    text = header + _absolute_paths(text, source)

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{name}.unet-pipe-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        (staging / "config.yaml").write_text(text, encoding="utf-8")
        marker = {"source": str(source), "files": _files(staging)}
        (staging / PROFILE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if dest.exists() and exchange(staging, dest):
            # One atomic step: a kill leaves the old or the new profile at dest, never none.
            shutil.rmtree(staging)  # now the old profile
        else:
            old = None
            if dest.exists():
                old = dest.with_name(f".{name}.unet-pipe-old-{uuid.uuid4().hex[:8]}")
                os.replace(dest, old)
            os.replace(staging, dest)
            if old is not None:
                shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
