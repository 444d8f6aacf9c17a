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

**3D instances** (``instances="3d"``, for ``postprocess --instances 3d``): the
same rule on volumes instead of slices.  Each dataset's calibration range is
read as one ``(z, y, x)`` volume; ``volume`` = the median voxel count of the
truth's 3D objects (binary truth: 6-connected components of its cells, as
``evaluate`` scores them).  Candidates: 6-connected components of ``p > t`` for
every ``t`` of the coarse grid with ``min_size`` 0 and ``volume / 20`` voxels,
and the 3D seeded watershed (seeds: components of ``p > seed_threshold``; no
prominence, no minimum size, as ``postprocess`` runs it) at the three best
thresholds with ``seed_threshold = t + f (1 - t)``, ``f`` in {0.5, 0.8}.  Each
is scored by 1 - the adapted Rand error of ``skimage.metrics`` over the whole
volume (objects taken whole across slices: the figure ``evaluate`` reports as
3D), averaged over datasets; ties as above.  The labelling is the whole-volume
one (``scipy.ndimage.label``), which is the partition the blockwise
``postprocess`` produces.  The pixel budget bounds each volume by a centred
``(y, x)`` window over the whole range when it holds more voxels.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from unet_pipe.atomic import check_ours, write_json_atomic
from unet_pipe.errors import InputError
from unet_pipe.io import image_metadata, open_image
from unet_pipe.instances3d import SIX_CONNECTED, watershed_reference
from unet_pipe.metrics import instances_from_binary, rand_error_per_slice, scores_3d, truth_box, truth_instances_3d
from unet_pipe.postprocess import METHODS, instances_from_probabilities
from unet_pipe.probabilities import open_probabilities, read_probabilities
from unet_pipe.progress import progress_bar
from unet_pipe.provenance import provenance
from unet_pipe.truth import check_binary_values, check_unlabelled_value

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
INSTANCE_MODES = ("2d", "3d")


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
    progress: bool = False,
) -> dict[str, Any]:
    """Choose the decisions on 2D slices: probabilities, truth cell masks, truth instances,
    and optionally the annotated-pixel masks (sparse truth; None: every pixel is annotated).
    ``progress``: candidates scored, with an ETA (:mod:`unet_pipe.progress`).

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
    watershed = "watershed" in methods
    n_plain = len(THRESHOLDS) * len(min_sizes) if "threshold" in methods or watershed else 0
    n_watershed = (min(WATERSHED_THRESHOLDS, len(set(THRESHOLDS))) * len(SEED_FRACTIONS) * len(PROMINENCE_FRACTIONS)
                   * len(min_sizes)) if watershed else 0  # fmt: skip
    bar = progress_bar(total=n_plain + n_watershed, desc="calibrate", unit="candidate", enabled=progress)

    def score(params: dict[str, Any], *args: Any) -> dict[str, Any]:
        scored = _score(params, *args)
        bar.update(1)
        return scored

    if "threshold" in methods or "watershed" in methods:
        plain = [score({"method": "threshold", "threshold": t, "min_size": m}, prob, cells, truth, annotated)
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
                        candidates.append(score(params, prob, cells, truth, annotated))
    bar.close()
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


def _score_3d(
    params: dict[str, Any],
    prob: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    truth: Sequence[np.ndarray],
    annotated: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """A 3D candidate's mean (over volumes) adapted Rand score and pooled pixel error of its mask."""
    errors, wrong, total = [], 0, 0
    for p, c, t, k in zip(prob, cells, truth, _masks(cells, annotated)):
        inst = instances_3d(p, params["method"], params["threshold"], params.get("seed_threshold", 1.0),
                            params["min_size"])
        with np.errstate(invalid="ignore", divide="ignore"):  # skimage divides 0/0 for empty candidates
            errors.append(scores_3d(inst, t)["are"])
        w, n = _wrong(inst != 0, c, k)
        wrong += w
        total += n
    finite = [e for e in errors if not math.isnan(e)]
    rand_error = float(np.mean(finite)) if finite else math.nan
    pixel = wrong / total if total else math.nan
    return {**params, "rand_score": 1.0 - rand_error, "rand_error": rand_error, "pixel_error": pixel}


def instances_3d(p: np.ndarray, method: str, threshold: float, seed_threshold: float = 1.0,
                 min_size: int = 0) -> np.ndarray:
    """Whole-volume 3D instances of ``p``: the partition ``postprocess --instances 3d`` gives block by
    block (6-connected components of ``p > threshold``, or the seeded watershed), objects smaller than
    ``min_size`` voxels set to 0."""
    p = np.asarray(p, dtype=np.float32)
    if method == "watershed":
        labels = watershed_reference(p, threshold, seed_threshold)
    else:
        labels, _ = ndi.label(p > threshold, structure=SIX_CONNECTED)
    if min_size > 0 and labels.any():
        small = np.bincount(labels.ravel()) < min_size
        small[0] = False
        labels[small[labels]] = 0
    return labels


def calibrate_volumes(
    prob: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    truth: Sequence[np.ndarray],
    methods: Sequence[str] = METHODS,
    annotated: Sequence[np.ndarray] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Choose the decisions for 3D instances on ``(z, y, x)`` volumes (one per dataset): probabilities,
    truth cell masks, truth 3D instances and optionally annotated masks (see the module docstring).

    Returns what :func:`calibrate_slices` does, the decisions with ``instances: '3d'`` and the
    scales with ``median_volume_voxels``."""
    if not prob or len(prob) != len(cells) or len(prob) != len(truth):
        raise ValueError("need the same positive number of probability, cell and truth volumes")
    if annotated is not None and not any(np.any(k) for k in annotated):
        raise InputError(None, "the calibration volumes hold no annotated voxel")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    sizes = [np.bincount(np.asarray(t).ravel())[1:] for t in truth]
    sizes = np.concatenate([v[v > 0] for v in sizes]) if sizes else np.array([])
    if sizes.size == 0:
        raise InputError(None, "the calibration volumes hold no truth objects (no cell voxels)")
    volume = float(np.median(sizes))
    scales = {"median_volume_voxels": volume, "objects": int(sizes.size),
              **truth_scales(z for t in truth for z in np.asarray(t))}
    errors = pixel_errors(prob, cells, CELL_THRESHOLDS, annotated)
    pixel = [{"threshold": t, "pixel_error": float(e)} for t, e in zip(CELL_THRESHOLDS, errors)]
    cell = min(pixel, key=lambda c: (c["pixel_error"], abs(c["threshold"] - 0.5)))
    min_sizes = sorted({0, int(round(MIN_SIZE_FRACTION * volume))})
    n_watershed = WATERSHED_THRESHOLDS * len(SEED_FRACTIONS) if "watershed" in methods else 0
    bar = progress_bar(total=len(THRESHOLDS) * len(min_sizes) + n_watershed, desc="calibrate 3d",
                       unit="candidate", enabled=progress)

    def score(params: dict[str, Any]) -> dict[str, Any]:
        scored = _score_3d(params, prob, cells, truth, annotated)
        bar.update(1)
        return scored

    plain = [score({"method": "threshold", "threshold": t, "min_size": m}) for t in THRESHOLDS for m in min_sizes]
    candidates = list(plain) if "threshold" in methods else []
    if "watershed" in methods:
        ranked = sorted(plain, key=lambda c: (-c["rand_score"] if not math.isnan(c["rand_score"]) else math.inf))
        for t in list(dict.fromkeys(c["threshold"] for c in ranked))[:WATERSHED_THRESHOLDS]:
            for f in SEED_FRACTIONS:
                candidates.append(score({"method": "watershed", "threshold": t,
                                         "seed_threshold": round(t + f * (1 - t), 4), "min_size": 0}))
    bar.close()
    winner = choose(candidates)
    decisions = {k: winner[k] for k in DECISION_KEYS if k in winner}
    decisions.setdefault("seed_threshold", max(0.9, decisions["threshold"]))
    decisions.setdefault("seed_prominence", round(max(PROMINENCE_FRACTIONS[1] * scales["radius_px"], 0.5), 3))
    decisions["instances"] = "3d"
    return {
        "decisions": decisions,
        "scores": {k: winner[k] for k in ("rand_score", "rand_error", "pixel_error")},
        "cell_threshold": cell["threshold"],
        "cell_pixel_error": cell["pixel_error"],
        "scales": scales,
        "pixel_candidates": pixel,
        "candidates": candidates,
    }


def volume_window(shape: Sequence[int], max_voxels: int | None) -> tuple[slice, slice]:
    """The ``(y, x)`` window of a 3D calibration range of ``shape`` (z, y, x): the whole slices when
    they fit in ``max_voxels`` (None: no bound), else a centred window, square where the slice allows,
    of at most ``max_voxels`` over the whole range (objects are cut at its edge in truth and prediction
    alike)."""
    nz, h, w = (int(v) for v in shape)
    if max_voxels is None or nz * h * w <= max_voxels:
        return slice(0, h), slice(0, w)
    sy = min(h, max(1, math.isqrt(max(1, int(max_voxels)) // nz)))
    sx = min(w, max(1, int(max_voxels) // (nz * sy)))
    y0, x0 = (h - sy) // 2, (w - sx) // 2
    return slice(y0, y0 + sy), slice(x0, x0 + sx)


@dataclass(frozen=True)
class _Range:
    """One dataset's calibration range: its probabilities and truth opened, slices checked."""

    probabilities: Path
    truth: Path
    prob: Any
    scale: float
    truth_meta: Any
    box: tuple[slice, slice]  # the truth's (y, x) box in the probabilities
    start: int
    stop: int

    @classmethod
    def open(cls, probabilities: str | Path, truth: str | Path, slices: Sequence[int]) -> "_Range":
        probabilities, truth = Path(probabilities), Path(truth)
        prob, scale = open_probabilities(probabilities)
        meta = image_metadata(truth)
        box = truth_box(meta, truth, tuple(prob.shape), probabilities)
        oz = meta.offset[0]
        start, stop = (int(v) for v in slices)
        if not oz <= start < stop <= oz + meta.shape[0]:
            where = f"the stack of {meta.shape[0]}" if oz == 0 else f"the labelled slices [{oz}, {oz + meta.shape[0]})"
            raise InputError(truth, f"calibration slices [{start}, {stop}) outside {where}")
        return cls(probabilities, truth, prob, scale, meta, box, start, stop)

    def truth_masks(self, t: np.ndarray, truth_mode: str, foreground_value: int | None,
                    unlabelled_value: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cells, annotated, ids) of a truth array: binary truth's ids are still to be labelled (0/1)."""
        known = np.ones(t.shape, bool) if unlabelled_value is None else t != unlabelled_value
        if truth_mode == "binary" and foreground_value is not None and t.dtype != np.bool_:
            check_binary_values(self.truth, np.unique(t), foreground_value, unlabelled_value)
        if truth_mode == "binary":
            cells = ((t == foreground_value) if foreground_value is not None else (t != 0)) & known
            return cells, known, cells
        return (t != 0) & known, known, np.where(known, t, 0)

    def probabilities_at(self, z: slice | int, wy: slice, wx: slice, where: str) -> np.ndarray:
        """Probabilities of truth window (z, wy, wx), range-checked and finite."""
        by, bx = (slice(b.start + w.start, b.start + w.stop) for b, w in zip(self.box, (wy, wx)))
        p = read_probabilities(self.prob, self.scale, self.probabilities, (z, by, bx), where)
        if not np.all(np.isfinite(p)):  # uint8 stores skip the range check; floats never get here with NaN
            raise InputError(self.probabilities, f"{where.removeprefix('in ')} holds non-finite probabilities")
        return p


def load_volume(
    probabilities: str | Path,
    truth: str | Path,
    slices: Sequence[int],
    truth_mode: str = "binary",
    foreground_value: int | None = 255,
    unlabelled_value: int | None = None,
    max_voxels: int | None = None,
    windows: list | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The calibration range ``[start, stop)`` of one dataset as ``(z, y, x)`` volumes: probabilities,
    truth cell mask, truth 3D instances (binary truth: 6-connected components of the cells) and the
    annotated mask; a centred window (:func:`volume_window`) beyond ``max_voxels``, recorded in
    ``windows`` as ``[[z0, z1], [y0, y1], [x0, x1]]`` (truth coordinates)."""
    r = _Range.open(probabilities, truth, slices)
    oz = r.truth_meta.offset[0]
    wy, wx = volume_window((r.stop - r.start, *r.truth_meta.shape[1:]), max_voxels)
    if windows is not None:
        windows.append([[r.start, r.stop], [wy.start, wy.stop], [wx.start, wx.stop]])
    t = np.asarray(open_image(r.truth)[r.start - oz : r.stop - oz, wy, wx])
    cells, known, ids = r.truth_masks(t, truth_mode, foreground_value, unlabelled_value)
    inst = truth_instances_3d(cells) if truth_mode == "binary" else ids
    p = r.probabilities_at(slice(r.start, r.stop), wy, wx, f"in slices {r.start}-{r.stop - 1}")
    return p, cells, inst, known


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
    r = _Range.open(probabilities, truth, slices)
    oz = r.truth_meta.offset[0]
    truth_arr = open_image(r.truth)
    prob, cells, inst, known = [], [], [], []
    for z, wy, wx in calibration_windows(range(r.start, r.stop), r.truth_meta.shape[1:], max_pixels):
        if windows is not None:
            windows.append([z, [wy.start, wy.stop], [wx.start, wx.stop]])
        c, k, ids = r.truth_masks(np.asarray(truth_arr[z - oz, wy, wx]), truth_mode, foreground_value,
                                  unlabelled_value)
        prob.append(r.probabilities_at(z, wy, wx, f"in slice {z}"))
        cells.append(c)
        inst.append(instances_from_binary(c) if truth_mode == "binary" else ids)
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
    instances: str = "2d",
    progress: bool = False,
) -> dict[str, Any]:
    """Choose the decisions on ``{name: {'probabilities': path, 'truth': path, 'slices': [a, b]}}``
    and write them, with every candidate's scores, to ``out_json`` (atomically).

    ``max_pixels`` bounds the pixels scored (split evenly over the datasets; None: all);
    ``instances``: ``2d`` (slice by slice) or ``3d`` (each range as one volume)."""
    if instances not in INSTANCE_MODES:
        raise ValueError(f"instances must be one of {INSTANCE_MODES}, got {instances!r}")
    check_ours(Path(out_json))  # before the work, not after it
    for spec in datasets.values():
        check_unlabelled_value(spec["truth"], truth_mode, foreground_value, unlabelled_value)
    prob, cells, truth, known = [], [], [], []
    inputs: dict[str, Path] = {}
    share = None if max_pixels is None else max(1, int(max_pixels) // max(1, len(datasets)))
    windows: dict[str, list] = {}
    for name, spec in sorted(datasets.items()):
        load = load_volume if instances == "3d" else load_slices
        p, c, t, k = load(
            spec["probabilities"], spec["truth"], spec["slices"], truth_mode, foreground_value, unlabelled_value,
            share, windows.setdefault(name, []),
        )
        if instances == "3d":
            p, c, t, k = [p], [c], [t], [k]
        prob += p
        cells += c
        truth += t
        known += k
        inputs[f"{name}.probabilities"] = Path(spec["probabilities"])
        inputs[f"{name}.truth"] = Path(spec["truth"])
    if not prob:
        raise InputError(None, "no calibration slices given")
    choose_on = calibrate_volumes if instances == "3d" else calibrate_slices
    result = choose_on(prob, cells, truth, methods, None if unlabelled_value is None else known, progress)
    params = {
        "instances": instances,
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
        "calibrated (%s) on %d slices: cell threshold %.2f (pixel error %.4f); instances %s at %.2f "
        "(Rand error %.4f)", instances, sum(len(a) for a in prob) if instances == "3d" else len(prob),
        result["cell_threshold"], result["cell_pixel_error"], d["method"],
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
    if d.get("instances", "2d") not in INSTANCE_MODES:
        raise InputError(where, f"decisions for instances {d.get('instances')!r}: expected 2d or 3d")
    out = {k: d[k] for k in (*DECISION_KEYS, "cell_threshold")}
    out["min_size"] = int(out["min_size"])
    if d.get("instances", "2d") == "3d":  # 2D decisions stay as they were written (no key)
        out["instances"] = "3d"
    return out
