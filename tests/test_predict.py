"""Overlap-tile inference: equals the whole-slice forward pass, resumable, safe, sharded; its settings
(PredictRequest) checked once."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unet_pipe.errors import CheckpointError, ConfigError, InputError, OutputError
from unet_pipe.intensity import IntensityRange
from unet_pipe.io import _DONE_DIR, ATTRS_KEY, StagedImage, image_metadata, open_image
from unet_pipe.model import UNet, save_checkpoint, valid_output_size
from unet_pipe.precision import cpu_bf16_native
from unet_pipe.predict import PredictRequest, finalize, predict, read_probabilities, streams_pyramid
from unet_pipe.synth import synthesize

# Every test here names the precision it tests.  The exactness tests (tiling, TTA,
# resume, dtypes, shards, schedulers) run in float32 on every CPU and in bfloat16 too
# where the CPU computes it natively: their reference is the whole-slice forward pass
# in the same precision.  (Emulated bfloat16 is slow; tests/test_precision.py compares
# the precisions with the stated tolerance on every CPU, at small sizes.)
PRECISIONS = [
    "float32",
    pytest.param("bfloat16", marks=pytest.mark.skipif(not cpu_bf16_native(), reason="bfloat16 is not native here (or UNET_PIPE_CPU_BF16=0)")),
]
#: Two computations of the same pixels that differ only in the order of the arithmetic
#: (another tile shape, a rotated or mirrored window, another thread count), per precision.
#: float32: reassociation (measured <= 7.2e-7).  bfloat16: reassociation can round an
#: activation to the neighbouring bfloat16 value, which later layers carry on; the bound
#: is the stated bfloat16 tolerance (tests/test_precision.py: BF16_MAX_ABS).
TOL = {"float32": 1e-5, "bfloat16": 3e-2}


def assert_matches_reference(out: np.ndarray, expected: np.ndarray, precision: str, atol: float = 0.0) -> None:
    """Tiled output == the whole-slice forward pass in the same precision.

    float32: within :data:`TOL`.  bfloat16: at least 99 % of the pixels bit-identical
    (every tile sees the same mirrored context on the same pooling grid; measured: 100 %
    on an AMX Xeon), the rest within :data:`TOL`.  ``atol``: an encoding's own rounding.
    """
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOL[precision] + atol)
    if precision == "bfloat16":
        assert np.mean(np.abs(out - expected) <= atol) >= 0.99


@pytest.fixture(params=PRECISIONS)
def precision(request) -> str:
    return request.param


def write_image(path: Path, data: np.ndarray, chunks) -> Path:
    staged = StagedImage(path, shape=data.shape, dtype=data.dtype, chunks=chunks, voxel_size=(0.05, 0.004, 0.004))
    staged.array[:] = data
    staged.commit(pyramid_levels=0)
    return path


def make_net(dims: int = 2, depth: int = 3, base: int = 4, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(depth=depth, base_channels=base, dims=dims, dropout=0.5)
    with torch.no_grad():  # non-zero biases: a bias-free ReLU net would hide offset errors
        for p in net.parameters():
            if p.ndim == 1:
                p.uniform_(-0.1, 0.1)
    return net.eval()


def reference(net: UNet, raw: np.ndarray, tta: bool | str = False, precision: str = "float32") -> np.ndarray:
    """Whole-slice (2D) / whole-volume (3D) forward pass, written independently of unet_pipe.tiling.

    np.pad(mode='reflect') by the margin, plus the extra voxels that make the
    far side a valid size; softmax class 1; crop to the volume.  ``bfloat16``:
    under torch's bfloat16 autocast, independently of the predictor's bf16 path.
    """
    m, step = net.margin, 2 ** (net.depth - 1)
    x = raw.astype(np.float32) / 255.0
    spatial = x.shape[1:] if net.dims == 2 else x.shape
    extra = []
    for n in spatial:
        out = n
        while True:
            try:
                if valid_output_size(out + 2 * m, net.depth) == out:
                    break
            except ValueError:
                pass
            out += 1
        extra.append(out - n)
    assert all(e < step for e in extra)
    pad = [(m, m + e) for e in extra]
    if net.dims == 2:
        padded = np.stack([np.pad(s, pad, mode="reflect") for s in x])[:, None]
    else:
        padded = np.pad(x, pad, mode="reflect")[None, None]
    t = torch.from_numpy(padded)

    def prob(inp):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            logits = net(inp)
        return torch.softmax(logits.float(), dim=1)[:, 1:2]

    if not tta:
        p = prob(t)
    elif tta == "flips":  # identity, flip x, flip y, flip both
        p = sum(torch.flip(prob(torch.flip(t, d)), d) if d else prob(t) for d in ((), (-1,), (-2,), (-2, -1))) / 4
    else:
        p = 0
        for flip in (False, True):
            for k in range(4):
                f = torch.flip(t, (-1,)) if flip else t
                q = torch.rot90(prob(torch.rot90(f, k, (-2, -1))), -k, (-2, -1))
                p = p + (torch.flip(q, (-1,)) if flip else q)
        p = p / 8
    p = p[:, 0].numpy() if net.dims == 2 else p[0, 0].numpy()
    return p[tuple(slice(0, n) for n in raw.shape)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict:
    """A synthetic EM stack (3, 70, 90), chunks (1, 32, 32), and a depth-3 2D U-Net checkpoint."""
    root = tmp_path_factory.mktemp("predict")
    raw = synthesize((3, 70, 90), seed=1).raw
    net = make_net()
    ckpt = save_checkpoint(root / "net.pt", net)
    return {
        "root": root,
        "raw": raw,
        "raw_path": write_image(root / "raw.ome.zarr", raw, (1, 32, 32)),
        "net": net,
        "ckpt": ckpt,
        # The whole-slice forward pass in each precision this CPU runs natively.
        "expected": {p: reference(net, raw, precision=p) for p in ("float32", "bfloat16") if p == "float32" or cpu_bf16_native()},
    }


# ------------------------------------------------------------- tiling invariance


@pytest.mark.parametrize(
    ("tile", "block", "workers"),
    [(None, None, 1), ([16], None, 1), ([24, 40], [1, 32, 64], 2), ([8], [3, 64, 96], 1), ([72, 92], [2, 96, 96], 2)],
)
def test_tiled_equals_whole_slice_forward(stack, tmp_path, tile, block, workers, precision) -> None:
    dest = tmp_path / "p.ome.zarr"
    result = predict(stack["ckpt"], stack["raw_path"], dest, tile=tile, block=block, workers=workers, batch=3,
                     precision=precision)  # fmt: skip
    assert result.committed and result.computed == result.total == len(result.plan.blocks())
    out = read_probabilities(dest)
    assert out.shape == stack["raw"].shape and out.dtype == np.float32
    assert_matches_reference(out, stack["expected"][precision], precision)
    assert image_metadata(dest).attrs["unet_pipe"]["compute"]["precision"] == precision
    assert 0.05 < out.std()  # a non-trivial output: the comparison means something
    meta = image_metadata(dest)
    assert meta.chunks == (1, 32, 32) and meta.voxel_size == (0.05, 0.004, 0.004)
    assert meta.attrs["unet_pipe"]["probability_scale"] == 1.0


def test_tta_equals_whole_slice_tta_and_is_rotation_equivariant(tmp_path, precision) -> None:
    # 64 x 64 is a valid output size of depth 3 (multiple of 4): the mirrored whole-slice window is
    # symmetric, so the 8-fold average commutes with rotating the input.
    raw = synthesize((2, 64, 64), seed=3).raw
    net = make_net(seed=1)
    ckpt = save_checkpoint(tmp_path / "n.pt", net)
    expected = reference(net, raw, tta=True, precision=precision)
    out = {}
    for name, data in {"raw": raw, "rot": np.rot90(raw, 1, axes=(1, 2)).copy()}.items():
        src = write_image(tmp_path / f"{name}.ome.zarr", data, (1, 32, 32))
        predict(ckpt, src, tmp_path / f"{name}.p.ome.zarr", tile=16, tta=True, precision=precision)
        out[name] = read_probabilities(tmp_path / f"{name}.p.ome.zarr")
    assert_matches_reference(out["raw"], expected, precision)
    np.testing.assert_allclose(np.rot90(out["raw"], 1, axes=(1, 2)), out["rot"], rtol=0, atol=TOL[precision])
    assert np.abs(expected - reference(net, raw, precision=precision)).max() > 1e-3  # TTA really changes the result


def test_tta_flips_equals_whole_slice_mirror_average_and_is_flip_equivariant(tmp_path, precision) -> None:
    raw = synthesize((2, 64, 64), seed=3).raw
    net = make_net(seed=1)
    ckpt = save_checkpoint(tmp_path / "n.pt", net)
    expected = reference(net, raw, tta="flips", precision=precision)
    out = {}
    for name, data in {"raw": raw, "flip": raw[:, ::-1].copy()}.items():
        src = write_image(tmp_path / f"{name}.ome.zarr", data, (1, 32, 32))
        predict(ckpt, src, tmp_path / f"{name}.p.ome.zarr", tile=16, tta="flips", precision=precision)
        out[name] = read_probabilities(tmp_path / f"{name}.p.ome.zarr")
    assert_matches_reference(out["raw"], expected, precision)
    np.testing.assert_allclose(out["raw"][:, ::-1], out["flip"], rtol=0, atol=TOL[precision])
    assert np.abs(expected - reference(net, raw, tta=True, precision=precision)).max() > 1e-3  # not the 8-fold average
    with pytest.raises(ValueError, match="tta must be one of"):
        predict(ckpt, tmp_path / "raw.ome.zarr", tmp_path / "bad.p.ome.zarr", tta="rot")


def test_3d_model_tiled_equals_whole_volume(tmp_path, precision) -> None:
    raw = synthesize((10, 13, 11), seed=2).raw
    net = make_net(dims=3, depth=2, base=2)
    ckpt = save_checkpoint(tmp_path / "n3.pt", net)
    src = write_image(tmp_path / "raw.ome.zarr", raw, (4, 8, 8))
    expected = reference(net, raw, precision=precision)
    for tile, block in [(None, None), ([2, 4, 6], [4, 8, 16])]:
        dest = tmp_path / f"p{tile}.ome.zarr"
        result = predict(ckpt, src, dest, tile=tile, block=block, batch=2, precision=precision)
        assert result.plan.dims == 3
        assert_matches_reference(read_probabilities(dest), expected, precision)


@pytest.mark.parametrize(("dtype", "scale"), [("float16", 1.0), ("uint8", 1 / 255)])
def test_output_dtypes(stack, tmp_path, dtype, scale, precision) -> None:
    """The stored dtypes encode the float32 probabilities of the same run: exact per precision."""
    dest = tmp_path / "q.ome.zarr"
    predict(stack["ckpt"], stack["raw_path"], dest, tile=32, dtype=dtype, precision=precision)
    stored = open_image(dest)[:]
    assert stored.dtype == np.dtype(dtype)
    plain = tmp_path / "f.ome.zarr"
    predict(stack["ckpt"], stack["raw_path"], plain, tile=32, precision=precision)
    probs = read_probabilities(plain)
    assert_matches_reference(probs, stack["expected"][precision], precision)
    expected = probs.astype(np.float16) if dtype == "float16" else np.rint(probs * 255)
    np.testing.assert_allclose(stored.astype(np.float64), expected, rtol=0, atol=1e-3 if dtype == "float16" else 1)
    assert image_metadata(dest).attrs["unet_pipe"]["probability_scale"] == pytest.approx(scale)
    np.testing.assert_allclose(read_probabilities(dest), probs, atol=1e-3 if dtype == "float16" else 0.5 / 255 + 1e-6)


def test_real_isbi_slice(isbi_dir, tmp_path, precision) -> None:
    import tifffile

    with tifffile.TiffFile(isbi_dir / "test-volume.tif") as tif:
        raw = np.stack([tif.pages[z].asarray() for z in (0, 29)])[:, :200, :232]
    net = make_net(seed=4)
    ckpt = save_checkpoint(tmp_path / "n.pt", net)
    src = write_image(tmp_path / "isbi.ome.zarr", raw, (1, 128, 128))
    predict(ckpt, src, tmp_path / "p.ome.zarr", tile=[48, 64], workers=2, precision=precision)
    expected = reference(net, raw, precision=precision)
    assert_matches_reference(read_probabilities(tmp_path / "p.ome.zarr"), expected, precision)


@pytest.mark.gpu
def test_cuda_gives_the_cpu_result(stack, tmp_path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    exact = tmp_path / "fp32.ome.zarr"
    predict(stack["ckpt"], stack["raw_path"], exact, tile=[24, 40], device="cuda", precision="float32", batch=3)
    np.testing.assert_allclose(read_probabilities(exact), stack["expected"]["float32"], rtol=0, atol=1e-4)
    mixed = tmp_path / "amp.ome.zarr"
    predict(stack["ckpt"], stack["raw_path"], mixed, device="cuda", tta=True)
    np.testing.assert_allclose(read_probabilities(mixed), reference(stack["net"], stack["raw"], tta=True), atol=2e-2)


# ------------------------------------------------------------------ safety


def test_foreign_architecture_is_refused(stack, tmp_path) -> None:
    dest = tmp_path / "x.ome.zarr"
    with pytest.raises(CheckpointError, match="depth: checkpoint 3 vs expected 5"):
        predict(stack["ckpt"], stack["raw_path"], dest, expected_arch={"depth": 5, "base_channels": 4})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        predict(junk, stack["raw_path"], dest)
    assert not dest.exists() and not dest.with_name(dest.name + ".partial").exists()


def test_wrong_dimensionality_is_refused(stack, tmp_path) -> None:
    group = zarr.open_group(str(tmp_path / "flat.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(8, 8), dtype="u1")
    group.attrs["multiscales"] = [
        {"version": "0.4", "axes": [{"name": "y"}, {"name": "x"}],
         "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}]}
    ]  # fmt: skip
    with pytest.raises(InputError, match="expected a 3D"):
        predict(stack["ckpt"], tmp_path / "flat.ome.zarr", tmp_path / "y.ome.zarr")
    assert not (tmp_path / "y.ome.zarr.partial").exists()


def test_existing_output_is_not_overwritten(stack, tmp_path) -> None:
    other = write_image(tmp_path / "other.ome.zarr", np.full((2, 4, 4), 7, np.uint8), (1, 4, 4))
    with pytest.raises(OutputError, match="already exists"):
        predict(stack["ckpt"], stack["raw_path"], other)
    np.testing.assert_array_equal(open_image(other)[:], 7)


# ------------------------------------------------------- resume and sharding


def test_shards_then_finalize_equal_a_single_run(stack, tmp_path, precision) -> None:
    single = tmp_path / "single.ome.zarr"
    args = dict(tile=32, block=[1, 32, 32], precision=precision)
    predict(stack["ckpt"], stack["raw_path"], single, **args)
    dest = tmp_path / "sharded.ome.zarr"
    with pytest.raises(OutputError, match="--prepare"):
        predict(stack["ckpt"], stack["raw_path"], dest, shard=(0, 2), **args)
    prepared = predict(stack["ckpt"], stack["raw_path"], dest, prepare_only=True, **args)
    assert prepared.computed == 0 and not dest.exists()
    with pytest.raises(OutputError, match="no shard has run yet"):
        finalize(stack["ckpt"], stack["raw_path"], dest, **args)
    first = predict(stack["ckpt"], stack["raw_path"], dest, shard=(0, 2), **args)
    assert first.total == 9 and not first.committed  # z = 0 of 3 slices, 3 x 3 blocks per slice
    with pytest.raises(OutputError, match="18 of 27 blocks are not computed"):
        finalize(stack["ckpt"], stack["raw_path"], dest, **args)
    second = predict(stack["ckpt"], stack["raw_path"], dest, shard=(1, 2), **args)
    assert second.total == 18
    finalize(stack["ckpt"], stack["raw_path"], dest, **args)
    np.testing.assert_array_equal(open_image(dest)[:], open_image(single)[:])


def test_resume_recomputes_only_unfinished_blocks(stack, tmp_path, precision) -> None:
    dest = tmp_path / "r.ome.zarr"
    args = dict(tile=32, block=[1, 32, 32], precision=precision)
    predict(stack["ckpt"], stack["raw_path"], dest, prepare_only=True, **args)
    predict(stack["ckpt"], stack["raw_path"], dest, z_range=(1, 2), **args)  # an "interrupted" run
    resumed = predict(stack["ckpt"], stack["raw_path"], dest, **args)
    assert (resumed.computed, resumed.total) == (18, 27)
    assert_matches_reference(read_probabilities(dest), stack["expected"][precision], precision)
    uninterrupted = tmp_path / "u.ome.zarr"
    predict(stack["ckpt"], stack["raw_path"], uninterrupted, **args)
    assert open_image(dest)[:].tobytes() == open_image(uninterrupted)[:].tobytes()


def test_blocks_write_their_pyramid_levels_and_resume_bit_identical(tmp_path, monkeypatch, precision) -> None:
    """Full-width blocks write their region of every pyramid level with level 0 (no re-read at publish);
    a run killed mid-way resumes with the levels of its finished blocks, and every level equals the
    pyramid built from level 0 at publish (the sharded path)."""
    import unet_pipe.blockwise as blockwise
    import unet_pipe.io as io_module

    raw = synthesize((3, 136, 60), seed=4).raw  # 136 rows: bands 0-64, 64-128 and a short last one
    src = write_image(tmp_path / "raw.ome.zarr", raw, (1, 16, 16))
    ckpt = save_checkpoint(tmp_path / "n.pt", make_net(seed=3))
    args = dict(tile=32, block=[1, 64, 60], precision=precision)
    rebuilds = []
    real_pyramid = io_module.write_pyramid
    monkeypatch.setattr(io_module, "write_pyramid", lambda *a, **k: (rebuilds.append(1), real_pyramid(*a, **k))[1])
    streamed = predict(ckpt, src, tmp_path / "streamed.ome.zarr", workers=1, **args)
    assert not rebuilds  # the levels came with the blocks
    assert streams_pyramid(streamed.plan, 2) and not streams_pyramid(dataclasses.replace(streamed.plan, block=(1, 32, 60)), 2)
    rebuilt = tmp_path / "rebuilt.ome.zarr"
    predict(ckpt, src, rebuilt, prepare_only=True, **args)
    predict(ckpt, src, rebuilt, shard=(0, 1), **args)
    finalize(ckpt, src, rebuilt, **args)
    assert len(rebuilds) == 1  # shards leave the pyramid to the publish

    real, calls = blockwise.run_tiles, []

    def killed_at_the_fifth_block(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(*a, **k)

    killed = tmp_path / "killed.ome.zarr"
    monkeypatch.setattr(blockwise, "run_tiles", killed_at_the_fifth_block)
    with pytest.raises(RuntimeError, match="killed"):
        predict(ckpt, src, killed, workers=1, **args)
    staging = zarr.open_group(tmp_path / "killed.ome.zarr.partial", mode="r")
    assert staging.attrs[ATTRS_KEY]["staging"]["streamed_levels"] == 2
    monkeypatch.setattr(blockwise, "run_tiles", real)
    resumed = predict(ckpt, src, killed, workers=1, **args)
    assert (resumed.computed, resumed.total) == (5, 9) and len(rebuilds) == 1
    reference = zarr.open_group(tmp_path / "streamed.ome.zarr", mode="r")
    assert sorted(reference.array_keys()) == ["0", "1", "2"]
    for dest in (rebuilt, killed):
        group = zarr.open_group(dest, mode="r")
        assert sorted(group.array_keys()) == ["0", "1", "2"]
        for level in "012":
            assert group[level][:].tobytes() == reference[level][:].tobytes(), (dest.name, level)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "unet_pipe", "-q", "predict", *map(str, args)]


def test_sigkill_then_restart_is_bit_identical(tmp_path, precision) -> None:
    raw = synthesize((12, 96, 96), seed=5).raw
    ckpt = save_checkpoint(tmp_path / "n.pt", make_net(base=8, seed=2))
    src = write_image(tmp_path / "raw.ome.zarr", raw, (1, 32, 32))
    options = ["--tile", "32", "--block", "1", "32", "32", "--workers", "1", "--batch", "1", "--precision", precision]
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    dest = tmp_path / "killed.ome.zarr"
    staging = tmp_path / "killed.ome.zarr.partial"
    proc = subprocess.Popen(_cli(ckpt, src, dest, *options), env=env)
    deadline = time.monotonic() + 120
    while not ((staging / _DONE_DIR).is_dir() and len(list((staging / _DONE_DIR).iterdir())) >= 5):
        assert proc.poll() is None, "predict finished before it could be killed; make the stack larger"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [p.read_text() for p in (staging / _DONE_DIR).iterdir() if not p.name.endswith(".tmp")]
    assert 5 <= len(done) < 108 and not dest.exists()

    def chunk_file(root: Path, key: str) -> Path:  # block "z0:z1,y0:y1,x0:x1" = one chunk (1, 32, 32)
        (z, _), (y, _), (x, _) = (map(int, part.split(":")) for part in key.split(","))
        return root / "0" / str(z) / str(y // 32) / str(x // 32)

    stamps = {key: chunk_file(staging, key).stat().st_mtime_ns for key in done}
    subprocess.run(_cli(ckpt, src, dest, *options), env=env, check=True)
    clean = tmp_path / "clean.ome.zarr"  # uninterrupted, in-process (same thread count as the CLI)
    predict(ckpt, src, clean, tile=32, block=[1, 32, 32], workers=1, batch=1, precision=precision)
    assert open_image(dest)[:].tobytes() == open_image(clean)[:].tobytes()
    # Finished blocks were not recomputed: their chunk files are the ones written before the kill.
    assert {key: chunk_file(dest, key).stat().st_mtime_ns for key in done} == stamps


# -------------------------------------------------------------- CLI and Dask


def test_cli_predict_and_one_line_errors(stack, tmp_path, run_cli, precision) -> None:
    dest = tmp_path / "c.ome.zarr"
    code, _, err = run_cli("predict", stack["ckpt"], stack["raw_path"], dest, "--tile", "32", "--dtype", "uint8",
                           "--workers", "1", "--block", "1", "64", "64", "--precision", precision)  # fmt: skip
    assert code == 0, err
    assert_matches_reference(read_probabilities(dest), stack["expected"][precision], precision, atol=0.5 / 255)
    code, _, err = run_cli("predict", stack["ckpt"], stack["raw_path"], dest)
    assert code == 2 and err.strip().count("\n") == 0 and "already exists" in err
    code, _, err = run_cli("predict", stack["ckpt"], stack["raw_path"], tmp_path / "d.ome.zarr", "--tile", "30")
    assert code == 2 and "multiple of the pooling factor 4" in err
    code, _, err = run_cli("predict", stack["ckpt"], stack["raw_path"], tmp_path / "e.ome.zarr", "--workers", "64",
                           "--device", "cpu", "--threads", "2")  # fmt: skip
    assert code == 2 and "oversubscribe" in err


def test_distributed_scheduler(stack, tmp_path, precision) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dest = tmp_path / "d.ome.zarr"
        result = predict(stack["ckpt"], stack["raw_path"], dest, tile=32, block=[1, 32, 32],
                         scheduler=cluster.scheduler_address, precision=precision)  # fmt: skip
    assert result.computed == 27
    assert_matches_reference(read_probabilities(dest), stack["expected"][precision], precision)
    local = tmp_path / "l.ome.zarr"  # the same blocks and tiles on the local scheduler: the same bytes
    predict(stack["ckpt"], stack["raw_path"], local, tile=32, block=[1, 32, 32], precision=precision)
    assert open_image(dest)[:].tobytes() == open_image(local)[:].tobytes()



def test_resume_refuses_another_device_kind(stack, tmp_path) -> None:
    dest = tmp_path / "k.ome.zarr"
    predict(stack["ckpt"], stack["raw_path"], dest, prepare_only=True, tile=32)
    plan_file = tmp_path / "k.ome.zarr.partial" / "predict_plan.json"
    predict(stack["ckpt"], stack["raw_path"], dest, shard=(0, 3), tile=32)
    data = json.loads(plan_file.read_text())
    assert data["device"] == "cpu" and data["plan"]["tile"] == [1, 32, 32]
    plan_file.write_text(json.dumps({**data, "device": "cuda"}))  # as if a GPU shard had started it
    with pytest.raises(ConfigError, match="was started on cuda"):
        predict(stack["ckpt"], stack["raw_path"], dest, shard=(1, 3), tile=32)


def test_percentile_normalisation_makes_dtype_irrelevant(tmp_path, precision) -> None:
    """A checkpoint with the percentile rule: the stack is normalised by its own 1st/99th
    percentiles, so equal gray values stored as uint8, uint16 or float32 give equal
    probabilities (the legacy dtype scaling gave uint16 inputs 1/257 of the uint8 ones)."""
    from unet_pipe.intensity import intensity_range, normalize_raw

    net = make_net()
    ckpt = tmp_path / "m.pt"
    rule = {"rule": "percentile", "percentiles": [1.0, 99.0], "volumes": {}}
    save_checkpoint(ckpt, net, extra={"input_normalization": rule})
    values = np.random.default_rng(3).integers(20, 200, (2, 40, 36)).astype(np.uint8)
    outs = []
    for dtype in (np.uint8, np.uint16, np.float32):
        raw = write_image(tmp_path / f"raw_{np.dtype(dtype).name}.ome.zarr", values.astype(dtype), (1, 16, 16))
        predict(ckpt, raw, tmp_path / f"p_{np.dtype(dtype).name}.ome.zarr", tile=16, threads=1, precision=precision)
        outs.append(read_probabilities(tmp_path / f"p_{np.dtype(dtype).name}.ome.zarr"))
        attrs = image_metadata(tmp_path / f"p_{np.dtype(dtype).name}.ome.zarr").attrs["unet_pipe"]
        assert attrs["provenance"]["params"]["intensity"] == pytest.approx(intensity_range(values).to_list())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    # And the values are the network's on (raw - low) / (high - low): the reference scales
    # by 1/255 itself, so hand it raw values pre-mapped to 255 * normalised.
    expected = reference(net, 255.0 * normalize_raw(values, intensity_range(values)), precision=precision)
    assert_matches_reference(outs[0], expected, precision)


# ------------------------------------------------------------------ the request
# PredictRequest: predict's settings, checked once at the entry and recorded as before
# (no forward pass here, so no precision).


def test_record_is_the_fingerprinted_request() -> None:
    request = PredictRequest(tile=[100, 92], block=(1, 64.0, 64), batch=3, tta="flips", dtype="uint8",
                             precision="float32", ngff="0.5")
    assert request.record(IntensityRange(1.5, 2.0)) == {
        "tile": [100, 92], "block": [1, 64, 64], "batch": 3, "tta": "flips", "dtype": "uint8",
        "precision": "float32", "intensity": [1.5, 2.0], "ngff": "0.5",
    }
    assert PredictRequest(tile=100).record(None) == {
        "tile": [100], "block": None, "batch": None, "tta": False, "dtype": "float32", "precision": "auto",
        "intensity": None, "ngff": "0.4",
    }


@pytest.mark.parametrize(("option", "error", "message"), [
    ({"tta": "rotations"}, ValueError, "tta must be one of"),
    ({"tta": 1}, ValueError, "tta must be one of"),  # 1 == True, but not a mode
    ({"dtype": "int8"}, ConfigError, "output dtype must be one of"),
    ({"precision": "half"}, ConfigError, "precision must be one of auto, float32, bfloat16, got 'half'"),
    ({"ngff": "0.3"}, ValueError, "NGFF version must be one of"),
])
def test_a_bad_setting_is_refused_when_the_request_is_made(option, error, message) -> None:
    with pytest.raises(error, match=message):
        PredictRequest(**option)


def test_predict_checks_its_settings_before_reading_anything(tmp_path) -> None:
    # Neither the checkpoint nor the input exists: the setting is what is refused.
    with pytest.raises(ConfigError, match="output dtype"):
        predict(tmp_path / "none.pt", tmp_path / "none.ome.zarr", tmp_path / "out.ome.zarr", dtype="int8")
