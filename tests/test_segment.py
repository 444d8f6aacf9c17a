"""`unet-pipe segment` and the model that travels (`bundle`): tiny nets, tiny stacks, exact values."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from unet_pipe.io import image_metadata, open_image
from unet_pipe.model import UNet, load_checkpoint, save_checkpoint
from unet_pipe.model_bundle import DEFAULT_DECISIONS, application_record, bundle_model
from unet_pipe.segment import input_stem

VOXEL = (0.05, 0.004, 0.004)  # µm, z y x
DECISIONS = {"method": "threshold", "threshold": 0.45, "seed_threshold": 0.9, "seed_prominence": 4.0,
             "min_size": 3, "cell_threshold": 0.47}


def tiny_checkpoint(path: Path, *, dims: int = 2, voxel: tuple | None = VOXEL, seed: int = 0) -> Path:
    """A depth-2, 4-channel net with the percentile rule and (optionally) a training voxel size."""
    torch.manual_seed(seed)
    net = UNet(depth=2, base_channels=4, dims=dims)
    extra = {"input_normalization": {"rule": "percentile", "percentiles": [1.0, 99.0], "volumes": {}},
             "precision": "float32"}
    if voxel is not None:
        extra["voxel_sizes"] = {"train": list(voxel)}
    return save_checkpoint(path, net, None, step=7, extra=extra)


def write_stack(path: Path, shape=(3, 64, 72), seed: int = 0, voxel=VOXEL) -> Path:
    """A uint8 stack of bright cells on dark membranes (ImageJ TIFF with its voxel size)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    data = (120 + 100 * np.sin(y / 5.0 + seed) * np.cos(x / 6.0) + rng.normal(0, 10, shape)).clip(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data.astype(np.uint8), imagej=True, resolution=(1 / voxel[2], 1 / voxel[1]),
                     metadata={"spacing": voxel[0], "unit": "um", "axes": "ZYX"})
    return path


def decisions_json(path: Path, d: dict = DECISIONS) -> Path:
    body = {k: d[k] for k in ("method", "threshold", "seed_threshold", "seed_prominence", "min_size")}
    path.write_text(json.dumps({"decisions": body, "cell_threshold": d["cell_threshold"]}))
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    """A bundled model: the tiny net carrying DECISIONS and VOXEL."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    bundle_model(ckpt, tmp_path / "ckpt" / "model.pt", decisions={**DECISIONS, "source": "calibrate"})
    return tmp_path / "ckpt" / "model.pt"


@pytest.mark.parametrize("name, stem", [
    ("stack.tif", "stack"), ("a.b.TIFF", "a.b"), ("vol.ome.tif", "vol"), ("vol.ome.zarr", "vol"),
    ("slices/", "slices"), ("x.zarr", "x"), (".tif", ".tif"),
])
def test_input_stem(name, stem):
    assert input_stem(name) == stem


def test_bundle_carries_decisions_voxel_size_and_loads_weights_only(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt")
    record = bundle_model(ckpt, tmp_path / "model.pt", decisions={**DECISIONS, "source": "calibrate"})
    data = torch.load(tmp_path / "model.pt", weights_only=True)  # still a plain state dict
    assert data["optimizer_state"] is None and data["step"] == 7
    assert data["extra"]["decisions"] == {**DECISIONS, "source": "calibrate"}
    assert data["extra"]["voxel_size"] == list(VOXEL)
    assert record["voxel_size"] == list(VOXEL) and record["decisions"]["threshold"] == 0.45
    assert record["arch"]["depth"] == 2 and record["input_normalization"]["rule"] == "percentile"
    for key, value in load_checkpoint(ckpt)["model_state"].items():
        assert torch.equal(data["model_state"][key], value)


def test_bundle_cli_from_decisions_json_and_refusals(tmp_path, run_cli):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt")
    dj = decisions_json(tmp_path / "decisions.json")
    code, _, err = run_cli("bundle", ckpt, tmp_path / "model.pt", "--decisions", dj, "--min-size", 9)
    assert code == 0, err
    extra = load_checkpoint(tmp_path / "model.pt")["extra"]
    assert extra["decisions"] == {**DECISIONS, "min_size": 9, "source": "calibrate + options"}
    (tmp_path / "mine.pt").write_text("my notes")
    code, _, err = run_cli("bundle", ckpt, tmp_path / "mine.pt", "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "not a unet-pipe checkpoint" in err
    assert (tmp_path / "mine.pt").read_text() == "my notes"
    code, _, err = run_cli("bundle", ckpt, tmp_path / "config.pt", "--method", "watershed", "--threshold", 0.3)
    assert code == 0, err
    d = load_checkpoint(tmp_path / "config.pt")["extra"]["decisions"]
    assert (d["method"], d["threshold"], d["cell_threshold"], d["source"]) == ("watershed", 0.3, 0.3, "config")


def reference_instances(model: Path, raw_tif: Path, work: Path, decisions: dict) -> np.ndarray:
    """The three-command route (ingest, predict, postprocess) by the library, for comparison."""
    from unet_pipe.ingest import ingest_tiff
    from unet_pipe.postprocess import postprocess
    from unet_pipe.predict import predict

    ingest_tiff(raw_tif, work / "raw.ome.zarr")
    predict(model, work / "raw.ome.zarr", work / "prob.ome.zarr", precision="float32")
    postprocess(work / "prob.ome.zarr", work / "inst.ome.zarr",
                **{k: decisions[k] for k in ("method", "threshold", "seed_threshold", "seed_prominence", "min_size")})
    return np.asarray(open_image(work / "inst.ome.zarr")[:])


def test_segment_equals_the_three_commands_and_writes_every_output(tmp_path, model, run_cli):
    a = write_stack(tmp_path / "in" / "a.tif", seed=0)
    b = write_stack(tmp_path / "in" / "b.tif", shape=(2, 70, 64), seed=1)
    out = tmp_path / "seg"
    code, stdout, err = run_cli("segment", model, a, b, "--out", out, "--tiff", "--precision", "float32")
    assert code == 0, err
    assert "carries no calibrated decisions" not in err
    for item, stack in (("a", a), ("b", b)):
        folder = out / item
        expected = reference_instances(model, stack, tmp_path / f"ref-{item}", DECISIONS)
        inst = np.asarray(open_image(folder / "instances.ome.zarr")[:])
        np.testing.assert_array_equal(inst, expected)
        # Predict measured the normalisation on the sample ingest took: the same range, the same values.
        got, ref = image_metadata(folder / "probabilities.ome.zarr"), image_metadata(tmp_path / f"ref-{item}" / "prob.ome.zarr")
        assert got.attrs["unet_pipe"]["provenance"]["params"]["intensity"] == \
            ref.attrs["unet_pipe"]["provenance"]["params"]["intensity"]
        np.testing.assert_array_equal(open_image(folder / "probabilities.ome.zarr")[:],
                                      open_image(tmp_path / f"ref-{item}" / "prob.ome.zarr")[:])
        assert image_metadata(folder / "raw.ome.zarr").voxel_size == pytest.approx(VOXEL)
        assert image_metadata(folder / "instances.ome.zarr").voxel_size == pytest.approx(VOXEL)
        assert (folder / "view.ome.zarr" / "labels" / "instances").is_dir()
        # Fiji: an ImageJ hyperstack with the voxel size, ids exact
        with tifffile.TiffFile(folder / "instances.tif") as tif:
            assert tif.is_imagej and tif.imagej_metadata["spacing"] == pytest.approx(VOXEL[0])
            assert tif.imagej_metadata["unit"] == "um"
            xres = tif.pages[0].tags["XResolution"].value
            assert xres[0] / xres[1] == pytest.approx(1 / VOXEL[2], rel=1e-4)
            data = tif.asarray()
        assert data.dtype == np.uint16
        np.testing.assert_array_equal(data, inst)
        summary = json.loads((folder / "summary.json").read_text())
        ids, counts = np.unique(inst[inst > 0], return_counts=True)
        assert summary["objects"] == len(ids) > 0
        assert summary["sizes"]["px"][3] == pytest.approx(np.median(counts))
        assert summary["sizes"]["um"][6] == pytest.approx(counts.max() * VOXEL[1] * VOXEL[2])
        assert summary["sizes"]["measure"] == "area" and summary["instances"] == "2d"
        assert sum(summary["sizes"]["histogram"]["counts"]) == len(ids)
        assert summary["voxel_size_um"] == pytest.approx(list(VOXEL))
        assert summary["decisions"]["threshold"] == 0.45 and summary["decisions_source"] == "calibrate"
        assert set(summary["seconds"]) >= {"ingest", "predict", "postprocess", "view", "tiff", "summary"}
        assert f"{item}: {len(ids)} objects" in stdout
    report = (out / "report.md").read_text()
    assert "| a | 3 × 64 × 72 |" in report and "| b | 2 × 70 × 64 |" in report
    assert (out / "report_figures" / "a_slices.jpg").is_file() and (out / "report_figures" / "b_sizes.png").is_file()


def test_segment_without_decisions_warns_and_states_the_default(tmp_path, run_cli, caplog):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt")
    a = write_stack(tmp_path / "a.tif")
    with caplog.at_level(logging.WARNING, logger="unet_pipe"):
        code, _, err = run_cli("segment", ckpt, a, "--out", tmp_path / "seg", "--precision", "float32")
    assert code == 0, err
    assert "carries no calibrated decisions; using the default: cell where p > 0.5" in caplog.text
    summary = json.loads((tmp_path / "seg" / "a" / "summary.json").read_text())
    assert summary["decisions"]["threshold"] == DEFAULT_DECISIONS["threshold"] == 0.5
    assert summary["decisions_source"] == "default"
    expected = reference_instances(ckpt, a, tmp_path / "ref", DEFAULT_DECISIONS)
    np.testing.assert_array_equal(open_image(tmp_path / "seg" / "a" / "instances.ome.zarr")[:], expected)


def test_segment_options_replace_the_model_decisions(tmp_path, model, run_cli):
    a = write_stack(tmp_path / "a.tif")
    code, _, err = run_cli("segment", model, a, "--out", tmp_path / "seg", "--precision", "float32",
                           "--threshold", 0.6)
    assert code == 0, err
    summary = json.loads((tmp_path / "seg" / "a" / "summary.json").read_text())
    assert summary["decisions"]["threshold"] == 0.6 and summary["decisions"]["min_size"] == 3  # the model's
    assert summary["decisions_source"] == "calibrate + options"


def test_segment_resumes_after_a_kill(tmp_path, model, monkeypatch):
    import unet_pipe.postprocess as postprocess_module
    from unet_pipe.segment import segment

    a = write_stack(tmp_path / "a.tif")
    expected = reference_instances(model, a, tmp_path / "ref", DECISIONS)
    real = postprocess_module.postprocess

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(postprocess_module, "postprocess", killed)
    with pytest.raises(KeyboardInterrupt):
        segment(model, [a], tmp_path / "seg", precision="float32")
    prob = tmp_path / "seg" / "a" / "probabilities.ome.zarr"
    stamp = (prob / ".zattrs").stat().st_mtime_ns
    monkeypatch.setattr(postprocess_module, "postprocess", real)
    calls = []
    import unet_pipe.predict as predict_module

    monkeypatch.setattr(predict_module, "predict", lambda *a, **k: calls.append(a))
    summaries = segment(model, [a], tmp_path / "seg", precision="float32")
    assert calls == []  # predict was done: skipped
    assert (prob / ".zattrs").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(open_image(tmp_path / "seg" / "a" / "instances.ome.zarr")[:], expected)
    assert summaries[0]["objects"] == len(np.unique(expected[expected > 0]))
    # Killed between publishing and the record: the stage's output counts as done.
    state_file = tmp_path / "seg" / "a" / ".unet-pipe-segment.json"
    state = json.loads(state_file.read_text())
    state["postprocess"].pop("done")
    state_file.write_text(json.dumps(state))
    segment(model, [a], tmp_path / "seg", precision="float32")
    assert calls == []


def test_segment_refuses_in_one_line(tmp_path, model, run_cli):
    a = write_stack(tmp_path / "in" / "a.tif")
    single = write_stack(tmp_path / "in" / "single.tif", shape=(1, 64, 64))
    ckpt3d = tiny_checkpoint(tmp_path / "net3d.pt", dims=3)
    cases = [
        ((ckpt3d, single, "--out", tmp_path / "s1"), "is a 3D U-Net, which needs at least 2 voxels per axis"),
        ((model, a, tmp_path / "other" / "a.tiff", "--out", tmp_path / "s2"), "has the output name 'a'"),
        ((model, a, "--out", tmp_path / "in"), "overlaps the input"),
        ((model, tmp_path / "missing.tif", "--out", tmp_path / "s3"), "missing.tif: not found"),
        ((tmp_path / "in" / "a.tif", a, "--out", tmp_path / "s4"), "not a unet-pipe checkpoint"),
        ((model, a, "--out", tmp_path / "s5", "--threshold", 1.5), "--threshold must be a finite number"),
    ]
    write_stack(tmp_path / "other" / "a.tiff")
    for args, message in cases:
        code, _, err = run_cli("segment", *args, "--precision", "float32")
        assert code == 2 and message in err and err.startswith("unet-pipe: error:"), (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s3").exists()


def test_segment_other_request_needs_overwrite_and_replaces_only_ours(tmp_path, model, run_cli):
    a = write_stack(tmp_path / "a.tif")
    out = tmp_path / "seg"
    assert run_cli("segment", model, a, "--out", out, "--precision", "float32")[0] == 0
    code, _, err = run_cli("segment", model, a, "--out", out, "--precision", "float32", "--threshold", 0.3)
    assert code == 2 and "instances.ome.zarr: exists from an earlier run" in err and "--overwrite" in err
    code, _, err = run_cli("segment", model, a, "--out", out, "--precision", "float32", "--threshold", 0.3,
                           "--overwrite")
    assert code == 0, err
    assert json.loads((out / "a" / "summary.json").read_text())["decisions"]["threshold"] == 0.3
    (out / "a" / "instances.tif").write_text("my own file")  # not ours: never replaced
    code, _, err = run_cli("segment", model, a, "--out", out, "--precision", "float32", "--threshold", 0.3,
                           "--tiff", "--overwrite")
    assert code == 2 and "instances.tif: exists and was not written by unet-pipe" in err
    assert (out / "a" / "instances.tif").read_text() == "my own file"


def test_segment_warns_about_another_voxel_size(tmp_path, model, run_cli, caplog):
    a = write_stack(tmp_path / "a.tif", voxel=(0.05, 0.008, 0.008))
    with caplog.at_level(logging.WARNING, logger="unet_pipe"):
        code, _, err = run_cli("segment", model, a, "--out", tmp_path / "seg", "--precision", "float32")
    assert code == 0, err
    assert "voxel size [0.05, 0.008, 0.008] µm differs from the [0.05, 0.004, 0.004] µm the model" in caplog.text
    assert "(2x)" in caplog.text


def test_postprocess_takes_the_decisions_from_a_model(tmp_path, model, run_cli):
    from unet_pipe.ingest import ingest_tiff
    from unet_pipe.predict import predict

    ingest_tiff(write_stack(tmp_path / "a.tif"), tmp_path / "raw.ome.zarr")
    predict(model, tmp_path / "raw.ome.zarr", tmp_path / "prob.ome.zarr", precision="float32")
    code, _, err = run_cli("postprocess", tmp_path / "prob.ome.zarr", tmp_path / "inst.ome.zarr", "--decisions", model)
    assert code == 0, err
    params = image_metadata(tmp_path / "inst.ome.zarr").attrs["unet_pipe"]["provenance"]["params"]
    assert (params["threshold"], params["min_size"]) == (0.45, 3)


def test_application_record_of_an_old_checkpoint_has_no_decisions_or_voxel_size(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "old.pt", voxel=None)
    record = application_record(load_checkpoint(ckpt))
    assert record["decisions"] is None and record["voxel_size"] is None


def test_exported_package_carries_the_application_and_segments_as_the_checkpoint(tmp_path, model, run_cli):
    """The bioimage.io zip holds decisions, voxel size and normalisation in config.unet_pipe.application;
    segment rebuilds the checkpoint from it and gives the very instances of the checkpoint."""
    pytest.importorskip("bioimageio.spec")
    import zipfile

    import yaml

    from unet_pipe.bioimageio_export import export_model
    from unet_pipe.ingest import ingest_tiff

    a = write_stack(tmp_path / "a.tif")
    ingest_tiff(a, tmp_path / "sample.ome.zarr")
    export_model(model, tmp_path / "model.zip", sample=tmp_path / "sample.ome.zarr",
                 settings={"authors": [{"name": "A. Tester"}]})
    with zipfile.ZipFile(tmp_path / "model.zip") as zf:
        app = yaml.safe_load(zf.read("rdf.yaml"))["config"]["unet_pipe"]["application"]
    assert app["decisions"] == {**DECISIONS, "source": "calibrate"}
    assert app["voxel_size"] == list(VOXEL) and app["input_normalization"]["percentiles"] == [1.0, 99.0]
    assert app["arch"]["depth"] == 2
    for name, source in (("zip", tmp_path / "model.zip"), ("pt", model)):
        code, _, err = run_cli("segment", source, a, "--out", tmp_path / name, "--precision", "float32")
        assert code == 0, err
    np.testing.assert_array_equal(open_image(tmp_path / "zip" / "a" / "probabilities.ome.zarr")[:],
                                  open_image(tmp_path / "pt" / "a" / "probabilities.ome.zarr")[:])
    np.testing.assert_array_equal(open_image(tmp_path / "zip" / "a" / "instances.ome.zarr")[:],
                                  open_image(tmp_path / "pt" / "a" / "instances.ome.zarr")[:])
    summary = json.loads((tmp_path / "zip" / "a" / "summary.json").read_text())
    assert summary["decisions"]["threshold"] == 0.45 and summary["decisions_source"] == "calibrate"
    # A rerun resumes against the same rebuilt checkpoint: nothing is recomputed.
    state = json.loads((tmp_path / "zip" / "a" / ".unet-pipe-segment.json").read_text())
    assert run_cli("segment", tmp_path / "model.zip", a, "--out", tmp_path / "zip", "--precision", "float32")[0] == 0
    again = json.loads((tmp_path / "zip" / "a" / ".unet-pipe-segment.json").read_text())
    assert again["predict"] == state["predict"]
    # A foreign zip is refused in one line.
    with zipfile.ZipFile(tmp_path / "foreign.zip", "w") as zf:
        zf.writestr("rdf.yaml", "type: model\nname: other\n")
    code, _, err = run_cli("segment", tmp_path / "foreign.zip", a, "--out", tmp_path / "f")
    assert code == 2 and "not a bioimage.io package exported by this unet-pipe" in err and err.count("\n") == 1


def test_predict_on_a_tiff_points_to_segment(tmp_path, run_cli):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    a = write_stack(tmp_path / "a.tif")
    code, _, err = run_cli("predict", ckpt, a, tmp_path / "out.ome.zarr")
    assert code == 2 and err.count("\n") == 1
    assert "a.tif: predict reads an ingested OME-Zarr image; segment a TIFF" in err and "unet-pipe segment" in err


def test_segment_instances_3d_links_slices_and_measures_volumes(tmp_path, model, run_cli):
    """--instances 3d: the instances are the 6-connected components of p > threshold over the whole
    stack (scipy.ndimage.label's partition), whatever --block; the summary measures volumes."""
    from scipy import ndimage as ndi

    from unet_pipe.instances3d import same_partition

    stack = write_stack(tmp_path / "in" / "a.tif", shape=(4, 64, 72))
    outs = {}
    for name, block in (("whole", []), ("blocks", ["--block", 1, 32, 36])):
        code, stdout, err = run_cli("segment", model, stack, "--out", tmp_path / name, "--instances", "3d",
                                    "--min-size", 0, "--precision", "float32", "--chunks", "1,32,36", *block)
        assert code == 0, err
        folder = tmp_path / name / "a"
        outs[name] = np.asarray(open_image(folder / "instances.ome.zarr")[:])
        prob = np.asarray(open_image(folder / "probabilities.ome.zarr")[:], np.float32)
        expected, n = ndi.label(prob > DECISIONS["threshold"], ndi.generate_binary_structure(3, 1))
        assert n > 0 and same_partition(outs[name], expected)
        summary = json.loads((folder / "summary.json").read_text())
        ids, counts = np.unique(outs[name][outs[name] > 0], return_counts=True)
        assert summary["instances"] == "3d" and summary["objects"] == len(ids) == n
        assert summary["objects_per_slice"] is None
        assert summary["sizes"]["measure"] == "volume" and summary["sizes"]["unit"] == "µm³"
        assert summary["sizes"]["px"][6] == pytest.approx(counts.max())
        assert summary["sizes"]["um"][6] == pytest.approx(counts.max() * VOXEL[0] * VOXEL[1] * VOXEL[2])
        assert "median volume" in stdout and "µm³" in stdout
        assert "| 3d |" in (tmp_path / name / "report.md").read_text()
    np.testing.assert_array_equal(outs["whole"], outs["blocks"])
    code, _, err = run_cli("segment", model, stack, "--out", tmp_path / "bad", "--block", 1, 32, 32)
    assert code == 2 and err.count("\n") == 1 and "--instances 3d" in err


def test_a_users_report_or_summary_in_the_out_folder_is_refused_before_any_work(tmp_path, model, run_cli):
    """segment's report.md and summary.json go through the one writer: a user's file of that name is
    refused in one line, unchanged, and nothing is segmented."""
    stack = write_stack(tmp_path / "in" / "a.tif")
    for name in ("report.md", "a/summary.json"):
        out = tmp_path / f"out-{name.replace('/', '-')}"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("my notes\n")
        code, _, err = run_cli("segment", model, stack, "--out", out, "--precision", "float32")
        assert code == 2 and err.count("\n") == 1 and "not written by unet-pipe" in err, err
        assert (out / name).read_text() == "my notes\n"
        assert not (out / "a" / "probabilities.ome.zarr").exists()
