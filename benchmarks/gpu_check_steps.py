"""The steps of ``benchmarks/gpu_check.py``, each run in its own process.

Each step writes its report to ``WORKDIR/STEP.json`` after every stage, with
the stage it is in, so a step killed at its time limit still reports what it
measured and where it stopped.  The work itself is the project's: ingest,
weights, train, predict, postprocess, evaluate and the synthetic stack come
from ``unet_pipe``; only the timing, FLOP counting and the conv ceiling are
here.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

from gpu_check import ROOT, STEPS, json_safe, write_json

PACKAGES = ("numpy", "scipy", "scikit-image", "tifffile", "zarr", "numcodecs", "dask", "jsonschema", "natsort",
            "torch", "pytest")


class Report(dict):
    """A step's figures, saved to disk at every stage (the orchestrator reads them even after a kill)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def stage(self, name: str, **figures: Any) -> None:
        self.update(figures)
        self["stage"] = name
        self.save()

    def save(self) -> None:
        write_json(self.path, dict(self))


def run(step: str, params: dict) -> None:
    report = Report(Path(params["workdir"]) / f"{step}.json")
    steps: dict[str, Callable[[dict, Report], None]] = {
        "env": step_env, "tests": step_tests, "gigavoxel": step_gigavoxel, "isbi": step_isbi,
    }
    try:
        steps[step](params, report)
        report.pop("stage", None)
        report["error"] = None
    except BaseException as exc:  # the JSON must name what broke, whatever it was
        import traceback

        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        report["error"] = f"{message} (during {report.get('stage', 'setup')})"
        report.pop("stage", None)
        report.save()
        sys.exit(1)
    report.save()


# ------------------------------------------------------------------ env


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def step_env(params: dict, report: Report) -> None:
    from importlib import metadata

    from unet_pipe.machine import available_cores

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    report.stage("versions", cpu=cpu_model(), cores=available_cores(), python=platform.python_version(),
                 packages=versions, device=params["device"])
    import torch

    report.stage("torch", torch=torch.__version__, cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report.stage("gpu", gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     bf16_supported=torch.cuda.is_bf16_supported(), driver=nvidia_driver())
    if params["device"] == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------ tests


def step_tests(params: dict, report: Report) -> None:
    """``pytest -m gpu tests``: counts from its JUnit XML, deselected from its summary line."""
    workdir = Path(params["workdir"])
    xml = workdir / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={xml}", f"--basetemp={workdir / 'pytest'}"]
    report.stage("pytest")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout[-20000:], done.stderr[-5000:], sep="\n", flush=True)
    counts = junit_counts(xml) if xml.exists() else {}
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    deselected = re.search(r"(\d+) deselected", summary)
    report.update(counts, deselected=int(deselected.group(1)) if deselected else 0)
    if done.returncode not in (0, 1) or not counts:
        raise RuntimeError(f"pytest exited with status {done.returncode}: {summary[:300]}")


def junit_counts(xml: Path) -> dict:
    """passed / failed / skipped / errors and the failed tests' names with the first line of their message."""
    root = ET.parse(xml).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "failures": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            counts["failures"].append(f"{name}: {(outcome.get('message') or '').splitlines()[0][:200] if outcome.get('message') else ''}")
    return counts


# ------------------------------------------------------------------ measurements


def _benchmark_predict_module():
    """``benchmarks/predict.py``, whose ``conv_flops`` counts a forward pass's convolution FLOPs."""
    spec = importlib.util.spec_from_file_location("benchmark_predict", Path(__file__).with_name("predict.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan_flops(arch: dict, plan: Any) -> tuple[int, int]:
    """(model FLOPs of every tile forward pass of ``plan``, tile count), counted on the meta device."""
    import torch

    from unet_pipe.model import UNet
    from unet_pipe.tiling import block_tiles

    tiles = sum(len(block_tiles(block, plan.tile, plan.geometry)[0]) for block in plan.blocks())
    model = UNet(**arch).to("meta")
    window = plan.window[1:] if plan.dims == 2 else plan.window
    x = torch.empty(1, 1, *window, device="meta")
    return _benchmark_predict_module().conv_flops(model, x) * tiles, tiles


def conv_rates(arch: dict, window: tuple[int, ...], batch: int, device: str, reps: int) -> tuple[dict, str]:
    """FLOP/s of dense 3x3 c->c convolutions at each level's channels and size for this window and batch.

    bf16 on CUDA (what autocast runs), cuDNN autotuned, channels-last, random
    data, median of ``reps`` timed with CUDA events after warm-up; float32 on
    the CPU (what predict runs there).  Level ``l``: ``base * 2**l`` channels
    on ``window / 2**l`` pixels, so every level's shapes are the network's own.
    """
    import torch

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    rates = {}
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for level in range(arch["depth"]):
            channels, size = arch["base_channels"] * 2**level, max(8, window[-1] >> level)
            conv = torch.nn.Conv2d(channels, channels, 3).to(device, dtype=dtype, memory_format=torch.channels_last)
            x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            flops = 2 * channels * channels * 9 * (size - 2) ** 2 * batch
            times = []
            with torch.inference_mode():
                for i in range(reps + 3):
                    if cuda:
                        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        begin.record()
                        conv(x)
                        end.record()
                        end.synchronize()
                        seconds = begin.elapsed_time(end) / 1e3
                    else:
                        t0 = time.perf_counter()
                        conv(x)
                        seconds = time.perf_counter() - t0
                    if i >= 3:
                        times.append(seconds)
            rates[f"{channels}ch_{size}px"] = flops / sorted(times)[len(times) // 2]
            del conv, x
            if cuda:
                torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = previous
    return rates, str(dtype).removeprefix("torch.")


def bare_model_seconds(checkpoint: Path, plan: Any, device: str, tiles: int, reps: int = 3) -> float:
    """Seconds the run's tiles take through the bare model on ``device`` (``unet_pipe``'s Predictor:
    normalise, host-to-device copy, forward, softmax, copy back; no zarr, no blocks), from the
    median of ``reps`` timed batches of random windows of the plan after one warm-up batch."""
    import numpy as np

    from unet_pipe.model import model_from_checkpoint
    from unet_pipe.predict import Predictor

    predictor = Predictor(model_from_checkpoint(checkpoint)[0], device)
    windows = np.random.default_rng(0).integers(0, 256, (plan.batch, *plan.window), dtype=np.uint8)
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        predictor(windows)  # returns a numpy array: the device work is finished
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * tiles / plan.batch


def write_synthetic_stack(dest: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int], base: int) -> Path:
    """A uint8 EM-like OME-Zarr, one slice at a time: slices tiled from rotations and flips of one
    synthetic slice (``unet_pipe.synth``), varying with z, so no slice or chunk row repeats its neighbour's."""
    import numpy as np

    from unet_pipe.io import StagedImage
    from unet_pipe.synth import synthesize

    nz, ny, nx = shape
    tile = synthesize((1, base, base), seed=0).raw[0]
    variants = [np.rot90(v, k) for v in (tile, tile[:, ::-1]) for k in range(4)]
    staged = StagedImage(dest, shape=shape, dtype=np.uint8, chunks=chunks, voxel_size=(0.05, 0.004, 0.004),
                         overwrite=True)
    rows, cols = -(-ny // base), -(-nx // base)
    for z in range(nz):
        plane = np.block([[variants[(3 * i + 5 * j + z) % 8] for j in range(cols)] for i in range(rows)])
        staged.write_slab(z, plane[None, :ny, :nx], pyramid_levels=0)
    return staged.commit(pyramid_levels=0)


# ------------------------------------------------------------------ gigavoxel


def network_arch(sizes: dict) -> tuple[dict, dict]:
    """(UNet keyword arguments, the config's model section) of config/isbi2012.yaml, reduced in dry mode."""
    from unet_pipe.config import load_config

    config = load_config(ROOT / "config" / "isbi2012.yaml", check_inputs=False)
    model = dict(config["model"])
    if sizes["model"]:
        model.update({k: v for k, v in sizes["model"].items() if k != "tile"})
    arch = {"in_channels": 1, **{k: model[k] for k in ("n_classes", "depth", "base_channels", "dims", "dropout")}}
    return arch, model


def step_gigavoxel(params: dict, report: Report) -> None:
    import shutil

    import numpy as np
    import torch
    import zarr

    from unet_pipe.io import write_pyramid
    from unet_pipe.model import UNet, save_checkpoint
    from unet_pipe.predict import predict

    sizes, device, work = params["sizes"], params["device"], Path(params["workdir"])
    shape, chunks = tuple(sizes["giga_shape"]), tuple(sizes["giga_chunks"])
    voxels = int(np.prod(shape, dtype=np.int64))
    arch, _ = network_arch(sizes)
    report.stage("input", shape=list(shape), chunks=list(chunks), voxels=voxels, gigavoxels=voxels / 1e9,
                 network={k: arch[k] for k in ("depth", "base_channels", "dims")}, output_dtype="uint8")
    src, dest = work / "giga_raw.ome.zarr", work / "giga_prob.ome.zarr"
    t0 = time.perf_counter()
    write_synthetic_stack(src, shape, chunks, sizes["giga_base"])
    report.stage("checkpoint", write_input_seconds=time.perf_counter() - t0)
    torch.manual_seed(0)
    ckpt = save_checkpoint(work / "giga.pt", UNet(**arch))  # random weights: speed does not depend on them
    report.stage("predict")
    result = predict(ckpt, src, dest, device=device, dtype="uint8", pyramid_levels=0, overwrite=True)
    plan = result.plan
    precision = "bfloat16 autocast" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else (
        "float16 autocast" if device.startswith("cuda") else "float32")
    report.stage(
        "flops", predict_seconds=result.seconds, voxels_per_s=voxels / result.seconds,
        seconds_per_gigavoxel=result.seconds / (voxels / 1e9), precision=precision, tile=list(plan.tile),
        window=list(plan.window), block=list(plan.block), batch=plan.batch, useful_fraction=plan.useful_fraction,
    )
    flops, tiles = plan_flops(arch, plan)
    # Output voxels the tiles computed per voxel of the stack (1 = no tile reaches past the stack):
    # the FLOPs above are the executed ones, so this says how many of them were useful.
    computed = tiles * math.prod(plan.tile) / voxels
    report.stage("bare model", model_flops=flops, tiles=tiles, achieved_flops_per_s=flops / result.seconds,
                 computed_output_ratio=computed)
    bare = bare_model_seconds(ckpt, plan, device, tiles)
    report.stage("conv_rate", bare_model_seconds=bare, efficiency_vs_bare_model=bare / result.seconds)
    rates, dtype = conv_rates(arch, tuple(plan.window), plan.batch, device, sizes["conv_reps"])
    best = max(rates.values())
    report.stage("pyramid", conv_rates=rates, conv_rate_dtype=dtype, conv_rate_flops_per_s=best,
                 fraction_of_conv_rate=flops / result.seconds / best)
    # What predict's default (2 pyramid levels, as the workflow writes them) would add to the run.
    t0 = time.perf_counter()
    write_pyramid(zarr.open_group(str(dest), mode="r+"), 2, kind="image")
    report.stage("cleanup", pyramid_seconds=time.perf_counter() - t0)
    for path in (src, dest):
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ ISBI


def isbi_inputs(params: dict, work: Path) -> tuple[Path, Path, str]:
    """The ISBI training volume and labels (cropped in dry mode); synthetic in dry mode without the data."""
    import tifffile

    from unet_pipe.synth import write_synthetic

    folder, crop = Path(params["isbi"]), params["sizes"]["isbi_crop"]
    raw, labels = folder / "train-volume.tif", folder / "train-labels.tif"
    if not (raw.exists() and labels.exists()):
        if not params["dry"]:
            raise FileNotFoundError(f"ISBI 2012 not found at {folder}: copy it to .isbi/ as gpu_check.sh says")
        paths = write_synthetic(work / "synthetic", shape=(30, crop, crop), seed=0)
        return paths["raw"], paths["labels"], f"synthetic 30 x {crop}^2 (ISBI 2012 not found at {folder})"
    if crop is None:
        return raw, labels, f"ISBI 2012 {raw.name} / {labels.name} (30 x 512^2)"
    out = work / "isbi_crop"
    out.mkdir(exist_ok=True)
    for src in (raw, labels):
        tifffile.imwrite(out / src.name, tifffile.imread(src)[:, :crop, :crop])
    return out / raw.name, out / labels.name, f"ISBI 2012 cropped to 30 x {crop}^2"


def isbi_config(params: dict, raw: Path, labels: Path, work: Path) -> dict:
    """config/isbi2012.yaml with this run's data paths (and the dry mode's tiny network), validated again."""
    from unet_pipe.config import load_config, validate_config

    config = load_config(ROOT / "config" / "isbi2012.yaml", check_inputs=False)
    voxel_size = config["datasets"]["isbi"]["voxel_size"]
    config["datasets"] = {"isbi": {"raw": str(raw), "labels": str(labels), "voxel_size": voxel_size}}
    config["predict"]["datasets"] = ["isbi"]
    config["results"] = str(work / "isbi")
    small = params["sizes"]["model"]
    if small:
        config["model"].update({k: v for k, v in small.items() if k != "tile"})
        config["train"]["tile"] = small["tile"]
    return validate_config(config, "gpu_check")


# Decisions: `unet_pipe.calibrate` on the config's calibration slices (calibrate.datasets, else
# the val range), as the workflow's calibrate rule does.
# ---------------------------------------------------------------------------------------------


def decide(config: dict, probabilities: Path, stores: dict, work: Path) -> dict:
    from unet_pipe.calibrate import calibrate
    from unet_pipe.config import calibration_slices

    slices = calibration_slices(config)["isbi"]
    out = calibrate(
        {"isbi": {"probabilities": probabilities, "truth": stores["labels"], "slices": slices}},
        work / "decisions.json", truth_mode="binary", foreground_value=config["weights"]["foreground_value"],
        methods=config["calibrate"]["methods"],
    )  # fmt: skip
    return {**out["decisions"], "cell_threshold": out["cell_threshold"], "source": "calibrate",
            "note": f"chosen on slices {slices[0]}-{slices[1] - 1}"}  # fmt: skip



def step_isbi(params: dict, report: Report) -> None:
    from unet_pipe.machine import available_cores
    from unet_pipe.evaluate import evaluate
    from unet_pipe.ingest import ingest_tiff
    from unet_pipe.model import UNet
    from unet_pipe.postprocess import postprocess
    from unet_pipe.predict import predict
    from unet_pipe.train import iter_rows, train
    from unet_pipe.weights import WeightParams, compute_weight_store

    sizes, device, work = params["sizes"], params["device"], Path(params["workdir"])
    raw_tif, labels_tif, data = isbi_inputs(params, work)
    config = isbi_config(params, raw_tif, labels_tif, work)
    model_cfg, train_cfg = config["model"], config["train"]
    ranges = train_cfg["datasets"]["isbi"]
    arch = {k: model_cfg[k] for k in ("n_classes", "depth", "base_channels", "dims", "dropout")}
    report.stage(
        "ingest", data=data, train_slices=ranges["train"], val_slices=ranges["val"], tta=config["predict"]["tta"],
        network={**{k: model_cfg[k] for k in ("depth", "base_channels", "dims")}, "tile": train_cfg["tile"],
                 "output": UNet(**arch).output_size(train_cfg["tile"])},
        parameters=sum(p.numel() for p in UNet(**arch).parameters()),
        precision="float16 autocast + GradScaler" if device.startswith("cuda") else "float32",
    )
    stores = {"raw": work / "raw.ome.zarr", "labels": work / "labels.ome.zarr", "weights": work / "weights.ome.zarr"}
    ingest = config["ingest"]
    voxel_size = config["datasets"]["isbi"]["voxel_size"]
    ingest_tiff(raw_tif, stores["raw"], chunks=ingest["chunks"], voxel_size=voxel_size,
                pyramid_levels=ingest["pyramid_levels"], overwrite=True)
    ingest_tiff(labels_tif, stores["labels"], chunks=ingest["chunks"], kind="labels", like=stores["raw"],
                pyramid_levels=ingest["pyramid_levels"], overwrite=True)
    report.stage("weights")
    compute_weight_store(stores["labels"], stores["weights"], WeightParams.from_config(config["weights"]),
                         threads=available_cores(), overwrite=True)

    # Warm-up: time steps of the same network and data (no validation, schedule irrelevant) ...
    report.stage("warm-up")
    warm, steps_w, skip = copy.deepcopy(config), int(sizes["warmup_steps"]), int(sizes["warmup_skip"])
    warm["train"].update(steps=10**9, val_every=10**9, checkpoint_every=10**9)
    train(warm, {"isbi": stores}, work / "warmup.pt", work / "warmup.csv", device=device, until_step=steps_w,
          overwrite=True)
    rows = list(iter_rows(work / "warmup.csv"))
    per_step = (rows[steps_w - 1]["seconds"] - rows[skip - 1]["seconds"]) / (steps_w - skip)
    # ... then a fresh run whose step count fills the budget: its schedule is a function of the step.
    # The budget shrinks if the steps before took longer than planned (the step must end in its limit).
    budget = min(float(params["train_seconds"]), params["deadline"] - time.time() - sizes["isbi_after"])
    steps = max(steps_w, int(budget / per_step))
    config["train"].update(steps=steps, val_every=steps, checkpoint_every=steps)
    report.stage("train", warmup_steps=steps_w, seconds_per_step=per_step, train_budget_seconds=budget, steps=steps)
    checkpoint = work / "isbi.pt"
    summary = train(config, {"isbi": stores}, checkpoint, work / "isbi_train.csv", device=device, overwrite=True)
    report.stage("predict", train_seconds=summary["seconds"], final_loss=summary["loss"],
                 in_loop_val_pixel_error=summary["val_pixel_error"], in_loop_val_rand_error=summary["val_rand_error"])

    probabilities = work / "prob.ome.zarr"
    t0 = time.perf_counter()
    predict(checkpoint, stores["raw"], probabilities, device=device, tta=config["predict"]["tta"],
            dtype=config["predict"]["dtype"], expected_arch=dict(model_cfg), pyramid_levels=0, overwrite=True)
    report.stage("decide", predict_seconds=time.perf_counter() - t0)
    decision = decide(config, probabilities, stores, work)
    report.stage("evaluate", decision=decision)
    instances = work / "instances.ome.zarr"
    postprocess(probabilities, instances, method=decision["method"], threshold=decision["threshold"],
                **{k: decision[k] for k in ("seed_threshold", "seed_prominence", "min_size") if k in decision},
                pyramid_levels=0, overwrite=True)
    metrics = evaluate(instances, stores["labels"], work / "isbi_metrics.json", probabilities=probabilities,
                       slices=ranges["val"], val_slices=ranges["val"],
                       threshold=decision["cell_threshold"], truth_mode="binary",
                       foreground_value=config["weights"]["foreground_value"])
    scores = metrics["summary"].get("val", metrics["summary"]["all"])
    report.stage("done", pixel_error=scores["pixel_error"], rand_error=scores["rand_error"])


if __name__ == "__main__":  # run by gpu_check.run_step as ``gpu_check_steps.py STEP PARAMS_JSON``
    if len(sys.argv) != 3 or sys.argv[1] not in STEPS:
        raise SystemExit("run benchmarks/gpu_check.py")
    run(sys.argv[1], json.loads(sys.argv[2]))
