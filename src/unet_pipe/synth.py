"""A synthetic EM-like stack with known ground truth: the demo's embedded default.

The stack imitates serial-section TEM of neural tissue (like ISBI 2012):

* densely packed cells that **touch** each other, as a weighted Voronoi
  tessellation whose seeds drift slowly from slice to slice (neurites run
  through the stack) and whose borders are made wavy by a smooth displacement
  field;
* thin dark membranes (2-4 px) on every cell border;
* organelle-like blobs inside cells: dark mitochondria-like ellipses and
  clusters of small vesicles, never crossing a membrane;
* cytoplasm gray values varying per cell, fine texture, optical blur,
  shot-like noise, per-slice brightness changes and slice-to-slice drift
  (the whole field of view shifts by a random walk).

Everything derives from one ``numpy.random.Generator`` seed, so the output is
bit-identical for the same ``shape`` and ``seed``.

Outputs (see :func:`write_synthetic`): ``raw.tif`` (uint8), ``labels.tif`` in the
ISBI convention (0 = membrane, 255 = cell) and ``instances.tif`` (cell ids,
0 on membranes), with ImageJ voxel-size metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile
from scipy import ndimage
from scipy.spatial import cKDTree

from unet_pipe.atomic import atomic_output, check_ours
from unet_pipe.synth3d import SynthStack, synthesize_3d

DEFAULT_SHAPE: tuple[int, int, int] = (12, 256, 256)
DEFAULT_VOXEL_SIZE: tuple[float, float, float] = (0.05, 0.004, 0.004)  # µm: ISBI-like 50 x 4 x 4 nm


@dataclass(frozen=True)
class SynthParams:
    cell_diameter: float = 36.0  # px, mean
    membrane_width: int = 3  # px
    wobble: float = 3.0  # px, amplitude of the wavy-border displacement
    drift: float = 0.7  # px per slice, std of the field-of-view random walk
    seed_motion: float = 1.2  # px per slice, std of each cell's own motion
    mito_per_cell: float = 0.6
    vesicle_clusters_per_cell: float = 0.6
    blur: float = 1.0  # px, optical point-spread std
    noise: float = 9.0  # gray values, std of the additive noise


def _seed_points(rng: np.random.Generator, ny: int, nx: int, diameter: float, margin: float) -> np.ndarray:
    """Roughly evenly spaced seeds (dart throwing with a minimum distance), like packed cells."""
    area = (ny + 2 * margin) * (nx + 2 * margin)
    target = max(2, int(area / (np.pi * (diameter / 2) ** 2) * 1.1))
    min_dist = 0.55 * diameter
    candidates = rng.uniform((-margin, -margin), (ny + margin, nx + margin), size=(target * 6, 2))
    kept: list[np.ndarray] = []
    tree_pts = np.empty((0, 2))
    for i, point in enumerate(candidates):
        if len(kept) >= target:
            break
        if i % 64 == 0 and kept:
            tree_pts = np.asarray(kept)
        recent = np.asarray(kept[len(tree_pts) :]) if len(kept) > len(tree_pts) else np.empty((0, 2))
        near = np.concatenate([tree_pts, recent]) if len(recent) else tree_pts
        if len(near) and np.min(np.sum((near - point) ** 2, axis=1)) < min_dist**2:
            continue
        kept.append(point)
    return np.asarray(kept)


class _WaveField:
    """A smooth 2D displacement field whose phases advance slowly with z."""

    def __init__(self, rng: np.random.Generator, amplitude: float, n_waves: int = 8) -> None:
        wavelength = rng.uniform(25, 90, size=n_waves)
        angle = rng.uniform(0, np.pi, size=n_waves)
        self.k = np.stack([np.sin(angle), np.cos(angle)], axis=1) * (2 * np.pi / wavelength)[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, size=(n_waves, 2))
        self.speed = rng.normal(0, 0.15, size=(n_waves, 2))
        self.amp = amplitude / np.sqrt(n_waves / 2) * rng.uniform(0.5, 1.0, size=(n_waves, 2))

    def __call__(self, yy: np.ndarray, xx: np.ndarray, z: int) -> tuple[np.ndarray, np.ndarray]:
        dy = np.zeros_like(yy)
        dx = np.zeros_like(xx)
        for (ky, kx), phase, speed, amp in zip(self.k, self.phase, self.speed, self.amp):
            arg = ky * yy + kx * xx
            dy += amp[0] * np.sin(arg + phase[0] + speed[0] * z)
            dx += amp[1] * np.sin(arg + phase[1] + speed[1] * z)
        return dy, dx


def _cell_labels(
    points: np.ndarray, radii: np.ndarray, yy: np.ndarray, xx: np.ndarray, tree: cKDTree
) -> np.ndarray:
    """Additively weighted Voronoi: pixel -> argmin_i |p - s_i| - r_i among the 6 nearest seeds."""
    coords = np.stack([yy.ravel(), xx.ravel()], axis=1)
    k = min(6, len(points))
    dist, idx = tree.query(coords, k=k)
    if k == 1:
        dist, idx = dist[:, None], idx[:, None]
    score = dist - radii[idx]
    best = idx[np.arange(len(idx)), np.argmin(score, axis=1)]
    return (best + 1).reshape(yy.shape)


def _borders(cells: np.ndarray, width: int) -> np.ndarray:
    """Membrane mask: pixels within ``width`` px of a border between two cells."""
    edge = np.zeros(cells.shape, dtype=bool)
    edge[:-1, :] |= cells[:-1, :] != cells[1:, :]
    edge[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width // 2)
    return edge


def _draw_ellipse(shape: tuple[int, int], centre: np.ndarray, axes: np.ndarray, angle: float) -> np.ndarray:
    cy, cx = centre
    ry, rx = axes
    reach = int(np.ceil(max(ry, rx))) + 1
    y0, y1 = max(0, int(cy) - reach), min(shape[0], int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(shape[1], int(cx) + reach + 1)
    mask = np.zeros(shape, dtype=np.float32)
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = ((yy - cy) * c + (xx - cx) * s) / ry
    v = (-(yy - cy) * s + (xx - cx) * c) / rx
    mask[y0:y1, x0:x1] = np.clip(1.5 - np.sqrt(u**2 + v**2) * 1.5, 0, 1) * 2  # soft edge
    return np.clip(mask, 0, 1)


def synthesize(
    shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0, params: SynthParams | None = None
) -> SynthStack:
    """Generate a synthetic EM stack (z, y, x) with its ground truth.

    Deterministic: the same ``shape``, ``seed`` and ``params`` give bit-identical arrays.
    """
    p = params or SynthParams()
    nz, ny, nx = (int(s) for s in shape)
    if min(nz, ny, nx) < 1 or ny < 8 or nx < 8:
        raise ValueError(f"synthetic shape must be at least (1, 8, 8), got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    margin = 2 * p.cell_diameter
    seeds = _seed_points(rng, ny, nx, p.cell_diameter, margin)
    n = len(seeds)
    radii = rng.normal(0, 0.12 * p.cell_diameter, size=n)  # size variation of the weighted Voronoi
    velocity = rng.normal(0, p.seed_motion, size=(n, 2))
    drift = np.cumsum(rng.normal(0, p.drift, size=(nz, 2)), axis=0)
    drift -= drift[0]
    wave = _WaveField(rng, p.wobble)
    cell_gray = rng.normal(172, 10, size=n + 1)
    # Organelles live in a cell's own frame, for a run of slices.
    mitos = []
    for cell in range(1, n + 1):
        for _ in range(rng.poisson(p.mito_per_cell)):
            z0 = rng.integers(-4, nz)
            mitos.append(
                (cell, z0, z0 + rng.integers(3, 10), rng.normal(0, 0.2 * p.cell_diameter, 2),
                 rng.uniform([2.5, 4.0], [4.5, 9.0]), rng.uniform(0, np.pi))
            )
    vesicles = []
    for cell in range(1, n + 1):
        for _ in range(rng.poisson(p.vesicle_clusters_per_cell)):
            z0 = rng.integers(-2, nz)
            centre = rng.normal(0, 0.2 * p.cell_diameter, 2)
            offsets = rng.normal(0, 3.5, size=(rng.integers(4, 10), 2))
            vesicles.append((cell, z0, z0 + rng.integers(2, 5), centre + offsets, rng.uniform(1.2, 2.0)))

    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    raw = np.empty((nz, ny, nx), dtype=np.uint8)
    instances = np.empty((nz, ny, nx), dtype=np.uint32)
    for z in range(nz):
        pts = seeds + velocity * (z / max(nz - 1, 1)) * np.sqrt(nz) + drift[z]
        tree = cKDTree(pts)
        dy, dx = wave(yy + drift[z, 0], xx + drift[z, 1], z)
        cells = _cell_labels(pts, radii, yy + dy, xx + dx, tree)
        membrane = _borders(cells, p.membrane_width)
        inst = np.where(membrane, 0, cells).astype(np.uint32)
        interior = ndimage.binary_erosion(~membrane, iterations=2)

        image = cell_gray[cells].astype(np.float32)
        texture = ndimage.gaussian_filter(rng.normal(0, 1, (ny, nx)).astype(np.float32), 2.0)
        image += 18 * texture
        organelles = np.zeros((ny, nx), dtype=np.float32)
        for cell, za, zb, offset, axes, angle in mitos:
            if za <= z < zb:
                centre = pts[cell - 1] + offset
                blob = _draw_ellipse((ny, nx), centre, axes, angle + 0.05 * z)
                organelles = np.maximum(organelles, blob * (cells == cell) * interior)
        for cell, za, zb, centres, radius in vesicles:
            if za <= z < zb:
                for c in centres:
                    blob = _draw_ellipse((ny, nx), pts[cell - 1] + c, np.array([radius, radius]), 0.0)
                    organelles = np.maximum(organelles, 0.7 * blob * (cells == cell) * interior)
        image = image * (1 - 0.45 * organelles)
        membrane_strength = 0.75 + 0.25 * ndimage.gaussian_filter(rng.uniform(0, 1, (ny, nx)), 6) * 2
        image = np.where(membrane, image * (1 - 0.62 * np.clip(membrane_strength, 0, 1)), image)
        image = ndimage.gaussian_filter(image, p.blur)
        image += rng.normal(0, 6, 1)[0]  # per-slice brightness (section thickness, staining)
        image += rng.normal(0, p.noise, (ny, nx)) * np.sqrt(np.clip(image, 1, None) / 150)
        raw[z] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        instances[z] = inst
    labels = np.where(instances > 0, 255, 0).astype(np.uint8)
    if instances.max() < 2**16:
        instances = instances.astype(np.uint16)
    return SynthStack(raw=raw, labels=labels, instances=instances)


def _write_tiff_atomic(path: Path, data: np.ndarray, voxel_size: Sequence[float]) -> None:
    vz, vy, vx = voxel_size
    imagej = data.dtype in (np.uint8, np.uint16, np.float32)
    with atomic_output(path) as tmp:
        tifffile.imwrite(
            tmp,
            data,
            imagej=imagej,
            resolution=(1 / vx, 1 / vy),
            metadata={"spacing": vz, "unit": "um", "axes": "ZYX"} if imagej else {"axes": "ZYX"},
            photometric="minisblack",
        )


def write_synthetic(
    out_dir: str | Path,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
    mode: str = "2d",
    anisotropy: float = 1.0,
) -> dict[str, Path]:
    """Write ``raw.tif``, ``labels.tif`` and ``instances.tif`` to ``out_dir``; return their paths.

    ``mode``: ``2d`` (serial sections, :func:`synthesize`) or ``3d`` (3D cells,
    :func:`unet_pipe.synth3d.synthesize_3d` with ``anisotropy``)."""
    if mode not in ("2d", "3d"):
        raise ValueError(f"mode must be 2d or 3d, got {mode!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.tif" for name in ("raw", "labels", "instances")}
    check_ours(*paths.values())  # a user's raw.tif in the folder is refused before anything is written
    if mode == "3d":
        stack = synthesize_3d(shape, seed, anisotropy)
    else:
        stack = synthesize(shape, seed)
    for name, path in paths.items():
        _write_tiff_atomic(path, getattr(stack, name), voxel_size)
    return paths
