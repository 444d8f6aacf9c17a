"""Training loop: weighted cross-entropy, SGD (momentum 0.99) or Adam, validation, checkpoints.

Determinism.  Everything random derives from ``config['seed']``: the weight
initialisation and dropout (torch's global generator), the tile positions (a
``numpy.random.Generator``) and the augmentation (a CPU ``torch.Generator``).
Tiles are read and augmented in the main process (no DataLoader workers), so
two CPU runs with the same config and thread count give bit-identical
checkpoints, and a run interrupted at a checkpoint and continued with
``resume=True`` ends bit-identical to an uninterrupted one: the checkpoint
holds the model, the optimizer, the step, all three generator states (plus
CUDA's and the AMP grad scaler's on GPU) and the metric history.  The learning
rate is a pure function of the step (:func:`learning_rate`), so no scheduler
state is needed.  Precision (:mod:`unet_pipe.precision`, ``train.precision``):
``auto`` trains under bfloat16 autocast on CPUs with native bfloat16
(AMX/AVX512-BF16), float32 on other CPUs, float16 autocast with a gradient
scaler on CUDA; the precision used is stored in the checkpoint and a resume
that would resolve another is refused.  bfloat16 CPU runs are bit-identical
too.  On CUDA, cuDNN is put in deterministic mode too, but mixed
precision and atomics make GPU runs reproducible only approximately.

Files.  Periodic checkpoints go to ``<out>.partial``; the finished model is
written to ``<out>`` (both atomically) and the partial file removed, so a
workflow manager never sees an unfinished checkpoint under the final name.
The CSV log has one row per step: ``step, loss, lr, val_pixel_error,
val_rand_error, seconds`` (validation columns only filled on validation steps;
``seconds`` is wall time since the start, summed over resumed runs).
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from unet_pipe.augment import AugmentParams, augment_sample
from unet_pipe.errors import CheckpointError, ConfigError, InputError, OutputError, UnetPipeError
from unet_pipe.intensity import PERCENTILES
from unet_pipe.io import ATTRS_KEY, image_metadata, open_image
from unet_pipe.ngff import check_role
from unet_pipe.machine import available_cores, cpu_model, resolve_device
from unet_pipe.model import UNet, init_weights_from, load_checkpoint, save_checkpoint
from unet_pipe.precision import autocast, precision_record, resolve_precision
from unet_pipe.atomic import check_ours, forget, open_append, write_csv_atomic
from unet_pipe.progress import progress_bar
from unet_pipe.provenance import file_sha256, input_checksum
from unet_pipe.safety import check_writable
from unet_pipe.sampling import TileSampler, center_crop, volumes_from_config
# Validation lives in unet_pipe.validation; its public names stay importable from here.
from unet_pipe.validation import (  # noqa: F401 (re-exported)
    ValidationData,
    load_validation,
    predict_probabilities,
    validate,
)

log = logging.getLogger(__name__)

CSV_COLUMNS = ("step", "loss", "lr", "val_pixel_error", "val_rand_error", "seconds")
# Config keys that may change between a run and its resumption (they do not
# change what a step computes).  The precision is checked on what it resolved to instead
# (an `auto` run resumed on a machine that resolves it differently is refused).
_RESUMABLE_CHANGES = ("steps", "val_every", "checkpoint_every", "precision")
_AMP_MAX_SKIPPED = 20  # consecutive non-finite AMP losses before giving up


# --------------------------------------------------------------------------- loss and schedule


def training_memory_format(device: torch.device, precision: str, dims: int) -> torch.memory_format:
    """The layout training runs its activations and weights in.

    bfloat16 on the CPU: channels-last, the layout oneDNN's AMX convolutions (forward and
    backward) compute in; NCHW made every layer reorder.  Measured on an AMX Xeon (2
    threads, depth 4, base 16, 252^2 tiles): bf16 steps 1.6x float32's in NCHW, 2.5x in
    channels-last.  Everything else keeps the contiguous layout, so float32 and CUDA
    checkpoints stay bit-identical to earlier releases'.  Checkpoints store contiguous
    tensors either way (:func:`unet_pipe.model.save_checkpoint`).
    """
    if device.type == "cpu" and precision == "bfloat16":
        return torch.channels_last if dims == 2 else torch.channels_last_3d
    return torch.contiguous_format


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pixel-wise softmax cross-entropy weighted by the weight map, **mean** over pixels.

    ``mean_x w(x) · (-log p_{l(x)}(x))`` with ``p`` the softmax over the class
    axis 1 of ``logits (N, K, *S)``, ``target (N, *S)`` class ids and ``weights
    (N, *S)`` already cropped to the output window.  The paper's energy
    ``E = Σ_x w(x) log p_{l(x)}(x)`` is a sum; the mean (the sum divided by the
    pixel count) keeps the learning rate independent of the tile and batch size.
    Computed in float32 even under autocast.
    """
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    if weights.shape != target.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and target {tuple(target.shape)} do not match")
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (weights.float() * ce).mean()


def learning_rate(step: int, total: int, base: float, schedule: str) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total``.

    ``constant``; ``cosine``: ``base · (1 + cos(π step / total)) / 2``;
    ``step``: ``base``, ×0.1 from 50 % and ×0.01 from 75 % of the steps.
    """
    if schedule == "constant":
        return float(base)
    if schedule == "cosine":
        return float(base) * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    if schedule == "step":
        return float(base) * (0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def make_optimizer(model: torch.nn.Module, train_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD with momentum (paper: 0.99) or Adam (``momentum`` is then beta1)."""
    if train_cfg["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=train_cfg["lr"], momentum=train_cfg["momentum"])
    if train_cfg["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=train_cfg["lr"])
    raise ConfigError(None, f"key 'train.optimizer': unknown optimizer {train_cfg['optimizer']!r}")


# --------------------------------------------------------------------------- bookkeeping


def _check_outputs(out: Path, partial: Path, log_path: Path | None) -> None:
    """Before any step: outputs writable, and files we would replace are checkpoints of ours."""
    for path in (out, partial):
        if path.is_dir() or path.is_symlink():
            raise OutputError(path, "is a folder or a link, not a checkpoint file; refusing to replace it")
        if path.exists():
            try:
                load_checkpoint(path)
            except UnetPipeError as exc:
                raise CheckpointError(path, f"{exc.problem}; refusing to resume or replace it") from None
    for folder in {out.parent, *([log_path.parent] if log_path is not None else [])}:
        check_writable(folder, 0)
    if log_path is not None:
        check_ours(log_path)  # a user's CSV is refused (checkpoints: recognised by loading them, above)


def _check_init_unchanged(source: Path, record: Mapping[str, Any] | None) -> None:
    """A resumed fine-tuning run continues only while its train.init_from file is the one it started from.

    Resuming keeps the run's own weights (never re-initialised); but if the source
    checkpoint was replaced meanwhile, continuing would mix two starting points.
    """
    if not record:
        return
    path = Path(record["path"])
    current = file_sha256(path) if path.is_file() else "missing"
    if current != record["sha256"]:
        raise CheckpointError(
            source, f"started from train.init_from {path} (sha256 {record['sha256'][:12]}), which has changed "
            "since; pass --overwrite to start over"
        )


def partial_path(out: str | Path) -> Path:
    """Where periodic checkpoints of a run that writes ``out`` go."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _derived_seeds(seed: int) -> tuple[np.random.Generator, torch.Generator]:
    """Independent streams for tile positions and augmentation from the master seed."""
    tiles = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    aug_seed = int(np.random.SeedSequence([seed, 2]).generate_state(1, np.uint64)[0]) >> 1
    return tiles, torch.Generator().manual_seed(aug_seed)


def _resume_key(config: Mapping[str, Any]) -> dict:
    train_cfg = {k: v for k, v in config["train"].items() if k not in _RESUMABLE_CHANGES}
    return {"seed": config["seed"], "model": config["model"], "weights": config["weights"], "train": train_cfg}


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "<config>"


def _format_row(row: Mapping[str, Any]) -> dict:
    out = {}
    for key in CSV_COLUMNS:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out[key] = ""
        elif isinstance(value, float):
            out[key] = repr(value)
        else:
            out[key] = value
    return out


class _Tensorboard:
    def __init__(self, folder: str | Path | None) -> None:
        self.writer = None
        if folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(None, "--tensorboard needs the 'tensorboard' package (pip install tensorboard)") from None
        self.writer = SummaryWriter(str(folder))

    def add(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for key in ("loss", "lr", "val_pixel_error", "val_rand_error"):
            value = row.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_weights_match(labels: Path, weights: Path) -> None:
    """Refuse a weight map that records other labels than ``labels`` (same shape, other content).

    ``unet-pipe weights`` records its labels' checksum in the provenance; a
    weight map of another labelling trains silently on wrong borders.
    """
    open_image(labels)  # a damaged labels store is named as such, not as "other labels"
    recorded = image_metadata(weights).attrs.get(ATTRS_KEY, {}).get("provenance", {}).get("inputs", {}).get("labels")
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        return  # not made by `unet-pipe weights` (e.g. given by the user): nothing to compare
    if recorded["sha256"] != input_checksum(labels):
        raise InputError(weights, f"was computed from other labels ({recorded.get('path')}) than {labels}; "
                         "recompute it with `unet-pipe weights`")


# What each store given to train may hold (labels: truth, or instances curated into truth).
TRAIN_ROLES = {"raw": ("raw",), "labels": ("labels", "instances"), "weights": ("weights",)}


def open_stores(stores: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Open OME-Zarr paths lazily (``unet_pipe.io.open_image``); arrays pass through."""
    opened: dict[str, dict[str, Any]] = {}
    for name, parts in stores.items():
        for key, value in parts.items():
            if isinstance(value, (str, Path)) and key in TRAIN_ROLES:  # before comparing them with each other
                check_role(image_metadata(value), TRAIN_ROLES[key], f"train's --{key}")
        if isinstance(parts.get("labels"), (str, Path)) and isinstance(parts.get("weights"), (str, Path)):
            check_weights_match(Path(parts["labels"]), Path(parts["weights"]))
        opened[name] = {}
        for key, value in parts.items():
            if isinstance(value, (str, Path)):
                if key == "labels":
                    offset = image_metadata(value).offset
                    opened[name]["labels_offset"] = offset if any(offset) else None
                value = open_image(value)
            opened[name][key] = value
    return opened


# --------------------------------------------------------------------------- the loop


def train(
    config: dict,
    stores: Mapping[str, Mapping[str, Any]],
    out_checkpoint: str | Path,
    log_csv: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    until_step: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    tensorboard_dir: str | Path | None = None,
) -> dict:
    """Train a U-Net as ``config`` says; return a summary dict.

    ``stores``: ``{dataset: {'raw': ..., 'labels': ..., 'weights': ...}}`` with
    OME-Zarr paths or ``(z, y, x)`` arrays (``weights`` optional: uniform).
    ``resume``: continue from ``<out>.partial`` or ``<out>`` when one exists
    (start fresh otherwise).  ``until_step``: stop after this many steps
    (a checkpoint is written to ``<out>.partial``), e.g. to fit a job's time
    limit.  ``threads``: CPU threads (default: all cores available to the
    process).  Raises :class:`OutputError` if ``out`` exists and neither
    ``resume`` nor ``overwrite`` is given.
    """
    out = Path(out_checkpoint)
    partial = partial_path(out)
    log_path = Path(log_csv) if log_csv is not None else None
    if out.exists() and not (resume or overwrite):
        raise OutputError(out, "already exists; pass --resume to continue it or --overwrite to start over")
    _check_outputs(out, partial, log_path)
    train_cfg = config["train"]
    init = train_cfg.get("init_from")
    if init is not None and Path(init).resolve() in (out.resolve(), partial.resolve()):
        raise ConfigError(init, "train.init_from is this run's own checkpoint; copy it to another name first")
    total = int(train_cfg["steps"])
    stop = total if until_step is None else min(int(until_step), total)
    dev = torch.device(resolve_device(device))

    # Determinism settings (restored afterwards: this is a library function).
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    previous_threads = torch.get_num_threads()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    # Deterministic algorithms, but without their default of filling every new tensor's memory with
    # NaN first: that is for kernels that read memory they did not write, and every op here writes
    # its whole output (reruns and resumes are bit-identical: tests/test_train.py,
    # tests/test_determinism.py).  The fill cost 5 ms of a 29 ms bfloat16 step, 252^2 tiles on 2
    # cores of an AMX Xeon (measured).
    torch.utils.deterministic.fill_uninitialized_memory = False
    if dev.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        # Max-pool backward has no deterministic CUDA kernel: warn instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads or available_cores())
    try:
        return _train(config, stores, out, partial, log_path, resume, dev, total, stop, progress, tensorboard_dir)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn
        torch.set_num_threads(previous_threads)


def _run_summary(written: Path, step: int, total: int, history: list[dict], last_val: tuple[float, float],
                 precision: str) -> dict:
    """What a training run returns: the checkpoint written, the step, the last loss and validation."""
    return {
        "checkpoint": str(written),
        "step": step,
        "finished": step >= total,
        "loss": history[-1]["loss"] if history else float("nan"),
        "val_pixel_error": last_val[0],
        "val_rand_error": last_val[1],
        "seconds": history[-1]["seconds"] if history else 0.0,
        "precision": precision,
        "cpu_model": cpu_model(),
    }


def _training_inputs(config: dict, stores: Mapping[str, Mapping[str, Any]]) -> tuple[
    TileSampler, AugmentParams, list, dict[str, str], dict[str, list[float]], dict[str, Any]
]:
    """The tile sampler, the augmentation, the validation data, and what the checkpoint records of
    the inputs: their dtypes, voxel sizes and the normalisation rule with each stack's range."""
    train_cfg, model_cfg, weights_cfg = config["train"], config["model"], config["weights"]
    volumes = volumes_from_config(config, open_stores(stores))
    input_dtypes = {v.name: str(np.dtype(v.raw.dtype)) for v in volumes}

    # The voxel size (z, y, x µm) of each training stack: segment warns when a new stack's differs.
    voxel_sizes = {name: list(image_metadata(parts["raw"]).voxel_size) for name, parts in sorted(stores.items())
                   if isinstance(parts.get("raw"), (str, Path))}
    normalization = {
        "rule": "percentile",  # unet_pipe.intensity.intensity_range; predict applies it to its own stack
        "percentiles": list(PERCENTILES),
        "volumes": {v.name: v.intensity.to_list() for v in volumes if v.intensity is not None},
    }
    sampler = TileSampler(
        volumes,
        tile=train_cfg["tile"],
        depth=model_cfg["depth"],
        dims=model_cfg["dims"],
        label_mode=weights_cfg["label_mode"],
        foreground_value=weights_cfg["foreground_value"],
        unlabelled_value=weights_cfg.get("unlabelled_value"),
    )
    augment = AugmentParams.from_config(train_cfg.get("augment"))
    val_data = load_validation(
        volumes, weights_cfg["label_mode"], weights_cfg["foreground_value"], weights_cfg.get("unlabelled_value")
    )
    return sampler, augment, val_data, input_dtypes, voxel_sizes, normalization


def _restore(source: Path, config: dict, model: UNet, normalization: dict, precision: str, dev: torch.device,
             tile_rng: np.random.Generator, aug_gen: torch.Generator, scaler: Any, total: int) -> tuple[
    dict, int, list[dict], float, dict | None
]:
    """Continue from the checkpoint ``source``: refuse one of another architecture, config,
    normalisation or precision; load the weights and the random states.  Returns the optimiser's
    state, the step, the history, the seconds trained and the checkpoint it was initialised from."""
    use_cuda, use_scaler = dev.type == "cuda", precision == "float16"  # as _train decides them
    ckpt = load_checkpoint(source)
    if ckpt["arch"] != model.arch:
        raise CheckpointError(source, f"architecture {ckpt['arch']} differs from the config's {model.arch}")
    recorded = ckpt.get("config") or {}
    if "train" not in recorded or _resume_key(recorded) != _resume_key(config):
        key = _first_difference(_resume_key(recorded), _resume_key(config)) if "train" in recorded else "train"
        raise CheckpointError(
            source, f"was trained with a different config (key '{key}' differs); delete it or pass --overwrite to start over"
        )
    extra = ckpt.get("extra") or {}
    # The same config may normalise differently across releases (dtype maximum before the
    # percentile rule) or stacks (the percentiles of changed data): continuing would mix the two.
    recorded_norm = extra.get("input_normalization")
    if recorded_norm != normalization:
        was = (f"{recorded_norm.get('rule')} {recorded_norm.get('volumes')}" if isinstance(recorded_norm, dict)
               else "dtype maximum (an older release)")
        raise CheckpointError(
            source, f"was trained on inputs normalised by {was}, this run by the percentile rule "
            f"{normalization['volumes']}; pass --overwrite to start over"
        )
    if extra.get("precision", precision) != precision:
        raise CheckpointError(
            source, f"was trained in {extra['precision']} but this run resolves the precision to {precision}; "
            f"resume with --precision {extra['precision']} (or on a machine like the first) or pass --overwrite"
        )
    model.load_state_dict(ckpt["model_state"])
    optimizer_state = ckpt["optimizer_state"]
    step = int(ckpt["step"])
    torch.set_rng_state(ckpt["torch_rng_state"])
    tile_rng.bit_generator.state = extra["tile_rng"]
    aug_gen.set_state(extra["aug_rng"])
    if use_cuda and extra.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(extra["cuda_rng"])
    if use_scaler and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    history = [dict(r) for r in extra.get("history", []) if int(r["step"]) <= step]
    elapsed = float(extra.get("seconds", 0.0))
    init_record = extra.get("init_from")
    _check_init_unchanged(source, init_record)
    log.info("resuming %s at step %d of %d", source, step, total)
    return optimizer_state, step, history, elapsed, init_record


def _train(config: dict, stores: Mapping[str, Mapping[str, Any]], out: Path, partial: Path, log_path: Path | None,
           resume: bool, dev: torch.device, total: int, stop: int, progress: bool,
           tensorboard_dir: str | Path | None) -> dict:
    """The training run of :func:`train`: inputs, start (resumed, fine-tuned or fresh), the loop with its
    periodic checkpoints to ``partial``, and the final checkpoint ``out`` (or ``partial`` when stopped early)."""
    train_cfg, weights_cfg, seed = config["train"], config["weights"], int(config["seed"])
    sampler, augment, val_data, input_dtypes, voxel_sizes, normalization = _training_inputs(config, stores)
    model = _new_model(config["model"], seed)
    tile_rng, aug_gen = _derived_seeds(seed)
    precision = resolve_precision(train_cfg.get("precision", "auto"), dev, training=True)
    # float16's narrow range needs loss scaling; bfloat16 has float32's range and needs none.
    use_scaler = precision == "float16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    source = (partial if partial.exists() else out if out.exists() else None) if resume else None
    if resume and source is None:
        log.info("nothing to resume at %s; starting from step 0", out)
    optimizer_state, step, history, elapsed, init_record = _starting_state(
        source, config, model, normalization, precision, dev, tile_rng, aug_gen, scaler, total
    )
    memory_format = training_memory_format(dev, precision, model.dims)
    model.to(dev, memory_format=memory_format).train()
    optimizer = make_optimizer(model, train_cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    def save(path: Path) -> None:
        extra = {
            "tile_rng": tile_rng.bit_generator.state,
            "aug_rng": aug_gen.get_state(),
            "cuda_rng": torch.cuda.get_rng_state() if dev.type == "cuda" else None,
            "scaler": scaler.state_dict() if use_scaler else None,
            **precision_record(precision),  # the precision used, the CPU model and its bf16 flags
            "history": history, "seconds": elapsed + (time.perf_counter() - started),
            "tile": sampler.tile, "output": sampler.output, "input_normalization": normalization,
            "input_dtypes": input_dtypes, "voxel_sizes": voxel_sizes, "label_mode": weights_cfg["label_mode"],
            "init_from": init_record,  # {"path", "sha256"} of train.init_from, kept across resumes
        }  # fmt: skip
        save_checkpoint(path, model, optimizer, step=step, config=config, extra=extra)

    steps_log = _StepLog(log_path, history, tensorboard_dir, total, step, progress)
    started = time.perf_counter()
    last_val = (float("nan"), float("nan"))
    skipped = 0
    make_batch = _BatchMaker(dev, torch.get_num_threads())  # the count set by train()
    try:
        while step < stop:
            lr = learning_rate(step, total, train_cfg["lr"], train_cfg["lr_schedule"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            image, classes, weights = make_batch(
                sampler, augment, tile_rng, aug_gen, model, dev, train_cfg["batch_size"]
            )
            optimizer.zero_grad(set_to_none=True)
            with autocast(dev, precision):
                logits = model(image.contiguous(memory_format=memory_format))
            loss = weighted_cross_entropy(logits, classes, weights)
            skipped = _count_non_finite(loss, skipped, use_scaler, step)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            row: dict[str, Any] = {"step": step, "loss": float(loss.detach()), "lr": lr}
            if val_data and (step % train_cfg["val_every"] == 0 or step == total):
                last_val = validate(model, val_data, dev, config.get("postprocess", {}), precision)
                row["val_pixel_error"], row["val_rand_error"] = last_val
                log.info("step %d: loss %.4f, validation pixel error %.4f, Rand error %.4f", step, row["loss"],
                         *last_val)
            row["seconds"] = round(elapsed + time.perf_counter() - started, 3)
            steps_log.add(row)
            if step % train_cfg["checkpoint_every"] == 0 and step < total:
                save(partial)
    finally:
        steps_log.close()

    written = out if step >= total else partial
    save(written)
    if written == out:
        partial.unlink(missing_ok=True)
        forget(partial)
    return _run_summary(written, step, total, history, last_val, precision)


class _StepLog:
    """Where each step's row goes: the history, the training CSV (rewritten with a resumed run's
    history, then appended to row by row), TensorBoard and the progress line."""

    def __init__(self, log_path: Path | None, history: list[dict], tensorboard_dir: str | Path | None,
                 total: int, step: int, progress: bool) -> None:
        if log_path is not None:
            write_csv_atomic(log_path, [_format_row(r) for r in history], CSV_COLUMNS)
        self.history = history
        self.board = _Tensorboard(tensorboard_dir)
        self.csv_file = open_append(log_path) if log_path is not None else None
        self.writer = csv.DictWriter(self.csv_file, fieldnames=CSV_COLUMNS) if self.csv_file is not None else None
        self.bar = progress_bar(total=total, initial=step, enabled=progress, desc="train", unit="step",
                                dynamic_ncols=True)

    def add(self, row: dict) -> None:
        self.history.append(row)
        if self.writer is not None:
            self.writer.writerow(_format_row(row))
            self.csv_file.flush()
        self.board.add(row)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)  # before update: its line shows this step
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.board.close()
        if self.csv_file is not None:
            self.csv_file.close()


def _new_model(model_cfg: Mapping[str, Any], seed: int) -> UNet:
    """The network of the model section, initialised from ``seed`` (He init)."""
    torch.manual_seed(seed)
    return UNet(in_channels=1, n_classes=model_cfg["n_classes"], depth=model_cfg["depth"],
                base_channels=model_cfg["base_channels"], dims=model_cfg["dims"], dropout=model_cfg["dropout"])


def _starting_state(
    source: Path | None, config: dict, model: UNet, normalization: dict, precision: str, dev: torch.device,
    tile_rng: np.random.Generator, aug_gen: Any, scaler: Any, total: int,
) -> tuple[dict | None, int, list[dict], float, dict | None]:
    """(optimiser state, step, history, seconds, init record) to start from: a checkpoint being resumed
    (``source``), else ``train.init_from``'s weights (fine-tuning: the optimiser, schedule and step start
    afresh), else nothing."""
    if source is not None:
        return _restore(source, config, model, normalization, precision, dev, tile_rng, aug_gen, scaler, total)
    init_record = None  # the checkpoint whose weights started this run (fine-tuning)
    if config["train"].get("init_from") is not None:
        init_record = init_weights_from(model, config["train"]["init_from"])
        log.info("initialised from %s (sha256 %s)", init_record["path"], init_record["sha256"][:12])
    return None, 0, [], 0.0, init_record


def _training_batch(sampler: TileSampler, augment: AugmentParams, tile_rng: np.random.Generator, aug_gen: Any,
                    model: UNet, dev: torch.device, batch_size: int) -> tuple:
    """One augmented batch (image, classes and weights cropped to the output window) on ``dev``."""
    image, classes, weights = sampler.batch(batch_size, tile_rng)
    image, classes, weights = image.to(dev), classes.to(dev), weights.to(dev)
    image, classes, weights = augment_sample(image, classes, weights, augment, aug_gen, spatial_dims=model.dims)
    classes = center_crop(classes, model.margin, model.dims)
    weights = center_crop(weights, model.margin, model.dims)
    return image, classes, weights


class _BatchMaker:
    """Makes each training batch (:func:`_training_batch`); on the CPU with one OpenMP thread, and
    the loop's count of threads again afterwards.

    One thread, because one tile's sampling and augmentation are small element-wise ops: on 2
    threads of a loaded machine (load 7 on 2 cores) every OpenMP region waited for a descheduled
    thread: 0.24 s per 188^2 tile against 0.013 s on one thread (measured), next to 0.6-1.7 s for a
    depth-4/base-16 step.

    The count is set in the OpenMP runtime itself (threadpoolctl), where that runtime is the one
    torch computes with (checked: ``torch.get_num_threads()`` follows it); else with
    ``torch.set_num_threads``.  That one also clears oneDNN's cache of built kernels, so the next
    step rebuilt them: 1.5-2 ms of a 25 ms bfloat16 step, 252^2 tiles on 2 cores of an AMX Xeon
    (measured).  Making the batch on a thread of its own instead was slower still (its wake-ups
    and cold caches: loop/bare 0.815 against 0.865).  The batch is the same in every case (one
    thread, the same generators in the same order; tested).
    """

    def __init__(self, dev: torch.device, compute_threads: int) -> None:
        self.cpu, self.threads = dev.type == "cpu", compute_threads
        self.openmp: list[Any] = []  # the OpenMP runtimes (threadpoolctl) and their own thread counts
        self.counts: list[int] = []
        if self.cpu:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:  # an environment made before it was a dependency: the slower way
                log.debug("threadpoolctl is not installed; batches are made after torch.set_num_threads(1)")
                return
            self.openmp = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "openmp"]
            self.counts = [lib.num_threads for lib in self.openmp]  # each runtime gets its own back
            self._set_one()
            follows = torch.get_num_threads() == 1
            self._restore()
            if not (follows and torch.get_num_threads() == compute_threads):
                self.openmp = []  # torch computes with another runtime: torch.set_num_threads then

    def _set_one(self) -> None:
        for lib in self.openmp:
            lib.set_num_threads(1)

    def _restore(self) -> None:
        for lib, count in zip(self.openmp, self.counts):
            lib.set_num_threads(count)

    def __call__(self, *args: Any) -> tuple:
        if not self.cpu:
            return _training_batch(*args)
        if self.openmp:
            self._set_one()
        else:
            torch.set_num_threads(1)
        try:
            return _training_batch(*args)
        finally:
            if self.openmp:
                self._restore()
            else:
                torch.set_num_threads(self.threads)


def _count_non_finite(loss: torch.Tensor, skipped: int, use_scaler: bool, step: int) -> int:
    """Consecutive non-finite losses so far; a non-finite loss without a loss scaler (or too many with
    one, which skips those steps) is a diverged run."""
    if torch.isfinite(loss):
        return 0
    if not use_scaler or skipped + 1 > _AMP_MAX_SKIPPED:
        raise ConfigError(None, f"training diverged at step {step + 1} (loss {loss.item()}); lower 'train.lr'")
    return skipped + 1


def iter_rows(log_csv: str | Path) -> Iterator[dict]:
    """Rows of a training CSV with numbers parsed (empty cells become None)."""
    with open(log_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            yield {
                k: (None if v == "" else (int(v) if k == "step" else float(v))) for k, v in row.items()
            }
