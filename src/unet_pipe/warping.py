"""Warping error (Jain et al. 2010, CVPR, "Boundary learning by optimization with
topological constraints"), as the ISBI 2012 challenge computed it.

The truth's binary cell mask is *warped* towards the prediction's: a truth
pixel that disagrees with the prediction is flipped if it is a **simple
point**, i.e. flipping it changes no topology (no object or hole appears or
disappears, none splits or merges).  Flipping repeats until no disagreeing
pixel is simple.  The pixels still wrong are the prediction's topological
errors (splits, merges, added or missing objects and holes); the warping
error is their number over all pixels.  A prediction whose boundaries are only
shifted or thickened has warping error 0; its pixel error is not 0.

Conventions (those of the challenge's Fiji ``WarpingError``):

* cell = foreground with **4-connectivity**, membrane = background with
  **8-connectivity** (the pair a digital topology needs; cells are labelled
  4-connected everywhere in this package);
* the image is padded with one ring of membrane, so the border is membrane;
* the prediction's cell mask is ``p > threshold`` (strict), as everywhere here.

Fiji flips, in each sweep, the disagreeing pixels in order of the prediction's
confidence ``|p - threshold|``; we flip them in nine interleaved sub-lattices
(pixels 3 apart in y and x), all of one sub-lattice at once.  Flipping a
pixel only changes the simplicity of pixels in its 3 x 3 neighbourhood, so
pixels of one sub-lattice never affect each other: a parallel flip equals
some sequential order of simple-point flips and so preserves topology.  Both
are greedy warps in Jain's sense and end when no disagreeing simple point is
left; they can differ in which pixel of a topological error remains.  The
parallel form keeps the warping to a few numpy passes per slice.
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

__all__ = ["SIMPLE_POINT_TABLE", "neighbourhood_code", "is_simple", "warp_truth", "warping_error"]

# Bit k of a neighbourhood code is the k-th neighbour of the centre in this
# (dy, dx) order: row above left to right, left, right, row below.
_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1),
)
_FOUR = ndi.generate_binary_structure(2, 1)
_EIGHT = ndi.generate_binary_structure(2, 2)


def _patch(code: int) -> np.ndarray:
    patch = np.zeros((3, 3), dtype=bool)
    for k, (dy, dx) in enumerate(_OFFSETS):
        patch[1 + dy, 1 + dx] = bool(code >> k & 1)
    return patch


def _simple_from_patch(patch: np.ndarray) -> bool:
    """Bertrand & Malandain (1994) topological numbers of the centre of a 3 x 3 patch.

    The centre is simple for (foreground 4, background 8) iff T4 = 1 (exactly
    one 4-connected foreground component of the 8 neighbours touches the centre
    4-adjacently) and T8 = 1 (exactly one 8-connected background component among
    the 8 neighbours).  The centre's own value does not enter: the test is the
    same for removing a cell pixel and for adding one.
    """
    fg = patch.copy()
    fg[1, 1] = False
    fg_labels, _ = ndi.label(fg, structure=_FOUR)
    four_neighbours = fg_labels[[0, 1, 1, 2], [1, 0, 2, 1]]
    t4 = np.unique(four_neighbours[four_neighbours > 0]).size
    bg = ~patch
    bg[1, 1] = False
    _, t8 = ndi.label(bg, structure=_EIGHT)
    return t4 == 1 and t8 == 1


# Why a table of our own: scikit-image's thinning has simple-point tables inside
# but exposes none, and scipy has no topology test.  The table is built from the
# definition with scipy's labelling (256 patches, once at import) and checked
# against hand cases in tests/test_warping.py.
SIMPLE_POINT_TABLE: np.ndarray = np.array([_simple_from_patch(_patch(c)) for c in range(256)], dtype=bool)


def neighbourhood_code(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """8-bit codes of the neighbourhoods of pixels ``(ys, xs)`` of a 2D bool ``mask``
    (bit order as ``_OFFSETS``).  The pixels must not lie on the outer ring."""
    code = np.zeros(ys.shape, dtype=np.intp)
    for k, (dy, dx) in enumerate(_OFFSETS):
        code |= mask[ys + dy, xs + dx].astype(np.intp) << k
    return code


def is_simple(mask: np.ndarray, y: int, x: int) -> bool:
    """Whether flipping pixel ``(y, x)`` of a 2D bool cell ``mask`` preserves its
    topology (cells 4-connected, membrane 8-connected; outside the image = membrane)."""
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    code = neighbourhood_code(padded, np.array([y + 1]), np.array([x + 1]))
    return bool(SIMPLE_POINT_TABLE[code[0]])


def warp_truth(truth_cells: np.ndarray, pred_cells: np.ndarray) -> np.ndarray:
    """The truth cell mask warped towards ``pred_cells`` by simple-point flips.

    Both are 2D bool ``(y, x)``, True = cell.  Returns the warped mask (same
    topology as the truth, as close to the prediction as simple flips allow).
    """
    truth = np.asarray(truth_cells, dtype=bool)
    pred = np.asarray(pred_cells, dtype=bool)
    if truth.shape != pred.shape or truth.ndim != 2:
        raise ValueError(f"expected two 2D masks of one shape, got {truth.shape} and {pred.shape}")
    source = np.pad(truth, 1)  # the ring is membrane in both: never a mismatch
    target = np.pad(pred, 1)
    while True:
        ys, xs = np.nonzero(source != target)
        if ys.size == 0:
            break
        phase = (ys % 3) * 3 + (xs % 3)
        flipped = 0
        for p in range(9):
            sel = phase == p
            if not sel.any():
                continue
            py, px = ys[sel], xs[sel]
            simple = SIMPLE_POINT_TABLE[neighbourhood_code(source, py, px)]
            if simple.any():
                source[py[simple], px[simple]] = target[py[simple], px[simple]]
                flipped += int(simple.sum())
        if flipped == 0:  # no disagreeing pixel is simple: the warp is done
            break
    return source[1:-1, 1:-1]


def warping_error(pred_cells: np.ndarray, truth_cells: np.ndarray) -> float:
    """Warping error of one 2D slice: pixels where the warped truth still differs
    from the prediction, over all pixels (0 = no topological error)."""
    pred = np.asarray(pred_cells, dtype=bool)
    if pred.size == 0:
        raise ValueError("warping_error of an empty array")
    warped = warp_truth(truth_cells, pred)
    return float(np.count_nonzero(warped != pred)) / pred.size
