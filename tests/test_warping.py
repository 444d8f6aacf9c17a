"""Warping error: simple-point table by hand, warps of tiny masks by hand, topology kept."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from synthetic_cells import voronoi_cells

from unet_pipe.metrics import pixel_error
from unet_pipe.warping import SIMPLE_POINT_TABLE, is_simple, warp_truth, warping_error

# Neighbour bits: 0 NW, 1 N, 2 NE, 3 W, 4 E, 5 SW, 6 S, 7 SE.
NW, N, NE, W, E, SW, S, SE = (1 << k for k in range(8))


@pytest.mark.parametrize(
    ("code", "simple", "why"),
    [
        (0, False, "isolated cell pixel: flipping deletes/creates an object (T4 = 0)"),
        (255, False, "interior pixel: flipping creates/fills a hole (T8 = 0)"),
        (N, True, "end of a line: one cell component, one membrane component"),
        (N | S, False, "bridge: N and S are two cell components 4-adjacent to the centre (T4 = 2)"),
        (N | E, False, "N and E touch only diagonally: two 4-components (T4 = 2)"),
        (NE, False, "a diagonal neighbour only: not 4-adjacent, the centre is its own object (T4 = 0)"),
        (NW | N | W, True, "a convex corner: one cell component, one membrane component"),
        (N | S | NW | W | SW, True, "an edge pixel of a straight boundary"),
        (NE | SW, False, "two membrane pieces and no 4-adjacent cell (T4 = 0)"),
        (255 & ~NE & ~SW, False, "membrane NE and SW are two 8-components (T8 = 2)"),
    ],
)
def test_simple_point_table_hand_cases(code, simple, why):
    assert SIMPLE_POINT_TABLE[code] == simple, why


def test_is_simple_treats_outside_as_membrane():
    mask = np.zeros((3, 3), bool)
    mask[0, 0] = True
    assert not is_simple(mask, 0, 0)  # the only cell pixel: removing it deletes the object
    mask[0, 1] = True
    assert is_simple(mask, 0, 0)  # end of a 2-pixel line


def test_perfect_prediction_has_no_warping_error():
    truth = np.zeros((6, 6), bool)
    truth[1:5, 1:3] = truth[1:5, 4:5] = True
    assert warping_error(truth, truth) == 0.0


def test_shifted_boundary_warps_away():
    # Two cells split by a membrane column at x = 3; the prediction draws it at
    # x = 4.  Pixel error: 2 columns x 5 rows wrong = 10/35.  Each row can be
    # warped: first (y, 4) cell -> membrane (an edge pixel of the right cell,
    # simple), then (y, 3) membrane -> cell (joins only the left cell, simple).
    # No topological difference: warping error 0.
    truth = np.ones((5, 7), bool)
    truth[:, 3] = False
    pred = np.ones((5, 7), bool)
    pred[:, 4] = False
    assert pixel_error(pred, truth) == pytest.approx(10 / 35)
    assert warping_error(pred, truth) == 0.0
    np.testing.assert_array_equal(warp_truth(truth, pred), pred)


def test_split_leaves_one_pixel():
    # Truth: one 5x5 cell in a membrane frame (7x7).  The prediction cuts it with
    # a membrane column x = 3, rows 1-5.  The warp can dent the cell from both
    # ends of the cut, but the last cut pixel joins the two halves (T4 = 2): 1
    # pixel stays wrong.  Warping error 1/49; pixel error 5/49.
    truth = np.zeros((7, 7), bool)
    truth[1:6, 1:6] = True
    pred = truth.copy()
    pred[1:6, 3] = False
    assert warping_error(pred, truth) == pytest.approx(1 / 49)
    assert pixel_error(pred, truth) == pytest.approx(5 / 49)


def test_merge_keeps_the_whole_missing_membrane():
    # The reverse: the truth has two cells split by x = 3, the prediction one
    # cell.  Every pixel of the missing membrane is 4-adjacent to both cells
    # (T4 = 2), none can be flipped: all 5 stay wrong.  Warping error 5/49.
    pred = np.zeros((7, 7), bool)
    pred[1:6, 1:6] = True
    truth = pred.copy()
    truth[1:6, 3] = False
    assert warping_error(pred, truth) == pytest.approx(5 / 49)


def test_added_object_and_hole_stay():
    membrane = np.zeros((5, 5), bool)
    speck = membrane.copy()
    speck[2, 2] = True
    assert warping_error(speck, membrane) == pytest.approx(1 / 25)  # object added
    cell = np.ones((5, 5), bool)
    assert warping_error(~speck, cell) == pytest.approx(1 / 25)  # hole added


def _topology(mask: np.ndarray) -> tuple[int, int]:
    """(4-connected cell components, 8-connected membrane components incl. the outside)."""
    padded = np.pad(mask, 1)
    return (ndi.label(padded, ndi.generate_binary_structure(2, 1))[1],
            ndi.label(~padded, ndi.generate_binary_structure(2, 2))[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warp_keeps_the_truth_topology_whatever_the_prediction(seed):
    truth = voronoi_cells((48, 48), 9, seed)
    rng = np.random.default_rng(seed)
    pred = truth ^ (rng.random(truth.shape) < 0.15)  # 15% of pixels flipped at random
    warped = warp_truth(truth, pred)
    assert _topology(warped) == _topology(truth)
    # ...and no disagreeing pixel is left that could still be flipped.
    ys, xs = np.nonzero(warped != pred)
    assert not any(is_simple(warped, y, x) for y, x in zip(ys, xs))
    assert 0 < warping_error(pred, truth) < pixel_error(pred, truth)


def test_thicker_membranes_are_no_topological_error():
    truth = voronoi_cells((64, 64), 8, seed=5)
    thick = ndi.binary_erosion(truth, ndi.generate_binary_structure(2, 1), border_value=1)
    assert _topology(thick) == _topology(truth)  # precondition: no cell vanished or broke
    assert pixel_error(thick, truth) > 0.05
    assert warping_error(thick, truth) == 0.0


def test_removed_membrane_between_two_cells_is_a_merge():
    truth = voronoi_cells((64, 64), 8, seed=5)
    ids, _ = ndi.label(truth, ndi.generate_binary_structure(2, 1))
    # Open the membrane between cell 1 and one neighbour b: the membrane pixels
    # whose 4-neighbours' smallest cell id is 1 and largest is b.
    cross = ndi.generate_binary_structure(2, 1)
    grown = ndi.grey_dilation(ids, footprint=cross)
    shrunk = -ndi.grey_dilation(-np.where(ids > 0, ids, 10**6), footprint=cross)
    b = int(grown[(~truth) & (shrunk == 1) & (grown > 1)].min())
    between = (~truth) & (shrunk == 1) & (grown == b)
    assert between.sum() > 0
    merged = truth | between
    assert _topology(merged)[0] == _topology(truth)[0] - 1  # precondition: one merge
    assert warping_error(merged, truth) > 0
