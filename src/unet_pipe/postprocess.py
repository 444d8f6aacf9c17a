"""Instance segmentation from the U-Net's cell probabilities.

Each z slice is segmented on its own (EM stacks are anisotropic and the ISBI
2012 challenge scores 2D slices).  Conventions: probabilities are the
foreground (= cell) probability in [0, 1], arrays are ``(z, y, x)``, instance
id 0 is membrane/background (ISBI convention), objects are 4-connected in
(y, x) as in the challenge's evaluation.

Two methods:

* ``threshold``: cells are ``p > threshold``; instances are their connected
  components.
* ``watershed``: the same cell mask, split further by a seeded watershed on the
  (slightly smoothed) membrane probability ``1 - p``.  Seeds come from the
  high-confidence cell region ``p > seed_threshold``: the maxima of its
  distance transform that stand at least ``seed_prominence`` pixels above the
  saddle to any higher maximum (h-maxima), or the whole region when it is too
  small to hold such a maximum.  So a weak membrane (``p`` between
  the two thresholds) separates seeds, and so does a neck where the U-Net
  missed a membrane altogether, while noise and organelles inside a cell do
  not fragment it.  A mask component without any seed keeps its own id: the
  watershed only ever *splits* threshold components, never drops one.

Stacks get ids unique across z: slice ``z`` is numbered after slice ``z - 1``,
in raster order within the slice, so the output is deterministic.

``instances="3d"`` labels 6-connected objects across slices and blocks instead:
see :mod:`unet_pipe.instances3d`.

Input: any OME-Zarr image of probabilities, float with values in [0, 1] or
uint8 ``round(255 p)`` (or any dtype with a ``unet_pipe.probability_scale``
attribute), so maps from other tools can be labelled too; values outside
[0, 1] (and NaN) are refused, never thresholded into a wrong result.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import scipy.ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from unet_pipe.errors import ConfigError, UnetPipeError
from unet_pipe.instances3d import label_volume
from unet_pipe.io import DEFAULT_NGFF, FAST_COMPRESSION, StagedImage, image_metadata, slab_depth
from unet_pipe.probabilities import as_probability, check_probabilities, needs_range_check, open_probabilities
from unet_pipe.progress import progress_bar
from unet_pipe.provenance import input_fingerprint, provenance

log = logging.getLogger(__name__)

Method = Literal["threshold", "watershed"]
METHODS: tuple[str, ...] = ("threshold", "watershed")
Instances = Literal["2d", "3d"]
INSTANCE_MODES: tuple[str, ...] = ("2d", "3d")
_FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)
_EIGHT_CONNECTED = ndi.generate_binary_structure(2, 2)  # a plateau maximum is one seed
# px: takes the pixel-level speckle out of the probabilities and the distance
# transform before seeding, without moving membranes by more than a pixel.
_SMOOTH_SIGMA = 1.0
_MAX_ID = np.iinfo(np.uint32).max


def instances_from_probabilities(
    prob_slice: np.ndarray,
    method: Method = "threshold",
    threshold: float = 0.5,
    *,
    seed_threshold: float = 0.9,
    seed_prominence: float = 5.0,
    min_size: int = 0,
) -> np.ndarray:
    """Instances of one 2D ``(y, x)`` slice of cell probabilities in [0, 1].

    ``method`` is ``'threshold'`` or ``'watershed'`` (see the module docstring);
    ``seed_threshold`` (>= ``threshold``) and ``seed_prominence`` (pixels) are
    used by the watershed only.
    Segments smaller than ``min_size`` pixels become membrane (0).
    Returns uint32 ids ``1..n`` (consecutive, in raster order of each segment's
    first pixel), 0 = membrane.
    """
    p = np.asarray(prob_slice)
    if p.ndim != 2:
        raise ValueError(f"expected a 2D (y, x) slice, got shape {p.shape}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    cells = p > threshold
    labels, n = ndi.label(cells, structure=_FOUR_CONNECTED)
    if method == "threshold":
        # ndi.label numbers components in the raster order of their first pixel, which are the
        # canonical ids already: dropping small ones keeps that order, so a lookup table renumbers
        # them (relabel_raster_order's sort took 80% of this function's time; tested equal).
        lookup = np.arange(n + 1, dtype=np.uint32)
        if min_size > 0 and n:
            keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_size
            keep[0] = False
            lookup = np.zeros(n + 1, dtype=np.uint32)
            lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
        return lookup[labels]
    if method == "watershed" and n > 0:
        if not threshold <= seed_threshold <= 1.0:
            raise ValueError(f"seed_threshold must lie in [threshold={threshold}, 1], got {seed_threshold}")
        if seed_prominence <= 0:
            raise ValueError(f"seed_prominence must be positive, got {seed_prominence}")
        labels = _split_by_watershed(p, cells, labels, n, seed_threshold, seed_prominence)
    if min_size > 0 and labels.any():
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
    return relabel_raster_order(labels)


def relabel_raster_order(labels: np.ndarray) -> np.ndarray:
    """Ids ``1..n`` in the raster order of each segment's first pixel (0 stays 0), uint32.

    Makes ids independent of how a method numbered its markers, so equal
    partitions get equal ids.
    """
    flat = np.asarray(labels).ravel()
    ids, first = np.unique(flat, return_index=True)
    if ids.size and ids[0] == 0:
        ids, first = ids[1:], first[1:]
    lookup = np.zeros(ids.size, dtype=np.uint32)
    lookup[np.argsort(first, kind="stable")] = np.arange(1, ids.size + 1, dtype=np.uint32)
    out = np.zeros(flat.shape, dtype=np.uint32)
    fg = flat != 0
    out[fg] = lookup[np.searchsorted(ids, flat[fg])]
    return out.reshape(np.shape(labels))


def _split_by_watershed(
    p: np.ndarray,
    cells: np.ndarray,
    components: np.ndarray,
    n_components: int,
    seed_threshold: float,
    seed_prominence: float,
) -> np.ndarray:
    smooth = ndi.gaussian_filter(p.astype(np.float32), _SMOOTH_SIGMA)
    confident = (smooth > seed_threshold) & cells
    distance = ndi.gaussian_filter(ndi.distance_transform_edt(confident).astype(np.float32), _SMOOTH_SIGMA)
    peaks = h_maxima(distance, seed_prominence).astype(bool) & confident
    # A confident region too small to hold a prominent maximum is a seed as a
    # whole: small cells behind a weak membrane must not merge into their neighbour.
    regions, n_regions = ndi.label(confident, structure=_FOUR_CONNECTED)
    has_peak = np.zeros(n_regions + 1, dtype=bool)
    has_peak[regions[peaks]] = True
    peaks |= (regions > 0) & ~has_peak[regions]
    seeds, n_seeds = ndi.label(peaks, structure=_EIGHT_CONNECTED)
    seeded = np.zeros(n_components + 1, dtype=bool)
    seeded[components[seeds > 0]] = True
    seeded[0] = True
    # Components without a confident seed become one marker each (ids after the seeds).
    unseeded = ~seeded[components]
    markers = seeds.astype(np.int64)
    markers[unseeded] = components[unseeded] + n_seeds
    return watershed(1.0 - smooth, markers=markers, mask=cells, connectivity=1)


def instances_from_stack(
    prob: np.ndarray,
    method: Method = "threshold",
    threshold: float = 0.5,
    *,
    first_id: int = 1,
    **kwargs: Any,
) -> np.ndarray:
    """Instances of a ``(z, y, x)`` probability stack, slice by slice.

    Ids are unique across the stack: slice ``z`` uses the ids following those of
    slice ``z - 1``, starting at ``first_id``.  ``kwargs`` go to
    :func:`instances_from_probabilities`.
    """
    return _label_stack(prob, method, threshold, first_id=first_id, **kwargs)[0]


def _label_stack(
    prob: np.ndarray, method: Method, threshold: float, *, first_id: int = 1, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`instances_from_stack` and the pixels of each id from ``first_id`` on, in id order
    (counted on the labelling threads while each slice is in cache: the summary need not read the
    instances back)."""
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"expected a (z, y, x) stack, got shape {prob.shape}")
    out = np.empty(prob.shape, dtype=np.uint32)

    def label(z: int) -> np.ndarray:
        out[z] = instances_from_probabilities(prob[z], method, threshold, **kwargs)
        return np.bincount(out[z].ravel())[1:]

    def shift(z: int, by: int) -> None:  # the slice's ids 1..n become by+1..by+n
        if by:
            np.add(out[z], np.uint32(by), out=out[z], where=out[z] > 0)

    # Slices are labelled on threads (scipy's labelling and numpy release the GIL: 30 ISBI slices
    # took 0.035 s on 2 cores against 0.055 s in one thread, measured), then their ids are shifted
    # to follow those of the slices before, on threads too (in the calling thread this took 40 ms
    # of a 160 ms postprocess of 30 ISBI slices, measured).
    workers = max(1, min(len(os.sched_getaffinity(0)), prob.shape[0]))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sizes = list(pool.map(label, range(prob.shape[0])))
        firsts = np.cumsum([int(first_id) - 1] + [c.size for c in sizes])  # c.size: the slice's largest id
        if int(firsts[-1]) > _MAX_ID:
            raise OverflowError("more than 2**32 - 1 instances in the stack")
        list(pool.map(shift, range(prob.shape[0]), (int(f) for f in firsts[:-1])))
    return out, (np.concatenate(sizes) if sizes else np.zeros(0, np.int64))


def _todo_runs(staged: Any, depth: int, step: int, run: int) -> list[tuple[int, int, bool]]:
    """``(z0, z1, done)``: consecutive z-chunk slabs grouped into runs of at most ``run`` slices,
    finished slabs (per their done records ``z{z0}-{z1}``) and slabs still to do in separate runs."""
    runs: list[tuple[int, int, bool]] = []
    for z0 in range(0, depth, step):
        z1 = min(z0 + step, depth)
        done = staged.is_done(f"z{z0}-{z1}")
        if runs and runs[-1][2] == done and runs[-1][1] == z0 and z1 - runs[-1][0] <= run:
            runs[-1] = (runs[-1][0], z1, done)
        else:
            runs.append((z0, z1, done))
    return runs


def postprocess(
    probabilities: str | Path,
    dest: str | Path,
    *,
    method: Method = "threshold",
    threshold: float = 0.5,
    seed_threshold: float = 0.9,
    seed_prominence: float = 5.0,
    min_size: int = 0,
    pyramid_levels: int = 2,
    overwrite: bool = False,
    resume: bool = True,
    progress: bool = False,
    ngff: str = DEFAULT_NGFF,
    instances: Instances = "2d",
    object_sizes: Callable[[np.ndarray], None] | None = None,
    **options_3d: Any,
) -> Path:
    """Segment a probability OME-Zarr into an instance OME-Zarr label image (uint32).

    ``instances``: ``2d`` (each slice on its own, below) or ``3d`` (objects
    linked across slices and blocks: :func:`unet_pipe.instances3d.label_volume`,
    which takes ``options_3d``: block, halo, workers, step, shard; ``min_size``
    then counts voxels, and ``seed_prominence`` is not used).

    Works one z-chunk slab at a time (memory: one slab) and records each slab
    as done, so a restarted run (``resume``) skips finished slabs; the offset of
    a skipped slab's successor is read back from its written ids, which keeps ids
    identical to an uninterrupted run.  The output has the chunks and voxel size
    of the input and provenance in its attributes; ``ngff``: "0.4" (zarr format 2)
    or "0.5" (zarr format 3).

    ``object_sizes``: called once the store is published, with the pixels of every id
    (1, 2, ...) as :func:`unet_pipe.summary.summarize` takes them, when this call labelled
    every slice (2D instances, nothing resumed); not called otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if instances not in INSTANCE_MODES:
        raise ValueError(f"instances must be one of {INSTANCE_MODES}, got {instances!r}")
    if instances == "3d":
        return label_volume(
            probabilities, dest, method=method, threshold=threshold, seed_threshold=seed_threshold,
            min_size=min_size, pyramid_levels=pyramid_levels, overwrite=overwrite, resume=resume,
            progress=progress, ngff=ngff, **options_3d,
        )
    if options_3d:
        raise ValueError(f"options {sorted(options_3d)} need instances='3d'")
    prob, scale = open_probabilities(probabilities)
    meta = image_metadata(probabilities)
    check_range = needs_range_check(meta.dtype, scale)
    if min_size > meta.shape[1] * meta.shape[2]:
        # Every segment would become membrane: an empty result that looks like a finished one.
        raise ConfigError(None, f"min_size {min_size} exceeds the slice area of {probabilities} "
                          f"({meta.shape[1]} x {meta.shape[2]} pixels)")
    params = {"method": method, "threshold": threshold, "seed_threshold": seed_threshold,
              "seed_prominence": seed_prominence, "min_size": min_size, "probability_scale": scale}
    staged = _staged_labels(probabilities, dest, meta, params, resume=resume, overwrite=overwrite, ngff=ngff)
    runs = _slab_runs(staged, meta.shape, progress, probabilities)
    try:
        # Runs write their pyramid levels too, unless resuming a run that did not (then commit rebuilds them).
        levels = pyramid_levels if staged.stream_levels(pyramid_levels) else 0
        sizes: list[np.ndarray | None] = []
        next_id = _label_slabs(staged, runs, prob, probabilities, params, check_range=check_range, levels=levels,
                               sizes=sizes)
        staged.commit(
            pyramid_levels,
            provenance=provenance({"probabilities": probabilities}, params),
            extra_attrs={"instances": next_id - 1},
        )
    except BaseException:
        # Keep the staging folder: its done records make the rerun resume.
        log.debug("postprocess of %s interrupted; rerun to resume", probabilities)
        raise
    log.info("wrote %s: %d instances", dest, next_id - 1)
    if object_sizes is not None and not any(part is None for part in sizes):
        object_sizes(np.concatenate([np.zeros(0, np.int64), *sizes]))
    return Path(dest)


def _slab_runs(staged: StagedImage, shape: tuple[int, ...], progress: bool, probabilities: str | Path) -> Any:
    """The runs of :func:`_todo_runs` (with a progress bar when ``progress``)."""
    step = staged.array.chunks[0]
    # Done records stay per z-chunk slab; the slabs still to do are read and written in runs of up
    # to SLAB_VOXELS, so zarr decodes and encodes their chunks concurrently.
    runs = _todo_runs(staged, shape[0], step, slab_depth(step, shape[1] * shape[2]))
    return progress_bar(runs, unit="run", desc=f"postprocess {Path(probabilities).name}") if progress else runs


def _staged_labels(probabilities: str | Path, dest: str | Path, meta: Any, params: dict, *, resume: bool,
                   overwrite: bool, ngff: str) -> StagedImage:
    """The staging store of the 2D instances, resumed only for the same input and parameters."""
    # The input's identity too: a run resumed on other probabilities must start over.
    fingerprint = repr(sorted(params.items())) + f"|{meta.shape}|{meta.dtype}|{input_fingerprint(probabilities)}"
    staged = StagedImage(
        dest,
        shape=meta.shape,
        dtype=np.uint32,
        chunks=meta.chunks,
        voxel_size=meta.voxel_size,
        kind="labels",
        compression=FAST_COMPRESSION,  # ids of few objects per chunk compress well at any level
        resume=resume,
        fingerprint=fingerprint,
        overwrite=overwrite,
        ngff=ngff,
    )
    return staged


def _label_slabs(staged: StagedImage, runs: Any, prob: Any, probabilities: str | Path, params: dict, *,
                 check_range: bool, levels: int, next_id: int = 1, sizes: list | None = None) -> int:
    """Label the runs ``(z0, z1, done)`` of ``prob`` into ``staged`` (done runs are skipped), with ids
    unique across the stack and a done record per z-chunk slab; returns the next free id.

    Each run's labels go to level 0 and ``levels`` pyramid levels at once (:meth:`StagedImage.write_slab`), in the
    background while the next run is read and labelled; a run's slabs are marked done once its
    writes have finished.  Measured on 30 ISBI slices (2 cores): 0.05 s for the writes and the
    pyramid, against 0.16 s for a zarr write of level 0 and a pyramid re-read from it at commit.
    ``sizes`` gets the pixels of each id labelled here, in id order, and None for runs skipped as done.
    """
    step = staged.array.chunks[0]
    scale = params["probability_scale"]
    pending: list[tuple[list, int, int]] = []  # (futures, z0, z1) of the runs being written

    def settle() -> None:
        for futures, w0, w1 in pending:
            for future in futures:
                future.result()
            for k0 in range(w0, w1, step):
                staged.mark_done(f"z{k0}-{min(k0 + step, w1)}")
        pending.clear()

    try:
        for z0, z1, done in runs:
            if done:
                # Ids grow with z, so the slabs' maximum is the last id used so far.
                next_id = max(next_id, int(np.max(staged.array[z0:z1], initial=0)) + 1)
                if sizes is not None:
                    sizes.append(None)
                continue
            try:
                slab = as_probability(prob[z0:z1], scale)
            except UnetPipeError:
                if z1 - z0 <= step:
                    raise
                # A damaged chunk in the run: one z-chunk at a time, so the slabs before it are kept
                # (their done records make the rerun resume there) and the error names the chunk.
                settle()
                single = [(k0, min(k0 + step, z1), False) for k0 in range(z0, z1, step)]
                next_id = _label_slabs(staged, single, prob, probabilities, params, check_range=check_range,
                                       levels=levels, next_id=next_id, sizes=sizes)
                continue
            if check_range:
                check_probabilities(slab, probabilities, f"in slices {z0}-{z1 - 1}")
            labels, counts = _label_stack(
                slab,
                params["method"],
                params["threshold"],
                first_id=next_id,
                seed_threshold=params["seed_threshold"],
                seed_prominence=params["seed_prominence"],
                min_size=params["min_size"],
            )
            if sizes is not None:
                sizes.append(counts)
            settle()
            pending.append((staged.write_slab(z0, labels, levels, wait=False), z0, z1))
            next_id += counts.size  # one count per id given in the run
    finally:
        settle()
    return next_id
