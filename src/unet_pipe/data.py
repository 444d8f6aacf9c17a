"""Training data: random tiles from the raw/labels/weights OME-Zarr stores.

Conventions
-----------
* Arrays are ``(z, y, x)``.  A 2D U-Net trains on ``T × T`` tiles of single z
  slices, a 3D U-Net on ``T × T × T`` cubes.
* A tile is the network's *input* window.  Its centre ``O × O`` window (``O`` =
  :func:`unet_pipe.model.valid_output_size`) is where the loss is computed, so
  labels and weights are cropped to it *after* augmentation, which warps the
  full input-size tile (labels around the output window are then warped from
  real data rather than from a mirror).
* Where a tile hangs over the border of its slice range it is extrapolated by
  mirroring (paper, Fig. 2) about the edge pixels (``numpy.pad(mode='reflect')``,
  edge pixel not repeated), the same convention as :mod:`unet_pipe.augment`
  (``grid_sample(padding_mode='reflection', align_corners=True)``) and the
  predictor (:func:`unet_pipe.tiling.read_mirrored`, used here too).  Mirroring
  never reaches outside the split's own ``[start, stop)`` z range, so
  validation slices never leak into training tiles (3D).
* The output window is drawn uniformly among the positions that lie inside the
  image (or that cover it, when the image is smaller than the window): every
  target pixel is a real, labelled pixel.
* Raw data is scaled to [0, 1] by its dtype's maximum (integer types) — use
  :func:`normalize_raw` at inference too.  Labels become classes ``{0:
  membrane/background, 1: cell}`` (:func:`label_classes`).
* All randomness comes from an explicit ``numpy.random.Generator``; the stores
  are read lazily, one tile at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from unet_pipe.errors import ConfigError, InputError
from unet_pipe.model import margin as unet_margin
from unet_pipe.model import valid_output_size
from unet_pipe.tiling import read_mirrored

LABEL_MODES = ("binary", "instances")


# --------------------------------------------------------------------------- values


def normalize_raw(raw: np.ndarray) -> np.ndarray:
    """Raw gray values as float32: integer dtypes divided by their maximum (uint8: /255),
    floating data unchanged, bool as 0/1."""
    a = np.asarray(raw)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        return (a.astype(np.float32) / np.float32(np.iinfo(a.dtype).max)).astype(np.float32)
    return a.astype(np.float32, copy=False)


def label_classes(labels: np.ndarray, label_mode: str = "binary", foreground_value: int = 255) -> np.ndarray:
    """Training classes (int64): 1 = cell, 0 = membrane/background.

    ``binary``: cell where ``labels == foreground_value`` (ISBI: 255);
    ``instances``: cell where the id is nonzero.
    """
    a = np.asarray(labels)
    if label_mode == "binary":
        return (a == foreground_value).astype(np.int64)
    if label_mode == "instances":
        return (a != 0).astype(np.int64)
    raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")


# --------------------------------------------------------------------------- crops


def center_crop(array: np.ndarray | torch.Tensor, crop: int, spatial_dims: int) -> Any:
    """Remove ``crop`` pixels on both sides of the last ``spatial_dims`` axes."""
    if crop == 0:
        return array
    index = (Ellipsis,) + (slice(crop, -crop),) * spatial_dims
    return array[index]


# --------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class Volume:
    """One dataset's stores (zarr or numpy ``(z, y, x)`` arrays) and its z ranges.

    ``weights`` None means uniform weights (unweighted loss).  Ranges are
    half-open ``[start, stop)`` slice ranges; ``val`` may be None.
    """

    name: str
    raw: Any
    labels: Any
    weights: Any
    train: tuple[int, int]
    val: tuple[int, int] | None = None

    def check(self) -> None:
        """Raise InputError/ConfigError when the arrays or ranges do not fit."""
        shape = tuple(self.raw.shape)
        if len(shape) != 3:
            raise InputError(self.name, f"raw must be (z, y, x), got shape {shape}")
        for what, arr in (("labels", self.labels), ("weights", self.weights)):
            if arr is not None and tuple(arr.shape) != shape:
                raise InputError(self.name, f"{what} shape {tuple(arr.shape)} differs from raw shape {shape}")
        for part, rng in (("train", self.train), ("val", self.val)):
            if rng is None:
                continue
            start, stop = rng
            if not 0 <= start < stop <= shape[0]:
                raise ConfigError(
                    None,
                    f"key 'train.datasets.{self.name}.{part}': range [{start}, {stop}) does not fit "
                    f"the {shape[0]} slices of the data",
                )


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Tile:
    """One training sample at INPUT size: image float32, classes int64, weights float32,
    each ``(T, T)`` (2D) or ``(T, T, T)`` (3D); ``origin`` is the input window's
    (z, y, x) start in the store (may be negative: mirrored)."""

    image: np.ndarray
    classes: np.ndarray
    weights: np.ndarray
    volume: str
    origin: tuple[int, int, int]


class TileSampler:
    """Draws random training tiles (input size ``tile``) from the ``train`` ranges.

    A volume and z are drawn with probability proportional to the number of
    training slices; the output window is drawn uniformly inside the image.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        tile: int,
        depth: int,
        dims: int = 2,
        label_mode: str = "binary",
        foreground_value: int = 255,
    ) -> None:
        if not volumes:
            raise ConfigError(None, "key 'train.datasets': no dataset to train on")
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        try:
            self.output = valid_output_size(tile, depth)
        except ValueError as exc:
            raise ConfigError(None, f"key 'train.tile': {exc}") from None
        for volume in volumes:
            volume.check()
        self.volumes = list(volumes)
        self.tile = int(tile)
        self.depth = int(depth)
        self.dims = int(dims)
        self.margin = unet_margin(depth)
        self.label_mode = label_mode
        self.foreground_value = int(foreground_value)
        # Volumes are chosen in proportion to their training slices.
        counts = np.array([v.train[1] - v.train[0] for v in self.volumes], dtype=np.float64)
        self._cumulative = np.cumsum(counts) / counts.sum()

    def _window_start(self, rng: np.random.Generator, low: int, high: int) -> int:
        """Input-window start along one axis of extent [low, high)."""
        slack = (high - low) - self.output
        first, last = min(0, slack), max(0, slack)
        return low + int(rng.integers(first, last + 1)) - self.margin

    def sample(self, rng: np.random.Generator) -> Tile:
        """One random tile; consumes a fixed number of draws from ``rng``."""
        k = int(np.searchsorted(self._cumulative, rng.random(), side="right"))
        volume = self.volumes[min(k, len(self.volumes) - 1)]
        z0, z1 = volume.train
        ny, nx = volume.raw.shape[1:]
        if self.dims == 2:
            z = int(rng.integers(z0, z1))
            start = (z, self._window_start(rng, 0, ny), self._window_start(rng, 0, nx))
            shape = (1, self.tile, self.tile)
        else:
            start = (self._window_start(rng, z0, z1), self._window_start(rng, 0, ny), self._window_start(rng, 0, nx))
            shape = (self.tile,) * 3
        bounds = [(z0, z1), (0, ny), (0, nx)]
        raw = read_mirrored(volume.raw, start, shape, bounds)
        labels = read_mirrored(volume.labels, start, shape, bounds)
        if volume.weights is not None:
            weights = read_mirrored(volume.weights, start, shape, bounds).astype(np.float32, copy=False)
        else:
            weights = np.ones(shape, dtype=np.float32)
        squeeze = 0 if self.dims == 2 else slice(None)
        return Tile(
            image=normalize_raw(raw)[squeeze],
            classes=label_classes(labels, self.label_mode, self.foreground_value)[squeeze],
            weights=np.ascontiguousarray(weights[squeeze]),
            volume=volume.name,
            origin=tuple(int(s) for s in start),
        )

    def batch(self, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``size`` tiles stacked: image ``(B, 1, *S)`` float32, classes ``(B, *S)`` int64,
        weights ``(B, *S)`` float32 — all at input size ``S``."""
        tiles = [self.sample(rng) for _ in range(size)]
        image = torch.from_numpy(np.stack([t.image for t in tiles]))[:, None]
        classes = torch.from_numpy(np.stack([t.classes for t in tiles]))
        weights = torch.from_numpy(np.stack([t.weights for t in tiles]))
        return image, classes, weights


def volumes_from_config(config: dict, stores: dict[str, dict[str, Any]]) -> list[Volume]:
    """Volumes of ``config['train']['datasets']`` with arrays from ``stores``:
    ``{name: {'raw': array, 'labels': array, 'weights': array or None}}``."""
    volumes = []
    for name, ranges in config["train"]["datasets"].items():
        if name not in stores or stores[name].get("raw") is None or stores[name].get("labels") is None:
            raise ConfigError(None, f"key 'train.datasets.{name}': no raw/labels stores given for this dataset")
        val = ranges.get("val")
        volumes.append(
            Volume(
                name=name,
                raw=stores[name]["raw"],
                labels=stores[name]["labels"],
                weights=stores[name].get("weights"),
                train=(int(ranges["train"][0]), int(ranges["train"][1])),
                val=None if val is None else (int(val[0]), int(val[1])),
            )
        )
    return volumes
