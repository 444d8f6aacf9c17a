#!/usr/bin/env python
"""Benchmark: 3D instances block by block (``unet_pipe.instances3d``), zarr -> zarr.

Input: float32 "probabilities" (0.95 in blobs, 0.05 elsewhere) of randomly
placed spheres (radius 3-12 voxels, touching and overlapping ones merge), as an
OME-Zarr in chunks of 64 x 128 x 128; threshold 0.5; 6-connectivity.  The input
is generated chunk by chunk (it never exists in memory as a whole).

Figures, each measured in this one run on this machine:

* ``voxels_per_s``: ``label_volume`` zarr -> zarr (read and check the
  probabilities, label blocks, face merge, relabel, write; no pyramid) with
  ``--threads`` workers, median of the rounds.
* ``scipy_voxels_per_s``: ``scipy.ndimage.label(volume > 0.5)`` of the whole
  volume already in memory (the reference: one core, no I/O), median of rounds.
* ``ratio_vs_scipy_in_memory``: the first over the second (target >= 0.5).
* ``dask_image_voxels_per_s`` and ``ratio_vs_dask_image``:
  ``dask_image.ndmeasure.label`` on the same zarr input and chunks, written to
  zarr (threaded scheduler, ``--threads`` workers), one round; ``null`` with
  ``dask_image`` recorded as unavailable when it is not installed.
* ``rss_ratio_4x_vs_1x``: peak RSS (VmHWM) of a fresh process labelling a
  volume 4x larger (4x the slices) over the same on the 1x volume (target <= 1.10).
* ``same_partition_as_scipy`` (and ``dask_image_same_partition_as_scipy``):
  the outputs checked against the in-memory result.

Usage: ``python benchmarks/instances3d.py [--quick] [--out DIR] [--threads N]``.
Full: 256 x 512 x 512 with 2,272 blobs (the issue's reference volume), RSS
volumes of 0.27 and 1.07 gigavoxels (256 and 1024 slices of 1024^2); ``--quick``:
64 x 256 x 256 (142 blobs) and RSS volumes of 16 and 67 Mvoxels (several blocks
in flight at 1x too).  The last line
of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNKS = (64, 128, 128)
THRESHOLD = 0.5
BLOB_DENSITY = 2272 / (256 * 512 * 512)  # blobs per voxel of the reference volume


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ input


def write_blobs(path: Path, shape: tuple[int, int, int], seed: int = 0) -> int:
    """Spheres as float32 probabilities in an OME-Zarr, written chunk by chunk; returns the blob count."""
    from unet_pipe.io import StagedImage

    rng = np.random.default_rng(seed)
    n = max(1, round(BLOB_DENSITY * float(np.prod(shape))))
    centres = rng.uniform(0, 1, (n, 3)) * np.array(shape)
    radii = rng.uniform(3, 12, n)
    staged = StagedImage(path, shape=shape, dtype=np.float32, chunks=CHUNKS, overwrite=True)
    # Which blobs reach which chunk: bounding boxes in chunk units.
    per_chunk: dict[tuple[int, ...], list[int]] = {}
    for i, (c, r) in enumerate(zip(centres, radii)):
        lo = np.maximum(np.floor((c - r) / CHUNKS), 0).astype(int)
        hi = np.minimum(np.floor((c + r) / CHUNKS), np.array(shape) // CHUNKS - 1 + (np.array(shape) % CHUNKS > 0))
        for z in range(lo[0], int(hi[0]) + 1):
            for y in range(lo[1], int(hi[1]) + 1):
                for x in range(lo[2], int(hi[2]) + 1):
                    per_chunk.setdefault((z, y, x), []).append(i)
    grid = [range(0, s, c) for s, c in zip(shape, CHUNKS)]
    for z0 in grid[0]:
        for y0 in grid[1]:
            for x0 in grid[2]:
                key = (z0 // CHUNKS[0], y0 // CHUNKS[1], x0 // CHUNKS[2])
                ext = [min(c, s - a) for a, c, s in zip((z0, y0, x0), CHUNKS, shape)]
                block = np.full(ext, 0.05, np.float32)
                zz, yy, xx = np.ogrid[z0 : z0 + ext[0], y0 : y0 + ext[1], x0 : x0 + ext[2]]
                for i in per_chunk.get(key, []):
                    (cz, cy, cx), r = centres[i], radii[i]
                    block[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 0.95
                staged.array[z0 : z0 + ext[0], y0 : y0 + ext[1], x0 : x0 + ext[2]] = block
    staged.commit(pyramid_levels=0)
    return n


# ------------------------------------------------------------------ measurements


def run_ours(src: Path, dest: Path, threads: int) -> float:
    from unet_pipe.instances3d import label_volume

    start = time.perf_counter()
    label_volume(src, dest, threshold=THRESHOLD, workers=threads, pyramid_levels=0, overwrite=True, resume=False)
    return time.perf_counter() - start


def run_dask_image(src: Path, dest: Path, threads: int) -> tuple[float | None, str]:
    try:
        import dask
        import dask.array as da
        from dask_image.ndmeasure import label as dask_label
    except ImportError as exc:
        return None, f"unavailable ({exc})"
    from importlib.metadata import version

    import scipy.ndimage as ndi

    from unet_pipe.io import open_image

    shutil.rmtree(dest, ignore_errors=True)
    start = time.perf_counter()
    prob = da.from_zarr(str(src / "0"))  # level 0 of the OME-Zarr, its own chunks
    labels, _ = dask_label(prob > THRESHOLD, structure=ndi.generate_binary_structure(3, 1))
    with dask.config.set(scheduler="threads", num_workers=threads):
        labels.astype(np.uint32).to_zarr(str(dest), overwrite=True)
    return time.perf_counter() - start, version("dask-image")


def peak_rss_bytes() -> int:
    """Peak RSS of this process's own address space (VmHWM; see benchmarks/predict.py)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_child(src: Path, dest: Path, threads: int) -> dict:
    """Runs in a fresh process: label ``src`` into ``dest``; report peak RSS and time."""
    seconds = run_ours(src, dest, threads)
    return {"peak_rss": peak_rss_bytes(), "seconds": seconds}


def run_rss_child(src: Path, dest: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--rss-child", str(src), str(dest), "--threads", str(threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 x 256^2 volume; 16 and 67 Mvoxel RSS volumes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "instances3d")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rss-child", nargs=2, type=Path, metavar=("SRC", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(*args.rss_child, args.threads)))
        return
    import scipy.ndimage as ndi

    from unet_pipe.instances3d import SIX_CONNECTED, choose_block, same_partition
    from unet_pipe.io import open_image
    from unet_pipe.machine import cpu_model

    args.out.mkdir(parents=True, exist_ok=True)
    shape = (64, 256, 256) if args.quick else (256, 512, 512)
    rss_shapes = [(64, 512, 512), (256, 512, 512)] if args.quick else [(256, 1024, 1024), (1024, 1024, 1024)]
    rounds = 3
    src, dest = args.out / "blobs.ome.zarr", args.out / "labels.ome.zarr"
    log(f"writing {shape} blobs ...")
    blobs = write_blobs(src, shape)
    voxels = float(np.prod(shape))

    volume = open_image(src)[:]
    scipy_s = []
    for _ in range(rounds):
        start = time.perf_counter()
        reference, n_objects = ndi.label(volume > THRESHOLD, structure=SIX_CONNECTED)
        scipy_s.append(time.perf_counter() - start)
    del volume
    log(f"scipy in memory: {voxels / statistics.median(scipy_s) / 1e6:.1f} Mvox/s, {n_objects} objects")

    ours_s = [run_ours(src, dest, args.threads) for _ in range(rounds)]
    ours = open_image(dest)[:]
    ours_ok = same_partition(ours, reference)
    del ours
    log(f"ours zarr -> zarr: {voxels / statistics.median(ours_s) / 1e6:.1f} Mvox/s, same partition: {ours_ok}")

    dask_dest = args.out / "dask_labels.zarr"
    dask_s, dask_version = run_dask_image(src, dask_dest, args.threads)
    dask_ok = None
    if dask_s is not None:
        import zarr

        dask_ok = same_partition(zarr.open_array(str(dask_dest), mode="r")[:], reference)
        log(f"dask-image {dask_version} zarr -> zarr: {voxels / dask_s / 1e6:.2f} Mvox/s, same partition: {dask_ok}")
    del reference
    shutil.rmtree(dask_dest, ignore_errors=True)

    rss = []
    for i, rss_shape in enumerate(rss_shapes):
        rss_src, rss_dest = args.out / f"rss{i}.ome.zarr", args.out / f"rss{i}_labels.ome.zarr"
        log(f"RSS run on {rss_shape} ...")
        write_blobs(rss_src, rss_shape, seed=1)
        rss.append(run_rss_child(rss_src, rss_dest, args.threads))
        for path in (rss_src, rss_dest):
            shutil.rmtree(path, ignore_errors=True)
    for path in (src, dest):
        shutil.rmtree(path, ignore_errors=True)

    rate, scipy_rate = voxels / statistics.median(ours_s), voxels / statistics.median(scipy_s)
    figures = {
        "shape": list(shape),
        "chunks": list(CHUNKS),
        "block": list(choose_block(shape, CHUNKS)),
        "blobs": blobs,
        "objects": int(n_objects),
        "voxels_per_s": round(rate, 1),
        "scipy_voxels_per_s": round(scipy_rate, 1),
        "ratio_vs_scipy_in_memory": round(rate / scipy_rate, 3),
        "dask_image": dask_version,
        "dask_image_voxels_per_s": None if dask_s is None else round(voxels / dask_s, 1),
        "ratio_vs_dask_image": None if dask_s is None else round(rate / (voxels / dask_s), 2),
        "same_partition_as_scipy": bool(ours_ok),
        "dask_image_same_partition_as_scipy": dask_ok,
        "rss_1x_mib": round(rss[0]["peak_rss"] / 2**20, 1),
        "rss_4x_mib": round(rss[1]["peak_rss"] / 2**20, 1),
        "rss_ratio_4x_vs_1x": round(rss[1]["peak_rss"] / rss[0]["peak_rss"], 3),
        "rss_4x_gigavoxels": round(float(np.prod(rss_shapes[1])) / 1e9, 3),
        "rss_runs_voxels_per_s": [round(float(np.prod(s)) / r["seconds"], 1) for s, r in zip(rss_shapes, rss)],
        "threads": args.threads,
        "cpu_model": cpu_model(),
        "quick": args.quick,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
