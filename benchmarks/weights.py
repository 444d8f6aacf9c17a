"""Benchmark: the border term of the weight map, ours vs. the textbook per-object method.

1. On the ISBI 2012 label slices (all 30; 3 with --quick), one run: time of
   ``unet_pipe.weights.border_weights`` (per-object distance transforms in
   grown bounding boxes) vs. ``border_weights_textbook`` (one distance
   transform per object over the whole slice, then the two smallest), and the
   largest absolute difference between them.
2. Scaling: time per pixel on 64 ISBI slices of 512^2 computed one by one vs.
   on a 4096^2 mosaic of the same 64 slices (about 7400 cells, best of 2 runs
   each): linear in the pixels means a ratio near 1.
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
from scipy import ndimage as ndi

from unet_pipe.weights import (
    WeightParams,
    cutoff_distance,
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


def mosaic(slices: list[np.ndarray], tiles: int) -> np.ndarray:
    """A (tiles * 512)^2 instance image of ``tiles^2`` instance slices, ids offset to stay distinct.

    Each tile keeps exactly its own objects (no cells merged across the seams),
    so the mosaic holds the same work as its tiles computed one by one.
    """
    shifted, offset = [], 0
    for inst in slices:
        inst = inst.astype(np.int64)
        inst[inst > 0] += offset
        offset = max(offset, int(inst.max()))
        shifted.append(inst)
    rows = [np.concatenate(shifted[r * tiles : (r + 1) * tiles], axis=1) for r in range(tiles)]
    return np.concatenate(rows, axis=0)


def box_pixels(inst: np.ndarray, params: WeightParams) -> int:
    """Pixels in all grown boxes: the work of ``border_weights`` (distance transforms), for comparison."""
    margin = int(cutoff_distance(params.sigma, params.tolerance) - 1.0)
    total = 0
    for box in ndi.find_objects(inst):
        if box is not None:
            total += int(np.prod([min(b.stop + margin, n) - max(b.start - margin, 0) for b, n in zip(box, inst.shape)]))
    return total


def best_cpu(fn, *args, repeats: int = 2, **kwargs) -> float:
    """Least CPU seconds of ``repeats`` runs (the first run of a large size also pays page faults)."""
    return min(timed(fn, *args, **kwargs)[1] for _ in range(repeats))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 slices for the textbook comparison")
    parser.add_argument("--isbi-dir", type=Path, default=DEFAULT_ISBI)
    args = parser.parse_args()
    labels = tifffile.imread(args.isbi_dir / "train-labels.tif")
    params = WeightParams()  # w0 = 10, sigma = 5 px, tolerance 1e-6 * w0
    subset = labels[:3] if args.quick else labels

    cmp = compare_with_textbook(subset, params)

    # Scaling: the same 64 slices (z cycling through the stack) one by one at 512^2
    # and as one 4096^2 mosaic.  The 512^2 slices are a little cheaper per pixel
    # because grown boxes are clipped at the image edge.
    tiles = [instances_from_labels(labels[z % len(labels)], params) for z in range(64)]
    kwargs = dict(w0=params.w0, sigma=params.sigma, tolerance=params.tolerance)
    small_cpu = best_cpu(lambda: [border_weights(t, **kwargs) for t in tiles])
    big = mosaic(tiles, 8)
    big_cpu = best_cpu(border_weights, big, **kwargs)
    per_px_512 = small_cpu / sum(t.size for t in tiles)
    per_px_4096 = big_cpu / big.size
    work_512 = sum(box_pixels(t, params) for t in tiles) / sum(t.size for t in tiles)
    work_4096 = box_pixels(big, params) / big.size

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
        "cells_4096": int(len(np.unique(big)) - 1),
        "ours_s_4096": big_cpu,
        "box_px_per_px_512": work_512,
        "box_px_per_px_4096": work_4096,
        "work_ratio_4096_vs_512": work_4096 / work_512,
        "store_isbi_volume_cpu_s": store_cpu,
        "store_isbi_volume_wall_s": store_wall,
        "quick": args.quick,
    }
    for key, value in result.items():
        print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
