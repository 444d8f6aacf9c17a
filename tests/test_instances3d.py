"""3D instances block by block: equal to whole-volume scipy/skimage results, sparse merge, resume, shards, CLI."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

import unet_pipe.instances3d as i3d
from unet_pipe.errors import ConfigError, InputError
from unet_pipe.instances3d import (
    SIX_CONNECTED,
    choose_block,
    label_volume,
    merge_faces,
    same_partition,
    watershed_reference,
)
from unet_pipe.io import StagedImage, image_metadata, open_image
from unet_pipe.postprocess import postprocess


def _store(path, data, chunks, attrs=None):
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=chunks, voxel_size=(1.0, 1.0, 1.0))
    staged.array[:] = data
    staged.commit(pyramid_levels=0, extra_attrs=attrs or {})
    return path


def _blobs(shape, seed=0, sigma=1.5, level=0.55) -> np.ndarray:
    """Probabilities whose p > 0.5 region is many irregular 3D blobs of all sizes."""
    rng = np.random.default_rng(seed)
    p = ndi.gaussian_filter(rng.random(shape), sigma)
    p = (p - p.min()) / (p.max() - p.min())
    return np.clip(p + (0.5 - level), 0, 1).astype(np.float32)


def _snake(shape) -> np.ndarray:
    """One 1-voxel-wide object snaking through every block (rows along x on even z and y, joined at
    alternating ends, layers joined at a corner) and many single voxels beside it (p = 0.9 / 0.1)."""
    nz, ny, nx = shape
    mask = np.zeros(shape, bool)
    rows = list(range(0, ny - (ny + 1) % 2, 2))
    for iz, z in enumerate(range(0, nz - (nz + 1) % 2, 2)):
        mask[z, rows, :] = True
        for k, (y0, y1) in enumerate(zip(rows, rows[1:])):
            x = nx - 1 if (k % 2 == 0) else 0
            mask[z, y0:y1 + 1, x] = True
        if z + 2 < nz:
            mask[z : z + 3, rows[-1] if iz % 2 == 0 else 0, nx - 1 if len(rows) % 2 else 0] = True
    # singletons at odd z, odd y, away from the joins: each its own object
    mask[1::2, 1::2, 2:-2:3] = True
    return np.where(mask, 0.9, 0.1).astype(np.float32)


def _reference(p, threshold=0.5, min_size=0):
    ref, _ = ndi.label(p > threshold, structure=SIX_CONNECTED)
    if min_size:
        sizes = np.bincount(ref.ravel())
        small = sizes < min_size
        small[0] = False
        ref[small[ref]] = 0
    return ref


def _consecutive(labels) -> bool:
    ids = np.unique(labels)
    return np.array_equal(ids, np.arange(ids[-1] + 1)) if ids[0] == 0 else np.array_equal(ids, np.arange(1, ids[-1] + 1))


# ----------------------------------------------------------------- tiny exact case
def test_tiny_volume_has_the_expected_ids_across_block_faces(tmp_path):
    # 2 x 2 x 4 volume, chunks and blocks 1 x 1 x 2: every object crosses a face.
    p = np.array([[[0.9, 0.9, 0.1, 0.9],
                   [0.1, 0.1, 0.1, 0.9]],
                  [[0.9, 0.1, 0.1, 0.1],
                   [0.9, 0.9, 0.9, 0.9]]], np.float32)
    prob = _store(tmp_path / "p.ome.zarr", p, (1, 1, 2))
    out = label_volume(prob, tmp_path / "i.ome.zarr", block=(1, 1, 2))
    # Objects: {(0,0,0),(0,0,1),(1,0,0),(1,1,0..3),(0,1,3),(0,0,3)} is one: (0,0,3)-(0,1,3)-(1,1,3).
    expected = np.array([[[1, 1, 0, 1],
                          [0, 0, 0, 1]],
                         [[1, 0, 0, 0],
                          [1, 1, 1, 1]]], np.uint32)
    np.testing.assert_array_equal(open_image(out)[:], expected)
    assert open_image(out).dtype == np.uint32


def test_two_objects_joined_only_in_a_far_block_are_one(tmp_path):
    # A U: two columns along z in different x blocks, joined only by the last slice.
    p = np.full((8, 1, 8), 0.1, np.float32)
    p[:, 0, 0] = p[:, 0, 7] = 0.9
    p[7, 0, :] = 0.9
    p[0, 0, 3] = 0.9  # alone
    prob = _store(tmp_path / "p.ome.zarr", p, (2, 1, 2))
    got = open_image(label_volume(prob, tmp_path / "i.ome.zarr", block=(2, 1, 2)))[:]
    assert got[0, 0, 0] == got[0, 0, 7] == got[7, 0, 4] == 1  # first block, first object
    assert got[0, 0, 3] == 2
    assert got.max() == 2


# ----------------------------------------------------------------- the table
CASES = [
    # (volume, shape, chunks, block)
    ("blobs", (24, 30, 36), (8, 10, 12), (8, 10, 12)),
    ("blobs", (24, 30, 36), (8, 10, 12), (16, 20, 12)),
    ("blobs", (23, 31, 29), (4, 8, 8), (8, 8, 16)),  # edge blocks clipped on every axis
    ("blobs", (24, 30, 36), (8, 10, 12), (24, 30, 36)),  # one block
    ("blobs", (5, 64, 64), (1, 64, 64), (1, 64, 64)),  # slice-thin blocks, as EM stacks are chunked
    ("snake", (9, 11, 13), (3, 3, 3), (3, 3, 3)),
    ("snake", (9, 11, 13), (1, 2, 2), (2, 4, 2)),
    ("snake", (16, 16, 16), (4, 4, 4), (4, 8, 4)),
]


@pytest.mark.parametrize("kind, shape, chunks, block", CASES)
def test_equals_whole_volume_label(tmp_path, kind, shape, chunks, block):
    p = _blobs(shape) if kind == "blobs" else _snake(shape)
    prob = _store(tmp_path / "p.ome.zarr", p, chunks)
    got = open_image(label_volume(prob, tmp_path / "i.ome.zarr", block=block))[:]
    ref = _reference(p)
    assert ref.max() > (1 if kind == "blobs" else 10)  # the case has many objects
    assert same_partition(got, ref)
    assert got.max() == ref.max() and _consecutive(got)
    if kind == "snake":
        assert np.unique(got[p > 0.5][:1]).size == 1
        assert (got == got[0, 0, 0]).sum() == (ref == ref[0, 0, 0]).sum() > 3 * max(shape)  # the snake is one


def test_the_snake_crosses_many_blocks():
    p = _snake((16, 16, 16))
    ref = _reference(p)
    snake = ref == ref[0, 0, 0]
    blocks = {(z // 4, y // 8, x // 4) for z, y, x in zip(*np.nonzero(snake))}
    assert len(blocks) == 4 * 2 * 4  # every block of the (4, 8, 4) grid


@pytest.mark.parametrize("block", [(8, 10, 12), (16, 20, 24)])
def test_min_size_in_voxels_equals_whole_volume(tmp_path, block):
    p = _blobs((24, 30, 36), seed=3)
    prob = _store(tmp_path / "p.ome.zarr", p, (8, 10, 12))
    got = open_image(label_volume(prob, tmp_path / "i.ome.zarr", block=block, min_size=40))[:]
    ref = _reference(p, min_size=40)
    assert np.unique(ref).size > 3 and (np.bincount(_reference(p).ravel())[1:] < 40).any()
    assert same_partition(got, ref) and _consecutive(got)


def test_worker_count_does_not_change_the_result(tmp_path):
    p = _blobs((24, 30, 36), seed=1)
    prob = _store(tmp_path / "p.ome.zarr", p, (8, 10, 12))
    one = open_image(label_volume(prob, tmp_path / "a.ome.zarr", block=(8, 10, 12), workers=1))[:]
    three = open_image(label_volume(prob, tmp_path / "b.ome.zarr", block=(8, 10, 12), workers=3))[:]
    np.testing.assert_array_equal(one, three)


def test_uint8_probabilities_and_postprocess_entry(tmp_path):
    p = _blobs((16, 20, 24), seed=2)
    stored = np.rint(p * 255).astype(np.uint8)
    prob = _store(tmp_path / "p.ome.zarr", stored, (8, 10, 12))
    out = postprocess(prob, tmp_path / "i.ome.zarr", instances="3d", threshold=0.5, block=(8, 10, 12), pyramid_levels=1)
    got = open_image(out)[:]
    assert same_partition(got, _reference(stored.astype(np.float32) / 255.0))
    meta = image_metadata(out)
    assert meta.attrs["unet_pipe"]["instances"] == got.max()
    assert meta.attrs["unet_pipe"]["instances_mode"] == "3d"
    assert not (tmp_path / "i.ome.zarr" / i3d.WORK_DIR).exists()  # intermediate records removed


# ----------------------------------------------------------------- the merge is sparse
def test_merge_holds_only_face_objects_never_a_table_of_the_largest_id():
    # Two blocks along x with 2**31 objects each (ids far beyond memory if tables were dense);
    # one pair touches across the face.
    lo = np.zeros((1, 1), np.int32)
    planes = {0: {"count": 2**31, "hi2": np.array([[2**31 - 7]]), "lo2": lo, "hi0": lo, "lo0": lo, "hi1": lo, "lo1": lo},
              1: {"count": 2**31 - 5, "lo2": np.array([[3]]), "hi2": lo, "hi0": lo, "lo0": lo, "hi1": lo, "lo1": lo}}
    merge = merge_faces((1, 1, 2), lambda b, key: planes[b][key])
    assert merge.nodes.tolist() == [2**31 - 7, 2**31 + 3]
    assert merge.dropped.tolist() == [2**31 + 3]
    assert merge.node_final.tolist() == [2**31 - 7, 2**31 - 7]
    assert merge.count == 2**32 - 6
    # block 1, local ids 1..4: pre-ids 2**31 + 1..4, the third merged into block 0's object
    lut = merge.lookup(1, 4)
    assert lut.tolist() == [0, 2**31 + 1, 2**31 + 2, 2**31 - 7, 2**31 + 3]


def test_merge_keeps_only_objects_on_faces(tmp_path):
    p = _blobs((24, 30, 36), seed=4, level=0.7)
    done: set[str] = set()
    labelling = i3d.BlockLabelling(
        "cells", p.shape, (12, 15, 18), lambda roi: p[roi.slices()] > 0.5, np.zeros(p.shape, np.uint32),
        tmp_path / "work", (done.__contains__, done.add),
    )
    labelling.run()
    on_faces = 0
    for roi in labelling.blocks:
        labels, _ = ndi.label(p[roi.slices()] > 0.5, structure=SIX_CONNECTED)
        inner = np.zeros(np.array(labels.shape) + 2, bool)
        inner[1:-1, 1:-1, 1:-1] = True
        shell = np.pad(labels, 1)[ndi.binary_dilation(~inner) & inner]
        on_faces += np.unique(shell[shell > 0]).size
    merge = labelling.merge()
    assert 0 < merge.nodes.size <= on_faces < sum(int(np.load(f)["count"]) for f in (tmp_path / "work" / "faces").iterdir())
    assert same_partition(labelling.target, _reference(p))


# ----------------------------------------------------------------- resume and shards
def test_resume_after_a_kill_redoes_only_unfinished_blocks(tmp_path, monkeypatch):
    p = _blobs((24, 30, 36), seed=5)
    prob = _store(tmp_path / "p.ome.zarr", p, (8, 10, 12))
    dest = tmp_path / "i.ome.zarr"
    calls = {"n": 0}
    original = i3d.BlockLabelling.write

    def dies_after_five(self, b):
        if calls["n"] == 5:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, b)

    monkeypatch.setattr(i3d.BlockLabelling, "write", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        label_volume(prob, dest, block=(8, 10, 12))
    assert (tmp_path / "i.ome.zarr.partial").is_dir() and not dest.exists()
    monkeypatch.setattr(i3d.BlockLabelling, "write", original)
    labelled = []
    real_label = i3d.label_block
    monkeypatch.setattr(i3d, "label_block", lambda mask: labelled.append(1) or real_label(mask))
    got = open_image(label_volume(prob, dest, block=(8, 10, 12)))[:]
    assert len(labelled) == 27 - 5  # faces and merge done before: only the unwritten blocks are labelled again
    np.testing.assert_array_equal(got, open_image(label_volume(prob, tmp_path / "j.ome.zarr", block=(8, 10, 12)))[:])


def test_sharded_steps_equal_one_run(tmp_path):
    p = _blobs((24, 30, 36), seed=6)
    prob = _store(tmp_path / "p.ome.zarr", p, (8, 10, 12))
    dest = tmp_path / "i.ome.zarr"
    opts = {"block": (8, 10, 12)}
    with pytest.raises(Exception, match="run `unet-pipe postprocess --instances 3d --step prepare`"):
        label_volume(prob, dest, step="faces", shard=(0, 2), **opts)
    label_volume(prob, dest, step="prepare", **opts)
    for step in ("faces", "merge", "write"):
        shards = [(0, 2), (1, 2)] if step != "merge" else [None]
        for shard in shards:
            label_volume(prob, dest, step=step, shard=shard, **opts)
        assert not dest.exists()
    label_volume(prob, dest, step="finalize", **opts)
    np.testing.assert_array_equal(open_image(dest)[:], open_image(label_volume(prob, tmp_path / "j.ome.zarr", **opts))[:])


def test_finalize_refuses_unwritten_blocks(tmp_path):
    p = _blobs((16, 20, 24), seed=6)
    prob = _store(tmp_path / "p.ome.zarr", p, (8, 10, 12))
    dest = tmp_path / "i.ome.zarr"
    for step, shard in (("prepare", None), ("faces", None), ("merge", None), ("write", (0, 2))):
        label_volume(prob, dest, step=step, shard=shard, block=(8, 10, 12))
    with pytest.raises(Exception, match="4 blocks are not written yet"):
        label_volume(prob, dest, step="finalize", block=(8, 10, 12))


# ----------------------------------------------------------------- watershed
@pytest.mark.parametrize("block", [(8, 10, 12), (16, 20, 12), (24, 30, 36)])
def test_watershed_equals_whole_volume_within_the_halo_rule(tmp_path, block):
    # 46 cells of at most 24 voxels across: a halo of 24 holds every cell that touches a block.
    p = _blobs((24, 30, 36), seed=7, level=0.75)
    prob = _store(tmp_path / "p.ome.zarr", p, (8, 10, 12))
    cells, _ = ndi.label(p > 0.4, structure=SIX_CONNECTED)
    extent = max(max(s.stop - s.start for s in sl) for sl in ndi.find_objects(cells))
    assert extent <= 24
    got_path = label_volume(prob, tmp_path / "i.ome.zarr", method="watershed", threshold=0.4, seed_threshold=0.5,
                            block=block, halo=24)
    got = open_image(got_path)[:]
    ref = watershed_reference(p, 0.4, 0.5)
    assert ref.max() > cells.max()  # the watershed split some cells
    assert same_partition(got, ref) and _consecutive(got)
    assert image_metadata(got_path).attrs["unet_pipe"]["halo_rule_broken_blocks"] == 0


def test_watershed_beyond_the_halo_rule_still_labels_every_cell_voxel(tmp_path):
    p = _blobs((24, 30, 36), seed=8, sigma=3.0, level=0.5)  # large cells, halo 1
    prob = _store(tmp_path / "p.ome.zarr", p, (8, 10, 12))
    out = label_volume(prob, tmp_path / "i.ome.zarr", method="watershed", threshold=0.5, seed_threshold=0.7,
                       block=(8, 10, 12), halo=1)
    got = open_image(out)[:]
    np.testing.assert_array_equal(got > 0, p > 0.5)
    assert image_metadata(out).attrs["unet_pipe"]["halo_rule_broken_blocks"] > 0


def test_watershed_reference_keeps_unseeded_components():
    p = np.full((1, 1, 7), 0.1, np.float32)
    p[0, 0, :3] = [0.95, 0.7, 0.95]  # two seeds in one component -> split
    p[0, 0, 5] = 0.7  # no seed: its own id after the seeds
    got = watershed_reference(p, 0.5, 0.9)
    assert got.ravel().tolist()[:3] in ([1, 1, 2], [1, 2, 2])
    assert got.ravel().tolist()[3:] == [0, 0, 3, 0]


# ----------------------------------------------------------------- inputs and options
@pytest.mark.parametrize("bad, found", [(1.5, "0.1 .. 1.5"), (-0.2, "-0.2 .. 0.9"), (np.nan, "nan .. nan")])
@pytest.mark.parametrize("instances", ["2d", "3d"])
def test_values_outside_0_1_are_refused(tmp_path, bad, found, instances):
    p = np.full((4, 8, 8), 0.1, np.float32)
    p[3, 2, 3] = 0.9
    p[3, 4, 5] = bad
    prob = _store(tmp_path / "p.ome.zarr", p, (2, 8, 8))
    with pytest.raises(InputError, match=rf"values must be probabilities in \[0, 1\].*found {found}"):
        postprocess(prob, tmp_path / "i.ome.zarr", instances=instances)


def test_other_integer_dtypes_need_a_scale(tmp_path, run_cli):
    prob = _store(tmp_path / "p.ome.zarr", np.zeros((2, 4, 4), np.uint16), (1, 4, 4))
    code, _, err = run_cli("postprocess", prob, tmp_path / "i.ome.zarr", "--instances", "3d")
    assert code == 2 and "cannot infer the probability scale of dtype uint16" in err
    assert "Traceback" not in err


def test_choose_block():
    assert choose_block((100, 200, 300), (10, 20, 30), (20, 40, 30)) == (20, 40, 30)
    assert choose_block((100, 200, 300), (10, 20, 30), (200, 400, 600)) == (100, 200, 300)
    assert choose_block((30, 1024, 1024), (1, 512, 512)) == (16, 512, 512)  # 4 Mvoxels
    assert choose_block((4, 64, 64), (1, 64, 64)) == (4, 64, 64)  # the whole volume
    with pytest.raises(ConfigError, match="must be a multiple of the input's chunks 10 20 30"):
        choose_block((100, 200, 300), (10, 20, 30), (15, 20, 30))


def test_cli_3d(tmp_path, run_cli):
    p = _snake((9, 11, 13))
    prob = _store(tmp_path / "p.ome.zarr", p, (3, 3, 3))
    code, _, err = run_cli("postprocess", prob, tmp_path / "i.ome.zarr", "--instances", "3d", "--block", "3", "6", "3",
                           "--threads", "2")
    assert code == 0, err
    assert same_partition(open_image(tmp_path / "i.ome.zarr")[:], _reference(p))
    code, _, err = run_cli("postprocess", prob, tmp_path / "j.ome.zarr", "--instances", "3d", "--block", "4", "3", "3")
    assert code == 2 and "must be a multiple of the input's chunks 3 3 3" in err and "Traceback" not in err
    code, _, err = run_cli("postprocess", prob, tmp_path / "k.ome.zarr", "--block", "3", "3", "3")
    assert code == 2 and "--block need --instances 3d" in err
    code, _, err = run_cli("postprocess", prob, tmp_path / "l.ome.zarr", "--instances", "3d", "--threads", "0")
    assert code == 2 and "--threads must be a finite number" in err


def test_cli_2d_default_is_unchanged(tmp_path, run_cli):
    p = _snake((3, 11, 13))
    prob = _store(tmp_path / "p.ome.zarr", p, (1, 11, 13))
    assert run_cli("postprocess", prob, tmp_path / "i.ome.zarr")[0] == 0
    got = open_image(tmp_path / "i.ome.zarr")[:]
    assert len(np.unique(got[0])) - 1 == ndi.label(p[0] > 0.5)[1]
    assert got[1].min() == 0 and got[1][got[1] > 0].min() > got[0].max()  # per slice: new ids on every slice


@pytest.mark.parametrize("method", ["threshold", "watershed"])
def test_cli_steps_as_the_workflow_runs_them(tmp_path, run_cli, method):
    p = _blobs((12, 15, 18), seed=9, level=0.7)
    prob = _store(tmp_path / "p.ome.zarr", p, (3, 5, 6))
    dest = tmp_path / "i.ome.zarr"
    common = ["--instances", "3d", "--method", method, "--threshold", "0.4", "--seed-threshold", "0.5",
              "--halo", "20", "--block", "6", "5", "6", "--pyramid-levels", "1", "--overwrite"]
    steps = [["--step", "prepare"]]
    for step in ("faces", "merge", "write", "flood"):
        steps += [["--step", step]] if step == "merge" else [["--step", step, "--shard", i, "2"] for i in "01"]
    for step in steps:
        code, _, err = run_cli("postprocess", prob, dest, *step, *common)
        assert code == 0, (step, err)
        assert not dest.exists()
    assert run_cli("postprocess", prob, dest, "--step", "finalize", *common)[0] == 0
    one = tmp_path / "one.ome.zarr"
    assert run_cli("postprocess", prob, one, *common)[0] == 0
    np.testing.assert_array_equal(open_image(dest)[:], open_image(one)[:])
    ref = _reference(p, 0.4) if method == "threshold" else watershed_reference(p, 0.4, 0.5)
    assert same_partition(open_image(dest)[:], ref)
