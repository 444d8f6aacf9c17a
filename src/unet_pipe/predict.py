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
* Sharding (Snakemake scatter/gather): :func:`prepare` creates the staging
  store and plan, :func:`predict` with ``shard=(i, n)`` computes the blocks of
  the i-th z range, :func:`finalize` checks that every block is done and
  publishes the store.
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
    AxisGeometry,
    Roi,
    block_grid,
    block_tiles,
    check_tile_shape,
    fit_tile,
    iter_batches,
    read_mirrored,
    run_tiles,
    unet_axis_geometry,
    useful_fraction,
    volume_geometry,
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
#: CPU tile memory per worker beyond which larger tiles no longer speed up the forward
#: pass (measured on the default model: oneDNN's throughput is flat from ~600^2 inputs on)
#: but still cost RAM.
CPU_TILE_MEMORY_CAP = 2 << 30
#: Blocks submitted per wave per worker (waves keep the task graph and memory bounded).
WAVE_PER_WORKER = 8


# -------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PredictPlan:
    """Resolved geometry of one prediction (all sizes in voxels, z, y, x)."""

    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    tile: tuple[int, int, int]  # output tile (multiple of the pooling factor per axis)
    block: tuple[int, int, int]  # output block (multiple of chunks, or the whole axis)
    batch: int  # tiles per forward pass
    depth: int
    dims: int
    tta: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("shape", "chunks", "tile", "block"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    @property
    def geometry(self) -> tuple[AxisGeometry, AxisGeometry, AxisGeometry]:
        return volume_geometry(unet_axis_geometry(self.depth), self.dims)

    @property
    def window(self) -> tuple[int, ...]:
        """Input window (read) shape of one tile."""
        return tuple(g.net_input(t) for t, g in zip(self.tile, self.geometry))

    @property
    def useful_fraction(self) -> float:
        return useful_fraction(self.tile, self.geometry)

    def blocks(self, region: Roi | None = None) -> list[Roi]:
        return block_grid(self.shape, self.block, region)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PredictPlan:
        return cls(**data)


def activation_bytes_per_voxel(arch: dict) -> float:
    """Estimated peak float32 activation memory (bytes) per input-window voxel, no-grad forward.

    At the top decoder level a forward pass holds every skip connection, the
    up-convolved map, the concatenation and the next convolution's output:
    ``sum_l c_l / 2**(dims*l) + 4 c_0`` channels.  The factor 2 covers allocator
    slack and convolution workspaces (measured on CPU: 560-900 B per input voxel
    for base 16, depth 3, estimate 736 B).
    """
    c0, depth, dims = arch["base_channels"], arch["depth"], arch["dims"]
    skips = sum(c0 * 2**level / 2 ** (dims * level) for level in range(depth - 1))
    return 4.0 * (skips + 4 * c0 + arch.get("in_channels", 1) + arch["n_classes"]) * 2.0


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


def _spatial_axes(dims: int) -> tuple[int, ...]:
    return (1, 2) if dims == 2 else (0, 1, 2)


def _normalize_request(tile: int | Sequence[int] | None, dims: int, what: str) -> tuple[int, int, int] | None:
    """Expand a user tile (one edge, (y, x) or (z, y, x)) to (z, y, x); z is 1 in 2D."""
    if tile is None:
        return None
    values = [int(tile)] if isinstance(tile, (int, np.integer)) else [int(t) for t in tile]
    if len(values) == 1:
        values = values * dims
    if len(values) == 2 and dims == 2:
        values = [1, *values]
    if len(values) != 3 or (dims == 2 and values[0] != 1) or min(values) < 1:
        shape = "EDGE or Y X" if dims == 2 else "EDGE or Z Y X"
        raise ConfigError(None, f"{what} must be {shape} (positive integers) for a {dims}D model, got {tile}")
    return (values[0], values[1], values[2])


def _block_and_tile(extent: int, chunk: int, max_tile: int, axis: AxisGeometry, fit: bool) -> tuple[int, int]:
    """Block edge (whole chunks) and tile edge along one axis that minimise network input per output voxel.

    Cost of a block ``b`` cut into ``n`` tiles of input ``I``: ``n * I / b``.
    ``fit`` lets the tile shrink (never grow) to split the block evenly.
    Among equal costs the smaller block wins (more parallelism, less memory).
    """
    best: tuple[float, int, int] | None = None
    for k in range(1, -(-extent // chunk) + 1):
        b = min(k * chunk, extent)
        t = fit_tile(b, max_tile, axis.step) if fit else max_tile
        cost = -(-b // t) * axis.net_input(t) / b
        if best is None or cost < best[0] * (1 - 1e-9):
            best = (cost, b, t)
        if k * chunk >= 8 * max_tile:  # beyond this the last tile's waste is already < 1/8
            break
    assert best is not None
    return best[1], best[2]


def make_plan(
    arch: dict,
    shape: Sequence[int],
    chunks: Sequence[int],
    *,
    tile: int | Sequence[int] | None = None,
    block: Sequence[int] | None = None,
    batch: int | None = None,
    memory: int,
    tta: bool = False,
    dtype: str = "float32",
) -> PredictPlan:
    """Resolve tile, block and batch sizes.

    ``tile`` (output edge(s), multiples of the pooling factor) defaults to the
    largest that fits ``memory`` bytes per worker (paper: large tiles waste
    less context), capped at the volume.  ``block`` (z, y, x; multiples of
    ``chunks`` or whole axes) defaults per axis to the number of chunks whose
    even split into tiles reads the fewest input voxels per output voxel, and
    in z (2D) to enough slices for one ``batch``.  ``batch`` defaults to the
    tiles that fit ``memory`` (at most 16).  Raises :class:`ConfigError` for
    sizes that cannot work.
    """
    dims, depth = int(arch["dims"]), int(arch["depth"])
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(None, f"output dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    shape = tuple(int(s) for s in shape)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape))
    geometry = volume_geometry(unet_axis_geometry(depth), dims)
    axes = _spatial_axes(dims)
    per_voxel = activation_bytes_per_voxel(arch)
    whole = tuple(-(-n // g.step) * g.step for n, g in zip(shape, geometry))

    requested = _normalize_request(tile, dims, "tile")
    if requested is not None:
        try:
            check_tile_shape(requested, geometry)
        except ValueError as exc:
            raise ConfigError(None, f"tile {list(requested)}: {exc}") from None
        max_tile = tuple(min(t, w) for t, w in zip(requested, whole))
    else:
        # Largest cube/square window within the budget, minus the context, on the pooling grid.
        g = geometry[axes[-1]]
        edge = int((memory / per_voxel) ** (1.0 / dims)) - 2 * g.margin - g.step
        edge = max(g.step, (edge // g.step) * g.step)
        max_tile = tuple(min(edge, w) if a in axes else 1 for a, w in enumerate(whole))

    if block is None:
        picks = [
            _block_and_tile(n, c, t, g, fit=requested is None) if a in axes else (c, 1)
            for a, (n, c, t, g) in enumerate(zip(shape, chunks, max_tile, geometry))
        ]
        block_shape = [b for b, _ in picks]
        final_tile = tuple(t for _, t in picks)
    else:
        block_shape = [int(b) for b in block]
        if len(block_shape) != 3 or min(block_shape) < 1:
            raise ConfigError(None, f"block must be three positive integers Z Y X, got {block}")
        for b, c, n, name in zip(block_shape, chunks, shape, "zyx"):
            if b % c and b < n:
                raise ConfigError(
                    None, f"block {list(block_shape)}: the {name} edge {b} must be a multiple of the chunk edge {c}"
                    " (blocks must not share chunks) or cover the whole axis"
                )
        block_shape = [min(b, n) for b, n in zip(block_shape, shape)]
        final_tile = tuple(
            (fit_tile(b, t, g.step) if requested is None else t) if a in axes else 1
            for a, (b, t, g) in enumerate(zip(block_shape, max_tile, geometry))
        )
    window_voxels = math.prod(g.net_input(t) for t, g in zip(final_tile, geometry))
    tiles_per_block = math.prod(-(-b // t) for b, t in zip(block_shape, final_tile))
    if batch is None:
        batch = int(max(1, min(16, memory // (window_voxels * per_voxel))))
        if block is None and dims == 2 and batch > tiles_per_block:
            # 2D: deepen the block in z (whole chunks) until it holds one batch of tiles.
            slices = -(-batch // tiles_per_block)
            block_shape[0] = min(shape[0], -(-slices // chunks[0]) * chunks[0])
            tiles_per_block = math.prod(-(-b // t) for b, t in zip(block_shape, final_tile))
        batch = max(1, min(batch, tiles_per_block))
    elif batch < 1:
        raise ConfigError(None, f"batch must be >= 1, got {batch}")
    return PredictPlan(
        shape=shape,
        chunks=chunks,
        tile=final_tile,
        block=tuple(block_shape),
        batch=int(batch),
        depth=depth,
        dims=dims,
        tta=bool(tta),
        dtype=dtype,
    )


# ---------------------------------------------------------------------- forward


def _tta_transforms() -> list[tuple[int, bool]]:
    """The 8 elements of the square's symmetry group: (quarter turns, flip x first)."""
    return [(k, flip) for flip in (False, True) for k in range(4)]


class Predictor:
    """Maps a batch of raw input windows to foreground probabilities of the valid outputs.

    ``windows``: ``(B, z, y, x)`` raw values (z = 1 for a 2D model); returns
    float32 ``(B, z', y', x')``.  ``tta`` averages the probabilities of the 8
    rotations/flips in (y, x) (paper: ISBI 2012).  On CUDA the forward runs
    under autocast (bfloat16 where supported, else float16) unless
    ``precision='float32'``; softmax and averaging are always float32.
    """

    def __init__(self, model: UNet, device: str | torch.device = "cpu", tta: bool = False, precision: str = "auto"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dims = model.dims
        self.n_classes = model.arch["n_classes"]
        self.tta = tta
        self.amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda" and precision == "auto":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif precision not in ("auto", "float32"):
            raise ConfigError(None, f"precision must be 'auto' or 'float32', got {precision!r}")

    def _foreground(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        probs = torch.softmax(logits.float(), dim=1)
        return probs[:, 1:2] if self.n_classes == 2 else 1.0 - probs[:, 0:1]

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalize_raw(windows))
        x = x.unsqueeze(1) if self.dims == 3 else x  # 2D: the z axis (size 1) is the channel axis
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
    checkpoint: str
    raw: str
    staged: StagedImage
    plan: PredictPlan
    precision: str
    threads: int  # torch intra-op threads per compute slot (CPU)
    slots: int  # concurrent forward passes per process (CPU workers; GPUs count themselves)


@dataclass
class _Context:
    """Per-process state of a job: the input array and one predictor per compute device."""

    raw: Any
    devices: "queue.Queue[str]"
    predictors: dict[str, Predictor] = field(default_factory=dict)


_CONTEXTS: dict[str, _Context] = {}
_CONTEXTS_LOCK = threading.Lock()


def _compute_devices(slots: int) -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"] * max(1, slots)


def _register(job: _Job, model: UNet | None = None) -> _Context:
    """The process-wide context of ``job`` (built once; remote workers load the checkpoint)."""
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(job.token)
        if ctx is not None:
            return ctx
        if model is None:
            model, _ = model_from_checkpoint(job.checkpoint, map_location="cpu")
        devices = _compute_devices(job.slots)
        pool: queue.Queue[str] = queue.Queue()
        ctx = _Context(raw=open_image(job.raw), devices=pool)
        for device in dict.fromkeys(devices):
            replica = model if device == "cpu" else _copy_model(model)
            ctx.predictors[device] = Predictor(replica, device, tta=job.plan.tta, precision=job.precision)
        for device in devices:
            pool.put(device)
        _CONTEXTS[job.token] = ctx
        return ctx


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
            torch.set_num_threads(job.threads)  # per thread: OpenMP keeps the count per calling thread
        probs = run_tiles(data, window, region, tiles, ctx.predictors[device], plan.batch)
    finally:
        ctx.devices.put(device)
    job.staged.array[region.slices()] = encode_probabilities(probs, plan.dtype)
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
    from dask.callbacks import Callback

    class _Tick(Callback):
        def _posttask(self, key, result, dsk, state, id):  # noqa: A002 (dask's signature)
            if isinstance(result, int):
                progress.update(result)

    task = partial(compute_block, job)
    for wave in iter_batches(blocks, max(16, WAVE_PER_WORKER * threads)):
        delayed = [dask.delayed(task, pure=False)((b.start, b.shape)) for b in wave]
        with _Tick():
            dask.compute(*delayed, scheduler="threads", num_workers=threads)


def _run_distributed(job: _Job, blocks: list[Roi], address: str, progress: _Progress) -> None:
    from distributed import Client, as_completed

    with Client(address) as client:
        workers = max(1, sum(client.nthreads().values()))
        task = partial(compute_block, job)
        pending = iter(blocks)
        window = [client.submit(task, (b.start, b.shape), pure=False) for b, _ in zip(pending, range(2 * workers))]
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
    plan: PredictPlan | None
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


def _setup(checkpoint, raw, dest, expected_arch, *, tile, block, batch, tta, dtype, precision, device) -> _Setup:
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
        "device": "cuda" if device.startswith("cuda") else "cpu",
    }
    # Everything that changes output values; not workers, scheduler or shard (they do not).
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


def _read_plan(staged: StagedImage) -> PredictPlan | None:
    path = staged.staging / PLAN_FILE
    return PredictPlan.from_dict(json.loads(path.read_text())) if path.exists() else None


def _shared_plan(staged: StagedImage, make: Callable[[], PredictPlan]) -> PredictPlan:
    """The run's plan: the stored one, else ``make()`` stored atomically (first writer wins).

    Shards on different nodes may race here; ``os.link`` of a complete
    temporary file is atomic and fails if the plan exists (also on NFS), so
    all of them end up with the first plan written.
    """
    plan = _read_plan(staged)
    if plan is not None:
        return plan
    path = staged.staging / PLAN_FILE
    tmp = path.with_name(f".{PLAN_FILE}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(make().to_dict()))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    plan = _read_plan(staged)
    assert plan is not None
    return plan


def _shard_region(plan: PredictPlan, shard: tuple[int, int] | None, z_range: Sequence[int] | None) -> Roi | None:
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
        workers = torch.cuda.device_count() if device.startswith("cuda") else 1
    if workers < 1 or cores < 1:
        raise ConfigError(None, f"workers and threads must be >= 1, got {workers} and {cores}")
    if device == "cpu" and workers > cores:
        raise ConfigError(None, f"{workers} CPU workers on {cores} cores would oversubscribe them")
    setup = _setup(
        checkpoint, raw, dest, expected_arch, tile=tile, block=block, batch=batch, tta=tta, dtype=dtype,
        precision=precision, device=device,
    )  # fmt: skip
    staged = _open_staged(setup, overwrite=overwrite, must_exist=sharded)
    if prepare_only:
        return PredictResult(setup.dest, _read_plan(staged), 0, 0, time.perf_counter() - started, False)
    plan = _shared_plan(
        staged,
        lambda: make_plan(
            setup.model.arch, setup.meta.shape, setup.meta.chunks, tile=tile, block=block, batch=batch,
            memory=tile_memory_budget(device, workers), tta=tta, dtype=dtype,
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
        checkpoint=str(setup.checkpoint.resolve()),
        raw=str(setup.raw.resolve()),
        staged=staged,
        plan=plan,
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


def _publish(staged: StagedImage, plan: PredictPlan, setup: _Setup, pyramid_levels: int) -> Path:
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
        extra_attrs={"probability_scale": OUTPUT_DTYPES[plan.dtype][1], "predict": plan.to_dict(),
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
    device: str | None = None,
    tta: bool = False,
    dtype: str = "float32",
    precision: str = "auto",
    pyramid_levels: int = 2,
    expected_arch: dict | None = None,
) -> Path:
    """Gather step of a sharded run: check that every block is done, then publish ``dest``.

    Takes the same options as the :func:`predict` calls of the shards (they
    identify the staging store).  Raises :class:`OutputError` naming the
    missing blocks otherwise.
    """
    setup = _setup(
        checkpoint, raw, dest, expected_arch, tile=tile, block=block, batch=batch, tta=tta, dtype=dtype,
        precision=precision, device=_default_device(device),
    )  # fmt: skip
    staged = _open_staged(setup, overwrite=False, must_exist=True)
    plan = _read_plan(staged)
    if plan is None:
        raise OutputError(setup.dest, "no shard has run yet (no plan in DEST.partial)")
    return _publish(staged, plan, setup, pyramid_levels)


def read_probabilities(path: str | Path) -> np.ndarray:
    """The probabilities of a prediction output as float32 in [0, 1] (undoing uint8 quantisation)."""
    meta = image_metadata(path)
    scale = float(meta.attrs.get("unet_pipe", {}).get("probability_scale", 1.0))
    return np.asarray(open_image(path)[:], dtype=np.float32) * np.float32(scale)
