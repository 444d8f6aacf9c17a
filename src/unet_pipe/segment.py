"""Segment new, unlabelled stacks with a trained model, one call for many stacks.

For each input (a TIFF stack, a folder of TIFF slices or an OME-Zarr image)
:func:`segment` runs the stages of the workflow with their library functions
into ``OUT/<stem>/``::

    raw.ome.zarr            ingest (unet_pipe.ingest.ingest_tiff)
    probabilities.ome.zarr  predict (unet_pipe.predict.predict)
    instances.ome.zarr      postprocess with the model's decisions (unet_pipe.postprocess)
    view.ome.zarr           raw + instances as one napari/ome-zarr open (unet_pipe.view)
    instances.tif           with ``tiff=True``: an ImageJ TIFF with the voxel size (Fiji)
    summary.json            objects, their sizes, voxel size, seconds per stage (unet_pipe.summary)

and ``OUT/report.md`` over the inputs of the call.  ``<stem>`` is the input's
name without ``.tif``/``.tiff``/``.ome``/``.zarr``.

The model (:mod:`unet_pipe.model_bundle`) is a checkpoint or one of our
bioimage.io packages (turned back into its checkpoint once, kept as
``OUT/.unet-pipe-model-<sha>.pt`` so that reruns resume against the same
bytes).  It brings its architecture, normalisation, voxel size and decisions;
decisions given by the caller replace its own.

Checks before any work, each one line: every input's header is read; a model
that does not fit an input (a 3D net on a single slice, more than one input
channel) and two inputs of the same stem are refused; an input whose voxel
size differs from the model's by more than :data:`VOXEL_TOLERANCE` (on the
axes the net sees) is warned about.  An input without a voxel size takes the
model's (with a warning).

Resuming: ``OUT/<stem>/.unet-pipe-segment.json`` records, per stage, the
fingerprint of its request (the input's files, the model's sha256, options,
and the fingerprint of the stage before) when it starts and when it ends.  A
rerun skips a stage whose output exists with its fingerprint recorded as done
(or as started, when the output is a published store of ours: the kill fell
between publishing and the record), and resumes predict and postprocess from
their finished blocks.  An output left by another request (another input,
model or options) is replaced only with ``overwrite`` (and only when it is
ours); otherwise the run stops with one line, as every stage does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# The stages are called through their modules: looked up when called, so one can stand in for a stage.
import unet_pipe.postprocess as postprocess_stage
import unet_pipe.predict as predict_stage
from unet_pipe.errors import CheckpointError, InputError, OutputError
from unet_pipe.ingest import ingest_tiff
from unet_pipe.intensity import IntensitySample
from unet_pipe.io import DEFAULT_CHUNKS, DEFAULT_NGFF, image_metadata, open_image
from unet_pipe.model import load_checkpoint
from unet_pipe.model_bundle import (
    VOXEL_TOLERANCE,
    application_record,
    checkpoint_from_package,
    describe_record,
    is_package,
    model_decisions,
    override_decisions,
)
from unet_pipe.ngff import refuse_role
from unet_pipe.provenance import file_sha256, provenance
from unet_pipe.atomic import check_ours, write_json_atomic
from unet_pipe.safety import ATTRS_KEY, check_dest, is_our_store
from unet_pipe.summary import size_line, summarize, write_summary_report
from unet_pipe.tiff import imagej_label_dtype, is_our_label_tiff, write_imagej_labels
from unet_pipe.view import build_view
from unet_pipe.zarr_input import open_input_stack

log = logging.getLogger(__name__)

STATE_FILE = ".unet-pipe-segment.json"
STAGES = ("ingest", "predict", "postprocess", "view", "tiff", "summary")
_SUFFIXES = (".tiff", ".tif", ".zarr", ".ome")


@dataclass(frozen=True)
class SegmentInput:
    """One input, checked: its path, output folder name, shape (z, y, x) and voxel size (µm or None)."""

    path: Path
    stem: str
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float] | None


def input_stem(path: str | Path) -> str:
    """The output folder name of an input: its name without .tif/.tiff/.ome/.zarr (any case)."""
    name = Path(os.path.normpath(path)).name
    stripped = True
    while stripped:
        stripped = False
        for suffix in _SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)], True
    return name


def check_inputs(inputs: Sequence[str | Path], voxel_size: Sequence[float] | None = None) -> list[SegmentInput]:
    """Open every input's header (:func:`unet_pipe.zarr_input.open_input_stack`); refuse two inputs of
    one stem.  ``voxel_size`` (z, y, x µm) replaces what the files say."""
    checked: list[SegmentInput] = []
    seen: dict[str, Path] = {}
    for item in inputs:
        path = Path(item)
        source = open_input_stack(path)  # InputError: missing, corrupt, not grayscale z, y, x
        refuse_role(path, getattr(source, "held", None), ("raw",), "segment")  # e.g. labels given as a stack
        stem = input_stem(path)
        if not stem or stem.startswith("."):
            raise InputError(path, "cannot name an output folder after this input; rename it")
        if stem in seen:
            raise InputError(path, f"has the output name {stem!r} of {seen[stem]}; segment them in separate "
                             "--out folders or rename one")
        seen[stem] = path
        own = tuple(float(v) for v in voxel_size) if voxel_size is not None else source.voxel_size
        checked.append(SegmentInput(path, stem, tuple(int(s) for s in source.shape), own))
    return checked


def check_model_fits(record: dict[str, Any], model: Path, item: SegmentInput) -> None:
    """Refuse, in one line, a model that cannot segment ``item``: more than one input channel, or a
    3D net on fewer than 2 slices."""
    arch = record["arch"]
    if arch.get("in_channels", 1) != 1:
        raise CheckpointError(model, f"expects {arch['in_channels']} input channels but {item.path} is one "
                              "grayscale channel; this model does not fit it")
    if arch.get("dims", 2) == 3 and min(item.shape) < 2:
        raise InputError(item.path, f"has shape {list(item.shape)} but {model} is a 3D U-Net, which needs at "
                         "least 2 voxels per axis; segment it with a 2D model")


def voxel_size_warning(record: dict[str, Any], item: SegmentInput) -> str | None:
    """The warning for an input whose voxel size differs from the model's by more than
    :data:`VOXEL_TOLERANCE` on an axis the net sees (y, x; z too for a 3D net), else None."""
    trained = record.get("voxel_size")
    if trained is None or item.voxel_size is None:
        return None
    axes = (0, 1, 2) if record["arch"].get("dims", 2) == 3 else (1, 2)
    off = [a for a in axes if abs(item.voxel_size[a] - trained[a]) > VOXEL_TOLERANCE * trained[a]]
    if not off:
        return None
    ratio = max(item.voxel_size[a] / trained[a] for a in off), min(item.voxel_size[a] / trained[a] for a in off)
    worst = ratio[0] if abs(math.log(ratio[0])) >= abs(math.log(ratio[1])) else ratio[1]
    return (f"{item.path}: voxel size {list(item.voxel_size)} µm differs from the {list(trained)} µm the model "
            f"was trained at ({worst:.2g}x); objects will look {'larger' if worst < 1 else 'smaller'} to it than "
            "in training: resample the stack or expect worse instances")


# --------------------------------------------------------------------- stage records


def _stat_fingerprint(path: Path) -> str:
    """Names, sizes and modification times of an input's files (cheap; changes when it is rewritten)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(path.parent).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _output_is_ours(path: Path) -> bool:
    return is_our_store(path) if path.is_dir() else is_our_label_tiff(path)


class _StageRecords:
    """``OUT/<stem>/.unet-pipe-segment.json``: per stage the fingerprint started / done and its seconds."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STATE_FILE
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        self.data: dict[str, dict] = data if isinstance(data, dict) else {}

    def _save(self) -> None:
        write_json_atomic(self.path, self.data)

    def finished(self, stage: str, fingerprint: str, output: Path) -> bool:
        record = self.data.get(stage) or {}
        if not (output.exists() and _output_is_ours(output)):
            return False
        if record.get("done") == fingerprint:
            return True
        # Killed after the stage published its output but before the record: the output is newer
        # than the start of this very request.
        return record.get("started") == fingerprint and output.stat().st_mtime >= record.get("at", math.inf) - 1

    def start(self, stage: str, fingerprint: str, output: Path, overwrite: bool) -> None:
        if (output.exists() or output.is_symlink()) and not overwrite:
            raise OutputError(output, "exists from an earlier run with another input, model or options; "
                              "pass --overwrite to replace it (or choose another --out)")
        if (output.is_file() or output.is_symlink()) and not is_our_label_tiff(output):
            raise OutputError(output, "exists and was not written by unet-pipe; move it away")
        self.data[stage] = {"started": fingerprint, "at": time.time()}
        self._save()

    def finish(self, stage: str, fingerprint: str, seconds: float) -> None:
        self.data[stage] = {**self.data.get(stage, {}), "done": fingerprint, "seconds": round(seconds, 3)}
        self._save()

    def seconds(self, stage: str) -> float | None:
        return (self.data.get(stage) or {}).get("seconds")


def _run_stage(records: _StageRecords, stage: str, fingerprint: str, output: Path, overwrite: bool,
               work: Callable[[], Any], resumable: bool = False) -> bool:
    """Run ``work`` unless the stage is finished for ``fingerprint``; True when it ran.

    ``resumable`` stages (predict, postprocess) get their own staging store resumed by the
    library; the others start over."""
    if records.finished(stage, fingerprint, output):
        log.info("%s: %s already done for this request; skipped", output, stage)
        if (records.data.get(stage) or {}).get("done") != fingerprint:
            records.finish(stage, fingerprint, (records.data.get(stage) or {}).get("seconds") or 0.0)
        return False
    redo = (records.data.get(stage) or {}).get("started") == fingerprint and resumable
    records.start(stage, fingerprint, output, overwrite or (redo and _output_is_ours(output)))
    started = time.perf_counter()
    work()
    records.finish(stage, fingerprint, time.perf_counter() - started)
    return True


# --------------------------------------------------------------------------- model


def open_model(model: str | Path, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to predict with and its :func:`application_record`: ``model`` itself, or for a
    bioimage.io package its checkpoint, written once into ``out_dir`` (named by the package's sha256)."""
    model = Path(model)
    if is_package(model):
        sha = file_sha256(model)
        checkpoint = out_dir / f".unet-pipe-model-{sha[:16]}.pt"
        if not checkpoint.is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            checkpoint_from_package(model, checkpoint)
        data = load_checkpoint(checkpoint)
    else:
        checkpoint, data = model, load_checkpoint(model)
    return checkpoint, data


# -------------------------------------------------------------------------- segment


def segment(
    model: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    decisions: dict[str, Any] | None = None,
    decision_overrides: dict[str, Any] | None = None,
    tiff: bool = False,
    voxel_size: Sequence[float] | None = None,
    precision: str = "auto",
    device: str | None = None,
    threads: int | None = None,
    workers: int | None = None,
    tile: int | Sequence[int] | None = None,
    tta: bool | str = False,
    dtype: str = "float32",
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    pyramid_levels: int = 2,
    ngff: str = DEFAULT_NGFF,
    figures: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    instances: str | None = None,
    block: Sequence[int] | None = None,
    halo: int = 32,
) -> list[dict[str, Any]]:
    """Segment every input with ``model`` into ``out_dir/<stem>/`` (see the module docstring);
    returns the summaries, in input order.

    ``decisions``: ``{method, threshold, seed_threshold, seed_prominence, min_size,
    cell_threshold}`` to use instead of the model's; ``decision_overrides``: entries
    replacing those of the model's decisions (when ``decisions`` is None); ``tiff``: also write
    ``instances.tif``; ``voxel_size``: z, y, x µm of every input (default: each file's);
    ``precision``, ``device``, ``threads``, ``workers``, ``tile``, ``tta``, ``dtype``:
    as :func:`unet_pipe.predict.predict`; ``chunks``, ``pyramid_levels``, ``ngff``: the
    stores'; ``figures``: slices shown per input in ``report.md``; ``instances``: ``2d``
    (each slice on its own) or ``3d`` (objects linked across slices and blocks; ``block`` and
    ``halo`` as :func:`unet_pipe.postprocess.postprocess`), default: what the decisions were
    calibrated for, else ``2d``.
    """
    out_dir = Path(out_dir)
    if not inputs:
        raise InputError(None, "no input stacks given")
    # The prediction settings, checked before any stack is read.
    request = predict_stage.PredictRequest(tile=tile, tta=tta, dtype=dtype, precision=precision, ngff=ngff)
    items, checkpoint, record, chosen = _check_run(model, inputs, out_dir, voxel_size, decisions, decision_overrides)
    check_ours(out_dir / "report.md", out_dir / "report_figures", *(out_dir / i.stem / "summary.json" for i in items))
    instances, options_3d = _instance_mode(chosen, model, instances, block, halo, threads)
    model_sha = file_sha256(checkpoint)
    summaries = []
    for item in items:
        folder, records, stores = _item_folder(out_dir, item)
        size = _voxel_size(item, record)
        fp_ingest = _fingerprint("ingest", _stat_fingerprint(item.path), size, list(chunks), pyramid_levels, ngff)
        sample = IntensitySample()  # predict's normalisation sample, taken as the slices stream into raw
        ingested = _run_stage(records, "ingest", fp_ingest, stores["raw"], overwrite, lambda: ingest_tiff(
            item.path, stores["raw"], chunks=chunks, voxel_size=size, pyramid_levels=pyramid_levels,
            overwrite=overwrite, ngff=ngff, threads=threads, progress=progress, intensity_sample=sample,
            provenance=provenance(None, {"source": str(item.path), "voxel_size": size, "command": "segment"}),
        ))  # fmt: skip
        fp_predict = _fingerprint("predict", fp_ingest, model_sha, precision, tile, tta, dtype, pyramid_levels, ngff)
        _run_stage(records, "predict", fp_predict, stores["probabilities"], overwrite, lambda: predict_stage.predict(
            checkpoint, stores["raw"], stores["probabilities"], request, workers=workers, threads=threads,
            device=device, overwrite=overwrite, pyramid_levels=pyramid_levels, progress=progress,
            intensity_sample=sample if ingested else None,
        ), resumable=True)  # fmt: skip
        options = {k: chosen[k] for k in ("method", "threshold", "seed_threshold", "seed_prominence", "min_size")}
        fp_post = _fingerprint("postprocess", fp_predict, options, pyramid_levels, ngff,
                               *((instances, block, halo) if instances == "3d" else ()))
        counted: list[np.ndarray] = []  # the object sizes, when postprocess labelled every slice now
        _run_stage(records, "postprocess", fp_post, stores["instances"], overwrite, lambda: postprocess_stage.postprocess(
            stores["probabilities"], stores["instances"], **options, pyramid_levels=pyramid_levels,
            overwrite=overwrite, resume=True, progress=progress, ngff=ngff, instances=instances, **options_3d,
            object_sizes=counted.append,
        ), resumable=True)  # fmt: skip
        _view_and_tiff(records, stores, folder / "instances.tif" if tiff else None, fp_post, overwrite)
        summaries.append(_write_summary(item, folder, stores, records, model, model_sha, record, chosen,
                                        counted[0] if counted else None))
    write_summary_report(out_dir / "report.md", summaries, figures=figures)
    return summaries


def _item_folder(out_dir: Path, item: SegmentInput) -> tuple[Path, _StageRecords, dict[str, Path]]:
    """``OUT/<stem>/`` (made), its stage records and the paths of its stores."""
    folder = out_dir / item.stem
    folder.mkdir(parents=True, exist_ok=True)
    log.info("segmenting %s into %s", item.path, folder)
    stores = {k: folder / f"{k}.ome.zarr" for k in ("raw", "probabilities", "instances", "view")}
    return folder, _StageRecords(folder), stores


def _view_and_tiff(records: _StageRecords, stores: dict[str, Path], tif: Path | None, fp_post: str,
                   overwrite: bool) -> None:
    """The view store and (``tif`` given) the ImageJ TIFF of the instances, as resumable stages."""
    _run_stage(records, "view", _fingerprint("view", fp_post), stores["view"], overwrite, lambda: build_view(
        stores["raw"], stores["view"], {"instances": stores["instances"]}, overwrite=overwrite,
    ))  # fmt: skip
    if tif is not None:
        _run_stage(records, "tiff", _fingerprint("tiff", fp_post), tif, overwrite,
                   lambda: instances_to_tiff(stores["instances"], tif))


def _instance_mode(chosen: dict, model: str | Path, instances: str | None, block: Sequence[int] | None,
                   halo: int, threads: int | None) -> tuple[str, dict[str, Any]]:
    """``2d`` or ``3d`` (given, else what the decisions were calibrated for, else 2d) and the 3D options;
    a mode other than the decisions' is refused in one line."""
    calibrated_for = chosen.get("instances")
    if instances is not None and calibrated_for is not None and instances != calibrated_for:
        raise InputError(model, f"its decisions were calibrated for instances {calibrated_for}, "
                         f"not --instances {instances}")
    instances = instances or calibrated_for or "2d"
    if instances != "3d" and block is not None:
        raise InputError(None, "--block needs --instances 3d")
    return instances, ({"block": block, "halo": halo, "workers": threads or 1} if instances == "3d" else {})


def _voxel_size(item: SegmentInput, record: dict) -> tuple[float, ...] | None:
    """The input's voxel size (z, y, x µm), else the model's (with a warning), else None."""
    size = item.voxel_size
    if size is None and record["voxel_size"] is not None:
        log.warning("%s: no voxel size in the file or given; using the model's %s µm", item.path,
                    record["voxel_size"])
        size = tuple(record["voxel_size"])
    return size


def _check_run(
    model: str | Path, inputs: Sequence[str | Path], out_dir: Path, voxel_size: Sequence[float] | None,
    decisions: dict[str, Any] | None, decision_overrides: dict[str, Any] | None,
) -> tuple[list[SegmentInput], Path, dict, dict]:
    """Before any work: the inputs, the model's checkpoint, its application record and the decisions."""
    items = check_inputs(inputs, voxel_size)
    for item in items:  # outputs never overlap an input or the model
        check_dest(out_dir / item.stem, [*(i.path for i in items), Path(model)])
    checkpoint, data = open_model(model, out_dir)
    record = application_record(data)
    for item in items:
        check_model_fits(record, Path(model), item)
    if decisions is None:
        chosen = model_decisions(data, model, warn=not decision_overrides)
        chosen = override_decisions(chosen, decision_overrides or {}, model)
    else:
        chosen = {**decisions, "source": decisions.get("source", "given")}
    log.info("%s: %s", model, describe_record({**record, "decisions": chosen}))
    for item in items:
        warning = voxel_size_warning(record, item)
        if warning:
            log.warning("%s", warning)
    return items, checkpoint, record, chosen


def _write_summary(item: SegmentInput, folder: Path, stores: dict[str, Path], records: _StageRecords,
                   model: str | Path, model_sha: str, record: dict, chosen: dict,
                   sizes: np.ndarray | None = None) -> dict[str, Any]:
    """Summarise one segmented input into ``folder/summary.json`` (``sizes``: the object sizes postprocess
    counted, else the instances are read back); returns the summary."""
    seconds = {stage: records.seconds(stage) for stage in STAGES[:5] if stage in records.data}
    summary_json = folder / "summary.json"
    started = time.perf_counter()
    summary = summarize(
        stores["raw"], stores["probabilities"], stores["instances"], None, dataset=item.stem, seconds=seconds,
        extra={"input": str(item.path), "model": str(model), "model_sha256": model_sha,
               "decisions_source": chosen.get("source"), "trained_voxel_size_um": record["voxel_size"],
               "voxel_size_warning": voxel_size_warning(record, item)},
        sizes=sizes,
    )  # fmt: skip
    summary["seconds"]["summary"] = round(time.perf_counter() - started, 3)
    write_json_atomic(summary_json, summary)
    log.info("%s: %d objects (%s), voxel size %s µm; seconds %s", item.stem, summary["objects"],
             size_line(summary), summary["voxel_size_um"], summary["seconds"])
    return summary


def instances_to_tiff(instances: str | Path, dest: str | Path, overwrite: bool = True) -> Path:
    """Write an instance store as an ImageJ TIFF with its voxel size (:func:`unet_pipe.tiff.write_imagej_labels`);
    an existing ``dest`` is replaced only with ``overwrite`` and only when it is one of ours."""
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        if not is_our_label_tiff(dest):
            raise OutputError(dest, "exists and was not written by unet-pipe; move it away")
        if not overwrite:
            raise OutputError(dest, "already exists; remove it or pass --overwrite")
    meta = image_metadata(instances)
    count = int((meta.attrs.get(ATTRS_KEY) or {}).get("instances", 0))
    try:
        imagej_label_dtype(count)
    except ValueError as exc:
        raise OutputError(dest, str(exc)) from None
    return write_imagej_labels(open_image(instances), dest, meta.voxel_size, count)



