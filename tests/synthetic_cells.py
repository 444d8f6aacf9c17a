"""Synthetic cell masks shared by the metric tests."""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi


def voronoi_cells(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """Cell mask of Voronoi cells separated by 1-pixel membranes (True = cell)."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int64)
    seeds[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = np.arange(1, n + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    ids = seeds[iy, ix]
    membrane = np.zeros(shape, bool)
    membrane[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    membrane[:-1] |= ids[:-1] != ids[1:]
    return ~membrane
