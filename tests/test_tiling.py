"""Overlap-tile geometry: mirroring, tile grids, tiled == untiled with formula models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from unet_pipe.errors import ConfigError
from unet_pipe.tiling import (
    SLICE_AXIS,
    _block_and_tile,
    AxisGeometry,
    Roi,
    TilePlan,
    activation_bytes_per_voxel,
    make_plan,
    block_grid,
    fit_tile,
    mirror_pad,
    predict_tiled,
    read_mirrored,
    reflect_index,
    tile_grid,
    unet_axis_geometry,
    useful_fraction,
    whole_volume_tile,
)

# ------------------------------------------------------------- formula "models"


def box_sum(windows: np.ndarray) -> np.ndarray:
    """Valid 3x3 box sum over (y, x) of (B, z, y, x) windows: margin 1, no pooling."""
    b, z, y, x = windows.shape
    out = np.zeros((b, z, y - 2, x - 2), dtype=windows.dtype)
    for dy in range(3):
        for dx in range(3):
            out += windows[:, :, dy : dy + y - 2, dx : dx + x - 2]
    return out


BOX = (SLICE_AXIS, AxisGeometry(margin=1), AxisGeometry(margin=1))


def pooled(windows: np.ndarray) -> np.ndarray:
    """A two-level 'U-Net' in (y, x): centre-cropped input + upsampled (maxpool 2 -> valid 3-sum).

    Input I (even) -> output I - 4: margin 2, shift-equivariant only for even shifts.
    """
    b, z, y, x = windows.shape
    coarse = windows.reshape(b, z, y // 2, 2, x // 2, 2).max(axis=(3, 5))
    summed = box_sum(coarse)
    up = summed.repeat(2, axis=2).repeat(2, axis=3)
    return windows[:, :, 2:-2, 2:-2] * 10 + up


POOLED = (SLICE_AXIS, AxisGeometry(margin=2, step=2, min_output=2), AxisGeometry(margin=2, step=2, min_output=2))


def box_sum_3d(windows: np.ndarray) -> np.ndarray:
    b, z, y, x = windows.shape
    out = np.zeros((b, z - 2, y - 2, x - 2), dtype=windows.dtype)
    for dz in range(3):
        for dy in range(3):
            for dx in range(3):
                out += windows[:, dz : dz + z - 2, dy : dy + y - 2, dx : dx + x - 2]
    return out


BOX3D = (AxisGeometry(margin=1),) * 3


def whole(volume: np.ndarray, geometry, forward) -> np.ndarray:
    region = Roi((0, 0, 0), volume.shape)
    return predict_tiled(volume, region, whole_volume_tile(volume.shape, geometry), geometry, forward)


# ---------------------------------------------------------------------- mirroring


def test_reflect_index_written_out() -> None:
    assert reflect_index(np.arange(-3, 7), 4).tolist() == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert reflect_index([-2, 0, 5], 1).tolist() == [0, 0, 0]


@pytest.mark.parametrize("shape", [(5,), (2, 3), (1, 4, 3)])
@pytest.mark.parametrize("pad", [0, 1, 2, 7])
def test_mirror_pad_is_numpy_reflect(shape, pad) -> None:
    image = np.arange(np.prod(shape)).reshape(shape)
    widths = [(pad, pad + 1)] * len(shape)
    np.testing.assert_array_equal(mirror_pad(image, widths), np.pad(image, widths, mode="reflect"))


class CountingArray:
    """Wraps an array and records the shape of every read."""

    def __init__(self, array) -> None:
        self.array, self.reads = array, []

    ndim = property(lambda self: self.array.ndim)
    shape = property(lambda self: self.array.shape)

    def __getitem__(self, key):
        data = np.asarray(self.array[key])
        self.reads.append(data.shape)
        return data


@pytest.mark.parametrize(
    ("start", "shape"),
    [((0, 2, 3), (2, 4, 4)), ((-1, -3, 5), (3, 6, 7)), ((1, 6, -9), (1, 3, 25)), ((0, 0, 0), (3, 8, 9))],
)
def test_read_mirrored_reads_only_the_window(start, shape) -> None:
    volume = np.arange(3 * 8 * 9, dtype=np.uint16).reshape(3, 8, 9)
    store = zarr.create_array(zarr.storage.MemoryStore(), shape=volume.shape, chunks=(1, 4, 4), dtype=volume.dtype)
    store[:] = volume
    counting = CountingArray(store)
    window = read_mirrored(counting, start, shape)
    pad = [(max(0, -s), max(0, s + n - size)) for s, n, size in zip(start, shape, volume.shape)]
    padded = mirror_pad(volume, pad)
    offset = [s + p[0] for s, p in zip(start, pad)]
    np.testing.assert_array_equal(window, padded[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
    assert len(counting.reads) == 1
    assert all(r <= min(n, size) for r, n, size in zip(counting.reads[0], shape, volume.shape))


# --------------------------------------------------------------------- geometry


def test_unet_geometry_matches_the_paper() -> None:
    g = unet_axis_geometry(5)
    assert (g.margin, g.step, g.offset, g.min_output) == (92, 16, 4, 4)
    assert g.net_output(388) == 388 and g.net_input(388) == 572
    assert g.net_output(384) == 388 and g.net_output(1) == 4
    assert unet_axis_geometry(1) == AxisGeometry(margin=2, step=1, offset=0, min_output=1)
    assert unet_axis_geometry(3) == AxisGeometry(margin=20, step=4, offset=0, min_output=4)


def test_tile_grid_written_out() -> None:
    geometry = (SLICE_AXIS, SLICE_AXIS, AxisGeometry(margin=1, step=2, min_output=2))
    tiles = tile_grid(Roi((0, 0, 0), (1, 1, 10)), (1, 1, 4), geometry)
    assert [t.origin[2] for t in tiles] == [0, 4, 8]
    assert [(t.write.start[2], t.write.stop[2]) for t in tiles] == [(0, 4), (4, 8), (8, 10)]
    assert [(t.read.start[2], t.read.stop[2]) for t in tiles] == [(-1, 5), (3, 9), (7, 13)]
    # A block starting off the pooling grid: the first tile starts on the grid before it.
    tiles = tile_grid(Roi((0, 0, 3), (1, 1, 6)), (1, 1, 4), geometry)
    assert [(t.origin[2], t.write.start[2], t.write.stop[2]) for t in tiles] == [(2, 3, 6), (6, 6, 9)]
    assert tiles[0].crop[2] == slice(1, 4)
    with pytest.raises(ValueError, match="multiple of the pooling factor 2"):
        tile_grid(Roi((0, 0, 0), (1, 1, 10)), (1, 1, 3), geometry)


def test_block_grid_and_shard_region() -> None:
    blocks = block_grid((5, 4, 3), (2, 4, 2))
    assert [(b.start, b.shape) for b in blocks] == [
        ((0, 0, 0), (2, 4, 2)), ((0, 0, 2), (2, 4, 1)), ((2, 0, 0), (2, 4, 2)),
        ((2, 0, 2), (2, 4, 1)), ((4, 0, 0), (1, 4, 2)), ((4, 0, 2), (1, 4, 1)),
    ]  # fmt: skip
    shard = block_grid((5, 4, 3), (2, 4, 2), region=Roi((1, 0, 0), (3, 4, 3)))
    assert [b.start for b in shard] == [(2, 0, 0), (2, 0, 2)]


@pytest.mark.parametrize(
    ("extent", "max_tile", "step", "expected"), [(512, 1000, 16, 512), (512, 300, 16, 256), (500, 300, 16, 256),
                                                 (1000, 388, 16, 336), (7, 2, 1, 2), (10, 1, 4, 4)]
)  # fmt: skip
def test_fit_tile(extent, max_tile, step, expected) -> None:
    assert fit_tile(extent, max_tile, step) == expected


def test_useful_fraction_paper_tile() -> None:
    geometry = (SLICE_AXIS, unet_axis_geometry(5), unet_axis_geometry(5))
    assert useful_fraction((1, 388, 388), geometry) == pytest.approx(388**2 / 572**2)


# -------------------------------------------------------- tiled == untiled (exact)


def test_box_sum_with_mirroring_written_out() -> None:
    volume = np.arange(5, dtype=np.int64).reshape(1, 1, 5)
    # y: size 1 (every row mirrors to itself, 3 rows summed); x: [1 | 0 1 2 3 4 | 3].
    out = whole(volume, BOX, box_sum)
    assert out.tolist() == [[[3 * 2, 3 * 3, 3 * 6, 3 * 9, 3 * 10]]]


@pytest.mark.parametrize("shape", [(1, 7, 9), (2, 16, 5), (1, 1, 13), (3, 6, 6)])
@pytest.mark.parametrize(("geometry", "forward"), [(BOX, box_sum), (POOLED, pooled)], ids=["box", "pooled"])
@pytest.mark.parametrize("tile", [(1, 2, 2), (1, 4, 6), (1, 8, 2)])
@pytest.mark.parametrize("block", [(1, 4, 4), (2, 6, 10), (3, 64, 64)])
def test_tiled_equals_untiled(shape, geometry, forward, tile, block) -> None:
    volume = np.arange(np.prod(shape), dtype=np.int64).reshape(shape) * 7 % 23
    expected = whole(volume, geometry, forward)
    out = np.full(shape, -1, dtype=np.int64)
    for b in block_grid(shape, block):
        out[b.slices()] = predict_tiled(volume, b, tile, geometry, forward, batch=3)
    np.testing.assert_array_equal(out, expected)


def test_pooling_grid_matters() -> None:
    """Shifting the tile grid off the pooling grid changes the result: why origins are multiples of step."""
    volume = (np.arange(1 * 12 * 12, dtype=np.int64).reshape(1, 12, 12) * 7) % 23
    expected = whole(volume, POOLED, pooled)
    off_grid = (SLICE_AXIS, AxisGeometry(margin=2, step=1, min_output=2), AxisGeometry(margin=2, step=1, min_output=2))
    # step=1 lets the grid start at odd origins (block at x=3): not equivariant.
    region = Roi((0, 0, 3), (1, 12, 8))
    shifted = predict_tiled(volume, region, (1, 12, 4), off_grid, pooled)
    assert not np.array_equal(shifted, expected[region.slices()])


@pytest.mark.parametrize("tile", [(1, 1, 1), (2, 3, 4), (4, 4, 4)])
def test_tiled_equals_untiled_3d(tile) -> None:
    volume = (np.arange(4 * 5 * 6, dtype=np.int64).reshape(4, 5, 6) * 5) % 17
    expected = whole(volume, BOX3D, box_sum_3d)
    out = np.zeros_like(expected)
    for b in block_grid(volume.shape, (2, 3, 4)):
        out[b.slices()] = predict_tiled(volume, b, tile, BOX3D, box_sum_3d, batch=2)
    np.testing.assert_array_equal(out, expected)


def test_read_mirrored_within_bounds() -> None:
    """Mirroring about a sub-range (a training split's z range) never reads outside it."""
    volume = np.arange(10).reshape(10, 1, 1)
    window = read_mirrored(volume, (2, 0, 0), (6, 1, 1), bounds=[(3, 6), (0, 1), (0, 1)])
    assert window[:, 0, 0].tolist() == [4, 3, 4, 5, 4, 3]


# ------------------------------------------------------------------- plans


def test_plan_defaults_written_out() -> None:
    paper = {"in_channels": 1, "n_classes": 2, "depth": 5, "base_channels": 64, "dims": 2, "dropout": 0.5}
    # Enough memory for any tile: the whole 512 x 512 ISBI slice is one tile, 16 slices per block/batch.
    plan = make_plan(paper, (30, 512, 512), (1, 512, 512), memory=1 << 40)
    assert (plan.tile, plan.block, plan.batch) == ((1, 512, 512), (16, 512, 512), 16)
    assert plan.window == (1, 700, 700)  # 512 -> valid output 516, + 2 * 92
    # 1 GiB: the largest window that fits, and blocks of whole chunks split evenly into tiles.
    budget = 1 << 30
    plan = make_plan(paper, (30, 2048, 2048), (1, 512, 512), memory=budget)
    assert plan.window[1] ** 2 * activation_bytes_per_voxel(paper) <= budget
    assert plan.tile[1] % 16 == 0 and plan.block[1] % 512 == 0
    assert plan.block[1] <= plan.tile[1] * -(-plan.block[1] // plan.tile[1]) < plan.block[1] + 16 * 3
    # Explicit tile and block are honoured; tiles must sit on the pooling grid.
    plan = make_plan(paper, (30, 512, 512), (1, 512, 512), tile=[64, 128], block=[2, 512, 512], memory=budget)
    assert (plan.tile, plan.block) == ((1, 64, 128), (2, 512, 512))
    with pytest.raises(ConfigError, match="multiple of the pooling factor 16"):
        make_plan(paper, (30, 512, 512), (1, 512, 512), tile=100, memory=budget)
    with pytest.raises(ConfigError, match="multiple of the chunk edge 512"):
        make_plan(paper, (30, 1024, 1024), (1, 512, 512), block=[1, 700, 700], memory=budget)


def test_plan_counts_the_shorter_last_block() -> None:
    """8192 px with at most 3840-px tiles (paper net, margin 92, pooling 16): blocks of 7680 would
    need 2 tiles each plus a whole 3840 tile for the last 512 px, (2 + 1) * 4028 = 12084 input px;
    one 8192 block in three 2736 tiles needs 3 * 2924 = 8772 (the last tile reaches 16 px past)."""
    axis = unet_axis_geometry(5)
    assert _block_and_tile(8192, 512, 3840, axis, fit=True) == (8192, 2736)
    # A fixed tile: blocks of 3072 = 6 chunks (tiles of 3840 each) cost 3 tiles, as 8192 would
    # (3 tiles of 3840), and the smaller block wins ties.
    assert _block_and_tile(8192, 512, 3840, axis, fit=False) == (3072, 3840)
    paper = {"in_channels": 1, "n_classes": 2, "depth": 5, "base_channels": 64, "dims": 2, "dropout": 0.5}
    plan = make_plan(paper, (16, 8192, 8192), (1, 512, 512), memory=40 * 10**9)
    assert (plan.tile, plan.block, plan.batch) == ((1, 2736, 2736), (1, 8192, 8192), 1)


def test_plan_roundtrips() -> None:
    arch = {"in_channels": 1, "n_classes": 2, "depth": 3, "base_channels": 4, "dims": 3, "dropout": 0.5}
    plan = make_plan(arch, (20, 40, 40), (8, 16, 16), memory=1 << 20)
    assert TilePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert all(t % 4 == 0 for t in plan.tile)


def test_plan_has_a_row_of_blocks_per_shard() -> None:
    arch = {"in_channels": 1, "n_classes": 2, "depth": 3, "base_channels": 4, "dims": 2, "dropout": 0.5}
    assert make_plan(arch, (6, 96, 96), (1, 64, 64), memory=1 << 30).block == (6, 96, 96)
    plan = make_plan(arch, (6, 96, 96), (1, 64, 64), memory=1 << 30, min_z_blocks=3)
    assert plan.block == (2, 96, 96) and plan.batch == 2
