"""bioimage.io export: a tiny trained model, packaged, passes bioimageio.core's model test and
predicts what ``unet-pipe predict`` predicts; failures are one line."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from unet_pipe.bioimageio_export import PACKAGE_FORMAT, nearest_min, test_tile as tile_of
from unet_pipe.config import validate_config
from unet_pipe.intensity import intensity_range
from unet_pipe.errors import InputError
from unet_pipe.io import StagedImage
from unet_pipe.synth import synthesize
from unet_pipe.train import train

PREDICT_TOL = 1e-5  # float32: x * gain + offset (bioimage.io) vs (x - low) * scale (predict)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    pytest.importorskip("bioimageio.core")  # the dev extra installs it: CI runs this module
    import bioimageio.spec

    root = tmp_path_factory.mktemp("export")
    # bioimageio's cache in the test's folder, not the user's; every source of the package is
    # local, so nothing is fetched.
    old_cache = bioimageio.spec.settings.cache_path
    bioimageio.spec.settings.cache_path = root / "bioimageio-cache"
    stack = synthesize((3, 70, 66), seed=1)
    weights = np.where(stack.labels == 0, 3.0, 1.0).astype(np.float32)
    config = validate_config({
        "datasets": {"s": {"synthetic": {"shape": [3, 70, 66]}}},
        "model": {"depth": 2, "base_channels": 4},
        "train": {"datasets": {"s": {"train": [0, 2], "val": [2, 3]}}, "tile": 44, "steps": 3,
                  "val_every": 3, "checkpoint_every": 3},
    })
    ckpt = root / "model.pt"
    train(config, {"s": {"raw": stack.raw, "labels": stack.labels, "weights": weights}}, ckpt, None,
          device="cpu", threads=1, progress=False, tensorboard_dir=None)
    raw = root / "raw.ome.zarr"
    staged = StagedImage(raw, shape=stack.raw.shape, dtype=stack.raw.dtype, chunks=(1, 35, 33),
                         voxel_size=(0.05, 0.004, 0.004))
    staged.array[:] = stack.raw
    staged.commit(pyramid_levels=0)
    conf = root / "config.yaml"
    conf.write_text(yaml.safe_dump({
        "datasets": {"s": {"synthetic": {"shape": [3, 70, 66]}}},
        "export": {"authors": [{"name": "Ada Tester", "affiliation": "Lab"}], "license": "MIT", "name": "tiny U-Net"},
    }))
    from unet_pipe.cli import main

    assert main(["export", str(ckpt), str(root / "model.zip"), "--config", str(conf), "--sample", str(raw)]) == 0
    yield {"root": root, "ckpt": ckpt, "raw": raw, "stack": stack, "package": root / "model.zip", "config": conf}
    bioimageio.spec.settings.cache_path = old_cache


def test_smallest_inputs_and_test_tile() -> None:
    assert [nearest_min(d) for d in (1, 2, 3, 5)] == [5, 18, 44, 188]
    # Depth 5 (the paper's): the largest valid edge <= 256 is 252, centred; 2D takes the middle slice.
    assert tile_of((30, 512, 600), 5, 2) == ((15, 130, 174), (1, 252, 252))
    # 3D, depth 3 (valid edges 44 + 4n): 50 -> 48, 60 -> 60, 47 -> 44.
    assert tile_of((50, 60, 47), 3, 3) == ((1, 0, 1), (48, 60, 44))
    with pytest.raises(InputError, match=r"smaller than the smallest input of this depth-3 net \(44 pixels"):
        tile_of((50, 43, 60), 3, 2)


@pytest.mark.slow  # shares a ~10 s train + export; the module takes ~25 s
def test_package_contents(exported) -> None:
    with zipfile.ZipFile(exported["package"]) as zf:
        names = set(zf.namelist())
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        test_input = np.load(zf.open("test_input.npy"))
    assert {"rdf.yaml", "weights.pt", "weights.torchscript.pt", "unet_model.py", "README.md",
            "test_input.npy", "test_output.npy"} <= names
    assert rdf["format_version"].startswith("0.5.") and rdf["type"] == "model"
    assert rdf["authors"] == [{"name": "Ada Tester", "affiliation": "Lab"}] and rdf["license"] == "MIT"
    assert rdf["cite"][0]["doi"] == "10.1007/978-3-319-24574-4_28"
    assert rdf["config"]["unet_pipe"]["format"] == PACKAGE_FORMAT
    # Depth 2: inputs 18 + 2n, output = input - 2 * margin (margin 6 * 2 - 4 = 8).
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    assert [a.get("id", a["type"]) for a in inp["axes"]] == ["batch", "channel", "y", "x"]  # default ids are left out
    assert inp["axes"][2]["size"] == {"min": 18, "step": 2}
    assert out["axes"][3]["size"] == {"tensor_id": "raw", "axis_id": "x", "offset": -16}
    assert out["axes"][1]["channel_names"] == ["membrane", "cell"]
    # Preprocessing: predict's normalisation of this stack, (raw - low) / (high - low).
    low, high = intensity_range(exported["stack"].raw, (1.0, 99.0)).to_list()
    steps = [(p["id"], p.get("kwargs")) for p in inp["preprocessing"]]
    assert steps[0] == ("ensure_dtype", {"dtype": "float32"}) and steps[2] == ("ensure_dtype", {"dtype": "float32"})
    assert steps[1][0] == "scale_linear"
    assert steps[1][1]["gain"] == pytest.approx(1 / (high - low), rel=1e-12)
    assert steps[1][1]["offset"] == pytest.approx(-low / (high - low), rel=1e-12)
    assert [p["id"] for p in out["postprocessing"]] == ["softmax", "ensure_dtype"]  # the spec adds the cast
    # The test input is the middle slice of the sample, whole (70 x 66 are valid edges), as stored.
    np.testing.assert_array_equal(test_input, exported["stack"].raw[1:2][None])


@pytest.mark.slow  # shares a ~10 s train + export; the module takes ~25 s
def test_bioimageio_model_test_passes(exported) -> None:
    from bioimageio.core import test_model

    summary = test_model(exported["package"])
    failed = [d.name for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    tested = {d.loc[1] for d in summary.details if len(d.loc) > 1 and d.loc[0] == "weights"}
    assert tested == {"pytorch_state_dict", "torchscript"}


@pytest.mark.slow  # shares a ~10 s train + export; the module takes ~25 s
def test_bioimageio_prediction_equals_predict(exported) -> None:
    """Another slice than the test input through bioimageio.core equals unet-pipe predict there."""
    from bioimageio.core import Tensor, predict as bio_predict

    from unet_pipe.predict import predict, read_probabilities

    ours = exported["root"] / "prob.ome.zarr"
    predict(exported["ckpt"], exported["raw"], ours, tile=16, precision="float32", threads=1)
    expected = read_probabilities(ours)[0, 8:62, 8:58]  # the valid output of the whole 70 x 66 slice
    raw0 = exported["stack"].raw[0][None, None]
    sample = bio_predict(model=exported["package"], inputs={"raw": Tensor.from_numpy(raw0, dims=("batch", "channel", "y", "x"))})
    got = sample.members["probabilities"].data.values[0, 1]
    assert got.shape == expected.shape == (54, 50)
    np.testing.assert_allclose(got, expected, atol=PREDICT_TOL)


@pytest.mark.slow  # shares a ~10 s train + export; the module takes ~25 s
def test_architecture_source_needs_no_unet_pipe(exported, tmp_path) -> None:
    """The package's unet_model.py builds the net with unet_pipe unimportable (a consumer's setup)."""
    with zipfile.ZipFile(exported["package"]) as zf:
        (tmp_path / "unet_model.py").write_bytes(zf.read("unet_model.py"))
    code = (
        "import sys, importlib.util; sys.modules['unet_pipe'] = None\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(tmp_path / 'unet_model.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.UNet(depth=2, base_channels=4).output_size(70))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "54"


@pytest.mark.slow  # shares a ~10 s train + export; the module takes ~25 s
def test_missing_packages_is_one_line(exported, run_cli, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bioimageio.core", None)  # as if not installed
    code, _, err = run_cli("export", exported["ckpt"], exported["root"] / "x.zip", "--sample", exported["raw"])
    assert code == 2
    assert err.strip().splitlines() == [
        "unet-pipe: error: bioimage.io export needs bioimageio.spec and bioimageio.core: install unet-pipe[bioimageio]"
    ]


@pytest.mark.slow  # shares a ~10 s train + export; the module takes ~25 s
def test_bad_checkpoint_and_foreign_dest_are_refused(exported, run_cli) -> None:
    bad = exported["root"] / "bad.pt"
    bad.write_text("not a checkpoint")
    code, _, err = run_cli("export", bad, exported["root"] / "y.zip", "--sample", exported["raw"],
                           "--config", exported["config"])
    assert code == 2 and "not a unet-pipe checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (exported["root"] / "y.zip").exists()
    foreign = exported["root"] / "theirs.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("rdf.yaml", "type: model\nname: someone else's\n")
    before = foreign.read_bytes()
    code, _, err = run_cli("export", exported["ckpt"], foreign, "--sample", exported["raw"], "--config", exported["config"],
                           "--overwrite")
    assert code == 2 and "is not a bioimage.io package written by unet-pipe" in err
    assert foreign.read_bytes() == before
    # Ours: refused without --overwrite, replaced with it.
    code, _, err = run_cli("export", exported["ckpt"], exported["package"], "--sample", exported["raw"],
                           "--config", exported["config"])
    assert code == 2 and "pass --overwrite" in err
    # No authors (the schema default): bioimage.io requires one.
    code, _, err = run_cli("export", exported["ckpt"], exported["root"] / "z.zip", "--sample", exported["raw"])
    assert code == 2 and "export.authors is empty" in err
