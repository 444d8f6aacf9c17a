"""A synthetic isotropic (FIB-SEM-like) volume with dense 3D ground truth: the isotropic preset's default.

Where :mod:`unet_pipe.synth` imitates serial sections (cells drawn slice by
slice, a new 2D outline on every section), this draws **3D cells** that touch
on every side, as a FIB-SEM block of neural tissue does:

* a weighted 3D Voronoi tessellation of jittered seeds (mean diameter
  ``cell_diameter`` voxels in y and x), its borders made wavy by a smooth
  displacement field (a sum of a few 3D sine waves);
* thin dark membranes (``membrane_width`` voxels) on every face between cells,
  **with gaps**: small holes where a membrane is faint, which is what makes 3D
  connected components of a probability map leak from one cell into the next;
* dark organelle-like blobs (ellipsoids) inside cells, never crossing a
  membrane; per-cell gray values, texture, blur and noise.

``anisotropy`` (the z voxel edge over the y/x edge; 1 = isotropic) makes the
same tissue look like serial sections: the cells keep their physical shape,
so they span fewer slices.

Deterministic: the same shape, seed and parameters give bit-identical arrays.
Memory: a few bytes per voxel beyond the outputs (250³: about 0.3 GB in all),
built slab by slab in z.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

DEFAULT_SHAPE_3D: tuple[int, int, int] = (64, 128, 128)
DEFAULT_VOXEL_SIZE_3D: tuple[float, float, float] = (0.01, 0.01, 0.01)  # µm: isotropic 10 nm FIB-SEM
_SLAB = 16  # z slices labelled per cKDTree query: bounds the query's temporaries


@dataclass(frozen=True)
class SynthStack:
    """A synthetic stack and its truth (both generators: :mod:`unet_pipe.synth` and this module)."""

    raw: np.ndarray  # (z, y, x) uint8
    labels: np.ndarray  # (z, y, x) uint8, 0 = membrane, 255 = cell
    instances: np.ndarray  # (z, y, x) uint16/uint32 cell ids, 0 on membranes


@dataclass(frozen=True)
class Synth3DParams:
    cell_diameter: float = 28.0  # voxels in y/x (z: divided by the anisotropy), mean
    membrane_width: int = 2  # voxels
    wobble: float = 2.5  # voxels, amplitude of the wavy-border displacement
    gaps_per_cell: float = 1.5  # holes in the membranes around a cell (mean), membrane gray there
    gap_radius: float = 2.0  # voxels
    blobs_per_cell: float = 1.0
    blur: float = 0.8  # voxels, optical point-spread std
    noise: float = 10.0  # gray values, std of the additive noise


def _jittered_seeds(rng: np.random.Generator, extent: np.ndarray, spacing: float) -> np.ndarray:
    """Seeds on a grid of ``spacing`` (physical y/x voxels) over ``extent`` plus a margin, each
    moved by up to 0.35 of the spacing: even sizes, no two seeds closer than 0.3 spacing."""
    margin = spacing
    axes = [np.arange(-margin, e + margin, spacing) for e in extent]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid + rng.uniform(-0.35, 0.35, grid.shape) * spacing


class _Waves3D:
    """A smooth displacement field: for each of 3 axes a sum of ``n`` sine waves of random direction."""

    def __init__(self, rng: np.random.Generator, amplitude: float, wavelength: float, n: int = 4) -> None:
        self.k = rng.normal(0, 1, (3, n, 3))
        self.k *= (2 * np.pi / wavelength) / np.linalg.norm(self.k, axis=-1, keepdims=True)
        self.phase = rng.uniform(0, 2 * np.pi, (3, n))
        self.amplitude = amplitude / np.sqrt(n)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        out = np.empty_like(points)
        for axis in range(3):
            out[:, axis] = self.amplitude * np.sin(points @ self.k[axis].T + self.phase[axis]).sum(axis=1)
        return out


def synthesize_3d(
    shape: Sequence[int] = DEFAULT_SHAPE_3D,
    seed: int = 0,
    anisotropy: float = 1.0,
    params: Synth3DParams | None = None,
) -> SynthStack:
    """Generate a synthetic volume (z, y, x) with 3D cells and its ground truth (see the module docstring).

    Returns raw (uint8), labels (0 = membrane, 255 = cell) and instances (3D cell ids, 0 on membranes).
    """
    p = params or Synth3DParams()
    nz, ny, nx = (int(s) for s in shape)
    if min(nz, ny, nx) < 4:
        raise ValueError(f"synthetic 3D shape must be at least (4, 4, 4), got {tuple(shape)}")
    if not anisotropy > 0:
        raise ValueError(f"anisotropy must be positive, got {anisotropy}")
    rng = np.random.default_rng(seed)
    # Physical coordinates in y/x voxel units: z is stretched by the anisotropy.
    extent = np.array([nz * anisotropy, ny, nx], dtype=np.float64)
    seeds = _jittered_seeds(rng, extent, p.cell_diameter)
    n = len(seeds)
    weights = rng.normal(0, 0.1 * p.cell_diameter, n)  # power-diagram weights: size variation
    waves = _Waves3D(rng, p.wobble, 2.5 * p.cell_diameter)
    tree = cKDTree(seeds)

    cells = _tessellate(tree, weights, waves, (nz, ny, nx), anisotropy)
    # Membranes: voxels with another cell within the half width (both sides of each face).
    footprint = ndimage.generate_binary_structure(3, 1)
    iterations = max(1, p.membrane_width // 2)
    high = ndimage.grey_dilation(cells, footprint=footprint)
    low = ndimage.grey_erosion(cells, footprint=footprint)
    membrane = high != low
    if p.membrane_width > 2:
        membrane = ndimage.binary_dilation(membrane, footprint, iterations=iterations - 1)
    del high, low
    ids, inverse = np.unique(cells, return_inverse=True)
    inverse = inverse.reshape(cells.shape)
    instances = np.where(membrane, 0, inverse + 1).astype(np.uint32)
    gray_membrane = _membrane_gaps(membrane, seed, len(ids), anisotropy, p)
    # Gray values: per-cell cytoplasm, texture, dark blobs inside cells, dark membranes, blur, noise.
    cell_gray = rng.normal(168, 10, len(ids) + 1).astype(np.float32)
    image = cell_gray[inverse + 1]
    image += 14 * ndimage.gaussian_filter(rng.normal(0, 1, cells.shape).astype(np.float32), 1.5)
    interior = ndimage.binary_erosion(~membrane, footprint, iterations=2)
    n_blobs = rng.poisson(p.blobs_per_cell * len(ids))
    inside = np.argwhere(interior[:, :: 4, :: 4]) * [1, 4, 4]
    for centre in inside[rng.integers(0, len(inside), n_blobs)] if len(inside) and n_blobs else []:
        axes = rng.uniform(1.5, 4.0, 3) / [anisotropy, 1, 1]
        lo = np.maximum(centre - np.ceil(axes).astype(int), 0)
        hi = np.minimum(centre + np.ceil(axes).astype(int) + 1, cells.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
        inside_blob = (((grid - centre) / axes) ** 2).sum(-1) <= 1
        same_cell = instances[sl] == instances[tuple(centre)]
        image[sl] = np.where(inside_blob & same_cell, image[sl] * 0.55, image[sl])
    darkening = 0.62 * gray_membrane
    image = np.where(membrane, image * (1 - darkening), image)
    image = ndimage.gaussian_filter(image, [p.blur / anisotropy, p.blur, p.blur])
    image += rng.normal(0, p.noise, cells.shape).astype(np.float32) * np.sqrt(np.clip(image, 1, None) / 150)
    raw = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    labels = np.where(instances > 0, 255, 0).astype(np.uint8)
    # Ids 1..k in raster order of first voxel, each a 6-connected 3D object (a Voronoi cell cut by the
    # volume's edge or its membranes may fall apart: each part is its own object, as a proofreader's).
    relabelled, _ = ndimage.label(instances > 0, structure=footprint, output=np.uint32)
    pieces = _split_by_id(instances, relabelled)
    if pieces.max() < 2**16:
        pieces = pieces.astype(np.uint16)
    return SynthStack(raw=raw, labels=labels, instances=pieces)


def _tessellate(tree: cKDTree, weights: np.ndarray, waves: _Waves3D, shape: tuple[int, int, int],
                anisotropy: float) -> np.ndarray:
    """Seed index of every voxel: the weighted Voronoi cell of its displaced position, slab by slab."""
    nz, ny, nx = shape
    cells = np.empty((nz, ny, nx), dtype=np.int32)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    for z0 in range(0, nz, _SLAB):
        z1 = min(z0 + _SLAB, nz)
        zz = np.repeat(np.arange(z0, z1, dtype=np.float64) * anisotropy, ny * nx)
        pts = np.column_stack([zz, np.tile(yy.ravel(), z1 - z0), np.tile(xx.ravel(), z1 - z0)])
        pts += waves(pts)
        # Weighted Voronoi: among the 4 nearest seeds, the one with the least distance - weight.
        dist, idx = tree.query(pts, k=4, workers=1)
        best = np.argmin(dist - weights[idx], axis=1)
        cells[z0:z1] = idx[np.arange(len(idx)), best].reshape(z1 - z0, ny, nx)
    return cells


def _membrane_gaps(membrane: np.ndarray, seed: int, n_cells: int, anisotropy: float, p: Synth3DParams) -> np.ndarray:
    """Per-voxel membrane darkness factor (1: full; down to 0.15 at a gap's centre), from its own random stream."""
    gray_membrane = np.ones(membrane.shape, np.float32)
    membrane_points = np.argwhere(membrane)
    gap_rng = np.random.default_rng([seed, 1])  # its own stream: the gaps change nothing else
    n_gaps = gap_rng.poisson(p.gaps_per_cell * n_cells) if len(membrane_points) else 0
    for centre in membrane_points[gap_rng.integers(0, len(membrane_points), n_gaps)] if n_gaps else []:
        lo = np.maximum(centre - int(np.ceil(p.gap_radius)), 0)
        hi = np.minimum(centre + int(np.ceil(p.gap_radius)) + 1, membrane.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
        r = np.linalg.norm((grid - centre) * [anisotropy, 1, 1], axis=-1) / p.gap_radius
        gray_membrane[sl] = np.minimum(gray_membrane[sl], np.clip(r, 0.15, 1.0).astype(np.float32))
    return gray_membrane


def _split_by_id(ids: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Objects = (id, connected component) pairs, numbered 1..k in raster order; 0 stays 0."""
    fg = ids > 0
    pairs = ids[fg].astype(np.uint64) << np.uint64(32) | components[fg].astype(np.uint64)
    _, first, inverse = np.unique(pairs, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    out = np.zeros(ids.shape, np.uint32)
    out[fg] = (order[inverse.ravel()] + 1).astype(np.uint32)
    return out
