#!/usr/bin/env python
"""Benchmark: postprocessing quality and speed, and metric sanity, on ISBI 2012 labels.

Without a trained model, "probabilities" are made from the ISBI 2012 truth
(``train-labels.tif``; the synthetic stack when it is absent) with the
U-Net's typical defects, and both postprocessing methods are scored:

* ``perfect``: p = labels / 255 (upper bound: every method must score 0);
* ``gaps``: short gaps punched into 2 % of the membrane (merges through the
  gaps are the classic failure of threshold + connected components);
* ``gaps_noise``: the gaps, a 1 px blur and Gaussian noise (std 0.1).

Methods: threshold; watershed with the default seed prominence (5 px) and
with 8 px.

Metric sanity (truth against a transformed truth): identity, cells eroded by
1/2 px, cells dilated by 1 px (closes thin membranes -> merges).

Timing: ms per slice of thresholding, watershed, our Rand scores and VI, and
skimage's ``adapted_rand_error`` on the same slice (its pair-count definition
differs slightly; reference only), one thread, median of the slices.

Usage: ``python benchmarks/postprocess.py [--quick]`` (quick: 3 slices instead
of 30).  The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from skimage.metrics import adapted_rand_error

from unet_pipe.metrics import (
    instances_from_binary,
    iou,
    pixel_error,
    rand_error,
    rand_scores,
    variation_of_information,
)
from unet_pipe.postprocess import instances_from_probabilities

ROOT = Path(__file__).resolve().parents[1]
# The default watershed suits the demo's ~36 px cells; ISBI's larger cells want
# a larger seed prominence (about a quarter of the cell radius).
METHODS = {"threshold": {}, "watershed": {}, "watershed_prominence8": {"seed_prominence": 8.0}}
ISBI = Path(os.environ.get("UNET_PIPE_ISBI_DIR", ROOT.parent / "shared" / "data" / "isbi2012"))


def load_labels(n: int) -> tuple[np.ndarray, str]:
    path = ISBI / "train-labels.tif"
    if path.exists():
        import tifffile

        return tifffile.imread(path)[:n], "isbi2012 train-labels"
    from unet_pipe.synth import synthesize

    return synthesize((n, 512, 512), seed=0).labels, "synthetic"


def degrade(labels: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = labels.astype(np.float32) / 255.0
    if kind == "perfect":
        return p
    membrane = p == 0
    gaps = np.stack([ndi.binary_dilation(m & (rng.random(m.shape) < 0.02), iterations=2) & m for m in membrane])
    p = np.where(gaps, 0.95, p).astype(np.float32)
    if kind == "gaps_noise":
        p = ndi.gaussian_filter(p, (0, 1, 1)) + rng.normal(0, 0.1, p.shape).astype(np.float32)
        p = np.clip(p, 0, 1)
    return p


def score(pred: np.ndarray, truth: np.ndarray, truth_cells: np.ndarray, prob: np.ndarray | None = None) -> dict:
    vi = [variation_of_information(pred[z], truth[z]) for z in range(len(pred))]
    out = {
        "rand_error": round(rand_error(pred, truth), 4),
        "vi_split": round(float(np.mean([v[0] for v in vi])), 3),
        "vi_merge": round(float(np.mean([v[1] for v in vi])), 3),
        "iou": round(iou(pred > 0, truth_cells), 4),
    }
    if prob is not None:
        out["pixel_error"] = round(pixel_error(prob, truth_cells), 4)
    return out


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 slices instead of 30")
    args = parser.parse_args()
    labels, source = load_labels(3 if args.quick else 30)
    truth_cells = labels > 0
    truth = instances_from_binary(labels)
    result: dict = {"source": source, "slices": int(labels.shape[0]), "slice_shape": list(labels.shape[1:])}

    sanity = {"identity": score(truth, truth, truth_cells)}
    for r in (1, 2):
        eroded = np.stack([ndi.grey_erosion(s, size=(2 * r + 1,) * 2) for s in truth])
        eroded[truth == 0] = 0
        sanity[f"eroded_{r}px"] = score(eroded, truth, truth_cells)
    dilated = np.stack([ndi.binary_dilation(s) for s in truth_cells])
    sanity["dilated_1px"] = score(instances_from_binary(dilated), truth, truth_cells)
    result["metric_sanity"] = sanity

    times: dict[str, list[float]] = {k: [] for k in ("rand", "vi", "skimage_adapted_rand")}
    quality = {}
    for kind in ("perfect", "gaps", "gaps_noise"):
        prob = degrade(labels, kind)
        quality[kind] = {}
        for method, kwargs in METHODS.items():
            slices = []
            for z in range(len(prob)):
                inst, ms = timed(instances_from_probabilities, prob[z], method.split("_")[0], **kwargs)
                slices.append(inst)
                times.setdefault(method, []).append(ms)
            quality[kind][method] = score(np.stack(slices), truth, truth_cells, prob)
            if kind == "gaps" and method == "threshold":
                for z, inst in enumerate(slices):
                    times["rand"].append(timed(rand_scores, inst, truth[z])[1])
                    times["vi"].append(timed(variation_of_information, inst, truth[z])[1])
                    times["skimage_adapted_rand"].append(timed(adapted_rand_error, truth[z], inst)[1])
    result["postprocess_quality"] = quality
    result["ms_per_slice_median"] = {k: round(statistics.median(v), 1) for k, v in times.items() if v}
    gaps = quality["gaps"]
    result["gaps_rand_error_ratio_threshold_over_watershed"] = round(
        gaps["threshold"]["rand_error"] / max(gaps["watershed"]["rand_error"], 1e-6), 1
    )
    result["watershed_over_threshold_time"] = round(
        result["ms_per_slice_median"]["watershed"] / result["ms_per_slice_median"]["threshold"], 1
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
