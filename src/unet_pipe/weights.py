"""The paper's pixel-wise loss weights (Ronneberger et al. 2015, eq. 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

Conventions
-----------
* Arrays are (z, y, x) (or (y, x) for one slice).  Distances are Euclidean and
  measured in in-plane pixels: the voxel size is divided by its x component, so
  ``sigma`` is in x pixels and a z step of a 50 x 4 x 4 nm stack counts 12.5.
* ``d1``/``d2`` at a background pixel x are the distances from x to the nearest
  pixel of the nearest and of the second-nearest object (the textbook
  ``scipy.ndimage.distance_transform_edt(labels != i)``, one per object i).  The
  border term is 0 on object pixels (paper, figure 3d) and where fewer than two
  objects exist.
* Class balancing: two classes, background (membrane, label 0) and foreground
  (cell).  ``w_c(k) = N / (K * N_k)`` with ``N_k`` the pixel count of class k
  over the WHOLE label volume, ``N`` the total and ``K`` the number of classes
  present, so that the mean of ``w_c`` over the volume is exactly 1.  A class
  that does not occur gets weight 0 (no pixel uses it).  ``class_balance:
  false`` sets ``w_c = 1`` for every class present (the border term alone
  then emphasises thin membranes): the paper's balance favours the rarer
  class, which moves the probability of a pixel of either class towards it.
* Sparse annotations (``unlabelled_value`` set): pixels holding that value are
  *unlabelled*, neither cell nor membrane.  Objects are the connected
  components of the annotated cell pixels only; ``d1``/``d2`` are Euclidean
  distances to those objects, measured straight through unlabelled pixels (a
  cell nobody annotated contributes nothing, so an annotated membrane next to
  an unlabelled region may get a smaller border term than with full labels).
  Class counts ``N_k`` and ``N`` count annotated pixels only, so the mean of
  ``w_c`` over the *annotated* pixels is 1; every unlabelled pixel gets weight
  exactly 0, so it contributes nothing to the weighted loss.
* 2d mode: objects and distances per slice (anisotropic EM).  3d mode: objects
  are 3D (face-connected) and distances respect the voxel size.

The border term's fast exact computation (and the proof that it is exact) and
the block-wise halo live in :mod:`unet_pipe.border_term`; their names stay
importable from here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

# The border term lives in unet_pipe.border_term; its public names stay importable from here.
from unet_pipe.border_term import (  # noqa: F401 (re-exported)
    DEFAULT_SIGMA,
    DEFAULT_TOLERANCE,
    DEFAULT_W0,
    _sequential_ids,
    border_halo,
    border_weights,
    border_weights_textbook,
    cutoff_distance,
)
from unet_pipe.errors import ConfigError, InputError
from unet_pipe.io import StagedImage, image_metadata, open_image
from unet_pipe.ngff import DEFAULT_NGFF, check_role
from unet_pipe.progress import progress_bar
from unet_pipe.provenance import input_fingerprint, provenance
from unet_pipe.report import weights_figure
from unet_pipe.truth import check_binary_values, require_annotated, unlabelled_problem

log = logging.getLogger(__name__)

LABEL_MODES = ("binary", "instances")
MODES = ("2d", "3d")


MAX_W0 = 1e6
MAX_SIGMA = 1e4  # pixels; the schema holds the same bounds


@dataclass(frozen=True)
class WeightParams:
    """Parameters of the weight map (the ``weights`` section of the config).

    ``w0`` amplitude and ``sigma`` width (x pixels) of the border term;
    ``tolerance`` its truncation error relative to ``w0``; ``label_mode`` ``binary`` (0 =
    membrane/background, ``foreground_value`` = cell) or ``instances`` (ids,
    0 = background); ``mode`` ``2d`` (per slice) or ``3d``; ``unlabelled_value``
    the label value of pixels nobody annotated (None: every pixel is labelled);
    ``class_balance`` the paper's ``w_c`` (False: ``w_c = 1`` for both classes).
    """

    w0: float = DEFAULT_W0
    sigma: float = DEFAULT_SIGMA
    tolerance: float = DEFAULT_TOLERANCE
    label_mode: str = "binary"
    foreground_value: int = 255
    mode: str = "2d"
    unlabelled_value: int | None = None
    class_balance: bool = True

    def __post_init__(self) -> None:
        # Upper bounds: beyond them the weights overflow float32 or the halo overflows (sigma 1e300).
        if not (math.isfinite(self.w0) and 0 <= self.w0 <= MAX_W0):
            raise ConfigError(None, f"weights.w0 must be a finite number in [0, {MAX_W0:g}], got {self.w0}")
        if not (math.isfinite(self.sigma) and 0 < self.sigma <= MAX_SIGMA):
            raise ConfigError(None, f"weights.sigma must be a number of pixels in (0, {MAX_SIGMA:g}], got {self.sigma}")
        if not (0 < self.tolerance < 1):
            raise ConfigError(None, f"weights tolerance must lie in (0, 1), got {self.tolerance}")
        if self.label_mode not in LABEL_MODES:
            raise ConfigError(None, f"weights.label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}")
        if self.label_mode == "binary" and self.foreground_value == 0:
            raise ConfigError(None, "weights.foreground_value must not be 0 (0 is membrane/background)")
        if self.mode not in MODES:
            raise ConfigError(None, f"weights.mode must be one of {MODES}, got {self.mode!r}")
        u = self.unlabelled_value
        if u is not None:
            if isinstance(u, bool) or not isinstance(u, int):
                raise ConfigError(None, f"weights.unlabelled_value must be an integer or null, got {u!r}")
            problem = unlabelled_problem(self.label_mode, self.foreground_value, u)
            if problem:
                raise ConfigError(None, f"weights.unlabelled_value: {problem}")

    @classmethod
    def from_config(cls, section: dict[str, Any] | None, **overrides: Any) -> WeightParams:
        """Build from a config ``weights`` section; ``None`` overrides are ignored."""
        values = {k: v for k, v in (section or {}).items() if k in cls.__dataclass_fields__}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# ------------------------------------------------------------------- geometry


def pixel_sampling(voxel_size: Sequence[float], mode: str) -> tuple[float, ...]:
    """Grid steps in x pixels: (y, x) for 2d mode, (z, y, x) for 3d mode, from a (z, y, x) voxel size."""
    vz, vy, vx = (float(v) for v in voxel_size)
    if min(vz, vy, vx) <= 0:
        raise InputError(None, f"voxel size must be positive, got {tuple(voxel_size)}")
    return (vy / vx, 1.0) if mode == "2d" else (vz / vx, vy / vx, 1.0)


# --------------------------------------------------------------------- labels


def check_labels(labels: np.ndarray, params: WeightParams, where: str | Path | None = None) -> None:
    """Raise :class:`InputError` if ``labels`` hold values the label mode does not expect."""
    dtype = labels.dtype
    if dtype != np.bool_ and dtype.kind not in "ui":
        raise InputError(where, f"labels must be integers, found dtype {dtype}")
    if params.label_mode == "instances":
        if dtype.kind == "i" and labels.size and labels.min() < 0:
            raise InputError(where, f"instance labels must be >= 0 (0 = background), found {labels.min()}")
        return
    if dtype == np.bool_:
        return  # True is the cell class whatever foreground_value says
    check_binary_values(where, np.unique(labels), params.foreground_value, params.unlabelled_value)


def foreground(labels: np.ndarray, params: WeightParams) -> np.ndarray:
    """Boolean cell mask of (checked) labels (annotated cell pixels only)."""
    if labels.dtype == np.bool_:
        return labels
    if params.label_mode == "binary":
        return labels == params.foreground_value
    cells = labels > 0
    if params.unlabelled_value is not None:
        cells &= labels != params.unlabelled_value
    return cells


def annotated(labels: np.ndarray, params: WeightParams) -> np.ndarray:
    """Boolean mask of the annotated pixels: all but those equal to ``params.unlabelled_value``."""
    labels = np.asarray(labels)
    if params.unlabelled_value is None or labels.dtype == np.bool_:
        return np.ones(labels.shape, bool)
    return labels != params.unlabelled_value


def instances_from_labels(
    labels: np.ndarray, params: WeightParams = WeightParams(), where: str | Path | None = None
) -> np.ndarray:
    """Object ids (0 = background) from binary or instance labels.

    Binary labels become face-connected components (4-connected in 2D, so cells
    that meet only diagonally across a membrane stay apart): per 2D slice in 2d
    mode (ids numbered consecutively through the stack), over the volume in 3d
    mode.  Instance labels are checked and returned unchanged, except that
    unlabelled pixels become 0 (they are no object).
    """
    labels = np.asarray(labels)
    check_labels(labels, params, where)
    if params.label_mode == "instances":
        if labels.dtype == np.bool_:
            return labels.astype(np.uint8)
        if params.unlabelled_value is not None:
            return np.where(labels == params.unlabelled_value, 0, labels).astype(labels.dtype, copy=False)
        return labels
    mask = foreground(labels, params)
    if params.mode == "3d" or mask.ndim == 2:
        return ndi.label(mask)[0]
    out = np.empty(mask.shape, np.int32)
    offset = 0
    for z in range(mask.shape[0]):
        out[z], count = ndi.label(mask[z])
        out[z][out[z] > 0] += offset
        offset += count
    return out


# ----------------------------------------------------------- class balancing


def class_counts(labels: np.ndarray, params: WeightParams = WeightParams()) -> np.ndarray:
    """Pixel counts ``[background, foreground]`` of (checked) labels (int64); unlabelled pixels count in neither."""
    fg = int(np.count_nonzero(foreground(labels, params)))
    known = labels.size if params.unlabelled_value is None else int(np.count_nonzero(annotated(labels, params)))
    return np.array([known - fg, fg], np.int64)


def class_weights(counts: Sequence[int], balance: bool = True) -> np.ndarray:
    """``w_c(k) = N / (K N_k)`` over the classes present (mean of ``w_c`` over the volume = 1); absent: 0.

    ``balance=False``: 1 for every class present (absent: 0).
    """
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    if present.any():
        weights[present] = counts.sum() / (present.sum() * counts[present]) if balance else 1.0
    return weights


# ------------------------------------------------------------------ weight map


def weights_from_instances(
    instances: np.ndarray,
    class_weight: Sequence[float],
    params: WeightParams = WeightParams(),
    sampling: Sequence[float] | None = None,
    labelled: np.ndarray | None = None,
) -> np.ndarray:
    """``w = w_c + border term`` (float32) from object ids; 2d mode works slice by slice on 3D input.

    ``class_weight`` is ``[w_background, w_foreground]`` (see :func:`class_weights`);
    ``sampling`` the grid steps in x pixels of the computed axes (default 1);
    ``labelled`` the annotated-pixel mask (None: all): the weight is 0 elsewhere.
    """
    inst = np.asarray(instances)
    cw = np.asarray(class_weight, np.float64)
    kwargs = dict(sampling=sampling, tolerance=params.tolerance)
    if params.mode == "2d" and inst.ndim == 3:
        border = np.stack([border_weights(s, params.w0, params.sigma, **kwargs) for s in inst]) if len(inst) else 0.0
    else:
        border = border_weights(inst, params.w0, params.sigma, **kwargs)
    out = (cw[(inst > 0).astype(np.intp)] + border).astype(np.float32)
    if labelled is not None:
        out[~np.asarray(labelled, bool)] = 0.0
    return out


def weight_map(
    labels: np.ndarray,
    params: WeightParams = WeightParams(),
    *,
    class_weight: Sequence[float] | None = None,
    sampling: Sequence[float] | None = None,
) -> np.ndarray:
    """The weight map (float32) of an in-memory label slice or stack, e.g. one training tile.

    ``class_weight`` defaults to the balance of ``labels`` themselves; pass the
    volume's values (stored in the weights OME-Zarr attributes) for tiles.  A
    tile's cut objects are taken as they appear: give it a margin of
    :func:`border_halo` pixels for values equal to the whole-slice ones.
    """
    labels = np.asarray(labels)
    inst = instances_from_labels(labels, params)
    if class_weight is None:
        class_weight = class_weights(class_counts(labels, params), params.class_balance)
    mask = None if params.unlabelled_value is None else annotated(labels, params)
    return weights_from_instances(inst, class_weight, params, sampling, mask)


# ------------------------------------------------------------- OME-Zarr stores


def _fingerprint(labels_path: Path, params: WeightParams) -> str:
    text = json.dumps({"labels": input_fingerprint(labels_path), "params": asdict(params)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _block_weights(
    inst: np.ndarray,
    labelled: np.ndarray | None = None,
    *,
    class_weight: Sequence[float],
    params: WeightParams,
    sampling: Sequence[float],
) -> np.ndarray:
    return weights_from_instances(inst, class_weight, params, sampling, labelled)


def volume_class_weights(
    labels: Any, params: WeightParams, where: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, w_c)`` over a whole (z, y, x) label array, streamed one z-chunk slab at a time.

    Checks every value on the way, so a bad label fails before anything is written.
    """
    counts = np.zeros(2, np.int64)
    step = labels.chunks[0] if hasattr(labels, "chunks") else 1
    for z0 in range(0, labels.shape[0], step):
        slab = np.asarray(labels[z0 : z0 + step])
        check_labels(slab, params, where)
        counts += class_counts(slab, params)
    require_annotated(where, int(counts.sum()), params.unlabelled_value, "the labels")
    return counts, class_weights(counts, params.class_balance)


def compute_weight_store(
    labels_path: str | Path,
    dest: str | Path,
    params: WeightParams = WeightParams(),
    *,
    threads: int = 1,
    overwrite: bool = False,
    resume: bool = True,
    pyramid_levels: int | None = None,
    extra_params: dict[str, Any] | None = None,
    progress: bool = False,
    ngff: str = DEFAULT_NGFF,
) -> dict[str, Any]:
    """Write the float32 weight OME-Zarr ``dest`` for the label OME-Zarr ``labels_path``.

    Same shape, chunks and voxel size as the labels.  Objects are labelled per
    whole slice (2d) or volume (3d); the weights are then computed block by
    block with ``dask.array.map_overlap`` and a halo of :func:`border_halo`
    pixels, so the result equals the whole-slice computation exactly.  Work is
    recorded per z-slab (2d) and a restarted job resumes (``resume``) unless
    the labels or parameters changed.  ``pyramid_levels`` defaults to the
    labels' number of levels.  Returns a summary
    (class counts and weights, halo) that is also stored in the attributes
    (``unet_pipe.weights``) and, with ``extra_params``, in the provenance record.
    ``ngff``: "0.4" (zarr format 2) or "0.5" (zarr format 3).
    """
    labels_path, dest = Path(labels_path), Path(dest)
    meta = image_metadata(labels_path)
    check_role(meta, ("labels", "instances"), "weights")
    labels = open_image(labels_path)
    sampling, depth, cw, summary = _weight_setup(labels, meta, params, labels_path)
    staged = StagedImage(
        dest,
        shape=meta.shape,
        dtype=np.float32,
        chunks=meta.chunks,
        voxel_size=meta.voxel_size,
        kind="image",
        resume=resume,
        fingerprint=_fingerprint(labels_path, params),
        overwrite=overwrite,
        ngff=ngff,
    )
    try:
        out = staged.array
        # 2d: one slab per z-chunk (whole slices, labelled as a whole); 3d: the volume is one slab.
        step = out.chunks[0] if params.mode == "2d" else out.shape[0]
        slabs = range(0, out.shape[0], step)
        if progress:
            slabs = progress_bar(slabs, unit="slab", desc=f"weights {labels_path.name}")
        for z0 in slabs:
            key = f"z{z0}"
            if staged.is_done(key):
                continue
            slab = np.asarray(labels[z0 : z0 + step])
            _store_slab_weights(slab, z0, out, params, cw, depth, sampling, threads, labels_path)
            staged.mark_done(key)
        levels = meta.levels if pyramid_levels is None else pyramid_levels
        record = provenance({"labels": labels_path}, {**summary, **(extra_params or {})})
        # A crop's weights sit where its labels sit (offset and NGFF translation carried over).
        placed = {"offset": list(meta.offset)} if any(meta.offset) else {}
        staged.commit(levels, provenance=record, extra_attrs={"weights": summary, **placed})
    except BaseException:
        # Keep the staging folder for a resume unless nothing useful was written.
        if not staged.done_keys():
            staged.abort()
        else:
            log.debug("weights for %s stopped; %s kept, rerun to resume", labels_path, staged.staging)
        raise
    return summary


def _weight_setup(labels: Any, meta: Any, params: WeightParams, labels_path: Path) -> tuple[
    tuple[float, ...], dict[int, int], np.ndarray, dict[str, Any]
]:
    """Pixel sampling, the halo per axis (clipped to the extent), the class weights of the whole
    label volume, and the summary recorded with the weights."""
    sampling = pixel_sampling(meta.voxel_size, params.mode)
    halo = border_halo(params.sigma, sampling, params.tolerance)
    halo = (0, *halo) if params.mode == "2d" else halo
    # A halo beyond the image edge adds nothing (and dask refuses it): clip to the extent.
    depth = {axis: min(h, n) for axis, (h, n) in enumerate(zip(halo, meta.shape))}
    counts, cw = volume_class_weights(labels, params, labels_path)
    summary = {
        **asdict(params),
        "class_counts": counts.tolist(),
        "class_weights": cw.tolist(),
        "cutoff_px": cutoff_distance(params.sigma, params.tolerance),
        "halo_px": list(depth.values()),
        "sampling_px": list(sampling),
    }
    log.info(
        "%s: class weights (background, cell) %s, border halo %s px", labels_path, summary["class_weights"], halo
    )
    return sampling, depth, cw, summary


def _store_slab_weights(slab: np.ndarray, z0: int, out: Any, params: WeightParams, cw: np.ndarray,
                        depth: dict[int, int], sampling: tuple[float, ...], threads: int, labels_path: Path) -> None:
    """Weights of one slab of labels (starting at slice ``z0``), block by block with a halo, into ``out``."""
    import dask  # dask loads only when weights are computed
    import dask.array as da

    inst = instances_from_labels(slab, params, labels_path)
    block_chunks = (inst.shape[0], *out.chunks[1:])
    blocks = da.from_array(inst, chunks=block_chunks)
    # The annotated mask travels with the ids (same blocks, same halo) as a second argument.
    mask = None if params.unlabelled_value is None else da.from_array(annotated(slab, params), chunks=block_chunks)
    weights = da.map_overlap(
        _block_weights,
        blocks,
        *(() if mask is None else (mask,)),
        depth=depth,
        boundary="none",
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
        class_weight=cw,
        params=params,
        sampling=sampling,
    )
    # map_overlap may merge chunks narrower than the halo: re-align to the store's chunks.
    weights = weights.rechunk((inst.shape[0], *out.chunks[1:]))
    with dask.config.set(scheduler="threads", num_workers=max(int(threads), 1)):
        da.store(weights, out, regions=(slice(z0, z0 + inst.shape[0]),), lock=False)


# --------------------------------------------------------------------- preview


def write_preview(
    labels_path: str | Path,
    png: str | Path,
    params: WeightParams = WeightParams(),
    *,
    weights_path: str | Path | None = None,
    raw_path: str | Path | None = None,
    z: int | None = None,
) -> Path:
    """Render slice ``z`` (default: the middle one) of a label OME-Zarr and its weights to ``png``.

    The weights are read from ``weights_path`` if given, else computed in memory
    with the class weights of the whole label volume (3d mode: of the whole
    volume, so keep it small).
    """
    labels = open_image(labels_path)
    nz = labels.shape[0]
    z = nz // 2 if z is None else z
    if not 0 <= z < nz:
        raise InputError(labels_path, f"has no slice {z} (z must lie in [0, {nz}))")
    label_slice = np.asarray(labels[z])
    check_labels(label_slice, params, labels_path)
    if weights_path is not None:
        weights = open_image(weights_path)
        if tuple(weights.shape) != tuple(labels.shape):
            raise InputError(weights_path, f"shape {weights.shape} differs from {labels.shape} of {labels_path}")
        weight_slice = np.asarray(weights[z])
    else:
        _, cw = volume_class_weights(labels, params, labels_path)
        sampling = pixel_sampling(image_metadata(labels_path).voxel_size, params.mode)
        if params.mode == "2d":
            inst = instances_from_labels(label_slice, params, labels_path)
        else:
            inst = instances_from_labels(np.asarray(labels[:]), params, labels_path)
        if params.mode == "2d":
            mask = annotated(label_slice, params)
        else:
            mask = annotated(np.asarray(labels[:]), params)
        weight_slice = weights_from_instances(inst, cw, params, sampling, mask)
        weight_slice = weight_slice if params.mode == "2d" else weight_slice[z]
    raw_slice = None
    if raw_path is not None:
        raw = open_image(raw_path)
        oz, oy, ox = image_metadata(labels_path).offset  # labels of a crop: show the raw under it
        box = (z + oz, slice(oy, oy + labels.shape[1]), slice(ox, ox + labels.shape[2]))
        if any(o + s > n for o, s, n in zip((oz, oy, ox), labels.shape, raw.shape)) or (
            (oz, oy, ox) == (0, 0, 0) and tuple(raw.shape) != tuple(labels.shape)
        ):
            raise InputError(raw_path, f"shape {raw.shape} does not hold the {labels.shape} labels of {labels_path} "
                             f"at offset {[oz, oy, ox]}")
        raw_slice = np.asarray(raw[box])

    inst = _sequential_ids(instances_from_labels(label_slice, WeightParams(**{**asdict(params), "mode": "2d"})))
    title = f"{Path(labels_path).name}, z = {z}"
    return weights_figure(png, inst, weight_slice, raw_slice, params, title)
