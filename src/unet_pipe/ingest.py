"""Ingestion: a TIFF stack (or level 0 of an OME-Zarr image) streamed into an OME-Zarr image.

Reading lives in :mod:`unet_pipe.tiff` and :mod:`unet_pipe.zarr_input`, the store
layer (staging, chunk writers, pyramids) in :mod:`unet_pipe.io`; this module
checks the request and streams the slices from one into the other.
"""
from __future__ import annotations

import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from unet_pipe.errors import InputError
from unet_pipe.intensity import IntensitySample
from unet_pipe.io import DEFAULT_CHUNKS, DEFAULT_NGFF, FAST_COMPRESSION, StagedImage, image_metadata
from unet_pipe.progress import progress_bar
from unet_pipe.zarr_input import ZarrSource, crop_offset, open_input_stack, source_record, store_frame

log = logging.getLogger(__name__)


# Raw EM barely compresses (1.08x on ISBI at every zstd level): io.FAST_COMPRESSION.
INGEST_COMPRESSION: dict[str, Any] = FAST_COMPRESSION
# Ingest reads whole slices while a z-slab of them fits here, else bands of rows.
MAX_BUFFER_BYTES = 256 * 2**20


def ingest_tiff(
    src: str | Path,
    dest: str | Path,
    *,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    voxel_size: Sequence[float] | None = None,
    pyramid_levels: int = 2,
    compression: dict[str, Any] | None = None,
    kind: str = "image",
    like: str | Path | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
    progress: bool = False,
    max_buffer_bytes: int = MAX_BUFFER_BYTES,
    threads: int | None = None,
    offset: Sequence[int] | None = None,
    ngff: str = DEFAULT_NGFF,
    intensity_sample: IntensitySample | None = None,
) -> Path:
    """Stream a TIFF stack, or level 0 of an OME-Zarr image (:mod:`unet_pipe.zarr_input`), into an OME-Zarr image.

    Memory is two read buffers of one z-slab of ``chunks[0]`` slices each,
    while a slab fits in ``max_buffer_bytes``.  Larger slices (stitched
    montages) with ``chunks[0] == 1`` are read in bands of
    ``chunks[1] * 2**pyramid_levels`` rows instead, so memory stays bounded
    by the slice width, not its area.  Values and dtype
    are preserved exactly; the sha256 of the array bytes is stored in the
    attributes (``unet_pipe.array_sha256``).  ``kind='labels'`` requires an
    integer dtype and, with ``like``, the same shape as that image, or with
    ``offset`` (z, y, x) a crop of it that starts there and lies inside it
    (recorded as ``unet_pipe.offset`` and an NGFF translation).  Voxel
    size: the argument if given, else TIFF metadata, else 1 µm with a warning.
    ``threads``: chunk-encoding threads (default: the cores this process may
    use, at most 16); reading, downsampling and hashing run beside them.
    ``ngff``: "0.4" (zarr format 2) or "0.5" (zarr format 3).
    An OME-Zarr label image with a ``translation`` gives its own offset in
    ``like`` (:func:`unet_pipe.zarr_input.crop_offset`; ``offset`` must agree).
    ``intensity_sample``: filled, as the slices stream past, with the gray values that
    :func:`unet_pipe.intensity.intensity_range` would read from the new store (not when
    slices are read in bands: it then stays incomplete).
    """
    source, offset, voxel_size = _check_source(src, kind, like, offset, voxel_size, threads)
    dest = Path(dest)
    staged = StagedImage(
        dest,
        shape=source.shape,
        dtype=source.dtype,
        chunks=chunks,
        voxel_size=voxel_size,
        kind=kind,
        overwrite=overwrite,
        compression=INGEST_COMPRESSION if compression is None else compression,
        threads=threads,
        ngff=ngff,
    )
    if intensity_sample is not None:
        intensity_sample.start(source.shape, source.dtype)
    try:
        digest = _stream(source, staged, pyramid_levels, max_buffer_bytes, progress, intensity_sample)
        staged.commit(
            pyramid_levels,
            provenance=provenance,
            extra_attrs={
                "array_sha256": digest,
                "source": source_record(source),
                **({"offset": list(offset)} if offset is not None else {}),
            },
            source_image=like if kind == "labels" else None,
        )
    except BaseException:
        staged.abort()
        raise
    return dest


def _check_source(
    src: str | Path, kind: str, like: str | Path | None, offset: Sequence[int] | None,
    voxel_size: Sequence[float] | None, threads: int | None,
) -> tuple[Any, tuple[int, ...] | None, Sequence[float]]:
    """The opened source, the labels' offset in ``like`` (None: none) and the voxel size to record,
    checked against ``like`` as :func:`ingest_tiff` describes."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    source = open_input_stack(src)
    if kind == "labels" and like is not None:
        ref = image_metadata(like)
        offset = crop_offset(source, store_frame(ref), ref.shape[0], offset)
    if kind == "labels" and source.dtype.kind not in "uib":
        raise InputError(source.path, f"labels must be integers, found dtype {source.dtype}")
    if offset is not None:
        offset = tuple(int(o) for o in offset)
        if len(offset) != 3 or min(offset) < 0:
            raise InputError(source.path, f"offset {offset} must be three non-negative integers (z, y, x)")
        if like is None:
            raise InputError(source.path, "an offset needs the image the labels annotate (--like RAW)")
    if like is not None:
        ref = image_metadata(like)
        if offset is None and tuple(ref.shape) != source.shape:
            raise InputError(source.path, f"shape {source.shape} differs from {tuple(ref.shape)} of {ref.path}; "
                             "labels of a crop need its offset (datasets.NAME.labels_offset / --offset)")
        if offset is not None and any(o + s > n for o, s, n in zip(offset, source.shape, ref.shape)):
            raise InputError(source.path, f"shape {source.shape} at offset {list(offset)} does not lie inside "
                             f"the {tuple(ref.shape)} stack of {ref.path}")
        if voxel_size is None:
            voxel_size = ref.voxel_size
    own = source.voxel_size if isinstance(source, ZarrSource) else None  # a TIFF's is only a fallback
    if voxel_size is not None and own is not None and not all(
        math.isclose(float(a), float(b), rel_tol=1e-6) for a, b in zip(voxel_size, own)
    ):
        # The given voxel size labels the store; a labelled crop is still placed by the files' own
        # scale and translation, so say which one this store carries.
        log.warning("%s: its scale %s µm differs from the voxel size %s µm given; the store gets the "
                    "one given", source.path, [float(v) for v in own], [float(v) for v in voxel_size])
    if voxel_size is None:
        voxel_size = source.voxel_size
    if voxel_size is None:
        log.warning("%s: no voxel size in config or TIFF metadata; using 1 µm", source.path)
        voxel_size = (1.0, 1.0, 1.0)
    return source, offset, voxel_size


def _stream(source: Any, staged: StagedImage, pyramid_levels: int, max_buffer_bytes: int, progress: bool,
            sample: IntensitySample | None = None) -> str:
    """Read ``source`` slab by slab (or band by band) into ``staged``; the sha256 of its bytes, in order.
    Whole slices also go to ``sample``."""
    digest = hashlib.sha256()
    # Double buffering: while the pool encodes and hashes one slab, the main
    # thread reads and downsamples the next (measured 1.6x faster than writing
    # one slab at a time; 4 or 8 buffers were no faster on 2 cores).
    nz, ny, nx = source.shape
    step = staged.array.chunks[0]
    rows = ny
    if step == 1 and ny * nx * source.dtype.itemsize > max_buffer_bytes:
        rows = min(ny, staged.array.chunks[1] * 2**pyramid_levels)
        log.info("%s: slices of %d x %d read in bands of %d rows", source.path, ny, nx, rows)
    pending: list[list] = [[], []]
    turn = 0

    def free_buffer() -> np.ndarray:
        for future in pending[turn]:
            future.result()
        return buffers[turn]

    hasher = ThreadPoolExecutor(max_workers=1)  # one worker: bytes are hashed in order

    def write(z0: int, y0: int, filled: np.ndarray) -> None:
        nonlocal turn
        writes = staged.write_slab(z0, filled, pyramid_levels, wait=False, y0=y0)
        pending[turn] = [*writes, hasher.submit(digest.update, memoryview(filled).cast("B"))]
        turn = 1 - turn

    try:
        buffers = [np.empty((step, rows, nx), dtype=source.dtype) for _ in range(2)]
        if rows == ny:
            z0 = 0

            def target(z: int) -> np.ndarray:
                """Where slice ``z`` is decoded: its row of the current slab buffer."""
                return (free_buffer() if z == z0 else buffers[turn])[z - z0]

            for z, data in _progress(source.iter_slices(out=target), progress, nz, "slice", source.path.name):
                slab = buffers[turn]
                if not np.shares_memory(data, slab[z - z0]):  # pages that could not be decoded in place
                    slab[z - z0] = data
                if sample is not None:
                    sample.add(z, slab[z - z0])
                if z - z0 + 1 == step or z == nz - 1:
                    write(z0, 0, slab[: z - z0 + 1])
                    z0 = z + 1
        else:
            bands = source.iter_bands(rows, out=lambda z, y0, height: free_buffer()[0, :height])
            for z, y0, band in _progress(bands, progress, nz * -(-ny // rows), "band", source.path.name):
                write(z, y0, buffers[turn][:, : len(band)])
        for future in pending[0] + pending[1]:
            future.result()
    finally:
        hasher.shutdown(wait=True)
    return digest.hexdigest()


def _progress(items: Any, enabled: bool, total: int, unit: str, name: str) -> Any:
    if not enabled:
        return items
    return progress_bar(items, total=total, unit=unit, desc=f"ingest {name}")
