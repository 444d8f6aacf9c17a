"""The one writer of plain files and the one atomic swap of folders.

Every plain file the project writes (TIFF, CSV, JSON, PNG, Markdown,
checkpoints, zips) goes through :func:`atomic_output`: it is written to a
temporary name beside its destination and renamed over it, and it replaces an
existing file only when that file is one the project wrote.  Ownership is
recorded per output folder in a hidden ``.unet-pipe/`` folder, one record per
file (``<name>.json``) with the size, ``mtime_ns`` and, up to
:data:`HASH_LIMIT` bytes, the SHA-256 of what was written; an existing file
without a matching record is refused in one line.  The record is written
before the rename and accepts both the old and the new file, then narrowed to
the new one, so a kill at any moment leaves a file the rerun still recognises.
Formats that carry our mark inside (checkpoints, label TIFFs, bioimage.io
packages) are also recognised by it (``recognise=``), e.g. when copied in.

Files inside a staging folder or store of ours, and names in our hidden
namespace (``.unet-pipe*``), are ours by construction and get no record.
Folder outputs (report figures) are built in ``DEST.partial``, ours by a
record beside it, and published by :func:`publish` with one atomic exchange.

:func:`exchange` swaps two paths atomically (Linux ``renameat2`` with
``RENAME_EXCHANGE``); where that is not available it returns False and the
caller falls back to renames that a rerun can recover from.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import errno
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from unet_pipe.errors import InputError, OutputError

OWN_DIR = ".unet-pipe"  # per output folder: one ownership record per file or folder we wrote
HASH_LIMIT = 64 * 2**20  # bytes; larger files are recognised by size and mtime_ns alone (hashing costs seconds)
STAGING_MARKER = ".unet-pipe-staging"  # inside a staging folder or store of ours (see unet_pipe.safety)
_STORE_METADATA = (".zattrs", "zarr.json")
_FOREIGN = "exists and was not written by unet-pipe; move it away or choose another name"


def record_path(path: Path) -> Path:
    """Where the ownership record of ``path`` lives: ``<folder>/.unet-pipe/<name>.json``."""
    path = Path(path)
    return path.parent / OWN_DIR / f"{path.name}.json"


def _sha256(path: Path, size: int | None = None) -> str:
    """SHA-256 of the file, or of its first ``size`` bytes."""
    digest = hashlib.sha256()
    left = float("inf") if size is None else size
    with open(path, "rb") as fh:
        while left > 0 and (block := fh.read(int(min(2**20, left)))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies the file (or folder, file by file) at ``path`` as the one we wrote."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        return {"files": {str(p.relative_to(path)): fingerprint(p) for p in sorted(path.rglob("*")) if not p.is_dir()}}
    st = path.lstat()
    found: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.is_symlink():
        found["link"] = os.readlink(path)
    elif st.st_size <= HASH_LIMIT:
        found["sha256"] = _sha256(path)
    return found


def _read_record(path: Path) -> list[dict]:
    try:
        accepted = json.loads(record_path(path).read_text(encoding="utf-8")).get("accept", [])
    except (OSError, ValueError, AttributeError):
        return []
    return accepted if isinstance(accepted, list) else []


def _temporary(path: Path) -> Path:
    """A fresh temporary name beside ``path``; ones a killed process left there are removed."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            found = pattern.fullmatch(entry.name)
            if found and not _pid_alive(int(found.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_record(path: Path, accepted: list[dict]) -> None:
    """Write the record of ``path`` atomically (a kill leaves the old or the new record)."""
    target = record_path(path)
    folder = target.parent
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(folder, "is in the way of unet-pipe's ownership records; move it away")
    folder.mkdir(exist_ok=True)
    tmp = _temporary(target)
    tmp.write_text(json.dumps({"accept": accepted}), encoding="utf-8")
    os.replace(tmp, target)


def forget(path: Path) -> None:
    """Drop the ownership record of ``path`` (after removing what it described)."""
    record_path(path).unlink(missing_ok=True)


def inside_ours(path: Path) -> bool:
    """True when ``path`` lies in a staging folder or store of ours, or carries a name in our
    hidden namespace (``.unet-pipe*``, e.g. segment's stage records): ours by construction."""
    if Path(path).name.startswith(".unet-pipe"):
        return True
    for folder in Path(os.path.abspath(path)).parents:
        if (folder / STAGING_MARKER).is_file() or _is_staging_folder(folder):
            return True
        for name in _STORE_METADATA:
            meta = folder / name
            if meta.is_file():
                try:
                    data = json.loads(meta.read_text())
                except (OSError, ValueError):
                    return False
                attrs = data.get("attributes", {}) if name == "zarr.json" and isinstance(data, dict) else data
                return isinstance(attrs, dict) and "unet_pipe" in attrs
    return False


def is_ours(path: Path) -> bool:
    """True when ``path`` is absent, or is a file or folder this project wrote and nobody changed since."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return True
    accepted = _read_record(path)
    if path.is_dir() and not path.is_symlink():
        # A staging folder of ours (recorded before it was made), or a figure folder an earlier
        # version published with its staging marker inside.
        if _is_staging_folder(path) or (path / STAGING_MARKER).is_file():
            return True
    if not accepted:
        return False
    if fingerprint(path) in accepted:
        return True
    for entry in accepted:  # a log we append to: ours while it starts with what we wrote
        prefix = entry.get("prefix") if isinstance(entry, dict) else None
        if isinstance(prefix, dict) and path.is_file() and not path.is_symlink():
            size = prefix.get("size")
            if isinstance(size, int) and path.stat().st_size >= size and _sha256(path, size) == prefix.get("sha256"):
                return True
    return False


def open_append(path: str | Path) -> Any:
    """Open for appending a text file we wrote (through :func:`atomic_output`), e.g. a log.

    Its record is widened first to "starts with what we wrote", so the file
    stays recognisably ours however many lines are appended (or a kill cuts one).
    """
    path = Path(path)
    check_ours(path)
    if not inside_ours(path):
        size = path.stat().st_size
        _write_record(path, [*_read_record(path), {"prefix": {"size": size, "sha256": _sha256(path, size)}}])
    return open(path, "a", newline="", encoding="utf-8")


def check_ours(*paths: Path, recognise: Callable[[Path], bool] | None = None) -> None:
    """Refuse, before any work, the first of ``paths`` that holds something not written by us.

    ``recognise``: for formats that carry our mark inside (a checkpoint's format
    key), a test that a file without a matching record is ours all the same.
    """
    for path in paths:
        path = Path(path)
        if (path.exists() or path.is_symlink()) and not inside_ours(path) and not is_ours(path):
            if recognise is None or path.is_symlink() or not path.is_file() or not recognise(path):
                raise OutputError(path, _FOREIGN)


def _is_staging_folder(folder: Path) -> bool:
    return any(isinstance(e, dict) and e.get("staging") is True for e in _read_record(folder))


def discard(path: Path) -> None:
    """Remove a file or folder of ours (and its record); refuse anything else in one line."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        check_ours(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    forget(path)


def staging_folder(dest: Path) -> Path:
    """A fresh, empty ``DEST.partial`` for a folder output (e.g. report figures).

    It is ours by a record beside it (``.unet-pipe/DEST.partial.json``), written
    before the folder, so nothing of ours is inside it to be published along.
    An existing ``DEST`` or ``DEST.partial`` of the user's is refused.
    """
    dest = Path(dest)
    staging = dest.with_name(dest.name + ".partial")
    check_ours(dest, staging)
    discard(staging)
    _write_record(staging, [{"staging": True}])
    staging.mkdir()
    return staging


def publish(tmp: Path, path: Path, *, recorded: bool = True, recognise: Callable[[Path], bool] | None = None) -> None:
    """Rename ``tmp`` (a file or folder of ours beside ``path``) to ``path``, recording it as ours.

    The record accepts the old and the new content during the swap, so a kill
    at any moment leaves ``path`` recognisable.  ``recorded=False``: ``path``
    lies inside a folder of ours and needs no record.
    """
    tmp, path = Path(tmp), Path(path)
    if not recorded:
        os.replace(tmp, path)
        return
    check_ours(path, recognise=recognise)
    new = fingerprint(tmp)  # a rename keeps size, mtime and content
    old = [fingerprint(path)] if (path.exists() or path.is_symlink()) else []
    if tmp.is_dir():
        leftover = path.with_name(f".{path.name}.unet-pipe-old")
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)  # the old folder of a swap (fallback) that a kill interrupted
    _write_record(path, old + [new])
    if tmp.is_dir() and path.is_dir():
        _swap_folders(tmp, path)
    else:
        os.replace(tmp, path)
    forget(tmp)  # a staging folder's record
    _write_record(path, [new])


@contextlib.contextmanager
def atomic_output(path: str | Path, *, recognise: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on failure remove it.

    An existing ``path`` that this project did not write (no matching record,
    and not ``recognise``-d, see :func:`check_ours`) is refused before the
    caller writes anything.  A full disk or a crash mid-write leaves neither a
    half-written ``path`` nor a changed user file.
    """
    path = Path(path)
    ours_by_place = inside_ours(path)
    if not ours_by_place:
        check_ours(path, recognise=recognise)
    tmp = _temporary(path)
    try:
        yield tmp
        publish(tmp, path, recorded=not ours_by_place, recognise=recognise)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_markdown_with_figures(out_md: Path, figdir: Path, make_lines: Callable[[Path], list[str]]) -> Path:
    """A Markdown report and its figure folder: ``make_lines(staging)`` writes the figures into a
    fresh staging folder and returns the lines; the folder is published by one swap, then the
    Markdown. A failure removes the staging folder. Call :func:`check_ours` on both and read the
    inputs first, so a refused input leaves nothing behind."""
    staging = staging_folder(figdir)
    try:
        md = make_lines(staging)
    except BaseException:
        discard(staging)
        raise
    publish(staging, figdir)
    write_text_atomic(out_md, "\n".join(md))
    return out_md


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in ``path`` (one of our records: metrics, summaries); a missing or unreadable file is
    one :class:`InputError` line: ``<what> not found`` or ``not a readable <what> (<reason>)``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, f"{what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not a readable {what} ({type(exc).__name__})") from None


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as strict JSON (NaN/inf as null, numpy scalars as numbers) through :func:`atomic_output`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None: strict JSON has no NaN (and readers like jq reject it)."""
    import numpy as np

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def write_csv_atomic(path: str | Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    """Write ``rows`` with the columns ``fields`` (extra keys ignored; floats as ``%.6g``,
    NaN and None as empty) through :func:`atomic_output`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in fields})


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


# -- atomic exchange of two paths ------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # e.g. a file system without RENAME_EXCHANGE: the caller falls back
    raise OSError(err, os.strerror(err), str(a))


def _swap_folders(new: Path, dest: Path) -> None:
    """Replace the folder ``dest`` by the folder ``new`` (both ours); ``new``'s name is gone after."""
    if not exchange(new, dest):
        old = dest.with_name(f".{dest.name}.unet-pipe-old")  # hidden and fixed: only we make it
        shutil.rmtree(old, ignore_errors=True)  # a leftover of an interrupted swap
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old)
        return
    shutil.rmtree(new)  # now holds the old folder
