"""Input images given as OME-Zarr (or plain zarr arrays), read lazily like TIFF stacks.

``datasets.NAME.raw`` and ``.labels`` may name, besides a TIFF stack:

* an OME-Zarr image: NGFF 0.4 on zarr format 2 or NGFF 0.5 on zarr format 3
  (``attrs["ome"]``); level 0 of its first ``multiscales`` entry is read;
* a ``labels`` group of one (an NGFF labels group listing a single image), or one
  image of it (``RAW.ome.zarr/labels/NAME``);
* a plain zarr array of 2 or 3 dimensions (y, x or z, y, x; no physical metadata).

Axes: the spatial axes must be ``z, y, x`` or ``y, x`` in that order (a 2D image
is one slice); channel, time and custom axes are allowed only with one entry.
Physical units (NGFF axis ``unit``) are converted to micrometres; an axis without
a unit is taken to be in micrometres.  The voxel size is the ``scale`` and the
position the ``translation`` of level 0, composed with the multiscale's own
transforms.  A 2D image's z voxel size is 1 µm and its z position unknown.

:class:`ZarrSource` has the interface of :class:`unet_pipe.tiff.TiffSource`
(``path``, ``shape``, ``dtype``, ``files``, ``voxel_size``, ``iter_slices``,
``iter_bands``), so ingestion streams either through one staging mechanism.
The input is opened read-only and never written.

Labelled crops: a label image with a ``translation`` gives its own place in the
raw stack, in voxels ``(labels translation - raw translation) / voxel size``
(:func:`crop_offset`).  The pipeline's stores keep the raw's frame (the raw
store starts at 0); the input's scale and translation are recorded in the
store's ``unet_pipe.source`` attributes, where labels ingestion finds them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zarr

from unet_pipe.errors import InputError
from unet_pipe.integrity import CHUNKS_KEY, CheckedArray, check_chunks
from unet_pipe.ngff import entry_in_store, ngff_keys, own_attributes, store_role
from unet_pipe.tiff import open_tiff_stack

log = logging.getLogger(__name__)

# NGFF units (UDUNITS-2 names) of length, in micrometres.
UNITS_UM = {
    "angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0, "micron": 1.0, "millimeter": 1e3,
    "centimeter": 1e4, "meter": 1e6,
}
ZARR_MARKERS = (".zgroup", ".zarray", "zarr.json")
# Source slices decoded at once (one z-chunk of the input while it fits): reading a
# thick-chunked input slice by slice would decode every chunk once per slice.
SLAB_BYTES = 128 * 2**20
# A label image sits on the raw's voxel grid when offsets and scales agree this closely.
GRID_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Frame:
    """Where a voxel grid lies in physical space: (z, y, x) voxel size and position of voxel 0, µm."""

    scale: tuple[float, float, float]
    translation: tuple[float, float, float]


@dataclass(frozen=True)
class ZarrSource:
    """Level 0 of an OME-Zarr image (or a plain zarr array) opened lazily, as (z, y, x)."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    level: str  # the array's path inside ``path`` ("" for a plain array)
    voxel_size: tuple[float, float, float] | None  # µm; None: no scale metadata
    translation: tuple[float | None, float, float] | None  # µm; z None for a 2D image; None: no translation
    ngff: str | None  # NGFF version, None for a plain array
    array: Any = field(compare=False, repr=False)
    roles: tuple[str | None, ...] = field(compare=False, repr=False)  # per array axis: "z"/"y"/"x" or None (index 0)
    held: str | None = field(default=None, compare=False)  # what a store unet-pipe published holds (store_role)

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path,)

    @property
    def is_2d(self) -> bool:
        return "z" not in self.roles

    def read(self, z0: int, z1: int, y0: int = 0, y1: int | None = None) -> np.ndarray:
        """Slices ``z0:z1``, rows ``y0:y1`` (all columns) as a (z, y, x) array of ``dtype``."""
        span = {"z": slice(z0, z1), "y": slice(y0, self.shape[1] if y1 is None else y1), "x": slice(None)}
        data = self.array[tuple(span[r] if r else 0 for r in self.roles)]
        data = np.asarray(data, dtype=self.dtype)  # native byte order: stores are written little-endian
        if self.is_2d:
            data = data[None]
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise InputError(self.path, f"slices {z0}..{z1 - 1} contain NaN or infinite values")
        return data

    def iter_slices(self, out: Callable[[int], np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(z, slice)`` in order; ``out(z)`` gives the (y, x) array to fill (see TiffSource)."""
        depth = 1 if self.is_2d else int(self.array.chunks[self.roles.index("z")])
        per_slice = self.shape[1] * self.shape[2] * self.dtype.itemsize
        fits = max(1, SLAB_BYTES // max(per_slice, 1))
        # Whole z-chunks, as many as fit: one zarr read per slab (zarr fetches its chunks concurrently;
        # measured, ISBI 30 x 512 x 512 in chunks of one slice: 0.22 s read slice by slice, 0.16 s in
        # one slab; the same stack as TIFF: 0.13 s).
        step = fits // depth * depth if fits >= depth else fits
        if step < depth:
            log.info("%s: z-chunks of %d slices read %d at a time (memory bound): each chunk decoded %d times",
                     self.path, depth, step, -(-depth // step))
        for z0 in range(0, self.shape[0], step):
            slab = self.read(z0, min(z0 + step, self.shape[0]))
            for i, data in enumerate(slab):
                if out is None:
                    yield z0 + i, data
                else:
                    target = out(z0 + i)
                    target[...] = data
                    yield z0 + i, target

    def iter_bands(
        self, rows: int, out: Callable[[int, int, int], np.ndarray]
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(z, y0, band)`` of ``rows`` rows, slice by slice (for slices too large to hold twice)."""
        if rows < 1:
            raise ValueError(f"rows must be positive, got {rows}")
        for z in range(self.shape[0]):
            for y0 in range(0, self.shape[1], rows):
                band = out(z, y0, min(rows, self.shape[1] - y0))
                band[...] = self.read(z, z + 1, y0, y0 + len(band))[0]
                yield z, y0, band


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` is a zarr group or array (format 2 or 3) on disk."""
    path = Path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in ZARR_MARKERS)


def open_input_stack(path: str | Path) -> Any:
    """Open an input image lazily: a zarr store as :class:`ZarrSource`, else a TIFF stack."""
    path = Path(path)
    if is_zarr(path):
        return open_zarr_source(path)
    if path.is_dir() and path.name.lower().endswith(".zarr"):
        raise InputError(path, f"not a zarr store (none of {', '.join(ZARR_MARKERS)} found)")
    return open_tiff_stack(path)


def open_zarr_source(path: str | Path) -> ZarrSource:
    """Open level 0 of the OME-Zarr image (or the plain zarr array) at ``path``; read-only, headers only."""
    path = Path(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises many types for garbled metadata
        raise InputError(path, f"not a readable zarr store ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Array):
        if node.ndim not in (2, 3):
            raise InputError(path, f"a plain zarr array must have 2 (y, x) or 3 (z, y, x) dimensions, not {node.ndim}")
        roles = ("y", "x") if node.ndim == 2 else ("z", "y", "x")
        return _source(path, "", node, roles, None, None, None)
    meta = ngff_keys(dict(node.attrs))[1]  # NGFF 0.5 keeps its metadata under "ome"
    if "multiscales" not in meta:
        names = meta.get("labels")
        if isinstance(names, list) and len(names) == 1 and isinstance(names[0], str):
            # An NGFF labels group of one image.
            return open_zarr_source(path / entry_in_store(path, names[0], "labels entry"))
        if isinstance(names, list):
            raise InputError(path, f"a labels group of {len(names)} images {names}: name one (…/labels/NAME)")
        raise InputError(path, "no 'multiscales' metadata: not an OME-Zarr image (give an image group or a zarr array)")
    try:
        ms = meta["multiscales"][0]
        datasets = ms["datasets"]
        level = datasets[0]["path"]
    except (KeyError, IndexError, TypeError):
        raise InputError(path, "'multiscales' metadata names no dataset (level 0)") from None
    entry_in_store(path, level, "multiscales dataset path")
    try:
        array = node[level]
    except KeyError:
        raise InputError(path, f"multiscales names level {level!r}, which is missing") from None
    except Exception as exc:
        raise InputError(path, f"level {level!r} has unreadable array metadata ({type(exc).__name__})") from None
    if not isinstance(array, zarr.Array):
        raise InputError(path, f"level {level!r} is a group, not an array")
    check_chunks(path, level, array, own_attributes(dict(node.attrs)).get(CHUNKS_KEY))
    version = str(meta.get("version") or ms.get("version") or "") or None
    roles, factors = _axes(path, ms.get("axes"), array.shape)
    transforms = [datasets[0].get("coordinateTransformations"), ms.get("coordinateTransformations")]
    scale, translation = _compose(path, transforms, array.ndim)
    spatial = [i for i, r in enumerate(roles) if r]
    voxel = translated = None
    if scale is not None:
        sizes = {roles[i]: scale[i] * factors[i] for i in spatial}
        voxel = (sizes.get("z", 1.0), sizes["y"], sizes["x"])
    if translation is not None:
        at = {roles[i]: translation[i] * factors[i] for i in spatial}
        translated = (at.get("z"), at["y"], at["x"])
    return _source(path, level, array, roles, voxel, translated, version, store_role(dict(node.attrs)))


def _source(path: Path, level: str, array: Any, roles: tuple, voxel: Any, translation: Any, ngff: Any,
            held: str | None = None) -> ZarrSource:
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "uif" and dtype != np.bool_:
        raise InputError(path, f"unsupported dtype {dtype} (expected integers, floats or booleans)")
    if dtype.kind in "ui" and dtype.itemsize > 4:
        raise InputError(path, f"64-bit integer pixels ({dtype}) are not supported; convert to (u)int32 or smaller")
    sizes = dict(zip(roles, array.shape))
    shape = (int(sizes.get("z", 1)), int(sizes["y"]), int(sizes["x"]))
    if min(shape) < 1:
        raise InputError(path, f"image of shape {tuple(array.shape)} is empty")
    return ZarrSource(
        path=path, shape=shape, dtype=dtype.newbyteorder("="), level=level, voxel_size=voxel,
        translation=translation, ngff=ngff, array=CheckedArray(array, path, level or "array"), roles=roles,
        held=held,
    )


def _axes(path: Path, axes: Any, shape: Sequence[int]) -> tuple[tuple[str | None, ...], list[float]]:
    """Per array axis its spatial role ('z', 'y', 'x') or None, and its unit in micrometres."""
    ndim = len(shape)
    if axes is None:  # NGFF < 0.3: axes implied, t c z y x
        if ndim > 5:
            raise InputError(path, f"{ndim} dimensions and no 'axes' metadata")
        axes = ["t", "c", "z", "y", "x"][5 - ndim:] if ndim > 2 else ["y", "x"]
    if not isinstance(axes, list) or len(axes) != ndim:
        raise InputError(path, f"'axes' {axes!r} does not describe the {ndim} dimensions of level 0")
    roles: list[str | None] = []
    factors: list[float] = []
    for axis, size in zip(axes, shape):
        name, kind, unit = (axis, None, None) if isinstance(axis, str) else (
            axis.get("name"), axis.get("type"), axis.get("unit")) if isinstance(axis, dict) else (None, None, None)
        if not isinstance(name, str):
            raise InputError(path, f"axis {axis!r} has no name")
        spatial = kind == "space" or (kind is None and name in ("z", "y", "x"))
        if not spatial:
            if size != 1:
                raise InputError(path, f"axis '{name}' ({kind or 'not space'}) has {size} entries; unet-pipe reads "
                                 "one grayscale volume: keep one channel and time point")
            roles.append(None)
            factors.append(1.0)
            continue
        if unit is None:
            factor = 1.0
        elif unit in UNITS_UM:
            factor = UNITS_UM[unit]
        else:
            raise InputError(path, f"axis '{name}' has unit {unit!r}; expected one of {', '.join(UNITS_UM)}")
        roles.append(name)
        factors.append(factor)
    spatial_names = tuple(r for r in roles if r)
    if spatial_names not in (("z", "y", "x"), ("y", "x")):
        raise InputError(path, f"spatial axes {list(spatial_names)} must be z, y, x (or y, x) in that order")
    if any(r is None for r in roles[roles.index(spatial_names[0]):]):
        raise InputError(path, f"axes {[a if isinstance(a, str) else a.get('name') for a in axes]}: "
                         "non-spatial axes must come before z, y, x")
    return tuple(roles), factors


def _compose(path: Path, lists: list[Any], ndim: int) -> tuple[list[float] | None, list[float] | None]:
    """Scale and translation of level 0: its own transforms, then the multiscale's (NGFF order)."""
    scale: list[float] | None = None
    translation: list[float] | None = None
    for transforms in lists:
        if transforms is None:
            continue
        if not isinstance(transforms, list):
            raise InputError(path, f"coordinateTransformations {transforms!r} must be a list")
        for t in transforms:
            kind = t.get("type") if isinstance(t, dict) else None
            if kind == "identity":
                continue
            if kind not in ("scale", "translation"):
                raise InputError(path, f"coordinate transformation {t!r} is not supported (scale, translation)")
            values = t.get(kind)
            if values is None and "path" in t:
                raise InputError(path, f"{kind} stored in a separate file ({t['path']!r}) is not supported")
            if (not isinstance(values, list) or len(values) != ndim
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in values)):
                raise InputError(path, f"{kind} {values!r} of level 0 must be {ndim} finite numbers")
            if kind == "scale":
                if min(values) <= 0:
                    raise InputError(path, f"scale {values!r} of level 0 must be positive")
                # A later scale multiplies what came before, translations included.
                scale = [float(v) * (1.0 if scale is None else s) for v, s in zip(values, scale or values)]
                if translation is not None:
                    translation = [p * float(v) for p, v in zip(translation, values)]
            else:
                translation = [float(v) + (0.0 if translation is None else p)
                               for v, p in zip(values, translation or values)]
    return scale, translation


# ------------------------------------------------------------------ labelled crops


def source_frame(source: Any, voxel_size: Sequence[float] | None = None) -> Frame:
    """The physical frame of an input stack: its OME-Zarr scale and translation if it has them,
    else ``voxel_size`` (the config's), else its TIFF metadata, else 1 µm; translation 0."""
    own = source.voxel_size if isinstance(source, ZarrSource) else None
    scale = own or (tuple(voxel_size) if voxel_size is not None else None) or source.voxel_size or (1.0, 1.0, 1.0)
    moved = getattr(source, "translation", None) or (0.0, 0.0, 0.0)
    return Frame(tuple(float(s) for s in scale), tuple(0.0 if t is None else float(t) for t in moved))


def store_frame(meta: Any) -> Frame:
    """The frame of the input a pipeline store was ingested from (its ``unet_pipe.source`` record)."""
    record = meta.attrs.get("unet_pipe", {}).get("source", {}) if isinstance(meta.attrs.get("unet_pipe"), dict) else {}
    scale = record.get("voxel_size_um") or meta.voxel_size
    moved = record.get("translation_um") or (0.0, 0.0, 0.0)
    return Frame(tuple(float(s) for s in scale), tuple(0.0 if t is None else float(t) for t in moved))


def crop_offset(
    labels: Any, raw: Frame, raw_depth: int, configured: Sequence[int] | None
) -> tuple[int, int, int] | None:
    """The (z, y, x) voxel of the raw where ``labels`` start: from an OME-Zarr label image's
    translation, ``(labels translation - raw translation) / voxel size``; else ``configured``.

    The label image must have the raw's scale and lie on its voxel grid (both within
    :data:`GRID_TOLERANCE`, relative), and ``configured`` (``labels_offset``), if given,
    must agree.  A 2D label image of a raw of several slices takes its z from ``configured``.
    """
    given = None if configured is None else tuple(int(o) for o in configured)
    if not isinstance(labels, ZarrSource) or labels.translation is None:
        return given
    if labels.voxel_size is None:
        raise InputError(labels.path, "has a translation but no scale: its voxel grid is unknown")
    axes = (1, 2) if labels.is_2d else (0, 1, 2)
    for a in axes:
        if not math.isclose(labels.voxel_size[a], raw.scale[a], rel_tol=GRID_TOLERANCE):
            raise InputError(labels.path, f"voxel size {_um(labels.voxel_size, axes)} µm differs from the raw's "
                             f"{_um(raw.scale, axes)} µm: labels must lie on the raw's voxel grid")
    offset: list[int] = []
    for a in range(3):
        if a not in axes:
            if given is None and raw_depth > 1:
                raise InputError(labels.path, f"a 2D label image of a {raw_depth}-slice raw stack: give its slice "
                                 "as datasets.NAME.labels_offset (z, y, x)")
            offset.append(given[0] if given is not None else 0)
            continue
        voxels = (labels.translation[a] - raw.translation[a]) / raw.scale[a]
        whole = round(voxels)
        if abs(voxels - whole) > GRID_TOLERANCE * max(1.0, abs(voxels)):
            raise InputError(labels.path, f"translation puts it {voxels:.6g} voxels from the raw along {'zyx'[a]}: "
                             "not a whole number of voxels")
        offset.append(int(whole))
    if min(offset) < 0:
        raise InputError(labels.path, f"translation puts it at voxel {offset} of the raw: it starts outside the raw")
    if given is not None and tuple(offset) != given:
        raise InputError(labels.path, f"its translation puts it at voxel {offset} of the raw, but labels_offset is "
                         f"{list(given)}; correct one (or drop labels_offset)")
    return (offset[0], offset[1], offset[2])


def _um(values: Sequence[float], axes: Sequence[int]) -> str:
    return "(" + ", ".join(f"{values[a]:.6g}" for a in axes) + ")"


def source_record(source: Any) -> dict[str, Any]:
    """What a store records of the input it was ingested from (``unet_pipe.source``)."""
    record: dict[str, Any] = {"path": str(source.path), "files": len(source.files)}
    if isinstance(source, ZarrSource):
        record.update({"format": "ome-zarr" if source.ngff else "zarr", "ngff": source.ngff, "level": source.level})
        if source.voxel_size is not None:
            record["voxel_size_um"] = list(source.voxel_size)
        if source.translation is not None:
            record["translation_um"] = list(source.translation)
    return record
