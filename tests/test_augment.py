"""Tests of unet_pipe.augment: identity, label values, determinism, consistency, geometry."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from unet_pipe.augment import (
    AugmentParams,
    augment_sample,
    cubic_upsampling_matrix,
    gray_value_transform,
    sampling_grid,
    warp,
)
from unet_pipe.errors import ConfigError

GEOMETRY_ONLY = AugmentParams(shift=8.0, gray_value=False)
FULL = AugmentParams(shift=8.0)


def _identity_grid(shape: tuple[int, ...]) -> torch.Tensor:
    axes = [torch.linspace(-1, 1, s) for s in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh[::-1], dim=-1)[None]


def _checkerboard(shape: tuple[int, ...], edge: int) -> np.ndarray:
    idx = np.indices(shape)
    return (sum(i // edge for i in idx) % 2).astype(np.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- cubic upsampling


def test_cubic_matrix_interpolates_grid_points_and_constants() -> None:
    m = cubic_upsampling_matrix(3, 5, dtype=torch.float64)
    # Output samples 0, 2, 4 sit exactly on the three coarse points.
    torch.testing.assert_close(m[[0, 2, 4]], torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-15)
    # Keys weights (a = -0.75) halfway: -3/32, 19/32, 19/32, -3/32 on points -1..2;
    # point -1 is clamped onto point 0.
    expected_row1 = torch.tensor([-3 / 32 + 19 / 32, 19 / 32, -3 / 32], dtype=torch.float64)
    torch.testing.assert_close(m[1], expected_row1, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_cubic_matrix_matches_torch_bicubic() -> None:
    coarse = torch.randn(2, 2, 3, 4, generator=_gen(3), dtype=torch.float64)
    expected = F.interpolate(coarse, size=(57, 40), mode="bicubic", align_corners=True)
    my, mx = cubic_upsampling_matrix(3, 57, dtype=torch.float64), cubic_upsampling_matrix(4, 40, dtype=torch.float64)
    got = my @ coarse @ mx.T
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_all_off_returns_inputs_unchanged(spatial_dims: int) -> None:
    shape = (5, 12, 10)[-spatial_dims:]
    image = torch.rand(shape, generator=_gen())
    labels = torch.randint(0, 7, shape, generator=_gen(1)).to(torch.uint8)
    weights = torch.rand(shape, generator=_gen(2), dtype=torch.float64)
    out = augment_sample(image, labels, weights, AugmentParams.off(), _gen(), spatial_dims=spatial_dims)
    for before, after in zip((image, labels, weights), out):
        assert after.dtype == before.dtype
        assert torch.equal(after, before)


def test_sigma_zero_grid_is_identity_and_warp_reproduces_inputs() -> None:
    shape = (23, 17)
    params = dataclasses.replace(AugmentParams.off(), elastic_sigma=0.0)
    grid = sampling_grid(shape, params, _gen(), batch=2)
    torch.testing.assert_close(grid, _identity_grid(shape).expand(2, -1, -1, -1), rtol=0, atol=1e-6)
    image = torch.rand((2,) + shape, generator=_gen(1))
    labels = torch.randint(0, 1000, (2,) + shape, generator=_gen(2))
    weights = torch.rand((2,) + shape, generator=_gen(3))
    out_image, out_labels, out_weights = warp(image, labels, weights, grid)
    torch.testing.assert_close(out_image, image, rtol=0, atol=1e-5)
    assert torch.equal(out_labels, labels)
    torch.testing.assert_close(out_weights, weights, rtol=0, atol=1e-5)


def test_sigma_zero_elastic_only_is_identity_in_3d() -> None:
    shape = (4, 9, 11)
    params = dataclasses.replace(AugmentParams.off(), elastic_sigma=0.0, elastic_grid=4)
    grid = sampling_grid(shape, params, _gen(), batch=1)
    torch.testing.assert_close(grid, _identity_grid(shape), rtol=0, atol=1e-6)


def test_gray_value_identity_ranges_leave_image_unchanged() -> None:
    params = AugmentParams(brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0))
    image = torch.rand(3, 40, generator=_gen())
    out = gray_value_transform(image, torch.rand(3, 3, generator=_gen(1)), params)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- label values


@pytest.mark.parametrize(
    ("values", "dtype"),
    [([0, 255], torch.uint8), ([0, 3, 7, 200], torch.int16), ([0, 2**30 + 1, 2**30 + 2, 2**40 + 7], torch.int64)],
)
def test_warped_label_values_are_a_subset_of_input_values(values: list[int], dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    # Blobs of label values, like instance maps, plus isolated single pixels.
    coarse = rng.integers(0, len(values), (8, 8))
    index = np.kron(coarse, np.ones((6, 6), dtype=np.int64))
    labels = torch.tensor(values, dtype=torch.int64)[torch.from_numpy(index)].to(dtype)
    image = torch.rand(labels.shape, generator=_gen())
    for seed in range(4):
        _, out, _ = augment_sample(image, labels, None, FULL, _gen(seed))
        assert out.dtype == dtype
        assert set(out.unique().tolist()) <= set(values)
        assert len(out.unique()) >= 2


def test_weights_stay_within_input_range() -> None:
    weights = torch.rand(48, 48, generator=_gen(5)) * 9 + 1
    _, _, out = augment_sample(torch.zeros(48, 48), None, weights, FULL, _gen())
    assert out.min() >= weights.min() - 1e-6 and out.max() <= weights.max() + 1e-6
    assert not torch.equal(out, weights)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_output_different_seed_different_output() -> None:
    image = torch.rand(64, 64, generator=_gen())
    labels = torch.from_numpy(_checkerboard((64, 64), 8))
    weights = torch.rand(64, 64, generator=_gen(1))
    first = augment_sample(image, labels, weights, FULL, _gen(42))
    second = augment_sample(image, labels, weights, FULL, _gen(42))
    other = augment_sample(image, labels, weights, FULL, _gen(43))
    for a, b, c in zip(first, second, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_batch_equals_samples_in_sequence() -> None:
    images = torch.rand(3, 1, 32, 40, generator=_gen())
    labels = torch.randint(0, 4, (3, 32, 40), generator=_gen(1))
    batch = augment_sample(images, labels, None, FULL, _gen(9))
    gen = _gen(9)
    for i in range(3):
        single = augment_sample(images[i, 0], labels[i], None, FULL, gen)
        torch.testing.assert_close(batch[0][i, 0], single[0], rtol=0, atol=1e-6)
        assert torch.equal(batch[1][i], single[1])
    # Identical inputs in a batch get different transforms.
    same = augment_sample(images[:1].expand(2, -1, -1, -1), None, None, FULL, _gen(0))[0]
    assert not torch.equal(same[0], same[1])


# --------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_image_path_at_nearest_equals_label_path(spatial_dims: int) -> None:
    shape = (6, 40, 48)[-spatial_dims:]
    labels = torch.from_numpy(_checkerboard(shape, 5) * 3 + 1)
    params = dataclasses.replace(GEOMETRY_ONLY, interpolation="nearest")
    image, out_labels, _ = augment_sample(labels.to(torch.float32), labels, None, params, _gen(7), spatial_dims)
    assert torch.equal(image, out_labels.to(torch.float32))
    assert not torch.equal(out_labels, labels)


def test_checkerboard_image_weights_and_labels_agree_away_from_edges() -> None:
    # 192 px: the paper's sigma = 10 px on a 3 x 3 grid (96 px apart) deforms
    # mildly enough that 4 output px stay more than 2 source px.
    labels = _checkerboard((192, 192), 12)
    tensor = torch.from_numpy(labels)
    for seed in range(6):
        image, out_labels, weights = augment_sample(
            tensor.to(torch.float32), tensor, tensor.to(torch.float32), GEOMETRY_ONLY, _gen(seed)
        )
        out = out_labels.numpy()
        edge = ndimage.morphological_gradient(out, size=3) > 0
        band = ndimage.binary_dilation(edge, iterations=2)
        for resampled in (image.numpy(), weights.numpy()):
            mismatch = np.rint(resampled) != out
            assert not (mismatch & ~band).any()
            assert mismatch.mean() < 0.02
        # Beyond the cubic kernel's reach (2 source px, a little more where the
        # deformation compresses) image and weights equal the labels.
        # Edges just outside the field of view (mirrored in) reach the border rows.
        inside = ~ndimage.binary_dilation(edge, iterations=4)
        inside[:4] = inside[-4:] = inside[:, :4] = inside[:, -4:] = False
        np.testing.assert_allclose(image.numpy()[inside], out[inside], atol=1e-4)
        np.testing.assert_allclose(weights.numpy()[inside], out[inside], atol=1e-4)


# --------------------------------------------------------------------------- geometry


def test_flip_only_gives_one_of_the_four_flips() -> None:
    image = torch.rand(20, 30, generator=_gen())
    labels = torch.arange(600).reshape(20, 30)
    params = dataclasses.replace(AugmentParams.off(), flip=True)
    seen = set()
    for seed in range(12):
        out_image, out_labels, _ = augment_sample(image, labels, None, params, _gen(seed))
        matches = [dims for dims in ((), (0,), (1,), (0, 1)) if torch.equal(out_labels, labels.flip(dims))]
        assert len(matches) == 1
        torch.testing.assert_close(out_image, image.flip(matches[0]), rtol=0, atol=1e-5)
        seen.add(matches[0])
    assert len(seen) == 4


def test_shift_only_moves_a_ramp_by_a_constant_within_range() -> None:
    y, x = torch.meshgrid(torch.arange(40.0), torch.arange(50.0), indexing="ij")
    params = dataclasses.replace(AugmentParams.off(), shift=5.0, interpolation="bilinear")
    for seed in range(5):
        (out_x, _, _), (out_y, _, _) = (augment_sample(r, None, None, params, _gen(seed)) for r in (x, y))
        dx, dy = (out_x - x)[6:-6, 6:-6], (out_y - y)[6:-6, 6:-6]
        for d in (dx, dy):
            assert float(d.max() - d.min()) < 1e-4
            assert abs(float(d.mean())) <= 5.0


def test_rotation_keeps_a_radial_image_and_rotates_a_ramp() -> None:
    y, x = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
    radius = torch.sqrt((y - 20) ** 2 + (x - 20) ** 2)
    params = dataclasses.replace(AugmentParams.off(), rotate=True, interpolation="bilinear")
    # Away from the apex, where bilinear interpolation of the cone is inexact.
    inner = (radius > 4) & (radius < 18)
    for seed in range(4):
        out, _, _ = augment_sample(radius, None, None, params, _gen(seed))
        torch.testing.assert_close(out[inner], radius[inner], rtol=0, atol=0.05)
        # A ramp comes back as a ramp of the same slope in some direction.
        ramp, _, _ = augment_sample(x, None, None, params, _gen(seed))
        gy, gx = np.gradient(ramp.numpy())
        slope = np.hypot(gy, gx)[inner.numpy()]
        np.testing.assert_allclose(slope, 1.0, atol=1e-3)


@pytest.mark.parametrize("shape", [(37, 53), (5, 9, 11)])
def test_grid_equals_the_per_pixel_formula(shape: tuple[int, ...]) -> None:
    """Output pixel p samples c + A (p - c + d(p)) + t, d the bicubically upsampled coarse draws."""
    from unet_pipe.augment import _draw, _linear_part

    nd, params = len(shape), AugmentParams(shift=6.0, elastic_grid=4)
    grid = sampling_grid(shape, params, _gen(11), batch=2).to(torch.float64)
    gen = _gen(11)
    for b in range(2):
        draw = _draw(nd, params.elastic_grid, gen)
        disp = draw.coarse * params.elastic_sigma
        for axis, size in enumerate(shape):  # separable bicubic, checked against torch above
            m = cubic_upsampling_matrix(params.elastic_grid, size, dtype=torch.float64)
            disp = torch.movedim(torch.movedim(disp, axis + 1, -1) @ m.T, -1, axis + 1)
        centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64)
        pixels = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
        offset = pixels - centre.view((nd,) + (1,) * nd) + disp
        src = torch.einsum("ab,b...->a...", _linear_part(draw, params, nd), offset)
        src = src + centre.view((nd,) + (1,) * nd) + (draw.shift * params.shift).view((nd,) + (1,) * nd)
        sizes = torch.tensor(shape, dtype=torch.float64).view((nd,) + (1,) * nd)
        expected = torch.movedim(src * 2 / (sizes - 1) - 1, 0, -1).flip(-1)
        torch.testing.assert_close(grid[b], expected, rtol=0, atol=1e-5)


def test_elastic_displacements_have_paper_statistics() -> None:
    # 65 x 65 px: the centre and the corners are points of the 3 x 3 coarse
    # grid, where the per-pixel displacement is the drawn N(0, sigma^2) vector.
    shape, sigma, n = (65, 65), 10.0, 400
    params = dataclasses.replace(AugmentParams.off(), elastic_sigma=sigma)
    grid = sampling_grid(shape, params, _gen(), batch=n)
    pixels = (grid + 1) * 32  # normalised -> px, (x, y) order
    base = (_identity_grid(shape)[0] + 1) * 32
    disp = pixels - base
    for point in ((32, 32), (0, 0), (64, 0)):
        d = disp[:, point[0], point[1]]
        assert d.mean(dim=0).abs().max() < 1.6
        assert ((d.std(dim=0) - sigma).abs() < 1.2).all()
    # Smooth field: neighbouring pixels move almost alike.
    assert float((disp[:, 1:] - disp[:, :-1]).abs().max()) < 2.5
    assert float((disp[:, :, 1:] - disp[:, :, :-1]).abs().max()) < 2.5


def test_gray_value_transform_is_increasing_and_varies() -> None:
    image = torch.linspace(0.0, 1.0, 200).repeat(4, 1) * 50 - 7
    out = gray_value_transform(image, torch.rand(4, 3, generator=_gen(1)), FULL)
    assert (out[:, 1:] > out[:, :-1]).all()
    assert not torch.allclose(out, image)
    constant = torch.full((2, 10), 3.0)
    assert torch.equal(gray_value_transform(constant, torch.rand(2, 3, generator=_gen()), FULL), constant)


def test_gray_value_changes_image_only() -> None:
    labels = torch.from_numpy(_checkerboard((32, 32), 4))
    weights = torch.rand(32, 32, generator=_gen())
    image = torch.rand(32, 32, generator=_gen(1))
    params = dataclasses.replace(AugmentParams.off(), gray_value=True)
    out_image, out_labels, out_weights = augment_sample(image, labels, weights, params, _gen(2))
    assert torch.equal(out_labels, labels) and torch.equal(out_weights, weights)
    assert not torch.allclose(out_image, image)


# --------------------------------------------------------------------------- config and errors


def test_from_config_reads_the_train_augment_section() -> None:
    params = AugmentParams.from_config(
        {"elastic_sigma": 5, "elastic_grid": 4, "rotate": False, "flip": True, "shift": 2.5, "gray_value": False,
         "gamma": [0.9, 1.1]}
    )
    assert params == AugmentParams(
        elastic_sigma=5, elastic_grid=4, rotate=False, flip=True, shift=2.5, gray_value=False, gamma=(0.9, 1.1)
    )
    assert AugmentParams.from_config(None) == AugmentParams()


def test_schema_defaults_are_the_dataclass_defaults() -> None:
    from unet_pipe.config import load_schema

    section = load_schema()["properties"]["train"]["properties"]["augment"]["properties"]
    defaults = {key: spec["default"] for key, spec in section.items()}
    assert set(defaults) == {f.name for f in dataclasses.fields(AugmentParams)}
    assert AugmentParams.from_config(defaults) == AugmentParams()


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"elastic_sigmaa": 3}, "unknown key 'train.augment.elastic_sigmaa'"),
        ({"elastic_sigma": -1}, "train.augment.elastic_sigma"),
        ({"elastic_grid": 1}, "train.augment.elastic_grid"),
        ({"contrast": [1.2, 0.8]}, "train.augment.contrast"),
        ({"interpolation": "cubic"}, "train.augment.interpolation"),
    ],
)
def test_from_config_rejects_bad_values(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AugmentParams.from_config(cfg)


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="labels"):
        augment_sample(torch.zeros(16, 16), torch.zeros(16, 15, dtype=torch.uint8), None, FULL, _gen())


# --------------------------------------------------------------------------- devices and real data


@pytest.mark.gpu
def test_cuda_gives_the_cpu_result() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    image = torch.rand(2, 1, 96, 96, generator=_gen())
    labels = torch.from_numpy(_checkerboard((96, 96), 8)).expand(2, -1, -1).contiguous()
    cpu = augment_sample(image, labels, None, FULL, _gen(4))
    gpu = augment_sample(image.cuda(), labels.cuda(), None, FULL, _gen(4))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=1e-3)
    # Nearest sampling may flip a pixel whose source coordinate is a rounding tie.
    assert (gpu[1].cpu() != cpu[1]).float().mean() < 1e-3


def test_isbi_slice_keeps_binary_labels(isbi_dir) -> None:
    tifffile = pytest.importorskip("tifffile")
    raw = tifffile.imread(isbi_dir / "train-volume.tif", key=0)[:188, :188]
    labels = tifffile.imread(isbi_dir / "train-labels.tif", key=0)[:188, :188]
    image = torch.from_numpy(raw.astype(np.float32) / 255)
    out_image, out_labels, _ = augment_sample(image, torch.from_numpy(labels), None, FULL, _gen())
    assert set(out_labels.unique().tolist()) <= {0, 255}
    membrane = out_labels == 0
    # Membranes are dark in ISBI: the warped image must still be darker there.
    assert out_image[membrane].mean() < out_image[~membrane].mean() - 0.1
