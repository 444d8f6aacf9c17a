"""Reading OME-Zarr chunks safely: a corrupt chunk is named, never decoded into wrong values.

Two layers, both in effect once :mod:`unet_pipe.io` is imported:

* :class:`CheckedBlosc` replaces numcodecs' ``blosc`` codec in its registry, so
  every Blosc chunk zarr decodes in this process is checked first: its length
  must equal the compressed size in its own header.  Blosc 1 decompresses
  without knowing the buffer's length, so a truncated chunk (a copy cut short,
  a full disk) was otherwise read past its end, giving garbage values with no
  error (measured: 1019 of 1024 voxels wrong, exit 0, the result published).
* :class:`CheckedBloscCodec` does the same for zarr format 3 (NGFF 0.5) arrays:
  zarr 3's own ``blosc`` codec calls numcodecs' Blosc class directly, not through
  the registry above, so it is registered (and selected in zarr's config) as the
  implementation of ``blosc`` whose decoder is a :class:`CheckedBlosc`.
* :class:`CheckedArray`, returned by :func:`unet_pipe.io.open_image`, turns any
  failure to decode a chunk into an :class:`~unet_pipe.errors.InputError` naming
  the store, the level and the chunk key (found by re-reading the chunks of the
  failed selection one by one, only after a failure).
"""
from __future__ import annotations

import itertools
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from numcodecs.compat import ensure_contiguous_ndarray

from unet_pipe.errors import InputError, UnetPipeError

# Under the unet_pipe attributes of a store we publish: the chunks written, per level.
CHUNKS_KEY = "chunks"
_BLOSC_HEADER = 16  # bytes; bytes 12..16 hold the compressed size, little endian


class CorruptChunk(InputError):
    """A chunk that cannot be decoded.  Raised by the codec, which does not know the
    store; :class:`CheckedArray` re-raises it naming the store and chunk, and a read
    outside it (our own staging store, read when resuming or publishing) still ends in
    one line."""


class CheckedBlosc(numcodecs.Blosc):
    """Blosc that refuses a buffer whose length differs from the size in its header."""

    codec_id = "blosc"

    def decode(self, buf: Any, out: Any = None) -> Any:
        data = ensure_contiguous_ndarray(buf).view(np.uint8).reshape(-1)
        if data.nbytes < _BLOSC_HEADER:
            raise CorruptChunk(None, f"a zarr chunk of {data.nbytes} bytes is shorter than a Blosc header "
                               "(truncated or overwritten)")
        recorded = int.from_bytes(data[12:16].tobytes(), "little")
        if recorded != data.nbytes:
            raise CorruptChunk(
                None, f"a zarr chunk has {data.nbytes} bytes but its Blosc header says {recorded} (truncated or overwritten)"
            )
        try:
            return super().decode(buf, out)
        except RuntimeError as exc:  # numcodecs: "error during blosc decompression: -1"
            raise CorruptChunk(None, f"a zarr chunk could not be decompressed ({exc})") from None


numcodecs.register_codec(CheckedBlosc)


class CheckedBloscCodec(zarr.codecs.BloscCodec):
    """zarr 3's ``blosc`` codec (same metadata, same bytes) decoding through :class:`CheckedBlosc`."""

    @cached_property
    def _blosc_codec(self) -> CheckedBlosc:
        config = zarr.codecs.BloscCodec._blosc_codec.func(self).get_config()
        config.pop("id", None)
        return CheckedBlosc(**config)


zarr.registry.register_codec("blosc", CheckedBloscCodec)
zarr.config.set({"codecs.blosc": f"{CheckedBloscCodec.__module__}.{CheckedBloscCodec.__qualname__}"})


class CheckedArray:
    """A read-only zarr array whose reads name the store and chunk when a chunk cannot be decoded.

    Behaves like the wrapped array for the uses of the pipeline (indexing,
    ``shape``, ``dtype``, ``chunks``, ``ndim``, ``np.asarray``, dask's
    ``from_array``); other attributes are passed through.
    """

    def __init__(self, array: Any, store: Path, level: str) -> None:
        self._array = array
        self._store = Path(store)
        self._level = level

    @property
    def store(self) -> Path:
        """The store this array was opened from (the path the user gave); zarr's own ``store`` is hidden."""
        return self._store

    def __getitem__(self, selection: Any) -> Any:
        try:
            return self._array[selection]
        except UnetPipeError as exc:
            if not isinstance(exc, CorruptChunk):
                raise
            raise self._explain(selection, exc) from None
        except Exception as exc:  # zarr and the codecs raise many types for one bad chunk
            raise self._explain(selection, exc) from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)

    @property
    def path(self) -> Path:
        """The store the user gave, not the array's path inside it (zarr's ``path``, e.g. ``0``):
        error lines name it."""
        return self._store

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # unpickling looks these up before _array exists
            raise AttributeError(name)
        return getattr(self._array, name)

    def __len__(self) -> int:
        return len(self._array)

    def __repr__(self) -> str:
        return f"CheckedArray({self._store}, level {self._level!r}, shape {self._array.shape})"

    def _chunk_ranges(self, selection: Any) -> list[range]:
        """The chunk indices per axis that ``selection`` touches (all of them if it is not basic)."""
        shape, chunks = self._array.shape, self._array.chunks
        whole = [range(-(-n // c)) for n, c in zip(shape, chunks)]
        sel = selection if isinstance(selection, tuple) else (selection,)
        if Ellipsis in sel or len(sel) > len(shape):
            return whole
        ranges = []
        for axis, n in enumerate(shape):
            item = sel[axis] if axis < len(sel) else slice(None)
            if isinstance(item, (int, np.integer)):
                i = int(item) % n if n else 0
                ranges.append(range(i // chunks[axis], i // chunks[axis] + 1))
            elif isinstance(item, slice) and item.step in (None, 1):
                start, stop, _ = item.indices(n)
                ranges.append(range(start // chunks[axis], -(-stop // chunks[axis])) if stop > start else range(0))
            else:
                return whole
        return ranges

    def _explain(self, selection: Any, exc: Exception) -> Exception:
        chunks = self._array.chunks
        for index in itertools.product(*self._chunk_ranges(selection)):
            region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))
            try:
                self._array[region]
            except Exception as bad:
                reason = bad.problem if isinstance(bad, CorruptChunk) else f"{type(bad).__name__}: {bad}"
                key = self._array.metadata.encode_chunk_key(index)  # "z/y/x" (format 2), "c/z/y/x" (3)
                return InputError(
                    self._store,
                    f"chunk {self._level}/{key} is corrupt ({reason}); "
                    "rewrite the store (rerun the stage that made it)",
                )
        # Not one chunk alone: report the failure itself, still on one line with the store named.
        reason = exc.problem if isinstance(exc, CorruptChunk) else f"{type(exc).__name__}: {exc}"
        return InputError(self._store, f"level {self._level!r} could not be read ({reason})")


# ------------------------------------------------------------------ chunks a store wrote

# Files of a level's folder that are metadata, not chunks (zarr format 2 and 3).
_METADATA_FILES = frozenset({".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json"})


def stored_chunk_keys(folder: Path) -> set[str]:
    """The chunk keys (``z/y/x``, or ``c/z/y/x`` in format 3) whose files are in a level's folder."""
    keys: set[str] = set()
    for root, _, files in os.walk(folder):
        prefix = os.path.relpath(root, folder)
        for name in files:
            if name not in _METADATA_FILES:
                keys.add(name if prefix == "." else f"{prefix}/{name}".replace(os.sep, "/"))
    return keys


def _grid_keys(array: Any) -> list[str]:
    grid = (range(-(-n // c)) for n, c in zip(array.shape, array.chunks))
    return [array.metadata.encode_chunk_key(index) for index in itertools.product(*grid)]


def chunk_record(folder: Path, array: Any) -> dict[str, Any]:
    """What a store we publish records of one level's chunks (``unet_pipe.chunks[LEVEL]``).

    ``count``: the chunk files written.  zarr leaves out chunks equal to the fill value,
    so some may be absent by design: the record lists the shorter of the absent keys
    (``absent``) or the written ones (``present``), so that a complete level costs a few bytes.
    """
    written = stored_chunk_keys(folder)
    grid = _grid_keys(array)
    absent = [k for k in grid if k not in written]
    if len(absent) <= len(grid) - len(absent):
        return {"count": len(written), "absent": absent}
    return {"count": len(written), "present": sorted(written)}


def check_chunks(store: Path, level: str, array: Any, records: Any) -> None:
    """Refuse a level of one of our stores whose recorded chunk files are not all there.

    ``records``: the store's ``unet_pipe.chunks`` (None for stores of other tools,
    whose missing chunks keep zarr's meaning: the fill value).  One listing of the
    level's folder; no chunk is read.
    """
    if records is None:
        return
    record = records.get(level) if isinstance(records, dict) else None
    if not isinstance(record, dict) or not ({"absent", "present"} & set(record)):
        raise InputError(store, f"its chunk record has no entry for level {level!r}; rewrite the store "
                         "(rerun the stage that made it)")
    written = stored_chunk_keys(Path(store) / level)
    if record.get("absent") == [] and len(written) == record.get("count"):
        return  # a complete level, as written: no need to enumerate the chunk grid
    if "present" in record:
        expected = record["present"]
    else:
        absent = set(record["absent"])
        expected = [k for k in _grid_keys(array) if k not in absent]
    missing = [k for k in expected if k not in written]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(store, f"chunk {level}/{missing[0]} is missing{more}: the store was written with it; "
                         "rewrite the store (rerun the stage that made it)")
