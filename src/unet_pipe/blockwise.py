"""Block-wise execution of a U-Net: the model on a device, per-process workers, schedulers.

The machinery behind :func:`unet_pipe.predict.predict`, which owns the request
(checks, fingerprint, staging store, shared plan, shards, publishing):

* :class:`Predictor`: a model on one device mapping a batch of raw input
  windows to foreground probabilities (channels-last, bfloat16/float16 autocast,
  optional 8-fold test-time augmentation).
* :class:`BlockJob` and :func:`compute_block`: one output block read (with
  mirrored context), run tile batch by tile batch on a compute slot, encoded
  (:data:`unet_pipe.probabilities.OUTPUT_DTYPES`), written into the staging store and recorded done.
  Each process keeps one context per job (input array, one predictor per
  device, a queue of compute slots: each GPU once, or the CPU ``slots`` times),
  so reads and writes overlap with the forward passes of other blocks.
* :func:`run_blocks`: the blocks on local threads (dask's threaded scheduler)
  or on an existing ``dask.distributed`` cluster, submitted in bounded waves so
  memory is bounded by the blocks in flight, whatever the stack size.
* Resources: :func:`tile_memory_budget` (memory one worker's tiles may use,
  the input of the tile-size choice in :func:`unet_pipe.tiling.make_plan`),
  :func:`tune_allocator` (glibc malloc settings for
  large activations).
"""
from __future__ import annotations

import copy
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_pipe.intensity import IntensityRange, normalize_raw
from unet_pipe.io import StagedImage, open_image
from unet_pipe.machine import available_cores, available_memory
from unet_pipe.model import UNet, class_probabilities, fused_conv_relu_available, model_from_checkpoint
from unet_pipe.precision import autocast, resolve_precision
from unet_pipe.probabilities import encode_probabilities
from unet_pipe.progress import progress_bar
from unet_pipe.tiling import Roi, TilePlan, block_tiles, iter_batches, read_mirrored, run_tiles

#: Fraction of the free memory (GPU: device memory, CPU: RAM within the cgroup limit) tiles may use.
MEMORY_FRACTION = {"cuda": 0.6, "cpu": 0.25}
#: Tile memory per CPU worker at most: keeps RSS modest on shared nodes; CPU forward passes
#: are slow enough that the last few percent of useful output fraction do not matter.
CPU_TILE_MEMORY_CAP = 2 << 30
#: Blocks submitted per wave per worker (waves keep the task graph and memory bounded).
WAVE_PER_WORKER = 8


# --------------------------------------------------------------------- resources


def tile_memory_budget(device: str, workers: int) -> int:
    """Bytes one worker's tiles may use (a fraction of the free memory; CPU capped)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    budget = available_memory(device) * MEMORY_FRACTION[kind]
    if kind == "cpu":
        budget = min(budget / max(1, workers), CPU_TILE_MEMORY_CAP)
    return int(budget)


# ---------------------------------------------------------------------- forward


def tune_allocator() -> bool:
    """Let glibc keep freed tensor memory for reuse instead of unmapping it (process-wide).

    By default every activation above 32 MiB (and, in worker threads, above the
    64 MiB heap size) is a fresh ``mmap`` whose pages the kernel zeroes on first
    touch: 8 % of the CPU time of the paper's U-Net on a 700^2 window here
    (0.47 s system time of 5.8 s; 0.03 s after this).  One arena, a 1 GiB mmap
    threshold and a 2 GiB trim threshold avoid that; memory stays bounded by the
    largest forward pass.  Called by the CLI; a no-op (False) off glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return all(
        libc.mallopt(option, value) == 1
        for option, value in ((m_arena_max, 1), (m_mmap_threshold, 1 << 30), (m_trim_threshold, (1 << 31) - 1))
    )


TTA_MODES = (False, True, "flips")


def tta_transforms(tta: bool | str) -> list[tuple[int, bool]]:
    """(quarter turns, flip x first) of test-time augmentation ``tta``: ``True`` the 8
    elements of the square's symmetry group (the paper), ``"flips"`` its 4 mirrorings
    (identity, flip x, flip y, both: half the cost), ``False`` the identity alone."""
    if tta is True:
        return [(k, flip) for flip in (False, True) for k in range(4)]
    if tta == "flips":
        return [(0, False), (0, True), (2, True), (2, False)]  # (2, True) flips y; (2, False) both
    if tta is False:
        return [(0, False)]
    raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")


class Predictor:
    """Maps a batch of raw input windows to foreground probabilities of the valid outputs.

    ``windows``: ``(B, z, y, x)`` raw values (z = 1 for a 2D model), normalised with
    ``intensity`` (:func:`unet_pipe.intensity.normalize_raw`); returns
    float32 ``(B, z', y', x')``.  ``tta`` averages the probabilities of the 8
    rotations/flips in (y, x) (``True``; paper: ISBI 2012) or of the 4 mirrorings
    (``"flips"``), see :func:`tta_transforms`.  ``precision``: a request
    or a resolved precision (:func:`unet_pipe.precision.resolve_precision`;
    ``auto`` = bfloat16 autocast on CPUs with native bfloat16 and on GPUs that
    support it, float16 on other GPUs, else float32); ``float32`` on CUDA also
    turns TF32 off.  Softmax and averaging are always float32.
    """

    def __init__(
        self,
        model: UNet,
        device: str | torch.device = "cpu",
        tta: bool | str = False,
        precision: str = "auto",
        intensity: IntensityRange | None = None,
    ):
        self.device = torch.device(device)
        # Channels-last lets oneDNN/cuDNN use their fastest convolutions (measured 1.8x for
        # the paper's U-Net on CPU); values agree with NCHW to float reassociation.
        self.memory_format = torch.channels_last if model.dims == 2 else torch.channels_last_3d
        # A resolved precision (a job's workers all use the one the run chose) or a request.
        self.precision = resolve_precision(precision, self.device)
        # bfloat16 on the CPU: the weights are cast once here (a copy: the caller's model
        # keeps float32) instead of by autocast on every call, and the forward fuses each
        # convolution with its ReLU (UNet.forward_inference).  Bit-identical to bfloat16
        # autocast of the float32 model, which casts the same weights and inputs (tested).
        self.cast = self.device.type == "cpu" and self.precision == "bfloat16"
        if self.cast:
            model = copy.deepcopy(model).to(dtype=torch.bfloat16)
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        self.dims = model.dims
        self.n_classes = model.arch["n_classes"]
        self.transforms = tta_transforms(tta)
        self.intensity = intensity

    @property
    def path(self) -> str:
        """Which forward runs, for benchmarks and provenance."""
        if self.cast:
            fused = fused_conv_relu_available(torch.empty(0, dtype=torch.bfloat16))
            return "bf16 weights cast once, channels-last" + (", fused conv+ReLU (oneDNN)" if fused else "")
        return f"{self.precision} {'autocast' if self.precision != 'float32' else 'eager'}, channels-last"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output for a float32 batch on the device, in the run's precision."""
        if self.cast:
            return self.model.forward_inference(x.to(torch.bfloat16))
        with autocast(self.device, self.precision):
            return self.model(x)

    def _foreground(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        probs = class_probabilities(logits)
        return probs[:, 1:2] if self.n_classes == 2 else 1.0 - probs[:, 0:1]

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalize_raw(windows, self.intensity))
        x = x.unsqueeze(1) if self.dims == 3 else x  # 2D: the z axis (size 1) is the channel axis
        x = x.contiguous(memory_format=self.memory_format)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            if len(self.transforms) == 1:  # no TTA: the identity alone, in the input's memory format
                out = self._foreground(x)
            else:
                out = None
                for k, flip in self.transforms:
                    t = torch.flip(x, dims=(-1,)) if flip else x
                    p = self._foreground(torch.rot90(t, k, dims=(-2, -1)))
                    p = torch.rot90(p, -k, dims=(-2, -1))
                    p = torch.flip(p, dims=(-1,)) if flip else p
                    out = p if out is None else out + p
                out = out / float(len(self.transforms))
        out = out[:, 0] if self.dims == 3 else out  # 2D: channel axis back to z
        return out.cpu().numpy()


# ---------------------------------------------------------------------- workers


@dataclass
class BlockJob:
    """What a worker needs to compute blocks; picklable for ``dask.distributed``."""

    token: str
    device: str  # "cpu", "cuda" (every visible GPU) or "cuda:N"
    checkpoint: str
    raw: str
    staged: StagedImage
    plan: TilePlan
    tta: bool | str
    dtype: str  # stored dtype (OUTPUT_DTYPES)
    precision: str  # resolved (unet_pipe.precision.RESOLVED): every worker uses the run's choice
    intensity: IntensityRange | None  # the raw stack's normalisation (None: legacy dtype scaling)
    threads: int  # torch intra-op threads per compute slot (CPU)
    slots: int  # concurrent forward passes per process (CPU workers; GPUs count themselves)
    levels: int = 0  # pyramid levels each block writes with its level-0 region (StagedImage.stream_levels)


@dataclass
class _Context:
    """Per-process state of a job: the input array and one predictor per compute device."""

    raw: Any
    devices: "queue.Queue[str]"
    threads: int  # torch intra-op threads per CPU compute slot
    predictors: dict[str, Predictor] = field(default_factory=dict)


_CONTEXTS: dict[str, _Context] = {}
_CONTEXTS_LOCK = threading.Lock()


def _compute_devices(device: str, slots: int) -> list[str]:
    """One entry per concurrent forward pass: each GPU once, or ``slots`` times the CPU."""
    if device == "cuda":
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if device.startswith("cuda"):
        return [device]
    return ["cpu"] * max(1, slots)


def _register(job: BlockJob, model: UNet | None = None) -> _Context:
    """The process-wide context of ``job`` (built once; remote workers load the checkpoint)."""
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(job.token)
        if ctx is not None:
            return ctx
        slots, threads = job.slots, job.threads
        if model is None:  # a dask.distributed worker process: its own cores and threads
            model, _ = model_from_checkpoint(job.checkpoint, map_location="cpu")
            slots, threads = _worker_slots()
        devices = _compute_devices(job.device, slots)
        pool: queue.Queue[str] = queue.Queue()
        ctx = _Context(raw=open_image(job.raw), devices=pool, threads=threads)
        for device in dict.fromkeys(devices):
            replica = model if device == "cpu" else _copy_model(model)
            ctx.predictors[device] = Predictor(
                replica, device, tta=job.tta, precision=job.precision, intensity=job.intensity
            )
        for device in devices:
            pool.put(device)
        _CONTEXTS[job.token] = ctx
        return ctx


def _worker_slots() -> tuple[int, int]:
    """(compute slots, torch threads per slot) of this dask.distributed worker: cores shared by its threads."""
    try:
        from distributed import get_worker

        slots = max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        slots = 1
    return slots, max(1, available_cores() // slots)


def _copy_model(model: UNet) -> UNet:
    replica = UNet(**model.arch)
    replica.load_state_dict(model.state_dict())
    return replica


def _release(token: str) -> None:
    with _CONTEXTS_LOCK:
        _CONTEXTS.pop(token, None)


def compute_block(job: BlockJob, block: tuple[tuple[int, ...], tuple[int, ...]]) -> int:
    """Predict one output block, write it and record it done; returns its voxel count.

    The read (zarr decode, mirroring) happens before taking a compute device,
    the encode and write after releasing it, so with two threads per device the
    next block is read while the device computes.
    """
    region = Roi(*block)
    ctx = _register(job)
    plan = job.plan
    tiles, window = block_tiles(region, plan.tile, plan.geometry)
    data = read_mirrored(ctx.raw, window.start, window.shape)
    device = ctx.devices.get()
    try:
        if device == "cpu" and torch.get_num_threads() != ctx.threads:
            # Per thread: OpenMP keeps the count per calling thread.  Only when it differs:
            # set_num_threads also clears oneDNN's cache of built kernels.
            torch.set_num_threads(ctx.threads)
        probs = run_tiles(data, window, region, tiles, ctx.predictors[device], plan.batch)
    finally:
        ctx.devices.put(device)
    encoded = encode_probabilities(probs, job.dtype)
    if job.levels:
        # The block's region of every pyramid level at once: no re-read of level 0 at publish
        # (measured on 30 ISBI slices: the publish took 0.2 s of a 1.2 s predict).
        job.staged.write_slab(region.start[0], encoded, job.levels, y0=region.start[1])
    else:
        job.staged.array[region.slices()] = encoded
    job.staged.mark_done(region.key())
    return region.size


# ------------------------------------------------------------------- schedulers


class _Progress:
    """Blocks done, voxels/s and ETA on stderr (unet_pipe.progress); silent when disabled."""

    def __init__(self, total: int, done: int, enabled: bool, desc: str = "predict") -> None:
        self.bar = progress_bar(total=total, initial=done, unit="block", desc=desc, enabled=enabled, smoothing=0.1)
        self.voxels = 0
        self.start = time.perf_counter()
        self.lock = threading.Lock()

    def update(self, voxels: int) -> None:
        with self.lock:
            self.voxels += voxels
            rate = self.voxels / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate / 1e6:.2f} Mvox/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _run_threads(job: BlockJob, blocks: list[Roi], threads: int, progress: _Progress) -> None:
    import dask
    import dask.threaded
    from dask.callbacks import Callback

    class _Tick(Callback):
        def _posttask(self, key, result, dsk, state, id):  # noqa: A002 (dask's signature)
            if isinstance(result, int):
                progress.update(result)

    task = partial(compute_block, job)
    for wave in iter_batches(blocks, max(16, WAVE_PER_WORKER * threads)):
        delayed = [dask.delayed(task, pure=False)((b.start, b.shape)) for b in wave]
        with _Tick():
            # The threaded scheduler itself: naming it "threads" would import distributed (0.3 s).
            dask.compute(*delayed, scheduler=dask.threaded.get, num_workers=threads)


def _run_distributed(job: BlockJob, blocks: list[Roi], address: str, progress: _Progress) -> None:
    from distributed import Client, as_completed

    with Client(address) as client:
        workers = max(1, sum(client.nthreads().values()))
        task = partial(compute_block, job)
        pending = iter(blocks)
        window = [client.submit(task, (b.start, b.shape), pure=False) for b in islice(pending, 2 * workers)]
        if not window:
            return
        running = as_completed(window)
        for future in running:
            progress.update(future.result())  # re-raises a worker's exception here
            future.release()
            nxt = next(pending, None)
            if nxt is not None:
                running.add(client.submit(task, (nxt.start, nxt.shape), pure=False))


def run_blocks(
    job: BlockJob,
    blocks: list[Roi],
    *,
    total: int,
    model: UNet,
    workers: int,
    scheduler: str | None = None,
    progress: bool = False,
) -> None:
    """Compute ``blocks`` of ``job``: on ``scheduler`` (a ``dask.distributed`` address) or local threads.

    ``total``: blocks of the call's range, finished ones included (progress
    bar); ``model``: the loaded network, shared by the local threads (remote
    workers load the checkpoint themselves); ``workers``: local compute slots
    (CPU workers or GPUs).  Restores this thread's torch thread count.
    """
    # The stack in each line: jobs of several datasets share the Snakemake console.
    bar = _Progress(total, total - len(blocks), progress, f"predict {'/'.join(Path(job.raw).parts[-2:])}")
    previous_threads = torch.get_num_threads()
    try:
        if blocks and scheduler:
            _run_distributed(job, blocks, scheduler, bar)
        elif blocks:
            _register(job, model)
            io_threads = 2 if job.device.startswith("cuda") else 1  # GPU: read the next block while one computes
            _run_threads(job, blocks, workers * io_threads, bar)
    finally:
        bar.close()
        _release(job.token)
        torch.set_num_threads(previous_threads)

