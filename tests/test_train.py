"""Training: weighted loss by hand, schedule, validation plumbing, determinism, resume, overfit, CLI,
sparse labels."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from unet_pipe.config import validate_config
from unet_pipe.sampling import Volume
from unet_pipe.errors import CheckpointError, ConfigError, OutputError
from unet_pipe.ingest import ingest_tiff
from unet_pipe.io import open_image
from unet_pipe.model import UNet, load_checkpoint
from unet_pipe.postprocess import postprocess
from unet_pipe.predict import predict
from unet_pipe.synth import synthesize
from unet_pipe.train import (
    CSV_COLUMNS,
    iter_rows,
    learning_rate,
    load_validation,
    partial_path,
    predict_probabilities,
    train,
    validate,
    weighted_cross_entropy,
)

# One thread: tiny tensors on a shared machine are many times slower with two
# (OpenMP barriers under load), and the results are the same.
def _train(*args, **kwargs):
    return train(*args, threads=1, **kwargs)


NO_AUGMENT = {"elastic_sigma": 0.0, "rotate": False, "flip": False, "gray_value": False}


# --------------------------------------------------------------------------- loss


def test_weighted_cross_entropy_by_hand() -> None:
    """1 image, 2 classes, 2 x 2 pixels: mean_x w(x) * -log softmax(logits)[label(x)]."""
    logits = torch.tensor([[[[0.0, 1.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]]])  # (1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [0, 1]]])
    weights = torch.tensor([[[1.0, 2.0], [0.5, 4.0]]])
    # Per pixel: (0,0) logits (0, 0) label 0 -> log 2; (0,1) (1, 0) label 1 -> log(1 + e);
    # (1,0) (2, 0) label 0 -> log(1 + e^-2); (1,1) (0, 3) label 1 -> log(1 + e^-3).
    ce = [math.log(2), math.log(1 + math.e), math.log(1 + math.exp(-2)), math.log(1 + math.exp(-3))]
    expected = (1.0 * ce[0] + 2.0 * ce[1] + 0.5 * ce[2] + 4.0 * ce[3]) / 4
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx(expected, rel=1e-6)
    # Uniform weights: torch's plain mean cross-entropy.
    ones = torch.ones_like(weights)
    assert weighted_cross_entropy(logits, target, ones).item() == pytest.approx(sum(ce) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        weighted_cross_entropy(logits, target, weights[:, :1])


def test_learning_rate_schedules() -> None:
    assert learning_rate(7, 10, 0.1, "constant") == 0.1
    assert [learning_rate(s, 4, 1.0, "cosine") for s in range(5)] == pytest.approx(
        [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0]
    )
    assert [learning_rate(s, 8, 1.0, "step") for s in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


# --------------------------------------------------------------------------- validation


class _Threshold(nn.Module):
    """A 'network' with the U-Net's geometry whose cell probability is sigmoid(100 (x - 0.5))."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.depth, self.dims, self.margin = depth, 2, 6 * 2 ** (depth - 1) - 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        centre = x[:, :, m:-m, m:-m] if m else x
        return torch.cat([torch.zeros_like(centre), 100 * (centre - 0.5)], dim=1)


def test_validate_with_a_formula_model() -> None:
    """raw = labels: perfect pixel and Rand error; inverted raw: every pixel wrong."""
    stack = synthesize((2, 40, 50), seed=3)
    vol = Volume("s", stack.labels, stack.labels, None, train=(0, 1), val=(0, 2))
    data = load_validation([vol], "binary", 255)
    device = torch.device("cpu")
    assert validate(_Threshold(), data, device, {}) == (0.0, 0.0)
    inverted = Volume("s", 255 - stack.labels, stack.labels, None, train=(0, 1), val=(0, 2))
    pixel, rand = validate(_Threshold(), load_validation([inverted], "binary", 255), device, {})
    assert pixel == 1.0 and rand > 0.5


def test_predict_probabilities_is_independent_of_the_tile_size() -> None:
    """Overlap-tile prediction with small tiles equals one big tile (valid convolutions)."""
    torch.manual_seed(0)
    net = UNet(depth=3, base_channels=4).eval()  # tiles must start on the 4-pixel pooling grid
    raw = np.random.default_rng(0).random((2, 37, 45), dtype=np.float32)
    whole = predict_probabilities(net, raw, torch.device("cpu"))
    tiled = predict_probabilities(net, raw, torch.device("cpu"), max_tile=10)
    assert whole.shape == raw.shape
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the loop


def _config(**train) -> dict:
    base = {
        "datasets": {"s": {"synthetic": {"shape": [3, 40, 40]}}},
        "model": {"depth": 2, "base_channels": 4, "dropout": 0.5},
        "train": {
            "datasets": {"s": {"train": [0, 2], "val": [2, 3]}},
            "tile": 44,
            "steps": 6,
            "lr": 0.01,
            "val_every": 3,
            "checkpoint_every": 3,
            "augment": {"elastic_sigma": 4.0, "shift": 2.0},
        },
    }
    base["train"].update(train)
    return validate_config(base)


@pytest.fixture(scope="module")
def stores() -> dict:
    stack = synthesize((3, 40, 40), seed=1)
    weights = np.where(stack.labels == 0, 3.0, 1.0).astype(np.float32)
    return {"s": {"raw": stack.raw, "labels": stack.labels, "weights": weights}}


def _assert_same_checkpoint(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    for pid, state in a["optimizer_state"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer_state"]["state"][pid]["momentum_buffer"])
    assert a["extra"]["tile_rng"] == b["extra"]["tile_rng"]
    assert torch.equal(a["extra"]["aug_rng"], b["extra"]["aug_rng"])
    assert torch.equal(a["torch_rng_state"], b["torch_rng_state"])


def _rows(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in iter_rows(path)]


def test_two_runs_are_bit_identical_and_csv_is_complete(tmp_path, stores) -> None:
    config = _config()
    r1 = _train(config, stores, tmp_path / "a.pt", tmp_path / "a.csv", device="cpu")
    r2 = _train(config, stores, tmp_path / "b.pt", tmp_path / "b.csv", device="cpu")
    assert torch.utils.deterministic.fill_uninitialized_memory  # train() restores torch's settings
    assert r1["finished"] and r1["step"] == 6 and r1["checkpoint"] == str(tmp_path / "a.pt")
    assert r2["finished"] and r2["step"] == 6
    assert not partial_path(tmp_path / "a.pt").exists()
    _assert_same_checkpoint(load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt"))
    rows = _rows(tmp_path / "a.csv")
    assert rows == _rows(tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["val_pixel_error"] is not None for r in rows] == [False, False, True, False, False, True]
    assert 0 <= rows[-1]["val_pixel_error"] <= 1 and 0 <= rows[-1]["val_rand_error"] <= 1
    assert rows[-1]["val_pixel_error"] == pytest.approx(r1["val_pixel_error"])
    assert [r["lr"] for r in rows] == pytest.approx([learning_rate(s, 6, 0.01, "cosine") for s in range(6)])
    ckpt = load_checkpoint(tmp_path / "a.pt")
    assert ckpt["config"] == config and ckpt["arch"]["base_channels"] == 4
    # A different seed gives a different model.
    other = copy.deepcopy(config)
    other["seed"] = 1
    _train(other, stores, tmp_path / "c.pt", device="cpu")
    c = load_checkpoint(tmp_path / "c.pt")["model_state"]
    assert not torch.equal(c["head.weight"], ckpt["model_state"]["head.weight"])


def test_batches_are_made_with_one_thread_and_the_loop_keeps_its_count(stores, monkeypatch) -> None:
    """The loop's batches are made with one OpenMP thread, set in torch's OpenMP runtime (not by
    torch.set_num_threads, which clears oneDNN's kernels); the loop's count is back afterwards, and
    the batches are those one thread made before (also by the torch.set_num_threads fallback)."""
    import sys

    import unet_pipe.train as tr

    config = _config(augment={"elastic_sigma": 4.0, "shift": 2.0, "interpolation": "bicubic"})
    sampler, augment = tr._training_inputs(config, stores)[:2]
    model, cpu = tr._new_model(config["model"], 0), torch.device("cpu")
    real, seen = tr._training_batch, []
    monkeypatch.setattr(tr, "_training_batch", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        maker = tr._BatchMaker(cpu, 2)
        if sys.platform == "linux" and torch.backends.openmp.is_available():
            assert maker.openmp  # the CPU wheel's libgomp, found by threadpoolctl
        (rng_a, gen_a), (rng_b, gen_b) = tr._derived_seeds(0), tr._derived_seeds(0)
        for fallback in (False, False, True):
            if fallback:
                maker.openmp = []
            got = maker(sampler, augment, rng_a, gen_a, model, cpu, 2)
            assert torch.get_num_threads() == 2
            torch.set_num_threads(1)  # as the loop made them before
            want = real(sampler, augment, rng_b, gen_b, model, cpu, 2)
            torch.set_num_threads(2)
            for g, w in zip(got, want):
                assert torch.equal(g, w)
        assert seen == [1, 1, 1]
        # Without threadpoolctl (an environment made before it was a dependency): the same, slower way.
        monkeypatch.setitem(sys.modules, "threadpoolctl", None)
        assert tr._BatchMaker(cpu, 2).openmp == []
    finally:
        torch.set_num_threads(previous)


def test_resume_is_bit_identical(tmp_path, stores) -> None:
    """Train 6 steps == train to step 3 (interrupted), then resume to 6."""
    config = _config()
    _train(config, stores, tmp_path / "full.pt", tmp_path / "full.csv", device="cpu")
    first = _train(config, stores, tmp_path / "r.pt", tmp_path / "r.csv", device="cpu", until_step=3)
    assert not first["finished"] and first["checkpoint"] == str(partial_path(tmp_path / "r.pt"))
    assert not (tmp_path / "r.pt").exists()
    # A crash after the checkpoint leaves extra CSV rows; the resumed run drops them.
    with open(tmp_path / "r.csv", "a") as fh:
        fh.write("4,9.9,0.1,,,1.0\n")
    second = _train(config, stores, tmp_path / "r.pt", tmp_path / "r.csv", device="cpu", resume=True)
    assert second["finished"] and not partial_path(tmp_path / "r.pt").exists()
    _assert_same_checkpoint(load_checkpoint(tmp_path / "full.pt"), load_checkpoint(tmp_path / "r.pt"))
    assert _rows(tmp_path / "r.csv") == _rows(tmp_path / "full.csv")
    # Extending a finished constant-rate run == one longer run.
    const = _config(lr_schedule="constant", steps=3)
    _train(const, stores, tmp_path / "k.pt", device="cpu")
    longer = _config(lr_schedule="constant", steps=6)
    _train(longer, stores, tmp_path / "k.pt", device="cpu", resume=True)
    _train(longer, stores, tmp_path / "k6.pt", device="cpu")
    _assert_same_checkpoint(load_checkpoint(tmp_path / "k.pt"), load_checkpoint(tmp_path / "k6.pt"))


def test_resume_and_overwrite_guards(tmp_path, stores) -> None:
    config = _config(steps=2, val_every=5)
    _train(config, stores, tmp_path / "m.pt", device="cpu")
    with pytest.raises(OutputError, match="already exists"):
        _train(config, stores, tmp_path / "m.pt", device="cpu")
    changed = _config(steps=4, lr=0.5)
    with pytest.raises(CheckpointError, match="key 'train.lr' differs"):
        _train(changed, stores, tmp_path / "m.pt", device="cpu", resume=True)
    wider = _config(steps=4)
    wider["model"]["base_channels"] = 8
    with pytest.raises(CheckpointError, match="architecture"):
        _train(wider, stores, tmp_path / "m.pt", device="cpu", resume=True)
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointError, match="not a unet-pipe checkpoint"):
        _train(config, stores, tmp_path / "evil.pt", device="cpu", resume=True)
    assert _train(config, stores, tmp_path / "m.pt", device="cpu", overwrite=True)["finished"]


def test_resume_refuses_a_checkpoint_of_another_normalisation(tmp_path, stores) -> None:
    """A partial run written before the percentile rule (or on other percentiles) is not continued."""
    config = _config(steps=4)
    _train(config, stores, tmp_path / "n.pt", device="cpu", until_step=2)
    part = partial_path(tmp_path / "n.pt")
    ckpt = torch.load(part, weights_only=True)
    recorded = ckpt["extra"]["input_normalization"]
    assert recorded["rule"] == "percentile" and recorded["volumes"]
    ckpt["extra"]["input_normalization"] = None  # what an older release recorded: the dtype maximum
    torch.save(ckpt, part)
    with pytest.raises(CheckpointError, match="normalised by dtype maximum"):
        _train(config, stores, tmp_path / "n.pt", device="cpu", resume=True)
    name = next(iter(recorded["volumes"]))
    ckpt["extra"]["input_normalization"] = {**recorded, "volumes": {name: [0.0, 1.0]}}
    torch.save(ckpt, part)
    with pytest.raises(CheckpointError, match="normalised by percentile"):
        _train(config, stores, tmp_path / "n.pt", device="cpu", resume=True)
    ckpt["extra"]["input_normalization"] = recorded
    torch.save(ckpt, part)
    assert _train(config, stores, tmp_path / "n.pt", device="cpu", resume=True)["finished"]


def test_init_from_starts_from_another_runs_weights(tmp_path, stores) -> None:
    """Fine-tuning: step 0 holds the source's weights exactly; optimiser and step start afresh;
    a resumed fine-tuning run continues its own weights (bit-identical to an uninterrupted one)."""
    from unet_pipe.provenance import file_sha256

    source = tmp_path / "source.pt"
    _train(_config(steps=3), stores, source, device="cpu")
    src = load_checkpoint(source)
    tuned = _config(steps=4, lr_schedule="constant", init_from=str(source))
    tuned["model"]["dropout"] = 0.0  # does not shape the weights: allowed to differ
    zero = _train(tuned, stores, tmp_path / "t0.pt", device="cpu", until_step=0)
    assert zero["step"] == 0 and not zero["finished"]
    at0 = load_checkpoint(partial_path(tmp_path / "t0.pt"))
    assert at0["step"] == 0 and sorted(at0["model_state"]) == sorted(src["model_state"])
    for key, value in src["model_state"].items():
        assert torch.equal(at0["model_state"][key], value), key
    assert at0["optimizer_state"]["state"] == {}  # no momentum taken over from the source run
    assert at0["extra"]["init_from"] == {"path": str(source), "sha256": file_sha256(source)}
    assert at0["config"]["train"]["init_from"] == str(source)
    # From scratch (same seed), step 0 is the He initialisation, not the source.
    scratch = _config(steps=4, lr_schedule="constant")
    _train(scratch, stores, tmp_path / "s0.pt", device="cpu", until_step=0)
    assert not torch.equal(load_checkpoint(partial_path(tmp_path / "s0.pt"))["model_state"]["head.weight"],
                           src["model_state"]["head.weight"])

    # Interrupted at step 2 and resumed == 4 steps at once: resume does not re-initialise.
    _train(tuned, stores, tmp_path / "full.pt", device="cpu")
    _train(tuned, stores, tmp_path / "r.pt", device="cpu", until_step=2)
    _train(tuned, stores, tmp_path / "r.pt", device="cpu", resume=True)
    _assert_same_checkpoint(load_checkpoint(tmp_path / "full.pt"), load_checkpoint(tmp_path / "r.pt"))
    assert load_checkpoint(tmp_path / "r.pt")["extra"]["init_from"]["sha256"] == file_sha256(source)
    # A source replaced while a fine-tuning run was interrupted: resuming is refused.
    _train(tuned, stores, tmp_path / "q.pt", device="cpu", until_step=2)
    _train(_config(steps=2), stores, source, device="cpu", overwrite=True)
    with pytest.raises(CheckpointError, match=r"q\.pt\.partial: started from train.init_from .* has changed"):
        _train(tuned, stores, tmp_path / "q.pt", device="cpu", resume=True)


def test_init_from_refuses_another_architecture(tmp_path, stores) -> None:
    source = tmp_path / "source.pt"
    _train(_config(steps=1), stores, source, device="cpu")
    wider = _config(steps=2, init_from=str(source))
    wider["model"]["base_channels"] = 8
    with pytest.raises(CheckpointError) as info:
        _train(wider, stores, tmp_path / "w.pt", device="cpu")
    assert str(info.value) == (
        f"{source}: train.init_from: architecture differs from the config's model section: base_channels 4 (config: 8)"
    )
    assert not (tmp_path / "w.pt").exists() and not partial_path(tmp_path / "w.pt").exists()
    (tmp_path / "foreign.pt").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a unet-pipe checkpoint"):
        _train(_config(steps=2, init_from=str(tmp_path / "foreign.pt")), stores, tmp_path / "f.pt", device="cpu")
    with pytest.raises(ConfigError, match="this run's own checkpoint"):
        _train(_config(steps=2, init_from=str(source)), stores, source, device="cpu", resume=True)


def test_tensorboard_gets_the_csv_scalars(tmp_path, stores, monkeypatch) -> None:
    """--tensorboard logs what the CSV logs (tensorboard itself is optional: a stand-in writer)."""
    import sys
    import types

    logged: list[tuple[str, float, int]] = []

    class SummaryWriter:
        def __init__(self, folder: str) -> None:
            self.folder = folder

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            logged.append((tag, value, step))

        def close(self) -> None:
            logged.append(("closed", 0.0, 0))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    _train(_config(), stores, tmp_path / "a.pt", tmp_path / "a.csv", device="cpu", tensorboard_dir=tmp_path / "tb")
    expected = [
        (key, pytest.approx(row[key]), row["step"])
        for row in _rows(tmp_path / "a.csv")
        for key in ("loss", "lr", "val_pixel_error", "val_rand_error")
        if row[key] is not None
    ]
    assert logged[:-1] == expected and logged[-1][0] == "closed"
    assert sum(tag == "val_rand_error" for tag, _, _ in logged) == 2  # steps 3 and 6 only
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    from unet_pipe.errors import ConfigError

    with pytest.raises(ConfigError, match="needs the 'tensorboard' package"):
        _train(_config(), stores, tmp_path / "b.pt", device="cpu", tensorboard_dir=tmp_path / "tb2")
    assert not (tmp_path / "b.pt").exists()


def test_tiny_training_overfits_one_tile(tmp_path) -> None:
    """One 28 x 28 slice = exactly one output window: 100 SGD steps (momentum 0.99)
    cut the loss by more than 8x (measured about 10x)."""
    stack = synthesize((2, 28, 28), seed=0)
    config = validate_config(
        {
            "datasets": {"t": {"synthetic": {"shape": [2, 28, 28]}}},
            "model": {"depth": 2, "base_channels": 8, "dropout": 0.0},
            "train": {
                "datasets": {"t": {"train": [0, 1], "val": [1, 2]}},
                "tile": 44, "steps": 100, "lr": 0.01, "momentum": 0.99, "lr_schedule": "constant",
                "val_every": 100, "checkpoint_every": 100, "augment": NO_AUGMENT,
            },
        }
    )
    _train(config, {"t": {"raw": stack.raw, "labels": stack.labels}}, tmp_path / "o.pt", tmp_path / "o.csv")
    losses = [r["loss"] for r in iter_rows(tmp_path / "o.csv")]
    assert np.mean(losses[-5:]) < losses[0] / 8
    assert losses[0] == pytest.approx(math.log(2), rel=0.8)  # He init starts near chance


# --------------------------------------------------------------------------- CLI


def test_cli_train_on_ome_zarr(tmp_path, stores, run_cli) -> None:
    import yaml

    from unet_pipe.io import StagedImage

    args = []
    for key, array in stores["s"].items():
        staged = StagedImage(
            tmp_path / f"{key}.ome.zarr", shape=array.shape, dtype=array.dtype, chunks=(1, 40, 40),
            kind="labels" if key == "labels" else "image",
        )
        staged.array[:] = array
        staged.commit(pyramid_levels=0)
        args += [f"--{key}", f"s={tmp_path / f'{key}.ome.zarr'}"]
    config = _config(steps=2, val_every=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli("-q", "train", tmp_path / "c.yaml", *args, "--out", tmp_path / "m.pt", "--log", tmp_path / "l.csv",
                           "--threads", "1")
    assert code == 0, err
    assert [r["step"] for r in iter_rows(tmp_path / "l.csv")] == [1, 2]
    direct = _train(config, stores, tmp_path / "d.pt", device="cpu")
    assert direct["finished"]
    _assert_same_checkpoint(load_checkpoint(tmp_path / "m.pt"), load_checkpoint(tmp_path / "d.pt"))
    code, _, err = run_cli("train", tmp_path / "c.yaml", *args, "--out", tmp_path / "m.pt")
    assert code == 2 and err.count("\n") == 1 and "already exists" in err
    code, _, err = run_cli("train", tmp_path / "c.yaml", "--raw", "s=/nonexistent.ome.zarr", "--labels",
                           f"s={tmp_path / 'labels.ome.zarr'}", "--out", tmp_path / "x.pt")
    assert code == 2 and "nonexistent" in err and err.count("\n") == 1
    code, _, err = run_cli("train", tmp_path / "c.yaml", "--raw", "s", "--out", tmp_path / "x.pt")
    assert code == 2 and "NAME=PATH" in err


def test_cli_config_json_as_snakemake_passes_it(tmp_path, stores, run_cli) -> None:
    """The rule passes the config as a JSON string; a bad string is one error line."""
    import json

    from unet_pipe.io import StagedImage

    args = []
    for key in ("raw", "labels"):
        array = stores["s"][key]
        staged = StagedImage(tmp_path / f"{key}.ome.zarr", shape=array.shape, dtype=array.dtype, chunks=(1, 40, 40))
        staged.array[:] = array
        staged.commit(pyramid_levels=0)
        args += [f"--{key}", f"s={tmp_path / f'{key}.ome.zarr'}"]
    config = _config(steps=1, val_every=1)
    code, _, err = run_cli("-q", "train", "--config-json", json.dumps(config), *args,
                           "--out", tmp_path / "m.pt", "--threads", "1")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "m.pt")["step"] == 1
    code, _, err = run_cli("train", "--config-json", "{not json", "--out", tmp_path / "x.pt")
    assert code == 2 and "not valid JSON" in err and err.count("\n") == 1
    code, _, err = run_cli("train", "--out", tmp_path / "x.pt")
    assert code == 2 and "CONFIG.yaml or --config-json" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_precision_training_on_gpu(tmp_path, stores) -> None:
    """AMP on CUDA trains, records the scaler and CUDA RNG, and resumes."""
    config = _config(steps=4, val_every=2, checkpoint_every=2)
    result = train(config, stores, tmp_path / "g.pt", tmp_path / "g.csv", device="cuda", until_step=2)
    assert not result["finished"]
    result = train(config, stores, tmp_path / "g.pt", tmp_path / "g.csv", device="cuda", resume=True)
    ckpt = load_checkpoint(tmp_path / "g.pt")
    assert result["finished"] and ckpt["step"] == 4
    assert ckpt["extra"]["scaler"] and ckpt["extra"]["cuda_rng"] is not None
    assert all(math.isfinite(r["loss"]) for r in iter_rows(tmp_path / "g.csv"))


def test_three_d_unet_trains(tmp_path) -> None:
    """The 3D variant goes through the same loop: cubes, 3D augmentation, 3D validation."""
    stack = synthesize((24, 24, 24), seed=2)
    config = validate_config(
        {
            "datasets": {"v": {"synthetic": {"shape": [24, 24, 24]}}},
            "model": {"dims": 3, "depth": 2, "base_channels": 2},
            "train": {
                "datasets": {"v": {"train": [0, 16], "val": [16, 24]}},
                "tile": 20, "steps": 2, "val_every": 2, "augment": {"elastic_sigma": 2.0},
            },
        }
    )
    result = _train(config, {"v": {"raw": stack.raw, "labels": stack.labels}}, tmp_path / "v.pt")
    assert result["finished"] and 0 <= result["val_pixel_error"] <= 1
    assert load_checkpoint(tmp_path / "v.pt")["arch"]["dims"] == 3


# ---------------------------------------------------------------- sparse labels
# Sparse annotations in training: a pixel of weight 0 leaves the loss; ISBI 2012 with the right half
# of every training slice unlabelled, end to end (tiny net, few steps).


def test_weight_zero_removes_a_pixel_from_the_loss_exactly() -> None:
    logits = torch.tensor([[[[2.0, -1.0, 0.5]], [[0.0, 3.0, -2.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 0]]])
    weights = torch.tensor([[[1.0, 2.0, 0.0]]])
    # Pixel 3 (weight 0) may hold any class: the loss is the same, sum over 3 pixels / 3.
    other = weighted_cross_entropy(logits, torch.tensor([[[0, 1, 1]]]), weights)
    ce0 = -torch.log_softmax(logits[0, :, 0, 0], 0)[0]
    ce1 = -torch.log_softmax(logits[0, :, 0, 1], 0)[1]
    expected = (ce0 + 2 * ce1) / 3
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx(expected.item(), abs=1e-7)
    assert other.item() == weighted_cross_entropy(logits, target, weights).item()


U = 128  # unlabelled: neither 0 (membrane) nor 255 (cell)
SLICES = 6  # 0-3 train, 4-5 validation


@pytest.mark.slow
def test_isbi_half_unlabelled_trains_and_evaluates(isbi_dir, tmp_path, run_cli):
    raw = tifffile.imread(isbi_dir / "train-volume.tif")[:SLICES]
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:SLICES].copy()
    labels[:, :, 256:] = U
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    stores = {k: tmp_path / f"{k}.ome.zarr" for k in ("raw", "labels", "weights", "prob", "inst")}
    ingest_tiff(tmp_path / "raw.tif", stores["raw"], chunks=(1, 256, 256), pyramid_levels=0)
    ingest_tiff(tmp_path / "labels.tif", stores["labels"], chunks=(1, 256, 256), pyramid_levels=0,
                kind="labels", like=stores["raw"])
    code, _, err = run_cli("weights", stores["labels"], stores["weights"], "--unlabelled-value", U,
                           "--pyramid-levels", 0)
    assert code == 0, err
    weights = open_image(stores["weights"])[:]
    assert np.all(weights[:, :, 256:] == 0) and np.all(weights[:, :, :256] > 0)

    config = validate_config({
        "datasets": {"isbi": {"raw": str(tmp_path / "raw.tif"), "labels": str(tmp_path / "labels.tif")}},
        "weights": {"unlabelled_value": U},
        "model": {"depth": 2, "base_channels": 8},
        "train": {"datasets": {"isbi": {"train": [0, 4], "val": [4, 6]}}, "tile": 124, "steps": 8,
                  "batch_size": 2, "val_every": 8, "checkpoint_every": 8},
    })
    store_paths = {"isbi": {"raw": stores["raw"], "labels": stores["labels"], "weights": stores["weights"]}}
    result = train(config, store_paths, tmp_path / "model.pt", tmp_path / "train.csv", device="cpu", threads=1)
    assert math.isfinite(result["loss"])
    log = (tmp_path / "train.csv").read_text().splitlines()
    assert len(log) == 9 and log[-1].split(",")[3] not in ("", "nan")  # validation ran on the sparse val slices
    predict(tmp_path / "model.pt", stores["raw"], stores["prob"], device="cpu", threads=1, precision="float32",
            pyramid_levels=0)
    code, _, err = run_cli("calibrate", "--probabilities", f"isbi={stores['prob']}", "--truth",
                           f"isbi={stores['labels']}", "--slices", "isbi=4:6", "--out", tmp_path / "decisions.json",
                           "--methods", "threshold", "--unlabelled-value", U)
    assert code == 0, err
    postprocess(stores["prob"], stores["inst"], pyramid_levels=0)
    code, _, err = run_cli("evaluate", "--prediction", stores["inst"], "--truth", stores["labels"],
                           "--probabilities", stores["prob"], "--out", tmp_path / "metrics.json",
                           "--foreground-value", 255, "--unlabelled-value", U, "--val", 4, 6,
                           "--decisions", tmp_path / "decisions.json")
    assert code == 0, err
    import json

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = metrics["per_slice"]
    assert len(rows) == SLICES and all(r["warping_error"] is None for r in rows)  # half unlabelled: undefined
    val = metrics["summary"]["val"]
    assert 0 <= val["pixel_error"] < 1 and 0 <= val["rand_error"] <= 1 and 0 < val["iou"] <= 1
    # The pixel error is the one of the annotated left halves alone.
    prob = open_image(stores["prob"])[4:6]
    t = json.loads((tmp_path / "decisions.json").read_text())["cell_threshold"]
    truth = labels[4:6, :, :256] == 255
    p = prob[:, :, :256].astype(np.float64)
    p = p / 255 if prob.dtype == np.uint8 else p
    expected = np.count_nonzero((p > t) != truth) / truth.size
    assert val["pixel_error"] == pytest.approx(expected, abs=1e-12)
