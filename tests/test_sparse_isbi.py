"""ISBI 2012 with the right half of every training slice unlabelled, end to end (tiny net, few steps)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile

from unet_pipe.config import validate_config
from unet_pipe.ingest import ingest_tiff
from unet_pipe.io import open_image
from unet_pipe.postprocess import postprocess
from unet_pipe.predict import predict
from unet_pipe.train import train

U = 128  # unlabelled: neither 0 (membrane) nor 255 (cell)
SLICES = 6  # 0-3 train, 4-5 validation


@pytest.mark.slow
def test_isbi_half_unlabelled_trains_and_evaluates(isbi_dir, tmp_path, run_cli):
    raw = tifffile.imread(isbi_dir / "train-volume.tif")[:SLICES]
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:SLICES].copy()
    labels[:, :, 256:] = U
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    stores = {k: tmp_path / f"{k}.ome.zarr" for k in ("raw", "labels", "weights", "prob", "inst")}
    ingest_tiff(tmp_path / "raw.tif", stores["raw"], chunks=(1, 256, 256), pyramid_levels=0)
    ingest_tiff(tmp_path / "labels.tif", stores["labels"], chunks=(1, 256, 256), pyramid_levels=0,
                kind="labels", like=stores["raw"])
    code, _, err = run_cli("weights", stores["labels"], stores["weights"], "--unlabelled-value", U,
                           "--pyramid-levels", 0)
    assert code == 0, err
    weights = open_image(stores["weights"])[:]
    assert np.all(weights[:, :, 256:] == 0) and np.all(weights[:, :, :256] > 0)

    config = validate_config({
        "datasets": {"isbi": {"raw": str(tmp_path / "raw.tif"), "labels": str(tmp_path / "labels.tif")}},
        "weights": {"unlabelled_value": U},
        "model": {"depth": 2, "base_channels": 8},
        "train": {"datasets": {"isbi": {"train": [0, 4], "val": [4, 6]}}, "tile": 124, "steps": 8,
                  "batch_size": 2, "val_every": 8, "checkpoint_every": 8},
    })
    store_paths = {"isbi": {"raw": stores["raw"], "labels": stores["labels"], "weights": stores["weights"]}}
    result = train(config, store_paths, tmp_path / "model.pt", tmp_path / "train.csv", device="cpu", threads=1)
    assert math.isfinite(result["loss"])
    log = (tmp_path / "train.csv").read_text().splitlines()
    assert len(log) == 9 and log[-1].split(",")[3] not in ("", "nan")  # validation ran on the sparse val slices
    predict(tmp_path / "model.pt", stores["raw"], stores["prob"], device="cpu", threads=1, precision="float32",
            pyramid_levels=0)
    code, _, err = run_cli("calibrate", "--probabilities", f"isbi={stores['prob']}", "--truth",
                           f"isbi={stores['labels']}", "--slices", "isbi=4:6", "--out", tmp_path / "decisions.json",
                           "--methods", "threshold", "--unlabelled-value", U)
    assert code == 0, err
    postprocess(stores["prob"], stores["inst"], pyramid_levels=0)
    code, _, err = run_cli("evaluate", "--prediction", stores["inst"], "--truth", stores["labels"],
                           "--probabilities", stores["prob"], "--out", tmp_path / "metrics.json",
                           "--foreground-value", 255, "--unlabelled-value", U, "--val", 4, 6,
                           "--decisions", tmp_path / "decisions.json")
    assert code == 0, err
    import json

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = metrics["per_slice"]
    assert len(rows) == SLICES and all(r["warping_error"] is None for r in rows)  # half unlabelled: undefined
    val = metrics["summary"]["val"]
    assert 0 <= val["pixel_error"] < 1 and 0 <= val["rand_error"] <= 1 and 0 < val["iou"] <= 1
    # The pixel error is the one of the annotated left halves alone.
    prob = open_image(stores["prob"])[4:6]
    t = json.loads((tmp_path / "decisions.json").read_text())["cell_threshold"]
    truth = labels[4:6, :, :256] == 255
    p = prob[:, :, :256].astype(np.float64)
    p = p / 255 if prob.dtype == np.uint8 else p
    expected = np.count_nonzero((p > t) != truth) / truth.size
    assert val["pixel_error"] == pytest.approx(expected, abs=1e-12)
