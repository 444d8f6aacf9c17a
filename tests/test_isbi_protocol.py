"""ISBI 2012 final measures: thinning, V_rand and V_info by hand, threshold sweep, properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
from synthetic_cells import voronoi_cells

from unet_pipe.isbi_protocol import (
    ISBI_THRESHOLDS,
    ThinnedScores,
    best_over_thresholds,
    thin_boundaries,
    thinned_scores,
)
from unet_pipe.metrics import foreground_scores, instances_from_binary, rand_scores


def test_thresholds_are_the_challenge_sweep():
    assert ISBI_THRESHOLDS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_thinning_leaves_a_one_pixel_line_in_a_thick_membrane():
    # Cells x = 0-1 and x = 5-6, membrane x = 2-4 (3 px).  Flooding from both
    # sides reaches x = 2 and x = 4 in one step and x = 3 from both at once:
    # x = 3 is the watershed line.
    cells = np.ones((3, 7), bool)
    cells[:, 2:5] = False
    np.testing.assert_array_equal(thin_boundaries(cells), [[1, 1, 1, 0, 2, 2, 2]] * 3)
    # Membrane x = 2-3 (2 px): each side takes its nearer column, no pixel is
    # equidistant, so no line is left (the two ids still differ).
    cells = np.ones((2, 6), bool)
    cells[:, 2:4] = False
    np.testing.assert_array_equal(thin_boundaries(cells), [[1, 1, 1, 2, 2, 2]] * 2)
    # Two one-pixel cells at (0, 0) and (0, 2) of a 3x3 image.  Step 1: (0, 1)
    # touches both (line), (1, 0) joins 1, (1, 2) joins 2.  Step 2: (2, 0) -> 1,
    # (2, 2) -> 2, (1, 1) touches 1 and 2 (line).  Step 3: (2, 1) likewise.
    cells = np.zeros((3, 3), bool)
    cells[0, 0] = cells[0, 2] = True
    np.testing.assert_array_equal(thin_boundaries(cells), [[1, 0, 2]] * 3)
    # No cell: no segment to grow, every pixel stays boundary.
    np.testing.assert_array_equal(thin_boundaries(np.zeros((2, 2), bool)), np.zeros((2, 2)))


def test_info_scores_hand_values():
    # Truth [1 1 2 2], prediction [1 1 1 2] (one pixel of truth 2 merged into 1).
    # H(T) = 1 bit; pred sizes 3, 1: H(S) = -(3/4 log2 3/4 + 1/4 log2 1/4);
    # joint cells (1,1) = 2, (2,1) = 1, (2,2) = 1: H(S,T) = 1/2 + 2 * 1/4 * 2 = 1.5;
    # I = H(S) + H(T) - H(S,T).
    h_s = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    mutual = h_s + 1.0 - 1.5
    _, info = foreground_scores(np.array([[1, 1, 1, 2]]), np.array([[1, 1, 2, 2]]))
    assert info.v_info == pytest.approx(mutual / (0.5 * h_s + 0.5))
    assert info.v_info_split == pytest.approx(mutual / h_s)
    assert info.v_info_merge == pytest.approx(mutual / 1.0)
    # Truth one segment of 4, prediction [0 0 5 5]: two singletons and a pair:
    # H(S) = 2 * 1/4 * 2 + 1/2 * 1 = 1.5 bits, H(T) = 0, I = 0 -> V_info 0;
    # the merge ratio is 0/0 (nothing to merge): 1.
    _, info = foreground_scores(np.array([[0, 0, 5, 5]]), np.array([[1, 1, 1, 1]]))
    assert (info.v_info, info.v_info_split, info.v_info_merge) == (0.0, 0.0, 1.0)
    # Same partition, other ids: all 1, one-segment case included (0/0 = 1).
    for truth in (np.array([[1, 1, 2, 2]]), np.array([[3, 3, 3, 3]])):
        _, info = foreground_scores(truth * 7 + 1, truth)
        assert (info.v_info, info.v_info_split, info.v_info_merge) == (1.0, 1.0, 1.0)
    assert foreground_scores(np.ones((2, 2)), np.zeros((2, 2))) is None


def _two_cells() -> np.ndarray:
    """Truth 3x7: cells x = 0-2 (id 1, 9 px) and x = 4-6 (id 2, 9 px), membrane x = 3."""
    cells = np.ones((3, 7), bool)
    cells[:, 3] = False
    return instances_from_binary(cells)


def test_thick_but_correct_membrane_is_perfect_after_thinning():
    truth = _two_cells()
    prob = np.full((3, 7), 0.9)
    prob[:, 2:5] = 0.1  # the membrane predicted 3 px thick
    s = thinned_scores(prob, truth)
    # t = 0.0: every pixel a cell, one segment holding both truth cells (a merge):
    #   sum p_ij^2 = 81 + 81 = 162, sum s^2 = 18^2 = 324, sum t^2 = 162
    #   V_rand = 162 / (0.5 * 324 + 0.5 * 162) = 2/3; H(S) = 0, I = 0: V_info = 0.
    # t = 0.1 ... 0.8: cells x = 0-1 and 5-6; thinning gives [1 1 1 0 2 2 2], the
    #   line on the truth membrane: both scores 1.
    # t = 0.9, 1.0: no cell, the 18 truth pixels are singletons:
    #   sum p^2 = sum s^2 = 18, sum t^2 = 162: V_rand = 18 / 90 = 0.2;
    #   H(S) = H(S,T) = log2 18, H(T) = 1, I = 1: V_info = 1 / (0.5 log2 18 + 0.5).
    low_info = 1 / (0.5 * math.log2(18) + 0.5)
    np.testing.assert_allclose(s.v_rand, [2 / 3] + [1.0] * 8 + [0.2] * 2)
    np.testing.assert_allclose(s.v_info, [0.0] + [1.0] * 8 + [low_info] * 2)
    # Without thinning the same map at 0.5 loses the 6 truth pixels at x = 2, 4
    # (singletons): sum p^2 = 36 + 36 + 6 = 78 = sum s^2, sum t^2 = 162:
    # V_rand = 78 / 120 = 0.65.
    assert rand_scores(instances_from_binary(prob > 0.5), truth).v_rand == pytest.approx(0.65)


def test_merge_and_split_hand_values():
    truth = _two_cells()
    # Merge: p = 0.55 everywhere: cells for t <= 0.5 (the merge above, V_rand 2/3,
    # V_info 0), none for t >= 0.6 (singletons, V_rand 0.2, V_info as above).
    s = thinned_scores(np.full((3, 7), 0.55), truth)
    low_info = 1 / (0.5 * math.log2(18) + 0.5)
    np.testing.assert_allclose(s.v_rand, [2 / 3] * 6 + [0.2] * 5)
    np.testing.assert_allclose(s.v_info, [0.0] * 6 + [low_info] * 5)
    best = best_over_thresholds([s])
    assert (best.v_rand, best.v_rand_threshold) == (pytest.approx(2 / 3), 0.0)
    assert (best.v_info, best.v_info_threshold) == (pytest.approx(low_info), 0.6)
    # Split: one 21-px truth cell, the prediction draws a 1-px membrane at x = 3,
    # which thinning keeps (both sides reach it at once).  Pairs 9 and 9, 3
    # singletons: sum p^2 = sum s^2 = 165, sum t^2 = 441: V_rand = 165 / 303.
    # V_info: H(T) = 0, so I = 0 and V_info = 0.
    prob = np.full((3, 7), 0.9)
    prob[:, 3] = 0.1
    s = thinned_scores(prob, np.ones((3, 7), np.uint32), thresholds=(0.5,))
    assert s.v_rand[0] == pytest.approx(165 / 303) and s.v_info[0] == 0.0


def test_best_over_thresholds_averages_slices_and_breaks_ties_low():
    ts = (0.2, 0.5, 0.8)
    a = ThinnedScores(ts, np.array([0.2, 0.8, 0.6]), np.array([1.0, 0.0, 0.5]))
    b = ThinnedScores(ts, np.array([0.4, 0.6, 1.0]), np.array([0.0, 1.0, 0.5]))
    empty = ThinnedScores(ts, np.full(3, np.nan), np.full(3, np.nan))  # no truth foreground
    best = best_over_thresholds([a, empty, b])
    # means: V_rand [0.3, 0.7, 0.8] -> 0.8 at 0.8; V_info [0.5, 0.5, 0.5] -> tie, lowest t.
    np.testing.assert_allclose(best.v_rand_curve, [0.3, 0.7, 0.8])
    assert (best.v_rand, best.v_rand_threshold) == (pytest.approx(0.8), 0.8)
    assert (best.v_info, best.v_info_threshold) == (0.5, 0.2)
    assert best_over_thresholds([empty]) is None
    with pytest.raises(ValueError, match="different thresholds"):
        best_over_thresholds([a, ThinnedScores((0.1,), np.ones(1), np.ones(1))])


@pytest.mark.parametrize("seed", [0, 3])
def test_perfect_and_thickened_predictions(seed):
    cells = voronoi_cells((64, 64), 10, seed)
    truth = instances_from_binary(cells)
    # The truth itself as probabilities: 1 at every threshold below 1.
    perfect = thinned_scores(cells.astype(np.float64), truth)
    np.testing.assert_array_equal(perfect.v_rand[:-1], 1.0)
    np.testing.assert_array_equal(perfect.v_info[:-1], 1.0)
    # Membranes 3 px thick: the unthinned score drops (0.89 and 0.88 for these
    # seeds), the thinned one stays near 1 (boundary pixels go to the nearest
    # eroded cell; only ties at corners and junctions can differ).
    thick = ndi.binary_erosion(cells, ndi.generate_binary_structure(2, 1), border_value=1)
    s = thinned_scores(thick.astype(np.float64), truth, thresholds=(0.5,))
    plain = rand_scores(instances_from_binary(thick), truth).v_rand
    assert plain < 0.9 and s.v_rand[0] > 0.99
