"""Calibration: the decisions ``postprocess`` and ``evaluate`` use, chosen on the user's own slices.

A network trained with the paper's loss does not put its decision boundary at
p = 0.5: class balancing and the border term weigh thin membranes far more
than cell pixels (about 25 : 1 on ISBI), which pushes p(cell) down, and how far
depends on the data.  So no threshold, watershed setting or minimum size is a
constant of unet-pipe: each is chosen here from the predicted probabilities of
labelled *calibration slices* (by default the validation range of each training
dataset; ``calibrate.datasets`` names others) by this documented rule:

1. **Scales from the truth.**  ``area`` = the median area (px) of the truth
   segments on the calibration slices, ``radius = sqrt(area / pi)``.
   Size-like parameters are fractions of these, so they follow the data's cell
   size instead of ISBI's.
2. **Cell decision (pixel error).**  Thresholds ``t`` in 0.01, 0.02, ..., 0.99;
   the one with the lowest pixel error (cell where ``p > t``) over all
   calibration pixels; ties go to the threshold nearest 0.5.  The whole curve
   costs one sort of the calibration probabilities, so the grid is fine: on
   ISBI (choose on slices 20-24, report on 25-29) the 0.05 grid's choice gave a
   validation pixel error of 0.0811, the 0.01 grid's 0.0806 (a 0.001 grid
   moved the choice by 0.001).
3. **Instances.**  Candidates: ``threshold`` + connected components for every
   ``t`` of the coarser grid 0.05, 0.10, ..., 0.95 (each candidate costs a
   labelling and a Rand score per slice); and the seeded ``watershed`` for the three thresholds
   with the best Rand score among those, with ``seed_threshold = t + f (1 - t)``
   for ``f`` in {0.5, 0.8} and ``seed_prominence`` in {radius / 8, radius / 4,
   radius / 2}; each with ``min_size`` 0 and ``area / 20``.  Each candidate is
   scored by the mean over calibration slices of the foreground-restricted Rand
   score (1 - the ISBI 2012 Rand error).  The best wins; candidates within
   ``TIE`` of the best are tied and resolved by the lower pixel error of the
   instance mask, then the simpler setting (threshold before watershed,
   ``min_size`` 0 first), then ``t`` nearest 0.5.

Every candidate and its scores go into ``decisions.json`` with the scales, the
slices, and the provenance of the inputs, so a user can see why a setting won
and how close the others came.  When the calibration slices are also the
slices that ``evaluate`` reports (the default), those numbers are optimistic;
``calibrate.datasets`` gives a separate range (e.g. ISBI: choose on 20-24,
report on 25-29).

Sparse truth (``unlabelled_value``): unlabelled pixels are left out of every
pixel error (numerator and denominator) and are no truth segment, so the
foreground-restricted Rand score ignores them as it ignores membrane.
Labelled crops (a truth store with an offset): only the truth's box of the
probabilities is read; calibration slices are raw slice numbers inside it.

Cost bound (``max_pixels``): every candidate is scored on every calibration
pixel, so the time grows with their number (92 candidates on five 512 x 512
slices: about 50 s on 2 cores).  When a dataset's calibration slices hold more
than its share of ``max_pixels`` (the budget split evenly over the datasets),
they are sampled by a fixed rule that depends only on the shapes: windows of
``WINDOW`` x ``WINDOW`` px (or the whole slice edge, if smaller) on a regular
grid that covers each slice, as many per slice as the budget allows, evenly
spread over the grid in row-major order; when the budget holds fewer windows
than slices, evenly spaced slices give one central window each.  Each window
is then scored as a slice of its own (cells cut by its edge are cut in the
truth and the prediction alike).  ``decisions.json`` records the windows.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from unet_pipe.errors import InputError
from unet_pipe.io import image_metadata, open_image
from unet_pipe.metrics import instances_from_binary, rand_error_per_slice, truth_box
from unet_pipe.postprocess import METHODS, instances_from_probabilities
from unet_pipe.probabilities import as_probability, open_probabilities
from unet_pipe.provenance import provenance
from unet_pipe.safety import write_json_atomic

log = logging.getLogger(__name__)

THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))  # instance candidates
CELL_THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(1, 100))  # the cell decision
SEED_FRACTIONS: tuple[float, ...] = (0.5, 0.8)
PROMINENCE_FRACTIONS: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2)
MIN_SIZE_FRACTION = 1 / 20
WINDOW = 1024  # px: calibration windows when the slices exceed the pixel budget (many cells each)
DEFAULT_MAX_PIXELS = 1 << 22  # 16 slices of 512 x 512: about 3 min of calibration on 2 cores
WATERSHED_THRESHOLDS = 3  # best threshold-method thresholds the watershed is tried at
TIE = 1e-3  # Rand scores closer than this are ties
CRITERION = (
    "instances: highest mean foreground-restricted Rand score over the calibration slices; "
    f"scores within {TIE} are ties, resolved by the lower pixel error of the instance mask, then the "
    "simpler setting (threshold before watershed, min_size 0 first), then the threshold nearest 0.5. "
    "cell threshold: lowest pixel error, ties to the threshold nearest 0.5."
)
DECISION_KEYS = ("method", "threshold", "seed_threshold", "seed_prominence", "min_size")


def truth_scales(truth_instances: Iterable[np.ndarray]) -> dict[str, float]:
    """Median truth segment area (px) and the radius of a disc of that area."""
    areas: list[np.ndarray] = []
    for t in truth_instances:
        counts = np.bincount(np.asarray(t).ravel())
        areas.append(counts[1:][counts[1:] > 0])
    all_areas = np.concatenate(areas) if areas else np.array([])
    if all_areas.size == 0:
        raise InputError(None, "the calibration slices hold no truth segments (no cell pixels)")
    area = float(np.median(all_areas))
    return {"median_area_px": area, "radius_px": math.sqrt(area / math.pi), "segments": int(all_areas.size)}


def _masks(cells: Sequence[np.ndarray], annotated: Sequence[np.ndarray] | None) -> list[np.ndarray | None]:
    return [None] * len(cells) if annotated is None else list(annotated)


def _wrong(pred: np.ndarray, cells: np.ndarray, known: np.ndarray | None) -> tuple[int, int]:
    """(wrongly classified, scored) pixels; only annotated pixels (``known``) are scored."""
    diff = pred != cells
    if known is None:
        return int(np.count_nonzero(diff)), diff.size
    return int(np.count_nonzero(diff & known)), int(np.count_nonzero(known))


def pixel_errors(
    prob: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    thresholds: Sequence[float],
    annotated: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Pixel error (cell where ``p > t``) over all slices at every threshold ``t``.

    Counted from the sorted probabilities of each class, one sort per slice
    instead of one pass per threshold; the comparison is made in the
    probabilities' own float type, as ``p > t`` does.
    """
    wrong = np.zeros(len(thresholds), np.int64)
    total = 0
    for p, c, k in zip(prob, cells, _masks(cells, annotated)):
        p, c = np.asarray(p), np.asarray(c, bool)
        if k is not None:
            p, c = p[np.asarray(k, bool)], c[np.asarray(k, bool)]
        dtype = p.dtype if p.dtype.kind == "f" else np.dtype(np.float64)
        t = np.asarray(thresholds, dtype=dtype)
        cell_p = np.sort(p[c], axis=None).astype(dtype, copy=False)
        membrane_p = np.sort(p[~c], axis=None).astype(dtype, copy=False)
        wrong += np.searchsorted(cell_p, t, side="right")  # cells at or below t: called membrane
        wrong += membrane_p.size - np.searchsorted(membrane_p, t, side="right")  # membrane above t
        total += p.size
    return wrong / total if total else np.full(len(thresholds), math.nan)


def _score(
    params: dict[str, Any],
    prob: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    truth: Sequence[np.ndarray],
    annotated: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    options = {k: params[k] for k in ("seed_threshold", "seed_prominence", "min_size") if k in params}
    errors, wrong, total = [], 0, 0
    for p, c, t, k in zip(prob, cells, truth, _masks(cells, annotated)):
        inst = instances_from_probabilities(p, params["method"], params["threshold"], **options)
        errors.append(float(rand_error_per_slice(inst, t)[0]))
        w, n = _wrong(inst != 0, c, k)
        wrong += w
        total += n
    finite = [e for e in errors if not math.isnan(e)]
    rand_error = float(np.mean(finite)) if finite else math.nan
    pixel = wrong / total if total else math.nan
    return {**params, "rand_score": 1.0 - rand_error, "rand_error": rand_error, "pixel_error": pixel}


def _rank_key(c: dict[str, Any]) -> tuple:
    simpler = (0 if c["method"] == "threshold" else 1, c["min_size"])
    return (c["pixel_error"], simpler, abs(c["threshold"] - 0.5), c.get("seed_threshold", 0), c.get("seed_prominence", 0))


def choose(candidates: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The winning candidate by the documented rule (see the module docstring)."""
    scored = [c for c in candidates if not math.isnan(c["rand_score"])]
    if not scored:
        raise InputError(None, "no calibration slice has truth foreground: nothing to calibrate on")
    best = max(c["rand_score"] for c in scored)
    tied = [c for c in scored if c["rand_score"] >= best - TIE]
    return min(tied, key=_rank_key)


def calibrate_slices(
    prob: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    truth: Sequence[np.ndarray],
    methods: Sequence[str] = METHODS,
    annotated: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Choose the decisions on 2D slices: probabilities, truth cell masks, truth instances,
    and optionally the annotated-pixel masks (sparse truth; None: every pixel is annotated).

    Returns ``{'decisions', 'cell_threshold', 'scales', 'pixel_candidates',
    'candidates'}`` (see the module docstring for the rule).
    """
    if not prob or len(prob) != len(cells) or len(prob) != len(truth):
        raise ValueError("need the same positive number of probability, cell and truth slices")
    if annotated is not None and len(annotated) != len(prob):
        raise ValueError("need one annotated mask per slice")
    if annotated is not None and not any(np.any(k) for k in annotated):
        raise InputError(None, "the calibration slices hold no annotated pixel")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    scales = truth_scales(truth)
    errors = pixel_errors(prob, cells, CELL_THRESHOLDS, annotated)
    pixel = [{"threshold": t, "pixel_error": float(e)} for t, e in zip(CELL_THRESHOLDS, errors)]
    cell = min(pixel, key=lambda c: (c["pixel_error"], abs(c["threshold"] - 0.5)))
    min_sizes = sorted({0, int(round(MIN_SIZE_FRACTION * scales["median_area_px"]))})
    candidates = []
    if "threshold" in methods or "watershed" in methods:
        plain = [_score({"method": "threshold", "threshold": t, "min_size": m}, prob, cells, truth, annotated)
                 for t in THRESHOLDS for m in min_sizes]  # fmt: skip
        if "threshold" in methods:
            candidates += plain
    if "watershed" in methods:
        ranked = sorted(plain, key=lambda c: (-c["rand_score"] if not math.isnan(c["rand_score"]) else math.inf))
        best_t = list(dict.fromkeys(c["threshold"] for c in ranked))[:WATERSHED_THRESHOLDS]
        for t in best_t:
            for f in SEED_FRACTIONS:
                for g in PROMINENCE_FRACTIONS:
                    for m in min_sizes:
                        params = {
                            "method": "watershed", "threshold": t, "seed_threshold": round(t + f * (1 - t), 4),
                            "seed_prominence": round(max(g * scales["radius_px"], 0.5), 3), "min_size": m,
                        }  # fmt: skip
                        candidates.append(_score(params, prob, cells, truth, annotated))
    winner = choose(candidates)
    decisions = {k: winner[k] for k in DECISION_KEYS if k in winner}
    decisions.setdefault("seed_threshold", max(0.9, decisions["threshold"]))
    decisions.setdefault("seed_prominence", round(max(PROMINENCE_FRACTIONS[1] * scales["radius_px"], 0.5), 3))
    return {
        "decisions": decisions,
        "scores": {k: winner[k] for k in ("rand_score", "rand_error", "pixel_error")},
        "cell_threshold": cell["threshold"],
        "cell_pixel_error": cell["pixel_error"],
        "scales": scales,
        "pixel_candidates": pixel,
        "candidates": candidates,
    }


def calibration_windows(
    slices: Sequence[int], shape_yx: Sequence[int], max_pixels: int | None
) -> list[tuple[int, slice, slice]]:
    """``(z, y slice, x slice)`` of the calibration windows: whole slices while they fit in
    ``max_pixels`` (None: no bound), else the sampled windows of the module docstring."""
    zs = list(slices)
    h, w = (int(v) for v in shape_yx)
    whole = [(z, slice(0, h), slice(0, w)) for z in zs]
    if max_pixels is None or len(zs) * h * w <= max_pixels:
        return whole
    sy, sx = min(h, WINDOW), min(w, WINDOW)
    ys = np.round(np.linspace(0, h - sy, max(1, -(-h // sy)))).astype(int)
    xs = np.round(np.linspace(0, w - sx, max(1, -(-w // sx)))).astype(int)
    grid = [(int(y), int(x)) for y in ys for x in xs]
    budget = max(1, int(max_pixels) // (sy * sx))  # windows in all

    def spread(n: int, k: int) -> list[int]:  # k of range(n), evenly spaced
        return sorted({int((i + 0.5) * n / k) for i in range(k)})

    if budget < len(zs):
        chosen = [(zs[i], [grid[len(grid) // 2]]) for i in spread(len(zs), budget)]
    else:
        per_slice = min(len(grid), budget // len(zs))
        chosen = [(z, [grid[i] for i in spread(len(grid), per_slice)]) for z in zs]
    return [(z, slice(y, y + sy), slice(x, x + sx)) for z, corners in chosen for y, x in corners]


def load_slices(
    probabilities: str | Path,
    truth: str | Path,
    slices: Sequence[int],
    truth_mode: str = "binary",
    foreground_value: int | None = 255,
    unlabelled_value: int | None = None,
    max_pixels: int | None = None,
    windows: list | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The calibration slices ``[start, stop)`` of one dataset, as lists of 2D arrays:
    probabilities, truth cell masks, truth instances and annotated masks (all True
    unless ``unlabelled_value`` is given; unlabelled pixels are neither cell nor segment).

    Beyond ``max_pixels`` only the windows of :func:`calibration_windows` are read; their
    ``[z, [y0, y1], [x0, x1]]`` (truth coordinates) are appended to ``windows`` when given."""
    probabilities, truth = Path(probabilities), Path(truth)
    prob_arr, scale = open_probabilities(probabilities)
    truth_meta = image_metadata(truth)
    box = truth_box(truth_meta, truth, tuple(prob_arr.shape), probabilities)
    oz = truth_meta.offset[0]
    start, stop = (int(s) for s in slices)
    if not oz <= start < stop <= oz + truth_meta.shape[0]:
        where = f"the stack of {truth_meta.shape[0]}" if oz == 0 else f"the labelled slices [{oz}, {oz + truth_meta.shape[0]})"
        raise InputError(truth, f"calibration slices [{start}, {stop}) outside {where}")
    truth_arr = open_image(truth)
    prob, cells, inst, known = [], [], [], []
    for z, wy, wx in calibration_windows(range(start, stop), truth_meta.shape[1:], max_pixels):
        if windows is not None:
            windows.append([z, [wy.start, wy.stop], [wx.start, wx.stop]])
        t = np.asarray(truth_arr[z - oz, wy, wx])
        k = np.ones(t.shape, bool) if unlabelled_value is None else t != unlabelled_value
        if truth_mode == "binary":
            c = (t == foreground_value) if foreground_value is not None else (t != 0)
            c &= k
            i = instances_from_binary(c)
        else:
            c = (t != 0) & k
            i = np.where(k, t, 0)
        by, bx = (slice(b.start + w.start, b.start + w.stop) for b, w in zip(box, (wy, wx)))  # window in the box
        p = as_probability(prob_arr[z, by, bx], scale)
        if not np.all(np.isfinite(p)):
            raise InputError(probabilities, f"slice {z} holds non-finite probabilities")
        prob.append(p)
        cells.append(c)
        inst.append(i)
        known.append(k)
    return prob, cells, inst, known


def calibrate(
    datasets: Mapping[str, Mapping[str, Any]],
    out_json: str | Path,
    *,
    truth_mode: str = "binary",
    foreground_value: int | None = 255,
    methods: Sequence[str] = METHODS,
    unlabelled_value: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Choose the decisions on ``{name: {'probabilities': path, 'truth': path, 'slices': [a, b]}}``
    and write them, with every candidate's scores, to ``out_json`` (atomically).

    ``max_pixels`` bounds the pixels scored (split evenly over the datasets; None: all)."""
    prob, cells, truth, known = [], [], [], []
    inputs: dict[str, Path] = {}
    share = None if max_pixels is None else max(1, int(max_pixels) // max(1, len(datasets)))
    windows: dict[str, list] = {}
    for name, spec in sorted(datasets.items()):
        p, c, t, k = load_slices(
            spec["probabilities"], spec["truth"], spec["slices"], truth_mode, foreground_value, unlabelled_value,
            share, windows.setdefault(name, []),
        )
        prob += p
        cells += c
        truth += t
        known += k
        inputs[f"{name}.probabilities"] = Path(spec["probabilities"])
        inputs[f"{name}.truth"] = Path(spec["truth"])
    if not prob:
        raise InputError(None, "no calibration slices given")
    result = calibrate_slices(prob, cells, truth, methods, None if unlabelled_value is None else known)
    params = {
        "slices": {name: [int(v) for v in spec["slices"]] for name, spec in sorted(datasets.items())},
        "truth_mode": truth_mode,
        "foreground_value": foreground_value,
        "unlabelled_value": unlabelled_value,
        "methods": list(methods),
        "max_pixels": max_pixels,
    }
    log.info("scoring %d calibration windows (%d px; max_pixels %s)", len(prob), sum(a.size for a in prob), max_pixels)
    out = {"criterion": CRITERION, **params, "windows": windows, **result, "provenance": provenance(inputs, params)}
    write_json_atomic(out_json, out)
    d = result["decisions"]
    log.info(
        "calibrated on %d slices: cell threshold %.2f (pixel error %.4f); instances %s at %.2f "
        "(Rand error %.4f)", len(prob), result["cell_threshold"], result["cell_pixel_error"], d["method"],
        d["threshold"], result["scores"]["rand_error"],
    )  # fmt: skip
    return out


def read_decisions(path: str | Path) -> dict[str, Any]:
    """The decisions of a ``decisions.json`` written by :func:`calibrate`, checked.

    Returns ``{'method', 'threshold', 'seed_threshold', 'seed_prominence',
    'min_size', 'cell_threshold', 'slices'}`` (``slices``: the calibration slices
    per dataset, ``{}`` when the file does not say).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        d = dict(data["decisions"])
        d["cell_threshold"] = float(data["cell_threshold"])
    except FileNotFoundError:
        raise InputError(path, "decisions file not found (run `unet-pipe calibrate` first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"not a unet-pipe decisions file ({type(exc).__name__})") from None
    d = check_decisions(d, path)
    slices = data.get("slices") if isinstance(data.get("slices"), dict) else {}
    return {**d, "slices": slices}


def check_decisions(d: Any, where: str | Path | None) -> dict[str, Any]:
    """``{method, threshold, seed_threshold, seed_prominence, min_size, cell_threshold}`` of ``d``,
    checked (:class:`InputError` naming ``where`` when missing or out of range)."""
    ok = (
        isinstance(d, dict) and d.get("method") in METHODS
        and all(isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool) and math.isfinite(d[k])
                for k in ("threshold", "seed_threshold", "seed_prominence", "min_size", "cell_threshold"))
        and 0 <= d["threshold"] <= d["seed_threshold"] <= 1 and 0 <= d["cell_threshold"] <= 1
        and d["seed_prominence"] > 0 and d["min_size"] >= 0
    )  # fmt: skip
    if not ok:
        raise InputError(where, "decisions out of range or missing (method, thresholds, prominence, min_size)")
    out = {k: d[k] for k in (*DECISION_KEYS, "cell_threshold")}
    out["min_size"] = int(out["min_size"])
    return out
