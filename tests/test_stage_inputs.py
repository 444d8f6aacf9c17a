"""Every stage that takes a kind of input checks it as every other stage does (issue 20, class 4).

Checks per input kind and the stages that make them (``x``: made; the gaps closed here marked ``*``):

=========================================  =======  =====  =========  ========  ===========  =======
input kind: check                          weights  train  calibrate  evaluate  postprocess  summary
=========================================  =======  =====  =========  ========  ===========  =======
truth: integer dtype                       x        x      x          x         -            -
truth: unlabelled value not a class value  x        x      x*         x*        -            -
truth: an annotated pixel                  x*       x      x          x*        -            -
truth: binary values 0, cell, unlabelled   x        x*     x*         x*        -            -
probabilities: values in [0, 1]            -        -      x*         x*        x            x*
instances: integer dtype                   -        -      -          x*        -            -
=========================================  =======  =====  =========  ========  ===========  =======

(``view`` refuses non-integer label layers; ``report`` reads what ``evaluate`` checked.)
Stores unet-pipe published also say what they hold (``ngff.store_role``: raw, labels,
weights, probabilities, instances); each stage refuses one of ours that holds another
kind (``ngff.check_role``): predict, segment and export take raw, weights takes labels or
instances, train raw / labels or instances / weights, probability readers
probabilities, evaluate instances or labels.
A pooled score needs something to pool: the summary IoU of slices with no cell
pixel is undefined (null in the JSON, with a note), never 1.0.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from unet_pipe.errors import InputError
from unet_pipe.evaluate import SUMMARY_KEYS, evaluate, summarize
from unet_pipe.io import StagedImage, open_image


def _store(path: Path, data: np.ndarray, kind: str = "image") -> Path:
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=(1, 16, 16), kind=kind)
    staged.array[:] = data
    staged.commit(pyramid_levels=0)
    return path


def _one_line(code: int, err: str) -> str:
    assert code == 2 and err.count("\n") == 1 and err.startswith("unet-pipe: error: "), err
    return err


@pytest.fixture
def case(tmp_path) -> dict:
    """Binary truth (0 membrane, 255 cell; and with 7 unlabelled in half of slice 1), instances,
    probabilities, a weight map, and truth with every pixel unlabelled."""
    truth = np.zeros((2, 16, 16), np.uint8)
    truth[:, 2:7, 2:7] = 255
    truth[:, 9:14, 9:14] = 255
    instances = np.zeros((2, 16, 16), np.uint32)
    instances[:, 2:7, 2:7] = 1
    instances[:, 9:14, 9:14] = 2
    prob = (truth == 255).astype(np.float32) * 0.9 + 0.05
    weights = 1.0 + 9.0 * (truth == 0)  # a weight map: values up to 10
    sparse = truth.copy()
    sparse[1, :, 8:] = 7
    return {
        "truth": _store(tmp_path / "labels.ome.zarr", truth, "labels"),
        "instances": _store(tmp_path / "inst.ome.zarr", instances, "labels"),
        "prob": _store(tmp_path / "prob.ome.zarr", prob),
        "weights": _store(tmp_path / "weights.ome.zarr", weights.astype(np.float32)),
        "unlabelled": _store(tmp_path / "blank.ome.zarr", np.full((2, 16, 16), 7, np.uint8), "labels"),
        "sparse": _store(tmp_path / "sparse.ome.zarr", sparse, "labels"),
    }


def _stage_args(stage: str, case: dict, tmp_path: Path, *, truth: Path | None = None,
                prob: Path | None = None, instances: Path | None = None) -> list:
    truth = truth or case["truth"]
    if stage == "weights":
        return ["weights", truth, tmp_path / "out.ome.zarr"]
    if stage == "calibrate":
        return ["calibrate", "--probabilities", f"d={prob or case['prob']}", "--truth", f"d={truth}",
                "--slices", "d=0:2", "--out", tmp_path / "out.json"]
    return ["evaluate", "--prediction", instances or case["instances"], "--truth", truth,
            "--probabilities", prob or case["prob"], "--out", tmp_path / "out.json", "--foreground-value", 255]


@pytest.mark.parametrize("value", [0, 255])
@pytest.mark.parametrize("stage", ["weights", "calibrate", "evaluate"])
def test_unlabelled_value_that_is_a_class_is_refused_by_every_stage(case, tmp_path, run_cli, stage, value):
    err = _one_line(*run_cli("-q", *_stage_args(stage, case, tmp_path), "--unlabelled-value", value)[::2])
    assert f"{value} is a class value: it must differ from" in err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.ome.zarr").exists()


@pytest.mark.parametrize("stage", ["weights", "calibrate", "evaluate"])
def test_truth_without_an_annotated_pixel_is_refused_by_every_stage(case, tmp_path, run_cli, stage):
    args = _stage_args(stage, case, tmp_path, truth=case["unlabelled"])
    err = _one_line(*run_cli("-q", *args, "--unlabelled-value", 7)[::2])
    assert "blank.ome.zarr" in err or stage == "calibrate", err
    assert "no annotated pixel" in err, err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.ome.zarr").exists()
    # Truth with some pixels annotated is accepted (the check is not a blanket refusal).
    if stage != "calibrate":
        code, _, err = run_cli("-q", *_stage_args(stage, case, tmp_path, truth=case["sparse"]), "--unlabelled-value", 7)
        assert code == 0, err


@pytest.mark.parametrize("stage", ["weights", "calibrate", "evaluate", "train"])
def test_binary_truth_with_a_value_of_neither_class_is_refused_by_every_stage(case, tmp_path, run_cli, stage):
    """Truth holding 0, 255 and 128 (e.g. an annotation tool's 'unsure'): 128 would silently count as membrane."""
    import yaml

    from unet_pipe.config import validate_config

    truth = np.asarray(open_image(case["truth"])[:])
    truth[1, 0, 0] = 128
    odd = _store(tmp_path / "odd.ome.zarr", truth, "labels")
    if stage == "train":
        config = validate_config({
            "datasets": {"s": {"synthetic": {"shape": [2, 16, 16]}}},
            "model": {"depth": 2, "base_channels": 4},
            "train": {"datasets": {"s": {"train": [0, 2]}}, "tile": 44, "steps": 1, "val_every": 1},
        })
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        raw = _store(tmp_path / "raw.ome.zarr", np.arange(512, dtype=np.uint16).reshape(2, 16, 16).astype(np.uint8))
        args = ["train", tmp_path / "c.yaml", "--raw", f"s={raw}", "--labels", f"s={odd}", "--out", tmp_path / "out.pt",
                "--threads", "1"]
    else:
        args = _stage_args(stage, case, tmp_path, truth=odd)
    err = _one_line(*run_cli("-q", *args)[::2])
    assert ("odd.ome.zarr: binary labels must hold only 0 (membrane/background) and 255 (cell), "
            "found values 0, 128, 255") in err, err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]


@pytest.mark.parametrize("stage", ["calibrate", "evaluate", "postprocess"])
def test_weight_map_given_as_probabilities_is_refused_by_every_stage(case, tmp_path, run_cli, stage):
    if stage == "postprocess":
        args = ["postprocess", case["weights"], tmp_path / "out.ome.zarr"]
    else:
        args = _stage_args(stage, case, tmp_path, prob=case["weights"])
    err = _one_line(*run_cli("-q", *args)[::2])
    assert "weights.ome.zarr: values must be probabilities in [0, 1]" in err and "found 1 .. 10" in err, err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.ome.zarr").exists()


def test_summary_figure_refuses_a_weight_map_as_probabilities(case, tmp_path):
    from unet_pipe.summary import segmentation_figure

    summary = {"inputs": {"raw": str(case["instances"]), "probabilities": str(case["weights"]),
                          "instances": str(case["instances"])}, "voxel_size_um": [1.0, 1.0, 1.0]}
    with pytest.raises(InputError, match=r"weights.ome.zarr: values must be probabilities in \[0, 1\].* in slice 0"):
        segmentation_figure(summary, [0], tmp_path / "fig.png")


def test_probabilities_given_as_instances_are_refused_by_evaluate(case, tmp_path, run_cli):
    err = _one_line(*run_cli("-q", *_stage_args("evaluate", case, tmp_path, instances=case["prob"]))[::2])
    assert "prob.ome.zarr: instances must be integer labels (0 = membrane), found dtype float32" in err


def test_pooled_iou_of_slices_without_a_cell_is_undefined_not_one():
    rows = [{**{k: math.nan for k in SUMMARY_KEYS}, "_union": 0, "_intersection": 0, "_thinned": None}
            for _ in range(3)]
    out = summarize(rows)
    assert math.isnan(out["iou"])
    assert out["notes"] == {"iou": "undefined: no cell pixel in the truth or the prediction of these slices"}
    rows[1].update(_union=4, _intersection=3)
    out = summarize(rows)
    assert out["iou"] == 0.75 and "notes" not in out  # the empty slices add nothing to the pool


def test_evaluate_of_empty_truth_and_prediction_reports_no_iou(tmp_path):
    empty = np.zeros((2, 16, 16), np.uint8)
    truth = _store(tmp_path / "labels.ome.zarr", empty, "labels")
    instances = _store(tmp_path / "inst.ome.zarr", empty.astype(np.uint32), "labels")
    result = evaluate(instances, truth, tmp_path / "m.json")
    assert math.isnan(result["summary"]["all"]["iou"])
    written = json.loads((tmp_path / "m.json").read_text())["summary"]["all"]
    assert written["iou"] is None and written["notes"]["iou"].startswith("undefined: no cell pixel")


@pytest.fixture
def published(tmp_path, run_cli) -> dict:
    """Stores as the pipeline publishes them: ingested raw and labels, weights, probabilities, instances."""
    import tifffile

    raw = (np.arange(2 * 32 * 32).reshape(2, 32, 32) % 251).astype(np.uint8)
    labels = np.where((np.arange(32)[None, :, None] // 8 + np.arange(32)[None, None, :] // 8) % 2, 255, 0)
    labels = np.broadcast_to(labels, (2, 32, 32)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    out = {k: tmp_path / f"{k}.ome.zarr" for k in ("raw", "labels", "weights", "instances")}
    for argv in (["ingest", tmp_path / "raw.tif", out["raw"]],
                 ["ingest", tmp_path / "labels.tif", out["labels"], "--labels"],
                 ["weights", out["labels"], out["weights"]]):
        code, _, err = run_cli("-q", *argv, "--pyramid-levels", "0")
        assert code == 0, err
    prob = _store(tmp_path / "p.ome.zarr", (labels / 255 * 0.8 + 0.1).astype(np.float32))
    attrs = json.loads((prob / ".zattrs").read_text())
    attrs["unet_pipe"]["probability_scale"] = 1.0  # as predict records it
    (prob / ".zattrs").write_text(json.dumps(attrs))
    out["probabilities"] = prob
    code, _, err = run_cli("-q", "postprocess", prob, out["instances"], "--pyramid-levels", "0")
    assert code == 0, err
    return out


def test_published_stores_say_what_they_hold(published):
    from unet_pipe.ngff import image_metadata as meta_of
    from unet_pipe.ngff import store_role

    assert {k: store_role(meta_of(p).attrs) for k, p in published.items()} == {
        "raw": "raw", "labels": "labels", "weights": "weights", "probabilities": "probabilities",
        "instances": "instances"}


@pytest.mark.parametrize(("stage", "given", "slot"), [
    ("predict", "labels", "raw"), ("predict", "weights", "raw"), ("predict", "probabilities", "raw"),
    ("weights", "raw", "labels"), ("weights", "weights", "labels"),
    ("postprocess", "raw", "probabilities"), ("calibrate", "instances", "probabilities"),
    ("evaluate", "weights", "prediction"), ("evaluate", "raw", "truth"),
    ("train", "labels", "raw"), ("train", "raw", "labels"), ("train", "labels", "weights"),
    ("segment", "labels", "stack"), ("segment", "instances", "stack"),
])
def test_a_store_of_another_kind_is_refused_by_every_stage(published, tmp_path, run_cli, stage, given, slot):
    import yaml

    from unet_pipe.config import validate_config
    from unet_pipe.model import UNet, save_checkpoint

    p = dict(published)
    wrong = p[given]
    if stage == "predict":
        save_checkpoint(tmp_path / "m.pt", UNet(depth=2, base_channels=4))
        args = ["predict", tmp_path / "m.pt", wrong, tmp_path / "out.ome.zarr"]
    elif stage == "segment":
        save_checkpoint(tmp_path / "m.pt", UNet(depth=2, base_channels=4))
        args = ["segment", tmp_path / "m.pt", wrong, "--out", tmp_path / "out"]
    elif stage == "weights":
        args = ["weights", wrong, tmp_path / "out.ome.zarr"]
    elif stage == "postprocess":
        args = ["postprocess", wrong, tmp_path / "out.ome.zarr"]
    elif stage == "calibrate":
        args = ["calibrate", "--probabilities", f"d={wrong}", "--truth", f"d={p['labels']}", "--slices", "d=0:2",
                "--out", tmp_path / "out.json"]
    elif stage == "evaluate":
        p[slot if slot == "truth" else "instances"] = wrong
        args = ["evaluate", "--prediction", p["instances"], "--truth", p["truth"] if "truth" in p else p["labels"],
                "--out", tmp_path / "out.json"]
    else:
        config = validate_config({
            "datasets": {"s": {"synthetic": {"shape": [2, 32, 32]}}},
            "model": {"depth": 2, "base_channels": 4},
            "train": {"datasets": {"s": {"train": [0, 2]}}, "tile": 44, "steps": 1, "val_every": 1},
        })
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        p[slot] = wrong
        args = ["train", tmp_path / "c.yaml", "--raw", f"s={p['raw']}", "--labels", f"s={p['labels']}",
                "--weights", f"s={p['weights']}", "--out", tmp_path / "out.pt", "--threads", "1"]
    err = _one_line(*run_cli("-q", *args)[::2])
    assert f"{wrong.name}: holds {given} (written by `unet-pipe " in err and "takes" in err, err
    assert not [q.name for q in tmp_path.iterdir() if q.name.startswith("out")]
