#!/usr/bin/env python
"""Benchmark: the training loop (``unet_pipe.train.train``) against bare optimiser steps, per precision.

Figures, per precision (float32 always; bfloat16 where the CPU computes it
natively — AMX-BF16 or AVX512-BF16 — or everywhere with ``--all-precisions``,
then marked ``native: false``):

* ``loop_steps_per_s``: steps/s of :func:`unet_pipe.train.train` itself: the
  real tile sampler (random volume, slice and window from the arrays), the
  configured augmentation (elastic deformation, rotation, flip, gray values),
  the weighted cross-entropy, SGD with momentum, the CSV log.  Timed from the
  log's per-step wall clock, leaving out the first ``WARMUP`` steps (oneDNN
  builds its kernels on the first passes).
* ``bare_steps_per_s``: forward + loss + backward + ``optimizer.step()`` of the
  same model (same architecture, seed, dropout, precision) on tiles made
  beforehand by the same sampler and augmentation, already in memory: the
  rate of the arithmetic alone.
* ``train_loop_vs_bare``: loop / bare (issue 11 target: >= 0.85): bare,
  then rounds of [loop, bare]; each loop rate is compared with the mean of the
  bare rates just before and after it and the median over rounds is reported,
  so a changing machine load hits both sides alike.  The top-level ``train_loop_vs_bare`` is at the precision
  ``auto`` chooses on this CPU (``precision_auto``).
* ``bf16_speedup``: bfloat16 loop steps/s over float32 loop steps/s (target
  with AMX: >= 1.8); null when bfloat16 was not measured.
* ``batch_threads_set_by``: how the loop gives each batch's sampling and
  augmentation one thread: in the OpenMP runtime (threadpoolctl) or, where
  torch computes with another runtime, ``torch.set_num_threads``.

Data: the first ISBI 2012 training slices (synthetic ones when absent) with
class-balancing weights (3 on membrane, 1 on cells: the weight values do not
change the cost).  Model: depth 4, 16 base channels, 188^2 input tiles
(``--depth``, ``--base``, ``--tile`` change them).  The JSON also records the
CPU model, its bfloat16 flags as detected and torch's CPU capability.

Usage: ``python benchmarks/train.py [--quick] [--all-precisions] [--threads N]``;
``--quick``: fewer steps and rounds (short rounds follow load changes better).  The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unet_pipe.augment import AugmentParams, augment_sample
from unet_pipe.config import validate_config
from unet_pipe.model import UNet
from unet_pipe.precision import autocast, cpu_bf16_native, precision_record, resolve_precision
from unet_pipe.sampling import TileSampler, center_crop, volumes_from_config
from unet_pipe.train import (
    _BatchMaker,
    iter_rows,
    make_optimizer,
    train,
    training_memory_format,
    weighted_cross_entropy,
)

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT.parent / "shared" / "data" / "isbi2012"
WARMUP = 2  # steps left out of every timing (kernel creation, allocator warm-up)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def training_data(slices: int) -> tuple[dict, str]:
    """``{name: {raw, labels, weights}}`` arrays: ISBI 2012 training slices, else synthetic ones."""
    volume, labels_path = ISBI / "train-volume.tif", ISBI / "train-labels.tif"
    if volume.exists() and labels_path.exists():
        import tifffile

        raw = tifffile.imread(volume)[:slices]
        labels = tifffile.imread(labels_path)[:slices]
        source = f"ISBI 2012 train-volume, {slices} slices"
    else:
        from unet_pipe.synth import synthesize

        stack = synthesize((slices, 512, 512), seed=0)
        raw, labels = stack.raw, np.where(stack.labels > 0, 255, 0).astype(np.uint8)
        source = f"synthetic (ISBI data not found), {slices} slices"
    weights = np.where(labels == 0, 3.0, 1.0).astype(np.float32)
    return {"b": {"raw": raw, "labels": labels, "weights": weights}}, source


def make_config(args: argparse.Namespace, slices: int, steps: int, precision: str) -> dict:
    return validate_config(
        {
            "datasets": {"b": {"synthetic": {"shape": [slices, 512, 512]}}},  # arrays come from `stores`
            "model": {"depth": args.depth, "base_channels": args.base},
            "train": {
                "datasets": {"b": {"train": [0, slices]}},  # no validation slices: steps only
                "tile": args.tile,
                "steps": steps,
                "val_every": steps + 1,
                "checkpoint_every": steps + 1,
                "lr_schedule": "constant",
                "precision": precision,
            },
        }
    )


def loop_rate(config: dict, stores: dict, out: Path, threads: int) -> float:
    """Steps/s of ``train()`` after the warm-up steps (from the CSV's per-step wall clock)."""
    ckpt, csv = out / "loop.pt", out / "loop.csv"
    train(config, stores, ckpt, csv, device="cpu", threads=threads, overwrite=True)
    seconds = [row["seconds"] for row in iter_rows(csv)]
    return (len(seconds) - WARMUP) / (seconds[-1] - seconds[WARMUP - 1])


def premade_tiles(config: dict, stores: dict, count: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` batches from the loop's own sampler and augmentation, cropped like the loop does."""
    train_cfg, model_cfg, weights_cfg = config["train"], config["model"], config["weights"]
    sampler = TileSampler(
        volumes_from_config(config, stores), tile=train_cfg["tile"], depth=model_cfg["depth"],
        dims=model_cfg["dims"], label_mode=weights_cfg["label_mode"], foreground_value=weights_cfg["foreground_value"],
    )  # fmt: skip
    augment = AugmentParams.from_config(train_cfg["augment"])
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    margin = UNet(depth=model_cfg["depth"], base_channels=1).margin
    batches = []
    for _ in range(count):
        image, classes, weights = sampler.batch(train_cfg["batch_size"], rng)
        image, classes, weights = augment_sample(image, classes, weights, augment, gen, spatial_dims=model_cfg["dims"])
        batches.append((image, center_crop(classes, margin, model_cfg["dims"]), center_crop(weights, margin, model_cfg["dims"])))
    return batches


def bare_rate(config: dict, batches: list, threads: int, precision: str) -> float:
    """Steps/s of forward + loss + backward + SGD step on ``batches`` (after the warm-up steps)."""
    torch.set_num_threads(threads)
    model_cfg = config["model"]
    torch.manual_seed(config["seed"])
    model = UNet(depth=model_cfg["depth"], base_channels=model_cfg["base_channels"], dims=model_cfg["dims"],
                 dropout=model_cfg["dropout"], n_classes=model_cfg["n_classes"]).train()  # fmt: skip
    layout = training_memory_format(torch.device("cpu"), precision, model.dims)  # the loop's own layout
    model.to(memory_format=layout)
    optimizer = make_optimizer(model, config["train"])
    start = 0.0
    for i, (image, classes, weights) in enumerate(batches):
        if i == WARMUP:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast("cpu", precision):
            logits = model(image.contiguous(memory_format=layout))
        weighted_cross_entropy(logits, classes, weights).backward()
        optimizer.step()
    return (len(batches) - WARMUP) / (time.perf_counter() - start)


def measure(args: argparse.Namespace, stores: dict, slices: int, precision: str, out: Path) -> dict:
    config = make_config(args, slices, args.steps, precision)
    batches = premade_tiles(config, stores, args.steps)
    loops, bares = [], [bare_rate(config, batches, args.threads, precision)]
    for r in range(args.rounds):
        loops.append(loop_rate(config, stores, out, args.threads))
        bares.append(bare_rate(config, batches, args.threads, precision))
        log(f"  {precision} round {r}: loop {loops[-1]:.3f} steps/s, bare {bares[-2]:.3f} / {bares[-1]:.3f} steps/s")
    ratios = [loops[r] / ((bares[r] + bares[r + 1]) / 2) for r in range(args.rounds)]
    return {
        "loop_steps_per_s": round(float(np.median(loops)), 4),
        "bare_steps_per_s": round(float(np.median(bares)), 4),
        "train_loop_vs_bare": round(float(np.median(ratios)), 3),
        "layout": str(training_memory_format(torch.device("cpu"), precision, config["model"]["dims"])).split(".")[-1],
    }


def competing_rate(args: argparse.Namespace, stores: dict, slices: int, precision: str, out: Path) -> dict:
    """The loop's steps/s while one busy process competes for the cores (a shared node)."""
    config = make_config(args, slices, args.steps, precision)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        rate = loop_rate(config, stores, out, args.threads)
    finally:
        busy.kill()
        busy.wait()
    alone = loop_rate(config, stores, out, args.threads)
    log(f"  {precision} beside a busy process: {rate:.3f} steps/s vs {alone:.3f} alone")
    return {"precision": precision, "loop_steps_per_s": round(rate, 4), "alone_steps_per_s": round(alone, 4),
            "slowdown": round(alone / rate, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 steps x 3 rounds per precision (else 20 x 5)")
    parser.add_argument("--all-precisions", action="store_true", help="bfloat16 also where the CPU only emulates it")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--tile", type=int, default=188)
    parser.add_argument("--competitor", action="store_true",
                        help="also time the loop (auto precision) beside one busy process: a shared node")
    args = parser.parse_args()
    args.steps, args.rounds = (10, 3) if args.quick else (20, 5)
    slices = 4 if args.quick else 10
    stores, source = training_data(slices)
    native = cpu_bf16_native()
    precisions = {"float32": True}
    if native or args.all_precisions:
        precisions["bfloat16"] = native
    auto = resolve_precision("auto", "cpu", training=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for name, is_native in precisions.items():
            log(f"{name} ({'native' if is_native else 'emulated'}): depth {args.depth}, base {args.base}, "
                f"tile {args.tile}, {args.steps} steps x {args.rounds} rounds on {source} ...")  # fmt: skip
            results[name] = {**measure(args, stores, slices, name, Path(tmp)), "native": is_native}
        shared = competing_rate(args, stores, slices, auto, Path(tmp)) if args.competitor else None
    record = precision_record(auto)
    speedup = (
        round(results["bfloat16"]["loop_steps_per_s"] / results["float32"]["loop_steps_per_s"], 3)
        if "bfloat16" in results else None
    )  # fmt: skip
    print(f"machine: {record['cpu_model']}, bf16 flags {record['cpu_bf16_flags'] or 'none'}, {args.threads} threads, "
          f"torch {torch.__version__}; auto precision: {auto}")  # fmt: skip
    for name, r in results.items():
        print(f"{name}: loop {r['loop_steps_per_s']} steps/s vs bare {r['bare_steps_per_s']} steps/s "
              f"(ratio {r['train_loop_vs_bare']}){'' if r['native'] else ', emulated'}")  # fmt: skip
    figures = {
        "train_loop_vs_bare": results.get(auto, results["float32"])["train_loop_vs_bare"],
        "bf16_speedup": speedup,
        "precisions": results,
        "precision_auto": auto,
        "cpu_model": record["cpu_model"],
        "cpu_bf16_flags": record["cpu_bf16_flags"],
        "cpu_bf16_native": record["cpu_bf16_native"],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "model": {"depth": args.depth, "base_channels": args.base, "tile": args.tile},
        "with_one_busy_process": shared,
        # How the loop makes each batch on one thread (unet_pipe.train._BatchMaker).
        "batch_threads_set_by": "threadpoolctl (OpenMP runtime)" if _BatchMaker(torch.device("cpu"), args.threads).openmp
        else "torch.set_num_threads",
        "data": source,
        "quick": args.quick,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
