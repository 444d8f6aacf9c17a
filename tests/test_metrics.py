"""Metrics: hand-computed values on tiny arrays, skimage cross-checks, ISBI 2012 sanity."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.metrics import adapted_rand_error
from skimage.metrics import variation_of_information as skimage_vi

from unet_pipe.metrics import (
    binarize,
    instances_from_binary,
    iou,
    pixel_error,
    rand_error,
    rand_error_per_slice,
    rand_scores,
    variation_of_information,
)


def _voronoi(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """Voronoi cells with ids 1..n (no background), deterministic."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, dtype=np.int64)
    ys = rng.integers(0, shape[0], n)
    xs = rng.integers(0, shape[1], n)
    seeds[ys, xs] = np.arange(1, n + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    return seeds[iy, ix]


# ---------------------------------------------------------------- pixel error, IoU
def test_pixel_error_counts_mismatches_with_strict_threshold():
    prob = np.array([[0.9, 0.5], [0.2, 0.7]], dtype=np.float32)
    truth = np.array([[255, 255], [0, 0]], dtype=np.uint8)
    # cells: p > 0.5 -> [[T, F], [F, T]]; mismatches at (0,1) and (1,1): 2 of 4
    assert pixel_error(prob, truth) == 0.5
    assert pixel_error(prob, truth, threshold=0.8) == 0.25  # cells [[T, F], [F, F]]: (0,1) wrong
    assert pixel_error(truth, truth) == 0.0
    assert pixel_error(truth == 0, truth) == 1.0


def test_binarize_treats_integers_as_binary_and_floats_as_probabilities():
    np.testing.assert_array_equal(binarize(np.array([0, 1, 255], np.uint8)), [False, True, True])
    np.testing.assert_array_equal(binarize(np.array([0.5, 0.51])), [False, True])


def test_iou_hand_values():
    pred = np.array([[1, 1, 0], [0, 0, 0]], bool)
    truth = np.array([[1, 0, 0], [1, 0, 0]], bool)
    assert iou(pred, truth) == pytest.approx(1 / 3)  # 1 shared of 3 in the union
    assert iou(truth, truth) == 1.0
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        pixel_error(np.zeros((2, 2)), np.zeros((2, 3)))


# ---------------------------------------------------------------- Rand
def test_perfect_segmentation_scores_zero_whatever_the_ids():
    truth = _voronoi((32, 32), 6, seed=1)
    truth[::8] = 0  # membranes
    pred = np.where(truth > 0, truth * 7 + 1000, 0)  # other ids, same partition
    assert rand_error(pred, truth) == pytest.approx(0.0, abs=1e-12)
    assert variation_of_information(pred, truth) == (0.0, 0.0)


def test_one_split_hand_value():
    # One true segment of 16 px split into two halves of 8.
    # p_ij = 1/2, 1/2: sum p^2 = 0.5; sum t^2 = 1; sum s^2 = 0.5
    # V_rand = 0.5 / (0.5*0.5 + 0.5*1) = 2/3 -> error 1/3; V_split = 0.5, V_merge = 1.
    # VI: H(pred|truth) = 1 bit (a fair coin inside the segment), H(truth|pred) = 0.
    truth = np.ones((4, 4), int)
    pred = np.ones((4, 4), int)
    pred[:, 2:] = 2
    s = rand_scores(pred, truth)
    assert (s.v_rand, s.v_split, s.v_merge) == pytest.approx((2 / 3, 0.5, 1.0))
    assert rand_error(pred, truth) == pytest.approx(1 / 3)
    assert variation_of_information(pred, truth) == pytest.approx((1.0, 0.0))


def test_one_merge_hand_value():
    # Two true segments of 8 px merged into one: sum p^2 = 0.5, sum t^2 = 0.5, sum s^2 = 1
    # V_rand = 0.5 / 0.75 = 2/3; V_split = 1, V_merge = 0.5; VI = (0, 1 bit).
    truth = np.ones((4, 4), int)
    truth[:, 2:] = 2
    pred = np.ones((4, 4), int)
    s = rand_scores(pred, truth)
    assert (s.v_rand, s.v_split, s.v_merge) == pytest.approx((2 / 3, 1.0, 0.5))
    assert variation_of_information(pred, truth) == pytest.approx((0.0, 1.0))


def test_predicted_background_counts_as_singletons_and_truth_membrane_is_ignored():
    # Truth: one 4-px segment in row 0, membrane elsewhere. Prediction: 2 px in
    # segment 1, 2 px background (-> two singletons); the rows on truth membrane
    # carry arbitrary ids and must not matter.
    # p = (2/4, 1/4, 1/4): sum p^2 = 0.375 = sum s^2; sum t^2 = 1
    # V_rand = 0.375 / (0.5*0.375 + 0.5) = 6/11 -> error 5/11.
    truth = np.zeros((3, 4), int)
    truth[0] = 1
    pred = np.array([[1, 1, 0, 0], [5, 5, 6, 6], [0, 7, 7, 7]])
    assert rand_error(pred, truth) == pytest.approx(5 / 11)
    # VI: H(pred|truth) = entropy of (1/2, 1/4, 1/4) = 1.5 bits, H(truth|pred) = 0
    assert variation_of_information(pred, truth) == pytest.approx((1.5, 0.0))


def test_all_background_prediction_is_maximally_split_not_ignored():
    truth = np.ones((4, 4), int)
    pred = np.zeros((4, 4), int)
    # 16 singletons: sum p^2 = sum s^2 = 16/256, sum t^2 = 1 -> V = (1/16) / (1/32 + 1/2) = 2/17
    assert rand_error(pred, truth) == pytest.approx(1 - 2 / 17)


def test_stack_is_the_mean_of_2d_slices_skipping_empty_truth():
    truth = np.ones((3, 4, 4), int)
    truth[2] = 0  # no foreground: undefined, skipped
    pred = np.ones((3, 4, 4), int)
    pred[1, :, 2:] = 2  # split in slice 1 only (error 1/3)
    np.testing.assert_allclose(rand_error_per_slice(pred, truth), [0.0, 1 / 3, np.nan])
    assert rand_error(pred, truth) == pytest.approx(1 / 6)
    assert np.isnan(rand_error(pred[2:], truth[2:]))
    # Slices are scored in 2D: the same ids in different slices are not one segment.
    assert rand_error(np.ones((2, 4, 4), int), np.stack([np.ones((4, 4), int)] * 2)) == 0.0


def test_rand_scores_undefined_without_truth_foreground():
    with pytest.raises(ValueError, match="undefined"):
        rand_scores(np.ones((2, 2), int), np.zeros((2, 2), int))


def test_cross_check_with_skimage_where_definitions_coincide():
    # No predicted background inside the truth foreground, so only the
    # normalisation differs: skimage counts pairs n(n-1), ISBI uses n^2; with
    # ~4000 px the two agree to ~1e-3. VI is the same definition: exact.
    truth = _voronoi((64, 64), 12, seed=2)
    truth[::16] = 0
    pred = _voronoi((64, 64), 9, seed=3)
    ours = rand_error(pred, truth)
    theirs, _, _ = adapted_rand_error(truth, pred, ignore_labels=(0,))
    assert 0.2 < ours < 0.9
    assert ours == pytest.approx(theirs, abs=2e-3)
    np.testing.assert_allclose(
        variation_of_information(pred, truth), skimage_vi(truth, pred, ignore_labels=(0,)),
        rtol=1e-10,
    )


def _reference_scores(pred, truth):
    """Brute force: relabel predicted background on the truth foreground as
    singletons, then apply the textbook formulas / skimage's VI."""
    fg = truth != 0
    p = pred.astype(np.int64).copy()
    bg = fg & (p == 0)
    p[bg] = p.max() + 1 + np.arange(np.count_nonzero(bg))
    t, q = truth[fg], p[fg]
    _, n_ij = np.unique(np.stack([t, q]), axis=1, return_counts=True)
    _, t_i = np.unique(t, return_counts=True)
    _, s_j = np.unique(q, return_counts=True)
    sp, st, ss = (float((c.astype(float) ** 2).sum()) for c in (n_ij, t_i, s_j))
    vi = skimage_vi(np.where(fg, truth, 0), np.where(fg, p, 0), ignore_labels=(0,))
    return sp / (0.5 * ss + 0.5 * st), sp / st, sp / ss, tuple(vi)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_singleton_rule_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    truth = _voronoi((40, 40), 7, seed=seed + 10)
    truth[rng.random(truth.shape) < 0.2] = 0  # membrane speckle
    pred = _voronoi((40, 40), 5, seed=seed + 20) * 1000  # large, sparse ids
    pred[rng.random(pred.shape) < 0.3] = 0  # predicted background everywhere
    v_rand, v_split, v_merge, vi = _reference_scores(pred, truth)
    s = rand_scores(pred, truth)
    assert (s.v_rand, s.v_split, s.v_merge) == pytest.approx((v_rand, v_split, v_merge), rel=1e-12)
    np.testing.assert_allclose(variation_of_information(pred, truth), vi, rtol=1e-9)


# ---------------------------------------------------------------- truth instances
def test_instances_from_binary_uses_4_connectivity_and_unique_ids_per_stack():
    labels = np.array(
        [
            [[255, 0, 255], [0, 255, 0]],  # diagonal neighbours: separate cells
            [[255, 255, 0], [0, 0, 0]],
        ],
        dtype=np.uint8,
    )
    expected = np.array([[[1, 0, 2], [0, 3, 0]], [[4, 4, 0], [0, 0, 0]]], dtype=np.uint32)
    out = instances_from_binary(labels)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(instances_from_binary(labels[0]), expected[0])
    np.testing.assert_array_equal(
        instances_from_binary(np.array([[1, 2, 2]]), foreground_value=2), [[0, 1, 1]]
    )


# ---------------------------------------------------------------- ISBI 2012
def test_isbi_truth_vs_itself_and_vs_eroded(isbi_dir):
    tifffile = pytest.importorskip("tifffile")
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:2]
    truth = instances_from_binary(labels)
    assert rand_error(truth, truth) == 0.0
    assert pixel_error(labels, labels) == 0.0
    # Eroding every cell by 1 px keeps the partition but moves pixels to
    # background (singletons): a small, nonzero error; a few percent pixel error.
    eroded = np.stack([ndi.grey_erosion(s, size=(3, 3)) for s in truth])
    eroded[truth == 0] = 0
    err = rand_error(eroded, truth)
    assert 0.0 < err < 0.2
    assert 0.0 < pixel_error(eroded > 0, labels) < 0.15
    # Merging everything into one segment is far worse than the erosion.
    assert rand_error((labels > 0).astype(np.uint32), truth) > 0.5
