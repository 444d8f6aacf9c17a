"""Overlap-tile geometry (paper Sec. 2 and Fig. 2), in daisy's vocabulary.

A network with valid convolutions maps an input window (``read_roi``) to a
smaller output window; the output written for a tile (``write_roi``) is the
part of that output that lies inside the block being computed.  Pixels near the
volume border get their missing context by *mirroring* the volume.

Conventions
-----------
* Coordinates are voxels in (z, y, x) order, global (volume) coordinates.  The
  output grid coincides with the input grid: output voxel ``p`` is the
  prediction for input voxel ``p``.
* Mirroring is numpy's ``'reflect'`` mode: the border voxel is the mirror axis
  and is not repeated (``[a b c] -> b | a b c | b``); windows that hang over by
  more than the volume size keep reflecting (period ``2 * (size - 1)``).  The
  training tile sampler (:mod:`unet_pipe.data`) pads the same way, so border
  pixels see the same kind of context in training and inference.
* Exactness.  A U-Net with ``L`` 2x2 poolings is shift-equivariant only for
  shifts that are multiples of ``step = 2**L``.  Every tile origin here is a
  multiple of ``step`` and every read window starts ``margin`` voxels before
  its tile, i.e. all windows lie on the same pooling grid as the window
  ``[-margin, N + margin)`` of a whole-volume forward pass.  Each output voxel
  is therefore computed by exactly the same arithmetic from the same (mirrored)
  input values whatever the tile or block size: tiled == untiled, up to the
  float reassociation a convolution library may apply for other array shapes.
  A flipped or rotated window keeps this property (its far edge also lies on a
  fixed residue of the grid), so test-time augmentation is tiling-invariant too.

Pure functions only; the zarr read with mirror padding reads just the bounding
box of the voxels a window needs, never a whole slice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

PAD_MODE = "reflect"


# --------------------------------------------------------------------- mirroring


def reflect_index(index: np.ndarray | Sequence[int], size: int) -> np.ndarray:
    """Map integer coordinates into ``[0, size)`` by numpy-``'reflect'`` mirroring.

    Equivalent to the indices ``np.pad(..., mode='reflect')`` uses, for any pad
    width (repeated reflection); a size-1 axis maps everything to 0.
    """
    index = np.asarray(index, dtype=np.int64)
    if size < 1:
        raise ValueError(f"cannot mirror an empty axis (size {size})")
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded < size, folded, period - folded)


def mirror_pad(image: np.ndarray, pad_width: Sequence[tuple[int, int]]) -> np.ndarray:
    """``np.pad(image, pad_width, mode='reflect')``, also for pads wider than the image."""
    index = [reflect_index(np.arange(-before, n + after), n) for n, (before, after) in zip(image.shape, pad_width)]
    return image[np.ix_(*index)]


def read_mirrored(
    array,
    start: Sequence[int],
    shape: Sequence[int],
    bounds: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Read ``shape`` voxels at ``start`` from the mirror-extended ``array``.

    ``array`` is anything sliceable like numpy (a zarr array); the window may
    hang over any border.  ``bounds`` (per axis ``(low, high)``, default the
    array's extent) is the range mirrored about, e.g. a training split's z
    range.  Only the bounding box of the source voxels that the window needs is
    read (at most the window size per axis), then gathered.
    """
    if len(start) != array.ndim or len(shape) != array.ndim:
        raise ValueError(f"window of rank {len(start)} for an array of rank {array.ndim}")
    if bounds is None:
        bounds = [(0, size) for size in array.shape]
    box: list[slice] = []
    gathers: list[np.ndarray | None] = []
    for s, n, (low, high) in zip(start, shape, bounds):
        s, n, low, high = int(s), int(n), int(low), int(high)
        if low <= s and s + n <= high:
            box.append(slice(s, s + n))
            gathers.append(None)
            continue
        index = reflect_index(np.arange(s - low, s - low + n), high - low) + low
        lo, hi = int(index.min()), int(index.max()) + 1
        box.append(slice(lo, hi))
        gathers.append(index - lo)
    data = np.asarray(array[tuple(box)])
    for axis, index in enumerate(gathers):
        if index is not None:
            data = np.take(data, index, axis=axis)
    return data


# ---------------------------------------------------------------------- regions


@dataclass(frozen=True)
class Roi:
    """An axis-aligned box: ``start`` (may be negative) and ``shape`` in voxels."""

    start: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", tuple(int(s) for s in self.start))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.start) != len(self.shape) or any(s < 0 for s in self.shape):
            raise ValueError(f"invalid Roi start={self.start} shape={self.shape}")

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(a + n for a, n in zip(self.start, self.shape))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def slices(self, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
        """Slices of this box in an array whose first voxel is at ``origin`` (default 0)."""
        origin = origin or (0,) * len(self.start)
        return tuple(slice(a - o, a - o + n) for a, n, o in zip(self.start, self.shape, origin))

    def intersect(self, other: Roi) -> Roi:
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop))
        return Roi(start, tuple(max(0, b - a) for a, b in zip(start, stop)))

    def key(self) -> str:
        """A stable text key (used for done records)."""
        return ",".join(f"{a}:{b}" for a, b in zip(self.start, self.stop))


# ------------------------------------------------------------------ net geometry


@dataclass(frozen=True)
class AxisGeometry:
    """Valid sizes of a network along one axis.

    ``margin``: context voxels lost per side (input = output + 2 * margin).
    ``step``: shift-equivariance grid (pooling factor ``2**(depth-1)``).
    Valid output sizes are ``o >= min_output`` with ``o % step == offset``.
    """

    margin: int
    step: int = 1
    offset: int = 0
    min_output: int = 1

    def net_output(self, size: int) -> int:
        """Smallest valid output size >= ``size``."""
        size = max(int(size), self.min_output)
        return size + (self.offset - size) % self.step

    def net_input(self, size: int) -> int:
        """Input window size for an output tile of ``size`` (after rounding up to a valid output)."""
        return self.net_output(size) + 2 * self.margin


#: The z axis in per-slice (2D) mode: no context, every slice on its own.
SLICE_AXIS = AxisGeometry(margin=0, step=1, offset=0, min_output=1)


def unet_axis_geometry(depth: int) -> AxisGeometry:
    """The per-axis geometry of :class:`unet_pipe.model.UNet` of ``depth`` levels.

    Derived from the model's own size algebra, never restated here.
    """
    from unet_pipe import model as unet

    step = 2 ** (depth - 1)
    offset = 4 % step
    size = offset or step
    while True:
        try:
            unet.valid_input_size(size, depth)
            break
        except ValueError:
            size += step
    return AxisGeometry(margin=unet.margin(depth), step=step, offset=offset, min_output=size)


def volume_geometry(axis: AxisGeometry, dims: int) -> tuple[AxisGeometry, AxisGeometry, AxisGeometry]:
    """(z, y, x) geometry: 2D networks run slice by slice, 3D networks use ``axis`` in z too."""
    if dims == 2:
        return (SLICE_AXIS, axis, axis)
    if dims == 3:
        return (axis, axis, axis)
    raise ValueError(f"dims must be 2 or 3, got {dims}")


# ------------------------------------------------------------------------ tiles


@dataclass(frozen=True)
class Tile:
    """One network evaluation.

    ``origin``: global position of the first output voxel of the network
    output (a multiple of ``step``); ``read``: the input window (global, may
    hang over the volume); ``write``: the output voxels kept (global, inside
    the block).  ``crop`` selects ``write`` in the network output.
    """

    origin: tuple[int, ...]
    read: Roi
    write: Roi

    @property
    def crop(self) -> tuple[slice, ...]:
        return self.write.slices(self.origin)


def check_tile_shape(tile: Sequence[int], geometry: Sequence[AxisGeometry]) -> tuple[int, ...]:
    """Normalise an output tile shape; each edge must be a positive multiple of its axis step."""
    tile = tuple(int(t) for t in tile)
    if len(tile) != len(geometry):
        raise ValueError(f"tile {tile} has {len(tile)} axes, expected {len(geometry)}")
    for t, g in zip(tile, geometry):
        if t < 1 or t % g.step:
            raise ValueError(f"tile edge {t} must be a positive multiple of the pooling factor {g.step}")
    return tile


def tile_grid(region: Roi, tile: Sequence[int], geometry: Sequence[AxisGeometry]) -> list[Tile]:
    """Tiles that cover ``region`` (the write region of one block), in C order.

    Tile origins are ``floor(region.start / step) * step + k * tile``, so the
    grid is aligned with the pooling grid whatever the block is; the last tile
    of an axis may reach past the region (its extra output is discarded).
    """
    tile = check_tile_shape(tile, geometry)
    per_axis: list[list[int]] = []
    for start, stop, t, g in zip(region.start, region.stop, tile, geometry):
        first = (start // g.step) * g.step
        per_axis.append(list(range(first, stop, t)) if stop > start else [])
    net_out = tuple(g.net_output(t) for t, g in zip(tile, geometry))
    read_shape = tuple(o + 2 * g.margin for o, g in zip(net_out, geometry))
    tiles = []
    for origin in np.ndindex(*(len(o) for o in per_axis)):
        o = tuple(per_axis[a][i] for a, i in enumerate(origin))
        write = Roi(o, tile).intersect(region)
        if write.size == 0:
            continue
        read = Roi(tuple(x - g.margin for x, g in zip(o, geometry)), read_shape)
        tiles.append(Tile(origin=o, read=read, write=write))
    return tiles


def bounding_roi(rois: Sequence[Roi]) -> Roi:
    """The smallest box containing every roi."""
    start = tuple(min(r.start[a] for r in rois) for a in range(len(rois[0].start)))
    stop = tuple(max(r.stop[a] for r in rois) for a in range(len(rois[0].start)))
    return Roi(start, tuple(b - a for a, b in zip(start, stop)))


def whole_volume_tile(shape: Sequence[int], geometry: Sequence[AxisGeometry]) -> tuple[int, ...]:
    """The tile shape for which the whole volume is one network evaluation."""
    return tuple(-(-int(n) // g.step) * g.step for n, g in zip(shape, geometry))


def useful_fraction(tile: Sequence[int], geometry: Sequence[AxisGeometry]) -> float:
    """Output voxels kept per input voxel read for a full tile (paper: large tiles -> close to 1)."""
    return math.prod(tile) / math.prod(g.net_input(t) for t, g in zip(tile, geometry))


# ----------------------------------------------------------------------- blocks


def block_grid(shape: Sequence[int], block: Sequence[int], region: Roi | None = None) -> list[Roi]:
    """Blocks of ``block`` voxels (clipped at the volume) that cover ``shape``, C order.

    With ``region``, only the blocks whose start lies inside it (used to shard
    a volume over z: every block belongs to exactly one shard).
    """
    blocks = []
    counts = [-(-int(n) // int(b)) for n, b in zip(shape, block)]
    for index in np.ndindex(*counts):
        start = tuple(i * b for i, b in zip(index, block))
        roi = Roi(start, tuple(min(b, n - s) for b, n, s in zip(block, shape, start)))
        if region is not None and not all(a <= s < b for s, a, b in zip(start, region.start, region.stop)):
            continue
        blocks.append(roi)
    return blocks


def fit_tile(extent: int, max_tile: int, step: int) -> int:
    """Largest-first tile edge (multiple of ``step``) that splits ``extent`` into equal parts.

    Uses as few tiles as ``max_tile`` allows and spreads ``extent`` evenly over
    them, so the last tile wastes less than ``step`` voxels per tile.
    """
    max_tile = max(step, (int(max_tile) // step) * step)
    count = -(-int(extent) // max_tile)
    per = -(-int(extent) // count)
    return -(-per // step) * step


def iter_batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def block_tiles(region: Roi, tile: Sequence[int], geometry: Sequence[AxisGeometry]) -> tuple[list[Tile], Roi]:
    """The tiles of one block and the union of their read windows (read once per block)."""
    tiles = tile_grid(region, tile, geometry)
    if not tiles:
        raise ValueError(f"empty region {region}")
    return tiles, bounding_roi([t.read for t in tiles])


def run_tiles(
    data: np.ndarray,
    window: Roi,
    region: Roi,
    tiles: Sequence[Tile],
    forward: Callable[[np.ndarray], np.ndarray],
    batch: int = 1,
) -> np.ndarray:
    """Apply ``forward`` to the tiles' windows cut from ``data`` (the input of ``window``).

    ``forward`` maps a batch of input windows ``(B, *read_shape)`` to network
    outputs ``(B, *net_output_shape)`` (single channel).  Returns the output of
    ``region`` assembled from the tiles' write regions.
    """
    out: np.ndarray | None = None
    for group in iter_batches(tiles, batch):
        windows = np.stack([data[t.read.slices(window.start)] for t in group])
        result = forward(windows)
        if out is None:
            out = np.empty(region.shape, dtype=result.dtype)
        for t, r in zip(group, result):
            out[t.write.slices(region.start)] = r[t.crop]
    assert out is not None
    return out


def predict_tiled(
    volume,
    region: Roi,
    tile: Sequence[int],
    geometry: Sequence[AxisGeometry],
    forward: Callable[[np.ndarray], np.ndarray],
    batch: int = 1,
) -> np.ndarray:
    """Overlap-tile prediction of ``region`` of ``volume`` (mirrored at its borders).

    The reference composition of :func:`block_tiles`, :func:`read_mirrored`
    and :func:`run_tiles`; :mod:`unet_pipe.predict` runs the same steps per
    output block, with the read outside the device lock.
    """
    tiles, window = block_tiles(region, tile, geometry)
    data = read_mirrored(volume, window.start, window.shape)
    return run_tiles(data, window, region, tiles, forward, batch)
