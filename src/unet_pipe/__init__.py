"""unet-pipe: the U-Net of Ronneberger et al. (2015) as a reproducible EM segmentation pipeline."""
from __future__ import annotations

import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting made CPU training 4-5x slower whenever
# another process shared the cores (measured: 40 demo steps, 2 threads, 37 s
# spinning vs 8.8 s passive on a loaded 2-core node; Snakemake often runs jobs
# side by side). Must be set before torch loads libgomp; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
