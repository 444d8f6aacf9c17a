#!/usr/bin/env python
"""Benchmark: what bfloat16 training does to the ISBI CPU preset's segmentation, on any CPU.

``precision: auto`` trains in bfloat16 autocast on CPUs with AMX-BF16 or
AVX512-BF16.  This script trains the preset (``config/isbi2012-cpu.yaml``:
network, tile, steps, optimiser, augmentation, the paper's loss) twice from the
same seed, once in float32 and once in bfloat16, and scores both the way the
docs/isbi-results.md's candidate table is scored: the 4 mirrorings averaged in memory, the
cell threshold and instance method calibrated on slices 20-24
(:func:`unet_pipe.calibrate.calibrate_slices`), pixel and Rand error reported
on 25-29.

On a CPU without native bfloat16, autocast would run about 14x slower than
float32 (oneDNN converts every product), so bfloat16 is *emulated* instead
(:class:`EmulatedBF16`): every convolution rounds its input, weight, bias and
output to bfloat16 and multiplies in float32, which is what AMX does (bfloat16
products, float32 accumulation, a bfloat16 result); the backward pass rounds
the incoming gradient and the three gradients it returns the same way.  ReLU,
pooling, crops, concatenation and dropout (x2) are exact on bfloat16 values, and
autocast keeps the loss and the optimiser in float32, so they need nothing.
``emulation_check`` compares one forward + backward of the emulation and of
real autocast with float32 (relative L2 differences of the output and of the
gradients): the emulation is credible when its distance to float32 matches
autocast's.  ``--native`` uses real autocast instead (on an AMX CPU).

Usage: ``python benchmarks/bf16_training.py [--quick] [--native] [--steps N]``;
``--quick`` trains 200 steps (a smoke test: its quality figures mean little).
The last line of stdout is one JSON object.  About 30 min on 2 cores in full.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from unet_pipe.blockwise import tta_transforms
from unet_pipe.calibrate import calibrate_slices
from unet_pipe.config import load_config
from unet_pipe.intensity import intensity_range, normalize_raw
from unet_pipe.ingest import ingest_tiff
from unet_pipe.io import open_image
from unet_pipe.metrics import instances_from_binary, rand_error_per_slice
from unet_pipe.model import UNet, model_from_checkpoint
from unet_pipe.postprocess import instances_from_probabilities
from unet_pipe.precision import cpu_bf16_native, precision_record
from unet_pipe.train import predict_probabilities, train
from unet_pipe.weights import WeightParams, compute_weight_store

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT.parent / "shared" / "data" / "isbi2012"
PRESET = ROOT / "config" / "isbi2012-cpu.yaml"
CALIBRATE, VALIDATE = (20, 25), (25, 30)  # the preset's slices; training takes 0-20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _bf16(t: torch.Tensor | None) -> torch.Tensor | None:
    """Round to the nearest bfloat16 (ties to even), kept in float32."""
    return None if t is None else t.to(torch.bfloat16).to(torch.float32)


class _RoundedConvolution(torch.autograd.Function):
    """``aten.convolution`` with bfloat16 operands and result, float32 products (see the module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
        x, weight = _bf16(x), _bf16(weight)
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, transposed, output_padding, groups)
        ctx.has_bias = bias is not None
        y = torch.ops.aten.convolution(x, weight, _bf16(bias), stride, padding, dilation, transposed, output_padding,
                                       groups)  # fmt: skip
        return _bf16(y)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups = ctx.geometry
        channels = weight.shape[1] * groups if transposed else weight.shape[0]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            _bf16(grad), x, weight, [channels] if ctx.has_bias else None, stride, padding, dilation, transposed,
            output_padding, groups, [ctx.needs_input_grad[0], True, ctx.has_bias],
        )  # fmt: skip
        return _bf16(gx), _bf16(gw), _bf16(gb), None, None, None, None, None, None


def _conv_forward(self, x, weight, bias):
    n = len(self.stride)
    return _RoundedConvolution.apply(x, weight, bias, list(self.stride), list(self.padding), list(self.dilation),
                                     False, [0] * n, self.groups)  # fmt: skip


def _transposed_forward(self, x, output_size=None):
    if output_size is not None:
        raise NotImplementedError("emulated bfloat16: output_size is not used by the U-Net")
    return _RoundedConvolution.apply(x, self.weight, self.bias, list(self.stride), list(self.padding),
                                     list(self.dilation), True, list(self.output_padding), self.groups)  # fmt: skip


@contextlib.contextmanager
def EmulatedBF16() -> Iterator[None]:
    """Within the block, the U-Net's convolutions compute as bfloat16 autocast does (float32 speed)."""
    saved = {cls: cls._conv_forward for cls in (nn.Conv2d, nn.Conv3d)}
    saved_t = {cls: cls.forward for cls in (nn.ConvTranspose2d, nn.ConvTranspose3d)}
    try:
        for cls in saved:
            cls._conv_forward = _conv_forward
        for cls in saved_t:
            cls.forward = _transposed_forward
        yield
    finally:
        for cls, f in saved.items():
            cls._conv_forward = f
        for cls, f in saved_t.items():
            cls.forward = f


def emulation_check(depth: int, base: int, tile: int) -> dict:
    """Relative L2 distance to float32 of autocast and of the emulation, one forward + backward."""
    torch.manual_seed(0)
    model = UNet(dims=2, depth=depth, base_channels=base, dropout=0.0, n_classes=2)
    x = torch.randn(1, 1, tile, tile)

    def run(mode: str) -> list[torch.Tensor]:
        net = copy.deepcopy(model)
        context = {"float32": contextlib.nullcontext(), "emulated": EmulatedBF16(),
                   "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[mode]  # fmt: skip
        with context:
            y = net(x)
            loss = F.cross_entropy(y.float(), torch.zeros(1, *y.shape[2:], dtype=torch.long))
            loss.backward()
        return [y.detach().float()] + [p.grad.clone() for p in net.parameters() if p.dim() > 1]

    ref, auto, emu = run("float32"), run("autocast"), run("emulated")

    def rel(a: list, b: list) -> list[float]:
        return [round(float((u - v).norm() / v.norm()), 5) for u, v in zip(a, b)]

    out = {"autocast_vs_float32": rel(auto, ref), "emulated_vs_float32": rel(emu, ref),
           "emulated_vs_autocast": rel(emu, auto)}  # fmt: skip
    out["items"] = "output, then the gradient of each convolution weight, first to last"
    return out


def isbi_stores(tmp: Path, config: dict, threads: int) -> dict:
    """The pipeline's own stores of the ISBI training stack: ingest, then the paper's weight map."""
    ds = config["datasets"]["isbi"]
    raw, labels, weights = tmp / "raw.ome.zarr", tmp / "labels.ome.zarr", tmp / "weights.ome.zarr"
    chunks = config["ingest"]["chunks"]
    ingest_tiff(ISBI / "train-volume.tif", raw, chunks=chunks, voxel_size=ds["voxel_size"], pyramid_levels=0)
    ingest_tiff(ISBI / "train-labels.tif", labels, chunks=chunks, voxel_size=ds["voxel_size"], pyramid_levels=0,
                kind="labels", like=raw)  # fmt: skip
    compute_weight_store(labels, weights, WeightParams.from_config(config["weights"]), threads=threads,
                         pyramid_levels=0)  # fmt: skip
    return {"isbi": {"raw": str(raw), "labels": str(labels), "weights": str(weights)}}


def score(checkpoint: Path, stores: dict) -> dict:
    """4-mirroring probabilities of slices 20-29; decisions chosen on 20-24, errors on 25-29."""
    model, _ = model_from_checkpoint(checkpoint)
    model.eval()
    raw = open_image(stores["isbi"]["raw"])
    labels = np.asarray(open_image(stores["isbi"]["labels"])[CALIBRATE[0] : VALIDATE[1]])
    x = normalize_raw(np.asarray(raw[CALIBRATE[0] : VALIDATE[1]]), intensity_range(raw))
    total, transforms = 0, tta_transforms("flips")  # the pipeline's 4 mirrorings, of whole slices here
    for k, flip in transforms:
        xt = np.rot90(x[:, :, ::-1] if flip else x, k, axes=(1, 2))
        p = np.rot90(predict_probabilities(model, np.ascontiguousarray(xt), torch.device("cpu")), -k, axes=(1, 2))
        total = total + (p[:, :, ::-1] if flip else p)
    prob = (total / len(transforms)).astype(np.float32)
    cells = [lab == 255 for lab in labels]
    truth = [instances_from_binary(c) for c in cells]
    n = CALIBRATE[1] - CALIBRATE[0]
    chosen = calibrate_slices(list(prob[:n]), cells[:n], truth[:n])
    d = chosen["decisions"]
    options = {k: d[k] for k in ("seed_threshold", "seed_prominence", "min_size")}
    pixel = np.mean([np.mean((p > chosen["cell_threshold"]) != c) for p, c in zip(prob[n:], cells[n:])])
    rand = np.nanmean([
        rand_error_per_slice(instances_from_probabilities(p, d["method"], d["threshold"], **options), t)[0]
        for p, t in zip(prob[n:], truth[n:])
    ])  # fmt: skip
    return {
        "calibration_pixel_error": round(chosen["cell_pixel_error"], 4),
        "calibration_rand_error": round(chosen["scores"]["rand_error"], 4),
        "cell_threshold": chosen["cell_threshold"],
        "instances": {"method": d["method"], "threshold": d["threshold"]},
        "val_pixel_error": round(float(pixel), 4),
        "val_rand_error": round(float(rand), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 training steps (a smoke test)")
    parser.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    parser.add_argument("--native", action="store_true", help="real bfloat16 autocast instead of the emulation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (ISBI / "train-volume.tif").exists():
        sys.exit(f"bf16_training: ISBI 2012 not found in {ISBI}")
    torch.set_num_threads(args.threads)
    config = load_config(PRESET, check_inputs=False)
    steps = args.steps or (200 if args.quick else config["train"]["steps"])
    config["train"].update(steps=steps, val_every=steps, checkpoint_every=steps,
                           datasets={"isbi": {"train": [0, CALIBRATE[0]], "val": list(VALIDATE)}})  # fmt: skip
    mode = "native" if args.native else "emulated"
    if args.native and not cpu_bf16_native():
        log("bf16_training: --native on a CPU without native bfloat16: autocast is emulated by oneDNN, very slowly")
    model_cfg = config["model"]
    check = emulation_check(model_cfg["depth"], model_cfg["base_channels"], 188)
    log(f"emulation check (relative L2 to float32; output, then conv weight gradients): {check}")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bf16_training.") as tmp:
        stores = isbi_stores(Path(tmp), config, args.threads)
        for precision in ("float32", "bfloat16"):
            run_cfg = copy.deepcopy(config)
            # The emulation runs in float32 autocast terms; the native run asks for bfloat16 itself.
            run_cfg["train"]["precision"] = "bfloat16" if precision == "bfloat16" and args.native else "float32"
            context = EmulatedBF16() if precision == "bfloat16" and not args.native else contextlib.nullcontext()
            ckpt = Path(tmp) / f"{precision}.pt"
            start = time.perf_counter()
            with context:
                train(run_cfg, stores, ckpt, Path(tmp) / f"{precision}.csv", device="cpu", threads=args.threads,
                      overwrite=True)  # fmt: skip
            seconds = time.perf_counter() - start
            runs[precision] = {"train_seconds": round(seconds, 1), **score(ckpt, stores)}
            log(f"{precision}{'' if precision == 'float32' else f' ({mode})'}: {runs[precision]}")
    record = precision_record("float32")
    figures = {
        "benchmark": "bf16_training",
        "preset": str(PRESET.relative_to(ROOT)),
        "steps": steps,
        "seed": config["seed"],
        "bfloat16_mode": mode,
        "cpu_model": record["cpu_model"],
        "cpu_bf16_flags": record["cpu_bf16_flags"],
        "threads": args.threads,
        "emulation_check": check,
        "float32": runs["float32"],
        "bfloat16": runs["bfloat16"],
    }
    for key in ("val_pixel_error", "val_rand_error"):
        figures[f"{key}_bf16_minus_fp32"] = round(runs["bfloat16"][key] - runs["float32"][key], 4)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
