"""TIFF stacks read lazily, one 2D slice at a time.

A stack is a multi-page TIFF (classic, BigTIFF or OME-TIFF) or a folder of
single-slice TIFFs sorted naturally.  Opening reads headers only, and checks
geometry (2D/3D grayscale), dtype and, for folders, that every slice agrees;
every problem is an :class:`InputError` naming the file.  Voxel sizes come
from OME-XML or ImageJ metadata when present.  Arrays are (z, y, x); voxel
sizes (z, y, x) in micrometres.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tifffile
import zarr
from natsort import natsorted

from unet_pipe.errors import InputError
from unet_pipe.atomic import atomic_output

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class TiffSource:
    """A TIFF stack opened lazily: a multi-page file or a folder of slices."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    files: tuple[Path, ...]  # one file (multi-page) or one per slice
    voxel_size: tuple[float, float, float] | None = None

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    def iter_slices(self, out: Callable[[int], np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(z, slice)`` one 2D slice at a time (never the whole stack).

        ``out(z)``, if given, returns the (y, x) array to decode slice ``z``
        into, which saves a copy per slice for plain pages (the yielded slice
        is then that array).
        """
        if self.is_folder:
            for z, file in enumerate(self.files):
                with _open_tiff(file) as tif:
                    page = _read_page(tif, 0, file, out(z) if out else None)
                _check_slice(page, file, self.shape[1:], self.dtype, what="slice")
                yield z, page
            return
        file = self.files[0]
        with _open_tiff(file) as tif:
            series = tif.series[0]
            for z in range(self.shape[0]):
                page = _read_series_page(series, z, file, out(z) if out else None)
                _check_slice(page, file, self.shape[1:], self.dtype, what=f"page {z}")
                yield z, page


    def iter_bands(
        self, rows: int, out: Callable[[int, int, int], np.ndarray]
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(z, y0, band)``: each slice in bands of ``rows`` rows, top to bottom.

        For slices too large to hold two of in memory (stitched montages).
        ``out(z, y0, height)`` returns the C-contiguous ``(height, x)`` array
        to fill, which is the yielded band.  Uncompressed pages are read
        straight from the file at the band's offset; strips and tiles through
        tifffile's zarr view of the page, which decodes only the segments
        that overlap the band.  Pages whose segments are taller than a band
        (e.g. one compressed strip per page) are decoded whole, once.
        """
        if rows < 1:
            raise ValueError(f"rows must be positive, got {rows}")
        if self.is_folder:
            for z, file in enumerate(self.files):
                with _open_tiff(file) as tif:
                    yield from self._page_bands(tif.pages[0], z, file, "slice", rows, out)
            return
        file = self.files[0]
        with _open_tiff(file) as tif:
            series = tif.series[0]
            for z in range(self.shape[0]):
                if series.ndim == 2 or len(series.pages) != series.shape[0]:
                    whole = _read_series_page(series, z, file)  # rare layouts: whole slices
                    _check_slice(whole, file, self.shape[1:], self.dtype, what=f"page {z}")
                    for y0 in range(0, self.shape[1], rows):
                        band = out(z, y0, min(rows, self.shape[1] - y0))
                        band[...] = whole[y0 : y0 + len(band)]
                        yield z, y0, band
                    continue
                yield from self._page_bands(series.pages[z], z, file, f"page {z}", rows, out)

    def _page_bands(
        self, page: Any, z: int, file: Path, what: str, rows: int, out: Callable[[int, int, int], np.ndarray]
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        ny, nx = self.shape[1:]
        if _squeezed(page.shape) != _squeezed((ny, nx)):
            raise InputError(file, f"{what} has shape {tuple(page.shape)}, expected {(ny, nx)} like the first slice")
        if np.dtype(page.dtype) != self.dtype:
            raise InputError(file, f"{what} has dtype {np.dtype(page.dtype)}, expected {self.dtype} like the first slice")
        try:
            read = _band_reader(page, rows, nx, self.dtype)
        except Exception as exc:
            raise InputError(file, f"{what} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
        for y0 in range(0, ny, rows):
            band = out(z, y0, min(rows, ny - y0))
            try:
                read(y0, band)
            except Exception as exc:
                raise InputError(file, f"{what} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
            if band.dtype.kind == "f" and not np.isfinite(band).all():
                raise InputError(file, f"{what} contains NaN or infinite values")
            yield z, y0, band


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(n) for n in shape if n != 1)


def _band_reader(page: Any, rows: int, nx: int, dtype: np.dtype) -> Callable[[int, np.ndarray], None]:
    """A function ``read(y0, band)`` that fills ``band`` with rows ``y0 : y0 + len(band)`` of ``page``."""
    key = page.keyframe
    plain = (
        page.is_contiguous
        and key.compression == 1
        and key.samplesperpixel == 1
        and key.bitspersample == 8 * dtype.itemsize
        and not key.is_tiled
    )
    if plain:
        fh, offset = page.parent.filehandle, int(page.dataoffsets[0])
        swap = page.parent.byteorder != ("<" if np.little_endian else ">") and dtype.itemsize > 1

        def read_plain(y0: int, band: np.ndarray) -> None:
            fh.seek(offset + y0 * nx * dtype.itemsize)
            view = memoryview(band).cast("B")
            got = fh.readinto(view)
            if got != len(view):
                raise ValueError(f"file ends {len(view) - got} bytes early")
            if swap:
                band.byteswap(inplace=True)

        return read_plain
    view = zarr.open_array(page.aszarr(), mode="r")
    if view.ndim != 2 or view.chunks[0] > rows:
        whole = np.asarray(view[...]).reshape(-1, nx)

        def read_whole(y0: int, band: np.ndarray) -> None:
            band[...] = whole[y0 : y0 + len(band)]

        return read_whole

    def read_segments(y0: int, band: np.ndarray) -> None:
        band[...] = view[y0 : y0 + len(band)]

    return read_segments


def _open_tiff(file: Path) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(file)
    except FileNotFoundError:
        raise InputError(file, "file not found") from None
    except IsADirectoryError:
        raise InputError(file, "is a folder, expected a TIFF file") from None
    except Exception as exc:  # tifffile raises many types for corrupt headers
        raise InputError(file, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None


def _decode(page: Any, out: np.ndarray | None) -> np.ndarray:
    if out is not None and tuple(page.shape) == out.shape and np.dtype(page.dtype) == out.dtype:
        return page.asarray(out=out)
    return page.asarray()


def _read_page(tif: tifffile.TiffFile, index: int, file: Path, out: np.ndarray | None = None) -> np.ndarray:
    try:
        data = _decode(tif.pages[index], out)
    except Exception as exc:
        raise InputError(file, f"page {index} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    return np.squeeze(data) if data.ndim > 2 else data


def _read_series_page(series: Any, z: int, file: Path, out: np.ndarray | None = None) -> np.ndarray:
    try:
        if series.ndim == 2:
            return series.asarray()
        pages = series.pages
        if len(pages) == series.shape[0]:
            data = _decode(pages[z], out)
        else:  # pages hold more than one slice (rare: e.g. volumetric tiles); read via zarr view
            data = np.asarray(zarr.open_array(series.aszarr(), mode="r")[z])
    except InputError:
        raise
    except Exception as exc:
        raise InputError(file, f"page {z} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    return np.squeeze(data) if data.ndim > 2 else data


def _check_slice(data: np.ndarray, file: Path, shape: Sequence[int], dtype: np.dtype, what: str) -> None:
    if data.shape != tuple(shape):
        raise InputError(file, f"{what} has shape {data.shape}, expected {tuple(shape)} like the first slice")
    if data.dtype != dtype:
        raise InputError(file, f"{what} has dtype {data.dtype}, expected {dtype} like the first slice")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(file, f"{what} contains NaN or infinite values")


def _series_geometry(tif: tifffile.TiffFile, file: Path) -> tuple[tuple[int, int, int], np.dtype]:
    if not tif.series:
        raise InputError(file, "not a readable TIFF (no image series found)")
    series = tif.series[0]
    if len(tif.series) > 1:
        # tifffile splits a stack whose pages differ in shape or dtype into several series:
        # reading series 0 alone would silently drop slices.
        first = series.pages[0]
        odd = next(
            (i for i, p in enumerate(tif.pages) if p is not None and hasattr(p, "shape")
             and (tuple(p.shape) != tuple(first.shape) or p.dtype != first.dtype)),
            None,
        )
        where = "" if odd is None else (
            f" (page {odd}: shape {tuple(tif.pages[odd].shape)}, dtype {tif.pages[odd].dtype}; "
            f"page 0: shape {tuple(first.shape)}, dtype {first.dtype})"
        )
        raise InputError(file, f"holds {len(tif.series)} image series: pages differ in shape or dtype{where}")
    shape = tuple(int(s) for s in series.shape)
    axes = series.axes
    # Drop singleton non-spatial axes (e.g. OME-TIFF 'TCZYX' with T=C=1).
    kept = [(a, s) for a, s in zip(axes, shape) if not (s == 1 and a not in "YX")]
    if any(a == "S" for a, _ in kept):
        raise InputError(file, f"colour/sample axis in TIFF (axes {axes}, shape {shape}); convert to grayscale first")
    sizes = [s for _, s in kept]
    if len(sizes) == 2:
        sizes = [1, *sizes]
    if len(sizes) != 3:
        raise InputError(file, f"expected a 2D or 3D grayscale stack, got axes {axes} with shape {shape}")
    dtype = np.dtype(series.dtype)
    if dtype.kind not in "uif" and dtype != np.bool_:
        raise InputError(file, f"unsupported dtype {dtype}")
    if dtype.kind in "ui" and dtype.itemsize > 4:
        # Labels are stored and post-processed as at most 32-bit ids; narrowing could merge objects.
        raise InputError(file, f"64-bit integer pixels ({dtype}) are not supported; convert to (u)int32 or smaller")
    return (sizes[0], sizes[1], sizes[2]), dtype


def _tiff_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """Voxel size (z, y, x) in micrometres from OME or ImageJ metadata, if present."""
    try:
        if tif.is_ome and tif.ome_metadata:
            import xml.etree.ElementTree as ET

            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            factor = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3}
            sizes = []
            for ax in ("Z", "Y", "X"):
                value = pixels.get(f"PhysicalSize{ax}")
                unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
                if value is None or unit not in factor:
                    return None
                sizes.append(float(value) * factor[unit])
            return (sizes[0], sizes[1], sizes[2])
        if tif.is_imagej and tif.imagej_metadata:
            meta = tif.imagej_metadata
            unit = str(meta.get("unit", "")).replace("\\u00B5", "µ")
            factor = {"nm": 1e-3, "micron": 1.0, "µm": 1.0, "um": 1.0}.get(unit)
            page = tif.pages[0]
            xres = page.tags.get("XResolution")
            yres = page.tags.get("YResolution")
            if factor is None or xres is None or yres is None or "spacing" not in meta:
                return None
            x = xres.value[1] / xres.value[0] * factor
            y = yres.value[1] / yres.value[0] * factor
            return (float(meta["spacing"]) * factor, float(y), float(x))
    except Exception:  # metadata is optional: a malformed block must not stop ingestion
        log.warning("ignoring unreadable physical-size metadata in %s", tif.filename)
    return None


def open_tiff_stack(path: str | Path) -> TiffSource:
    """Open a TIFF stack lazily and check its geometry.

    ``path`` is a multi-page TIFF (classic, BigTIFF or OME-TIFF) or a folder of
    single-slice TIFFs (sorted naturally: ``2.tif`` before ``10.tif``).
    Raises :class:`InputError` naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_dir():
        entries = [p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES]
        broken = [p for p in entries if not p.is_file()]  # dangling links, folders named *.tif
        if broken:
            raise InputError(broken[0], "slice entry is not a readable file (dangling link or folder)")
        unreadable = [p for p in entries if not os.access(p, os.R_OK)]
        if unreadable:
            raise InputError(unreadable[0], "slice file is not readable (permissions)")
        files = natsorted(entries, key=lambda p: p.name)
        if not files:
            raise InputError(path, "folder holds no .tif/.tiff slices")
        with _open_tiff(files[0]) as tif:
            (nz, ny, nx), dtype = _series_geometry(tif, files[0])
            voxel_size = _tiff_voxel_size(tif)
        if nz != 1:
            raise InputError(files[0], f"expected one 2D slice per file in a folder, found {nz} slices")
        for file in files[1:]:  # headers only: cheap, and fails before any output is written
            with _open_tiff(file) as tif:
                (fz, fy, fx), fdtype = _series_geometry(tif, file)
            if (fz, fy, fx) != (1, ny, nx):
                raise InputError(file, f"slice shape {(fy, fx)} differs from {(ny, nx)} of {files[0].name}")
            if fdtype != dtype:
                raise InputError(file, f"slice dtype {fdtype} differs from {dtype} of {files[0].name}")
        return TiffSource(path, (len(files), ny, nx), dtype, tuple(files), voxel_size)
    with _open_tiff(path) as tif:
        shape, dtype = _series_geometry(tif, path)
        voxel_size = _tiff_voxel_size(tif)
    return TiffSource(path, shape, dtype, (path,), voxel_size)


# ------------------------------------------------------------------ writing


#: The ImageJ ``Info`` of the label TIFFs we write: what lets a rerun replace one (and nothing else).
LABEL_TIFF_MARK = "unet-pipe instances"


def imagej_label_dtype(max_id: int) -> np.dtype:
    """The ImageJ pixel type holding ids up to ``max_id`` exactly: uint16, else float32 (ImageJ
    has no 32-bit integer type; float32 is exact to 2**24).  More ids: :class:`ValueError`."""
    if max_id <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_id <= 2**24:
        return np.dtype(np.float32)
    raise ValueError(f"{max_id} instance ids do not fit an ImageJ TIFF (at most 2**24 in float32)")


def write_imagej_labels(labels: Any, dest: str | Path, voxel_size: Sequence[float], max_id: int) -> Path:
    """Write a (z, y, x) label array as an ImageJ hyperstack TIFF that Fiji opens with its voxel size
    (z, y, x µm: ``spacing`` and the resolution in pixels per µm), one slice read at a time.

    Ids are stored as :func:`imagej_label_dtype` gives; ``dest`` is written atomically and carries
    :data:`LABEL_TIFF_MARK` as its ImageJ ``Info``.
    """
    dtype = imagej_label_dtype(int(max_id))
    vz, vy, vx = (float(v) for v in voxel_size)
    pages = (np.asarray(labels[z]).astype(dtype) for z in range(labels.shape[0]))
    with atomic_output(Path(dest), recognise=is_our_label_tiff) as tmp:
        tifffile.imwrite(
            tmp, pages, shape=tuple(labels.shape), dtype=dtype, imagej=True,
            resolution=(1.0 / vx, 1.0 / vy),
            metadata={"spacing": vz, "unit": "um", "axes": "ZYX", "Info": LABEL_TIFF_MARK},
        )
    return Path(dest)


def is_our_label_tiff(path: str | Path) -> bool:
    """True for a TIFF that :func:`write_imagej_labels` wrote (our mark in its ImageJ ``Info``)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return (tif.imagej_metadata or {}).get("Info") == LABEL_TIFF_MARK
    except Exception:  # not a TIFF, or damaged: not ours
        return False
