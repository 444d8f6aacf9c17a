"""OME-Zarr images, the store layer: staged writing, chunk writers, pyramids.

Metadata and reading live in :mod:`unet_pipe.ngff` (re-exported here), TIFF
reading in :mod:`unet_pipe.tiff`, ingestion in :mod:`unet_pipe.ingest`.

Conventions
-----------
* Arrays are (z, y, x); voxel sizes are (z, y, x) in micrometres.
* Every store the pipeline writes is an NGFF ``multiscales`` image group:
  by default NGFF 0.4 in zarr format 2 (the most widely readable OME-Zarr
  flavour: napari, Fiji/MoBIE, neuroglancer), or NGFF 0.5 in zarr format 3
  on request (``ngff="0.5"``).  Dataset ``"0"`` is full resolution, ``"1"``,
  ``"2"``, ... are 2x-downsampled in y and x (z is kept: EM stacks are
  anisotropic).
* Outputs are written into ``DEST.partial`` and renamed to ``DEST`` only once
  complete, so an interrupted job never leaves a store that looks finished.
  Block-wise writers record finished blocks in the staging folder, which makes
  them resumable.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numcodecs
import numpy as np
import zarr

from unet_pipe.downsample import downsample2  # noqa: F401  (re-exported; write_pyramid looks it up here)
from unet_pipe.errors import OutputError
from unet_pipe.integrity import CHUNKS_KEY, chunk_record
from unet_pipe.ngff import (  # noqa: F401  (re-exported: the pipeline's one import for OME-Zarr)
    DEFAULT_NGFF,
    NGFF_VERSIONS,
    ZARR_FORMATS,
    ImageMeta,
    check_ngff,
    describe,
    group_attributes,
    image_metadata,
    multiscales_metadata,
    open_image,
)
from unet_pipe.safety import (
    ATTRS_KEY,
    DONE_DIR,
    STAGING_MARKER,
    check_replaceable,
    check_writable,
    is_our_staging,
    mark_staging,
    recover_swap,
    remove_staging,
    replace_with,
)
from unet_pipe.tiff import open_tiff_stack  # noqa: F401  (re-exported: part of this module's API)

log = logging.getLogger(__name__)

DEFAULT_CHUNKS: tuple[int, int, int] = (1, 512, 512)
DEFAULT_COMPRESSION: dict[str, Any] = {"cname": "zstd", "clevel": 3}
# The fastest zstd level with one Blosc block per 512 x 512 chunk, for stores written on the way to
# a result (raw at ingest, instance labels). Measured on 30 ISBI slices: raw EM 35% less ingest CPU
# at the same ratio (1.08x at every level); uint32 instance ids encoded in 0.036 s instead of
# 0.101 s at a ratio of 18 instead of 20. The block size is stored in each chunk's Blosc header;
# every Blosc reader handles it.
FAST_COMPRESSION: dict[str, Any] = {"cname": "zstd", "clevel": 1, "blocksize": 262144}
_DONE_DIR = DONE_DIR
_STAGING_SUFFIX = ".partial"


def _compressor(compression: dict[str, Any] | None) -> numcodecs.Blosc:
    c = {**DEFAULT_COMPRESSION, **(compression or {})}
    # Byte shuffle: measured 2x faster than bitshuffle on EM data at the same ratio.
    return numcodecs.Blosc(
        cname=c["cname"], clevel=int(c["clevel"]), shuffle=numcodecs.Blosc.SHUFFLE, blocksize=int(c.get("blocksize", 0))
    )


def _create_array(
    group: zarr.Group, name: str, shape: Sequence[int], chunks: Sequence[int], dtype: Any,
    compression: dict | None, fill_value: Any = 0, overwrite: bool = False,
) -> zarr.Array:
    """An array of ``group``'s zarr format, Blosc-compressed: format 2 (NGFF 0.4) with chunk
    keys ``z/y/x``, format 3 (NGFF 0.5) with keys ``c/z/y/x`` and the same Blosc settings as
    a v3 ``blosc`` codec (typesize from the dtype), so both formats' chunks hold the same bytes.
    """
    codec: Any = (c := _compressor(compression))
    keys, names = {"name": "v2", "separator": "/"}, None
    if group.metadata.zarr_format == 3:
        codec = zarr.codecs.BloscCodec(cname=c.cname, clevel=c.clevel, shuffle="shuffle", blocksize=c.blocksize)
        keys = {"name": "default", "separator": "/"}
        names = ("z", "y", "x")  # NGFF 0.5: dimension names, when given, are the axes' names
    return group.create_array(
        name, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, compressors=codec, fill_value=fill_value,
        chunk_key_encoding=keys, dimension_names=names, overwrite=overwrite,
    )


def _staging_path(dest: Path) -> Path:
    return dest.with_name(dest.name + _STAGING_SUFFIX)


class StagedImage:
    """An OME-Zarr image written in a staging folder and published atomically.

    ``array`` is the writable full-resolution level.  Writers that work block by
    block call :meth:`mark_done` after each block so that a restarted job
    (``resume=True`` and the same ``fingerprint``) skips finished blocks.
    :meth:`commit` builds the pyramid, writes NGFF metadata and provenance and
    renames the staging folder to ``dest``.
    """

    def __init__(
        self,
        dest: str | Path,
        *,
        shape: Sequence[int],
        dtype: Any,
        chunks: Sequence[int] = DEFAULT_CHUNKS,
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        kind: str = "image",
        resume: bool = False,
        fingerprint: str | None = None,
        overwrite: bool = False,
        compression: dict[str, Any] | None = None,
        fill_value: Any = 0,
        threads: int | None = None,
        ngff: str = DEFAULT_NGFF,
    ) -> None:
        if kind not in ("image", "labels"):
            raise ValueError(f"kind must be 'image' or 'labels', got {kind!r}")
        self.dest = Path(dest)
        self.staging = _staging_path(self.dest)
        self.kind = kind
        self.ngff = check_ngff(ngff)
        self.zarr_format = ZARR_FORMATS[self.ngff]
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.shape = tuple(int(s) for s in shape)
        self.chunks = tuple(min(int(c), max(int(s), 1)) for c, s in zip(chunks, self.shape))
        self.dtype = np.dtype(dtype)
        self.fingerprint = fingerprint
        self.threads = threads  # chunk-encoding threads of write_slab (default: the usable cores)
        self.compression = {**DEFAULT_COMPRESSION, **(compression or {})}
        recover_swap(self.dest)  # an --overwrite swap a kill interrupted
        if (self.dest.exists() or self.dest.is_symlink()) and not overwrite:
            raise OutputError(self.dest, "already exists; remove it or pass --overwrite")
        if overwrite:
            check_replaceable(self.dest)  # fail now, not after the work
        # Free space for the full-resolution level and its pyramid, uncompressed (raw EM
        # compresses ~1.08x); label images compress far better, so ask for an eighth.
        nbytes = int(np.prod(self.shape, dtype=np.float64) * self.dtype.itemsize)
        check_writable(self.dest.parent, nbytes * 4 // 3 if kind == "image" else nbytes // 8)
        if resume and self._staging_matches():
            self.group = zarr.open_group(str(self.staging), mode="r+", zarr_format=self.zarr_format)
            self.array = self.group["0"]
            self._resumed = True
            log.info("resuming %s: %d blocks already done", self.dest, len(self.done_keys()))
            return
        self._resumed = False
        remove_staging(self.staging)  # refuses a DEST.partial that is not ours
        # Marked before zarr writes anything in it: a kill at any moment leaves a folder we recognise.
        self.staging.mkdir()
        mark_staging(self.staging)
        self.group = zarr.open_group(str(self.staging), mode="a", zarr_format=self.zarr_format)
        self.group.attrs[ATTRS_KEY] = {"staging": {"fingerprint": fingerprint, "complete": False}}
        self.array = _create_array(self.group, "0", self.shape, self.chunks, self.dtype, self.compression, fill_value)
        (self.staging / _DONE_DIR).mkdir()

    def _staging_matches(self) -> bool:
        if not (self.staging / _DONE_DIR).is_dir() or not is_our_staging(self.staging):
            return False
        try:
            # A staging store of the other format is not resumed: it is started over.
            group = zarr.open_group(str(self.staging), mode="r", zarr_format=self.zarr_format)
            array = group["0"]
            recorded = group.attrs.get(ATTRS_KEY, {}).get("staging", {}).get("fingerprint")
        except Exception:
            return False
        return (
            tuple(array.shape) == self.shape
            and tuple(array.chunks) == self.chunks
            and array.dtype == self.dtype
            and recorded == self.fingerprint
        )

    # -- block records ---------------------------------------------------------
    def _done_file(self, key: str) -> Path:
        safe = hashlib.sha1(key.encode()).hexdigest()
        return self.staging / _DONE_DIR / safe

    def is_done(self, key: str) -> bool:
        return self._done_file(key).exists()

    def mark_done(self, key: str) -> None:
        """Record that the block ``key`` is written (after its data reached the store)."""
        target = self._done_file(key)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(key)
        os.replace(tmp, target)

    def done_keys(self) -> list[str]:
        folder = self.staging / _DONE_DIR
        return sorted(p.read_text() for p in folder.iterdir() if not p.name.endswith(".tmp"))

    # -- streaming writes ------------------------------------------------------------
    def write_slab(
        self, z0: int, slab: np.ndarray, pyramid_levels: int, wait: bool = True, y0: int = 0
    ) -> list:
        """Write rows ``y0 : y0 + slab.shape[1]`` (full width) of slices ``z0 : z0 + len(slab)``,
        and the same region of every pyramid level, at once.

        Streaming writers (ingest) use this so that the pyramid is computed from
        the slab in memory instead of re-reading level 0 at commit (measured:
        the re-read cost as much as the level-0 write).  ``z0`` must be a
        multiple of the z chunk size; a slab of fewer than all rows must start
        on a multiple of ``chunks[1] * 2**pyramid_levels`` and span such a
        multiple (or end at the last row), so that every level gets whole
        chunk rows.  With ``wait=False`` the chunk writes go on in the
        background: the caller must keep ``slab`` unchanged until the returned
        futures are done.
        """
        writes = [self._writer.submit_slab(self.staging / "0", self.array, z0, slab, y0, self.compression)]
        current, ny, nx = slab, self.shape[1], self.shape[2]
        for level in range(1, pyramid_levels + 1):
            ny, nx = ny // 2, nx // 2
            if ny < 1 or nx < 1:
                break
            if y0 % 2:
                raise ValueError(f"a band starting at row {y0} of level {level - 1} cannot be downsampled alone")
            y0 //= 2
            levels = self.__dict__.setdefault("_level_arrays", {})
            if level not in levels:  # zarr metadata calls are slow (event-loop round trips): do them once
                levels[level] = self._streamed_level(level, (self.shape[0], ny, nx))
            rows = current.shape[1] // 2
            current = downsample2(current[:, : 2 * rows, : 2 * nx], self.kind)
            writes.append(
                self._writer.submit_slab(self.staging / str(level), levels[level], z0, current, y0, self.compression)
            )
        self._streamed_levels = pyramid_levels
        pending = [future for futures in writes for future in futures]
        if wait:
            for future in pending:
                future.result()
        return pending

    def stream_levels(self, pyramid_levels: int) -> bool:
        """Prepare :meth:`write_slab` calls (from any threads of this process): the pyramid levels
        are opened (or, in a new staging store, created) here, once, and the choice is recorded in
        the staging store's attributes.  True when every block of the store, written before or
        after, gets its levels from :meth:`write_slab`, so :meth:`commit` need not rebuild them: a
        new store, or a resumed one that recorded the same choice.  False (a store resumed from a
        run that wrote level 0 alone): the caller writes level 0 only; commit rebuilds the levels.
        """
        own = dict(self.group.attrs.get(ATTRS_KEY, {}))
        staging = dict(own.get("staging") or {})
        if self._resumed and staging.get("streamed_levels") != pyramid_levels:
            return False
        if not self._resumed:
            own["staging"] = {**staging, "streamed_levels": pyramid_levels}
            self.group.attrs[ATTRS_KEY] = own
        ny, nx = self.shape[1], self.shape[2]
        levels = self.__dict__.setdefault("_level_arrays", {})
        for level in range(1, pyramid_levels + 1):
            ny, nx = ny // 2, nx // 2
            if ny < 1 or nx < 1:
                break
            levels[level] = self._streamed_level(level, (self.shape[0], ny, nx))
        if getattr(self, "_level_gaps", False):
            return False
        self._writer  # noqa: B018  (the chunk writer, made here rather than by racing threads)
        self._streamed_levels = pyramid_levels
        return True

    def _streamed_level(self, level: int, shape: tuple[int, int, int]) -> zarr.Array:
        """Pyramid level ``level`` for :meth:`write_slab`: a resumed staging store's own (its done
        slabs are in it), else a new one; a resumed store without it (its slabs were written
        without their levels) gets the pyramid rebuilt from level 0 at commit."""
        if self._resumed:
            try:
                found = self.group[str(level)]
                if tuple(found.shape) == shape:
                    return found
            except KeyError:
                pass
            self._level_gaps = True
        return _create_level(self.group, level, shape, self.chunks, self.dtype, self.compression)

    @property
    def _writer(self) -> "_ChunkWriter":
        if not hasattr(self, "_chunk_writer"):
            self._chunk_writer = _ChunkWriter(self.threads)
        return self._chunk_writer

    # -- publish -----------------------------------------------------------------
    def commit(
        self,
        pyramid_levels: int = 2,
        provenance: dict | None = None,
        extra_attrs: dict | None = None,
        source_image: str | Path | None = None,
    ) -> Path:
        """Build the pyramid, write metadata and rename the staging folder to ``dest``.

        ``source_image``: for a label image, the image it labels; recorded as the
        NGFF ``image-label.source.image`` path relative to ``dest``, so that readers
        (ome-zarr-py, napari) open that image under the labels.
        """
        if getattr(self, "_streamed_levels", None) == pyramid_levels and not getattr(self, "_level_gaps", False):
            levels = min(_existing_levels(self.group), pyramid_levels)
        else:
            levels = write_pyramid(self.group, pyramid_levels, kind=self.kind, compression=self.compression)
        image_label = None
        if self.kind == "labels":
            image_label = {}
            if source_image is not None:
                # Relative: the pair stays valid when the results folder moves as a whole.
                image_label["source"] = {"image": os.path.relpath(Path(source_image), self.dest)}
        offset = (extra_attrs or {}).get("offset")
        # Which chunks were written, per level: readers tell a deleted chunk from one zarr left out.
        chunks = {str(level): chunk_record(self.staging / str(level), self.group[str(level)])
                  for level in range(levels + 1)}
        self.group.attrs.put(group_attributes(
            self.ngff,
            multiscales=multiscales_metadata(self.dest.name, self.voxel_size, levels, self.kind, offset, self.ngff),
            image_label=image_label,
            own={"kind": self.kind, **(provenance and {"provenance": provenance} or {}), **(extra_attrs or {}),
                 CHUNKS_KEY: chunks},
        ))
        shutil.rmtree(self.staging / _DONE_DIR, ignore_errors=True)
        if hasattr(self, "_chunk_writer"):
            self._chunk_writer.close()
        (self.staging / STAGING_MARKER).unlink(missing_ok=True)
        # With overwrite=True an existing store of ours is swapped out under a unique name.
        replace_with(self.staging, self.dest)
        return self.dest

    def abort(self) -> None:
        """Remove the staging folder (nothing is published)."""
        if hasattr(self, "_chunk_writer"):
            self._chunk_writer.close()
        if is_our_staging(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)


class _ChunkWriter:
    """Encode and store whole chunks of a local zarr array (format 2 or 3) on a thread pool.

    Written here rather than through ``zarr.Array.__setitem__`` because zarr 3's
    per-chunk overhead was measured at ~1.8 ms of CPU per 512x512 chunk, 5x the
    cost of the Blosc encoding itself; Blosc releases the GIL, so threads scale.
    The bytes are exactly what zarr writes for a format-2 array without filters
    (``compressor.encode`` of the C-ordered chunk, edge chunks padded with the
    fill value), and for format 3 with the codecs ``bytes`` (little endian) then
    ``blosc``, whose chunk keys start with ``c/``; tests read every store back through zarr.
    """

    def __init__(self, workers: int | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        # Default: every core this process may use (SLURM and taskset restrict it), at most 16.
        self.pool = ThreadPoolExecutor(max_workers=workers or min(16, len(os.sched_getaffinity(0))))
        self._meta: dict[int, tuple] = {}

    def submit_slab(
        self, folder: Path, array: zarr.Array, z0: int, slab: np.ndarray, y0: int = 0, compression: dict | None = None
    ) -> list:
        """Queue the chunks covering ``array[z0 : z0 + len(slab), y0 : y0 + slab.shape[1]]`` (full x).

        ``z0`` and ``y0`` must be chunk-aligned and the slab must cover whole
        chunk rows (or end at the last row).  ``compression``: the settings the
        array was created with (:func:`_create_array`).
        """
        key = id(array)
        if key not in self._meta:  # cache: each zarr property access is an event-loop round trip
            prefix = "" if array.metadata.zarr_format == 2 else "/c"
            self._meta[key] = (array.chunks, tuple(array.shape), _compressor(compression), array.fill_value or 0,
                               prefix, array)
        (cz, cy, cx), shape, compressor, fill, prefix, _ = self._meta[key]
        height, end = slab.shape[1], y0 + slab.shape[1]
        if z0 % cz or y0 % cy or slab.shape[2] != shape[2] or end > shape[1] or (end < shape[1] and height % cy):
            raise ValueError(
                f"slab of shape {slab.shape} at z={z0}, y={y0} does not cover whole chunk rows of {shape} "
                f"in chunks of {(cz, cy, cx)}"
            )
        futures = []
        for iz, zs in enumerate(range(0, len(slab), cz), start=z0 // cz):
            for iy, ys in enumerate(range(0, height, cy), start=y0 // cy):
                # One task and one mkdir per chunk row (measured: per-chunk tasks spent
                # ~8% of the ingest CPU in the interpreter and the pool's locks).
                row = f"{folder}{prefix}/{iz}/{iy}"
                os.makedirs(row, exist_ok=True)
                band = slab[zs : zs + cz, ys : ys + cy]
                futures.append(self.pool.submit(self._store_row, row, band, (cz, cy, cx), fill, compressor))
        return futures

    @staticmethod
    def _store_row(row: str, band: np.ndarray, shape: tuple[int, int, int], fill: Any, compressor: Any) -> None:
        for ix, xs in enumerate(range(0, band.shape[2], shape[2])):
            block = band[:, :, xs : xs + shape[2]]
            if block.shape != shape:
                padded = np.full(shape, fill, dtype=block.dtype)
                padded[: block.shape[0], : block.shape[1], : block.shape[2]] = block
                block = padded
            data = compressor.encode(np.ascontiguousarray(block))
            with open(f"{row}/{ix}", "wb") as f:
                f.write(data)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _create_level(
    group: zarr.Group, level: int, shape: Sequence[int], base_chunks: Sequence[int], dtype: Any, compression: dict | None
) -> zarr.Array:
    chunks = (base_chunks[0], min(base_chunks[1], shape[1]), min(base_chunks[2], shape[2]))
    return _create_array(group, str(level), shape, chunks, dtype, compression, 0, overwrite=True)


def _existing_levels(group: zarr.Group) -> int:
    level = 0
    while str(level + 1) in group:
        level += 1
    return level


#: Voxels read or written per zarr call by the slab loops (pyramid, postprocess, summary): zarr decodes
#: and encodes the chunks of one call concurrently, so one chunk per call left a core idle. Measured on
#: 30 ISBI slices (2 cores): postprocess 2D 0.43 s with one 512 x 512 chunk per call. A constant, so
#: memory stays flat in the volume size (about 64 MiB of float32).
SLAB_VOXELS = 1 << 24


def slab_depth(chunk_depth: int, slice_voxels: int, budget: int | None = None) -> int:
    """Slices per read/write call: a whole number of z-chunks (at least one) of at most ``budget``
    voxels (default :data:`SLAB_VOXELS`)."""
    chunk_voxels = max(1, int(chunk_depth) * int(slice_voxels))
    return int(chunk_depth) * max(1, int(SLAB_VOXELS if budget is None else budget) // chunk_voxels)


def write_pyramid(group: zarr.Group, levels: int, kind: str = "image", compression: dict | None = None) -> int:
    """Write ``levels`` 2x (y, x) downsampled arrays "1", "2", ... from array "0".

    Streams one band of output chunk rows at a time (z-chunks up to
    :data:`SLAB_VOXELS` by one y-chunk by the whole width), so memory does not
    grow with the volume or the slice area.
    Images are averaged over 2x2 blocks (rounded back to integer dtypes);
    labels take the top-left pixel of each 2x2 block (nearest), which keeps
    label values valid.  Stops early once a level would be smaller than 1
    pixel.  Returns the number of levels written.
    """
    base = group["0"]
    written = 0
    for level in range(1, levels + 1):
        prev = group[str(level - 1)]
        ny, nx = prev.shape[1] // 2, prev.shape[2] // 2
        if ny < 1 or nx < 1:
            break
        out = _create_level(group, level, (prev.shape[0], ny, nx), base.chunks, prev.dtype, compression)
        cz, cy = out.chunks[0], out.chunks[1]
        dz = slab_depth(cz, 4 * min(cy, ny) * nx)
        for z0 in range(0, prev.shape[0], dz):
            for y0 in range(0, ny, cy):
                y1 = min(y0 + cy, ny)
                band = prev[z0 : z0 + dz, 2 * y0 : 2 * y1, : 2 * nx]
                out[z0 : z0 + dz, y0:y1] = downsample2(band, kind)
        written = level
    return written
