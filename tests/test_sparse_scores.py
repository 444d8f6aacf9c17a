"""Sparse truth in evaluation and calibration: unlabelled pixels leave every score."""
from __future__ import annotations

import math

import numpy as np
import pytest

from unet_pipe.calibrate import calibrate, load_slices, pixel_errors
from unet_pipe.errors import InputError
from unet_pipe.evaluate import evaluate
from unet_pipe.io import StagedImage

U = 7


def _store(path, data, kind="image"):
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=(1, 4, 4), kind=kind)
    staged.array[:] = data
    staged.commit(pyramid_levels=0)
    return path


@pytest.fixture
def sparse_case(tmp_path):
    """Slice 0: cells in columns 0-1, membrane column 2, column 3 unlabelled; slice 1 unlabelled.

    The prediction: the true cell, one false cell pixel at (0, 2) on the membrane, and
    a second cell filling the unlabelled column 3.
    """
    truth = np.full((2, 4, 4), U, np.uint8)
    truth[0, :, :2] = 255
    truth[0, :, 2] = 0
    inst = np.zeros((2, 4, 4), np.uint32)
    inst[:, :, :2] = 1
    inst[:, 0, 2] = 1
    inst[:, :, 3] = 2
    prob = np.where(inst > 0, 230, 10).astype(np.uint8)
    return {
        "truth": _store(tmp_path / "truth.ome.zarr", truth, "labels"),
        "instances": _store(tmp_path / "inst.ome.zarr", inst, "labels"),
        "probabilities": _store(tmp_path / "prob.ome.zarr", prob),
    }


def test_evaluate_leaves_unlabelled_pixels_out(tmp_path, sparse_case):
    kwargs = dict(probabilities=sparse_case["probabilities"], foreground_value=255)
    result = evaluate(sparse_case["instances"], sparse_case["truth"], tmp_path / "m.json", unlabelled_value=U, **kwargs)
    r0, r1 = result["per_slice"]
    # 12 annotated pixels; only (0, 2) is wrong.  IoU over annotated pixels: 8 shared of 9.
    assert r0["pixel_error"] == pytest.approx(1 / 12) and r0["iou"] == pytest.approx(8 / 9)
    # The annotated cell (8 px) lies in one predicted segment: no Rand error, V_rand 1.
    assert r0["rand_error"] == 0.0 and r0["truth_segments"] == 1 and r0["v_rand_at_decision"] == 1.0
    assert math.isnan(r0["warping_error"])  # topology unknown beside an unlabelled column
    # Slice 1 holds no annotated pixel: nothing is defined.
    assert all(math.isnan(r1[k]) for k in ("pixel_error", "iou", "rand_error", "warping_error"))
    s = result["summary"]["all"]
    assert s["pixel_error"] == pytest.approx(1 / 12) and s["iou"] == pytest.approx(8 / 9)
    assert result["params"]["unlabelled_value"] == U
    # Without the unlabelled value, 7 is neither class: refused, as `weights` refuses it (it was scored as
    # membrane: 4 more wrong pixels in slice 0, and slice 1 all membrane).
    with pytest.raises(InputError, match=r"truth.ome.zarr: binary labels must hold only 0 .* and 255 \(cell\), "
                       r"found values 0, 7, 255"):
        evaluate(sparse_case["instances"], sparse_case["truth"], tmp_path / "d.json", **kwargs)


def test_calibration_pixel_error_counts_annotated_pixels_only(sparse_case):
    prob = [np.array([[0.9, 0.2, 0.7]])]
    cells = [np.array([[True, False, False]])]
    assert pixel_errors(prob, cells, [0.5]).tolist() == pytest.approx([1 / 3])
    assert pixel_errors(prob, cells, [0.5], [np.array([[True, True, False]])]).tolist() == [0.0]
    p, c, t, k = load_slices(sparse_case["probabilities"], sparse_case["truth"], (0, 2), "binary", 255, U)
    np.testing.assert_array_equal(k[0], np.tile([True, True, True, False], (4, 1)))
    assert not k[1].any() and not c[1].any() and not t[1].any()
    np.testing.assert_array_equal(c[0], np.tile([True, True, False, False], (4, 1)))


def test_calibrate_on_sparse_truth(tmp_path, sparse_case):
    spec = {"d": {"probabilities": sparse_case["probabilities"], "truth": sparse_case["truth"], "slices": [0, 2]}}
    out = calibrate(spec, tmp_path / "decisions.json", foreground_value=255, methods=["threshold"], unlabelled_value=U)
    # Every threshold below 230/255 gives 1 wrong pixel of 12 annotated ones; ties go to 0.5.
    assert out["cell_threshold"] == 0.5 and out["cell_pixel_error"] == pytest.approx(1 / 12)
    assert out["decisions"]["method"] == "threshold" and out["scores"]["rand_error"] == 0.0
    assert out["scores"]["pixel_error"] == pytest.approx(1 / 12)
