"""Postprocessing: exact instances on tiny slices, OME-Zarr output, determinism, resume."""
from __future__ import annotations

import json

import numpy as np
import zarr
import pytest
import scipy.ndimage as ndi

import unet_pipe.postprocess as pp
from unet_pipe.errors import InputError, OutputError
from unet_pipe.io import StagedImage, image_metadata, open_image
from unet_pipe.metrics import instances_from_binary, rand_error
from unet_pipe.postprocess import (
    instances_from_probabilities,
    instances_from_stack,
    postprocess,
    relabel_raster_order,
)
from unet_pipe.probabilities import as_probability, probability_scale
from unet_pipe.synth import synthesize


def _write_probabilities(path, prob, *, chunks=(1, 16, 16), scale_attr=None):
    staged = StagedImage(path, shape=prob.shape, dtype=prob.dtype, chunks=chunks, voxel_size=(0.05, 0.004, 0.004))
    staged.array[:] = prob
    extra = {} if scale_attr is None else {"probability_scale": scale_attr}
    staged.commit(pyramid_levels=1, extra_attrs=extra)
    return path


def _two_cells(bridge: float, rows: slice = slice(2, 11)) -> np.ndarray:
    """Two confident 9x9 cells (p = 0.99) in columns 2-10 and 12-20; column 11,
    rows ``rows``, holds the membrane between them with probability ``bridge``."""
    p = np.full((13, 23), 0.01, np.float32)
    p[2:11, 2:11] = 0.99
    p[2:11, 12:21] = 0.99
    p[rows, 11] = bridge
    return p


def _expected_two_cells(out: np.ndarray, p: np.ndarray) -> np.ndarray:
    expected = np.zeros(p.shape, np.uint32)
    expected[2:11, 2:11] = 1
    expected[2:11, 12:21] = 2
    bridge = (p > 0.5) & (expected == 0)
    assert set(np.unique(out[bridge])) <= {1, 2}  # membrane pixels above threshold: either side
    expected[bridge] = out[bridge]
    return expected


# ---------------------------------------------------------------- one slice
def test_threshold_gives_4_connected_components_in_raster_order():
    p = np.array(
        [
            [0.9, 0.9, 0.1, 0.8],
            [0.9, 0.5, 0.1, 0.8],  # 0.5 is not > 0.5: membrane
            [0.1, 0.1, 0.7, 0.1],  # (2,2) touches (1,3)? no: diagonal only -> own cell
            [0.7, 0.2, 0.1, 0.95],
        ],
        np.float32,
    )
    expected = np.array([[1, 1, 0, 2], [1, 0, 0, 2], [0, 0, 3, 0], [4, 0, 0, 5]], np.uint32)
    out = instances_from_probabilities(p, "threshold", 0.5)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, expected)


def test_watershed_splits_cells_joined_by_a_weak_membrane():
    # The membrane column has p = 0.7: above the threshold (one component for
    # 'threshold'), below the seed threshold (two confident regions -> two seeds).
    p = _two_cells(0.7)
    np.testing.assert_array_equal(np.unique(instances_from_probabilities(p, "threshold")), [0, 1])
    out = instances_from_probabilities(p, "watershed", 0.5, seed_threshold=0.9)
    np.testing.assert_array_equal(out, _expected_two_cells(out, p))


def test_watershed_splits_at_a_neck_where_the_membrane_is_missing():
    # Rows 5-7 of the membrane column look like cell (p = 0.99): a 3 px neck.
    # Distance maxima: 5 px in each cell, ~2 px in the neck -> prominence 3 > 2.
    p = _two_cells(0.99, rows=slice(5, 8))
    out = instances_from_probabilities(p, "watershed", seed_prominence=2.0)
    np.testing.assert_array_equal(out, _expected_two_cells(out, p))
    # A prominence above the neck's depth merges them back into one cell.
    assert instances_from_probabilities(p, "watershed", seed_prominence=4.0).max() == 1


def test_watershed_keeps_components_without_a_confident_seed():
    p = _two_cells(0.01)
    p[2:11, 12:21] = 0.7  # right cell below the seed threshold: still a cell
    p[0, 0] = 0.6  # a 1-px cell: no seed either
    out = instances_from_probabilities(p, "watershed", 0.5, seed_threshold=0.9)
    np.testing.assert_array_equal(out, instances_from_probabilities(p, "threshold", 0.5))
    assert out.max() == 3


def test_watershed_is_not_fragmented_by_noise_inside_cells():
    rng = np.random.default_rng(0)
    p = _two_cells(0.01) + rng.normal(0, 0.03, (13, 23)).astype(np.float32)
    p = np.clip(p, 0, 1)
    out = instances_from_probabilities(p, "watershed")
    np.testing.assert_array_equal(out, instances_from_probabilities(p, "threshold"))
    assert out.max() == 2


def test_min_size_turns_small_segments_into_membrane():
    p = np.zeros((4, 6), np.float32)
    p[0, 0] = 0.9  # 1 px
    p[2:4, 2:6] = 0.9  # 8 px
    out = instances_from_probabilities(p, min_size=2)
    expected = np.zeros((4, 6), np.uint32)
    expected[2:4, 2:6] = 1
    np.testing.assert_array_equal(out, expected)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="method"):
        instances_from_probabilities(np.zeros((2, 2)), "magic")
    with pytest.raises(ValueError, match="seed_threshold"):
        instances_from_probabilities(_two_cells(0.7), "watershed", 0.5, seed_threshold=0.4)
    with pytest.raises(ValueError, match="seed_prominence"):
        instances_from_probabilities(_two_cells(0.7), "watershed", seed_prominence=0)
    with pytest.raises(ValueError, match="2D"):
        instances_from_probabilities(np.zeros((2, 2, 2)))


def test_relabel_raster_order():
    np.testing.assert_array_equal(relabel_raster_order(np.array([[5, 0, 3], [9, 5, 0]])), [[1, 0, 2], [3, 1, 0]])


def test_stack_ids_are_unique_across_slices():
    p = _two_cells(0.7)
    out = instances_from_stack(np.stack([p, np.zeros_like(p), p]), "watershed")
    np.testing.assert_array_equal(np.unique(out[0]), [0, 1, 2])
    assert not out[1].any()
    np.testing.assert_array_equal(out[2], np.where(out[0] > 0, out[0] + 2, 0))


def test_probability_scale_from_attrs_or_dtype():
    # p = stored * scale, the convention of unet_pipe.predict (uint8: round(255 p), scale 1/255).
    assert probability_scale({}, np.dtype(np.uint8)) == 1 / 255
    assert probability_scale({}, np.dtype(np.float16)) == 1.0
    assert probability_scale({"unet_pipe": {"probability_scale": 0.01}}, np.dtype(np.uint8)) == 0.01
    assert probability_scale({"unet_pipe.probability_scale": 0.5}, np.dtype(np.uint8)) == 0.5
    with pytest.raises(ValueError, match="probability scale"):
        probability_scale({}, np.dtype(np.int32))
    np.testing.assert_allclose(as_probability(np.array([0, 51, 255], np.uint8), 1 / 255), [0, 0.2, 1.0], rtol=1e-6)


# ---------------------------------------------------------------- OME-Zarr
def test_postprocess_writes_uint32_labels_like_the_input(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.random((3, 20, 24)).astype(np.float32)
    prob_u8 = np.round(prob * 255).astype(np.uint8)
    # Written as unet_pipe.predict does: round(255 p) with probability_scale = 1/255.
    src = _write_probabilities(tmp_path / "prob.ome.zarr", prob_u8, chunks=(2, 16, 16), scale_attr=1 / 255)
    dest = postprocess(src, tmp_path / "inst.ome.zarr", method="threshold", threshold=0.5, pyramid_levels=1)
    out = open_image(dest)[:]
    expected = instances_from_stack(as_probability(prob_u8, 1 / 255), "threshold", 0.5)
    np.testing.assert_array_equal(out, expected)
    meta = image_metadata(dest)
    assert meta.dtype == np.uint32 and meta.chunks == (2, 16, 16)
    assert meta.voxel_size == pytest.approx((0.05, 0.004, 0.004))
    assert "image-label" in meta.attrs
    own = meta.attrs["unet_pipe"]
    assert own["kind"] == "labels" and own["instances"] == int(out.max())
    assert own["provenance"]["params"]["method"] == "threshold"
    # Deterministic and not silently overwritten.
    with pytest.raises(OutputError):
        postprocess(src, dest)
    again = postprocess(src, tmp_path / "again.ome.zarr", method="threshold", threshold=0.5)
    np.testing.assert_array_equal(open_image(again)[:], out)


@pytest.mark.parametrize("first_levels", [2, 0], ids=["same-levels", "killed-run-without-levels"])
def test_postprocess_resumes_with_identical_ids(tmp_path, monkeypatch, first_levels):
    monkeypatch.setattr(pp, "slab_depth", lambda chunk, *_: chunk)  # one z-chunk per read: a kill per slab
    stack = synthesize((4, 64, 64), seed=1)
    prob = (stack.labels / 255.0).astype(np.float32)
    src = _write_probabilities(tmp_path / "prob.ome.zarr", prob, chunks=(1, 32, 32))
    reference = open_image(postprocess(src, tmp_path / "ref.ome.zarr", method="watershed"))[:]

    calls = []
    real = pp._label_stack

    def failing(slab, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while writing the third slab
        return real(slab, *args, **kwargs)

    monkeypatch.setattr(pp, "_label_stack", failing)
    with pytest.raises(KeyboardInterrupt):
        postprocess(src, tmp_path / "inst.ome.zarr", method="watershed", pyramid_levels=first_levels)
    assert (tmp_path / "inst.ome.zarr.partial").is_dir()
    calls.clear()
    monkeypatch.setattr(pp, "_label_stack", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    counted = []
    postprocess(src, tmp_path / "inst.ome.zarr", method="watershed", object_sizes=counted.append)
    assert len(calls) == 2  # slabs 0 and 1 were skipped
    assert counted == []  # sizes are only handed on when every slice was labelled in this call
    # Every pyramid level too: the levels are written with each slab, so the resumed run keeps the
    # killed run's levels, or (killed run without levels) rebuilds them from level 0 at commit.
    ref_group, got_group = zarr.open_group(tmp_path / "ref.ome.zarr", mode="r"), zarr.open_group(
        tmp_path / "inst.ome.zarr", mode="r")
    assert sorted(got_group.array_keys()) == sorted(ref_group.array_keys()) == ["0", "1", "2"]
    for level in ref_group.array_keys():
        np.testing.assert_array_equal(got_group[level][:], ref_group[level][:])
    np.testing.assert_array_equal(open_image(tmp_path / "inst.ome.zarr")[:], reference)


def test_perfect_probabilities_reproduce_the_synthetic_truth(tmp_path):
    stack = synthesize((2, 96, 96), seed=0)
    prob = (stack.labels / 255.0).astype(np.float32)
    src = _write_probabilities(tmp_path / "prob.ome.zarr", prob, chunks=(1, 96, 96))
    out = open_image(postprocess(src, tmp_path / "inst.ome.zarr"))[:]
    truth = instances_from_binary(stack.labels)
    np.testing.assert_array_equal(out, truth)
    assert rand_error(out, truth) == 0.0


def test_missing_or_unscalable_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        postprocess(tmp_path / "nope.ome.zarr", tmp_path / "inst.ome.zarr")
    src = _write_probabilities(tmp_path / "p.ome.zarr", np.zeros((1, 8, 8), np.int32), chunks=(1, 8, 8))
    with pytest.raises(InputError, match="probability scale"):
        postprocess(src, tmp_path / "inst.ome.zarr")


def test_watershed_repairs_membrane_gaps_on_synthetic_data():
    # Perfect probabilities except short gaps punched into the membranes (the
    # U-Net's typical failure): thresholding merges cells through the gaps, the
    # watershed splits them at the necks again.
    stack = synthesize((1, 128, 128), seed=2)
    truth = instances_from_binary(stack.labels)
    p = stack.labels / 255.0
    rng = np.random.default_rng(0)
    gaps = ndi.binary_dilation((p == 0) & (rng.random(p.shape) < 0.02), iterations=2) & (p == 0)
    p = np.where(gaps, 0.95, p).astype(np.float32)
    thr = rand_error(instances_from_stack(p, "threshold"), truth)
    ws = rand_error(instances_from_stack(p, "watershed"), truth)
    assert thr > 0.3
    assert ws < 0.05


@pytest.mark.parametrize("min_size", [0, 1, 5, 40])
def test_threshold_fast_path_equals_the_canonical_relabelling(min_size):
    """Connected components are numbered by a lookup (no sort): the same ids as relabelling the
    components in raster order after dropping the small ones."""
    import scipy.ndimage as ndi

    from unet_pipe.postprocess import _FOUR_CONNECTED, relabel_raster_order

    for seed in range(8):
        p = ndi.gaussian_filter(np.random.default_rng(seed).random((67, 91)), 1.5)
        p = (p - p.min()) / (p.max() - p.min())
        labels, _ = ndi.label(p > 0.5, structure=_FOUR_CONNECTED)
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
        expected = relabel_raster_order(labels)
        got = instances_from_probabilities(p, "threshold", 0.5, min_size=min_size)
        assert got.dtype == np.uint32 and expected.max() >= 1
        np.testing.assert_array_equal(got, expected)


def test_slabs_are_read_in_runs_with_done_records_per_chunk(tmp_path, monkeypatch):
    """Runs of z-chunks per zarr call (SLAB_VOXELS) give the ids of one chunk per call; finished slabs
    (done records per chunk) are never recomputed, and runs never mix done and pending slabs."""
    class Staged:
        def __init__(self, done):
            self.done = done

        def is_done(self, key):
            return key in self.done

    assert pp._todo_runs(Staged(set()), 7, 2, 4) == [(0, 4, False), (4, 7, False)]
    assert pp._todo_runs(Staged({"z2-4"}), 7, 2, 6) == [(0, 2, False), (2, 4, True), (4, 7, False)]
    assert pp._todo_runs(Staged({"z0-1", "z1-2"}), 3, 1, 8) == [(0, 2, True), (2, 3, False)]
    stack = synthesize((5, 64, 64), seed=2)
    src = _write_probabilities(tmp_path / "prob.ome.zarr", (stack.labels / 255.0).astype(np.float32),
                               chunks=(1, 32, 32))
    batched = open_image(postprocess(src, tmp_path / "runs.ome.zarr", method="watershed"))[:]
    monkeypatch.setattr(pp, "slab_depth", lambda chunk, *_: chunk)
    single = open_image(postprocess(src, tmp_path / "single.ome.zarr", method="watershed"))[:]
    np.testing.assert_array_equal(batched, single)
    assert batched.max() > 5


@pytest.mark.parametrize("method,min_size", [("threshold", 0), ("threshold", 30), ("watershed", 0), ("watershed", 30)])
def test_sizes_counted_while_labelling_equal_the_store_read_back(tmp_path, method, min_size):
    """``object_sizes`` gets the pixels of every id as the summary counts them from the written store,
    so segment's summary need not read the instances back; the summary is the same either way."""
    from unet_pipe.summary import object_sizes, summarize

    stack = synthesize((5, 96, 96), seed=3)
    prob = (ndi.gaussian_filter(stack.labels / 255.0, 1.5)).astype(np.float32)
    prob[2] = 0.0  # an empty slice between the others
    src = _write_probabilities(tmp_path / "prob.ome.zarr", prob, chunks=(2, 48, 48))
    counted = []
    dest = postprocess(src, tmp_path / "inst.ome.zarr", method=method, min_size=min_size,
                       object_sizes=counted.append)
    assert len(counted) == 1
    stored = object_sizes(open_image(dest))
    assert stored.size > 10
    np.testing.assert_array_equal(counted[0][counted[0] > 0], stored)
    assert counted[0].size == int(open_image(dest)[:].max())  # one entry per id, in id order
    raw = _write_probabilities(tmp_path / "raw.ome.zarr", prob, chunks=(2, 48, 48))
    read_back = summarize(raw, src, dest)
    given = summarize(raw, src, dest, sizes=counted[0])
    assert json.dumps(given, sort_keys=True) == json.dumps(read_back, sort_keys=True)
