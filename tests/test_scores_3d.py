"""3D scores (objects taken whole across z): hand-made cases, skimage.metrics, evaluate and the report."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from unet_pipe.evaluate import evaluate
from unet_pipe.io import StagedImage
from unet_pipe.metrics import scores_3d, truth_instances_3d
from unet_pipe.postprocess import postprocess
from unet_pipe.report import write_report


def test_identical_volumes_score_zero():
    truth = np.zeros((2, 3, 3), np.uint32)
    truth[:, :2, :2] = 7
    truth[:, 2, 2] = 9
    s = scores_3d(truth * 3, truth)  # other ids, same objects
    assert s == {"are": 0.0, "vi_split": 0.0, "vi_merge": 0.0, "vi": 0.0}


def test_an_object_split_at_every_slice():
    truth = np.ones((2, 2, 2), np.uint32)  # one object of 8 voxels
    pred = np.array([1, 2], np.uint32)[:, None, None] * np.ones((2, 2, 2), np.uint32)  # 2D ids: 4 + 4
    s = scores_3d(pred, truth)
    assert s["vi_split"] == pytest.approx(1.0) and s["vi_merge"] == 0.0  # one bit: which half
    # pairs: sum n_ij(n_ij - 1) = 24, truth 56, pred 24 -> 1 - 24 / (0.5 * 56 + 0.5 * 24)
    assert s["are"] == pytest.approx(0.4)


def test_two_objects_merged():
    truth = np.zeros((2, 1, 3), np.uint32)
    truth[:, 0, 0] = 1
    truth[:, 0, 2] = 2
    pred = (truth > 0).astype(np.uint32) * 5
    s = scores_3d(pred, truth)
    assert s["vi_merge"] == pytest.approx(1.0) and s["vi_split"] == 0.0
    assert s["are"] == pytest.approx(1 - 4 / (0.5 * 12 + 0.5 * 4))  # pairs 4, pred 12, truth 4


def test_background_inside_truth_counts_as_singletons():
    truth = np.ones((1, 1, 4), np.uint32)
    pred = np.array([[[3, 3, 0, 0]]], np.uint32)
    s = scores_3d(pred, truth)
    relabelled = np.array([[[3, 3, 4, 5]]])
    assert s["vi_split"] == pytest.approx(variation_of_information(truth, relabelled, ignore_labels=(0,))[0])
    assert s["vi_split"] == pytest.approx(1.5)  # H of sizes (2, 1, 1) / 4
    assert s["are"] == pytest.approx(adapted_rand_error(truth, relabelled)[0])


def test_random_volumes_agree_with_skimage():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, (4, 9, 9)).astype(np.uint32)
    pred = rng.integers(1, 8, (4, 9, 9)).astype(np.uint32)  # no background: skimage's own definition
    s = scores_3d(pred, truth)
    are, _, _ = adapted_rand_error(truth, pred, ignore_labels=(0,))
    split, merge = variation_of_information(truth, pred, ignore_labels=(0,))
    assert (s["are"], s["vi_split"], s["vi_merge"]) == pytest.approx((are, split, merge), abs=1e-12)


def test_truth_objects_are_6_connected():
    cells = np.zeros((2, 3, 3), bool)
    cells[0, 0, 0] = cells[1, 1, 1] = True  # corner contact only: two objects
    cells[0, 2, 2] = cells[1, 2, 2] = True  # face contact: one (corner/edge contact to (1, 1, 1))
    labels = truth_instances_3d(cells)
    assert len(np.unique(labels[labels > 0])) == 3 and labels[0, 2, 2] == labels[1, 2, 2]


def _store(path, data, chunks):
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=chunks, kind="image")
    staged.array[:] = data
    staged.commit(pyramid_levels=0)
    return path


def test_evaluate_reports_3d_scores_per_range_and_the_report_shows_them(tmp_path):
    # Two tubes along z (binary truth 255 = cell); prediction: p from the truth.
    truth = np.zeros((6, 12, 12), np.uint8)
    truth[:, 2:5, 2:5] = 255
    truth[:, 7:10, 6:10] = 255
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    t = _store(tmp_path / "t.ome.zarr", truth, (2, 12, 12))
    p = _store(tmp_path / "p.ome.zarr", prob, (2, 12, 12))
    for mode in ("2d", "3d"):
        postprocess(p, tmp_path / f"i{mode}.ome.zarr", instances=mode, pyramid_levels=0)
    r3 = evaluate(tmp_path / "i3d.ome.zarr", t, tmp_path / "m3.json", train_slices=(0, 4), val_slices=(4, 6))
    r2 = evaluate(tmp_path / "i2d.ome.zarr", t, tmp_path / "m2.json", train_slices=(0, 4), val_slices=(4, 6),
                  dataset="stack")
    s3, s2 = r3["summary"]["all"]["scores_3d"], r2["summary"]["all"]["scores_3d"]
    assert s3 == {"z": [0, 6], "are": 0.0, "vi_split": 0.0, "vi_merge": 0.0, "vi": 0.0,
                  "truth_objects": 2, "predicted_objects": 2}
    assert s2["predicted_objects"] == 12 and s2["vi_split"] == pytest.approx(np.log2(6))  # 6 slices per object
    assert r2["summary"]["val"]["scores_3d"]["z"] == [4, 6]
    assert r2["summary"]["val"]["scores_3d"]["vi_split"] == pytest.approx(1.0)
    assert r2["summary"]["all"]["rand_error"] == r3["summary"]["all"]["rand_error"] == 0.0  # per-slice unchanged
    report = write_report(tmp_path / "report.md", [tmp_path / "m2.json"], figures=0).read_text()
    assert "### 3D objects" in report and "| stack | val | 4-5 | 2 | 4 | 0.3555 | 1.000 | 0.000 |" in report


def test_report_shows_3d_objects_from_the_side(tmp_path):
    """With 3D instances the report adds the xz/yz sections of the objects (one colour per 3D object);
    2D instances get none."""
    from PIL import Image

    truth = np.zeros((6, 12, 12), np.uint8)
    truth[:, 2:7, 2:7] = 255  # cut by both central sections (y = 6, x = 6)
    truth[:, 4:10, 8:11] = 255  # cut by the xz section only
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    t = _store(tmp_path / "t.ome.zarr", truth, (2, 12, 12))
    p = _store(tmp_path / "p.ome.zarr", prob, (2, 12, 12))
    r = _store(tmp_path / "r.ome.zarr", (prob * 200).astype(np.uint8), (2, 12, 12))
    for mode in ("2d", "3d"):
        postprocess(p, tmp_path / f"i{mode}.ome.zarr", instances=mode, pyramid_levels=0)
        evaluate(tmp_path / f"i{mode}.ome.zarr", t, tmp_path / f"m{mode}.json", raw=r, dataset=f"stack{mode}")
    report = write_report(tmp_path / "report.md", [tmp_path / "m2d.json", tmp_path / "m3d.json"], figures=1)
    text = report.read_text()
    assert "![stack3d: 3D objects](report_figures/stack3d_3d.png)" in text and "stack2d_3d.png" not in text
    assert "(2 objects cut by the sections)" in text
    image = Image.open(tmp_path / "report_figures" / "stack3d_3d.png")
    assert image.size[0] > 100 and image.size[1] > 100
