"""Overlap-tile inference of a U-Net over an OME-Zarr stack, block by block with Dask.

The entry points (:func:`predict`, :func:`finalize`, :func:`read_probabilities`)
and the request: checks, fingerprint, staging store, shared plan, shards and
publishing.  Running the blocks (the model on a device, worker contexts, the
threaded and ``dask.distributed`` schedulers) is :mod:`unet_pipe.blockwise`,
whose public names are re-exported here.

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
* Precision (:mod:`unet_pipe.precision`): ``auto`` runs the forward passes
  under bfloat16 autocast on CPUs with native bfloat16 (AMX/AVX512-BF16) and
  on GPUs, float32 on other CPUs; the precision used, the CPU model and its
  flags are stored in the output's attributes (``unet_pipe.compute``).  Tile
  invariance and bit-identical resumes hold within one precision; bfloat16
  differs from float32 by about 1e-2 in p (tested bound).
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
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import zarr

# The execution machinery lives in unet_pipe.blockwise; its public names stay importable from here.
from unet_pipe.blockwise import (  # noqa: F401 (re-exported)
    CPU_TILE_MEMORY_CAP,
    MEMORY_FRACTION,
    WAVE_PER_WORKER,
    BlockJob,
    Predictor,
    compute_block,
    run_blocks,
    tile_memory_budget,
    TTA_MODES,
    tta_transforms,
    tune_allocator,
)
from unet_pipe.intensity import IntensityRange, IntensitySample, intensity_range
from unet_pipe.errors import CheckpointError, ConfigError, InputError, OutputError
from unet_pipe.io import DEFAULT_NGFF, FAST_COMPRESSION, StagedImage, check_ngff, image_metadata, open_image
from unet_pipe.machine import available_cores, resolve_device
from unet_pipe.model import UNet, model_from_checkpoint
from unet_pipe.ngff import check_role
from unet_pipe.precision import check_request, precision_record, resolve_precision
from unet_pipe.probabilities import OUTPUT_DTYPES
from unet_pipe.provenance import input_checksum, input_fingerprint, provenance
from unet_pipe.tiling import Roi, TilePlan, make_plan

log = logging.getLogger(__name__)

#: The plan of a run, next to the arrays in ``DEST.partial`` (created once, atomically).
PLAN_FILE = "predict_plan.json"


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



def input_intensity(extra: dict, checkpoint: Path, raw: Any = None,
                    sample: IntensitySample | None = None) -> IntensityRange | None:
    """The normalisation of ``raw`` (an :class:`ImageMeta`) by the rule recorded in a checkpoint's
    ``extra`` (None: legacy dtype scaling, which refuses raw of another dtype than the training's).
    ``sample``: the gray values of ``raw`` taken while it was written, read instead of the store
    when it covers ``raw``'s shape and dtype (the same values either way)."""
    rule = extra.get("input_normalization")
    intensity = None
    if isinstance(rule, dict) and rule.get("rule") == "percentile":
        if raw is not None:
            # The stack is normalised by its own percentiles, as every training stack was by its own.
            percentiles = tuple(rule["percentiles"])
            if sample is not None and sample.covers(raw.shape, raw.dtype):
                intensity = sample.range(percentiles, where=raw.path)
            else:
                intensity = intensity_range(open_image(raw.path), percentiles, where=raw.path)
    elif rule not in (None, "dtype-max"):
        raise CheckpointError(checkpoint, f"unknown input normalisation {str(rule)[:80]!r}")
    else:
        trained = extra.get("input_dtype")
        if raw is not None and trained is not None and str(raw.dtype) != trained:
            # Checkpoints made before the percentile rule scale inputs by their dtype's range: the
            # same gray values in another dtype would reach the net scaled differently.
            raise InputError(
                raw.path, f"the model was trained on {trained} raw data but this image is {raw.dtype}; "
                f"convert the stack to {trained} (same gray-value range) or retrain with this version"
            )
    return intensity


def _load_model(checkpoint: Path, expected_arch: dict | None, raw: Any = None,
                sample: IntensitySample | None = None) -> tuple[UNet, IntensityRange | None]:
    """The checkpoint's model, checked against the configured architecture, and the
    normalisation of ``raw`` by the checkpoint's rule (None: legacy dtype scaling)."""
    model, data = model_from_checkpoint(checkpoint, map_location="cpu")
    intensity = input_intensity(data.get("extra") or {}, checkpoint, raw, sample)
    if expected_arch is not None:
        differ = {k: (model.arch.get(k), v) for k, v in expected_arch.items() if model.arch.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}" for k, (a, b) in differ.items())
            raise CheckpointError(checkpoint, f"architecture does not match the configured model ({detail})")
    if model.arch["in_channels"] != 1:
        raise CheckpointError(checkpoint, f"expects {model.arch['in_channels']} input channels; EM stacks have 1")
    return model, intensity


@dataclass(frozen=True)
class PredictRequest:
    """What a prediction computes, checked once where it enters (CLI, config, :func:`predict`,
    :func:`unet_pipe.segment.segment`) and passed down as it is.

    ``tile``: output tile edge(s) (None = the largest that fits the free memory); ``block``:
    (z, y, x) voxels per task, whole output chunks; ``batch``: tiles per forward pass; ``tta``:
    False, True (the 8 rotations/flips) or ``"flips"`` (the 4 mirrorings); ``dtype``: the stored
    dtype (:data:`OUTPUT_DTYPES`); ``precision``: a request (``auto``, ``float32``, ``bfloat16``),
    resolved per device by :func:`unet_pipe.precision.resolve_precision`; ``ngff``: "0.4" or "0.5".
    """

    tile: int | Sequence[int] | None = None
    block: Sequence[int] | None = None
    batch: int | None = None
    tta: bool | str = False
    dtype: str = "float32"
    precision: str = "auto"
    ngff: str = DEFAULT_NGFF

    def __post_init__(self) -> None:
        if not (self.tta is True or self.tta is False or self.tta == "flips"):
            raise ValueError(f"tta must be one of {TTA_MODES}, got {self.tta!r}")
        if self.dtype not in OUTPUT_DTYPES:
            raise ConfigError(None, f"output dtype must be one of {sorted(OUTPUT_DTYPES)}, got {self.dtype!r}")
        check_request(self.precision)
        check_ngff(self.ngff)

    def record(self, intensity: IntensityRange | None) -> dict:
        """The request as recorded in the staging fingerprint and the provenance."""
        return {
            "tile": None if self.tile is None else np.atleast_1d(self.tile).astype(int).tolist(),
            "block": None if self.block is None else [int(b) for b in self.block],
            "batch": self.batch,
            "tta": self.tta,
            "dtype": self.dtype,
            "precision": self.precision,
            "intensity": None if intensity is None else intensity.to_list(),
            "ngff": self.ngff,
        }


@dataclass
class _Setup:
    """A run's inputs, checked: model, input metadata, the request and its fingerprint."""

    checkpoint: Path
    raw: Path
    dest: Path
    model: UNet
    meta: Any
    request: PredictRequest
    record: dict  # the request as recorded (PredictRequest.record)
    fingerprint: str
    intensity: IntensityRange | None


def _setup(checkpoint, raw, dest, expected_arch, request: PredictRequest,
           sample: IntensitySample | None = None) -> _Setup:
    checkpoint, raw, dest = Path(checkpoint), Path(raw), Path(dest)
    if raw.is_file() or (raw.is_dir() and not any((raw / m).is_file() for m in (".zgroup", ".zattrs", "zarr.json"))):
        # The user's stack as it came from the microscope: say what to run instead of "not a zarr group".
        raise InputError(raw, "predict reads an ingested OME-Zarr image; segment a TIFF or a folder of slices in "
                         "one command with `unet-pipe segment MODEL STACK --out DIR`, or `unet-pipe ingest` it first")
    meta = image_metadata(raw)  # InputError unless a 3D (z, y, x) OME-Zarr image
    check_role(meta, ("raw",), "predict's RAW")
    model, intensity = _load_model(checkpoint, expected_arch, meta, sample)
    if model.dims == 3 and min(meta.shape) < 2:
        raise InputError(raw, f"a 3D model needs at least 2 voxels per axis, the image has shape {meta.shape}")
    record = request.record(intensity)
    # What changes output values (the requested precision included: another request starts
    # over), except the device kind and what `precision: auto` resolves to there: a prepare job
    # may run on a CPU node and its shards on GPU nodes, so both are recorded with the plan by
    # the first shard and checked by every later shard and resume (a run never mixes precisions).
    fingerprint = json.dumps(
        {"checkpoint": input_checksum(checkpoint), "raw": input_fingerprint(raw), "request": record}, sort_keys=True
    )
    return _Setup(checkpoint, raw, dest, model, meta, request, record, fingerprint, intensity)


def _staging_matches(dest: Path, fingerprint: str) -> bool:
    try:
        group = zarr.open_group(str(dest.with_name(dest.name + ".partial")), mode="r")
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
        dtype=OUTPUT_DTYPES[setup.request.dtype][0],
        chunks=setup.meta.chunks,
        voxel_size=setup.meta.voxel_size,
        kind="image",
        # Probabilities are on the way to a result too: zstd 1 encoded float32 maps in half the
        # CPU of zstd 3 at the same ratio (1.27 on 30 ISBI slices, measured).
        compression=FAST_COMPRESSION,
        resume=True,
        fingerprint=setup.fingerprint,
        overwrite=overwrite,
        ngff=setup.request.ngff,
    )


def _read_plan(staged: StagedImage) -> tuple[TilePlan, str, str | None] | None:
    """The stored plan, the device kind ("cpu" or "cuda") and the precision it was made for."""
    path = staged.staging / PLAN_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return TilePlan.from_dict(data["plan"]), data["device"], data.get("precision")


def _shared_plan(staged: StagedImage, device: str, precision: str, make: Callable[[], TilePlan]) -> TilePlan:
    """The run's plan: the stored one, else ``make()`` stored atomically (first writer wins).

    Shards on different nodes may race here; ``os.link`` of a complete
    temporary file is atomic and fails if the plan exists (also on NFS), so
    all of them end up with the first plan written.  Every block of a run is
    computed on the same device kind and in the same resolved ``precision``
    (so that resumed runs end bit-identical): a shard or resume whose machine
    resolves ``auto`` differently (e.g. a node without AMX) is refused.
    """
    kind = "cuda" if device.startswith("cuda") else "cpu"
    stored = _read_plan(staged)
    if stored is None:
        path = staged.staging / PLAN_FILE
        tmp = path.with_name(f".{PLAN_FILE}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({"plan": make().to_dict(), "device": kind, "precision": precision}))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        stored = _read_plan(staged)
        assert stored is not None
    plan, made_for, made_in = stored
    if made_for != kind:
        raise ConfigError(
            None, f"{staged.staging} was started on {made_for}; continue it there (--device {made_for}) or delete it"
        )
    if made_in is not None and made_in != precision:
        raise ConfigError(
            None, f"{staged.staging} was started in {made_in} but this machine resolves the precision to {precision};"
            " continue it on a machine like the first (a run never mixes precisions) or delete it"
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
    request: PredictRequest | None = None,
    *,
    tile: int | Sequence[int] | None = None,
    block: Sequence[int] | None = None,
    batch: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    tta: bool | str = False,
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
    ngff: str = DEFAULT_NGFF,
    intensity_sample: IntensitySample | None = None,
) -> PredictResult:
    """Predict foreground probabilities of ``raw`` into the OME-Zarr ``dest``.

    ``request``: what to compute (:class:`PredictRequest`); without one it is made from
    ``tile``, ``block``, ``batch``, ``tta``, ``dtype``, ``precision`` and ``ngff``.
    ``workers``: CPU workers sharing ``threads`` cores (default all of this process's; torch
    threads = threads // workers) — with GPUs one per GPU; ``scheduler``: a ``dask.distributed``
    address (workers there must see the same files).  ``shard=(i, n)`` or ``z_range=(a, b)``:
    compute only the blocks starting in that z range of a store made with ``prepare_only`` and do
    not publish (see :func:`finalize`).  Otherwise ``dest`` is published when done.  An interrupted
    call, re-run with the same arguments, resumes from its finished blocks and ends bit-identical.
    ``intensity_sample``: ``raw``'s gray-value sample as its ingest took it
    (:class:`unet_pipe.intensity.IntensitySample`), so the normalisation range is not read again.
    """
    started = time.perf_counter()
    if request is None:
        request = PredictRequest(tile, block, batch, tta, dtype, precision, ngff)
    device = resolve_device(device)
    sharded = shard is not None or z_range is not None
    workers, cores = _workers_and_cores(device, workers, threads)
    setup = _setup(checkpoint, raw, dest, expected_arch, request, intensity_sample)
    staged = _open_staged(setup, overwrite=overwrite, must_exist=sharded)
    resolved = resolve_precision(request.precision, device)
    if prepare_only:
        return PredictResult(setup.dest, None, 0, 0, time.perf_counter() - started, False)
    plan = _shared_plan(staged, device, resolved, lambda: make_plan(
        setup.model.arch, setup.meta.shape, setup.meta.chunks, tile=request.tile, block=request.block,
        batch=request.batch, memory=tile_memory_budget(device, workers),
        min_z_blocks=int(shard[1]) if shard is not None else 1,
    ))  # fmt: skip
    log.info(
        "plan: tile %s, input window %s (useful fraction %.2f), block %s, batch %d; %d workers x %d threads; %s",
        plan.tile, plan.window, plan.useful_fraction, plan.block, plan.batch, workers, max(1, cores // workers),
        resolved,
    )  # fmt: skip
    mine = plan.blocks(_shard_region(plan, shard, z_range))
    todo = [b for b in mine if not staged.is_done(b.key())]
    # One process writing every block (not shards, not a cluster): blocks write their pyramid regions.
    streamed = not sharded and scheduler is None and streams_pyramid(plan, pyramid_levels)
    job = _block_job(setup, staged, plan, device, resolved, workers, cores,
                     pyramid_levels if streamed and staged.stream_levels(pyramid_levels) else 0)
    run_blocks(job, todo, total=len(mine), model=setup.model, workers=workers, scheduler=scheduler, progress=progress)
    committed = False
    if not sharded:
        _publish(staged, plan, resolved, setup, pyramid_levels)
        committed = True
    return PredictResult(setup.dest, plan, len(todo), len(mine), time.perf_counter() - started, committed)


def _block_job(setup: _Setup, staged: StagedImage, plan: TilePlan, device: str, resolved: str, workers: int,
               cores: int, levels: int) -> BlockJob:
    """What the block workers need: the inputs, the staging store, the plan and the settings."""
    return BlockJob(
        token=uuid.uuid4().hex,
        device=device,
        checkpoint=str(setup.checkpoint.resolve()),
        raw=str(setup.raw.resolve()),
        staged=staged,
        plan=plan,
        tta=setup.request.tta,
        dtype=setup.request.dtype,
        precision=resolved,
        intensity=setup.intensity,
        threads=max(1, cores // workers),
        slots=workers,
        levels=levels,
    )


def _workers_and_cores(device: str, workers: int | None, threads: int | None) -> tuple[int, int]:
    """Workers (default: one per GPU, else one) and the cores they share (default: this process's)."""
    cores = available_cores() if threads is None else int(threads)
    if workers is None:
        workers = torch.cuda.device_count() if device == "cuda" else 1
    if workers < 1 or cores < 1:
        raise ConfigError(None, f"workers and threads must be >= 1, got {workers} and {cores}")
    if device == "cpu" and workers > cores:
        raise ConfigError(None, f"{workers} CPU workers on {cores} cores would oversubscribe them")
    return workers, cores


def streams_pyramid(plan: TilePlan, pyramid_levels: int) -> bool:
    """Whether every block of ``plan`` can write its own region of ``pyramid_levels`` levels
    (:meth:`StagedImage.write_slab`): blocks of whole z-chunks and the full width, whose rows start on
    whole chunk rows of every level (or one block covers all rows)."""
    (bz, by, bx), (cz, cy, _), (nz, ny, nx) = plan.block, plan.chunks, plan.shape
    if pyramid_levels < 1 or bx < nx or (bz % cz and bz < nz):
        return False
    return by >= ny or by % (cy << pyramid_levels) == 0


def _publish(staged: StagedImage, plan: TilePlan, resolved: str | None, setup: _Setup, pyramid_levels: int) -> Path:
    missing = [b for b in plan.blocks() if not staged.is_done(b.key())]
    if missing:
        raise OutputError(
            setup.dest, f"{len(missing)} of {len(plan.blocks())} blocks are not computed yet"
            f" (first missing at z={missing[0].start[0]}); run the missing shards first"
        )
    (staged.staging / PLAN_FILE).unlink(missing_ok=True)  # kept in the attributes instead
    # The precision the blocks were computed in (None: a staging store from before it was recorded).
    params = {**setup.record, "plan": plan.to_dict(), "precision_used": resolved}
    return staged.commit(
        pyramid_levels,
        provenance=provenance({"checkpoint": setup.checkpoint, "raw": setup.raw}, params),
        extra_attrs={"probability_scale": OUTPUT_DTYPES[setup.request.dtype][1], "predict": plan.to_dict(),
                     "content": "foreground probability",
                     "compute": precision_record(resolved) if resolved else None},
    )  # fmt: skip


def finalize(
    checkpoint: str | Path,
    raw: str | Path,
    dest: str | Path,
    request: PredictRequest | None = None,
    *,
    tile: int | Sequence[int] | None = None,
    block: Sequence[int] | None = None,
    batch: int | None = None,
    tta: bool | str = False,
    dtype: str = "float32",
    precision: str = "auto",
    pyramid_levels: int = 2,
    expected_arch: dict | None = None,
    overwrite: bool = False,
    ngff: str = DEFAULT_NGFF,
) -> Path:
    """Gather step of a sharded run: check that every block is done, then publish ``dest``.

    Takes the same request (or options) as the :func:`predict` calls of the shards (they
    identify the staging store).  Raises :class:`OutputError` naming the
    missing blocks otherwise.
    """
    if request is None:
        request = PredictRequest(tile, block, batch, tta, dtype, precision, ngff)
    setup = _setup(checkpoint, raw, dest, expected_arch, request)
    staged = _open_staged(setup, overwrite=overwrite, must_exist=True)
    stored = _read_plan(staged)
    if stored is None:
        raise OutputError(setup.dest, "no shard has run yet (no plan in DEST.partial)")
    return _publish(staged, stored[0], stored[2], setup, pyramid_levels)


def read_probabilities(path: str | Path) -> np.ndarray:
    """The probabilities of a prediction output as float32 in [0, 1] (undoing uint8 quantisation)."""
    meta = image_metadata(path)
    scale = float(meta.attrs.get("unet_pipe", {}).get("probability_scale", 1.0))
    return np.asarray(open_image(path)[:], dtype=np.float32) * np.float32(scale)
