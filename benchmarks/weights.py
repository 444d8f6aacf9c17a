"""Benchmark: the border term of the weight map, ours vs. the textbook per-object method.

1. On the ISBI 2012 label slices (all 30; 3 with --quick), one run: time of
   ``unet_pipe.weights.border_weights`` (per-object distance transforms in
   grown bounding boxes) vs. ``border_weights_textbook`` (one distance
   transform per object over the whole slice, then the two smallest), and the
   largest absolute difference between them.
2. Scaling: time per pixel on the 512^2 slices vs. on a 4096^2 mosaic of 8 x 8
   different ISBI label slices (about 7000 cells): linear in the pixels means
   a ratio near 1.
3. The chunked store (``compute_weight_store``) for the whole ISBI volume.

Times are CPU seconds of this process (robust on a shared machine; every step
is single-threaded); wall seconds are printed too.  The last stdout line is
one JSON object.  Usage: ``python benchmarks/weights.py [--quick] [--isbi-dir DIR]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from unet_pipe.weights import (
    WeightParams,
    border_weights,
    border_weights_textbook,
    compute_weight_store,
    instances_from_labels,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ISBI = Path(os.environ.get("UNET_PIPE_ISBI_DIR", REPO.parent / "shared" / "data" / "isbi2012"))


def timed(fn, *args, **kwargs):
    """(result, cpu seconds, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def compare_with_textbook(labels: np.ndarray, params: WeightParams) -> dict:
    ours_cpu = ours_wall = ref_cpu = ref_wall = 0.0
    max_diff = 0.0
    objects = []
    for z, label_slice in enumerate(labels):
        inst = instances_from_labels(label_slice, params)
        objects.append(int(inst.max()))
        # Interleaved per slice, so a change of machine load hits both methods alike.
        fast, c, w = timed(border_weights, inst, params.w0, params.sigma, tolerance=params.tolerance)
        ours_cpu, ours_wall = ours_cpu + c, ours_wall + w
        ref, c, w = timed(border_weights_textbook, inst, params.w0, params.sigma)
        ref_cpu, ref_wall = ref_cpu + c, ref_wall + w
        max_diff = max(max_diff, float(np.abs(fast - ref).max()))
        print(f"slice {z:2d}: {objects[-1]:3d} cells, max |diff| {np.abs(fast - ref).max():.2e}", file=sys.stderr)
    return {
        "slices": len(labels),
        "cells_per_slice_mean": float(np.mean(objects)),
        "ours_cpu_s": ours_cpu,
        "ours_wall_s": ours_wall,
        "textbook_cpu_s": ref_cpu,
        "textbook_wall_s": ref_wall,
        "max_abs_diff": max_diff,
    }


def mosaic(labels: np.ndarray, tiles: int) -> np.ndarray:
    """A (tiles * 512)^2 image of different label slices (z cycles through the stack)."""
    rows = [np.concatenate([labels[(r * tiles + c) % len(labels)] for c in range(tiles)], axis=1) for r in range(tiles)]
    return np.concatenate(rows, axis=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 slices for the textbook comparison")
    parser.add_argument("--isbi-dir", type=Path, default=DEFAULT_ISBI)
    args = parser.parse_args()
    labels = tifffile.imread(args.isbi_dir / "train-labels.tif")
    params = WeightParams()  # w0 = 10, sigma = 5 px, tolerance 1e-6 * w0
    subset = labels[:3] if args.quick else labels

    cmp = compare_with_textbook(subset, params)
    per_px_512 = cmp["ours_cpu_s"] / (len(subset) * labels[0].size)

    big = instances_from_labels(mosaic(labels, 8), params)
    _, big_cpu, big_wall = timed(border_weights, big, params.w0, params.sigma, tolerance=params.tolerance)
    per_px_4096 = big_cpu / big.size

    from unet_pipe.io import StagedImage

    with tempfile.TemporaryDirectory() as tmp:
        staged = StagedImage(Path(tmp) / "labels.ome.zarr", shape=labels.shape, dtype=labels.dtype,
                             chunks=(1, 256, 256), voxel_size=(0.05, 0.004, 0.004), kind="labels")
        staged.array[:] = labels
        staged.commit(pyramid_levels=0)
        _, store_cpu, store_wall = timed(compute_weight_store, Path(tmp) / "labels.ome.zarr",
                                         Path(tmp) / "weights.ome.zarr", params)

    result = {
        "speedup_vs_textbook": cmp["textbook_cpu_s"] / cmp["ours_cpu_s"],
        "max_abs_diff": cmp["max_abs_diff"],
        "time_per_px_ratio_4096_vs_512": per_px_4096 / per_px_512,
        "speedup_vs_textbook_wall": cmp["textbook_wall_s"] / cmp["ours_wall_s"],
        "slices": cmp["slices"],
        "cells_per_slice_mean": round(cmp["cells_per_slice_mean"], 1),
        "ours_s_per_512_slice": cmp["ours_cpu_s"] / cmp["slices"],
        "textbook_s_per_512_slice": cmp["textbook_cpu_s"] / cmp["slices"],
        "ours_ns_per_px_512": per_px_512 * 1e9,
        "ours_ns_per_px_4096": per_px_4096 * 1e9,
        "cells_4096": int(big.max()),
        "ours_s_4096": big_cpu,
        "ours_wall_s_4096": big_wall,
        "store_isbi_volume_cpu_s": store_cpu,
        "store_isbi_volume_wall_s": store_wall,
        "quick": args.quick,
    }
    for key, value in result.items():
        print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")
    print(json.dumps({k: round(v, 8) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
