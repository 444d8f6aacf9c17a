"""Training tile sampling: random tiles from the raw/labels/weights OME-Zarr stores.

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
* Raw gray values are normalised per stack by a rule measured on the stack
  itself (:func:`intensity_range`: its 1st and 99th percentiles map to 0 and 1),
  in training and at inference alike (:func:`normalize_raw`), so equal gray
  values give equal inputs whatever the dtype (uint8, uint16, float) and a
  stack that uses a fraction of its dtype's range is not left dark.  Labels become classes ``{0:
  membrane/background, 1: cell}`` (:func:`label_classes`).
* Labelled crops (``Volume.labels_offset``): labels and weights may cover only
  a box of the raw stack starting at that (z, y, x) voxel.  Output windows are
  drawn inside the box (as above, with the box for the image); the raw input
  around them is real data, mirrored only at the raw's own borders; labels
  outside the box are mirrored from inside it and weigh 0.  Train and val
  ranges are raw slice numbers inside the box's z range.
* Sparse annotations (``unlabelled_value``): unlabelled pixels become class 0
  with weight 0 (exact: a weighted cross-entropy term times 0 is 0), and a
  tile whose output window holds no annotated pixel is redrawn with the same
  generator (at most :data:`MAX_DRAWS` draws per tile, then an error): the run
  stays deterministic for a seed.
* All randomness comes from an explicit ``numpy.random.Generator``; the stores
  are read lazily, one tile at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from unet_pipe.errors import ConfigError, InputError
from unet_pipe.intensity import IntensityRange, intensity_range, normalize_raw
from unet_pipe.integrity import CheckedArray
from unet_pipe.model import margin as unet_margin
from unet_pipe.model import valid_output_size
from unet_pipe.tiling import read_mirrored
from unet_pipe.truth import check_binary_values

LABEL_MODES = ("binary", "instances")
#: Draws per tile before giving up on finding an annotated output window (sparse labels).
MAX_DRAWS = 1000


# --------------------------------------------------------------------------- values


def label_classes(
    labels: np.ndarray, label_mode: str = "binary", foreground_value: int = 255, unlabelled_value: int | None = None
) -> np.ndarray:
    """Training classes (int64): 1 = cell, 0 = membrane/background.

    ``binary``: cell where ``labels == foreground_value`` (ISBI: 255);
    ``instances``: cell where the id is nonzero.  Unlabelled pixels
    (``unlabelled_value``) are class 0; their loss weight is 0 (:func:`annotated_mask`).
    """
    a = np.asarray(labels)
    if label_mode == "binary":
        return (a == foreground_value).astype(np.int64)
    if label_mode == "instances":
        cells = a != 0
        if unlabelled_value is not None:
            cells &= a != unlabelled_value
        return cells.astype(np.int64)
    raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")


def annotated_mask(labels: np.ndarray, unlabelled_value: int | None) -> np.ndarray:
    """True where a pixel was annotated (all pixels when ``unlabelled_value`` is None)."""
    a = np.asarray(labels)
    return np.ones(a.shape, bool) if unlabelled_value is None else a != unlabelled_value


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
    half-open ``[start, stop)`` slice ranges of the raw stack; ``val`` may be None.
    ``labels_offset``: (z, y, x) voxel of ``raw`` where ``labels`` (and ``weights``,
    of the labels' shape) start, for labels of a crop.
    """

    name: str
    raw: Any
    labels: Any
    weights: Any
    train: tuple[int, int]
    val: tuple[int, int] | None = None
    intensity: IntensityRange | None = None  # None: the legacy dtype-maximum scaling
    labels_offset: tuple[int, int, int] = (0, 0, 0)

    def check(self) -> None:
        """Raise InputError/ConfigError when the arrays or ranges do not fit."""
        shape = tuple(self.raw.shape)
        if len(shape) != 3:
            raise InputError(self.name, f"raw must be (z, y, x), got shape {shape}")
        offset = tuple(int(o) for o in self.labels_offset)
        box = tuple(self.labels.shape)
        if offset == (0, 0, 0) and box != shape:
            raise InputError(self.name, f"labels shape {box} differs from raw shape {shape} (give labels_offset "
                             "for labels of a crop)")
        if len(offset) != 3 or min(offset) < 0 or any(o + s > n for o, s, n in zip(offset, box, shape)):
            raise ConfigError(None, f"key 'datasets.{self.name}.labels_offset': labels of shape {box} at "
                              f"{list(offset)} do not lie inside the raw stack of shape {shape}")
        if self.weights is not None and tuple(self.weights.shape) != box:
            raise InputError(self.name, f"weights shape {tuple(self.weights.shape)} differs from labels shape {box}")
        for part, rng in (("train", self.train), ("val", self.val)):
            if rng is None:
                continue
            start, stop = rng
            if not offset[0] <= start < stop <= offset[0] + box[0]:
                labelled = f"labelled slices [{offset[0]}, {offset[0] + box[0]})" if offset[0] or box[0] != shape[0] \
                    else f"{shape[0]} slices of the data"
                raise ConfigError(
                    None,
                    f"key 'train.datasets.{self.name}.{part}': range [{start}, {stop}) does not fit "
                    f"the {labelled}",
                )


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class TrainingTile:
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
    With ``unlabelled_value``, draws whose output window holds no annotated
    pixel are rejected and drawn again (see the module docstring), and the
    weights are 0 on unlabelled pixels.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        tile: int,
        depth: int,
        dims: int = 2,
        label_mode: str = "binary",
        foreground_value: int = 255,
        unlabelled_value: int | None = None,
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
        self.unlabelled_value = None if unlabelled_value is None else int(unlabelled_value)
        if self.unlabelled_value is not None:
            for volume in self.volumes:
                _require_annotated(volume, self.unlabelled_value)
        # Volumes are chosen in proportion to their training slices.
        counts = np.array([v.train[1] - v.train[0] for v in self.volumes], dtype=np.float64)
        self._cumulative = np.cumsum(counts) / counts.sum()

    def _window_start(self, rng: np.random.Generator, low: int, high: int) -> int:
        """Input-window start along one axis of extent [low, high)."""
        slack = (high - low) - self.output
        first, last = min(0, slack), max(0, slack)
        return low + int(rng.integers(first, last + 1)) - self.margin

    def sample(self, rng: np.random.Generator) -> TrainingTile:
        """One random tile; a deterministic function of ``rng``'s state (which it advances)."""
        for _ in range(MAX_DRAWS):
            tile = self._draw(rng)
            if tile is not None:
                return tile
        raise InputError(
            None,
            f"no training tile with an annotated pixel in its output window in {MAX_DRAWS} draws: "
            "the annotated pixels cover too little of the train ranges (annotate more, or widen the ranges)",
        )

    def _draw(self, rng: np.random.Generator) -> TrainingTile | None:
        """One random draw; None when its output window holds no annotated pixel."""
        k = int(np.searchsorted(self._cumulative, rng.random(), side="right"))
        volume = self.volumes[min(k, len(self.volumes) - 1)]
        z0, z1 = volume.train
        ny, nx = volume.raw.shape[1:]
        oz, oy, ox = (int(o) for o in volume.labels_offset)
        _, ly, lx = volume.labels.shape
        if self.dims == 2:
            z = int(rng.integers(z0, z1))
            start = (z, self._window_start(rng, oy, oy + ly), self._window_start(rng, ox, ox + lx))
            shape = (1, self.tile, self.tile)
        else:
            start = (self._window_start(rng, z0, z1), self._window_start(rng, oy, oy + ly),
                     self._window_start(rng, ox, ox + lx))  # fmt: skip
            shape = (self.tile,) * 3
        bounds = [(z0, z1), (0, ny), (0, nx)]
        # Labels and weights live in the crop's own coordinates and mirror about its edges.
        crop_start = (start[0] - oz, start[1] - oy, start[2] - ox)
        crop_bounds = [(z0 - oz, z1 - oz), (0, ly), (0, lx)]
        labels = read_mirrored(volume.labels, crop_start, shape, crop_bounds)
        # Where the input window leaves the labelled box (y, x), labels are mirrored guesses: weight 0.
        inside = None
        if (oy, ox, ly, lx) != (0, 0, ny, nx):
            ys = np.arange(start[1], start[1] + shape[1])
            xs = np.arange(start[2], start[2] + shape[2])
            rows = (ys >= oy) & (ys < oy + ly)
            cols = (xs >= ox) & (xs < ox + lx)
            inside = np.broadcast_to((rows[:, None] & cols[None, :])[None], shape)
        known = inside
        if self.unlabelled_value is not None:
            known = annotated_mask(labels, self.unlabelled_value)
            if inside is not None:
                known = known & inside
            window = (slice(None),) if self.dims == 2 else (slice(self.margin, self.margin + self.output),)
            window += (slice(self.margin, self.margin + self.output),) * 2
            if not known[window].any():
                return None
        raw = read_mirrored(volume.raw, start, shape, bounds)
        if volume.weights is not None:
            weights = read_mirrored(volume.weights, crop_start, shape, crop_bounds).astype(np.float32, copy=True)
        else:
            weights = np.ones(shape, dtype=np.float32)
        if known is not None:
            weights[~known] = 0.0  # also when the weights store is missing or was made without the value
        squeeze = 0 if self.dims == 2 else slice(None)
        return TrainingTile(
            image=normalize_raw(raw, volume.intensity)[squeeze],
            classes=label_classes(labels, self.label_mode, self.foreground_value, self.unlabelled_value)[squeeze],
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


def _require_annotated(volume: Volume, unlabelled_value: int) -> None:
    """Raise InputError when ``volume`` has no annotated pixel in its train range (read slab by slab)."""
    z0, z1 = (z - int(volume.labels_offset[0]) for z in volume.train)  # slices of the label array
    step = int(volume.labels.chunks[0]) if hasattr(volume.labels, "chunks") else 1
    for z in range(z0, z1, step):
        if np.any(np.asarray(volume.labels[z : min(z + step, z1)]) != unlabelled_value):
            return
    raise InputError(
        getattr(volume.labels, "path", None) or volume.name,
        f"dataset {volume.name!r} has no annotated pixel in its train slices [{z0}, {z1}) "
        f"(every label equals the unlabelled value {unlabelled_value})",
    )


def volumes_from_config(config: dict, stores: dict[str, dict[str, Any]]) -> list[Volume]:
    """Volumes of ``config['train']['datasets']`` with arrays from ``stores``:
    ``{name: {'raw': array, 'labels': array, 'weights': array or None}}``; each raw stack
    is normalised by its own :func:`intensity_range` (measured on the whole stack, as
    prediction measures the stack it segments)."""
    volumes = []
    for name, ranges in config["train"]["datasets"].items():
        if name not in stores or stores[name].get("raw") is None or stores[name].get("labels") is None:
            raise ConfigError(None, f"key 'train.datasets.{name}': no raw/labels stores given for this dataset")
        val = ranges.get("val")
        raw = stores[name]["raw"]
        # The label store records its offset (ingest --offset); the config states it too: they must agree.
        configured = config.get("datasets", {}).get(name, {}).get("labels_offset")
        recorded = stores[name].get("labels_offset")
        offset = tuple(int(o) for o in (recorded if recorded is not None else configured or (0, 0, 0)))
        if configured is not None and recorded is not None and tuple(configured) != tuple(recorded):
            raise InputError(getattr(stores[name]["labels"], "path", name), f"records the offset {list(recorded)}, "
                             f"but datasets.{name}.labels_offset is {list(configured)}; ingest the labels again")
        volumes.append(
            Volume(
                name=name,
                raw=raw,
                labels=stores[name]["labels"],
                weights=stores[name].get("weights"),
                train=(int(ranges["train"][0]), int(ranges["train"][1])),
                val=None if val is None else (int(val[0]), int(val[1])),
                intensity=intensity_range(raw, where=getattr(raw, "path", name)),
                labels_offset=offset,
            )
        )
        _check_binary_truth(volumes[-1], config.get("weights") or {})
    return volumes


def _check_binary_truth(volume: Volume, weights: dict[str, Any]) -> None:
    """Binary labels of ``volume``'s train and val slices hold only 0, the cell value and the
    unlabelled value (:func:`unet_pipe.truth.check_binary_values`, as ``weights`` checks them);
    read once, slab by slab."""
    if weights.get("label_mode", "binary") != "binary" or np.dtype(volume.labels.dtype) == np.bool_:
        return
    foreground, unlabelled = int(weights.get("foreground_value", 255)), weights.get("unlabelled_value")
    step = int(volume.labels.chunks[0]) if hasattr(volume.labels, "chunks") else 1
    # The store the user gave (a CheckedArray's own ``path`` is zarr's array name, "0").
    where = volume.labels.store if isinstance(volume.labels, CheckedArray) else volume.name
    for start, stop in filter(None, (volume.train, volume.val)):
        z0, z1 = (z - int(volume.labels_offset[0]) for z in (start, stop))  # slices of the label array
        for z in range(z0, z1, step):
            slab = np.asarray(volume.labels[z : min(z + step, z1)])
            check_binary_values(where, np.unique(slab), foreground, unlabelled)
