"""Evaluation and report: hand-computed metrics through the OME-Zarr/JSON/CSV path, CLI, figures;
3D scores (objects taken whole across z)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from unet_pipe.errors import InputError
from unet_pipe.evaluate import evaluate, read_metrics
from unet_pipe.io import StagedImage, open_image
from unet_pipe.metrics import instances_from_binary, scores_3d, truth_instances_3d
from unet_pipe.postprocess import postprocess
from unet_pipe.report import pick_slices, read_training_log, write_report
from unet_pipe.synth import synthesize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _store(path, data, kind="image", extra=None, chunks=(1, 8, 8)):
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=chunks, kind=kind)
    staged.array[:] = data
    staged.commit(pyramid_levels=0, extra_attrs=extra or {})
    return path


@pytest.fixture
def tiny_case(tmp_path):
    """3 slices of 4x4; truth: one 4x3 cell beside a membrane column (x = 3).

    slice 0: perfect; slice 1: the cell split into two 4x... halves (see below);
    slice 2: no truth foreground at all.
    """
    truth = np.zeros((3, 4, 4), np.uint8)
    truth[:2, :, :3] = 255
    inst = np.zeros((3, 4, 4), np.uint32)
    inst[0, :, :3] = 7
    inst[1, :2, :3] = 1  # split: rows 0-1 (6 px) vs rows 2-3 (6 px)
    inst[1, 2:, :3] = 2
    inst[2, 0, 0] = 3  # a false cell where the truth has none
    prob = np.where(truth > 0, 230, 10).astype(np.uint8)
    prob[0, 0, 3] = 200  # one false cell pixel in slice 0: p = 200/255 > 0.5
    paths = {
        "truth": _store(tmp_path / "labels.ome.zarr", truth, "labels"),
        "instances": _store(tmp_path / "inst.ome.zarr", inst, "labels"),
        "probabilities": _store(tmp_path / "prob.ome.zarr", prob),
        "raw": _store(tmp_path / "raw.ome.zarr", (np.arange(48, dtype=np.uint8).reshape(3, 4, 4) * 5)),
    }
    return paths


def test_calibration_slices_are_tagged_and_summarised_apart(tmp_path, tiny_case):
    """Slices the decisions were chosen on are neither train nor val: tagged ``calibrate``; val wins an overlap."""
    decisions = {"method": "threshold", "threshold": 0.5, "cell_threshold": 0.5, "slices": {"tiny": [1, 3], "x": [0, 1]}}
    result = evaluate(tiny_case["instances"], tiny_case["truth"], tmp_path / "metrics.json", dataset="tiny",
                      train_slices=(0, 1), val_slices=(2, 3), decisions=decisions)  # fmt: skip
    assert [r["subset"] for r in result["per_slice"]] == ["train", "calibrate", "val"]
    calibrate = result["summary"]["calibrate"]
    assert calibrate["slices"] == 1 and calibrate["rand_error"] == pytest.approx(1 / 3) and "other" not in result["summary"]
    result = evaluate(tiny_case["instances"], tiny_case["truth"], tmp_path / "metrics.json", dataset="tiny",
                      train_slices=(0, 1), val_slices=(1, 3), decisions=decisions)  # fmt: skip
    assert [r["subset"] for r in result["per_slice"]] == ["train", "val", "val"]
    result = evaluate(tiny_case["instances"], tiny_case["truth"], tmp_path / "metrics.json", dataset="other",
                      train_slices=(0, 1), decisions=decisions)  # fmt: skip
    assert [r["subset"] for r in result["per_slice"]] == ["train", "other", "other"]  # another dataset's slices


def test_evaluate_hand_values(tmp_path, tiny_case):
    out = tmp_path / "m" / "metrics.json"
    result = evaluate(
        tiny_case["instances"], tiny_case["truth"], out,
        probabilities=tiny_case["probabilities"], raw=tiny_case["raw"],
        dataset="tiny", train_slices=(0, 1), val_slices=(1, 3),
    )
    rows = {r["z"]: r for r in result["per_slice"]}
    # slice 0: perfect instances; pixel error 1/16 (the p = 200/255 pixel).
    assert rows[0]["rand_error"] == 0.0 and rows[0]["pixel_error"] == pytest.approx(1 / 16)
    assert rows[0]["iou"] == 1.0 and rows[0]["subset"] == "train"
    # slice 1: 12 px cell split 6/6: sum p^2 = 1/2, sum t^2 = 1, sum s^2 = 1/2
    # -> V_rand = 0.5 / 0.75 = 2/3, error 1/3; VI split = 1 bit, merge 0.
    assert rows[1]["rand_error"] == pytest.approx(1 / 3)
    assert (rows[1]["v_rand_split"], rows[1]["v_rand_merge"]) == pytest.approx((0.5, 1.0))
    assert (rows[1]["vi_split"], rows[1]["vi_merge"]) == pytest.approx((1.0, 0.0))
    assert rows[1]["pixel_error"] == 0.0
    assert (rows[1]["truth_segments"], rows[1]["predicted_segments"]) == (1, 2)
    # slice 2: no truth foreground: Rand/VI undefined; IoU 0 (1 false pixel, nothing true).
    assert math.isnan(rows[2]["rand_error"]) and rows[2]["iou"] == 0.0
    s = result["summary"]
    assert s["all"]["rand_error"] == pytest.approx(1 / 6)  # mean over the 2 defined slices
    assert s["all"]["pixel_error"] == pytest.approx(1 / 48)
    assert s["all"]["iou"] == pytest.approx(24 / 25)  # pooled: 24 shared of 25 in the union
    assert s["val"]["rand_error"] == pytest.approx(1 / 3) and s["val"]["slices"] == 2
    assert s["train"]["rand_error"] == 0.0 and "other" not in s
    # ISBI protocol, from the probabilities (cells 230/255 = 0.902, membrane 10/255,
    # slice 0's extra pixel 200/255 = 0.784).  Slices 0 and 1, t = 0.0 ... 0.9: the
    # cell pixels form one segment; thinning floods the membrane column into it:
    # the truth's one 12-px cell is matched, V_rand = V_info = 1 (slice 1's split
    # is in the instances, not in the probabilities).  t = 1.0: no cell, 12
    # singletons: V_rand = 12 / (0.5 * 12 + 0.5 * 144) = 2/13; H(T) = 0, I = 0:
    # V_info = 0.  Best of each: 1 at t = 0.0 (ties go to the lowest t).
    for subset in ("all", "train", "val"):
        assert (s[subset]["v_rand"], s[subset]["v_rand_threshold"]) == (1.0, 0.0)
        assert (s[subset]["v_info"], s[subset]["v_info_threshold"]) == (1.0, 0.0)
    np.testing.assert_allclose(s["all"]["protocol_curve"]["v_rand"], [1.0] * 10 + [2 / 13])
    np.testing.assert_allclose(s["all"]["protocol_curve"]["v_info"], [1.0] * 10 + [0.0])
    assert s["all"]["protocol_curve"]["thresholds"][1] == 0.1
    # Warping error at 0.5: slice 0's extra cell pixel (0, 3) sits beside the cell
    # (4-adjacent to it only on the left, membrane elsewhere): simple, warped
    # away; slices 1 and 2 agree with the truth.  All 0, while the pixel error is not.
    assert [rows[z]["warping_error"] for z in range(3)] == [0.0, 0.0, 0.0]
    assert rows[0]["v_rand_at_decision"] == 1.0 and math.isnan(rows[2]["v_rand_at_decision"])
    # JSON on disk: strict (NaN -> null), the same numbers; CSV: one row per slice.
    on_disk = json.loads(out.read_text())
    assert on_disk["per_slice"][2]["rand_error"] is None
    assert on_disk["summary"]["val"]["rand_error"] == pytest.approx(1 / 3)
    assert on_disk["inputs"]["raw"] == str(tiny_case["raw"])
    assert on_disk["provenance"]["params"]["val_slices"] == [1, 3]
    with open(out.with_suffix(".csv"), newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["z"] for r in table] == ["0", "1", "2"]
    assert float(table[1]["rand_error"]) == pytest.approx(1 / 3) and table[2]["rand_error"] == ""
    assert table[0]["warping_error"] == "0" and table[2]["v_info_at_decision"] == ""
    assert on_disk["summary"]["val"]["v_rand_threshold"] == 0.0
    assert read_metrics(out)["dataset"] == "tiny"


def test_evaluate_slice_range_and_instance_truth(tmp_path, tiny_case):
    truth_ids = instances_from_binary(open_image(tiny_case["truth"])[:])
    truth = _store(tmp_path / "ids.ome.zarr", truth_ids.astype(np.uint32), "labels")
    result = evaluate(tiny_case["instances"], truth, tmp_path / "m.json", slices=(1, 2), truth_mode="instances")
    assert [r["z"] for r in result["per_slice"]] == [1]
    assert result["summary"]["all"]["rand_error"] == pytest.approx(1 / 3)
    assert math.isnan(result["summary"]["all"]["pixel_error"])  # no probabilities given
    assert math.isnan(result["summary"]["all"]["v_rand"]) and math.isnan(result["summary"]["all"]["warping_error"])


def test_evaluate_rejects_mismatched_inputs(tmp_path, tiny_case):
    other = _store(tmp_path / "small.ome.zarr", np.zeros((2, 4, 4), np.uint8), "labels")
    with pytest.raises(InputError, match="shape"):
        evaluate(tiny_case["instances"], other, tmp_path / "m.json")
    with pytest.raises(InputError, match="slice range"):
        evaluate(tiny_case["instances"], tiny_case["truth"], tmp_path / "m.json", slices=(2, 9))
    with pytest.raises(InputError, match="not found"):
        read_metrics(tmp_path / "absent.json")


def test_pick_slices_spreads_best_to_worst_preferring_val():
    rows = [{"z": z, "subset": "val" if z >= 2 else "train", "rand_error": e}
            for z, e in enumerate([0.0, 0.9, 0.3, 0.1, 0.2, None])]
    assert pick_slices(rows, 3) == [(3, "best"), (4, "median"), (2, "worst")]
    assert pick_slices(rows, 1) == [(3, "best")]
    assert pick_slices(rows, 0) == []
    assert pick_slices([{"z": 0, "rand_error": 0.5}], 5) == [(0, "best")]


def test_read_training_log_keeps_numeric_columns(tmp_path):
    log = tmp_path / "train.csv"
    log.write_text("step,loss,val_rand_error,note\n1,0.5,,start\n2,0.25,0.4,x\n")
    cols = read_training_log(log)
    assert sorted(cols) == ["loss", "step", "val_rand_error"]
    np.testing.assert_array_equal(cols["loss"], [0.5, 0.25])
    assert math.isnan(cols["val_rand_error"][0]) and cols["val_rand_error"][1] == 0.4


def test_report_writes_markdown_and_figures(tmp_path, tiny_case):
    metrics = tmp_path / "metrics.json"
    evaluate(tiny_case["instances"], tiny_case["truth"], metrics, probabilities=tiny_case["probabilities"],
             raw=tiny_case["raw"], dataset="tiny", val_slices=(1, 3))
    log = tmp_path / "train.csv"
    log.write_text("step,loss,lr,val_pixel_error,val_rand_error,seconds\n"
                   "1,0.7,0.01,,,0.5\n2,0.5,0.01,0.2,0.3,1.0\n3,0.4,0.005,,,1.5\n")
    out = write_report(tmp_path / "report" / "report.md", [metrics], training_logs=[log, tmp_path / "nope.csv"])
    text = out.read_text()
    assert "| tiny | val | 2 | 0.0000 | 0.3333 |" in text  # val: slices 1-2, Rand error of slice 1 only
    assert "| 0.000000 | 1.0000 (0.0) | 1.0000 (0.0) |" in text  # warping error, V_rand, V_info (best t)
    assert "![tiny: slices](report_figures/tiny_slices.png)" in text
    assert "| val_rand_error | 0.3 |" in text and "| seconds | 1.5 |" in text
    assert "The `val_*` columns monitor training" in text  # not the calibrated numbers
    assert "nope.csv not readable" in text
    figures = tmp_path / "report" / "report_figures"
    for name in ("tiny_slices.png", "training_0.png"):
        assert (figures / name).read_bytes()[:8] == PNG_MAGIC
    # The stores moved away: the report still comes out, with a note.
    metrics_data = json.loads(metrics.read_text())
    metrics_data["inputs"]["instances"] = str(tmp_path / "gone.ome.zarr")
    metrics.write_text(json.dumps(metrics_data))
    text = write_report(tmp_path / "r2.md", [metrics], figures=2).read_text()
    assert "Slice figures skipped" in text and "No training log given." in text


def test_cli_postprocess_evaluate_report(tmp_path, run_cli):
    stack = synthesize((2, 64, 64), seed=3)
    prob = _store(tmp_path / "prob.ome.zarr", stack.labels, extra={"probability_scale": 1 / 255}, chunks=(1, 64, 64))
    labels = _store(tmp_path / "labels.ome.zarr", stack.labels, "labels", chunks=(1, 64, 64))
    inst, metrics, report = tmp_path / "inst.ome.zarr", tmp_path / "metrics.json", tmp_path / "report.md"
    assert run_cli("postprocess", prob, inst, "--method", "watershed")[0] == 0
    code, _, err = run_cli("evaluate", "--prediction", inst, "--truth", labels, "--probabilities", prob,
                           "--out", metrics, "--foreground-value", "255", "--val", "1", "2")
    assert code == 0, err
    summary = json.loads(metrics.read_text())["summary"]
    assert summary["all"]["pixel_error"] == 0.0 and summary["all"]["iou"] == 1.0
    assert summary["all"]["rand_error"] < 0.01
    assert run_cli("report", "--metrics", metrics, "--out", report, "--figures", "1")[0] == 0
    assert f"## {tmp_path.name}" in report.read_text()  # default dataset name: the folder of INST
    # A user mistake is one line on stderr and exit status 2.
    code, _, err = run_cli("evaluate", "--prediction", tmp_path / "x.ome.zarr", "--truth", labels, "--out", metrics)
    assert code == 2 and err.count("\n") == 1 and "x.ome.zarr: not found" in err
    code, _, err = run_cli("postprocess", prob, tmp_path / "y.ome.zarr", "--threshold", "0.95")
    assert code == 2 and "seed-threshold" in err


def test_isbi_truth_scores_perfectly(tmp_path, isbi_dir):
    tifffile = pytest.importorskip("tifffile")
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:2]
    truth = _store(tmp_path / "labels.ome.zarr", labels, "labels", chunks=(1, 512, 512))
    inst = _store(tmp_path / "inst.ome.zarr", instances_from_binary(labels), "labels", chunks=(1, 512, 512))
    prob = _store(tmp_path / "prob.ome.zarr", labels, chunks=(1, 512, 512))  # uint8 0/255 = p 0/1
    s = evaluate(inst, truth, tmp_path / "m.json", probabilities=prob)["summary"]["all"]
    assert (s["rand_error"], s["pixel_error"], s["vi"], s["iou"]) == (0.0, 0.0, 0.0, 1.0)
    assert (s["v_rand"], s["v_info"], s["warping_error"]) == (1.0, 1.0, 0.0)


def test_error_panel_leaves_unlabelled_pixels_out() -> None:
    """Red and blue only where the scores count an error; unlabelled pixels flat light gray."""
    from unet_pipe.report import error_overlay

    gray = np.array([[0, 100, 200, 255]], np.uint8)
    pred = np.array([[True, False, True, True]])
    truth = np.array([[False, True, False, True]])
    known = np.array([[True, True, False, True]])
    rgb = error_overlay(gray, pred, truth, known)
    np.testing.assert_allclose(rgb[0, 0], (1.0, 0.1, 0.1))  # predicted cell on true membrane
    np.testing.assert_allclose(rgb[0, 1], (0.2, 0.4, 1.0))  # missed cell
    np.testing.assert_allclose(rgb[0, 2], (0.8, 0.8, 0.8))  # the same error, but unlabelled: not one
    np.testing.assert_allclose(rgb[0, 3], [0.6] * 3)  # right: the raw, dimmed (255 is its 99th percentile)
    np.testing.assert_allclose(error_overlay(gray, pred, truth)[0, 2], (1.0, 0.1, 0.1))  # dense truth: an error


def _isbi_figure_metrics(tmp_path, isbi_dir, unlabelled: int | None = None) -> dict:
    """Metrics inputs for a slice figure of ISBI slices 0-2: the truth, and a prediction 3 px off."""
    import tifffile

    raw = tifffile.imread(isbi_dir / "train-volume.tif")[:3]
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:3]
    pred = np.stack([instances_from_binary(np.roll(s == 255, 3, axis=1)) for s in labels]).astype(np.uint32)
    if unlabelled is not None:
        labels = labels.copy()
        labels[:, :, 256:] = unlabelled  # the right half not annotated
    big = (1, 256, 256)
    return {
        "inputs": {"raw": str(_store(tmp_path / "raw.ome.zarr", raw, chunks=big)),
                   "truth": str(_store(tmp_path / "truth.ome.zarr", labels, "labels", chunks=big)),
                   "instances": str(_store(tmp_path / "pred.ome.zarr", pred, "labels", chunks=big))},
        "params": {"truth_mode": "binary", "foreground_value": 255, "unlabelled_value": unlabelled},
        "per_slice": [{"z": z, "rand_error": 0.1 * z} for z in range(3)],
    }


def _light_gray_pixels(png) -> int:
    import matplotlib.image

    rgb = (matplotlib.image.imread(png)[..., :3] * 255).round()
    return int(np.all(np.abs(rgb - 204) <= 3, axis=-1).sum())


def test_slice_figure_of_512px_slices_is_small_and_paints_unlabelled_gray(tmp_path, isbi_dir) -> None:
    """Three ISBI rows (4 x 512^2 panels each) under 400 kB (2.1 MB before); sparse truth: gray, not errors."""
    from unet_pipe.report import slice_figure

    dense = tmp_path / "dense"
    dense.mkdir()
    slice_figure(_isbi_figure_metrics(dense, isbi_dir), [(0, "best"), (1, "median"), (2, "worst")], dense / "f.png")
    assert (dense / "f.png").stat().st_size < 400_000
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    slice_figure(_isbi_figure_metrics(sparse, isbi_dir, unlabelled=7), [(0, "best"), (1, "median"), (2, "worst")],
                 sparse / "f.png")
    assert (sparse / "f.png").stat().st_size < 400_000
    # The right half of each error panel (about 3 x 110 x 220 pixels on the page) is flat light gray.
    assert _light_gray_pixels(dense / "f.png") < 500
    assert _light_gray_pixels(sparse / "f.png") > 3 * 100 * 200


# -------------------------------------------------------------------- 3D scores
# 3D scores (objects taken whole across z): hand-made cases, skimage.metrics, evaluate and the report.


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


def _store_3d(path, data, chunks):
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
    t = _store_3d(tmp_path / "t.ome.zarr", truth, (2, 12, 12))
    p = _store_3d(tmp_path / "p.ome.zarr", prob, (2, 12, 12))
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
    t = _store_3d(tmp_path / "t.ome.zarr", truth, (2, 12, 12))
    p = _store_3d(tmp_path / "p.ome.zarr", prob, (2, 12, 12))
    r = _store_3d(tmp_path / "r.ome.zarr", (prob * 200).astype(np.uint8), (2, 12, 12))
    for mode in ("2d", "3d"):
        postprocess(p, tmp_path / f"i{mode}.ome.zarr", instances=mode, pyramid_levels=0)
        evaluate(tmp_path / f"i{mode}.ome.zarr", t, tmp_path / f"m{mode}.json", raw=r, dataset=f"stack{mode}")
    report = write_report(tmp_path / "report.md", [tmp_path / "m2d.json", tmp_path / "m3d.json"], figures=1)
    text = report.read_text()
    assert "![stack3d: 3D objects](report_figures/stack3d_3d.png)" in text and "stack2d_3d.png" not in text
    assert "(2 objects cut by the sections)" in text
    image = Image.open(tmp_path / "report_figures" / "stack3d_3d.png")
    assert image.size[0] > 100 and image.size[1] > 100
