"""Precision: bf16 detection, resolution, bf16 vs fp32 agreement, exactness within one precision."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from test_predict import make_net, reference, write_image
from test_train import _assert_same_checkpoint, _config

from unet_pipe import precision as precision_module
from unet_pipe.intensity import normalize_raw
from unet_pipe.errors import CheckpointError, ConfigError, OutputError
from unet_pipe.io import image_metadata
from unet_pipe.model import load_checkpoint, save_checkpoint
from unet_pipe.model import UNet, fused_conv_relu_available
from unet_pipe.precision import CPU_BF16_ENV, cpu_bf16_native, resolve_precision
from unet_pipe.predict import Predictor, predict, read_probabilities
from unet_pipe.machine import cpu_model
from unet_pipe.synth import synthesize
from unet_pipe.train import predict_probabilities, train

# bfloat16 keeps 8 significant bits: every convolution output is rounded to a relative
# 2^-9 = 0.2 %, and the rounding errors of the 5 conv layers of make_net() compound in the
# logits.  Measured on make_net() (depth 3, 4 channels, random weights, biases in +-0.1) over
# the synthetic stack: max |p_bf16 - p_fp32| = 0.0153, mean 0.0015 (AMD EPYC, emulated bf16;
# the AMX machine measured 2.4e-4 on the paper's net).  The bounds are twice that.
BF16_MAX_ABS = 0.03
BF16_MEAN_ABS = 0.003


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    return synthesize((3, 70, 90), seed=1).raw


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ({"avx2", "fma", "avx512f"}, False),  # AVX-512 without its BF16 extension: emulated
        ({"avx2", "avx512f", "avx512_bf16"}, True),  # Cooper Lake / Zen 4
        ({"avx2", "amx_tile", "amx_bf16", "amx_int8"}, True),  # Sapphire Rapids
        ({"avx2", "amx_tile", "amx_int8"}, False),  # AMX without its BF16 unit
    ],
)
def test_bf16_detection_reads_the_cpu_flags(flags, native, monkeypatch) -> None:
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)  # the suite may run with auto forced to float32
    assert cpu_bf16_native(flags) is native
    # resolve_precision asks the machine's flags: patch them, and `auto` follows.
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset(flags))
    assert resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads Linux's /proc/cpuinfo")
def test_this_machine_resolves_auto_from_its_own_flags(monkeypatch) -> None:
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    with open("/proc/cpuinfo") as fh:
        flags = next(line for line in fh if line.startswith("flags")).split(":", 1)[1].split()
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")


def test_environment_overrides_the_detection(monkeypatch) -> None:
    """UNET_PIPE_CPU_BF16=0 makes auto float32 on an AMX CPU (e.g. to run the suite both ways); 1 claims bf16."""
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"  # an explicit request still wins
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision("auto", "cpu") == "bfloat16"
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="UNET_PIPE_CPU_BF16 must be 0 or 1, got 'yes'"):
        resolve_precision("auto", "cpu")


def test_bad_precision_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="precision must be one of auto, float32, bfloat16, got 'half'"):
        resolve_precision("half", "cpu")
    with pytest.raises(ConfigError, match="float16 is for CUDA only"):
        resolve_precision("float16", "cpu")


# --------------------------------------------------------------------------- forward passes


def test_bf16_agrees_with_fp32_within_the_stated_tolerance(raw) -> None:
    net = make_net()
    windows = raw[:, None, :68, :88]  # whole windows of a valid input size (no tiling)
    fp32 = Predictor(net, "cpu", precision="float32")(windows)
    bf16 = Predictor(net, "cpu", precision="bfloat16")(windows)
    diff = np.abs(bf16 - fp32)
    assert diff.max() <= BF16_MAX_ABS and diff.mean() <= BF16_MEAN_ABS
    assert diff.max() > 1e-4  # bf16 really ran (fp32 reruns differ by < 1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_fused_bf16_forward_is_bit_identical_to_the_plain_one(dims) -> None:
    """UNet.forward_inference (oneDNN convolution + ReLU in one call, bf16 on the CPU) ==
    the plain forward of the same bf16 model, bit for bit; float32 is not fused."""
    torch.manual_seed(0)
    net = make_net(dims=dims, depth=3 if dims == 2 else 2, base=8)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    shape = (2, 1, 68, 84) if dims == 2 else (1, 1, 20, 28, 36)
    x = torch.rand(shape).contiguous(memory_format=fmt)
    bf16 = UNet(**net.arch).eval()
    bf16.load_state_dict(net.state_dict())
    bf16 = bf16.to(dtype=torch.bfloat16, memory_format=fmt)
    xb = x.to(torch.bfloat16)
    with torch.inference_mode():
        plain, fused = bf16(xb), bf16.forward_inference(xb)
        assert fused_conv_relu_available(xb) and not fused_conv_relu_available(x)
        assert torch.equal(plain, fused)
        # And the same as bfloat16 autocast of the float32 model (what training and validation run).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = net.to(memory_format=fmt)(x)
        assert torch.equal(auto, fused)
        assert torch.equal(net.forward_inference(x), net(x))  # float32: the plain forward
    with torch.no_grad():
        grad_free = bf16.forward_inference(xb)
        assert torch.equal(grad_free, plain)
        # The weights are packed once per input shape (a smaller last batch gets its own) and
        # packed again when they change in place (their version counter).
        assert torch.equal(bf16.forward_inference(xb[:1]), bf16(xb[:1]))
        for p in bf16.parameters():
            p.mul_(-0.5)
        assert torch.equal(bf16.forward_inference(xb), bf16(xb))
        assert not torch.equal(bf16.forward_inference(xb), plain)


def test_predictor_bf16_casts_a_copy_and_matches_autocast(raw) -> None:
    """The bf16 predictor casts the weights once, on a copy; its output is autocast's."""
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    windows = raw[:, None, :68, :88]
    predictor = Predictor(net, "cpu", precision="bfloat16")
    assert predictor.cast and "fused" in predictor.path
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in net.state_dict().items())
    got = predictor(windows)
    x = torch.from_numpy(normalize_raw(windows))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    expected = torch.softmax(logits.float(), dim=1)[:, 1:2].numpy()
    np.testing.assert_array_equal(got, expected)


def test_bf16_reruns_are_bit_identical_and_tiling_invariant(raw) -> None:
    """Within bf16: two runs identical; tiled == whole.

    The tiles see the same mirrored context, so every output pixel has the same
    inputs; only a reassociated float32 accumulation (another tile width) can
    round an activation to a neighbouring bf16 value.  Measured: identical here
    (AMD EPYC); bound: >= 99 % of pixels identical, the rest within the bf16
    tolerance.
    """
    net = make_net()
    x = normalize_raw(raw)
    cpu = torch.device("cpu")
    whole = predict_probabilities(net, x, cpu, precision="bfloat16")
    again = predict_probabilities(net, x, cpu, precision="bfloat16")
    tiled = predict_probabilities(net, x, cpu, max_tile=12, precision="bfloat16")
    assert np.array_equal(whole, again)
    assert np.mean(tiled == whole) >= 0.99 and np.abs(tiled - whole).max() <= BF16_MAX_ABS
    fp32 = predict_probabilities(net, x, cpu, precision="float32")
    assert np.abs(whole - fp32).max() <= BF16_MAX_ABS


def test_predict_in_bf16_records_precision_and_refuses_mixing(tmp_path, raw, monkeypatch) -> None:
    net = make_net()
    ckpt = save_checkpoint(tmp_path / "net.pt", net)
    src = write_image(tmp_path / "raw.ome.zarr", raw, (1, 32, 32))
    expected = reference(net, raw)
    outs = {}
    for name, tile in (("a", [24, 40]), ("b", [48, 48]), ("c", [24, 40])):
        dest = tmp_path / f"{name}.ome.zarr"
        predict(ckpt, src, dest, tile=tile, device="cpu", precision="bfloat16", threads=1)
        outs[name] = read_probabilities(dest)
    assert np.array_equal(outs["a"], outs["c"])  # a rerun is bit-identical
    assert np.mean(outs["a"] == outs["b"]) >= 0.99 and np.abs(outs["a"] - outs["b"]).max() <= BF16_MAX_ABS
    assert np.abs(outs["a"] - expected).max() <= BF16_MAX_ABS
    own = image_metadata(tmp_path / "a.ome.zarr").attrs["unet_pipe"]
    assert own["provenance"]["params"]["precision"] == "bfloat16"
    assert own["provenance"]["params"]["precision_used"] == "bfloat16"
    assert own["compute"]["precision"] == "bfloat16" and own["compute"]["cpu_model"] == cpu_model()
    assert own["provenance"]["cpu"] == cpu_model()

    # A staging store begun in one precision is not continued in another, even when both
    # ask for `auto`: the first machine (patched) resolves it to bf16, the second to fp32.
    import unet_pipe.predict as predict_module

    dest = tmp_path / "mixed.ome.zarr"
    predict(ckpt, src, dest, tile=[24, 40], device="cpu", precision="auto", prepare_only=True)
    with monkeypatch.context() as patch:
        patch.setattr(predict_module, "resolve_precision", lambda *_: "bfloat16")
        predict(ckpt, src, dest, tile=[24, 40], device="cpu", precision="auto", z_range=(0, 1), threads=1)
    plan = json.loads((dest.with_name(dest.name + ".partial") / "predict_plan.json").read_text())
    assert plan["precision"] == "bfloat16"
    monkeypatch.setattr(predict_module, "resolve_precision", lambda *_: "float32")
    with pytest.raises(ConfigError, match="started in bfloat16 but this machine resolves the precision to float32"):
        predict(ckpt, src, dest, tile=[24, 40], device="cpu", precision="auto", z_range=(1, 3), threads=1)
    # Another requested precision is another request: the fingerprint differs, no shard joins.
    with pytest.raises(OutputError, match="no matching staging store"):
        predict(ckpt, src, dest, tile=[24, 40], device="cpu", precision="bfloat16", z_range=(1, 3), threads=1)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def stores() -> dict:
    stack = synthesize((3, 40, 40), seed=1)
    weights = np.where(stack.labels == 0, 3.0, 1.0).astype(np.float32)
    return {"s": {"raw": stack.raw, "labels": stack.labels, "weights": weights}}


def test_bf16_training_reruns_bit_identically_and_records_its_precision(tmp_path, stores) -> None:
    config = _config(precision="bfloat16")
    first = train(config, stores, tmp_path / "a.pt", device="cpu", threads=1)
    train(config, stores, tmp_path / "b.pt", device="cpu", threads=1)
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    _assert_same_checkpoint(a, b)
    assert first["precision"] == "bfloat16" and first["cpu_model"] == cpu_model()
    assert a["extra"]["precision"] == "bfloat16" and a["extra"]["cpu_model"] == cpu_model()
    assert a["extra"]["scaler"] is None  # bf16 has float32's range: no loss scaling
    # bf16 is a different computation (not silently fp32), yet close to it after 6 steps.
    train(_config(precision="float32"), stores, tmp_path / "f.pt", device="cpu", threads=1)
    f = load_checkpoint(tmp_path / "f.pt")
    gaps = [float((a["model_state"][k] - f["model_state"][k]).abs().max()) for k in f["model_state"]]
    assert 0 < max(gaps) < 1e-2


def test_training_resume_refuses_another_precision(tmp_path, stores) -> None:
    train(_config(precision="bfloat16"), stores, tmp_path / "r.pt", device="cpu", threads=1, until_step=3)
    with pytest.raises(CheckpointError, match="was trained in bfloat16 but this run resolves the precision to float32"):
        train(_config(precision="float32"), stores, tmp_path / "r.pt", device="cpu", threads=1, resume=True)


# --------------------------------------------------------------------------- CLI


def test_cli_precision_options(tmp_path, raw, stores, run_cli) -> None:
    """--precision reaches predict (stored attributes) and train (checkpoint); a config sets the default."""
    import yaml

    net = make_net()
    ckpt = save_checkpoint(tmp_path / "net.pt", net)
    src = write_image(tmp_path / "slice.ome.zarr", raw[:1], (1, 32, 32))
    code, _, err = run_cli("-q", "predict", ckpt, src, tmp_path / "p.ome.zarr", "--precision", "bfloat16",
                           "--threads", "1")  # fmt: skip
    assert code == 0, err
    assert image_metadata(tmp_path / "p.ome.zarr").attrs["unet_pipe"]["compute"]["precision"] == "bfloat16"
    with pytest.raises(SystemExit) as exited:  # argparse's own exit for a bad choice
        run_cli("predict", ckpt, src, tmp_path / "q.ome.zarr", "--precision", "half")
    assert exited.value.code == 2

    from unet_pipe.io import StagedImage

    args = []
    for key, array in stores["s"].items():
        staged = StagedImage(tmp_path / f"{key}.ome.zarr", shape=array.shape, dtype=array.dtype, chunks=(1, 40, 40),
                             kind="labels" if key == "labels" else "image")  # fmt: skip
        staged.array[:] = array
        staged.commit(pyramid_levels=0)
        args += [f"--{key}", f"s={tmp_path / f'{key}.ome.zarr'}"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(steps=2, val_every=5, precision="float32")))
    code, _, err = run_cli("-q", "train", tmp_path / "c.yaml", *args, "--out", tmp_path / "m.pt", "--threads", "1",
                           "--precision", "bfloat16")  # fmt: skip
    assert code == 0, err
    trained = load_checkpoint(tmp_path / "m.pt")
    assert trained["extra"]["precision"] == "bfloat16" and trained["config"]["train"]["precision"] == "bfloat16"
    code, _, err = run_cli("-q", "train", tmp_path / "c.yaml", *args, "--out", tmp_path / "n.pt", "--threads", "1")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "n.pt")["extra"]["precision"] == "float32"  # the config's setting


def test_cuda_resolution_without_touching_a_gpu(monkeypatch) -> None:
    """auto on CUDA: training float16 (with a scaler); prediction bf16 where the GPU has it, else fp16."""
    assert resolve_precision("auto", "cuda", training=True) == "float16"
    assert resolve_precision("bfloat16", "cuda:1", training=True) == "bfloat16"
    for supported, expected in ((True, "bfloat16"), (False, "float16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert resolve_precision("auto", "cuda") == expected
