"""Evaluation of a segmentation against ground truth: per-slice and summary metrics.

Inputs are OME-Zarr images ``(z, y, x)`` of the same shape:

* instances from :mod:`unet_pipe.postprocess` (uint32, 0 = membrane),
* optionally the cell probabilities they came from (for the pixel error),
* the truth labels, either binary in the ISBI convention (0 = membrane,
  ``foreground_value`` or nonzero = cell; truth instances are the 4-connected
  cell components per slice) or instance ids (0 = membrane).

Every slice is scored in 2D (:mod:`unet_pipe.metrics`); summaries are the mean
over slices (the ISBI 2012 convention for stacks), except IoU, which pools the
pixels of all slices.  Slices can be tagged ``train``/``val`` (the ranges
training used) so that held-out performance is reported separately: metrics
on training slices flatter the model.

Sparse truth (``unlabelled_value``): pixels holding that value were not
annotated and are left out.  The pixel error and IoU count annotated pixels
only; truth segments are the components of annotated cell pixels, so the
foreground-restricted Rand/VI tables and the ISBI protocol's V_rand/V_info
(which score only truth-foreground pixels) never see an unlabelled pixel.  The
warping error needs the truth's topology over the whole slice, so it is NaN on
slices with any unlabelled pixel (and the subset mean skips them).  Slices
without annotated pixels have NaN scores throughout.

Labelled crops: a truth store with an offset (``unet_pipe.offset``, written by
``ingest --offset``) covers only a box of the prediction; only that box is
scored (slices default to its z range; ``z`` stays the raw slice number).

Outputs: ``metrics.json`` (summary per subset, per-slice rows, definitions,
inputs, provenance) and, next to it, ``metrics.csv`` with one row per slice.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

# write_json_atomic is also imported from here by calibrate, segment and summary
from unet_pipe.atomic import check_ours, read_json, write_csv_atomic, write_json_atomic
from unet_pipe.errors import InputError
from unet_pipe.io import image_metadata, open_image
from unet_pipe.isbi_protocol import ISBI_THRESHOLDS, ThinnedScores, best_over_thresholds, thinned_scores
from unet_pipe.metrics import (
    binarize,
    instances_from_binary,
    pixel_error,
    scores_3d,
    segmentation_scores,
    truth_box,
    truth_instances_3d,
)
from unet_pipe.ngff import check_role
from unet_pipe.probabilities import open_probabilities, read_probabilities
from unet_pipe.progress import progress_bar
from unet_pipe.provenance import provenance
from unet_pipe.truth import check_binary_values, check_unlabelled_value, require_annotated
from unet_pipe.warping import warping_error

log = logging.getLogger(__name__)

TruthMode = Literal["binary", "instances"]
SUMMARY_KEYS: tuple[str, ...] = (
    "pixel_error",
    "rand_error",
    "v_rand_split",
    "v_rand_merge",
    "vi_split",
    "vi_merge",
    "vi",
    "iou",
    "warping_error",
    "v_rand_at_decision",
    "v_info_at_decision",
)
# The challenge's scores, each at its best threshold over the sweep of the whole
# subset (one threshold per subset, not per slice): summary only.
PROTOCOL_KEYS: tuple[str, ...] = ("v_rand", "v_rand_threshold", "v_info", "v_info_threshold")
#: Per-slice tags; where ranges overlap, val wins, then train, then calibrate.
SUBSETS: tuple[str, ...] = ("train", "val", "calibrate", "other")
CSV_FIELDS: tuple[str, ...] = ("z", "subset", *SUMMARY_KEYS, "truth_segments", "predicted_segments")
DEFINITIONS: dict[str, str] = {
    "pixel_error": "fraction of pixels whose class (cell: p > threshold) differs from the truth",
    "rand_error": "1 - V_rand of the instances as they are (no thinning, no threshold sweep), "
    "foreground-restricted (predicted background = singletons), 2D per slice",
    "v_rand_split": "sum p_ij^2 / sum t_i^2 (1 = no split of true segments)",
    "v_rand_merge": "sum p_ij^2 / sum s_j^2 (1 = no merge of true segments)",
    "vi_split": "H(prediction | truth) in bits on the truth foreground (over-segmentation)",
    "vi_merge": "H(truth | prediction) in bits on the truth foreground (under-segmentation)",
    "vi": "vi_split + vi_merge",
    "iou": "intersection over union of cell foreground (instances > 0 vs truth cells), pooled over slices",
    "warping_error": "Jain et al. 2010: pixels still wrong after warping the truth towards the cell mask "
    "(p > threshold) by simple-point flips (cells 4-, membrane 8-connected), over all pixels; "
    "0 = no topological error",
    "v_rand": "ISBI 2012 final score (Arganda-Carreras et al. 2015): foreground-restricted "
    "sum p_ij^2 / (0.5 sum s_j^2 + 0.5 sum t_i^2) after thinning the predicted boundaries of "
    "p > t to 1-pixel watershed lines, mean over slices, best over t = 0.0, 0.1, ..., 1.0 "
    "(v_rand_threshold: that t); 1 = perfect",
    "v_info": "ISBI 2012 final score: foreground-restricted I(S;T) / (0.5 H(S) + 0.5 H(T)) after the "
    "same thinning, mean over slices, best over the same thresholds (v_info_threshold: that t)",
    "v_rand_at_decision": "per slice: V_rand after thinning at the decision threshold",
    "v_info_at_decision": "per slice: V_info after thinning at the decision threshold",
    "unlabelled": "with an unlabelled value: pixel error and IoU over annotated pixels only; Rand/VI and "
    "V_rand/V_info on annotated cell pixels (truth segments are components of annotated cells); warping error "
    "NaN on slices with unlabelled pixels",
    "scores_3d": "per subset whose slices are one z range: adapted Rand error (skimage, voxel pairs) and VI "
    "split/merge in bits over the range's 3D objects (binary truth: 6-connected components of its cells); "
    "predicted background on truth cells counts as singletons",
    "summary": "mean over slices (slices without truth foreground excluded from Rand/VI); iou pooled; "
    "v_rand/v_info: best threshold of the subset's mean curve (summary.<subset>.protocol_curve)",
}


def _slice_range(spec: Sequence[int] | None, nz: int, what: str, path: Path) -> range | None:
    if spec is None:
        return None
    start, stop = (int(s) for s in spec)
    if not 0 <= start < stop <= nz:
        raise InputError(path, f"{what} slice range [{start}, {stop}) outside the stack of {nz} slices")
    return range(start, stop)


def score_slice(
    instances: np.ndarray,
    truth_instances: np.ndarray,
    truth_cells: np.ndarray,
    prob: np.ndarray | None = None,
    threshold: float = 0.5,
    annotated: np.ndarray | None = None,
) -> dict[str, Any]:
    """All metrics of one 2D slice (NaN where undefined), plus IoU counts for pooling.

    ``annotated``: mask of the annotated truth pixels (None: all); ``truth_cells`` and
    ``truth_instances`` must be 0 elsewhere.  See the module docstring for what each
    metric does with unlabelled pixels.
    """
    pred_cells = instances != 0
    known = np.ones(truth_cells.shape, bool) if annotated is None else np.asarray(annotated, bool)
    n_known = int(np.count_nonzero(known))
    if prob is None or n_known == 0:
        pixel = math.nan
    elif annotated is None:
        pixel = pixel_error(prob, truth_cells, threshold)
    else:
        pixel = int(np.count_nonzero(((prob > threshold) != truth_cells) & known)) / n_known
    row: dict[str, Any] = {
        "pixel_error": pixel,
        "truth_segments": int(np.unique(truth_instances[truth_instances != 0]).size),
        "predicted_segments": int(np.unique(instances[instances != 0]).size),
        "_intersection": int(np.count_nonzero(pred_cells & truth_cells & known)),
        "_union": int(np.count_nonzero((pred_cells | truth_cells) & known)),
    }
    row["iou"] = row["_intersection"] / row["_union"] if row["_union"] else (1.0 if n_known else math.nan)
    row.update(_protocol_scores(prob, truth_instances, truth_cells, threshold))
    if n_known < known.size:
        row["warping_error"] = math.nan  # the truth's topology is unknown where nobody annotated
    rs, (split, merge) = segmentation_scores(instances, truth_instances)
    if rs is not None:
        row.update(
            rand_error=rs.error, v_rand_split=rs.v_split, v_rand_merge=rs.v_merge,
            vi_split=split, vi_merge=merge, vi=split + merge,
        )
    else:
        row.update({k: math.nan for k in ("rand_error", "v_rand_split", "v_rand_merge", "vi_split", "vi_merge", "vi")})
    return row


def _protocol_scores(
    prob: np.ndarray | None, truth_instances: np.ndarray, truth_cells: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Warping error at the decision threshold and V_rand/V_info after thinning over
    the ISBI thresholds (kept in ``_thinned`` for the subset summaries) and at the
    decision threshold.  All NaN without probabilities: the protocol scores the probability map."""
    if prob is None:
        return {"warping_error": math.nan, "v_rand_at_decision": math.nan,
                "v_info_at_decision": math.nan, "_thinned": None}
    extra = () if threshold in ISBI_THRESHOLDS else (float(threshold),)
    scores = thinned_scores(prob, truth_instances, ISBI_THRESHOLDS + extra)
    k = scores.thresholds.index(float(threshold))
    n = len(ISBI_THRESHOLDS)
    return {
        "warping_error": warping_error(prob > threshold, truth_cells),
        "v_rand_at_decision": float(scores.v_rand[k]),
        "v_info_at_decision": float(scores.v_info[k]),
        "_thinned": ThinnedScores(ISBI_THRESHOLDS, scores.v_rand[:n], scores.v_info[:n]),
    }


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Summary of per-slice rows: NaN-aware means, IoU pooled over pixels, and the
    ISBI protocol's best-threshold V_rand/V_info over the rows' slices."""
    rows = list(rows)
    out: dict[str, Any] = {"slices": len(rows)}
    for key in SUMMARY_KEYS:
        if key == "iou":
            union = sum(r["_union"] for r in rows)
            # A pooled score needs something to pool: slices without a cell pixel in the truth or
            # the prediction have nothing to agree on, so their IoU is undefined, not a perfect 1.0.
            out[key] = sum(r["_intersection"] for r in rows) / union if union else math.nan
            if rows and not union:
                out.setdefault("notes", {})[key] = ("undefined: no cell pixel in the truth or the prediction of "
                                                    "these slices")
            continue
        values = np.array([r[key] for r in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[key] = float(values.mean()) if values.size else math.nan
    best = best_over_thresholds([r["_thinned"] for r in rows if r.get("_thinned") is not None])
    if best is None:
        out.update({k: math.nan for k in PROTOCOL_KEYS})
    else:
        protocol = best.as_dict()
        out["protocol_curve"] = protocol.pop("curve")
        out.update(protocol)
    return out


def evaluate(
    instances: str | Path,
    truth: str | Path,
    out_json: str | Path,
    *,
    probabilities: str | Path | None = None,
    raw: str | Path | None = None,
    dataset: str | None = None,
    slices: Sequence[int] | None = None,
    train_slices: Sequence[int] | None = None,
    val_slices: Sequence[int] | None = None,
    threshold: float = 0.5,
    truth_mode: TruthMode = "binary",
    foreground_value: int | None = None,
    unlabelled_value: int | None = None,
    decisions: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``instances`` (and ``probabilities``) against ``truth``; write JSON and CSV.

    ``slices``: half-open ``[start, stop)`` z range to evaluate (default all);
    ``train_slices``/``val_slices``: ranges tagged ``train``/``val`` in the
    per-slice rows and summarised separately; the other slices the ``decisions``
    were chosen on for ``dataset`` are ``calibrate``, the rest ``other``.
    ``unlabelled_value``: truth value of unannotated pixels (left out, see the module docstring).
    ``raw`` is only recorded, for the report's figures; ``decisions`` (from
    :func:`unet_pipe.calibrate.read_decisions`) are recorded with the metrics.  Returns the JSON dict;
    the CSV goes to ``out_json`` with suffix ``.csv``.
    """
    instances, truth, out_json = Path(instances), Path(truth), Path(out_json)
    check_ours(out_json, out_json.with_suffix(".csv"))  # before the work, not after it
    if truth_mode not in ("binary", "instances"):
        raise ValueError(f"truth_mode must be 'binary' or 'instances', got {truth_mode!r}")
    pred_meta, truth_meta, box = _checked_stores(instances, truth, truth_mode, foreground_value, unlabelled_value)
    offset = truth_meta.offset
    oz = offset[0]
    pred_arr = open_image(instances)
    truth_arr = open_image(truth)
    probabilities = None if probabilities is None else Path(probabilities)
    prob_arr, scale = _open_probabilities_like(probabilities, pred_meta.shape, instances)
    labelled = range(oz, oz + truth_meta.shape[0])
    zs, train, val, calibrated = _subsets(pred_meta.shape[0], labelled, slices, train_slices, val_slices,
                                          decisions, dataset, instances, truth)
    _check_foreground_value(truth, truth_meta.dtype, truth_mode, foreground_value)
    any_cells = False
    annotated = 0
    rows: list[dict[str, Any]] = []
    # The evaluated range's slices, kept for the 3D scores (objects taken whole across z).
    pred_stack: list[np.ndarray] = []
    truth_stack: list[np.ndarray] = []
    for z in progress_bar(zs, unit="slice", desc=f"evaluate {instances.name}", enabled=progress):
        t = np.asarray(truth_arr[z - oz])
        cells, truth_inst, known = _truth_slice(t, truth, truth_mode, foreground_value, unlabelled_value)
        annotated += t.size if known is None else int(np.count_nonzero(known))
        any_cells = any_cells or (truth_mode == "binary" and bool(cells.any()))
        prob = None if prob_arr is None else read_probabilities(
            prob_arr, scale, probabilities, (z, *box), f"in slice {z}")
        pred_slice = np.asarray(pred_arr[(z, *box)])
        row = score_slice(pred_slice, truth_inst, cells, prob, threshold, known)
        pred_stack.append(pred_slice)
        truth_stack.append(cells if truth_mode == "binary" else truth_inst)
        subset = "val" if z in val else "train" if z in train else "calibrate" if z in calibrated else "other"
        rows.append({"z": z, "subset": subset, **row})

    require_annotated(truth, annotated, unlabelled_value, "the evaluated slices")
    if truth_mode == "binary" and foreground_value is not None and not any_cells:
        # A wrong cell value scores every slice as all membrane: a plausible-looking wrong result.
        raise InputError(truth, f"no pixel equals --foreground-value {foreground_value} in the evaluated slices")
    summary = _summaries(rows, pred_stack, truth_stack, truth_mode)
    del pred_stack, truth_stack
    params = {
        "slices": [zs.start, zs.stop], "train_slices": list(train_slices) if train_slices else None,
        "val_slices": list(val_slices) if val_slices else None, "threshold": threshold, "truth_mode": truth_mode,
        "foreground_value": foreground_value, "unlabelled_value": unlabelled_value, "truth_offset": list(offset),
        "decisions": decisions,
    }
    result = _result(instances, truth, probabilities, raw, dataset, summary, params, rows)
    _write_metrics(out_json, result)
    return result


def _checked_stores(instances: Path, truth: Path, truth_mode: str, foreground_value: int | None,
                    unlabelled_value: int | None) -> tuple[Any, Any, tuple[slice, slice]]:
    """(prediction metadata, truth metadata, the truth's box in the prediction), after the checks every
    stage taking these kinds makes: class values, store roles, integer instances."""
    check_unlabelled_value(truth, truth_mode, foreground_value, unlabelled_value)
    pred_meta = image_metadata(instances)
    truth_meta = image_metadata(truth)
    check_role(pred_meta, ("instances", "labels"), "evaluate's --prediction")
    check_role(truth_meta, ("labels", "instances"), "evaluate's --truth")
    box = truth_box(truth_meta, truth, tuple(pred_meta.shape), instances)
    if pred_meta.dtype.kind not in "uib":  # e.g. a probability or weight map given as instances
        raise InputError(instances, f"instances must be integer labels (0 = membrane), found dtype {pred_meta.dtype}; "
                         "probabilities go to --probabilities")
    return pred_meta, truth_meta, box


def _check_foreground_value(truth: Path, dtype: np.dtype, truth_mode: str, foreground_value: int | None) -> None:
    if truth_mode == "binary" and foreground_value is not None:
        info = np.iinfo(dtype) if dtype.kind in "ui" else None
        if info is not None and not info.min <= foreground_value <= info.max:
            raise InputError(truth, f"--foreground-value {foreground_value} cannot occur in {dtype} labels")


def _subsets(
    nz: int, labelled: range, slices: Sequence[int] | None, train_slices: Sequence[int] | None,
    val_slices: Sequence[int] | None, decisions: dict[str, Any] | None, dataset: str | None, instances: Path,
    truth: Path,
) -> tuple[range, range, range, range]:
    """The evaluated slices (inside the labelled ones), and those tagged train, val and calibrate."""
    zs = _slice_range(slices, nz, "evaluated", instances) or labelled
    if zs.start < labelled.start or zs.stop > labelled.stop:
        raise InputError(truth, f"evaluated slices [{zs.start}, {zs.stop}) outside the labelled slices "
                         f"[{labelled.start}, {labelled.stop})")
    train = _slice_range(train_slices, nz, "train", instances) or range(0)
    val = _slice_range(val_slices, nz, "val", instances) or range(0)
    chosen_on = ((decisions or {}).get("slices") or {}).get(dataset) if dataset is not None else None
    calibrated = range(*chosen_on) if chosen_on else range(0)  # where the decisions were chosen
    return zs, train, val, calibrated


def _result(instances: Path, truth: Path, probabilities: Path | None, raw: str | Path | None, dataset: str | None,
            summary: dict[str, Any], params: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics record: dataset, summaries, definitions, inputs, parameters, per-slice rows, provenance."""
    inputs = {"instances": instances, "truth": truth}
    if probabilities is not None:
        inputs["probabilities"] = probabilities
    result = {
        "dataset": dataset or _dataset_name(instances),
        "summary": summary,
        "definitions": DEFINITIONS,
        "inputs": {**{k: str(v) for k, v in inputs.items()}, "raw": None if raw is None else str(raw)},
        "params": params,
        "per_slice": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "provenance": provenance(inputs, params),
    }
    return result


def _open_probabilities_like(probabilities: Path | None, shape: tuple[int, ...], instances: Path) -> tuple[Any, float]:
    """The probabilities (None without) and their scale, checked to have the instances' shape."""
    prob_arr, scale = None, 1.0
    if probabilities is not None:
        prob_arr, scale = open_probabilities(probabilities)
        if tuple(prob_arr.shape) != shape:
            raise InputError(
                probabilities, f"shape {tuple(prob_arr.shape)} differs from {shape} of {instances}"
            )
    return prob_arr, scale


def _truth_slice(t: np.ndarray, truth: Path, truth_mode: str, foreground_value: int | None,
                 unlabelled_value: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One truth slice as (cell mask, truth instances, annotated mask or None: all annotated);
    binary truth holding a value of neither class (nor the unlabelled one) is refused, naming ``truth``."""
    known = None if unlabelled_value is None else t != unlabelled_value
    if truth_mode == "binary" and foreground_value is not None and t.dtype != np.bool_:
        check_binary_values(truth, np.unique(t), foreground_value, unlabelled_value)
    if truth_mode == "binary":
        cells = t == foreground_value if foreground_value is not None else binarize(t)
        if known is not None:
            cells &= known
        truth_inst = instances_from_binary(cells)
    else:
        cells = t != 0 if known is None else (t != 0) & known
        truth_inst = t if known is None else np.where(known, t, 0)
    return cells, truth_inst, known


def _summaries(rows: list[dict[str, Any]], pred_stack: list[np.ndarray], truth_stack: list[np.ndarray],
               truth_mode: str) -> dict[str, dict[str, Any]]:
    """Summary of all rows and of each subset (when it is not all of them), with the 3D scores."""
    summary = {"all": summarize(rows)}
    for subset in SUBSETS:
        chosen = [r for r in rows if r["subset"] == subset]
        if chosen and len(chosen) < len(rows):
            summary[subset] = summarize(chosen)
    for subset, s in summary.items():
        picked = [i for i, r in enumerate(rows) if subset == "all" or r["subset"] == subset]
        s["scores_3d"] = _scores_3d(rows, picked, pred_stack, truth_stack, truth_mode)
    return summary


def _write_metrics(out_json: Path, result: dict[str, Any]) -> None:
    """The metrics JSON, the per-slice CSV beside it, and the headline numbers in the log."""
    summary = result["summary"]
    write_json_atomic(out_json, result)
    write_csv_atomic(out_json.with_suffix(".csv"), result["per_slice"], CSV_FIELDS)
    main = summary.get("val", summary["all"])
    log.info(
        "%s: Rand error %.4f, pixel error %.4f, VI %.3f, IoU %.3f, warping error %.6f, "
        "V_rand %.4f, V_info %.4f (%s)",
        result["dataset"], main["rand_error"], main["pixel_error"], main["vi"], main["iou"],
        main["warping_error"], main["v_rand"], main["v_info"],
        "val slices" if "val" in summary else "all slices",
    )


def _scores_3d(
    rows: Sequence[dict[str, Any]], picked: Sequence[int], pred: Sequence[np.ndarray], truth: Sequence[np.ndarray],
    truth_mode: str,
) -> dict[str, Any] | None:
    """3D scores of one subset's z range (:func:`unet_pipe.metrics.scores_3d`); None unless its slices are
    one contiguous range.  Binary truth: objects are the 6-connected components of its cells in that range."""
    if not picked or picked[-1] - picked[0] + 1 != len(picked):
        return None
    p = np.stack([pred[i] for i in picked])
    t = np.stack([truth[i] for i in picked])
    t = truth_instances_3d(t) if truth_mode == "binary" else t
    out: dict[str, Any] = {"z": [rows[picked[0]]["z"], rows[picked[-1]]["z"] + 1], **scores_3d(p, t)}
    out["truth_objects"] = int(np.unique(t[t != 0]).size)
    out["predicted_objects"] = int(np.unique(p[p != 0]).size)
    return out


def _dataset_name(instances: Path) -> str:
    """``results/<dataset>/instances.ome.zarr`` -> ``<dataset>``."""
    parent = instances.resolve().parent.name
    return parent or instances.name


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Load a metrics.json written by :func:`evaluate` (InputError if it is not one)."""
    path = Path(path)
    data = read_json(path, "metrics file")
    if not isinstance(data, dict) or "summary" not in data or "per_slice" not in data:
        raise InputError(path, "not a metrics file written by `unet-pipe evaluate`")
    return data
