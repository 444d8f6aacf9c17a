"""On-the-fly training augmentation, as in Ronneberger et al. (2015), in torch.

The paper's elastic deformation: random displacement vectors on a coarse
``3 x 3`` grid, drawn from a Gaussian with ``sigma = 10`` px, turned into
per-pixel displacements by bicubic interpolation.  To it we add random
rotation, flips and shifts, composed with the deformation into ONE sampling
grid, so each array is resampled exactly once (one ``grid_sample`` call per
array, for the whole batch):

- image: bicubic (2-D; trilinear in 3-D, where ``grid_sample`` has no cubic
  mode), then random gray-value changes (gamma, contrast, brightness);
- labels: nearest neighbour, so every output value is an input value;
- weights: bilinear, so values stay within the input range.

Borders are mirrored (``padding_mode='reflection'`` with ``align_corners=True``
reflects about the edge pixel centres, i.e. scipy's ``mode='mirror'``).

Conventions: spatial axes are (y, x) or (z, y, x); displacements, shifts and
sigma are in pixels; rotation is in the (y, x) plane only, also for 3-D stacks,
whose z spacing in EM is usually much coarser.  All randomness comes from an
explicit CPU ``torch.Generator`` (drawn on the CPU, then moved to the data's
device), so a seed gives the same transform on CPU and GPU and in DataLoader
workers.  Samples of a batch are drawn one after another: augmenting a batch
gives the same result as augmenting its samples in sequence with one generator.

We use torch instead of the ``elasticdeform`` package because that package does
not import with NumPy 2, and because ``grid_sample`` is measured faster (about
9-10x on one CPU thread for a 572 x 572 image + label; ``benchmarks/augment.py``)
and runs on the training device.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from unet_pipe.errors import ConfigError

__all__ = [
    "AugmentParams",
    "augment_sample",
    "cubic_upsampling_matrix",
    "gray_value_transform",
    "sampling_grid",
    "warp",
]

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# Keys' cubic-convolution parameter used by torch's bicubic modes.
_CUBIC_A = -0.75
# float32 holds every integer up to 2**24 exactly; larger label ids need float64.
_FLOAT32_EXACT_INT = 2**24


@dataclass(frozen=True)
class AugmentParams:
    """What to augment and how strongly (config section ``train.augment``).

    ``elastic_sigma``: std (px) of the coarse-grid displacements, 0 disables.
    ``elastic_grid``: coarse grid points per axis.
    ``rotate``: uniform random angle in [0, 360) degrees in the (y, x) plane.
    ``flip``: flip each spatial axis with probability 1/2.
    ``shift``: uniform random shift in [-shift, shift] px per axis.
    ``gray_value``: random gamma, contrast and brightness of the image:
    ``gamma`` and ``contrast`` are (low, high) factor ranges sampled
    log-uniformly, ``brightness`` the largest additive change as a fraction of
    the sample's intensity range.
    ``interpolation``: image interpolation, ``bicubic`` (paper), ``bilinear``
    or ``nearest``.
    """

    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    rotate: bool = True
    flip: bool = True
    shift: float = 0.0
    gray_value: bool = True
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.25)
    gamma: tuple[float, float] = (0.8, 1.25)
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        for name in ("contrast", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                _bad(name, f"must be a [low, high] pair, got {value!r}")
            low, high = (float(v) for v in value)
            if not 0 < low <= high:
                _bad(name, f"needs 0 < low <= high, got {list(value)}")
            object.__setattr__(self, name, (low, high))
        if not self.elastic_sigma >= 0:
            _bad("elastic_sigma", f"must be >= 0 px, got {self.elastic_sigma}")
        if int(self.elastic_grid) != self.elastic_grid or self.elastic_grid < 2:
            _bad("elastic_grid", f"must be an integer >= 2, got {self.elastic_grid}")
        if not self.shift >= 0:
            _bad("shift", f"must be >= 0 px, got {self.shift}")
        if not self.brightness >= 0:
            _bad("brightness", f"must be >= 0, got {self.brightness}")
        if self.interpolation not in INTERPOLATIONS:
            _bad("interpolation", f"must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        object.__setattr__(self, "elastic_grid", int(self.elastic_grid))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> AugmentParams:
        """Build from the ``train.augment`` config mapping (missing keys: defaults)."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(None, f"unknown key 'train.augment.{unknown[0]}' (allowed: {', '.join(sorted(known))})")
        for name in ("contrast", "gamma"):
            if isinstance(cfg.get(name), list):
                cfg[name] = tuple(cfg[name])
        return cls(**cfg)

    @classmethod
    def off(cls) -> AugmentParams:
        """No augmentation at all: :func:`augment_sample` returns its inputs unchanged."""
        return cls(elastic_sigma=0.0, rotate=False, flip=False, shift=0.0, gray_value=False)

    @property
    def spatial_identity(self) -> bool:
        """True when no geometric transform is enabled."""
        return self.elastic_sigma == 0 and not self.rotate and not self.flip and self.shift == 0


def _bad(name: str, problem: str) -> None:
    raise ConfigError(None, f"key 'train.augment.{name}': {problem}")


# --------------------------------------------------------------------------- draws


@dataclass(frozen=True)
class _Draw:
    """Random numbers of one sample, drawn on the CPU in a fixed order."""

    coarse: torch.Tensor  # (nd, g, ..., g) standard normal
    angle: float  # radians
    flips: torch.Tensor  # (nd,) bool
    shift: torch.Tensor  # (nd,) uniform in [-1, 1]
    gray: torch.Tensor  # (3,) uniform in [0, 1): gamma, contrast, brightness


def _draw(nd: int, grid_points: int, generator: torch.Generator) -> _Draw:
    # Everything is drawn whatever is enabled, so switching one augmentation
    # on or off does not change the random numbers of the others.
    coarse = torch.randn((nd,) + (grid_points,) * nd, generator=generator, dtype=torch.float64)
    angle = float(torch.rand((), generator=generator, dtype=torch.float64)) * 2 * math.pi
    flips = torch.rand(nd, generator=generator, dtype=torch.float64) < 0.5
    shift = torch.rand(nd, generator=generator, dtype=torch.float64) * 2 - 1
    gray = torch.rand(3, generator=generator, dtype=torch.float64)
    return _Draw(coarse, angle, flips, shift, gray)


# --------------------------------------------------------------------------- geometry


@lru_cache(maxsize=64)
def _cubic_matrix_cpu(n_in: int, n_out: int) -> torch.Tensor:
    rows = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    a = _CUBIC_A
    for j in range(n_out):
        src = j * scale
        i = math.floor(src)
        t = src - i
        x1, x2 = t + 1.0, 1.0 - t
        weights = (
            ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * x2 - (a + 3)) * x2 * x2 + 1,
            ((a * (x2 + 1) - 5 * a) * (x2 + 1) + 8 * a) * (x2 + 1) - 4 * a,
        )
        for k, w in enumerate(weights):
            rows[j, min(max(i - 1 + k, 0), n_in - 1)] += w
    return rows


def cubic_upsampling_matrix(
    n_in: int, n_out: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of 1-D bicubic interpolation with ``align_corners=True``.

    The same Keys kernel (a = -0.75) and edge clamping as ``F.interpolate(mode='bicubic')``,
    written as a matrix so that it applies separably along any number of axes
    (torch has no tricubic mode).  Output samples 0 and ``n_out - 1`` lie on the
    first and last input points.
    """
    return _cubic_matrix_cpu(int(n_in), int(n_out)).to(device=device, dtype=dtype)


def _linear_part(draw: _Draw, params: AugmentParams, nd: int) -> torch.Tensor:
    """(nd, nd) map from output to source offsets about the centre: flip @ rotation."""
    matrix = torch.eye(nd, dtype=torch.float64)
    if params.rotate:
        c, s = math.cos(draw.angle), math.sin(draw.angle)
        matrix[-2:, -2:] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    if params.flip:
        signs = torch.where(draw.flips, -1.0, 1.0).to(torch.float64)
        matrix = signs[:, None] * matrix
    return matrix


def _grid_from_draws(
    shape: tuple[int, ...], params: AugmentParams, draws: list[_Draw], device: torch.device
) -> torch.Tensor:
    """Normalised grid (B, *shape, nd), (x, y[, z]) order on the last axis.

    Source offset of output pixel p about the centre c, per axis a:
    ``A (p - c + d(p)) + t``, with ``d = sum_I prod_axes M[p, I] * sigma * C[:, I]``
    (separable bicubic upsampling of the coarse draws C).  Both ``A`` and the
    normalisation are linear, so they are applied to the coarse grid instead of
    to every pixel, and the affine part rides along as two extra basis
    functions per axis (the offset ``p - c`` and a constant).  The whole grid is
    then one separable contraction ending in a single matrix product that
    writes the (B, *shape, nd) layout grid_sample reads (572 x 572, one
    thread: 0.6 ms, against 3.0 ms for upsampling the displacements and
    composing per pixel).
    """
    nd, batch, g = len(shape), len(draws), params.elastic_grid
    k = g + 2
    # align_corners=True: pixel i of n sits at -1 + 2 i / (n - 1), so offsets
    # from the centre scale by 2 / (n - 1); a single pixel sits at 0.
    scale = torch.tensor([2.0 / (s - 1) if s > 1 else 0.0 for s in shape], dtype=torch.float64)
    linear = torch.stack([_linear_part(d, params, nd) for d in draws])  # (B, a, b)
    shift = torch.stack([d.shift for d in draws]) * params.shift  # (B, a)
    core = torch.zeros((batch, nd) + (k,) * nd, dtype=torch.float64)
    if params.elastic_sigma > 0:
        coarse = torch.stack([d.coarse for d in draws]) * params.elastic_sigma  # (B, b, g..)
        mixed = torch.einsum("zab,zb...->za...", linear, coarse)
        core[(slice(None), slice(None)) + (slice(0, g),) * nd] = mixed
    ones = (g + 1,) * nd
    for b in range(nd):
        # offset (p_b - c_b) times the constant along every other axis
        index = tuple(g if axis == b else g + 1 for axis in range(nd))
        core[(slice(None), slice(None)) + index] = linear[:, :, b]
    core[(slice(None), slice(None)) + ones] = shift
    core = core * scale.view((1, nd) + (1,) * nd)
    # Move the output-axis index last and reverse it to grid_sample's (x, y, z).
    values = torch.movedim(core, 1, -1).flip(-1).to(device=device, dtype=torch.float32)
    for axis in reversed(range(nd)):
        size = shape[axis]
        positions = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        cubic = cubic_upsampling_matrix(g, size, dtype=torch.float64)
        basis = torch.cat([cubic, positions[:, None], positions.new_ones(size, 1)], dim=1)  # (size, k)
        basis = basis.to(device=device, dtype=torch.float32)
        pre, post = values.shape[1 : 1 + axis], values.shape[2 + axis :]
        flat = values.reshape(batch, math.prod(pre), k, math.prod(post))
        values = (basis @ flat).reshape((batch,) + tuple(pre) + (size,) + tuple(post))
    return values


def sampling_grid(
    shape: tuple[int, ...],
    params: AugmentParams,
    generator: torch.Generator,
    batch: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Normalised ``grid_sample`` grid ``(batch, *shape, nd)`` of one random transform per sample.

    Output pixel ``p`` samples the input at ``c + A (p - c + d(p)) + t``: ``d``
    the bicubically upsampled coarse displacements, ``A`` rotation and flips
    about the centre ``c``, ``t`` the shift (all in px).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"spatial shape must have 2 or 3 axes, got {shape}")
    draws = [_draw(len(shape), params.elastic_grid, generator) for _ in range(batch)]
    return _grid_from_draws(shape, params, draws, torch.device(device))


# --------------------------------------------------------------------------- resampling


def _label_compute_dtype(labels: torch.Tensor) -> torch.dtype:
    if labels.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16):
        return torch.float32
    if labels.is_floating_point():
        return torch.float64 if labels.dtype == torch.float64 else torch.float32
    if labels.numel() and int(labels.abs().max()) >= _FLOAT32_EXACT_INT:
        return torch.float64
    return torch.float32


def _resample(array: torch.Tensor, grid: torch.Tensor, mode: str, compute: torch.dtype) -> torch.Tensor:
    """array (B, C, *S) resampled on grid (B, *S, nd) with mirrored borders."""
    if grid.shape[-1] == 3 and mode == "bicubic":
        mode = "bilinear"  # grid_sample has no tricubic mode; 'bilinear' is trilinear here
    return F.grid_sample(
        array.to(compute), grid.to(compute), mode=mode, padding_mode="reflection", align_corners=True
    )


def _as_bcs(array: torch.Tensor, nd: int, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View ``(*S)``, ``(B, *S)`` or ``(B, C, *S)`` as ``(B, C, *S)``; also return the original shape."""
    lead = array.ndim - nd
    if lead == 0:
        return array[None, None], tuple(array.shape)
    if lead == 1:
        return array[:, None], tuple(array.shape)
    if lead == 2:
        return array, tuple(array.shape)
    raise ValueError(f"{name} of shape {tuple(array.shape)} is not (*S), (B, *S) or (B, C, *S) with {nd} spatial axes")


def warp(
    image: torch.Tensor | None,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    grid: torch.Tensor,
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Resample image (``interpolation``), labels (nearest) and weights (bilinear) on ``grid``.

    Arrays are ``(*S)``, ``(B, *S)`` or ``(B, C, *S)`` and come back in their
    shape; labels and floating weights keep their dtype, a non-float image or
    weight map comes back as float32.
    """
    nd = grid.shape[-1]
    out: list[torch.Tensor | None] = []
    for name, array in (("image", image), ("labels", labels), ("weights", weights)):
        if array is None:
            out.append(None)
            continue
        bcs, original = _as_bcs(array, nd, name)
        if tuple(bcs.shape[2:]) != tuple(grid.shape[1:-1]) or bcs.shape[0] != grid.shape[0]:
            spatial = tuple(grid.shape[1:-1])
            raise ValueError(f"{name} of shape {original} does not match the grid (batch {grid.shape[0]}, {spatial})")
        if name == "labels":
            compute = _label_compute_dtype(array)
            result = _resample(bcs, grid, "nearest", compute).to(array.dtype)
        else:
            compute = array.dtype if array.is_floating_point() else torch.float32
            mode = interpolation if name == "image" else "bilinear"
            result = _resample(bcs, grid, mode, compute)
        out.append(result.reshape(original))
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------- gray values


def gray_value_transform(image: torch.Tensor, gray: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply gamma, contrast and brightness to ``image (B, ...)`` with draws ``gray (B, 3)`` in [0, 1).

    Range-agnostic: per sample the image is mapped to [0, 1] by its min/max,
    raised to ``gamma``, scaled by ``contrast`` about its mean, shifted by
    ``brightness`` and mapped back.  Strictly increasing in the input values.
    Constant samples are returned unchanged.
    """
    batch = image.shape[0]
    flat = image.reshape(batch, -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    gray = gray.to(device=image.device, dtype=image.dtype)

    def log_uniform(bounds: tuple[float, float], u: torch.Tensor) -> torch.Tensor:
        low, high = math.log(bounds[0]), math.log(bounds[1])
        return torch.exp(low + (high - low) * u)[:, None]

    gamma = log_uniform(params.gamma, gray[:, 0])
    contrast = log_uniform(params.contrast, gray[:, 1])
    brightness = (gray[:, 2] * 2 - 1)[:, None] * params.brightness
    unit = ((flat - lo) / safe).clamp(0, 1) ** gamma
    mean = unit.mean(dim=1, keepdim=True)
    unit = mean + contrast * (unit - mean) + brightness
    result = torch.where(span > 0, lo + unit * span, flat)
    return result.reshape(image.shape)


# --------------------------------------------------------------------------- entry point


def augment_sample(
    image: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    params: AugmentParams,
    generator: torch.Generator,
    spatial_dims: int = 2,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Randomly deform, rotate, flip, shift one sample or a batch, consistently across arrays.

    ``image``: ``(*S)`` one sample, ``(B, *S)`` a batch or ``(B, C, *S)`` a batch
    with channels, ``S`` of ``spatial_dims`` axes; ``labels`` and ``weights``
    (optional) have the same ``B`` and ``S``.  Augment the full input tile and
    crop the labels to the output tile afterwards, so that the labels around
    the output tile are warped from real data, not from a mirror.

    ``generator`` is a CPU generator; seed it per DataLoader worker (e.g. from
    the master seed, the epoch and the worker id).  Returns new tensors on the
    input device; with :meth:`AugmentParams.off` the inputs themselves.
    """
    image = torch.as_tensor(image)
    labels = None if labels is None else torch.as_tensor(labels)
    weights = None if weights is None else torch.as_tensor(weights)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    bcs, _ = _as_bcs(image, spatial_dims, "image")
    batch, shape = bcs.shape[0], tuple(bcs.shape[2:])
    draws = [_draw(spatial_dims, params.elastic_grid, generator) for _ in range(batch)]

    if not params.spatial_identity:
        grid = _grid_from_draws(shape, params, draws, image.device)
        image, labels, weights = warp(image, labels, weights, grid, params.interpolation)
    if params.gray_value:
        if not image.is_floating_point():
            image = image.to(torch.float32)
        gray = torch.stack([d.gray for d in draws])
        image = gray_value_transform(image.reshape((batch, -1)), gray, params).reshape(image.shape)
    assert image is not None
    return image, labels, weights
