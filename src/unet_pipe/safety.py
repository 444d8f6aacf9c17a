"""Data safety: the project removes or replaces only what it created.

* **Staging folders** (``DEST.partial``) carry a marker file written when we
  create them; a ``DEST.partial`` without it belongs to the user and is refused,
  never removed.
* **Replacing** an existing ``DEST`` (``--overwrite``) is allowed only for a
  store this project wrote (its ``.zattrs``, or ``zarr.json`` attributes, hold our
  ``unet_pipe`` key).  The new store and the old one are exchanged in one atomic
  step (Linux ``renameat2``), the old one then sits at ``DEST.partial`` and is
  removed; elsewhere the old store is moved to ``DEST.unet-pipe-old`` first.  A
  kill at any moment leaves ``DEST`` whole (old or new) or, in the fallback,
  the old store under that fixed name, which :func:`recover_swap` (run by every
  writer of ``DEST`` first) puts back or removes.
* **Staging folders are ours throughout**: a ``DEST.partial`` with our marker
  *or* our attributes key is ours (the marker is removed just before publishing,
  so none is left inside a published store), and :func:`remove_staging` deletes
  the marker and the attributes last, so a kill mid-removal leaves a folder the
  rerun still recognises.
* **Destinations and inputs** never overlap: a destination (or its staging
  folder) equal to, inside or containing an input is refused, with or without
  ``--overwrite``.
* **One writer per destination**: :class:`DestLock` holds ``DEST.unet-pipe.lock``
  (pid and host) for the run; a second process refuses at once, a lock left by a
  dead process on this host is detected as stale and replaced.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterable

from unet_pipe.atomic import STAGING_MARKER, _pid_alive, atomic_output, exchange  # noqa: F401 (atomic_output re-exported)
from unet_pipe.errors import OutputError

LOCK_SUFFIX = ".unet-pipe.lock"
DONE_DIR = ".unet_pipe_done"  # per-block done records inside a staging folder
ATTRS_KEY = "unet_pipe"  # our key in every store's attributes (re-exported by unet_pipe.io)
OLD_SUFFIX = ".unet-pipe-old"  # the old store during a two-rename swap (fixed: a rerun finds it)


def mark_staging(folder: Path) -> None:
    """Record that ``folder`` was created by us (call right after creating it)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "id": uuid.uuid4().hex}
    (Path(folder) / STAGING_MARKER).write_text(json.dumps(info))


def is_our_staging(folder: Path) -> bool:
    """True for a staging folder of ours: our marker, or (a store about to be published, or an
    old one being removed) our key in its attributes."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    return (folder / STAGING_MARKER).is_file() or is_our_store(folder)


def remove_staging(folder: Path) -> None:
    """Remove a staging folder of ours; refuse anything else found under its name.

    The marker is written first and deleted last (after the attributes), so a
    kill mid-removal leaves a folder that is still recognisably ours; an empty
    folder (a removal cut short after its last file) is removed as well.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()
        return
    if not is_our_staging(folder):
        raise OutputError(
            folder, "exists but was not created by unet-pipe (no staging marker); move it away or choose another DEST"
        )
    marker = folder / STAGING_MARKER
    if not marker.is_file():
        mark_staging(folder)
    last = {STAGING_MARKER, *_ATTRIBUTE_FILES}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name in last):
        if entry.name == STAGING_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    marker.unlink()
    folder.rmdir()


_ATTRIBUTE_FILES = (".zattrs", "zarr.json", ".zgroup")


def store_attributes(path: Path) -> tuple[Path, dict] | None:
    """(metadata file, group attributes) of a zarr group folder, format 2 (``.zattrs``) or
    3 (``zarr.json``'s ``attributes``); None when there are none or they cannot be read.

    Read as plain JSON, not through zarr: cheap, and independent of zarr's format detection.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    for name in (".zattrs", "zarr.json"):
        file = path / name
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except (ValueError, OSError):
                return None
            attrs = data.get("attributes", {}) if name == "zarr.json" and isinstance(data, dict) else data
            return (file, attrs) if isinstance(attrs, dict) else None
    return None


def is_our_store(path: Path) -> bool:
    """True for an OME-Zarr folder that this project wrote (our key in its attributes, NGFF 0.4 or 0.5)."""
    found = None if Path(path).is_symlink() else store_attributes(path)
    return found is not None and ATTRS_KEY in found[1]


def check_replaceable(dest: Path) -> None:
    """Refuse ``--overwrite`` of anything but a store of ours."""
    dest = Path(dest)
    if dest.is_symlink():
        raise OutputError(dest, "is a link, not an OME-Zarr store written by unet-pipe; refusing to replace it")
    if dest.is_file():
        raise OutputError(dest, "is a file, not an OME-Zarr store written by unet-pipe; refusing to replace it")
    if dest.exists() and not is_our_store(dest):
        raise OutputError(dest, "was not written by unet-pipe; refusing to replace it (move it away)")


def replace_with(staging: Path, dest: Path) -> None:
    """Publish ``staging`` as ``dest``, swapping out an existing store of ours.

    Crash-safe: see the module docstring.  ``staging`` must hold no marker
    (it would be published with it) but our attributes key.
    """
    staging, dest = Path(staging), Path(dest)
    recover_swap(dest)
    if not (dest.exists() or dest.is_symlink()):
        os.replace(staging, dest)
        return
    check_replaceable(dest)
    if exchange(staging, dest):
        remove_staging(staging)  # the old store: ours by its attributes, marked before its removal
        return
    backup = dest.with_name(dest.name + OLD_SUFFIX)
    os.replace(dest, backup)
    os.replace(staging, dest)
    remove_staging(backup)


def recover_swap(dest: Path) -> None:
    """Finish a two-rename swap of ``dest`` that a kill interrupted: put the old store back
    when ``dest`` is missing, else remove it.  Anything not ours under that name is refused."""
    dest = Path(dest)
    backup = dest.with_name(dest.name + OLD_SUFFIX)
    if not (backup.exists() or backup.is_symlink()):
        return
    if not is_our_staging(backup):
        raise OutputError(backup, f"is in the way of {dest.name} and was not written by unet-pipe; move it away")
    if dest.exists() or dest.is_symlink():
        remove_staging(backup)
    else:
        os.replace(backup, dest)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def check_dest(
    dest: Path, inputs: Iterable[Path | None], staging_suffix: str = ".partial", kind: str = "input"
) -> None:
    """Refuse a destination (or its staging folder) equal to, inside or containing an input
    (or, with ``kind="output"``, another output of the same command)."""
    dest = Path(dest)
    outputs = [dest, dest.with_name(dest.name + staging_suffix)]
    for source in inputs:
        if source is None:
            continue
        src = _resolved(Path(source))
        for out in outputs:
            target = _resolved(out)
            if target == src or src in target.parents or target in src.parents:
                raise OutputError(
                    dest, f"overlaps the {kind} {source} (the same path, inside it or containing it); choose another DEST"
                )


def leftover_note(dest: Path, *, since: float, remove_empty: bool, damaged: bool = False) -> str:
    """What a failed run left for ``dest``, as a clause for its one-line error.

    A staging folder of ours with finished blocks is kept (a rerun on the same
    inputs resumes it); one without, or a ``damaged`` one (a chunk of it cannot
    be decoded, so resuming would fail again), is removed when ``remove_empty``
    (the run held the lock, so nobody else is using it).  A periodic checkpoint
    ``OUT.partial`` written since ``since`` (train) is kept for ``--resume``.
    """
    staging = Path(dest).with_name(Path(dest).name + ".partial")
    if staging.is_file() and not staging.is_symlink():
        if staging.stat().st_mtime < since:
            return ""
        return f"; {staging.name} kept: rerun with --resume to continue from it"
    if not is_our_staging(staging):
        return ""
    if damaged:
        if not remove_empty:
            return f"; {staging.name} is damaged: remove it and start over"
        shutil.rmtree(staging, ignore_errors=True)
        return f"; the damaged {staging.name} was removed: rerun to start over"
    records = staging / DONE_DIR
    done = sum(1 for p in records.iterdir() if not p.name.endswith(".tmp")) if records.is_dir() else 0
    if done:
        blocks = f"{done} finished block{'s' * (done > 1)}"
        return f"; {staging.name} kept with {blocks}: rerunning on the same inputs resumes it"
    if remove_empty:
        shutil.rmtree(staging, ignore_errors=True)
        return "; nothing was written"
    return f"; {staging.name} kept (no finished blocks yet)"


_ZARR_METADATA = (".zgroup", ".zarray", ".zattrs", "zarr.json")


def check_not_inside_store(dest: Path) -> None:
    """Refuse a destination inside an existing zarr store (it would become part of that store)."""
    target = _resolved(Path(dest))
    for folder in target.parents:
        if any((folder / name).is_file() for name in _ZARR_METADATA):
            raise OutputError(dest, f"is inside the zarr store {folder}; choose a DEST outside it")


class DestLock:
    """An exclusive lock on one destination: ``DEST.unet-pipe.lock`` with pid and host."""

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        self.path = self.dest.with_name(self.dest.name + LOCK_SUFFIX)
        self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "DestLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(self.path.parent, f"cannot create the output folder ({exc.strerror or exc})") from None
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise OutputError(
                    self.dest,
                    f"is being written by pid {pid} on {host} (lock {self.path.name}); "
                    "if that process is gone, remove the lock file",
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise OutputError(self.dest, f"could not take the lock {self.path.name}")

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "DestLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_writable(folder: Path, need_bytes: int = 0) -> None:
    """Fail before long work if ``folder`` cannot be written or lacks ``need_bytes`` of free space."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".unet-pipe-probe-"):
            pass
    except OSError as exc:
        raise OutputError(folder, f"cannot write here ({exc.strerror or exc})") from None
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise OutputError(
            folder, f"needs about {need_bytes / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB are free"
        )

