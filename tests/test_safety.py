"""Data safety: we remove or replace only what we created, one writer per DEST, no stale resume."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import numpy as np
import pytest
import tifffile
import torch

from unet_pipe.errors import CheckpointError, OutputError
from unet_pipe.io import StagedImage, open_image
from unet_pipe.model import UNet, load_checkpoint, save_checkpoint
from unet_pipe.safety import DestLock, check_dest


@pytest.fixture
def raw_tif(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (2, 32, 32), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", data)
    return tmp_path / "raw.tif", data


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_user_folder_named_like_staging_is_never_removed(tmp_path, raw_tif, run_cli):
    src, data = raw_tif
    mine = tmp_path / "out.ome.zarr.partial"
    mine.mkdir()
    (mine / "precious.txt").write_text("mine")
    code, _, err = run_cli("ingest", src, tmp_path / "out.ome.zarr")
    assert code == 2 and "not created by unet-pipe" in err
    assert (mine / "precious.txt").read_text() == "mine" and not (tmp_path / "out.ome.zarr").exists()
    # An input folder named DEST.partial (the reported case: `ingest x.partial x`).
    slices = tmp_path / "x.partial"
    slices.mkdir()
    tifffile.imwrite(slices / "s0.tif", data[0])
    code, _, err = run_cli("ingest", slices, tmp_path / "x")
    assert code == 2 and "overlaps the input" in err and (slices / "s0.tif").is_file()


def test_overwrite_keeps_users_old_folder_and_refuses_foreign_dest(tmp_path, raw_tif, run_cli):
    src, data = raw_tif
    dest = tmp_path / "out.ome.zarr"
    assert run_cli("ingest", src, dest)[0] == 0
    old = tmp_path / "out.ome.zarr.old"
    old.mkdir()
    (old / "keep").write_text("x")
    code, _, err = run_cli("ingest", src, dest, "--overwrite")
    assert code == 0, err
    assert (old / "keep").read_text() == "x"
    np.testing.assert_array_equal(open_image(dest)[:], data)
    assert not [p for p in tmp_path.iterdir() if "unet-pipe" in p.name]  # no backup or lock left behind
    # --overwrite onto a plain file or a folder we did not write: refused, untouched.
    (tmp_path / "file.zarr").write_text("not ours")
    code, _, err = run_cli("ingest", src, tmp_path / "file.zarr", "--overwrite")
    assert code == 2 and "refusing to replace" in err and (tmp_path / "file.zarr").read_text() == "not ours"
    (tmp_path / "foreign.zarr").mkdir()
    (tmp_path / "foreign.zarr" / ".zattrs").write_text("{}")
    code, _, err = run_cli("ingest", src, tmp_path / "foreign.zarr", "--overwrite")
    assert code == 2 and "not written by unet-pipe" in err and _tree(tmp_path / "foreign.zarr") == [".zattrs"]


@pytest.mark.parametrize("command", ["ingest", "weights", "postprocess", "predict"])
def test_dest_equal_to_inside_or_containing_an_input_is_refused(tmp_path, raw_tif, run_cli, command):
    src, _ = raw_tif
    store = tmp_path / "in.ome.zarr"
    assert run_cli("ingest", src, store, "--labels" if command == "weights" else "--chunks", *(
        [] if command == "weights" else ["1,32,32"]))[0] == 0
    before = _tree(tmp_path)
    first = {"ingest": [src], "weights": [store], "postprocess": [store], "predict": [tmp_path / "m.pt", store]}
    dests = (src, tmp_path) if command == "ingest" else (store, store / "inner.ome.zarr", tmp_path)
    for dest in dests:
        code, _, err = run_cli(command, *first[command], dest, "--overwrite")
        assert code == 2 and "overlaps the input" in err, (dest, err)
    assert _tree(tmp_path) == before


def test_check_dest_follows_links(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "alias")
    with pytest.raises(OutputError, match="overlaps"):
        check_dest(tmp_path / "alias" / "out.zarr", [tmp_path / "data"])
    check_dest(tmp_path / "elsewhere.zarr", [tmp_path / "data"])


def test_second_writer_refused_and_stale_lock_replaced(tmp_path, raw_tif, run_cli):
    src, _ = raw_tif
    dest = tmp_path / "out.ome.zarr"
    with DestLock(dest):
        code, _, err = run_cli("ingest", src, dest)
        assert code == 2 and f"being written by pid {os.getpid()}" in err and not dest.exists()
        with pytest.raises(OutputError, match="being written"):
            DestLock(dest).acquire()
    # A lock left by a process that died on this host is stale.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "out.ome.zarr.unet-pipe.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    code, _, err = run_cli("ingest", src, dest)
    assert code == 0, err
    assert not (tmp_path / "out.ome.zarr.unet-pipe.lock").exists()
    # Another host's lock cannot be judged from here: refused with its owner named.
    (tmp_path / "b.ome.zarr.unet-pipe.lock").write_text(json.dumps({"pid": 1, "host": "node-elsewhere"}))
    code, _, err = run_cli("ingest", src, tmp_path / "b.ome.zarr")
    assert code == 2 and "node-elsewhere" in err


def test_abort_and_resume_touch_only_marked_staging(tmp_path):
    staged = StagedImage(tmp_path / "a.zarr", shape=(1, 8, 8), dtype=np.uint8)
    assert (staged.staging / ".unet-pipe-staging").is_file()
    staged.abort()
    assert not staged.staging.exists()
    foreign = tmp_path / "b.zarr.partial"
    foreign.mkdir()
    (foreign / ".unet_pipe_done").mkdir()
    with pytest.raises(OutputError, match="not created by unet-pipe"):
        StagedImage(tmp_path / "b.zarr", shape=(1, 8, 8), dtype=np.uint8, resume=True)
    assert foreign.is_dir()


def test_postprocess_resume_on_changed_probabilities_starts_over(tmp_path, run_cli):
    """A killed postprocess resumed on different probabilities must not publish the old result."""
    from unet_pipe.io import StagedImage as Staged

    def write_prob(values):
        prob = tmp_path / "prob.ome.zarr"
        if prob.exists():
            import shutil

            shutil.rmtree(prob)
        s = Staged(prob, shape=values.shape, dtype=np.float32, chunks=(1, 16, 16))
        s.array[:] = values
        s.commit(pyramid_levels=0)
        return prob

    yy, xx = np.mgrid[:16, :16]
    left = np.repeat(((xx < 8) * 0.9 + 0.05)[None].astype(np.float32), 2, axis=0)
    prob = write_prob(left)
    # Simulate a killed run: staging with slab 0 done on the first probabilities.
    import unet_pipe.postprocess as pp

    original = pp.StagedImage.commit
    pp.StagedImage.commit = lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            pp.postprocess(prob, tmp_path / "inst.ome.zarr", pyramid_levels=0)
    finally:
        pp.StagedImage.commit = original
    right = left[:, :, ::-1].copy()
    os.utime(prob, None)
    write_prob(right)
    pp.postprocess(prob, tmp_path / "inst.ome.zarr", pyramid_levels=0)
    inst = open_image(tmp_path / "inst.ome.zarr")[:]
    assert (inst[:, :, 8:] > 0).all() and (inst[:, :, :8] == 0).all()


def test_checkpoint_with_nonfinite_or_malformed_weights_is_refused(tmp_path):
    model = UNet(depth=2, base_channels=4)
    save_checkpoint(tmp_path / "ok.pt", model)
    assert load_checkpoint(tmp_path / "ok.pt")["format"] == "unet-pipe-checkpoint"
    data = torch.load(tmp_path / "ok.pt", weights_only=True)
    name = next(iter(data["model_state"]))
    data["model_state"][name] = data["model_state"][name].clone().fill_(float("nan"))
    torch.save(data, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        load_checkpoint(tmp_path / "nan.pt")
    data["model_state"] = [1, 2, 3]
    torch.save(data, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="wrong structure"):
        load_checkpoint(tmp_path / "list.pt")


def test_unwritable_output_folder_fails_before_work(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path below a regular file instead
        (tmp_path / "f").write_text("")
        target = tmp_path / "f" / "out.zarr"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "out.zarr"
    with pytest.raises(OutputError, match="cannot write here"):
        StagedImage(target, shape=(1, 8, 8), dtype=np.uint8)


def test_not_enough_free_space_is_refused_up_front(tmp_path):
    with pytest.raises(OutputError, match="MiB are free"):
        StagedImage(tmp_path / "huge.zarr", shape=(10**6, 10**5, 10**5), dtype=np.float32, chunks=(1, 512, 512))
    assert not (tmp_path / "huge.zarr.partial").exists()


def test_tiff_pages_or_slices_that_differ_are_refused(tmp_path, run_cli):
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:
        for shape in ((16, 16), (16, 16), (16, 20), (16, 16)):
            tif.write(np.zeros(shape, np.uint8), photometric="minisblack")
    code, _, err = run_cli("ingest", tmp_path / "mixed.tif", tmp_path / "a.zarr")
    assert code == 2 and "pages differ in shape or dtype (page 2: shape (16, 20)" in err
    with tifffile.TiffWriter(tmp_path / "dtypes.tif") as tif:
        tif.write(np.zeros((16, 16), np.uint8), photometric="minisblack")
        tif.write(np.zeros((16, 16), np.uint16), photometric="minisblack")
    code, _, err = run_cli("ingest", tmp_path / "dtypes.tif", tmp_path / "b.zarr")
    assert code == 2 and "dtype uint16" in err
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"{i}.tif", np.zeros((8, 8), np.uint8), photometric="minisblack")
    os.symlink(tmp_path / "gone.tif", folder / "3.tif")
    code, _, err = run_cli("ingest", folder, tmp_path / "c.zarr")
    assert code == 2 and "3.tif: slice entry is not a readable file" in err
    tifffile.imwrite(tmp_path / "i64.tif", np.zeros((4, 8, 8), np.int64), photometric="minisblack")
    code, _, err = run_cli("ingest", tmp_path / "i64.tif", tmp_path / "d.zarr", "--labels")
    assert code == 2 and "64-bit integer" in err
    assert not any(p.name.endswith((".zarr", ".partial")) for p in tmp_path.iterdir())


def test_predict_refuses_raw_of_another_dtype_than_training(tmp_path):
    from unet_pipe.errors import InputError
    from unet_pipe.predict import predict

    model = UNet(depth=2, base_channels=4)
    save_checkpoint(tmp_path / "m.pt", model, extra={"input_dtype": "uint8", "input_normalization": "dtype-max"})
    for dtype in (np.uint8, np.uint16):
        s = StagedImage(tmp_path / f"{np.dtype(dtype)}.zarr", shape=(1, 64, 64), dtype=dtype, chunks=(1, 64, 64))
        s.array[:] = 100
        s.commit(pyramid_levels=0)
    predict(tmp_path / "m.pt", tmp_path / "uint8.zarr", tmp_path / "p8.zarr", pyramid_levels=0)
    with pytest.raises(InputError, match="trained on uint8 raw data but this image is uint16"):
        predict(tmp_path / "m.pt", tmp_path / "uint16.zarr", tmp_path / "p16.zarr", pyramid_levels=0)
    assert not (tmp_path / "p16.zarr").exists() and not (tmp_path / "p16.zarr.partial").exists()


def test_cli_numbers_and_malformed_ngff_metadata_give_one_line(tmp_path, raw_tif, run_cli):
    src, _ = raw_tif
    for bad in (["0", "1", "1"], ["-1", "1", "1"], ["nan", "1", "1"], ["inf", "1", "1"]):
        code, _, err = run_cli("ingest", src, tmp_path / "v.zarr", "--voxel-size", *bad)
        assert code == 2 and "--voxel-size must be three finite positive numbers" in err
    code, _, err = run_cli("synth", tmp_path / "s", "--shape", 100000, 100000, 100000)
    assert code == 2 and "voxels" in err and not (tmp_path / "s").exists()
    store = tmp_path / "ok.zarr"
    assert run_cli("ingest", src, store, "--pyramid-levels", 0)[0] == 0
    attrs = json.loads((store / ".zattrs").read_text())

    def broken(name, change):
        import shutil

        copy = tmp_path / name
        shutil.copytree(store, copy)
        a = json.loads(json.dumps(attrs))
        change(a, copy)
        (copy / ".zattrs").write_text(json.dumps(a))
        return copy

    cases = {
        "short_scale.zarr": (lambda a, c: a["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
                             .__setitem__("scale", [1.0, 1.0]), "finite positive numbers"),
        "dotdot.zarr": (lambda a, c: a["multiscales"][0]["datasets"][0].__setitem__("path", "../ok.zarr/0"),
                        "not a relative name"),
        "garbled.zarr": (lambda a, c: (c / "0" / ".zarray").write_text("{garbled"), "unreadable array metadata"),
    }
    for name, (change, message) in cases.items():
        code, _, err = run_cli("info", broken(name, change))
        assert code == 2 and message in err and err.count("\n") <= 1, (name, err)
