"""Failures in the middle of a run: corrupt chunks, a full disk, absurd numbers, two writers at once.

Each ends in one line ``unet-pipe: error: ...`` and exit 2, publishes nothing,
and leaves at most a marked staging folder that the error line mentions.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage._local as zarr_local

from unet_pipe.errors import InputError
from unet_pipe.io import StagedImage, open_image
from unet_pipe.model import UNet, save_checkpoint


def _store(path: Path, data: np.ndarray, kind: str = "image") -> Path:
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=(1, 32, 32), kind=kind)
    staged.array[:] = data
    staged.commit(pyramid_levels=0)
    return path


@pytest.fixture
def stores(tmp_path) -> dict:
    """Raw, binary labels and probabilities (2, 64, 64) in chunks of (1, 32, 32), and a tiny checkpoint."""
    raw = np.random.default_rng(0).integers(0, 255, (2, 64, 64), dtype=np.uint8)
    save_checkpoint(tmp_path / "m.pt", UNet(depth=2, base_channels=4))
    return {
        "raw": _store(tmp_path / "raw.zarr", raw),
        "labels": _store(tmp_path / "labels.zarr", ((raw > 100) * 255).astype(np.uint8), "labels"),
        "prob": _store(tmp_path / "prob.zarr", (raw / 255).astype(np.float32)),
        "ckpt": tmp_path / "m.pt",
        "data": raw,
    }


def _corrupt(store: Path, how: str) -> Path:
    """Chunk (z=1, y=1, x=0) of level 0 overwritten with text, or cut to its first 20 bytes."""
    chunk = store / "0" / "1" / "1" / "0"
    if how == "garbage":
        chunk.write_bytes(b"garbage\n")
    else:
        chunk.write_bytes(chunk.read_bytes()[:20])
    return chunk


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("out"))


# ------------------------------------------------------------------- corrupt chunks


def test_truncated_chunk_is_refused_not_decoded_into_garbage(stores):
    """Blosc 1 decodes a cut chunk past its end: 1019 of 1024 voxels came back wrong, silently."""
    _corrupt(stores["raw"], "truncated")
    array = open_image(stores["raw"])
    np.testing.assert_array_equal(array[0], stores["data"][0])  # other chunks read as before
    np.testing.assert_array_equal(array[1, :32], stores["data"][1, :32])
    with pytest.raises(InputError, match=r"chunk 0/1/1/0 is corrupt \(a zarr chunk has 20 bytes but its Blosc header says 1040"):
        array[1]
    with pytest.raises(InputError, match="raw.zarr: chunk 0/1/1/0 is corrupt"):
        np.asarray(array)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
@pytest.mark.parametrize("stage", ["predict", "weights", "postprocess"])
def test_corrupt_chunk_mid_run_is_one_line_and_publishes_nothing(stores, tmp_path, run_cli, stage, how):
    source = {"predict": "raw", "weights": "labels", "postprocess": "prob"}[stage]
    _corrupt(stores[source], how)
    args = {
        "predict": [stores["ckpt"], stores["raw"], tmp_path / "out.zarr", "--block", "1", "32", "32"],
        "weights": [stores["labels"], tmp_path / "out.zarr"],
        "postprocess": [stores["prob"], tmp_path / "out.zarr"],
    }[stage]
    code, _, err = run_cli("-q", stage, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("unet-pipe: error: "), err
    assert f"{source}.zarr: chunk 0/1/1/0 is corrupt" in err
    if stage == "postprocess":
        # Slab z=0 was finished before slab z=1 failed: kept, and said so.
        assert "out.zarr.partial kept with 1 finished block: rerunning on the same inputs resumes it" in err
        assert _outputs(tmp_path) == ["out.zarr.partial"]
    elif stage == "predict":
        # Blocks run in parallel: those finished are kept for a resume, or nothing is left.
        kept = _outputs(tmp_path)
        assert kept == [] and err.endswith("nothing was written\n") or (
            kept == ["out.zarr.partial"] and "kept with" in err
        ), (kept, err)
    else:  # weights reads the whole stack for its class weights first: nothing was started
        assert _outputs(tmp_path) == []


def test_corrupt_chunk_in_evaluate_and_train_is_one_line(stores, tmp_path, run_cli):
    import yaml

    from unet_pipe.config import validate_config

    _corrupt(stores["labels"], "garbage")
    code, _, err = run_cli("-q", "evaluate", "--prediction", stores["labels"], "--truth", stores["labels"],
                           "--out", tmp_path / "out.json")
    assert code == 2 and err.count("\n") == 1 and "labels.zarr: chunk 0/1/1/0 is corrupt" in err
    assert _outputs(tmp_path) == []
    config = validate_config({
        "datasets": {"s": {"synthetic": {"shape": [2, 64, 64]}}},
        "model": {"depth": 2, "base_channels": 4},
        "train": {"datasets": {"s": {"train": [0, 2]}}, "tile": 44, "steps": 2, "val_every": 2},
    })
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli("-q", "train", tmp_path / "c.yaml", "--raw", f"s={stores['raw']}", "--labels",
                           f"s={stores['labels']}", "--out", tmp_path / "out.pt", "--threads", "1")
    assert code == 2 and err.count("\n") == 1 and "labels.zarr: chunk 0/1/1/0 is corrupt" in err
    assert _outputs(tmp_path) == []


# ------------------------------------------------------------------------ full disk


def _disk_fills_after(monkeypatch, chunks: int) -> list[str]:
    """zarr's local writes fail with ENOSPC once ``chunks`` chunk files are written."""
    written: list[str] = []
    put = zarr_local._put

    def full(path, value, *args, **kwargs):
        if Path(path).name.isdigit():
            if len(written) >= chunks:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            written.append(str(path))
        return put(path, value, *args, **kwargs)

    monkeypatch.setattr(zarr_local, "_put", full)
    return written


def test_disk_full_mid_predict_keeps_resumable_staging_and_says_so(stores, tmp_path, run_cli, monkeypatch):
    dest = tmp_path / "out.zarr"
    options = ["--block", "1", "32", "32", "--workers", "1", "--threads", "1"]
    _disk_fills_after(monkeypatch, 3)
    code, _, err = run_cli("-q", "predict", stores["ckpt"], stores["raw"], dest, *options)
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert "out.zarr.partial kept with 3 finished blocks: rerunning on the same inputs resumes it" in err
    assert _outputs(tmp_path) == ["out.zarr.partial"]
    monkeypatch.undo()  # space freed: the rerun resumes and publishes the same result as a clean run
    assert run_cli("-q", "predict", stores["ckpt"], stores["raw"], dest, *options)[0] == 0
    assert run_cli("-q", "predict", stores["ckpt"], stores["raw"], tmp_path / "clean.zarr", *options)[0] == 0
    assert open_image(dest)[:].tobytes() == open_image(tmp_path / "clean.zarr")[:].tobytes()


def test_disk_full_mid_ingest_removes_its_staging(tmp_path, run_cli, monkeypatch):
    import tifffile

    import unet_pipe.io as io

    tifffile.imwrite(tmp_path / "raw.tif", np.zeros((4, 32, 32), np.uint8), photometric="minisblack")
    store_row = io._ChunkWriter._store_row
    calls = []

    def full(row, *args):
        calls.append(row)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{row}/0")
        return store_row(row, *args)

    monkeypatch.setattr(io._ChunkWriter, "_store_row", staticmethod(full))
    code, _, err = run_cli("-q", "ingest", tmp_path / "raw.tif", tmp_path / "out.zarr", "--chunks", "1,32,32")
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert _outputs(tmp_path) == []  # ingest cannot resume: its staging is gone, nothing published


def test_disk_full_while_train_saves_a_checkpoint(stores, tmp_path, run_cli, monkeypatch):
    import yaml

    from unet_pipe.config import validate_config

    config = validate_config({
        "datasets": {"s": {"synthetic": {"shape": [2, 64, 64]}}},
        "model": {"depth": 2, "base_channels": 4},
        "train": {"datasets": {"s": {"train": [0, 2]}}, "tile": 44, "steps": 4, "checkpoint_every": 2},
    })
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    save = torch.save
    saves = []

    def full(obj, fh, *args, **kwargs):  # the periodic save at step 2 works, the final one does not
        saves.append(1)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    args = ["-q", "train", tmp_path / "c.yaml", "--raw", f"s={stores['raw']}", "--labels", f"s={stores['labels']}",
            "--out", tmp_path / "out.pt", "--threads", "1"]
    code, _, err = run_cli(*args)
    assert code == 2 and err.count("\n") == 1, err
    assert "out.pt: could not be written (No space left on device)" in err
    assert "out.pt.partial kept: rerun with --resume to continue from it" in err
    assert _outputs(tmp_path) == ["out.pt.partial"]  # no temporary file left beside it
    monkeypatch.undo()
    assert run_cli(*args, "--resume")[0] == 0 and _outputs(tmp_path) == ["out.pt"]


def test_train_into_an_unwritable_folder_fails_before_reading_anything(tmp_path, run_cli):
    import yaml

    from unet_pipe.config import validate_config

    config = validate_config({"datasets": {"s": {"synthetic": {}}}, "train": {"datasets": {"s": {"train": [0, 1]}}}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "file").write_text("")  # root ignores permission bits: a path below a file is unwritable for all
    for out, log in ((tmp_path / "file" / "m.pt", None), (tmp_path / "m.pt", tmp_path / "file" / "l.csv")):
        # The stores do not exist: the output check comes first, before any store is opened.
        code, _, err = run_cli("-q", "train", tmp_path / "c.yaml", "--raw", "s=/nonexistent.zarr", "--labels",
                               "s=/nonexistent.zarr", "--out", out, *(["--log", log] if log else []))
        assert code == 2 and err.count("\n") == 1 and "file" in err and "nonexistent" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "file"]


# ------------------------------------------------------------- numeric options


def _run(argv: list) -> tuple[int, str]:
    """``unet-pipe ARGV`` in a subprocess-like way: argparse's own errors exit through SystemExit."""
    import contextlib
    import io as stdio

    from unet_pipe.cli import main

    err = stdio.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


BAD_OPTIONS = [
    (["predict", "{ckpt}", "{raw}", "{out}", "--threads", "0"], "--threads must be a finite number in [1, 1024], got 0"),
    (["predict", "{ckpt}", "{raw}", "{out}", "--workers", "-2"], "--workers must be a finite number in [1, 1024]"),
    (["predict", "{ckpt}", "{raw}", "{out}", "--batch", "0"], "--batch must be a finite number >= 1, got 0"),
    (["predict", "{ckpt}", "{raw}", "{out}", "--tile", "0"], "tile must be EDGE or Y X (positive integers)"),
    (["predict", "{ckpt}", "{raw}", "{out}", "--block", "-1", "32", "32"], "block must be three positive integers"),
    (["predict", "{ckpt}", "{raw}", "{out}", "--pyramid-levels", "-1"], "--pyramid-levels must be a finite number in [0, 16]"),
    (["predict", "{ckpt}", "{raw}", "{out}", "--shard", "2", "2"], "--shard must be I N with 0 <= I < N, got 2 2"),
    (["predict", "{ckpt}", "{raw}", "{out}", "--shard", "0", "0"], "--shard must be I N with 0 <= I < N, got 0 0"),
    (["predict", "{ckpt}", "{raw}", "{out}", "--z-range", "5", "2"], "--z-range must be A B with 0 <= A < B, got 5 2"),
    (["predict", "{ckpt}", "{raw}", "{out}", "--threads", "two"], "predict: argument --threads: invalid int value: 'two'"),
    (["train", "{yaml}", "--out", "{out}", "--threads", "100000"], "--threads must be a finite number in [1, 1024], got 100000"),
    (["train", "{yaml}", "--out", "{out}", "--until-step", "0"], "--until-step must be a finite number >= 1, got 0"),
    (["train", "{yaml}", "--out", "{out}", "--until-step", "-5"], "--until-step must be a finite number >= 1, got -5"),
    (["postprocess", "{prob}", "{out}", "--threshold", "nan"], "need 0 <= --threshold <= --seed-threshold <= 1"),
    (["postprocess", "{prob}", "{out}", "--seed-threshold", "inf"], "need 0 <= --threshold <= --seed-threshold <= 1"),
    (["postprocess", "{prob}", "{out}", "--seed-prominence", "nan"], "--seed-prominence must be a finite number > 0, got nan"),
    (["postprocess", "{prob}", "{out}", "--seed-prominence", "inf"], "--seed-prominence must be a finite number > 0, got inf"),
    (["postprocess", "{prob}", "{out}", "--min-size", "-1"], "--min-size must be a finite number >= 0, got -1"),
    (["postprocess", "{prob}", "{out}", "--min-size", "4097"], "min_size 4097 exceeds the slice area of"),
    (["postprocess", "{prob}", "{out}", "--pyramid-levels", "1000"], "--pyramid-levels must be a finite number in [0, 16]"),
    (["weights", "{labels}", "{out}", "--sigma", "1e300"], "weights.sigma must be a number of pixels in (0, 10000], got 1e+300"),
    (["weights", "{labels}", "{out}", "--sigma", "0"], "weights.sigma must be a number of pixels in (0, 10000], got 0.0"),
    (["weights", "{labels}", "{out}", "--w0", "nan"], "weights.w0 must be a finite number in [0, 1e+06], got nan"),
    (["weights", "{labels}", "{out}", "--tolerance", "nan"], "weights tolerance must lie in (0, 1), got nan"),
    (["weights", "{labels}", "{out}", "--threads", "0"], "--threads must be a finite number in [1, 1024], got 0"),
    (["weights", "{labels}", "--preview", "{out}.png", "--slice", "-99"], "has no slice -99 (z must lie in [0, 2))"),
    (["evaluate", "--prediction", "{labels}", "--truth", "{labels}", "--out", "{out}", "--threshold", "nan"],
     "--threshold must be a finite number in [0, 1], got nan"),
    (["evaluate", "--prediction", "{labels}", "--truth", "{labels}", "--out", "{out}", "--slices", "0", "99"],
     "evaluated slice range [0, 99) outside the stack of 2 slices"),
    (["evaluate", "--prediction", "{labels}", "--truth", "{labels}", "--out", "{out}", "--foreground-value", "-3"],
     "--foreground-value -3 cannot occur in uint8 labels"),
    (["evaluate", "--prediction", "{labels}", "--truth", "{labels}", "--out", "{out}", "--foreground-value", "7"],
     "and 7 (cell), found values 0, 255; set foreground_value to 255"),
    (["report", "--metrics", "{yaml}", "--out", "{out}.md", "--figures", "-1"], "--figures must be a finite number >= 0"),
    (["ingest", "{tif}", "{out}", "--threads", "0"], "--threads must be a finite number in [1, 1024], got 0"),
    (["ingest", "{tif}", "{out}", "--pyramid-levels", "17"], "--pyramid-levels must be a finite number in [0, 16]"),
    (["synth", "{out}", "--seed", "-1"], "--seed must be a finite number >= 0, got -1"),
    (["synth", "{out}", "--shape", "1", "8", "nan"], "synth: argument --shape: invalid int value: 'nan'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS, ids=[" ".join(a[3:] if a[0] == "predict" else a[:1] + a[-2:])
                                                               for a, _ in BAD_OPTIONS])
def test_absurd_numeric_options_are_one_line(stores, tmp_path, argv, message):
    import tifffile

    tifffile.imwrite(tmp_path / "in.tif", np.zeros((2, 16, 16), np.uint8), photometric="minisblack")
    (tmp_path / "c.yaml").write_text("datasets: {s: {synthetic: {}}}\ntrain: {datasets: {s: {train: [0, 1]}}}\n")
    names = {"ckpt": stores["ckpt"], "raw": stores["raw"], "prob": stores["prob"], "labels": stores["labels"],
             "out": tmp_path / "out", "yaml": tmp_path / "c.yaml", "tif": tmp_path / "in.tif"}
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = _run(["-q", *(a.format(**names) for a in argv)])
    assert code == 2 and err.count("\n") == 1 and err.startswith("unet-pipe: error: "), err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a lock


# ------------------------------------------------------------------ two writers


def test_two_predicts_on_one_dest_the_second_refuses_the_first_completes(tmp_path):
    from test_predict import make_net, write_image

    from unet_pipe.predict import predict
    from unet_pipe.synth import synthesize

    raw = write_image(tmp_path / "raw.zarr", synthesize((4, 96, 96), seed=5).raw, (1, 32, 32))
    ckpt = save_checkpoint(tmp_path / "n.pt", make_net(base=8, seed=2))
    dest = tmp_path / "out.zarr"
    options = ["--tile", "32", "--block", "1", "32", "32", "--workers", "1", "--batch", "1", "--threads", "1"]
    cli = [sys.executable, "-m", "unet_pipe", "-q", "predict", str(ckpt), str(raw), str(dest), *options]
    first = subprocess.Popen(cli, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "out.zarr.unet-pipe.lock"
    deadline = time.monotonic() + 60
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    second = subprocess.run(cli, stderr=subprocess.PIPE, text=True)
    assert first.poll() is None, "the first predict ended before the second started; make the stack larger"
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"out.zarr: is being written by pid {first.pid} on " in second.stderr
    assert time.monotonic() - started < 30  # refused at once, not after waiting for the first
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert not lock.exists() and not (tmp_path / "out.zarr.partial").exists()
    predict(ckpt, raw, tmp_path / "clean.zarr", tile=32, block=[1, 32, 32], workers=1, batch=1, threads=1)
    assert open_image(dest)[:].tobytes() == open_image(tmp_path / "clean.zarr")[:].tobytes()


# ------------------------------------------------ further cases of the same classes


def test_dest_links_and_dest_inside_another_store_are_refused(stores, tmp_path, run_cli):
    import tifffile

    tifffile.imwrite(tmp_path / "in.tif", stores["data"], photometric="minisblack")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep").write_text("x")
    os.symlink(tmp_path / "in.tif", tmp_path / "to_input.zarr")
    os.symlink(tmp_path / "foreign", tmp_path / "to_foreign.zarr")
    before = {p: sorted(x.name for x in p.rglob("*")) for p in (tmp_path / "foreign", stores["raw"])}
    cases = [
        (["ingest", tmp_path / "in.tif", tmp_path / "to_input.zarr"], "overlaps the input"),
        (["ingest", tmp_path / "in.tif", tmp_path / "to_foreign.zarr"], "already exists"),
        (["ingest", tmp_path / "in.tif", tmp_path / "to_foreign.zarr", "--overwrite"], "is a link, not an OME-Zarr store"),
        (["ingest", tmp_path / "in.tif", stores["raw"] / "sub.zarr"], f"is inside the zarr store {stores['raw']}"),
        (["postprocess", stores["prob"], stores["raw"] / "0" / "inst.zarr"], "is inside the zarr store"),
        (["evaluate", "--prediction", stores["labels"], "--truth", stores["labels"], "--out", stores["raw"] / "m.json"],
         "is inside the zarr store"),
    ]
    for argv, message in cases:
        code, _, err = run_cli("-q", *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert {p: sorted(x.name for x in p.rglob("*")) for p in before} == before
    assert (tmp_path / "in.tif").is_file() and (tmp_path / "foreign" / "keep").read_text() == "x"


def test_overwrite_of_a_store_that_is_being_written_is_refused(tmp_path, run_cli):
    import tifffile

    from unet_pipe.safety import DestLock

    tifffile.imwrite(tmp_path / "in.tif", np.full((2, 16, 16), 7, np.uint8), photometric="minisblack")
    assert run_cli("-q", "ingest", tmp_path / "in.tif", tmp_path / "ours.zarr")[0] == 0
    tifffile.imwrite(tmp_path / "in.tif", np.full((2, 16, 16), 9, np.uint8), photometric="minisblack")
    with DestLock(tmp_path / "ours.zarr"):
        code, _, err = run_cli("-q", "ingest", tmp_path / "in.tif", tmp_path / "ours.zarr", "--overwrite")
    assert code == 2 and "is being written by pid" in err
    assert (open_image(tmp_path / "ours.zarr")[:] == 7).all()


def test_checkpoint_that_is_a_device_or_a_folder_is_refused(stores, tmp_path, run_cli):
    os.symlink("/dev/zero", tmp_path / "zero.pt")  # endless, size 0: torch.load would read forever
    (tmp_path / "folder.pt").mkdir()
    for ckpt in (tmp_path / "zero.pt", tmp_path / "folder.pt"):
        code, _, err = run_cli("-q", "predict", ckpt, stores["raw"], tmp_path / "out.zarr")
        assert code == 2 and f"{ckpt.name}: is not a regular file, so not a checkpoint" in err
    assert _outputs(tmp_path) == []


def test_empty_and_pageless_tiffs_are_one_line(tmp_path, run_cli):
    import tifffile

    (tmp_path / "empty.tif").write_bytes(b"")
    with tifffile.TiffWriter(tmp_path / "nopages.tif"):
        pass  # a valid header and no image
    for name, message in (("empty.tif", "not a readable TIFF"), ("nopages.tif", "not a readable TIFF (no image")):
        code, _, err = run_cli("-q", "ingest", tmp_path / name, tmp_path / "out.zarr")
        assert code == 2 and err.count("\n") == 1 and f"{name}: {message}" in err, err
    assert _outputs(tmp_path) == []


def test_results_folder_inside_an_input_folder_is_refused(tmp_path, run_cli):
    import tifffile

    (tmp_path / "slices").mkdir()
    tifffile.imwrite(tmp_path / "slices" / "0.tif", np.zeros((8, 8), np.uint8))
    for results in ("slices", "slices/results", "./slices/../slices"):
        (tmp_path / "c.yaml").write_text(f"datasets: {{d: {{raw: {tmp_path / 'slices'}}}}}\nresults: {tmp_path / results}\n")
        code, _, err = run_cli("check-config", tmp_path / "c.yaml")
        assert code == 2 and "lies inside the input" in err and "keep results apart" in err, (results, err)
    (tmp_path / "lab").mkdir()
    for z in range(3):  # three labelled slices: the fewest the automatic split takes
        tifffile.imwrite(tmp_path / "slices" / f"{z}.tif", np.zeros((8, 8), np.uint8))
        tifffile.imwrite(tmp_path / "lab" / f"{z}.tif", np.zeros((8, 8), np.uint8))
    ds = f"{{d: {{raw: {tmp_path / 'slices'}, labels: {tmp_path / 'lab'}}}}}"
    (tmp_path / "c.yaml").write_text(f"datasets: {ds}\nresults: {tmp_path / 'out'}\n")
    assert run_cli("check-config", tmp_path / "c.yaml")[0] == 0


def test_synth_shape_beyond_the_memory_is_refused(tmp_path, run_cli, monkeypatch):
    import psutil

    class OneGiB:
        available = 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: OneGiB)
    code, _, err = run_cli("synth", tmp_path / "s", "--shape", 20, 1024, 1024)  # 80 bytes a voxel: 1.6 GiB
    assert code == 2 and "needs about 1.6 GiB of memory, 1.0 GiB are available" in err
    assert not (tmp_path / "s").exists()


def test_train_refuses_weights_of_other_labels_and_labels_of_another_shape(stores, tmp_path, run_cli):
    import yaml

    from unet_pipe.config import validate_config
    from unet_pipe.train import check_weights_match
    from unet_pipe.weights import WeightParams, compute_weight_store

    other = _store(tmp_path / "other.zarr", np.where(stores["data"] > 50, 255, 0).astype(np.uint8), "labels")
    compute_weight_store(stores["labels"], tmp_path / "w.zarr", WeightParams(), pyramid_levels=0)
    check_weights_match(stores["labels"], tmp_path / "w.zarr")  # its own labels: accepted
    small = _store(tmp_path / "small.zarr", np.zeros((2, 32, 32), np.uint8), "labels")
    config = validate_config({
        "datasets": {"s": {"synthetic": {"shape": [2, 64, 64]}}},
        "model": {"depth": 2, "base_channels": 4},
        "train": {"datasets": {"s": {"train": [0, 2]}}, "tile": 44, "steps": 2},
    })
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    for labels, weights, message in ((other, ["--weights", f"s={tmp_path / 'w.zarr'}"], "w.zarr: was computed from other labels"),
                                     (small, [], "labels shape (2, 32, 32) differs from raw shape (2, 64, 64)")):
        code, _, err = run_cli("-q", "train", tmp_path / "c.yaml", "--raw", f"s={stores['raw']}", "--labels",
                               f"s={labels}", *weights, "--out", tmp_path / "out.pt")
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert _outputs(tmp_path) == []


def test_unicode_and_newlines_in_paths(tmp_path, run_cli):
    import tifffile

    data = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16)
    tifffile.imwrite(tmp_path / "ünï cødé.tif", data, photometric="minisblack")
    dest = tmp_path / "a\nb ü.zarr"
    assert run_cli("-q", "ingest", tmp_path / "ünï cødé.tif", dest)[0] == 0
    np.testing.assert_array_equal(open_image(dest)[:], data)
    code, _, err = run_cli("-q", "ingest", tmp_path / "no\nsuch ü.tif", tmp_path / "c.zarr")
    assert code == 2 and err.count("\n") == 1 and "no such ü.tif" in err, err  # the newline is shown as a space


def test_damaged_staging_store_is_removed_not_resumed_forever(stores, tmp_path, run_cli, monkeypatch):
    """A resumed postprocess reads its finished slabs back: a damaged one ends the run, once."""
    import unet_pipe.postprocess as pp

    monkeypatch.setattr(pp.StagedImage, "commit", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after both slabs, before publishing
        pp.postprocess(stores["prob"], tmp_path / "out.zarr", pyramid_levels=0)
    monkeypatch.undo()
    _corrupt(tmp_path / "out.zarr.partial", "truncated")
    code, _, err = run_cli("-q", "postprocess", stores["prob"], tmp_path / "out.zarr", "--pyramid-levels", "0")
    assert code == 2 and err.count("\n") == 1, err
    assert "a zarr chunk has 20 bytes but its Blosc header says" in err
    assert err.endswith("; the damaged out.zarr.partial was removed: rerun to start over\n")
    assert _outputs(tmp_path) == []
    assert run_cli("-q", "postprocess", stores["prob"], tmp_path / "out.zarr", "--pyramid-levels", "0")[0] == 0


def test_full_disk_while_writing_metrics_leaves_no_file(stores, tmp_path, run_cli, monkeypatch):
    from pathlib import Path as P

    write_text = P.write_text

    def full(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            write_text(self, "{\"half")  # what a full disk leaves: a partial file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(P, "write_text", full)
    code, _, err = run_cli("-q", "evaluate", "--prediction", stores["labels"], "--truth", stores["labels"],
                           "--out", tmp_path / "out.json")
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_two_outputs_of_one_command_in_one_place_are_refused(stores, tmp_path, run_cli):
    (tmp_path / "c.yaml").write_text("datasets: {s: {synthetic: {}}}\ntrain: {datasets: {s: {train: [0, 1]}}}\n")
    cases = [
        (["train", tmp_path / "c.yaml", "--raw", f"s={stores['raw']}", "--labels", f"s={stores['labels']}",
          "--out", tmp_path / "out.pt", "--log", tmp_path / "out.pt"], "out.pt: overlaps the output"),
        (["weights", stores["labels"], tmp_path / "out.zarr", "--preview", tmp_path / "out.zarr" / "p.png"],
         "overlaps the output"),
        # The per-slice CSV goes to OUT with suffix .csv: an OUT ending in .csv would be replaced by it.
        (["evaluate", "--prediction", stores["labels"], "--truth", stores["labels"], "--out", tmp_path / "out.csv"],
         "--out must not end in .csv"),
    ]
    for argv, message in cases:
        code, _, err = run_cli("-q", *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert _outputs(tmp_path) == []
