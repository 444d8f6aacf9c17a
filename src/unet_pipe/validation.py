"""Validation during training: held-out slices predicted in memory and scored.

:func:`load_validation` reads the ``val`` slices of each training volume once;
:func:`validate` predicts them with :func:`predict_probabilities` (overlap-tile
prediction in memory, equal to one whole-stack pass) and returns the pixel error
and the foreground-restricted Rand error that :mod:`unet_pipe.train` logs.
Unlabelled pixels (sparse annotations) count in neither score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from unet_pipe.intensity import normalize_raw
from unet_pipe.metrics import instances_from_binary, rand_error_per_slice
from unet_pipe.model import UNet, class_probabilities
from unet_pipe.postprocess import instances_from_probabilities
from unet_pipe.precision import autocast
from unet_pipe.sampling import Volume, annotated_mask, label_classes
from unet_pipe.tiling import Roi, fit_tile, predict_tiled, unet_axis_geometry, volume_geometry

_VALIDATION_TILE = 512  # largest output tile edge (px) used to predict validation slices


def predict_probabilities(
    model: UNet,
    raw: np.ndarray,
    device: torch.device,
    max_tile: int = _VALIDATION_TILE,
    precision: str = "float32",
) -> np.ndarray:
    """Cell probability ``1 - softmax(logits)[0]`` of a normalised ``(z, y, x)`` float32 stack.

    Overlap-tile prediction in memory with :func:`unet_pipe.tiling.predict_tiled`
    (mirrored borders, tiles on the pooling grid: equal to one whole-stack
    pass), for validation; the pipeline's block-wise predictor is
    :mod:`unet_pipe.predict`.  2D nets predict slice by slice, 3D nets the
    stack.  The model is used as given (call ``model.eval()`` first).
    ``precision``: resolved (:mod:`unet_pipe.precision`), training's own.
    """
    geometry = volume_geometry(unet_axis_geometry(model.depth), model.dims)
    tile = tuple(
        1 if (axis == 0 and model.dims == 2) else fit_tile(extent, max_tile, g.step)
        for axis, (extent, g) in enumerate(zip(raw.shape, geometry))
    )

    def forward(windows: np.ndarray) -> np.ndarray:
        # 2D: the z axis of length 1 serves as the channel axis, (B, 1, Y, X).
        x = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
        x = (x if model.dims == 2 else x[:, None]).to(device)
        with torch.no_grad(), autocast(device, precision):
            logits = model(x)
        prob = 1.0 - class_probabilities(logits)[:, 0]
        return (prob[:, None] if model.dims == 2 else prob).cpu().numpy()

    region = Roi((0, 0, 0), tuple(raw.shape))
    return predict_tiled(raw, region, tile, geometry, forward).astype(np.float32, copy=False)


@dataclass(frozen=True)
class ValidationData:
    """Held-out slices of one volume, in memory: normalised raw, classes, truth instances."""

    name: str
    raw: np.ndarray
    classes: np.ndarray
    truth_instances: np.ndarray
    annotated: np.ndarray | None = None  # sparse labels: the annotated pixels (None: all)
    box: tuple[slice, slice] = (slice(None), slice(None))  # labelled crop: its (y, x) part of ``raw``


def load_validation(
    volumes: list[Volume], label_mode: str, foreground_value: int, unlabelled_value: int | None = None
) -> list[ValidationData]:
    """Validation slices in memory; unlabelled pixels are no truth segment and leave the pixel error."""
    out = []
    for v in volumes:
        if v.val is None:
            continue
        z0, z1 = v.val
        oz, oy, ox = (int(o) for o in v.labels_offset)
        labels = np.asarray(v.labels[z0 - oz : z1 - oz])
        # Whole raw slices are predicted (real context around a crop), then cut to the labelled box.
        box = (slice(oy, oy + labels.shape[1]), slice(ox, ox + labels.shape[2]))
        classes = label_classes(labels, label_mode, foreground_value, unlabelled_value)
        known = None if unlabelled_value is None else annotated_mask(labels, unlabelled_value)
        if label_mode == "binary":
            truth = instances_from_binary(classes == 1)
        else:
            truth = (labels if known is None else np.where(known, labels, 0)).astype(np.uint32)
        raw = normalize_raw(np.asarray(v.raw[z0:z1]), v.intensity)
        out.append(ValidationData(v.name, raw, classes, truth, known, box))
    return out


def validate(
    model: UNet,
    data: list[ValidationData],
    device: torch.device,
    postprocess_cfg: Mapping[str, Any],
    precision: str = "float32",
) -> tuple[float, float]:
    """Pixel error and foreground-restricted Rand error (mean over held-out slices).

    Instances come from :func:`unet_pipe.postprocess.instances_from_probabilities`
    with the config's ``postprocess`` settings, per slice, as the pipeline
    segments them (method ``auto``, chosen only after training: threshold 0.5
    and connected components); the pixel error thresholds the cell probability
    the same way.
    """
    method = postprocess_cfg.get("method", "auto")
    if method == "auto":
        # The decisions are calibrated after training (unet_pipe.calibrate); monitoring uses the
        # uncalibrated default: connected components of p > 0.5.
        method, threshold, options = "threshold", 0.5, {}
    else:
        threshold = float(postprocess_cfg.get("threshold", 0.5))
        # The postprocess stage's own options (watershed seeds, minimum size) where given.
        options = {k: postprocess_cfg[k] for k in ("seed_threshold", "seed_prominence", "min_size") if k in postprocess_cfg}
    wrong = total = 0
    errors: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        for d in data:
            prob = predict_probabilities(model, d.raw, device, precision=precision)[(slice(None), *d.box)]
            diff = (prob > threshold) != (d.classes == 1)
            if d.annotated is None:
                wrong += int(np.count_nonzero(diff))
                total += prob.size
            else:
                wrong += int(np.count_nonzero(diff & d.annotated))
                total += int(np.count_nonzero(d.annotated))
            pred = np.stack([instances_from_probabilities(p, method, threshold, **options) for p in prob])
            errors.append(rand_error_per_slice(pred, d.truth_instances))
    finally:
        model.train(was_training)
    per_slice = np.concatenate(errors) if errors else np.array([np.nan])
    rand = float(np.nanmean(per_slice)) if not np.all(np.isnan(per_slice)) else float("nan")
    return wrong / max(total, 1), rand
