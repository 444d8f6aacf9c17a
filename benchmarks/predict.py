#!/usr/bin/env python
"""Benchmark: overlap-tile prediction (``unet_pipe.predict``) against the hardware and the bare model.

Figures, each a ratio measured in this one run (after a warm-up, rounds of
[end-to-end, bare model, conv limit]; each end-to-end time is compared with the
measurements right around it and the median over rounds is reported, so that a
changing machine load hits both sides alike):

* ``efficiency_vs_bare_model``: end-to-end ``predict()`` throughput (checkpoint
  load, zarr read and decode, mirror padding, forward passes, softmax, encode,
  zarr write, pyramid, publish) divided by the throughput of the bare
  ``model(x)`` calls on the same input windows, same batches, already in memory.
  Model: the paper's U-Net (depth 5, 64 channels), random weights (speed does
  not depend on them), auto-chosen tile, on ISBI 2012 test slices (synthetic
  slices when the data is absent).
* ``flop_rate_vs_conv_limit``: the model FLOPs of that end-to-end run per
  second, divided by the best rate of single large 3x3 convolutions (64->64 at
  512^2, 256->256 at 128^2, 512->512 at 64^2; same threads, precision and
  memory format) measured in the same run: the attainable hardware rate.
* ``conv_limits``: that conv limit in every precision the CPU offers: float32
  always, bfloat16 too (weights and inputs in bfloat16), marked ``native:
  false`` where the CPU has neither AMX-BF16 nor AVX512-BF16 (oneDNN then
  emulates it).
* ``flop_rate_vs_best_conv_limit``: the end-to-end FLOP rate at the precision
  ``auto`` chose (``precision``) divided by the best conv limit among the
  native precisions: how much of the machine's best arithmetic predict uses.
* ``speedup_vs_float32`` (only where ``auto`` chose bfloat16): end-to-end
  float32 time / end-to-end time at the chosen precision.
* ``rss_ratio_4x_vs_1x``: peak RSS of a fresh process predicting a stack 4x
  larger (4x the slices) divided by the same on the 1x stack, with a small model
  (depth 2, 1 channel) so the gigavoxels run in minutes.  The input is
  generated lazily: one encoded 512 x 512 chunk of a synthetic EM slice,
  hard-linked as every chunk of the store (no disk, no generation time).
* ``useful_output_fraction``: output area / input area of the auto-chosen tile
  of the efficiency run.
* ``voxels_per_s``: end-to-end throughput of that run (paper model, this machine).

The JSON also records the CPU model, its bfloat16 flags as detected and the
precision used.

Usage: ``python benchmarks/predict.py [--quick] [--out DIR] [--threads N] [--precision P]``.
Full: 8 ISBI slices, stacks of 1.01 and 4.03 gigavoxels (15 and 60 slices of
8192^2); ``--quick``: 2 slices, 0.13 and 0.54 gigavoxels.  The last line of
stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unet_pipe.precision import autocast, cpu_bf16_native, precision_record, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT.parent / "shared" / "data" / "isbi2012" / "test-volume.tif"
CHUNK = 512


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ inputs


def write_raw(path: Path, data: np.ndarray) -> Path:
    from unet_pipe.io import StagedImage

    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=(1, CHUNK, CHUNK), overwrite=True)
    staged.array[:] = data
    staged.commit(pyramid_levels=0)
    return path


def isbi_or_synthetic(slices: int) -> tuple[np.ndarray, str]:
    if ISBI.exists():
        import tifffile

        with tifffile.TiffFile(ISBI) as tif:
            return np.stack([tif.pages[z].asarray() for z in range(slices)]), "ISBI 2012 test-volume"
    from unet_pipe.synth import synthesize

    return synthesize((slices, 512, 512), seed=0).raw, "synthetic (ISBI data not found)"


def lazy_stack(path: Path, shape: tuple[int, int, int]) -> Path:
    """An OME-Zarr whose every (1, 512, 512) chunk is a hard link to one encoded synthetic slice."""
    from unet_pipe.io import StagedImage
    from unet_pipe.synth import synthesize

    staged = StagedImage(path, shape=shape, dtype=np.uint8, chunks=(1, CHUNK, CHUNK), overwrite=True)
    staged.array[0, :CHUNK, :CHUNK] = synthesize((1, CHUNK, CHUNK), seed=0).raw[0]
    first = staged.staging / "0" / "0" / "0" / "0"
    for z in range(shape[0]):
        for y in range(shape[1] // CHUNK):
            for x in range(shape[2] // CHUNK):
                target = staged.staging / "0" / str(z) / str(y) / str(x)
                if target != first:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.link(first, target)
    staged.commit(pyramid_levels=0)
    return path


# ------------------------------------------------------------------ measurements


def conv_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of the convolutions and up-convolutions of one forward pass."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = int(np.prod(module.kernel_size))
        if isinstance(module, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
            positions = inputs[0].shape[0] * int(np.prod(inputs[0].shape[2:]))
        else:
            positions = output.shape[0] * int(np.prod(output.shape[2:]))
        total += 2 * module.in_channels * module.out_channels // module.groups * k * positions

    kinds = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return total


def conv_limit(threads: int, rounds: int, precision: str = "float32") -> tuple[float, str]:
    """Best FLOP rate of single large 3x3 convolutions (channels-last, CPU) in ``precision``.

    bfloat16: weights and inputs in bfloat16 (no per-call casts: the hardware's rate).
    """
    torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]
    best, which = 0.0, ""
    for channels, size in ((64, 512), (256, 128), (512, 64)):
        conv = torch.nn.Conv2d(channels, channels, 3).to(dtype=dtype, memory_format=torch.channels_last).eval()
        x = torch.rand(1, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
        flops = 2 * channels * channels * 9 * (size - 2) ** 2
        with torch.inference_mode():
            conv(x)
            for _ in range(rounds):
                start = time.perf_counter()
                conv(x)
                rate = flops / (time.perf_counter() - start)
                if rate > best:
                    best, which = rate, f"{channels}->{channels} at {size}^2"
    return best, which


def network_conv_rate(arch: dict, window: list[int], batch: int, precision: str, threads: int) -> float:
    """FLOP rate of the network's own 3x3 convolutions, each timed alone (best of 3 calls) on inputs of the
    shapes one forward pass of the plan's window gives them, as predict's forward path runs them: in
    bfloat16 oneDNN's convolution + ReLU with the weights packed once; in float32 the convolution and its
    ReLU.  A ceiling for the whole network with these kernels: the up-convolutions, pooling, copies and
    the 1-channel first layer only add time."""
    from unet_pipe.model import _CONV_POINTWISE, UNet, _packed_weight, fused_conv_relu_available

    torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]
    model = UNet(**arch).eval()
    fmt = torch.channels_last if model.dims == 2 else torch.channels_last_3d
    shapes = []
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.kernel_size[0] == 3]
    handles = [c.register_forward_hook(lambda m, i, o: shapes.append((m, tuple(i[0].shape)))) for c in convs]
    x = torch.zeros(batch, 1, *window[-model.dims:])
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    model = model.to(dtype=dtype, memory_format=fmt)
    flops = seconds = 0.0
    with torch.inference_mode():
        for conv, shape in shapes:
            x = torch.rand(shape, dtype=dtype).contiguous(memory_format=fmt)
            ones = [1] * model.dims
            if fused_conv_relu_available(x):
                def call():
                    return _CONV_POINTWISE(x, _packed_weight(conv, x), conv.bias, [0] * model.dims, ones, ones, 1,
                                           "relu", [], "")
            else:
                def call():
                    return torch.relu_(conv(x))
            call()
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - start)
            out_positions = shape[0] * math.prod(s - 2 for s in shape[2:])
            flops += 2 * conv.in_channels * conv.out_channels * 3 ** model.dims * out_positions
            seconds += best
    return flops / seconds


def bare_forward(predictor, raw: np.ndarray, plan) -> tuple[float, int, int]:
    """Seconds of the bare model calls on every tile window of ``plan`` (in memory), FLOPs, voxels."""
    from unet_pipe.intensity import normalize_raw
    from unet_pipe.model import UNet
    from unet_pipe.tiling import block_tiles, iter_batches, read_mirrored

    batches = []
    for region in plan.blocks():
        tiles, window = block_tiles(region, plan.tile, plan.geometry)
        data = read_mirrored(raw, window.start, window.shape)
        for group in iter_batches(tiles, plan.batch):
            x = torch.from_numpy(normalize_raw(np.stack([data[t.read.slices(window.start)] for t in group])))
            batches.append(x.contiguous(memory_format=predictor.memory_format))
    reference = UNet(**predictor.model.arch).eval()  # float32: the FLOP count does not depend on the precision
    flops = sum(conv_flops(reference, x) for x in batches[:1]) * sum(len(x) for x in batches) // len(batches[0])
    with torch.inference_mode():
        start = time.perf_counter()
        for x in batches:
            predictor.logits(x)  # the model call predict makes, in its precision and forward path
        seconds = time.perf_counter() - start
    return seconds, flops, int(np.prod(plan.shape))


def efficiency_run(out: Path, slices: int, threads: int, rounds: int, precision: str, native: list[str]) -> dict:
    """Rounds of [end-to-end predict, bare model, conv limit], after a warm-up predict.

    Each round's end-to-end time is compared with the mean of the bare-model
    times measured just before and after it, and its FLOP rate with the better
    conv limit around it; the figures are the medians over the rounds.
    ``precision``: the request (``auto``: what predict chooses on this CPU);
    ``native``: the precisions this CPU computes natively, whose conv limits
    are measured in every round too (the best of them is the machine's limit).
    """
    from unet_pipe.model import UNet, model_from_checkpoint, save_checkpoint
    from unet_pipe.predict import Predictor, predict

    torch.manual_seed(0)
    raw, source = isbi_or_synthetic(slices)
    src = write_raw(out / "eff_raw.ome.zarr", raw)
    ckpt = save_checkpoint(out / "paper.pt", UNet())  # depth 5, 64 channels: the paper's network
    dest = out / "eff_pred.ome.zarr"

    used = resolve_precision(precision, "cpu")

    def end_to_end(run_precision: str = used) -> tuple[float, object]:
        shutil.rmtree(dest, ignore_errors=True)
        start = time.perf_counter()
        result = predict(
            ckpt, src, dest, workers=1, threads=threads, device="cpu", overwrite=True, precision=run_precision
        )
        return time.perf_counter() - start, result.plan

    _, plan = end_to_end()  # warm-up; gives the auto-chosen plan
    torch.set_num_threads(threads)
    predictor = Predictor(model_from_checkpoint(ckpt)[0], "cpu", precision=used)
    bare_s, flops, _ = bare_forward(predictor, raw, plan)
    measured = list(dict.fromkeys([used, *native]))
    bare, e2e = [bare_s], []
    limits = {name: [conv_limit(threads, 2, name)[0]] for name in measured}
    for r in range(rounds):
        e2e.append(end_to_end()[0])
        bare.append(bare_forward(predictor, raw, plan)[0])
        for name in measured:
            limits[name].append(conv_limit(threads, 2, name)[0])
        torch.set_num_threads(threads)
        log(f"  round {r}: end-to-end {e2e[-1]:.2f} s, bare model {bare[-2]:.2f} / {bare[-1]:.2f} s, conv limit "
            + ", ".join(f"{name} {limits[name][-1] / 1e9:.0f}" for name in measured) + " GFLOP/s")  # fmt: skip
    # Where auto chose bfloat16: one float32 run for the speed-up (the issue's >= 3x target on AMX).
    fp32_s = end_to_end("float32")[0] if used != "float32" else None
    voxels = int(np.prod(raw.shape))
    efficiency = [(bare[r] + bare[r + 1]) / 2 / e2e[r] for r in range(rounds)]
    flop_ratio = [flops / e2e[r] / max(limits[used][r], limits[used][r + 1]) for r in range(rounds)]
    best_ratio = [
        flops / e2e[r] / max(max(limits[name][r], limits[name][r + 1]) for name in native) for r in range(rounds)
    ]
    return {
        "source": source,
        "shape": list(raw.shape),
        "plan": plan.to_dict(),
        "window": list(plan.window),
        "arch": UNet().arch,  # the paper's network, as checkpointed above
        "useful_fraction": plan.useful_fraction,
        "efficiency": float(np.median(efficiency)),
        "flop_ratio": float(np.median(flop_ratio)),
        "e2e_s": float(np.median(e2e)),
        "bare_s": float(np.median(bare)),
        "conv_limit": float(np.median(limits[used])),
        "conv_limits": {name: float(np.median(values)) for name, values in limits.items()},
        "best_ratio": float(np.median(best_ratio)),
        "voxels": voxels,
        "flops": flops,
        "precision": used,
        "fp32_e2e_s": fp32_s,
        "forward_path": predictor.path,
    }


def rss_child(shape: tuple[int, int, int], out: Path, threads: int) -> dict:
    """Runs in a fresh process: predict a lazily generated stack; report peak RSS and time."""
    from unet_pipe.model import UNet, save_checkpoint
    from unet_pipe.predict import predict

    torch.manual_seed(0)
    src = lazy_stack(out / "rss_raw.ome.zarr", shape)
    ckpt = save_checkpoint(out / "small.pt", UNet(depth=2, base_channels=1))
    dest = out / "rss_pred.ome.zarr"
    start = time.perf_counter()
    result = predict(ckpt, src, dest, workers=1, threads=threads, device="cpu", dtype="uint8", overwrite=True)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    for path in (src, dest):
        shutil.rmtree(path, ignore_errors=True)
    return {"shape": list(shape), "peak_rss": peak, "seconds": seconds, "plan": result.plan.to_dict()}


def peak_rss_bytes() -> int:
    """Peak RSS of this process's own address space (VmHWM).

    Not ``ru_maxrss``: Linux carries the parent's RSS at fork over into the
    child's ``ru_maxrss``, so a child started after the efficiency run (about
    1.3 GiB) reported at least that much whatever it used itself.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_rss_child(shape: tuple[int, int, int], out: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--rss-child", *map(str, shape), "--out", str(out), "--threads", str(threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 slices; 0.13 and 0.54 gigavoxel stacks")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "predict")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="precision of the efficiency run (default auto: what predict chooses here)")
    parser.add_argument("--rss-child", nargs=3, type=int, metavar=("Z", "Y", "X"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from unet_pipe.predict import tune_allocator

    tune_allocator()  # as `unet-pipe predict` does
    if args.rss_child:
        print(json.dumps(rss_child(tuple(args.rss_child), args.out, args.threads)))
        return

    slices, rounds = (2, 3) if args.quick else (8, 3)
    rss_shapes = [(2, 8192, 8192), (8, 8192, 8192)] if args.quick else [(15, 8192, 8192), (60, 8192, 8192)]
    log(f"efficiency: paper U-Net on {slices} slices, {rounds} rounds ...")
    offered = {"float32": True, "bfloat16": cpu_bf16_native()}
    native = [name for name, is_native in offered.items() if is_native]
    eff = efficiency_run(args.out, slices, args.threads, rounds, args.precision, native)
    _, which = conv_limit(args.threads, 2, eff["precision"])
    limits = {}
    for name, is_native in offered.items():
        rate = eff["conv_limits"].get(name)
        if rate is None:  # an emulated precision the run did not use: measured once, for the record
            log(f"conv limit in {name} (emulated) ...")
            rate = conv_limit(args.threads, 2, name)[0]
        limits[name] = {"gflop_per_s": round(rate / 1e9, 1), "native": is_native}
    rss = []
    for shape in rss_shapes:
        log(f"peak RSS: small U-Net on a lazily generated {shape} stack ({np.prod(shape) / 1e9:.2f} Gvox) ...")
        rss.append(run_rss_child(shape, args.out, args.threads))
        log(f"  peak RSS {rss[-1]['peak_rss'] / 2**20:.0f} MiB, {rss[-1]['seconds']:.0f} s")

    log("the network's own 3x3 convolutions, each alone ...")
    net_rate = network_conv_rate(eff["arch"], eff["window"], eff["plan"]["batch"], eff["precision"], args.threads)
    best_limit = max(v["gflop_per_s"] for v in limits.values() if v["native"]) * 1e9
    e2e_rate = eff["voxels"] / eff["e2e_s"]
    bare_rate = eff["voxels"] / eff["bare_s"]
    small = rss[-1]
    record = precision_record(eff["precision"])
    print(f"machine: {record['cpu_model']}, bf16 flags {record['cpu_bf16_flags'] or 'none'}, {args.threads} threads, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); precision {eff['precision']}")
    print("conv limits: " + ", ".join(f"{k} {v['gflop_per_s']} GFLOP/s ({'native' if v['native'] else 'emulated'})"
                                      for k, v in limits.items()))
    print(f"input: {eff['source']} {eff['shape']}; plan tile {eff['plan']['tile']} window {eff['window']} "
          f"block {eff['plan']['block']} batch {eff['plan']['batch']}")  # fmt: skip
    print(f"end-to-end {e2e_rate / 1e3:.1f} kvox/s vs bare model {bare_rate / 1e3:.1f} kvox/s (medians)")
    print(f"model {eff['flops'] / 1e12:.2f} TFLOP: {eff['flops'] / eff['e2e_s'] / 1e9:.1f} GFLOP/s end-to-end vs "
          f"conv limit {eff['conv_limit'] / 1e9:.1f} GFLOP/s (best: {which})")  # fmt: skip
    print(f"small model end-to-end on {small['shape']}: {np.prod(small['shape']) / small['seconds'] / 1e6:.1f} Mvox/s; "
          f"peak RSS {rss[0]['peak_rss'] / 2**20:.0f} MiB (1x) vs {rss[1]['peak_rss'] / 2**20:.0f} MiB (4x)")  # fmt: skip
    figures = {
        "efficiency_vs_bare_model": round(eff["efficiency"], 3),
        "flop_rate_vs_conv_limit": round(eff["flop_ratio"], 3),
        "flop_rate_vs_best_conv_limit": round(eff["best_ratio"], 3),
        "model_gflop_per_s": round(eff["flops"] / eff["e2e_s"] / 1e9, 1),
        # The ceiling of these kernels at the network's own shapes (network_conv_rate), against the limit.
        "network_convs_gflop_per_s": round(net_rate / 1e9, 1),
        "network_convs_vs_best_conv_limit": round(net_rate / best_limit, 3),
        "conv_limits": limits,
        "precision": eff["precision"],
        "forward_path": eff["forward_path"],
        "speedup_vs_float32": round(eff["fp32_e2e_s"] / eff["e2e_s"], 3) if eff["fp32_e2e_s"] else None,
        "cpu_model": record["cpu_model"],
        "cpu_bf16_flags": record["cpu_bf16_flags"],
        "cpu_bf16_native": record["cpu_bf16_native"],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "rss_ratio_4x_vs_1x": round(rss[1]["peak_rss"] / rss[0]["peak_rss"], 3),
        "useful_output_fraction": round(eff["useful_fraction"], 3),
        "voxels_per_s": round(e2e_rate, 1),
        "small_model_voxels_per_s": round(np.prod(small["shape"]) / small["seconds"], 1),
        "rss_1x_mib": round(rss[0]["peak_rss"] / 2**20, 1),
        "rss_4x_gigavoxels": round(float(np.prod(rss_shapes[1])) / 1e9, 2),
        "quick": args.quick,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
