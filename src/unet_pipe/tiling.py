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
  training tile sampler (:mod:`unet_pipe.sampling`) pads the same way, so border
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
box of the voxels a window needs, never a whole slice.  :func:`make_plan`
chooses tile, block and batch sizes for a memory budget (:class:`TilePlan`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from unet_pipe.errors import ConfigError


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
    # torch loads with the model (~2 s); geometry users (3D labelling, block planning) need no torch.
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
class InferenceTile:
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


def tile_grid(region: Roi, tile: Sequence[int], geometry: Sequence[AxisGeometry]) -> list[InferenceTile]:
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
        tiles.append(InferenceTile(origin=o, read=read, write=write))
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


def block_tiles(region: Roi, tile: Sequence[int], geometry: Sequence[AxisGeometry]) -> tuple[list[InferenceTile], Roi]:
    """The tiles of one block and the union of their read windows (read once per block)."""
    tiles = tile_grid(region, tile, geometry)
    if not tiles:
        raise ValueError(f"empty region {region}")
    return tiles, bounding_roi([t.read for t in tiles])


def run_tiles(
    data: np.ndarray,
    window: Roi,
    region: Roi,
    tiles: Sequence[InferenceTile],
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
    and :func:`run_tiles`; :mod:`unet_pipe.blockwise` runs the same steps per
    output block, with the read outside the device lock.
    """
    tiles, window = block_tiles(region, tile, geometry)
    data = read_mirrored(volume, window.start, window.shape)
    return run_tiles(data, window, region, tiles, forward, batch)


# ------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class TilePlan:
    """Resolved overlap-tile geometry of one prediction (all sizes in voxels, z, y, x)."""

    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    tile: tuple[int, int, int]  # output tile (multiple of the pooling factor per axis)
    block: tuple[int, int, int]  # output block (multiple of chunks, or the whole axis)
    batch: int  # tiles per forward pass
    depth: int  # of the U-Net (pooling factor 2**(depth-1))
    dims: int  # 2: slice by slice; 3: volumetric

    def __post_init__(self) -> None:
        for name in ("shape", "chunks", "tile", "block"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    @property
    def geometry(self) -> tuple[AxisGeometry, AxisGeometry, AxisGeometry]:
        return volume_geometry(unet_axis_geometry(self.depth), self.dims)

    @property
    def window(self) -> tuple[int, ...]:
        """Input window (read) shape of one tile."""
        return tuple(g.net_input(t) for t, g in zip(self.tile, self.geometry))

    @property
    def useful_fraction(self) -> float:
        return useful_fraction(self.tile, self.geometry)

    def blocks(self, region: Roi | None = None) -> list[Roi]:
        return block_grid(self.shape, self.block, region)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TilePlan:
        return cls(**data)


def activation_bytes_per_voxel(arch: dict) -> float:
    """Estimated peak float32 activation memory (bytes) per input-window voxel, no-grad forward.

    At the top decoder level a forward pass holds every skip connection, the
    up-convolved map, the concatenation and the next convolution's output:
    ``sum_l c_l / 2**(dims*l) + 4 c_0`` channels.  The factor 2 covers allocator
    slack and convolution workspaces (measured on CPU: 560-900 B per input voxel
    for base 16, depth 3, estimate 728 B; the paper net: 1.4 kB measured, 3.0 kB estimated).
    """
    c0, depth, dims = arch["base_channels"], arch["depth"], arch["dims"]
    skips = sum(c0 * 2**level / 2 ** (dims * level) for level in range(depth - 1))
    return 4.0 * (skips + 4 * c0 + arch.get("in_channels", 1) + arch["n_classes"]) * 2.0


def _spatial_axes(dims: int) -> tuple[int, ...]:
    return (1, 2) if dims == 2 else (0, 1, 2)


def _normalize_request(tile: int | Sequence[int] | None, dims: int, what: str) -> tuple[int, int, int] | None:
    """Expand a user tile (one edge, (y, x) or (z, y, x)) to (z, y, x); z is 1 in 2D."""
    if tile is None:
        return None
    values = [int(tile)] if isinstance(tile, (int, np.integer)) else [int(t) for t in tile]
    if len(values) == 1:
        values = values * dims
    if len(values) == 2 and dims == 2:
        values = [1, *values]
    if len(values) != 3 or (dims == 2 and values[0] != 1) or min(values) < 1:
        shape = "EDGE or Y X" if dims == 2 else "EDGE or Z Y X"
        raise ConfigError(None, f"{what} must be {shape} (positive integers) for a {dims}D model, got {tile}")
    return (values[0], values[1], values[2])


def _enough_tile(max_tile: int, axis: AxisGeometry, dims: int, slack: float = 0.02) -> int:
    """Smallest tile edge whose useful output fraction is within ``slack`` of ``max_tile``'s.

    Never below a 512-voxel input window (or ``max_tile``): tiny windows cost per-call overhead.
    """

    def useful(t: int) -> float:
        return (t / axis.net_input(t)) ** dims

    target = useful(max_tile) - slack
    floor = min(max_tile, max(axis.step, (512 - 2 * axis.margin) // axis.step * axis.step))
    tile = floor
    while tile < max_tile and useful(tile) < target:
        tile += axis.step
    return tile


def _block_and_tile(extent: int, chunk: int, max_tile: int, axis: AxisGeometry, fit: bool) -> tuple[int, int]:
    """Block edge (whole chunks) and tile edge along one axis that minimise network input per output voxel.

    Cost of blocks ``b`` cut into tiles of input ``I``: the tiles of every
    block of the axis, the shorter last block included (it is computed with
    the same tile), times ``I``, over ``extent``.  ``fit`` lets the tile
    shrink (never grow) to split the block evenly.  A larger block must be
    more than 1 % cheaper to win (smaller blocks: more parallelism, less
    memory, finer resume).
    """
    best: tuple[float, int, int] | None = None
    for k in range(1, -(-extent // chunk) + 1):
        b = min(k * chunk, extent)
        t = fit_tile(b, max_tile, axis.step) if fit else max_tile
        # The remainder counts: 8192 px in blocks of 7680 with 3840-px tiles computed a whole
        # 3840-px tile for the last 512 px, 1.5x the network input of one 8192 block of three tiles.
        full, rest = divmod(extent, b)
        cost = (full * -(-b // t) + -(-rest // t)) * axis.net_input(t) / extent
        if best is None or cost < best[0] * 0.99:
            best = (cost, b, t)
        if k * chunk >= 8 * max_tile:  # beyond this the last tile's waste is already < 1/8
            break
    assert best is not None
    return best[1], best[2]


def _max_tile(requested: tuple[int, ...] | None, geometry: Sequence[AxisGeometry], whole: tuple[int, ...],
              voxels: float, dims: int) -> tuple[int, ...]:
    """The largest output tile: the requested one (checked), else the largest whose network
    activations, ``voxels`` input voxels' worth, fit; at most ``whole`` (the volume on the grid)."""
    axes = _spatial_axes(dims)
    if requested is not None:
        try:
            check_tile_shape(requested, geometry)
        except ValueError as exc:
            raise ConfigError(None, f"tile {list(requested)}: {exc}") from None
        max_tile = tuple(min(t, w) for t, w in zip(requested, whole))
    else:
        # Largest cube/square window within the budget, minus the context, on the pooling grid ...
        g = geometry[axes[-1]]
        edge = int(voxels ** (1.0 / dims)) - 2 * g.margin - g.step
        edge = max(g.step, (edge // g.step) * g.step)
        # ... but no larger than needed to come within 2 % of its useful-output fraction: beyond
        # that, bigger tiles only cost cache misses and page faults (measured: a 3328^2 tile of a
        # depth-2 net ran at half the speed of a 1024^2 one, with 40 % of the time in the kernel).
        edge = _enough_tile(edge, g, dims)
        max_tile = tuple(min(edge, w) if a in axes else 1 for a, w in enumerate(whole))
    return max_tile


def _given_block(block: Sequence[int], chunks: tuple[int, ...], shape: tuple[int, ...]) -> list[int]:
    """A block given by the user, checked (whole chunks or whole axes) and cut to the volume."""
    block_shape = [int(b) for b in block]
    if len(block_shape) != 3 or min(block_shape) < 1:
        raise ConfigError(None, f"block must be three positive integers Z Y X, got {block}")
    for b, c, n, name in zip(block_shape, chunks, shape, "zyx"):
        if b % c and b < n:
            raise ConfigError(
                None, f"block {list(block_shape)}: the {name} edge {b} must be a multiple of the chunk edge {c}"
                " (blocks must not share chunks) or cover the whole axis"
            )
    block_shape = [min(b, n) for b, n in zip(block_shape, shape)]
    return block_shape


def make_plan(
    arch: dict,
    shape: Sequence[int],
    chunks: Sequence[int],
    *,
    tile: int | Sequence[int] | None = None,
    block: Sequence[int] | None = None,
    batch: int | None = None,
    memory: int,
    min_z_blocks: int = 1,
) -> TilePlan:
    """Resolve tile, block and batch sizes.

    ``tile`` (output edge(s), multiples of the pooling factor) defaults to the
    largest that fits ``memory`` bytes per worker (paper: large tiles waste
    less context), capped at the volume.  ``block`` (z, y, x; multiples of
    ``chunks`` or whole axes) defaults per axis to the number of chunks whose
    even split into tiles reads the fewest input voxels per output voxel, and
    in z (2D) to enough slices for one ``batch``.  ``batch`` defaults to the
    tiles that fit ``memory`` (at most 16).  A default block is made shallow
    enough in z for ``min_z_blocks`` rows of blocks (one per shard).  Raises :class:`ConfigError` for
    sizes that cannot work.
    """
    dims, depth = int(arch["dims"]), int(arch["depth"])
    shape = tuple(int(s) for s in shape)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape))
    geometry = volume_geometry(unet_axis_geometry(depth), dims)
    axes = _spatial_axes(dims)
    per_voxel = activation_bytes_per_voxel(arch)
    whole = tuple(-(-n // g.step) * g.step for n, g in zip(shape, geometry))

    requested = _normalize_request(tile, dims, "tile")
    max_tile = _max_tile(requested, geometry, whole, memory / per_voxel, dims)

    if block is None:
        picks = [
            _block_and_tile(n, c, t, g, fit=requested is None) if a in axes else (c, 1)
            for a, (n, c, t, g) in enumerate(zip(shape, chunks, max_tile, geometry))
        ]
        block_shape = [b for b, _ in picks]
        final_tile = tuple(t for _, t in picks)
    else:
        block_shape = _given_block(block, chunks, shape)
        final_tile = tuple(
            (fit_tile(b, t, g.step) if requested is None else t) if a in axes else 1
            for a, (b, t, g) in enumerate(zip(block_shape, max_tile, geometry))
        )
    window_voxels = math.prod(g.net_input(t) for t, g in zip(final_tile, geometry))
    tiles_per_block = math.prod(-(-b // t) for b, t in zip(block_shape, final_tile))
    batch_fit = int(max(1, min(16, memory // (window_voxels * per_voxel))))
    if batch is None and block is None and dims == 2 and batch_fit > tiles_per_block:
        # 2D: deepen the block in z (whole chunks) until it holds one batch of tiles.
        slices = -(-batch_fit // tiles_per_block)
        block_shape[0] = min(shape[0], -(-slices // chunks[0]) * chunks[0])
    if block is None and -(-shape[0] // block_shape[0]) < min_z_blocks:
        # One row of blocks per shard at least: shallower blocks (whole chunks).
        rows = -(-shape[0] // min_z_blocks)
        block_shape[0] = max(chunks[0], rows // chunks[0] * chunks[0])
        if dims == 3 and requested is None:
            final_tile = (fit_tile(block_shape[0], final_tile[0], geometry[0].step), *final_tile[1:])
    tiles_per_block = math.prod(-(-b // t) for b, t in zip(block_shape, final_tile))
    if batch is None:
        batch = max(1, min(batch_fit, tiles_per_block))
    elif batch < 1:
        raise ConfigError(None, f"batch must be >= 1, got {batch}")
    return TilePlan(
        shape=shape,
        chunks=chunks,
        tile=final_tile,
        block=tuple(block_shape),
        batch=int(batch),
        depth=depth,
        dims=dims,
    )
