"""Weight maps (paper eq. 2): hand-computed values, the textbook method, chunking, errors, sparse labels."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
import zarr

from unet_pipe.errors import ConfigError, InputError, OutputError
from unet_pipe.io import StagedImage, open_image
from unet_pipe.synth import synthesize
from unet_pipe.weights import (
    WeightParams,
    annotated,
    border_halo,
    border_weights,
    border_weights_textbook,
    class_counts,
    class_weights,
    compute_weight_store,
    cutoff_distance,
    instances_from_labels,
    weight_map,
    weights_from_instances,
)

TOL = 1e-6 * 10.0  # the default truncation bound: tolerance * w0


def write_labels(path, labels, chunks=(1, 32, 32), voxel_size=(1.0, 1.0, 1.0)):
    staged = StagedImage(path, shape=labels.shape, dtype=labels.dtype, chunks=chunks, voxel_size=voxel_size,
                         kind="labels")
    staged.array[:] = labels
    staged.commit(pyramid_levels=1)
    return path


def assert_matches_textbook(inst, sampling=None, w0=10.0, sigma=5.0):
    """Within tolerance * w0 everywhere, and bit-for-bit where the term is above the tolerance."""
    fast = border_weights(inst, w0, sigma, sampling=sampling)
    ref = border_weights_textbook(inst, w0, sigma, sampling=sampling)
    assert np.abs(fast - ref).max() <= 1e-6 * w0
    above = ref > 1e-6 * w0
    np.testing.assert_allclose(fast[above], ref[above], rtol=1e-12, atol=0)
    return fast, ref


# ------------------------------------------------------------ tiny exact cases


@pytest.mark.parametrize("gap", [2, 4, 6, 10])
def test_two_squares_gap_centre_hand_computed(gap):
    """Squares whose facing pixels are `gap` px apart (gap - 1 background columns between them).

    At the centre of the gap d1 = d2 = gap / 2, so w = w_c(background) + w0 exp(-gap^2 / 2 sigma^2).
    """
    labels = np.zeros((20, 40), np.uint8)
    labels[5:15, 5:15] = 255
    labels[5:15, 14 + gap : 24 + gap] = 255
    w = weight_map(labels, WeightParams(w0=10.0, sigma=5.0))
    n_fg, n = 200, labels.size
    w_bg, w_fg = n / (2 * (n - n_fg)), n / (2 * n_fg)
    centre = (10, 14 + gap // 2)
    assert labels[centre] == 0
    assert w[centre] == pytest.approx(w_bg + 10.0 * math.exp(-(gap**2) / 50.0), rel=1e-6)
    assert np.all(w[labels == 255] == np.float32(w_fg))  # border term is 0 on objects
    # Far from both squares only the class weight is left.
    assert w[0, 39] == pytest.approx(w_bg, rel=1e-7)


def test_gap_pixel_value_written_out():
    """One number by hand: gap 6, w0 10, sigma 5 -> border 10 exp(-36 / 50) = 4.8675...."""
    inst = np.zeros((9, 17), np.int32)
    inst[2:7, 2:7] = 1
    inst[2:7, 12:15] = 2
    term = border_weights(inst, 10.0, 5.0)
    assert term[4, 9] == pytest.approx(4.867522559599636, abs=1e-12)
    # Below the squares, (8, 9): nearest pixels (6, 6) and (6, 12), d1 = d2 = sqrt(2^2 + 3^2).
    assert term[8, 9] == pytest.approx(10.0 * math.exp(-((2 * math.sqrt(13)) ** 2) / 50.0), abs=1e-12)


def test_no_objects_and_single_object_have_no_border_term():
    empty = np.zeros((16, 16), np.int32)
    assert not border_weights(empty).any()
    one = empty.copy()
    one[4:9, 3:12] = 7
    assert not border_weights(one).any()
    assert not border_weights_textbook(one).any()
    # Only class weights remain: all background (one class present) -> 1 everywhere.
    w = weight_map(np.zeros((8, 8), np.uint8))
    assert np.all(w == 1.0)


def test_class_weights_formula_mean_is_one():
    counts = np.array([30, 10])
    cw = class_weights(counts)
    np.testing.assert_allclose(cw, [40 / 60, 40 / 20])
    assert (cw * counts).sum() / counts.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(class_weights([0, 5]), [0.0, 1.0])  # absent class: 0
    np.testing.assert_array_equal(class_weights([0, 0]), [0.0, 0.0])


def test_class_weights_without_balance_are_one_for_present_classes():
    np.testing.assert_array_equal(class_weights([30, 10], balance=False), [1.0, 1.0])
    np.testing.assert_array_equal(class_weights([0, 5], balance=False), [0.0, 1.0])


def test_weight_map_without_class_balance_keeps_the_border_term():
    # Two 1-px-apart cells on a 1 x 5 strip: membrane pixel 2 lies at d1 = d2 = 1.
    labels = np.array([[255, 255, 0, 255, 255]], np.uint8)
    balanced = weight_map(labels, WeightParams(w0=10, sigma=5))
    flat = weight_map(labels, WeightParams(w0=10, sigma=5, class_balance=False))
    border = 10 * np.exp(-4 / 50)
    # paper: w_c = 5 / (2 * 1) on the membrane, 5 / (2 * 4) on cells
    np.testing.assert_allclose(balanced[0], [0.625, 0.625, 2.5 + border, 0.625, 0.625], rtol=1e-6)
    np.testing.assert_allclose(flat[0], [1, 1, 1 + border, 1, 1], rtol=1e-6)


def test_cutoff_and_halo():
    r = cutoff_distance(5.0, 1e-6)
    assert r == pytest.approx(5.0 * math.sqrt(2 * math.log(1e6)))
    assert 10.0 * math.exp(-(r**2) / 50.0) == pytest.approx(1e-5)
    assert border_halo(5.0, (1.0, 1.0)) == (math.ceil(r - 1),) * 2
    assert border_halo(5.0, (12.5, 1.0, 1.0)) == (math.ceil((r - 1) / 12.5), math.ceil(r - 1), math.ceil(r - 1))


def test_params_are_validated():
    bad_values = ({"sigma": 0}, {"w0": -1}, {"tolerance": 0}, {"mode": "4d"}, {"label_mode": "x"}, {"foreground_value": 0})
    for bad in bad_values:
        with pytest.raises(ConfigError):
            WeightParams(**bad)
    p = WeightParams.from_config({"w0": 3.0, "sigma": 2.0, "mode": "3d"}, sigma=4.0, mode=None)
    assert (p.w0, p.sigma, p.mode) == (3.0, 4.0, "3d")


# ------------------------------------------------------------ textbook method


def test_matches_textbook_on_synthetic_slices():
    stack = synthesize((2, 96, 128), seed=3)
    for z in range(2):
        inst = instances_from_labels(stack.labels[z])
        assert inst.max() > 10
        fast, _ = assert_matches_textbook(inst)
        assert fast.max() > 5.0  # thin membranes between touching cells carry large weights


def test_matches_textbook_with_objects_touching_the_border_and_odd_ids():
    rng = np.random.default_rng(1)
    inst = np.zeros((60, 70), np.uint64)
    for k in range(25):
        y, x = rng.integers(-5, 60), rng.integers(-5, 70)
        h, w = rng.integers(2, 14, size=2)
        inst[max(y, 0) : y + h, max(x, 0) : x + w] = [3, 10**12, 17, 5][k % 4] + k * 1000
    assert inst[0].any() and inst[:, -1].any()
    assert_matches_textbook(inst)
    assert_matches_textbook(inst, sampling=(1.5, 1.0), sigma=3.0)


def test_matches_textbook_in_3d_with_anisotropic_voxels():
    zz, yy, xx = np.mgrid[0:9, 0:40, 0:44]
    inst = np.zeros((9, 40, 44), np.int32)
    centres = [(2, 8, 9), (4, 20, 22), (6, 30, 35), (3, 31, 8), (8, 8, 38)]
    for k, (cz, cy, cx) in enumerate(centres, start=1):
        inst[((zz - cz) * 3.0) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = k
    fast, ref = assert_matches_textbook(inst, sampling=(3.0, 1.0, 1.0))
    assert ref.max() > 0.1
    # 3d mode on labels: face-connected 3D components, the same objects.
    labels = np.where(inst > 0, 255, 0).astype(np.uint8)
    assert instances_from_labels(labels, WeightParams(mode="3d")).max() == len(centres)


def test_matches_textbook_on_isbi_slices(isbi_dir):
    labels = tifffile.imread(isbi_dir / "train-labels.tif")
    for z in (0, 29):
        inst = instances_from_labels(labels[z])
        assert inst.max() > 80
        fast, ref = assert_matches_textbook(inst)
        assert ref.max() > 8.0


def test_isbi_store_equals_whole_slices(isbi_dir, tmp_path):
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[10:12]
    src = write_labels(tmp_path / "labels.ome.zarr", labels, chunks=(1, 128, 128), voxel_size=(0.05, 0.004, 0.004))
    compute_weight_store(src, tmp_path / "w.ome.zarr")
    expected = _whole_volume_weights(labels, WeightParams(), (1.0, 1.0))
    np.testing.assert_array_equal(open_image(tmp_path / "w.ome.zarr")[:], expected)
    assert expected.max() > 10.0


def test_isbi_class_weights(isbi_dir):
    labels = tifffile.imread(isbi_dir / "train-labels.tif")
    counts = class_counts(labels)
    assert counts.sum() == labels.size and counts[0] == np.count_nonzero(labels == 0)
    cw = class_weights(counts)
    assert cw[0] > 2 > 1 > cw[1] > 0.5  # membranes are ~22 % of the pixels
    w_c = cw[(labels == 255).astype(int)]
    assert w_c.mean() == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------- label input


def test_binary_labels_become_4_connected_components_per_slice():
    labels = np.zeros((2, 6, 6), np.uint8)
    labels[0, 1:3, 1:3] = 255
    labels[0, 3:5, 3:5] = 255  # touches the first square only diagonally: a separate cell
    labels[1, 0:2, 0:6] = 255
    inst = instances_from_labels(labels)
    assert inst[0, 1, 1] != inst[0, 4, 4]
    assert len(np.unique(inst)) == 4  # background + 3 cells, ids unique through the stack
    ones = instances_from_labels((labels > 0).astype(np.uint8), WeightParams(foreground_value=1))
    np.testing.assert_array_equal(ones, inst)


@pytest.mark.parametrize(
    "labels, params, message",
    [
        (np.array([[0, 255, 7]], np.uint8), WeightParams(), "found values 0, 7, 255"),
        (np.array([[0, 1, 1]], np.uint8), WeightParams(), "set foreground_value to 1"),
        (np.array([[0, 1, 2]], np.uint16), WeightParams(), "label_mode 'instances'"),
        (np.array([[0.0, 1.0]]), WeightParams(), "must be integers"),
        (np.array([[0, -3]], np.int32), WeightParams(label_mode="instances"), "must be >= 0"),
    ],
)
def test_unexpected_label_values_raise_clear_errors(labels, params, message):
    with pytest.raises(InputError, match=message):
        instances_from_labels(labels, params, where="labels.ome.zarr")


# --------------------------------------------------------- chunked == whole


def _whole_volume_weights(labels, params, sampling):
    inst = instances_from_labels(labels, params)
    cw = class_weights(class_counts(labels, params))
    return weights_from_instances(inst, cw, params, sampling)


@pytest.mark.parametrize("chunks", [(1, 32, 32), (2, 16, 48)])
def test_chunked_store_equals_whole_slice(tmp_path, chunks):
    labels = synthesize((3, 80, 96), seed=5).labels
    src = write_labels(tmp_path / "labels.ome.zarr", labels, chunks=chunks, voxel_size=(0.05, 0.004, 0.004))
    params = WeightParams(sigma=4.0)
    summary = compute_weight_store(src, tmp_path / "weights.ome.zarr", params)
    out = open_image(tmp_path / "weights.ome.zarr")
    assert out.dtype == np.float32 and tuple(out.chunks) == chunks
    expected = _whole_volume_weights(labels, params, (1.0, 1.0))
    np.testing.assert_array_equal(out[:], expected)
    cw = class_weights(class_counts(labels))
    np.testing.assert_allclose(summary["class_weights"], cw)
    attrs = zarr.open_group(str(tmp_path / "weights.ome.zarr"), mode="r").attrs["unet_pipe"]
    assert attrs["weights"]["class_weights"] == pytest.approx(list(cw))
    assert attrs["provenance"]["params"]["w0"] == 10.0 and attrs["provenance"]["params"]["sigma"] == 4.0
    assert attrs["provenance"]["inputs"]["labels"]["path"].endswith("labels.ome.zarr")


def test_object_cut_by_the_halo_is_not_split(tmp_path):
    """A U-shaped cell whose arms join outside every block's halo: its inner gap is no border."""
    labels = np.zeros((1, 128, 64), np.uint8)
    labels[0, 2:120, 10:20] = 255
    labels[0, 2:120, 26:36] = 255
    labels[0, 110:120, 10:36] = 255  # the bottom bar joins the arms ~80 px below the top blocks
    src = write_labels(tmp_path / "labels.ome.zarr", labels, chunks=(1, 16, 16))
    compute_weight_store(src, tmp_path / "w.ome.zarr", WeightParams())
    out = open_image(tmp_path / "w.ome.zarr")[0]
    cw = class_weights(class_counts(labels))
    # One object only: no border term anywhere, in particular not in the gap between the arms.
    np.testing.assert_array_equal(out, cw[(labels[0] > 0).astype(int)].astype(np.float32))


def test_chunked_3d_mode_equals_whole_volume(tmp_path):
    zz, yy, xx = np.mgrid[0:8, 0:48, 0:48]
    labels = np.zeros((8, 48, 48), np.uint8)
    for cz, cy, cx in [(2, 10, 10), (5, 24, 26), (3, 38, 12), (6, 12, 38), (1, 40, 40)]:
        labels[((zz - cz) * 2.0) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = 255
    src = write_labels(tmp_path / "labels.ome.zarr", labels, chunks=(2, 16, 16), voxel_size=(0.008, 0.004, 0.004))
    params = WeightParams(mode="3d", sigma=3.0)
    compute_weight_store(src, tmp_path / "w.ome.zarr", params)
    expected = _whole_volume_weights(labels, params, (2.0, 1.0, 1.0))
    np.testing.assert_array_equal(open_image(tmp_path / "w.ome.zarr")[:], expected)
    assert expected.max() > 1.5  # the balls are close enough for a border term


def test_store_errors_leave_no_output(tmp_path):
    labels = np.zeros((2, 16, 16), np.uint8)
    labels[1, 3, 3] = 9
    src = write_labels(tmp_path / "labels.ome.zarr", labels, chunks=(1, 16, 16))
    with pytest.raises(InputError, match="found values 0, 9"):
        compute_weight_store(src, tmp_path / "w.ome.zarr")
    assert not (tmp_path / "w.ome.zarr").exists() and not (tmp_path / "w.ome.zarr.partial").exists()
    good = write_labels(tmp_path / "good.ome.zarr", np.zeros((1, 8, 8), np.uint8), chunks=(1, 8, 8))
    compute_weight_store(good, tmp_path / "w.ome.zarr")
    with pytest.raises(OutputError):
        compute_weight_store(good, tmp_path / "w.ome.zarr")


def test_interrupted_store_resumes_done_slabs(tmp_path, monkeypatch):
    import unet_pipe.weights as weights_module

    labels = synthesize((3, 48, 48), seed=4).labels
    src = write_labels(tmp_path / "labels.ome.zarr", labels, chunks=(1, 48, 48))
    real = weights_module.weights_from_instances
    calls = []

    def dies_on_slab_two(inst, *args, **kwargs):
        calls.append(inst.shape)
        if len(calls) == 2:
            raise RuntimeError("node lost")
        return real(inst, *args, **kwargs)

    monkeypatch.setattr(weights_module, "weights_from_instances", dies_on_slab_two)
    with pytest.raises(RuntimeError):
        compute_weight_store(src, tmp_path / "w.ome.zarr")
    assert (tmp_path / "w.ome.zarr.partial").exists() and not (tmp_path / "w.ome.zarr").exists()
    calls.clear()

    def counting(inst, *args, **kwargs):
        calls.append(inst.shape)
        return real(inst, *args, **kwargs)

    monkeypatch.setattr(weights_module, "weights_from_instances", counting)
    compute_weight_store(src, tmp_path / "w.ome.zarr")
    assert len(calls) == 2  # resumed: slab z = 0 was done and is not recomputed
    expected = _whole_volume_weights(labels, WeightParams(), (1.0, 1.0))
    np.testing.assert_array_equal(open_image(tmp_path / "w.ome.zarr")[:], expected)


def test_tile_with_halo_margin_matches_store_values():
    """Per-tile weights (training) equal the whole-slice ones once the tile has a halo margin."""
    labels = synthesize((1, 96, 96), seed=2).labels[0]
    params = WeightParams()
    whole_inst = instances_from_labels(labels)
    cw = class_weights(class_counts(labels))
    whole = weights_from_instances(whole_inst, cw, params)
    h = border_halo(params.sigma, (1.0, 1.0))[0]
    assert h == 26
    tile = weights_from_instances(whole_inst[10 : 40 + 2 * h, 5 : 35 + 2 * h], cw, params)
    np.testing.assert_array_equal(tile[h:-h, h:-h], whole[10 + h : 40 + h, 5 + h : 35 + h])
    assert tile[h:-h, h:-h].max() > 5.0


# ------------------------------------------------------------------------- CLI


def test_cli_weights_and_preview(tmp_path, run_cli):
    stack = synthesize((2, 64, 64), seed=1)
    labels = write_labels(tmp_path / "labels.ome.zarr", stack.labels)
    raw = StagedImage(tmp_path / "raw.ome.zarr", shape=stack.raw.shape, dtype=np.uint8, chunks=(1, 32, 32))
    raw.array[:] = stack.raw
    raw.commit(pyramid_levels=0)
    png = tmp_path / "preview.png"
    code, _, err = run_cli("weights", labels, tmp_path / "w.ome.zarr", "--sigma", "3", "--w0", "8",
                           "--preview", png, "--raw", tmp_path / "raw.ome.zarr", "--slice", "1")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = _whole_volume_weights(stack.labels, WeightParams(w0=8.0, sigma=3.0), (1.0, 1.0))
    np.testing.assert_array_equal(open_image(tmp_path / "w.ome.zarr")[:], expected)
    # Settings from a config's weights section, flags win; preview alone (computed in memory).
    config = tmp_path / "config.yaml"
    config.write_text("datasets: {d: {synthetic: {}}}\nweights: {w0: 8.0, sigma: 2.0}\n")
    code, _, err = run_cli("weights", labels, tmp_path / "w2.ome.zarr", "--config", config, "--sigma", "3",
                           "--preview", tmp_path / "p2.png")
    assert code == 0, err
    np.testing.assert_array_equal(open_image(tmp_path / "w2.ome.zarr")[:], expected)
    assert run_cli("weights", labels, "--preview", tmp_path / "p3.png")[0] == 0
    # A one-line error for wrong label values.
    code, _, err = run_cli("weights", labels, tmp_path / "x.ome.zarr", "--foreground-value", "1")
    assert code == 2 and err.count("\n") == 1 and "set foreground_value to 255" in err


# ---------------------------------------------------------------- sparse labels
# Sparse annotations in the weight map: unlabelled pixels weigh 0 and are neither class.


def test_unlabelled_pixels_leave_the_class_balance_and_weigh_zero():
    labels = np.array([[255, 255, 255, 0, 7, 7]], np.uint8)
    params = WeightParams(w0=0.0, unlabelled_value=7)
    np.testing.assert_array_equal(class_counts(labels, params), [1, 3])
    # N = 4 annotated pixels: w_bg = 4 / (2 * 1) = 2, w_cell = 4 / (2 * 3) = 2/3.
    expected = np.array([[2 / 3, 2 / 3, 2 / 3, 2.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(weight_map(labels, params), expected)
    # Without the unlabelled value, 7 is not a valid binary label.
    with pytest.raises(InputError, match="found values 0, 7, 255"):
        weight_map(labels, WeightParams(w0=0.0))


@pytest.mark.parametrize(
    "labels, params",
    [
        (np.array([[255, 0, 7, 0, 255]], np.uint8), WeightParams(unlabelled_value=7)),
        (np.array([[3, 0, 9, 0, 4]], np.uint16), WeightParams(label_mode="instances", unlabelled_value=9)),
    ],
)
def test_border_distances_use_annotated_objects_and_pass_through_unlabelled(labels, params):
    # Objects at x = 0 and x = 4; the unlabelled pixel x = 2 is no object and weighs 0.
    # Membrane pixels x = 1 and x = 3: d1 = 1, d2 = 3 -> 10 exp(-16 / 50); w_c = [1, 1].
    border = 10.0 * math.exp(-16.0 / 50.0)
    expected = np.array([[1.0, 1.0 + border, 0.0, 1.0 + border, 1.0]], np.float32)
    np.testing.assert_array_equal(weight_map(labels, params), expected)
    np.testing.assert_array_equal(instances_from_labels(labels, params) > 0, [[True, False, False, False, True]])
    np.testing.assert_array_equal(annotated(labels, params), [[True, True, False, True, True]])


def test_unlabelled_value_must_be_neither_class():
    with pytest.raises(ConfigError, match="differ from the cell value 255"):
        WeightParams(unlabelled_value=255)
    with pytest.raises(ConfigError, match="differ from 0"):
        WeightParams(unlabelled_value=0)
    with pytest.raises(ConfigError, match="integer or null"):
        WeightParams(unlabelled_value=1.5)


def test_sparse_store_equals_whole_slice_and_excludes_unlabelled_from_counts(tmp_path):
    labels = synthesize((2, 80, 96), seed=3).labels.astype(np.uint8)
    labels[:, :, 50:] = 128  # the right part of every slice is unlabelled
    labels[1, 10:30, 5:20] = 128  # and a hole
    src = tmp_path / "labels.ome.zarr"
    staged = StagedImage(src, shape=labels.shape, dtype=labels.dtype, chunks=(1, 32, 32),
                         voxel_size=(1.0, 1.0, 1.0), kind="labels")
    staged.array[:] = labels
    staged.commit(pyramid_levels=1)
    params = WeightParams(sigma=4.0, unlabelled_value=128)
    summary = compute_weight_store(src, tmp_path / "w.ome.zarr", params)
    out = open_image(tmp_path / "w.ome.zarr")[:]
    known = labels != 128
    counts = [int(np.count_nonzero(labels == 0)), int(np.count_nonzero(labels == 255))]
    assert summary["class_counts"] == counts and sum(counts) == int(known.sum())
    expected = np.stack([weight_map(s, params, class_weight=class_weights(counts)) for s in labels])
    np.testing.assert_array_equal(out, expected)
    assert np.all(out[~known] == 0) and np.all(out[known] > 0)
    # The class weights average 1 over the annotated pixels only.
    cw = np.asarray(summary["class_weights"])
    assert cw[(labels[known] == 255).astype(int)].mean() == pytest.approx(1.0)


def test_config_refuses_an_unlabelled_value_that_is_a_class():
    from unet_pipe.config import validate_config

    base = {"datasets": {"s": {"synthetic": {"shape": [3, 40, 40]}}}}
    assert validate_config({**base, "weights": {"unlabelled_value": 128}})["weights"]["unlabelled_value"] == 128
    assert validate_config(dict(base))["weights"]["unlabelled_value"] is None
    for value in (0, 255):
        with pytest.raises(ConfigError, match=f"'weights.unlabelled_value': {value} is a class value"):
            validate_config({**base, "weights": {"unlabelled_value": value}})
