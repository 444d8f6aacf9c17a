"""Tile sampling: mirrored reads, crop geometry, label classes, determinism, OME-Zarr stores, sparse labels."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import unet_pipe.sampling as data_module
from unet_pipe.errors import ConfigError, InputError
from unet_pipe.intensity import IntensityRange, IntensitySample, intensity_range, normalize_raw
from unet_pipe.sampling import (
    TileSampler,
    Volume,
    annotated_mask,
    center_crop,
    label_classes,
    volumes_from_config,
)
from unet_pipe.tiling import read_mirrored, reflect_index


def test_mirror_convention_written_out() -> None:
    # Range [0, 4): reflect about the edge pixels (edge not repeated), as augment and predict do.
    assert reflect_index(range(-3, 7), 4).tolist() == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]


@pytest.mark.parametrize(
    ("start", "shape"),
    [((0, -3, -4), (3, 5, 7)), ((1, 2, 3), (1, 9, 12)), ((-2, -11, -13), (7, 20, 25)), ((0, 1, 1), (2, 3, 4))],
)
def test_read_mirrored_equals_numpy_pad(tiny_stack, start, shape) -> None:
    pad = 30
    padded = np.pad(tiny_stack, pad, mode="reflect")
    expected = padded[tuple(slice(s + pad, s + pad + n) for s, n in zip(start, shape))]
    np.testing.assert_array_equal(read_mirrored(tiny_stack, start, shape), expected)


def test_read_mirrored_stays_inside_bounds(tiny_stack) -> None:
    """Mirroring in z never reaches outside the given [start, stop) range."""
    out = read_mirrored(tiny_stack, (0, 0, 0), (3, 5, 7), bounds=[(1, 3), (0, 5), (0, 7)])
    # z = 0 lies one slice before the range [1, 3): its mirror image is z = 2.
    np.testing.assert_array_equal(out, tiny_stack[[2, 1, 2]])


def test_label_classes_and_normalize() -> None:
    labels = np.array([[0, 255], [255, 7]], dtype=np.uint8)
    assert label_classes(labels).tolist() == [[0, 1], [1, 0]]
    assert label_classes(labels, "binary", 7).tolist() == [[0, 0], [0, 1]]
    assert label_classes(labels, "instances").tolist() == [[0, 1], [1, 1]]
    with pytest.raises(ValueError, match="label_mode"):
        label_classes(labels, "semantic")
    assert normalize_raw(np.array([0, 51, 255], np.uint8)).tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert normalize_raw(np.array([65535], np.uint16)).tolist() == [1.0]
    assert normalize_raw(np.array([0.5], np.float64)).dtype == np.float32


def test_intensity_range_percentiles_and_dtype_independence() -> None:
    # 0..99 in every slice: the 1st and 99th percentiles (linear interpolation) are 0.99 and 98.01.
    stack = np.tile(np.arange(100, dtype=np.uint8).reshape(1, 10, 10), (3, 1, 1))
    r = intensity_range(stack)
    assert (r.low, r.high) == pytest.approx((0.99, 98.01))
    # Equal gray values in another dtype: the same range, the same network input.
    r16 = intensity_range(stack.astype(np.uint16))
    assert r16 == r
    np.testing.assert_array_equal(normalize_raw(stack, r), normalize_raw(stack.astype(np.uint16), r16))
    np.testing.assert_array_equal(normalize_raw(stack, r), normalize_raw(stack.astype(np.float32), r))
    assert normalize_raw(np.array([0.99, 98.01]), r).tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    # A uint16 stack that uses a fraction of its range is not left dark (dtype scaling gave <= 0.0015).
    assert normalize_raw(stack.astype(np.uint16) * 2, intensity_range(stack.astype(np.uint16) * 2)).max() > 1.0


def test_intensity_range_refuses_flat_or_nan_and_falls_back_to_min_max() -> None:
    with pytest.raises(InputError, match="no contrast"):
        intensity_range(np.full((2, 4, 4), 7, np.uint8), where="flat.ome.zarr")
    with pytest.raises(InputError, match="NaN"):
        intensity_range(np.array([[[0.0, np.nan]]]))
    # 98 % zeros and 2 % 255: both percentiles are 0, so the full range is used instead.
    sparse = np.zeros((1, 10, 10), np.uint8)
    sparse[0, 0, :2] = 255
    assert intensity_range(sparse) == IntensityRange(0.0, 255.0)


def test_intensity_range_sample_is_fixed() -> None:
    # Large stacks are sampled (32 evenly spaced slices, strided): the result depends on the
    # data only, never on chunking; here slice z holds value z, so slices 0..99 are sampled
    # at 32 evenly spaced positions and the percentiles fall on those values.
    stack = np.broadcast_to(np.arange(100, dtype=np.uint16)[:, None, None], (100, 2, 2))
    r = intensity_range(stack)
    zs = np.unique(np.linspace(0, 99, 32).round().astype(int))
    assert (r.low, r.high) == pytest.approx(tuple(np.percentile(np.repeat(zs, 4), (1, 99))))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16])
def test_integer_stacks_get_numpys_percentiles_bit_for_bit(dtype) -> None:
    # 8/16-bit stacks are measured from a histogram instead of a sort: the same floats as
    # np.percentile on the float64 sample, at the rule's percentiles and at any others.
    rng = np.random.default_rng(int(np.dtype(dtype).itemsize))
    info = np.iinfo(dtype)
    for trial in range(200):
        low = int(rng.integers(info.min, info.max))
        stack = rng.integers(low, int(rng.integers(low, info.max)) + 1, size=(int(rng.integers(1, 5)), 7, 9))
        stack = stack.astype(dtype)
        q = (1.0, 99.0) if trial % 2 else tuple(sorted(rng.uniform(0, 100, 2)))
        sample = stack.astype(np.float64).ravel()
        expected = [float(v) for v in np.percentile(sample, q)]
        if expected[1] > expected[0]:
            r = intensity_range(stack, q)
            assert [r.low, r.high] == expected
            assert intensity_range(stack.astype(np.float32), q) == r  # the float path agrees


def test_center_crop() -> None:
    a = np.arange(36).reshape(1, 6, 6)
    np.testing.assert_array_equal(center_crop(a, 2, 2), [[[14, 15], [20, 21]]])
    assert center_crop(torch.zeros(2, 6, 6, 6), 1, 3).shape == (2, 4, 4, 4)


def _volume(nz: int = 4, ny: int = 50, nx: int = 60) -> Volume:
    raw = (np.arange(nz * ny * nx) % 251).astype(np.uint8).reshape(nz, ny, nx)
    labels = np.where(raw % 3 == 0, 0, 255).astype(np.uint8)
    weights = (raw.astype(np.float32) / 10 + 1)
    return Volume("v", raw, labels, weights, train=(0, 3), val=(3, 4))


def test_tile_content_matches_the_store() -> None:
    """Each tile is exactly the mirrored window at its origin; target windows lie inside."""
    vol = _volume()
    sampler = TileSampler([vol], tile=44, depth=2)  # output 28, margin 8
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = sampler.sample(rng)
        z, y, x = t.origin
        assert 0 <= z < 3
        assert 0 <= y + 8 and y + 8 + 28 <= 50 and 0 <= x + 8 and x + 8 + 28 <= 60
        window = read_mirrored(vol.raw, (z, y, x), (1, 44, 44))[0]
        np.testing.assert_array_equal(t.image, window.astype(np.float32) / 255)
        np.testing.assert_array_equal(t.classes, (read_mirrored(vol.labels, (z, y, x), (1, 44, 44))[0] == 255))
        np.testing.assert_array_equal(t.weights, read_mirrored(vol.weights, (z, y, x), (1, 44, 44))[0])
        assert t.image.dtype == np.float32 and t.classes.dtype == np.int64


def test_small_images_are_covered_by_the_output_window() -> None:
    """Image (20 x 20) smaller than the output window (28): the window covers it."""
    raw = np.arange(400, dtype=np.uint8).reshape(1, 20, 20)
    vol = Volume("s", raw, raw, None, train=(0, 1))
    sampler = TileSampler([vol], tile=44, depth=2)
    rng = np.random.default_rng(1)
    for _ in range(10):
        t = sampler.sample(rng)
        _, y, x = t.origin
        assert -8 <= y + 8 <= 0 and y + 8 + 28 >= 20
        assert np.all(t.weights == 1.0)


def test_sampling_is_seeded_and_visits_all_slices() -> None:
    vols = [_volume(), Volume("w", *(a[:2] for a in (_volume().raw, _volume().labels, _volume().weights)), train=(1, 2))]
    sampler = TileSampler(vols, tile=44, depth=2)
    a = [sampler.sample(np.random.default_rng(5)) for _ in range(2)]
    image1, classes1, weights1 = sampler.batch(3, np.random.default_rng(9))
    image2, classes2, weights2 = sampler.batch(3, np.random.default_rng(9))
    assert image1.shape == (3, 1, 44, 44) and classes1.shape == (3, 44, 44) and weights1.shape == (3, 44, 44)
    assert torch.equal(image1, image2) and torch.equal(classes1, classes2) and torch.equal(weights1, weights2)
    assert a[0].origin == a[1].origin
    rng = np.random.default_rng(0)
    seen = {(t.volume, t.origin[0]) for t in (sampler.sample(rng) for _ in range(200))}
    assert seen == {("v", 0), ("v", 1), ("v", 2), ("w", 1)}  # 3 : 1 slices, val slice 3 never


def test_three_d_tiles_mirror_within_the_train_range() -> None:
    raw = np.repeat(np.arange(6, dtype=np.uint8)[:, None, None] * 40, 30, 1).repeat(30, 2)
    vol = Volume("c", raw, raw, None, train=(0, 4), val=(4, 6))
    sampler = TileSampler([vol], tile=20, depth=2, dims=3)  # output 4, margin 8
    t = sampler.sample(np.random.default_rng(0))
    assert t.image.shape == (20, 20, 20)
    assert set(np.unique(t.image * 255 / 40).round().astype(int)) <= {0, 1, 2, 3}  # never 4 or 5


def test_sampler_errors() -> None:
    vol = _volume()
    with pytest.raises(ConfigError, match="train.tile.*nearest valid sizes: 42 and 44"):
        TileSampler([vol], tile=43, depth=2)
    with pytest.raises(ConfigError, match=r"range \[0, 9\) does not fit the 4 slices"):
        TileSampler([Volume("v", vol.raw, vol.labels, None, train=(0, 9))], tile=44, depth=2)
    with pytest.raises(InputError, match="labels shape"):
        TileSampler([Volume("v", vol.raw, vol.labels[:2], None, train=(0, 1))], tile=44, depth=2)
    config = {"train": {"datasets": {"x": {"train": [0, 2]}}}}
    with pytest.raises(ConfigError, match="no raw/labels stores"):
        volumes_from_config(config, {})


def test_tiles_from_ome_zarr_stores(tmp_path) -> None:
    """The sampler reads the pipeline's OME-Zarr stores lazily, same values as numpy."""
    from unet_pipe.io import StagedImage, open_image

    vol = _volume()
    paths = {}
    for key, array, kind in (("raw", vol.raw, "image"), ("labels", vol.labels, "labels"), ("weights", vol.weights, "image")):
        staged = StagedImage(tmp_path / f"{key}.ome.zarr", shape=array.shape, dtype=array.dtype, chunks=(1, 16, 16), kind=kind)
        staged.array[:] = array
        paths[key] = staged.commit(pyramid_levels=0)
    config = {"train": {"datasets": {"v": {"train": [0, 3], "val": [3, 4]}}}}
    stores = {"v": {k: open_image(p) for k, p in paths.items()}}
    from_zarr = TileSampler(volumes_from_config(config, stores), tile=44, depth=2)
    from_numpy = TileSampler([dataclasses.replace(vol, intensity=intensity_range(vol.raw))], tile=44, depth=2)
    for seed in range(3):
        a = from_zarr.sample(np.random.default_rng(seed))
        b = from_numpy.sample(np.random.default_rng(seed))
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_array_equal(a.weights, b.weights)


# ---------------------------------------------------------------- sparse labels
# Sparse annotations in the tiles: class 0 with weight 0, tiles only where something is annotated.


U = 7  # the unlabelled value


def _sparse_volume(ny: int = 60, nx: int = 60) -> Volume:
    """Slices 0-2 annotated only in the bottom-right 20 x 20 corner (cells on odd columns)."""
    raw = (np.arange(3 * ny * nx) % 251).astype(np.uint8).reshape(3, ny, nx)
    labels = np.full(raw.shape, U, np.uint8)
    corner = np.zeros((20, 20), np.uint8)
    corner[:, 1::2] = 255
    labels[:, 40:, 40:] = corner
    weights = raw.astype(np.float32) / 10 + 1
    return Volume("s", raw, labels, weights, train=(0, 3))


def test_label_classes_and_annotated_mask_of_unlabelled_pixels() -> None:
    labels = np.array([0, 255, U, 3], np.uint8)
    np.testing.assert_array_equal(label_classes(labels, "binary", 255, U), [0, 1, 0, 0])
    np.testing.assert_array_equal(label_classes(labels, "instances", 255, U), [0, 1, 0, 1])
    np.testing.assert_array_equal(annotated_mask(labels, U), [True, True, False, True])
    np.testing.assert_array_equal(annotated_mask(labels, None), [True, True, True, True])


def test_tiles_hold_annotated_pixels_and_zero_weight_elsewhere() -> None:
    vol = _sparse_volume()
    sparse = TileSampler([vol], tile=44, depth=2, unlabelled_value=U)  # output 28, margin 8
    dense = TileSampler([vol], tile=44, depth=2)
    rng, replay = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(15):
        t = sparse.sample(rng)
        # The accepted draw is the first draw of the plain sampler (same generator) whose
        # output window [y + 8, y + 36) x [x + 8, x + 36) reaches the annotated corner (>= 40).
        while True:
            d = dense.sample(replay)
            if d.origin[1] + 36 > 40 and d.origin[2] + 36 > 40:
                break
        assert t.origin == d.origin
        z, y, x = t.origin
        labels = read_mirrored(vol.labels, (z, y, x), (1, 44, 44))[0]
        known = labels != U
        np.testing.assert_array_equal(t.weights, np.where(known, d.weights, 0.0))
        np.testing.assert_array_equal(t.classes, labels == 255)
        np.testing.assert_array_equal(t.image, d.image)


def test_sampler_refuses_volumes_without_annotations_and_gives_up_after_max_draws(monkeypatch) -> None:
    vol = _sparse_volume()
    empty = Volume("e", vol.raw, np.full_like(vol.labels, U), None, train=(0, 2))
    with pytest.raises(InputError, match=r"no annotated pixel in its train slices \[0, 2\)"):
        TileSampler([empty], tile=44, depth=2, unlabelled_value=U)
    # One annotated pixel in the corner: reached by 1 in 33 x 33 draws; three draws miss it for this seed.
    labels = np.full_like(vol.labels, U)
    labels[0, 59, 59] = 0
    monkeypatch.setattr(data_module, "MAX_DRAWS", 3)
    sampler = TileSampler([Volume("p", vol.raw, labels, None, train=(0, 1))], tile=44, depth=2, unlabelled_value=U)
    with pytest.raises(InputError, match="in 3 draws"):
        sampler.sample(np.random.default_rng(0))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("shape", [(5, 40, 30), (70, 20, 20), (2, 1100, 1000)], ids=["few", "many-slices", "strided"])
def test_intensity_sample_gives_the_range_of_the_stack(dtype, shape):
    """The sample ingest takes while slices stream past gives predict the same range as reading the store."""
    rng = np.random.default_rng(0)
    stack = rng.normal(100, 30, shape).clip(-50 if dtype == "int16" else 0, 250).astype(dtype)
    sample = IntensitySample()
    sample.start(shape, dtype)
    for z in range(shape[0]):
        assert not sample.covers(shape, dtype) or z == 0 and shape[0] == 1
        sample.add(z, stack[z])
    assert sample.covers(shape, dtype)
    assert sample.range() == intensity_range(stack)
    assert sample.range((2.0, 98.0)) == intensity_range(stack, (2.0, 98.0))
    assert not sample.covers(shape, "uint32") and not sample.covers((shape[0] + 1, *shape[1:]), dtype)
    with pytest.raises(ValueError, match="incomplete"):
        IntensitySample().range()
