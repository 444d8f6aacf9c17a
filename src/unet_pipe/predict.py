"""Overlap-tile inference of a U-Net over an OME-Zarr stack, block by block with Dask.

Contract
--------
* Input: a checkpoint (:func:`unet_pipe.model.model_from_checkpoint`) and a
  (z, y, x) OME-Zarr image; output: an OME-Zarr image of the same shape,
  chunks and voxel size holding the foreground (cell) probability
  ``softmax(logits)[1]`` (``1 - p(class 0)`` for more than two classes) as
  float32, float16 or uint8 (``round(255 p)``; the attribute
  ``unet_pipe.probability_scale`` gives the factor back to [0, 1]).
* Overlap-tile (paper Fig. 2): every output tile is the valid output of an
  input window that extends ``margin`` voxels further on each side; at the
  volume borders the context is mirrored (:mod:`unet_pipe.tiling`).  Tile
  origins lie on the pooling grid, so the result equals a whole-volume forward
  pass whatever the tile size, block size or worker count (to float
  reassociation, <= 1e-5 in float32; tested).  2D networks run slice by slice
  (anisotropic EM), 3D networks on (z, y, x) windows.
* Work is split into *blocks* aligned with the output chunks (no two tasks
  write the same chunk).  A block reads the union of its tiles' windows once,
  runs its tiles in batches and writes its region into ``DEST.partial``, then
  records itself done: a killed run restarts with only unfinished blocks and
  ends bit-identical.  The plan (tile, block, batch) is stored with the
  staging store, so resumes and shards use exactly the same one.
* Parallelism: threads on one machine (CPU: ``torch threads x workers <=
  cores``; GPU: one compute slot per GPU, two threads per GPU so the next
  block is read and decoded while the GPU works, mixed precision, pinned
  memory), or an existing ``dask.distributed`` cluster (``scheduler``).
  Blocks are submitted in bounded waves, so memory is bounded by the blocks in
  flight, independent of the stack size.
* Sharding (Snakemake scatter/gather): ``predict(prepare_only=True)``
  creates the staging store (once, so shards never race to create it),
  ``predict(shard=(i, n))`` computes the blocks of the i-th z range (the first
  shard to start stores the plan for all), :func:`finalize` checks that every
  block is done and publishes the store.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import zarr

from unet_pipe.data import normalize_raw
from unet_pipe.errors import CheckpointError, ConfigError, InputError, OutputError
from unet_pipe.io import StagedImage, image_metadata, open_image
from unet_pipe.model import UNet, model_from_checkpoint
from unet_pipe.provenance import input_checksum, provenance
from unet_pipe.tiling import (
    Roi,
    TilePlan,
    block_tiles,
    iter_batches,
    make_plan,
    read_mirrored,
    run_tiles,
)

log = logging.getLogger(__name__)

#: Output dtypes and the factor that maps stored values back to probabilities.
OUTPUT_DTYPES: dict[str, tuple[type, float]] = {
    "float32": (np.float32, 1.0),
    "float16": (np.float16, 1.0),
    "uint8": (np.uint8, 1.0 / 255.0),
}
#: The plan of a run, next to the arrays in ``DEST.partial`` (created once, atomically).
PLAN_FILE = "predict_plan.json"
#: Fraction of the free memory (GPU: device memory, CPU: RAM within the cgroup limit) tiles may use.
MEMORY_FRACTION = {"cuda": 0.6, "cpu": 0.25}
#: Tile memory per CPU worker at most: keeps RSS modest on shared nodes; CPU forward passes
#: are slow enough that the last few percent of useful output fraction do not matter.
CPU_TILE_MEMORY_CAP = 2 << 30
#: Blocks submitted per wave per worker (waves keep the task graph and memory bounded).
WAVE_PER_WORKER = 8


# ------------------------------------------------------------------------ memory


def available_memory(device: str) -> int:
    """Free memory in bytes on ``device`` (CPU: RAM, bounded by a cgroup limit such as SLURM's)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    free = psutil.virtual_memory().available
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            free = min(free, max(0, int(limit) - usage))
        break
    return int(free)


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


def _tta_transforms() -> list[tuple[int, bool]]:
    """The 8 elements of the square's symmetry group: (quarter turns, flip x first)."""
    return [(k, flip) for flip in (False, True) for k in range(4)]


class Predictor:
    """Maps a batch of raw input windows to foreground probabilities of the valid outputs.

    ``windows``: ``(B, z, y, x)`` raw values (z = 1 for a 2D model); returns
    float32 ``(B, z', y', x')``.  ``tta`` averages the probabilities of the 8
    rotations/flips in (y, x) (paper: ISBI 2012).  On CUDA the forward runs
    under autocast (bfloat16 where supported, else float16) unless
    ``precision='float32'`` (then also without TF32); softmax and averaging
    are always float32.
    """

    def __init__(self, model: UNet, device: str | torch.device = "cpu", tta: bool = False, precision: str = "auto"):
        self.device = torch.device(device)
        # Channels-last lets oneDNN/cuDNN use their fastest convolutions (measured 1.8x for
        # the paper's U-Net on CPU); values agree with NCHW to float reassociation.
        self.memory_format = torch.channels_last if model.dims == 2 else torch.channels_last_3d
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        self.dims = model.dims
        self.n_classes = model.arch["n_classes"]
        self.tta = tta
        self.amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda" and precision == "auto":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif precision not in ("auto", "float32"):
            raise ConfigError(None, f"precision must be 'auto' or 'float32', got {precision!r}")

    def _foreground(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and self.amp_dtype is None:
            # precision='float32' means float32: no TF32 convolutions (cuDNN's default).
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                logits = self.model(x)
        else:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(x)
        probs = torch.softmax(logits.float(), dim=1)
        return probs[:, 1:2] if self.n_classes == 2 else 1.0 - probs[:, 0:1]

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalize_raw(windows))
        x = x.unsqueeze(1) if self.dims == 3 else x  # 2D: the z axis (size 1) is the channel axis
        x = x.contiguous(memory_format=self.memory_format)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            if not self.tta:
                out = self._foreground(x)
            else:
                out = None
                for k, flip in _tta_transforms():
                    t = torch.flip(x, dims=(-1,)) if flip else x
                    p = self._foreground(torch.rot90(t, k, dims=(-2, -1)))
                    p = torch.rot90(p, -k, dims=(-2, -1))
                    p = torch.flip(p, dims=(-1,)) if flip else p
                    out = p if out is None else out + p
                out = out / 8.0
        out = out[:, 0] if self.dims == 3 else out  # 2D: channel axis back to z
        return out.cpu().numpy()


def encode_probabilities(probs: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities in [0, 1] as the stored dtype (uint8: ``round(255 p)``)."""
    if dtype == "uint8":
        return np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)
    return probs.astype(OUTPUT_DTYPES[dtype][0])


# ---------------------------------------------------------------------- workers


@dataclass
class _Job:
    """What a worker needs to compute blocks; picklable for ``dask.distributed``."""

    token: str
    device: str  # "cpu", "cuda" (every visible GPU) or "cuda:N"
    checkpoint: str
    raw: str
    staged: StagedImage
    plan: TilePlan
    tta: bool
    dtype: str  # stored dtype (OUTPUT_DTYPES)
    precision: str
    threads: int  # torch intra-op threads per compute slot (CPU)
    slots: int  # concurrent forward passes per process (CPU workers; GPUs count themselves)


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


def _register(job: _Job, model: UNet | None = None) -> _Context:
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
            ctx.predictors[device] = Predictor(replica, device, tta=job.tta, precision=job.precision)
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
    return slots, max(1, _cores() // slots)


def _copy_model(model: UNet) -> UNet:
    replica = UNet(**model.arch)
    replica.load_state_dict(model.state_dict())
    return replica


def _release(token: str) -> None:
    with _CONTEXTS_LOCK:
        _CONTEXTS.pop(token, None)


def compute_block(job: _Job, block: tuple[tuple[int, ...], tuple[int, ...]]) -> int:
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
        if device == "cpu":
            torch.set_num_threads(ctx.threads)  # per thread: OpenMP keeps the count per calling thread
        probs = run_tiles(data, window, region, tiles, ctx.predictors[device], plan.batch)
    finally:
        ctx.devices.put(device)
    job.staged.array[region.slices()] = encode_probabilities(probs, job.dtype)
    job.staged.mark_done(region.key())
    return region.size


# ------------------------------------------------------------------- schedulers


class _Progress:
    """Blocks done, voxels/s and ETA on stderr (tqdm); silent when disabled."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="block", desc="predict", disable=not enabled, smoothing=0.1)
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


def _run_threads(job: _Job, blocks: list[Roi], threads: int, progress: _Progress) -> None:
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


def _run_distributed(job: _Job, blocks: list[Roi], address: str, progress: _Progress) -> None:
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


# --------------------------------------------------------------------- frontend


@dataclass(frozen=True)
class PredictResult:
    """What a call did: the plan, blocks computed now / in its range, wall time in seconds."""

    dest: Path
    plan: TilePlan | None
    computed: int
    total: int
    seconds: float
    committed: bool

    @property
    def voxels_per_s(self) -> float:
        if self.plan is None or not self.total:
            return 0.0
        return math.prod(self.plan.shape) * self.computed / len(self.plan.blocks()) / max(self.seconds, 1e-9)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(None, f"device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(None, f"device {device!r} requested but no CUDA device is visible")
    return device


def _load_model(checkpoint: Path, expected_arch: dict | None) -> UNet:
    model, _ = model_from_checkpoint(checkpoint, map_location="cpu")
    if expected_arch is not None:
        differ = {k: (model.arch.get(k), v) for k, v in expected_arch.items() if model.arch.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}" for k, (a, b) in differ.items())
            raise CheckpointError(checkpoint, f"architecture does not match the configured model ({detail})")
    if model.arch["in_channels"] != 1:
        raise CheckpointError(checkpoint, f"expects {model.arch['in_channels']} input channels; EM stacks have 1")
    return model


@dataclass
class _Setup:
    """A run's inputs, checked: model, input metadata, the request and its fingerprint."""

    checkpoint: Path
    raw: Path
    dest: Path
    model: UNet
    meta: Any
    request: dict
    fingerprint: str


def _setup(checkpoint, raw, dest, expected_arch, *, tile, block, batch, tta, dtype, precision) -> _Setup:
    checkpoint, raw, dest = Path(checkpoint), Path(raw), Path(dest)
    model = _load_model(checkpoint, expected_arch)
    meta = image_metadata(raw)  # InputError unless a 3D (z, y, x) OME-Zarr image
    if model.dims == 3 and min(meta.shape) < 2:
        raise InputError(raw, f"a 3D model needs at least 2 voxels per axis, the image has shape {meta.shape}")
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(None, f"output dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    request = {
        "tile": None if tile is None else np.atleast_1d(tile).astype(int).tolist(),
        "block": None if block is None else [int(b) for b in block],
        "batch": batch,
        "tta": bool(tta),
        "dtype": dtype,
        "precision": precision,
    }
    # What changes output values, except the device kind: a prepare job may run on a CPU node
    # and its shards on GPU nodes; the kind is recorded with the plan and checked there.
    fingerprint = json.dumps(
        {"checkpoint": input_checksum(checkpoint), "raw": input_checksum(raw), "request": request}, sort_keys=True
    )
    return _Setup(checkpoint, raw, dest, model, meta, request, fingerprint)


def _staging_matches(dest: Path, fingerprint: str) -> bool:
    try:
        group = zarr.open_group(str(dest.with_name(dest.name + ".partial")), mode="r", zarr_format=2)
        return group.attrs.get("unet_pipe", {}).get("staging", {}).get("fingerprint") == fingerprint
    except Exception:  # absent or unreadable: not ours
        return False


def _open_staged(setup: _Setup, *, overwrite: bool, must_exist: bool) -> StagedImage:
    """``DEST.partial`` for this request: resumed when it matches, else created (unless ``must_exist``)."""
    if must_exist and not _staging_matches(setup.dest, setup.fingerprint):
        raise OutputError(
            setup.dest, "no matching staging store DEST.partial: run `unet-pipe predict --prepare` with the same"
            " checkpoint, input and options first"
        )
    return StagedImage(
        setup.dest,
        shape=setup.meta.shape,
        dtype=OUTPUT_DTYPES[setup.request["dtype"]][0],
        chunks=setup.meta.chunks,
        voxel_size=setup.meta.voxel_size,
        kind="image",
        resume=True,
        fingerprint=setup.fingerprint,
        overwrite=overwrite,
    )


def _read_plan(staged: StagedImage) -> tuple[TilePlan, str] | None:
    """The stored plan and the device kind ("cpu" or "cuda") it was made for."""
    path = staged.staging / PLAN_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return TilePlan.from_dict(data["plan"]), data["device"]


def _shared_plan(staged: StagedImage, device: str, make: Callable[[], TilePlan]) -> TilePlan:
    """The run's plan: the stored one, else ``make()`` stored atomically (first writer wins).

    Shards on different nodes may race here; ``os.link`` of a complete
    temporary file is atomic and fails if the plan exists (also on NFS), so
    all of them end up with the first plan written.  Every block of a run is
    computed on the same device kind (so that resumed runs end bit-identical).
    """
    kind = "cuda" if device.startswith("cuda") else "cpu"
    stored = _read_plan(staged)
    if stored is None:
        path = staged.staging / PLAN_FILE
        tmp = path.with_name(f".{PLAN_FILE}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({"plan": make().to_dict(), "device": kind}))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        stored = _read_plan(staged)
        assert stored is not None
    plan, made_for = stored
    if made_for != kind:
        raise ConfigError(
            None, f"{staged.staging} was started on {made_for}; continue it there (--device {made_for}) or delete it"
        )
    return plan


def _shard_region(plan: TilePlan, shard: tuple[int, int] | None, z_range: Sequence[int] | None) -> Roi | None:
    """The z range of block starts this call computes (None = all)."""
    if shard is not None:
        index, count = (int(v) for v in shard)
        if not (count >= 1 and 0 <= index < count):
            raise ConfigError(None, f"shard must be I N with 0 <= I < N, got {index} {count}")
        rows = -(-plan.shape[0] // plan.block[0])
        lo, hi = index * rows // count * plan.block[0], (index + 1) * rows // count * plan.block[0]
    elif z_range is not None:
        lo, hi = (int(v) for v in z_range)
        if not 0 <= lo < hi:
            raise ConfigError(None, f"z range must be A B with 0 <= A < B, got {lo} {hi}")
    else:
        return None
    unbounded = 1 << 62
    return Roi((lo, 0, 0), (hi - lo, unbounded, unbounded))


def predict(
    checkpoint: str | Path,
    raw: str | Path,
    dest: str | Path,
    *,
    tile: int | Sequence[int] | None = None,
    block: Sequence[int] | None = None,
    batch: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    tta: bool = False,
    dtype: str = "float32",
    precision: str = "auto",
    scheduler: str | None = None,
    shard: tuple[int, int] | None = None,
    z_range: Sequence[int] | None = None,
    prepare_only: bool = False,
    overwrite: bool = False,
    pyramid_levels: int = 2,
    expected_arch: dict | None = None,
    progress: bool = False,
) -> PredictResult:
    """Predict foreground probabilities of ``raw`` into the OME-Zarr ``dest``.

    ``tile``: output tile edge(s) (None = largest that fits the free memory);
    ``block``: (z, y, x) voxels per task, whole output chunks; ``batch``: tiles
    per forward pass; ``workers``: CPU workers sharing ``threads`` cores
    (default all of this process's; torch threads = threads // workers) — with
    GPUs one per GPU; ``scheduler``: a ``dask.distributed`` address (workers
    there must see the same files).  ``shard=(i, n)`` or ``z_range=(a, b)``:
    compute only the blocks starting in that z range of a store made with
    ``prepare_only`` and do not publish (see :func:`finalize`).  Otherwise
    ``dest`` is published when done.  An interrupted call, re-run with the
    same arguments, resumes from its finished blocks and ends bit-identical.
    """
    started = time.perf_counter()
    device = _default_device(device)
    sharded = shard is not None or z_range is not None
    cores = _cores() if threads is None else int(threads)
    if workers is None:
        workers = torch.cuda.device_count() if device == "cuda" else 1
    if workers < 1 or cores < 1:
        raise ConfigError(None, f"workers and threads must be >= 1, got {workers} and {cores}")
    if device == "cpu" and workers > cores:
        raise ConfigError(None, f"{workers} CPU workers on {cores} cores would oversubscribe them")
    setup = _setup(
        checkpoint, raw, dest, expected_arch, tile=tile, block=block, batch=batch, tta=tta, dtype=dtype,
        precision=precision,
    )  # fmt: skip
    staged = _open_staged(setup, overwrite=overwrite, must_exist=sharded)
    if prepare_only:
        return PredictResult(setup.dest, None, 0, 0, time.perf_counter() - started, False)
    plan = _shared_plan(
        staged,
        device,
        lambda: make_plan(
            setup.model.arch, setup.meta.shape, setup.meta.chunks, tile=tile, block=block, batch=batch,
            memory=tile_memory_budget(device, workers),
            min_z_blocks=int(shard[1]) if shard is not None else 1,
        ),
    )  # fmt: skip
    log.info(
        "plan: tile %s, input window %s (useful fraction %.2f), block %s, batch %d; %d workers x %d threads",
        plan.tile, plan.window, plan.useful_fraction, plan.block, plan.batch, workers, max(1, cores // workers),
    )  # fmt: skip
    mine = plan.blocks(_shard_region(plan, shard, z_range))
    todo = [b for b in mine if not staged.is_done(b.key())]
    job = _Job(
        token=uuid.uuid4().hex,
        device=device,
        checkpoint=str(setup.checkpoint.resolve()),
        raw=str(setup.raw.resolve()),
        staged=staged,
        plan=plan,
        tta=bool(tta),
        dtype=dtype,
        precision=precision,
        threads=max(1, cores // workers),
        slots=workers,
    )
    bar = _Progress(len(mine), len(mine) - len(todo), progress)
    previous_threads = torch.get_num_threads()
    try:
        if todo and scheduler:
            _run_distributed(job, todo, scheduler, bar)
        elif todo:
            _register(job, setup.model)
            io_threads = 2 if device.startswith("cuda") else 1  # GPU: read the next block while one computes
            _run_threads(job, todo, workers * io_threads, bar)
    finally:
        bar.close()
        _release(job.token)
        torch.set_num_threads(previous_threads)
    committed = False
    if not sharded:
        _publish(staged, plan, setup, pyramid_levels)
        committed = True
    return PredictResult(setup.dest, plan, len(todo), len(mine), time.perf_counter() - started, committed)


def _publish(staged: StagedImage, plan: TilePlan, setup: _Setup, pyramid_levels: int) -> Path:
    missing = [b for b in plan.blocks() if not staged.is_done(b.key())]
    if missing:
        raise OutputError(
            setup.dest, f"{len(missing)} of {len(plan.blocks())} blocks are not computed yet"
            f" (first missing at z={missing[0].start[0]}); run the missing shards first"
        )
    (staged.staging / PLAN_FILE).unlink(missing_ok=True)  # kept in the attributes instead
    params = {**setup.request, "plan": plan.to_dict()}
    return staged.commit(
        pyramid_levels,
        provenance=provenance({"checkpoint": setup.checkpoint, "raw": setup.raw}, params),
        extra_attrs={"probability_scale": OUTPUT_DTYPES[setup.request["dtype"]][1], "predict": plan.to_dict(),
                     "content": "foreground probability"},
    )  # fmt: skip


def finalize(
    checkpoint: str | Path,
    raw: str | Path,
    dest: str | Path,
    *,
    tile: int | Sequence[int] | None = None,
    block: Sequence[int] | None = None,
    batch: int | None = None,
    tta: bool = False,
    dtype: str = "float32",
    precision: str = "auto",
    pyramid_levels: int = 2,
    expected_arch: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Gather step of a sharded run: check that every block is done, then publish ``dest``.

    Takes the same options as the :func:`predict` calls of the shards (they
    identify the staging store).  Raises :class:`OutputError` naming the
    missing blocks otherwise.
    """
    setup = _setup(
        checkpoint, raw, dest, expected_arch, tile=tile, block=block, batch=batch, tta=tta, dtype=dtype,
        precision=precision,
    )  # fmt: skip
    staged = _open_staged(setup, overwrite=overwrite, must_exist=True)
    stored = _read_plan(staged)
    if stored is None:
        raise OutputError(setup.dest, "no shard has run yet (no plan in DEST.partial)")
    return _publish(staged, stored[0], setup, pyramid_levels)


def read_probabilities(path: str | Path) -> np.ndarray:
    """The probabilities of a prediction output as float32 in [0, 1] (undoing uint8 quantisation)."""
    meta = image_metadata(path)
    scale = float(meta.attrs.get("unet_pipe", {}).get("probability_scale", 1.0))
    return np.asarray(open_image(path)[:], dtype=np.float32) * np.float32(scale)
