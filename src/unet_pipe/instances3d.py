"""3D instances of whole volumes, labelled block by block with ids unique across the volume.

The 3D counterpart of :mod:`unet_pipe.postprocess` (``instances: 3d``).  Arrays
are ``(z, y, x)``, id 0 is membrane/background, objects are 6-connected (faces,
not edges or corners: ``scipy.ndimage.generate_binary_structure(3, 1)``).

Threshold mode (:func:`label_volume`, ``method="threshold"``)
    Cells are ``p > threshold``; instances are their 3D connected components,
    the same partition as ``scipy.ndimage.label`` of the whole volume whatever
    the block shape and the worker count.  Three passes, as in dask-image's
    ``ndmeasure.label``, elf.parallel and cluster_tools, with a sparse merge:

    1. *faces* (per block, parallel): label the block with ``scipy.ndimage.label``
       and keep only its object count, object sizes and its six face planes
       (``faces/<block>.npz`` in the staging folder); nothing volume-sized is written.
    2. *merge* (one small job): global pre-ids are ``offset[block] + local id``
       (offsets: the prefix sum of the counts, blocks in C order).  The id pairs
       that touch across each internal face are merged by
       ``scipy.sparse.csgraph.connected_components`` over the *face objects
       only*; the smallest pre-id of a component represents it.  What the
       merge keeps: the sorted face objects and their final ids, and the sorted
       pre-ids that get no id of their own (non-representatives, and objects
       below ``min_size``).  Its memory grows with the objects on block faces
       (plus the dropped small ones), never with the volume or the largest id.
    3. *write* (per block, parallel): label the block again (``ndimage.label``
       is deterministic), map local ids through the block's lookup table
       (``final = pre - #dropped pre-ids below it``; face objects take their
       component's id) and write the block.  The write is idempotent, so a
       killed run simply redoes unfinished blocks.

    Final ids are consecutive ``1..n``, numbered by the first block (C order)
    an object touches and its raster order there: deterministic and independent
    of the worker count; they depend on the block shape (the partition does not).

Watershed mode (``method="watershed"``)
    Seeds are the 3D components of ``p > seed_threshold``, labelled over the
    whole volume as above; the cell mask ``p > threshold`` is labelled too.  Each
    block is then flooded (``skimage.segmentation.watershed`` on ``1 - p``,
    6-connected, restricted to the mask) in a window of the block grown by
    ``halo`` voxels per side, and the block's part of the result is written.  A
    mask component without any seed keeps an id of its own (after the seeds'),
    as in 2D: the watershed only splits components, never drops one.

    **Halo rule**: a voxel gets exactly the id of the whole-volume watershed
    when its mask component (6-connected ``p > threshold``) lies inside its
    block grown by ``halo``: a flood never leaves its mask component, and
    priority flooding restricted to one component does not depend on anything
    outside it.  Beyond the rule (a component larger than the window) the flood
    sees a truncated component: every mask voxel still gets a seed's id (or its
    component's own id when the window holds no seed of it), but near the
    window's edge it may be a different seed than the whole-volume watershed
    would give, and a cut component's voxels may get a seed id in one block
    and its own id in another.  Choose ``halo`` at least the largest cell's
    extent to stay within the rule.

Resumability: every pass records each finished block (and the merge) as done
in the staging store (:class:`unet_pipe.io.StagedImage`); a rerun after a kill
skips what is done.  Sharding: the passes take ``shard=(i, n)`` (every n-th
block from the i-th) so that Snakemake can run them as separate jobs.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import scipy.ndimage as ndi
import zarr

from unet_pipe.errors import ConfigError, InputError, OutputError
from unet_pipe.io import DEFAULT_NGFF, StagedImage, image_metadata
from unet_pipe.probabilities import as_probability, check_probabilities, needs_range_check, open_probabilities
from unet_pipe.progress import progress_bar
from unet_pipe.provenance import input_fingerprint, provenance
from unet_pipe.safety import ATTRS_KEY
from unet_pipe.tiling import Roi

log = logging.getLogger(__name__)

Step = Literal["all", "prepare", "faces", "merge", "write", "flood", "finalize"]
#: The stages of a sharded run, in order (``flood``: watershed only).
STEPS: tuple[str, ...] = ("all", "prepare", "faces", "merge", "write", "flood", "finalize")
#: 6-connectivity: voxels sharing a face.
SIX_CONNECTED = ndi.generate_binary_structure(3, 1)
#: Default labelling block: the input's chunks, doubled along their smallest side until this
#: many voxels (16 MiB of float32 probabilities, 4 MiB of labels per block in flight).
DEFAULT_BLOCK_VOXELS = 1 << 22
WORK_DIR = "instances3d"  # inside DEST.partial; removed before publishing
_MAX_ID = np.iinfo(np.uint32).max


# --------------------------------------------------------------------- geometry


def choose_block(shape: Sequence[int], chunks: Sequence[int], block: Sequence[int] | None = None) -> tuple[int, ...]:
    """The labelling block ``(z, y, x)``: ``block`` checked, or a default from the chunks.

    A block must be a positive multiple of the chunks along each axis (so that
    parallel writers never share a chunk); it is clipped to the volume (a block
    larger than the volume covers it whole).  Default: the chunks, doubled along
    their smallest side until :data:`DEFAULT_BLOCK_VOXELS` voxels or the whole volume.
    """
    shape = tuple(int(s) for s in shape)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape))
    if block is None:
        out = list(chunks)
        while math.prod(out) < DEFAULT_BLOCK_VOXELS:
            growable = [a for a in range(3) if out[a] < shape[a]]
            if not growable:
                break
            axis = min(growable, key=lambda a: out[a])
            out[axis] = min(out[axis] * 2, shape[axis])
        return tuple(out)
    block = tuple(int(b) for b in block)
    if len(block) != 3 or any(b < 1 for b in block):
        raise ConfigError(None, f"--block must be three positive sizes Z Y X, got {' '.join(map(str, block))}")
    bad = [(b, c) for b, c, s in zip(block, chunks, shape) if b % c and b < s]
    if bad:
        raise ConfigError(
            None, f"--block {' '.join(map(str, block))} must be a multiple of the input's chunks "
            f"{' '.join(map(str, chunks))} along each axis (or cover the axis)"
        )
    return tuple(min(b, s) for b, s in zip(block, shape))


def block_grid(shape: Sequence[int], block: Sequence[int]) -> list[Roi]:
    """The blocks tiling ``shape``, in C order (the last ones clipped at the edge)."""
    starts = [range(0, s, b) for s, b in zip(shape, block)]
    return [
        Roi((z, y, x), tuple(min(b, s - a) for a, b, s in zip((z, y, x), block, shape)))
        for z in starts[0] for y in starts[1] for x in starts[2]
    ]


def grid_shape(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-int(s) // int(b)) for s, b in zip(shape, block))


def shard_blocks(blocks: Sequence[Any], shard: tuple[int, int] | None) -> list[Any]:
    """Every n-th block from the i-th (``shard=(i, n)``), so shards get similar work; all when None."""
    if shard is None:
        return list(blocks)
    index, count = (int(v) for v in shard)
    if not 0 <= index < count:
        raise ConfigError(None, f"--shard must be I N with 0 <= I < N, got {index} {count}")
    return list(blocks[index::count])


# --------------------------------------------------------------------- one block


def label_block(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components of a boolean ``(z, y, x)`` block: (int32 ids 1..n in raster order, n)."""
    labels, n = ndi.label(mask, structure=SIX_CONNECTED, output=np.int32)
    return labels, int(n)


def face_planes(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The six face planes of a labelled block: ``lo0``/``hi0`` (first/last z), ``lo1``/``hi1`` (y), ``lo2``/``hi2`` (x)."""
    planes = {}
    for axis in range(3):
        planes[f"lo{axis}"] = np.take(labels, 0, axis=axis)
        planes[f"hi{axis}"] = np.take(labels, labels.shape[axis] - 1, axis=axis)
    return planes


def face_pairs(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Unique ``(lower id, upper id)`` pairs of two touching face planes where both are objects, ``(k, 2)``."""
    both = (lower != 0) & (upper != 0)
    if not both.any():
        return np.empty((0, 2), np.int64)
    pairs = np.stack([lower[both], upper[both]], axis=1).astype(np.int64)
    return np.unique(pairs, axis=0)


# --------------------------------------------------------------------- the merge


@dataclass
class Merge:
    """The result of the face merge: what every block needs to map its local ids to final ids.

    ``offsets[b]``: pre-id of block ``b``'s local id 0 (pre-id = offset + local id);
    ``nodes``: sorted pre-ids of the objects on internal faces, ``node_final``
    their final ids (0: dropped as small); ``dropped``: sorted pre-ids that get
    no id of their own (non-representatives of merged objects and small objects);
    ``count``: the number of final ids (they are ``1..count``).
    """

    offsets: np.ndarray
    nodes: np.ndarray
    node_final: np.ndarray
    dropped: np.ndarray
    count: int

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, offsets=self.offsets, nodes=self.nodes, node_final=self.node_final,
                 dropped=self.dropped, count=np.int64(self.count))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Merge":
        with np.load(path) as f:
            return cls(f["offsets"], f["nodes"], f["node_final"], f["dropped"], int(f["count"]))

    def lookup(self, index: int, n: int, small: np.ndarray | None = None) -> np.ndarray:
        """Lookup table ``local id -> final id`` (uint32, length ``n + 1``) of block ``index``.

        ``small``: boolean per local id (length ``n + 1``), objects below the size
        limit (only those not on a face are looked at; face objects follow the merge).
        """
        offset = int(self.offsets[index])
        pre = np.arange(offset + 1, offset + n + 1, dtype=np.int64)
        final = pre - np.searchsorted(self.dropped, pre, side="left")
        if small is not None:
            final[small[1:]] = 0
        lo, hi = np.searchsorted(self.nodes, [offset + 1, offset + n + 1])
        final[self.nodes[lo:hi] - offset - 1] = self.node_final[lo:hi]
        lut = np.zeros(n + 1, dtype=np.uint32)
        lut[1:] = final
        return lut


def merge_faces(
    grid: Sequence[int], read: Callable[[int, str], np.ndarray], min_size: int = 0,
) -> Merge:
    """Merge the objects of all blocks (C order over ``grid``) across their faces (module docstring).

    ``read(b, key)`` returns one item of block ``b``'s record: ``count`` (objects),
    ``sizes`` (voxels per local id; read only when ``min_size`` > 0) or a plane of
    :func:`face_planes`.  Holds two planes at a time besides the pairs found on
    faces: memory grows with the objects on block faces, not with the volume.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nblocks = math.prod(grid)
    counts = np.array([int(read(b, "count")) for b in range(nblocks)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    strides = (grid[1] * grid[2], grid[2], 1)
    pair_lists: list[np.ndarray] = []
    for b in range(nblocks):
        coords = np.unravel_index(b, tuple(grid))
        for axis in range(3):
            a = b - strides[axis]  # the lower neighbour along this axis
            if coords[axis] == 0 or counts[a] == 0 or counts[b] == 0:
                continue
            pairs = face_pairs(read(a, f"hi{axis}"), read(b, f"lo{axis}"))
            if pairs.size:
                pairs[:, 0] += offsets[a]
                pairs[:, 1] += offsets[b]
                pair_lists.append(pairs)
    pairs = np.concatenate(pair_lists) if pair_lists else np.empty((0, 2), np.int64)
    nodes, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(pairs.shape)
    m = nodes.size
    graph = coo_matrix((np.ones(len(pairs), np.int8), (inverse[:, 0], inverse[:, 1])), shape=(m, m))
    ncomp, comp = connected_components(graph, directed=False)
    # nodes are sorted: the first node of each component is its smallest pre-id, the representative.
    _, first = np.unique(comp, return_index=True)
    rep_index = first[comp]
    is_rep = rep_index == np.arange(m)
    dropped = [nodes[~is_rep]]
    comp_small = np.zeros(ncomp, dtype=bool)
    if min_size > 0:
        comp_size = np.zeros(ncomp, dtype=np.int64)
        for b in range(nblocks):
            if counts[b] == 0:
                continue
            sizes = np.asarray(read(b, "sizes"), dtype=np.int64)
            lo, hi = np.searchsorted(nodes, [offsets[b] + 1, offsets[b] + counts[b] + 1])
            local = nodes[lo:hi] - offsets[b]
            np.add.at(comp_size, comp[lo:hi], sizes[local])
            small = sizes < min_size
            small[0] = False
            small[local] = False  # face objects: decided by their component's size
            dropped.append(np.flatnonzero(small).astype(np.int64) + offsets[b])
        comp_small = comp_size < min_size
        dropped.append(nodes[is_rep & comp_small[comp]])
    dropped_all = np.unique(np.concatenate(dropped))
    reps = nodes[rep_index]
    node_final = reps - np.searchsorted(dropped_all, reps, side="left")
    node_final[comp_small[comp]] = 0
    total = int(counts.sum()) - int(dropped_all.size)
    if total > _MAX_ID:
        raise OverflowError(f"{total} objects: more than 2**32 - 1 instances in the volume")
    return Merge(offsets, nodes, node_final.astype(np.int64), dropped_all, total)


# --------------------------------------------------------------------- the store


Reader = Callable[[Roi], np.ndarray]


class BlockLabelling:
    """One 3D connected-component labelling of ``mask_of(block)`` into ``target``, resumable.

    ``mask_of(roi)`` returns the boolean mask of a block (read from the input);
    ``work``: a folder of its own for the face records and the merge;
    ``done``: (is_done, mark_done) of the staging store, keys are prefixed by ``name``.
    """

    def __init__(
        self, name: str, shape: Sequence[int], block: Sequence[int], mask_of: Reader, target: Any, work: Path,
        done: tuple[Callable[[str], bool], Callable[[str], None]], min_size: int = 0,
    ) -> None:
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.block = tuple(int(b) for b in block)
        self.blocks = block_grid(self.shape, self.block)
        self.grid = grid_shape(self.shape, self.block)
        self.mask_of = mask_of
        self.target = target
        self.work = Path(work)
        self.is_done, self.mark_done = done
        self.min_size = int(min_size)
        self._merge: Merge | None = None
        (self.work / "faces").mkdir(parents=True, exist_ok=True)

    def _faces_file(self, b: int) -> Path:
        return self.work / "faces" / f"{b}.npz"

    def _key(self, step: str, b: int | None = None) -> str:
        return f"{self.name}:{step}" + ("" if b is None else f":{self.blocks[b].key()}")

    # -- pass 1
    def faces(self, b: int) -> int:
        """Label block ``b`` and store its count, sizes and face planes; returns its voxel count."""
        if self.is_done(self._key("faces", b)):
            return 0
        labels, n = label_block(self.mask_of(self.blocks[b]))
        record = {"count": np.int64(n), **face_planes(labels)}
        if self.min_size > 0:
            record["sizes"] = np.bincount(labels.ravel(), minlength=n + 1).astype(np.int64)
        path = self._faces_file(b)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **record)
        os.replace(tmp, path)
        self.mark_done(self._key("faces", b))
        return self.blocks[b].size

    def missing(self, step: str) -> list[int]:
        return [b for b in range(len(self.blocks)) if not self.is_done(self._key(step, b))]

    # -- pass 2
    def merge(self) -> Merge:
        """The face merge (computed once and stored; a rerun reads it back)."""
        if self._merge is not None:
            return self._merge
        path = self.work / "merge.npz"
        if self.is_done(self._key("merge")) and path.exists():
            self._merge = Merge.load(path)
            return self._merge
        missing = self.missing("faces")
        if missing:
            raise OutputError(None, f"{self.name}: {len(missing)} of {len(self.blocks)} blocks have not been "
                              f"labelled yet (first: {self.blocks[missing[0]].key()}); run the faces step first")
        files: dict[int, Any] = {}

        def read(b: int, key: str) -> np.ndarray:
            # npz members are read one by one: only the planes a face needs are loaded.
            if b not in files:
                if len(files) > 64:
                    files.pop(next(iter(files))).close()
                files[b] = np.load(self._faces_file(b))
            return files[b][key]

        try:
            self._merge = merge_faces(self.grid, read, self.min_size)
        finally:
            for f in files.values():
                f.close()
        self._merge.save(path)
        self.mark_done(self._key("merge"))
        return self._merge

    # -- pass 3
    def labels(self, b: int) -> np.ndarray:
        """Final (uint32) ids of block ``b``, recomputed from the input (needs the merge)."""
        merge = self.merge()
        labels, n = label_block(self.mask_of(self.blocks[b]))
        small = None
        if self.min_size > 0:
            small = np.bincount(labels.ravel(), minlength=n + 1) < self.min_size
            small[0] = False
        return merge.lookup(b, n, small)[labels]

    def write(self, b: int) -> int:
        """Write block ``b``'s final ids into ``target`` and record it; returns its voxel count."""
        if self.is_done(self._key("write", b)):
            return 0
        self.target[self.blocks[b].slices()] = self.labels(b)
        self.mark_done(self._key("write", b))
        return self.blocks[b].size

    def run(self, workers: int = 1, shard: tuple[int, int] | None = None, progress: Callable[[int], None] | None = None,
            steps: Iterable[str] = ("faces", "merge", "write")) -> None:
        steps = tuple(steps)
        mine = shard_blocks(list(range(len(self.blocks))), shard)
        if "faces" in steps:
            run_parallel(self.faces, mine, workers, progress)
        if "merge" in steps:
            self.merge()
        if "write" in steps:
            self.merge()  # once, before the threads need it
            run_parallel(self.write, mine, workers, progress)


def run_parallel(task: Callable[[int], int], items: Sequence[int], workers: int,
                 progress: Callable[[int], None] | None = None) -> None:
    """``task`` over ``items`` on ``workers`` threads (numpy, scipy.ndimage and Blosc release the GIL).

    The first exception is re-raised once the running tasks have finished.
    """
    if workers <= 1 or len(items) <= 1:
        for item in items:
            voxels = task(item)
            if progress:
                progress(voxels)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for voxels in pool.map(task, items):
            if progress:
                progress(voxels)


# --------------------------------------------------------------------- watershed


def flood_window(
    p: np.ndarray, mask: np.ndarray, seeds: np.ndarray, cells: np.ndarray, n_seeds: int,
    unseeded_rank: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Seeded watershed of one window: ``1 - p`` flooded from ``seeds`` (global ids) within ``mask``.

    Mask voxels that no seed reaches take ``n_seeds + unseeded_rank(cells)``: the
    id of their mask component (``cells``, global ids) among the unseeded ones.
    """
    from skimage.segmentation import watershed

    out = watershed(1.0 - p, markers=seeds, mask=mask, connectivity=1).astype(np.uint32)
    left = mask & (out == 0)
    if left.any():
        out[left] = (n_seeds + unseeded_rank(cells[left])).astype(np.uint32)
    return out


def watershed_reference(p: np.ndarray, threshold: float, seed_threshold: float) -> np.ndarray:
    """Whole-volume seeded watershed, the reference of the blockwise one (same partition; ids may differ).

    Seeds: 6-connected components of ``p > seed_threshold``; mask ``p > threshold``;
    mask components without a seed keep their own ids.
    """
    p = np.asarray(p, dtype=np.float32)
    mask = p > threshold
    seeds, n_seeds = ndi.label(p > seed_threshold, structure=SIX_CONNECTED)
    cells, n_cells = ndi.label(mask, structure=SIX_CONNECTED)
    seeded = np.zeros(n_cells + 1, dtype=bool)
    seeded[cells[seeds > 0]] = True
    unseeded_ids = np.flatnonzero(~seeded[1:]) + 1

    def rank(ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(unseeded_ids, ids) + 1

    return flood_window(p, mask, seeds.astype(np.int32), cells, n_seeds, rank)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images split the voxels into the same objects (ids may differ; 0 must match)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    fg = a != 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return pairs.shape[1] == np.unique(a[fg]).size == np.unique(b[fg]).size


def remove_work(staging: Path) -> None:
    """Remove the intermediate records (our own folder and arrays) before publishing."""
    shutil.rmtree(Path(staging) / WORK_DIR, ignore_errors=True)


# --------------------------------------------------------------------- zarr -> zarr


@dataclass
class _Request:
    probabilities: Path
    dest: Path
    method: str
    threshold: float
    seed_threshold: float
    min_size: int
    halo: tuple[int, int, int]
    block: tuple[int, int, int]
    fingerprint: str
    params: dict


def _probability_reader(path: Path, prob: Any, scale: float, dtype: np.dtype) -> Reader:
    """Probabilities of a block as float32, refusing values outside [0, 1] (and NaN)."""

    checked = needs_range_check(dtype, scale)

    def read(roi: Roi) -> np.ndarray:
        p = as_probability(prob[roi.slices()], scale)
        return check_probabilities(p, path, f"in the block at z,y,x {roi.start}") if checked else p

    return read


def _intermediate(staged: Any, name: str) -> Any:
    """A uint32 array of the volume's shape and chunks in our work folder (removed before publishing)."""
    path = staged.staging / WORK_DIR / name
    if (path / ".zarray").exists():
        return zarr.open_array(str(path), mode="r+", zarr_format=2)
    return zarr.create_array(str(path), shape=staged.shape, chunks=staged.chunks, dtype=np.uint32,
                             fill_value=0, zarr_format=2, overwrite=True)


def _window(roi: Roi, halo: Sequence[int], shape: Sequence[int]) -> Roi:
    start = tuple(max(0, a - h) for a, h in zip(roi.start, halo))
    stop = tuple(min(s, b + h) for b, h, s in zip(roi.stop, halo, shape))
    return Roi(start, tuple(b - a for a, b in zip(start, stop)))


def label_volume(
    probabilities: str | Path,
    dest: str | Path,
    *,
    method: str = "threshold",
    threshold: float = 0.5,
    seed_threshold: float = 0.9,
    min_size: int = 0,
    block: Sequence[int] | None = None,
    halo: int | Sequence[int] = 32,
    workers: int = 1,
    step: Step = "all",
    shard: tuple[int, int] | None = None,
    pyramid_levels: int = 2,
    overwrite: bool = False,
    resume: bool = True,
    progress: bool = False,
    ngff: str | None = None,
) -> Path:
    """3D instances of a probability OME-Zarr, block by block, into an OME-Zarr label image (uint32).

    ``probabilities``: any OME-Zarr image whose values are probabilities in
    [0, 1] (float), or uint8 ``round(255 p)``; other values are refused.
    ``method``: ``threshold`` or ``watershed`` (module docstring; ``min_size``,
    in voxels, with threshold only); ``block`` ``(z, y, x)``: multiples of the
    input's chunks (:func:`choose_block`); ``halo``: watershed window margin per
    side in voxels (the halo rule); ``workers``: threads (the result does not
    depend on them).  ``step``: ``all``, or one stage of a sharded run:
    ``prepare`` (create ``DEST.partial``), ``faces``, ``merge``, ``write``,
    ``flood`` (watershed; ``shard=(i, n)``: every n-th block from the i-th) and
    ``finalize`` (check that every block is written, then publish).  A rerun resumes from the blocks done.
    """

    _check_method(method, step, min_size)
    probabilities, dest = Path(probabilities), Path(dest)
    prob, scale = open_probabilities(probabilities)
    meta = image_metadata(probabilities)
    if len(meta.shape) != 3:
        raise InputError(probabilities, f"expected a (z, y, x) image, got shape {meta.shape}")
    chosen = choose_block(meta.shape, meta.chunks, block)
    halo3 = (int(halo),) * 3 if np.isscalar(halo) else tuple(int(h) for h in halo)  # type: ignore[arg-type]
    if len(halo3) != 3 or min(halo3) < 0:
        raise ConfigError(None, f"--halo must be one or three sizes >= 0, got {halo}")
    params = {
        "instances": "3d", "method": method, "threshold": threshold, "seed_threshold": seed_threshold,
        "min_size": min_size, "block": list(chosen), "probability_scale": scale,
        **({"halo": list(halo3)} if method == "watershed" else {}),
    }
    fingerprint = repr(sorted(params.items())) + f"|{meta.shape}|{meta.dtype}|{input_fingerprint(probabilities)}"
    sharded = step not in ("all", "prepare")
    if sharded and not _staging_matches(dest, fingerprint):
        raise OutputError(dest, "no matching staging store DEST.partial: run `unet-pipe postprocess --instances 3d"
                          " --step prepare` with the same input and options first")
    staged = StagedImage(
        dest, shape=meta.shape, dtype=np.uint32, chunks=meta.chunks, voxel_size=meta.voxel_size, kind="labels",
        resume=resume or sharded, fingerprint=fingerprint, overwrite=overwrite, ngff=ngff or DEFAULT_NGFF,
    )
    if step == "prepare":
        return dest
    read_p = _probability_reader(probabilities, prob, scale, np.dtype(meta.dtype))
    work = staged.staging / WORK_DIR
    done = (staged.is_done, staged.mark_done)
    bar = _progress_bar(progress, dest)
    tick = bar.update if bar is not None else None
    if method == "threshold":
        labelling = BlockLabelling("cells", meta.shape, chosen, lambda roi: read_p(roi) > threshold, staged.array,
                                   work / "cells", done, min_size)
        count, missing, broken = _threshold_steps(labelling, step, shard, workers, tick)
    else:
        count, missing, broken = _watershed_steps(
            staged, meta.shape, chosen, halo3, read_p, threshold, seed_threshold, work, step, shard, workers, tick
        )
    if bar is not None:
        bar.close()
    if step not in ("all", "finalize"):
        return dest
    if missing:
        raise OutputError(dest, f"{len(missing)} blocks are not written yet; run the missing shards first")
    _publish(staged, probabilities, params, pyramid_levels, count, chosen, broken)
    return dest


def _check_method(method: str, step: str, min_size: int) -> None:
    if method not in ("threshold", "watershed"):
        raise ValueError(f"method must be 'threshold' or 'watershed', got {method!r}")
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if method == "watershed" and min_size > 0:
        raise ConfigError(None, "min_size is not supported by the 3D watershed yet; use 0 or method threshold")


def _threshold_steps(labelling: BlockLabelling, step: str, shard: tuple[int, int] | None, workers: int,
                     tick: Callable[[int], Any] | None) -> tuple[int | None, list, None]:
    """The threshold method's ``step``: (instances, blocks not written, None: no halo rule)."""
    final_steps = {"all": ("faces", "merge", "write"), "faces": ("faces",), "merge": ("merge",),
                   "write": ("write",), "flood": (), "finalize": ()}[step]
    labelling.run(workers, shard, tick, final_steps)
    count = labelling.merge().count if step in ("all", "finalize") else None
    missing = labelling.missing("write")
    broken = None
    return count, missing, broken


def _publish(staged: StagedImage, probabilities: Path, params: dict, pyramid_levels: int, count: int,
             chosen: tuple[int, ...], broken: int | None) -> None:
    """Publish ``DEST`` from its finished staging store, with its instance count and provenance."""
    remove_work(staged.staging)
    extra = {"instances": int(count), "instances_mode": "3d", "block": list(chosen)}
    if broken is not None:
        extra["halo_rule_broken_blocks"] = int(broken)
    staged.commit(pyramid_levels, provenance=provenance({"probabilities": probabilities}, params), extra_attrs=extra)
    log.info("wrote %s: %d 3D instances", staged.dest, count)


def _staging_matches(dest: Path, fingerprint: str) -> bool:

    try:
        group = zarr.open_group(str(dest.with_name(dest.name + ".partial")), mode="r")
        return group.attrs.get(ATTRS_KEY, {}).get("staging", {}).get("fingerprint") == fingerprint
    except Exception:  # absent or unreadable: not ours
        return False


def _progress_bar(enabled: bool, dest: Path) -> Any:
    if not enabled:
        return None
    return progress_bar(unit="vox", unit_scale=True, desc=f"instances 3d {dest.name}")


def _watershed_steps(
    staged: Any, shape: Sequence[int], block: Sequence[int], halo: Sequence[int], read_p: Reader,
    threshold: float, seed_threshold: float, work: Path, step: str, shard: tuple[int, int] | None,
    workers: int, bar: Any,
) -> tuple[int | None, list[int], int | None]:
    """Seeds and cells labelled over the volume, then each block flooded in its halo window.

    Steps: ``faces`` and ``merge`` of both labellings; ``write`` writes both (and
    which cells hold a seed, per block); ``flood`` floods the blocks once every
    write is done.  Returns (instances, blocks not flooded, blocks breaking the halo rule).
    """
    seeds_arr, cells_arr = _intermediate(staged, "seeds"), _intermediate(staged, "cells")
    done = (staged.is_done, staged.mark_done)
    seeds = BlockLabelling("seeds", shape, block, lambda roi: read_p(roi) > seed_threshold, seeds_arr,
                           work / "seeds", done)
    cells = BlockLabelling("cells", shape, block, lambda roi: read_p(roi) > threshold, cells_arr, work / "cells", done)
    (work / "seeded").mkdir(parents=True, exist_ok=True)
    mine = shard_blocks(list(range(len(seeds.blocks))), shard)

    def faces(b: int) -> int:
        return seeds.faces(b) + cells.faces(b)

    def write(b: int) -> int:
        key = f"seeded:{seeds.blocks[b].key()}"
        if staged.is_done(key):
            return 0
        s = seeds.labels(b)
        c = cells.labels(b)
        seeds.target[seeds.blocks[b].slices()] = s
        cells.target[cells.blocks[b].slices()] = c
        np.save(work / "seeded" / f"{b}.npy", np.unique(c[s > 0]).astype(np.int64))
        staged.mark_done(key)
        return seeds.blocks[b].size

    if step in ("all", "faces"):
        run_parallel(faces, mine, workers, bar)
    if step in ("all", "merge"):
        seeds.merge(), cells.merge()
    if step in ("all", "write"):
        seeds.merge(), cells.merge()
        run_parallel(write, mine, workers, bar)
    flood_key = lambda b: f"flood:{seeds.blocks[b].key()}"  # noqa: E731
    if step == "finalize":
        missing = [b for b in range(len(seeds.blocks)) if not staged.is_done(flood_key(b))]
        total = seeds.merge().count + cells.merge().count - int(np.load(work / "seeded.npy").size)
        return total, missing, None
    if step not in ("all", "flood"):
        return None, [], None
    _require_written(staged, seeds.blocks)
    n_seeds = seeds.merge().count
    seeded = _seeded_cells(work, len(seeds.blocks))

    def unseeded_rank(ids: np.ndarray) -> np.ndarray:
        # Rank of a cell id among the cells without a seed: id minus the seeded ids up to it.
        return ids.astype(np.int64) - np.searchsorted(seeded, ids, side="right")

    broken: list[bool] = []

    def flood(b: int) -> int:
        roi = seeds.blocks[b]
        if staged.is_done(flood_key(b)):
            return 0
        win = _window(roi, halo, shape)
        p = read_p(win)
        mask = p > threshold
        out = flood_window(p, mask, seeds_arr[win.slices()].astype(np.int32), cells_arr[win.slices()], n_seeds,
                           unseeded_rank)
        staged.array[roi.slices()] = out[roi.slices(win.start)]
        broken.append(_window_cuts_mask(mask, win, roi, shape))
        staged.mark_done(flood_key(b))
        return roi.size

    run_parallel(flood, mine, workers, bar)
    if any(broken):
        log.warning("the halo rule does not hold in %d of %d blocks (a mask component reaches the window's edge): "
                    "ids there may differ from the whole-volume watershed; raise --halo", sum(broken), len(broken))
    missing = [b for b in range(len(seeds.blocks)) if not staged.is_done(flood_key(b))]
    total = n_seeds + int(cells.merge().count) - int(seeded.size)
    return total, missing, sum(broken)


def _require_written(staged: Any, blocks: Sequence[Roi]) -> None:
    """Refuse to flood before every block's seeds and cells are written (a sharded run's order)."""
    unwritten = [b for b in range(len(blocks)) if not staged.is_done(f"seeded:{blocks[b].key()}")]
    if unwritten:
        raise OutputError(staged.dest, f"{len(unwritten)} blocks of seeds and cells are not written yet (first: "
                          f"{blocks[unwritten[0]].key()}); run the write step first")


def _seeded_cells(work: Path, n_blocks: int) -> np.ndarray:
    """The sorted ids of the cells that hold a seed, gathered once from the blocks' records."""
    seeded_file = work / "seeded.npy"
    if not seeded_file.exists():
        seeded = np.unique(np.concatenate(
            [np.load(work / "seeded" / f"{b}.npy") for b in range(n_blocks)] + [np.zeros(1, np.int64)]
        ))[1:]
        tmp = work / "seeded.tmp.npy"
        np.save(tmp, seeded)
        os.replace(tmp, seeded_file)
    return np.load(seeded_file)


def _window_cuts_mask(mask: np.ndarray, win: Roi, roi: Roi, shape: Sequence[int]) -> bool:
    """Whether the halo rule fails for block ``roi``: a mask component that reaches into the
    block also reaches a face of the window ``win`` that lies inside the volume (it may go on beyond)."""
    labels, _ = label_block(mask)
    cut = []
    for axis in range(3):
        if win.start[axis] > 0:
            cut.append(np.take(labels, 0, axis=axis).ravel())
        if win.stop[axis] < shape[axis]:
            cut.append(np.take(labels, labels.shape[axis] - 1, axis=axis).ravel())
    if not cut:
        return False
    cut_ids = np.unique(np.concatenate(cut))
    cut_ids = cut_ids[cut_ids > 0]
    return bool(cut_ids.size) and bool(np.isin(labels[roi.slices(win.start)], cut_ids).any())
