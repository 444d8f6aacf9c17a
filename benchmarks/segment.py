#!/usr/bin/env python
"""Benchmark: ``unet-pipe segment`` end to end against its predict stage alone.

``segment`` (``unet_pipe.segment.segment``) takes a TIFF stack to instances:
ingest, predict, postprocess, view, summary and report.  The prediction is the
work; everything else should cost little beside it.  Figures, measured in this
one run (after a warm-up; rounds of [predict alone, segment]; the median over
rounds):

* ``segment_vs_predict``: wall time of ``segment()`` from the TIFF (a fresh
  output folder each round) divided by the wall time of ``predict()`` alone on
  the same stack, already ingested, with the same model, precision, threads
  and automatic plan.  Target: <= 1.3 on the CPU.
* ``stages_s``: seconds per stage of the last ``segment()`` round, as its
  summary records them (ingest, predict, postprocess, view, summary) and the
  report.

Model: the ISBI CPU preset's network (``config/isbi2012-cpu.yaml``: depth 4,
16 base channels) trained here for ``--train-steps`` steps (default 300, about
10 s; ``--quick``: 30) on ISBI training slices 0-19, with the default decisions
(threshold 0.5, connected components), or ``--model`` (a trained model.pt).
Not random weights: predict's speed does not depend on the weights, but the
instance stage's does (random weights gave 193 k speckle objects in 30 slices,
a trained net a few hundred cells per slice, as real data does).  Input: the ISBI 2012 test stack (30 slices of 512 x 512;
``--quick``: its first 3 slices).  The JSON records the CPU model
(``unet_pipe.provenance``), the threads and the precision used.

Usage: ``python benchmarks/segment.py [--quick] [--out DIR] [--threads N] [--precision P] [--model PT |
--train-steps N | --random-weights]``.
The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT.parent / "shared" / "data" / "isbi2012" / "test-volume.tif"
ISBI_VOXEL = (0.05, 0.004, 0.004)  # µm; the ISBI 2012 stack's 4 x 4 x 50 nm


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def input_stack(out: Path, slices: int | None) -> tuple[Path, str]:
    """The ISBI test stack (or its first ``slices``) as a TIFF with its voxel size; synthetic without it."""
    import tifffile

    if ISBI.exists():
        with tifffile.TiffFile(ISBI) as tif:
            pages = range(len(tif.pages)) if slices is None else range(slices)
            data, source = np.stack([tif.pages[z].asarray() for z in pages]), "ISBI 2012 test-volume"
    else:
        from unet_pipe.synth import synthesize

        data, source = synthesize((slices or 30, 512, 512), seed=0).raw, "synthetic (ISBI data not found)"
    path = out / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / ISBI_VOXEL[2], 1 / ISBI_VOXEL[1]),
                     metadata={"spacing": ISBI_VOXEL[0], "unit": "um", "axes": "ZYX"})
    return path, f"{source} {list(data.shape)}"


def trained_model(out: Path, steps: int, threads: int) -> Path:
    """The CPU preset's net trained ``steps`` steps on ISBI slices 0-19 (synthetic data without ISBI),
    bundled with the default decisions."""
    import tifffile

    from unet_pipe.config import validate_config
    from unet_pipe.ingest import ingest_tiff
    from unet_pipe.model_bundle import bundle_model
    from unet_pipe.train import train
    from unet_pipe.weights import WeightParams, compute_weight_store

    train_tif = ISBI.with_name("train-volume.tif")
    if train_tif.exists():
        raw = tifffile.imread(train_tif)[:20]
        labels = tifffile.imread(ISBI.with_name("train-labels.tif"))[:20]
    else:
        from unet_pipe.synth import synthesize

        stack = synthesize((20, 512, 512), seed=1)
        raw, labels = stack.raw, stack.labels
    work = out / "training"
    work.mkdir()
    for name, data in (("raw", raw), ("labels", labels)):
        tifffile.imwrite(work / f"{name}.tif", data)
    stores = {"raw": ingest_tiff(work / "raw.tif", work / "raw.ome.zarr", voxel_size=ISBI_VOXEL),
              "labels": ingest_tiff(work / "labels.tif", work / "labels.ome.zarr", kind="labels",
                                    like=work / "raw.ome.zarr")}
    preset = yaml.safe_load((ROOT / "config" / "isbi2012-cpu.yaml").read_text())
    compute_weight_store(stores["labels"], work / "weights.ome.zarr", WeightParams.from_config(preset["weights"]))
    stores["weights"] = work / "weights.ome.zarr"
    config = validate_config({
        "results": str(work), "seed": 0,
        "datasets": {"isbi": {"raw": str(work / "raw.tif"), "labels": str(work / "labels.tif")}},
        "weights": preset["weights"], "model": preset["model"],
        "train": {**preset["train"], "datasets": {"isbi": {"train": [0, 20]}}, "steps": steps,
                  "val_every": steps, "checkpoint_every": steps},
    })
    train(config, {"isbi": stores}, work / "checkpoint.pt", threads=threads)
    bundle_model(work / "checkpoint.pt", out / "model.pt", voxel_size=ISBI_VOXEL)
    return out / "model.pt"


def preset_model(out: Path) -> Path:
    """The CPU preset's architecture, random weights, percentile normalisation, default decisions."""
    from unet_pipe.model import UNet, save_checkpoint

    arch = yaml.safe_load((ROOT / "config" / "isbi2012-cpu.yaml").read_text())["model"]
    torch.manual_seed(0)
    net = UNet(**{k: arch[k] for k in ("depth", "base_channels", "dims", "dropout", "n_classes") if k in arch})
    extra = {"input_normalization": {"rule": "percentile", "percentiles": [1.0, 99.0], "volumes": {}},
             "voxel_size": list(ISBI_VOXEL),
             "decisions": {"method": "threshold", "threshold": 0.5, "seed_threshold": 0.9, "seed_prominence": 5.0,
                           "min_size": 0, "cell_threshold": 0.5, "source": "benchmark"}}
    return save_checkpoint(out / "model.pt", net, None, extra=extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 slices, one round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "segment")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--model", type=Path, help="a trained model.pt (default: the CPU preset's net, trained here)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps of that training (default 300; --quick 30)")
    parser.add_argument("--random-weights", action="store_true",
                        help="the preset's net with random weights instead (speckle: ~6400 objects per slice)")
    args = parser.parse_args()
    from unet_pipe.ingest import ingest_tiff
    from unet_pipe.precision import precision_record
    from unet_pipe.predict import predict, tune_allocator
    from unet_pipe.segment import segment

    tune_allocator()  # as `unet-pipe segment` and `predict` do
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    stack, source = input_stack(args.out, 3 if args.quick else None)
    steps = args.train_steps or (30 if args.quick else 300)
    if args.model is not None:
        model, described = args.model, str(args.model)
    elif args.random_weights:
        model, described = preset_model(args.out), "isbi2012-cpu preset net (random weights)"
    else:
        log(f"training the preset's net for {steps} steps ...")
        model, described = trained_model(args.out, steps, args.threads), f"isbi2012-cpu preset net, {steps} steps"
    rounds = 1 if args.quick else 3
    raw = ingest_tiff(stack, args.out / "raw.ome.zarr")
    options = dict(precision=args.precision, threads=args.threads)

    def predict_alone(i: int) -> tuple[float, object]:
        started = time.perf_counter()
        result = predict(model, raw, args.out / f"prob-{i}.ome.zarr", **options)
        return time.perf_counter() - started, result

    def segment_once(i: int) -> tuple[float, dict]:
        started = time.perf_counter()
        summary = segment(model, [stack], args.out / f"seg-{i}", **options)[0]
        return time.perf_counter() - started, summary

    log(f"warm-up: predict on {source} ...")
    predict_alone(-1)
    predict_s, segment_s, ratios = [], [], []
    for i in range(rounds):
        p, result = predict_alone(i)
        s, summary = segment_once(i)
        predict_s.append(p)
        segment_s.append(s)
        ratios.append(s / p)
        log(f"round {i + 1}/{rounds}: predict {p:.1f} s, segment {s:.1f} s ({s / p:.2f}x)")
        shutil.rmtree(args.out / f"prob-{i}.ome.zarr")
        shutil.rmtree(args.out / f"seg-{i}")
    precision = summary.get("precision") or "unknown"
    record = precision_record(precision)
    stages = {k: v for k, v in summary["seconds"].items() if v is not None}
    figures = {
        "segment_vs_predict": round(float(np.median(ratios)), 3),
        "segment_s": round(float(np.median(segment_s)), 2),
        "predict_s": round(float(np.median(predict_s)), 2),
        "stages_s": stages,
        "objects": summary["objects"],
        "plan": {"tile": list(result.plan.tile), "block": list(result.plan.block), "batch": result.plan.batch},
        "input": source,
        "model": described,
        "precision": precision,
        "cpu_model": record["cpu_model"],
        "cpu_bf16_flags": record["cpu_bf16_flags"],
        "threads": args.threads,
        "torch": torch.__version__,
        "rounds": rounds,
        "quick": args.quick,
    }
    print(f"machine: {record['cpu_model']}, {args.threads} threads, torch {torch.__version__}; precision {precision}")
    print(f"input: {source}; model: {figures['model']}")
    print(f"segment {figures['segment_s']:.1f} s vs predict alone {figures['predict_s']:.1f} s: "
          f"{figures['segment_vs_predict']:.2f}x (median of {rounds}); stages {stages}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
