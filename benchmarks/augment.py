#!/usr/bin/env python
"""Benchmark: per-sample time of our elastic deformation vs. the `elasticdeform` package.

Both deform a 572 x 572 float32 image + uint8 label on one CPU thread with the
paper's settings: a 3 x 3 coarse grid, sigma = 10 px, cubic image
interpolation, nearest-neighbour labels, mirrored borders.  Ours is
``unet_pipe.augment.augment_sample`` (torch ``grid_sample``, Keys bicubic);
``elasticdeform.deform_random_grid(order=[3, 0], mode='mirror')`` uses cubic
B-splines.  elasticdeform does not import with NumPy 2, so it runs in its own
virtual environment (``benchmarks/out/elasticdeform-venv``, created here with
``pip install 'numpy<2' elasticdeform scipy`` when missing) in a subprocess
with OMP/MKL/OPENBLAS threads = 1.  If that environment cannot be made, the
figure recorded below is used and the JSON says ``"elasticdeform_source":
"recorded"``.

Usage: ``python benchmarks/augment.py [--quick] [--size 572]``.  The last line
of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unet_pipe.augment import AugmentParams, augment_sample

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / "benchmarks" / "out" / "elasticdeform-venv"
# elasticdeform 0.5.1, numpy 1.26.4, 572 x 572, 1 thread, on the 2-core dev
# machine (median of 30); used only when the venv cannot be created.
RECORDED_ELASTICDEFORM_MS = 76.6
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# Runs in the numpy<2 venv as a worker: each stdin line "N" times N calls and
# answers one JSON line, so that its rounds interleave with ours and a
# changing machine load hits both alike.
ELASTICDEFORM_WORKER = r"""
import json, sys, time
from importlib.metadata import version
import numpy as np, elasticdeform
size = int(sys.argv[1])
rng = np.random.default_rng(0)
image = rng.random((size, size), dtype=np.float32)
labels = np.kron(rng.integers(0, 2, (size // 11 + 1, size // 11 + 1)), np.ones((11, 11)))[:size, :size]
labels = (labels * 255).astype(np.uint8)
np.random.seed(0)
print(json.dumps({"elasticdeform": version("elasticdeform"), "numpy": np.__version__}), flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        elasticdeform.deform_random_grid([image, labels], sigma=10, points=3, order=[3, 0], mode="mirror")
        times.append(time.perf_counter() - t0)
    print(json.dumps(times), flush=True)
"""


def ensure_venv(venv: Path) -> Path:
    """Create the numpy<2 venv with elasticdeform unless it already imports; return its python."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import elasticdeform"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "numpy<2", "elasticdeform", "scipy"],
        check=True, capture_output=True,
    )
    subprocess.run(probe, check=True, capture_output=True)
    return python


class ElasticdeformWorker:
    """elasticdeform timing subprocess on one thread in the numpy<2 venv."""

    def __init__(self, python: Path, size: int) -> None:
        self.proc = subprocess.Popen(
            [str(python), "-c", ELASTICDEFORM_WORKER, str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD},
        )
        self.versions = self._answer()

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise OSError(f"elasticdeform worker exited with {self.proc.wait()}")
        return json.loads(line)

    def time(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


class OurAugment:
    """augment_sample on the same kind of 572 x 572 image + label (+ weights)."""

    def __init__(self, params: AugmentParams, size: int, with_weights: bool) -> None:
        rng = np.random.default_rng(0)
        self.image = torch.from_numpy(rng.random((size, size), dtype=np.float32))
        blocks = rng.integers(0, 2, (size // 11 + 1, size // 11 + 1))
        self.labels = torch.from_numpy((np.kron(blocks, np.ones((11, 11)))[:size, :size] * 255).astype(np.uint8))
        self.weights = torch.from_numpy(rng.random((size, size), dtype=np.float32)) if with_weights else None
        self.params = params
        self.generator = torch.Generator().manual_seed(0)

    def time(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            augment_sample(self.image, self.labels, self.weights, self.params, self.generator)
            times.append(time.perf_counter() - t0)
        return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--size", type=int, default=572, help="image edge in px (paper 572)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="numpy<2 venv for elasticdeform")
    args = parser.parse_args(argv)
    rounds, per_round = (4, 3) if args.quick else (10, 5)
    torch.set_num_threads(1)

    paper = AugmentParams(elastic_sigma=10.0, elastic_grid=3, rotate=False, flip=False, shift=0.0,
                          gray_value=False, interpolation="bicubic")
    ours = OurAugment(paper, args.size, with_weights=False)
    # Everything on (elastic + rotation + flips + shift + gray values) with a weight map too.
    full = OurAugment(AugmentParams(shift=20.0), args.size, with_weights=True)
    ours.time(2)  # warm-up
    full.time(2)

    result: dict = {"size": args.size, "threads": 1, "reps": rounds * per_round, "torch": torch.__version__}
    worker = None
    try:
        worker = ElasticdeformWorker(ensure_venv(args.venv), args.size)
        worker.time(2)
        result["elasticdeform_version"] = worker.versions["elasticdeform"]
        result["elasticdeform_numpy"] = worker.versions["numpy"]
    except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as exc:
        print(f"elasticdeform venv unavailable ({exc}); using the recorded figure", file=sys.stderr)
        if args.size != 572:
            raise SystemExit("the recorded elasticdeform figure is for --size 572 only") from exc
        worker = None

    ours_t, full_t, ed_t = [], [], []
    for _ in range(rounds):
        ours_t += ours.time(per_round)
        full_t += full.time(per_round)
        if worker is not None:
            ed_t += worker.time(per_round)
    if worker is not None:
        worker.close()
        ed_ms, source = 1e3 * statistics.median(ed_t), "measured"
    else:
        ed_ms, source = RECORDED_ELASTICDEFORM_MS, "recorded"
    ours_ms, full_ms = 1e3 * statistics.median(ours_t), 1e3 * statistics.median(full_t)

    print(f"ours (elastic, bicubic image + nearest label): {ours_ms:.2f} ms/sample")
    print(f"ours (all augmentations + weights):            {full_ms:.2f} ms/sample")
    print(f"elasticdeform ({source}):                       {ed_ms:.2f} ms/sample")
    result.update(
        ms_per_sample=round(ours_ms, 3),
        ms_per_sample_all_augmentations=round(full_ms, 3),
        elasticdeform_ms_per_sample=round(ed_ms, 3),
        elasticdeform_source=source,
        speedup_vs_elasticdeform=round(ed_ms / ours_ms, 2),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
