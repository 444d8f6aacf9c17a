"""The Snakemake workflow: config errors before any job, dry run, a real demo run."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from unet_pipe.io import open_image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def small_config(**overrides) -> dict:
    """The demo config shrunk so the whole DAG runs in about a minute on 2 cores."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["demo"]["synthetic"]["shape"] = [4, 96, 96]
    cfg["ingest"]["chunks"] = [1, 64, 64]
    cfg["ingest"]["pyramid_levels"] = 1
    cfg["train"]["datasets"] = {"demo": {"train": [0, 3], "val": [3, 4]}}
    cfg["train"].update(steps=4, val_every=2, checkpoint_every=2, tile=92)
    cfg["model"].update(depth=2, base_channels=4)
    cfg.update(overrides)
    return cfg


def run_snakemake(workdir: Path, *args: str, config: dict | None = None, check: bool = True):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config or small_config()))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def expand_args_files(text: str, workdir: Path) -> str:
    """``text`` with each job's ``@FILE`` (its options, one per line: args_file in common.smk) written out."""
    return re.sub(r"@(\S+\.args)\b", lambda m: shlex.join((workdir / m[1]).read_text().splitlines()), text)


def test_dry_run_lists_the_chain(tmp_path):
    proc = run_snakemake(tmp_path, "-n", "--quiet", "rules")
    for rule in ("synth", "ingest_raw", "ingest_labels"):
        assert rule in proc.stdout + proc.stderr


def test_bad_config_stops_before_any_job(tmp_path):
    cfg = small_config()
    cfg["weights"]["sigmaa"] = 3
    proc = run_snakemake(tmp_path, "--cores", "1", config=cfg, check=False)
    assert proc.returncode != 0
    assert "unet-pipe: error: config/config.yaml: unknown key 'weights.sigmaa' (did you mean 'weights.sigma'?)" in proc.stderr
    assert not (tmp_path / "results").exists()


def raw_only_config(raw: str) -> dict:
    """One unlabelled TIFF dataset, nothing to train."""
    cfg = small_config(datasets={"mine": {"raw": raw}})
    cfg["train"]["datasets"] = {}
    cfg["predict"]["datasets"] = []
    return cfg


def test_missing_input_stops_before_any_job(tmp_path):
    proc = run_snakemake(tmp_path, "--cores", "1", config=raw_only_config("nowhere/stack.tif"), check=False)
    assert proc.returncode != 0
    assert "key 'datasets.mine.raw': input 'nowhere/stack.tif' does not exist" in proc.stderr


def test_configfile_replaces_the_demo_config(tmp_path):
    """`--configfile my.yaml` runs my datasets only: the demo default is not merged in."""
    mine = small_config()
    mine["datasets"] = {"mine": mine["datasets"].pop("demo")}
    mine["train"]["datasets"] = {"mine": {"train": [0, 3], "val": [3, 4]}}
    mine["predict"]["datasets"] = ["mine"]
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(mine))
    proc = run_snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "my.yaml"))  # config/config.yaml: the demo
    text = proc.stdout + proc.stderr
    assert "results/mine/raw.ome.zarr" in text
    assert "results/demo" not in text


def test_configfiles_compose_as_overlays(tmp_path):
    """`--configfile PRESET mine.yaml`: mine's datasets replace the preset's, its other keys merge in,
    and `--config key=value` applies on top (Snakemake alone would deep-merge the preset's `isbi` in)."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "results: results/mine\n"
        "datasets: {mine: {synthetic: {shape: [4, 96, 96]}}}\n"
        "train: {datasets: {mine: {train: [0, 3], val: [3, 4]}}, steps: 7}\n"
    )
    preset = REPO / "config" / "isbi2012-cpu.yaml"
    proc = run_snakemake(tmp_path, "-n", "-p", "--configfile", str(preset), str(mine), "--config", "seed=5")
    text = expand_args_files(proc.stdout + proc.stderr, tmp_path)
    assert "results/mine/mine/raw.ome.zarr" in text
    assert "isbi" not in text.replace(str(preset), "")
    # What training gets: the preset's network and tile, mine's steps and datasets, --config's seed.
    train = json.loads(re.search(r"--config-json '([^']*)'", text).group(1))
    assert sorted(train["datasets"]) == ["mine"] and train["seed"] == 5
    assert (train["train"]["steps"], train["train"]["tile"], train["model"]["depth"]) == (7, 252, 4)
    assert train["train"]["datasets"] == {"mine": {"train": [0, 3], "val": [3, 4]}}


def test_init_from_is_an_input_of_train(tmp_path):
    """train.init_from is a file input of rule train: missing, the pre-check names the key; present, train lists it."""
    from unet_pipe.model import UNet, save_checkpoint

    cfg = small_config()
    cfg["train"]["init_from"] = "pretrained/model.pt"
    proc = run_snakemake(tmp_path, "-n", config=cfg, check=False)
    assert proc.returncode != 0
    assert ("unet-pipe: error: config/config.yaml: key 'train.init_from': 'pretrained/model.pt' is not a file"
            in proc.stderr)
    save_checkpoint(tmp_path / "pretrained" / "model.pt", UNet(**cfg["model"]))  # the pre-check reads its arch
    text = run_snakemake(tmp_path, "-n", config=cfg).stdout
    train_job = text[text.index("rule train:"):].split("\n\n")[0]
    assert re.search(r"input: .*pretrained/model\.pt", train_job), train_job
    cfg["train"]["init_from"] = "results/model/checkpoint.pt"
    proc = run_snakemake(tmp_path, "-n", config=cfg, check=False)
    assert "key 'train.init_from': is this run's own model/checkpoint.pt" in proc.stderr


def test_bad_tiff_stops_before_any_job(tmp_path):
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 10)
    proc = run_snakemake(tmp_path, "--cores", "1", config=raw_only_config("broken.tif"), check=False)
    assert proc.returncode != 0
    assert "unet-pipe: error: broken.tif: not a readable TIFF" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_train_on_one_dataset_predict_another(tmp_path):
    """Several datasets: train on a labelled one, segment an unlabelled TIFF folder too."""
    import tifffile

    folder = tmp_path / "new_slices"
    folder.mkdir()
    for z in range(3):
        tifffile.imwrite(folder / f"s{z}.tif", np.zeros((64, 64), np.uint8))
    cfg = small_config()
    cfg["datasets"]["new"] = {"raw": "new_slices", "voxel_size": [0.05, 0.004, 0.004]}
    cfg["predict"]["datasets"] = ["demo", "new"]
    proc = run_snakemake(tmp_path, "-n", "--quiet", "rules", config=cfg)
    assert job_counts(proc) == {
        "synth": 1, "ingest_raw": 2, "ingest_labels": 1, "weights": 1, "train": 1, "predict_prepare": 2,
        "predict": 2, "predict_gather": 2, "calibrate": 1, "postprocess": 2, "evaluate": 1, "report": 1, "view": 2,
        # the model with its decisions; the unlabelled dataset's summary and the segmentation report
        "bundle": 1, "summarize": 1, "segmentation_report": 1, "all": 1,
    }


def kill_config() -> dict:
    """Small, but with enough prediction blocks (8 x 3 x 3, with TTA) to kill predict midway."""
    cfg = small_config()
    cfg["datasets"]["demo"]["synthetic"]["shape"] = [8, 192, 192]
    cfg["train"]["datasets"] = {"demo": {"train": [0, 6], "val": [6, 8]}}
    cfg["predict"].update(tta=True, tile=64)
    return cfg


def job_counts(proc) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run."""
    text = proc.stdout + proc.stderr
    table = text.split("Job stats:", 1)[1].split("total", 1)[0]
    counts = {}
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def level0(path: Path) -> np.ndarray:
    return open_image(path)[:]


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """Two clean end-to-end runs of the same config in two folders."""
    runs = []
    for name in ("a", "b"):
        workdir = tmp_path_factory.mktemp(f"clean-{name}")
        run_snakemake(workdir, "--cores", "2", config=kill_config())
        runs.append(workdir)
    return runs


@pytest.mark.slow
def test_demo_dag_produces_every_stage(clean_runs):
    results = clean_runs[0] / "results"
    for store in ("raw", "labels", "weights", "probabilities", "instances"):
        meta_path = results / "demo" / f"{store}.ome.zarr"
        assert open_image(meta_path).shape == (8, 192, 192), store
        attrs = json.loads((meta_path / ".zattrs").read_text())["unet_pipe"]
        assert "provenance" in attrs and attrs["provenance"]["versions"]["unet-pipe"], store
    prob = level0(results / "demo" / "probabilities.ome.zarr")
    assert prob.dtype == np.float32 and 0.0 <= prob.min() and prob.max() <= 1.0
    metrics = json.loads((results / "demo" / "metrics.json").read_text())
    assert 0.0 <= metrics["summary"]["val"]["pixel_error"] <= 1.0
    assert (results / "report" / "report.md").read_text().startswith("# unet-pipe")
    assert (results / "model" / "checkpoint.pt").stat().st_size > 0


@pytest.mark.slow
def test_two_clean_runs_are_bit_identical(clean_runs):
    a, b = (run / "results" / "demo" for run in clean_runs)
    for store in ("raw", "labels", "weights", "probabilities", "instances"):
        np.testing.assert_array_equal(level0(a / f"{store}.ome.zarr"), level0(b / f"{store}.ome.zarr"), err_msg=store)


@pytest.mark.slow
def test_second_run_does_nothing_and_training_change_reruns_downstream_only(clean_runs):
    workdir = clean_runs[0]
    again = run_snakemake(workdir, "--cores", "2", config=kill_config())
    assert "Nothing to be done" in again.stdout + again.stderr
    changed = kill_config()
    changed["train"]["steps"] += 1
    dry = run_snakemake(workdir, "-n", config=changed)
    assert set(job_counts(dry)) == {
        "train", "predict_prepare", "predict", "predict_gather", "calibrate", "postprocess", "evaluate", "report",
        "view", "bundle", "all",
    }
    post = kill_config()
    post["postprocess"].update(method="threshold", threshold=0.6)  # fixed decisions: no calibration
    dry = run_snakemake(workdir, "-n", config=post)
    # model.pt now carries the config's decisions instead of the calibrated ones
    assert set(job_counts(dry)) == {"postprocess", "evaluate", "report", "view", "bundle", "all"}
    recalibrate = kill_config()
    recalibrate["calibrate"] = {"methods": ["threshold"]}
    dry = run_snakemake(workdir, "-n", config=recalibrate)
    assert set(job_counts(dry)) == {"calibrate", "postprocess", "evaluate", "report", "view", "bundle", "all"}
    run_snakemake(workdir, "-n", config=kill_config())  # restore the config file


@pytest.mark.slow
def test_export_rule_writes_a_valid_bioimageio_package(clean_runs):
    """export.enabled adds the package to rule all; only the export job runs; the package is ours."""
    import zipfile

    import yaml as _yaml

    pytest.importorskip("bioimageio.spec")
    workdir = clean_runs[0]
    cfg = kill_config()
    cfg["export"] = {"enabled": True, "authors": [{"name": "A. Tester", "affiliation": "unet-pipe CI"}]}
    dry = run_snakemake(workdir, "-n", config=cfg)
    assert set(job_counts(dry)) == {"export", "all"}  # nothing upstream reruns
    run_snakemake(workdir, "--cores", "2", config=cfg)
    package = workdir / "results" / "model" / "bioimageio.zip"
    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
        rdf = _yaml.safe_load(z.read("rdf.yaml"))
    assert {"rdf.yaml", "weights.pt", "weights.torchscript.pt", "test_input.npy", "test_output.npy"} <= names
    assert rdf["authors"][0]["name"] == "A. Tester" and rdf["type"] == "model"
    assert rdf["config"]["unet_pipe"]["format"] == "unet-pipe-bioimageio-export"
    # The package is made from model.pt: it carries the calibrated decisions and the training voxel size.
    decisions = json.loads((workdir / "results" / "model" / "decisions.json").read_text())
    application = rdf["config"]["unet_pipe"]["application"]
    assert {k: application["decisions"][k] for k in decisions["decisions"]} == decisions["decisions"]
    assert application["decisions"]["cell_threshold"] == decisions["cell_threshold"]
    assert application["voxel_size"] == [0.05, 0.004, 0.004]  # the synthetic demo's
    from bioimageio.spec import load_model_description

    assert load_model_description(package, perform_io_checks=False).type == "model"
    run_snakemake(workdir, "-n", config=kill_config())  # restore the config file


@pytest.mark.slow
def test_killed_predict_job_then_rerun_gives_identical_output(clean_runs, tmp_path):
    """SIGKILL the running predict job; the rerun resumes and ends bit-identical to a clean run."""
    import psutil

    cfg = kill_config()
    run_snakemake(tmp_path, "--cores", "2", "results/model/checkpoint.pt", config=cfg)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    done_dir = tmp_path / "results" / "demo" / "probabilities.ome.zarr.partial" / ".unet_pipe_done"
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and any(done_dir.iterdir()):
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    cmd = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if "predict" in cmd and "--shard" in cmd and "python" in cmd:
                    child.send_signal(signal.SIGKILL)
                    killed = cmd
                    break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=300)
    assert killed, f"predict finished before it could be killed:\n{out[-2000:]}"
    assert proc.returncode != 0, "snakemake should report the killed job"
    assert not (tmp_path / "results" / "demo" / "probabilities.ome.zarr").exists()
    n_done = len(list(done_dir.iterdir()))
    assert n_done >= 1
    rerun = run_snakemake(tmp_path, "--cores", "2", config=cfg)
    assert "predict" in job_counts(rerun)
    clean = clean_runs[0] / "results" / "demo"
    for store in ("probabilities", "instances"):
        np.testing.assert_array_equal(
            level0(tmp_path / "results" / "demo" / f"{store}.ome.zarr"), level0(clean / f"{store}.ome.zarr"), err_msg=store
        )


def test_unlabelled_value_reaches_weights_calibrate_and_evaluate(tmp_path):
    cfg = small_config()
    cfg["weights"]["unlabelled_value"] = 128
    proc = run_snakemake(tmp_path, "-n", "-p", "--forceall", config=cfg)
    lines = expand_args_files(proc.stdout + proc.stderr, tmp_path).splitlines()
    commands = [line.split("unet-pipe ", 1)[1] for line in lines if "unet-pipe " in line]
    for stage in ("weights", "calibrate", "evaluate"):
        chosen = [c for c in commands if c.startswith(f"{stage} ")]
        assert chosen and all("--unlabelled-value 128" in c for c in chosen), (stage, commands)


def test_labels_offset_reaches_ingest_and_is_checked_against_the_raw(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "raw.tif", np.zeros((4, 64, 64), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", np.zeros((3, 32, 40), np.uint8), photometric="minisblack")
    cfg = small_config()
    cfg["datasets"]["crop"] = {"raw": "raw.tif", "labels": "labels.tif", "labels_offset": [1, 10, 20]}
    cfg["train"]["datasets"] = {"crop": {"train": [1, 3], "val": [3, 4]}}
    proc = run_snakemake(tmp_path, f"{cfg['results']}/crop/labels.ome.zarr", "-n", "-p", config=cfg)
    ingest = [line for line in (proc.stdout + proc.stderr).splitlines() if "unet-pipe ingest" in line and "--labels" in line]
    assert ingest and all("--offset 1 10 20" in line for line in ingest), ingest
    cfg["datasets"]["crop"]["labels_offset"] = [1, 10, 30]  # x: 30 + 40 > 64
    proc = run_snakemake(tmp_path, "-n", config=cfg, check=False)
    assert proc.returncode != 0 and "'datasets.crop.labels_offset'" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_cpu_preset_runs_unchanged_on_other_data(tmp_path):
    """The ISBI CPU preset with nothing replaced but its datasets (and its steps cut to 40, for
    time): a uint16 stack of 12 slices of 200 x 300 px, narrower than the 252-px training tile,
    with a third of its gray range unused, runs end to end on its automatic split."""
    import tifffile

    from unet_pipe.synth import synthesize

    stack = synthesize((12, 200, 300), seed=3)
    tifffile.imwrite(tmp_path / "raw.tif", stack.raw.astype(np.uint16) * 40 + 1000, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", stack.labels, photometric="minisblack")
    (tmp_path / "only-data.yaml").write_text(yaml.safe_dump(
        {"results": "results", "datasets": {"other": {"raw": "raw.tif", "labels": "labels.tif"}}}))
    (tmp_path / "short.yaml").write_text(yaml.safe_dump({"train": {"steps": 40, "val_every": 20, "checkpoint_every": 20}}))
    proc = run_snakemake(tmp_path, "--cores", "2", "--configfile", str(REPO / "config" / "isbi2012-cpu.yaml"),
                         str(tmp_path / "only-data.yaml"), str(tmp_path / "short.yaml"))  # fmt: skip
    assert "dataset 'other' split automatically: train [0, 8], calibrate [8, 10], val [10, 12]" in proc.stderr
    decisions = json.loads((tmp_path / "results" / "model" / "decisions.json").read_text())
    assert decisions["slices"] == {"other": [8, 10]}
    metrics = json.loads((tmp_path / "results" / "other" / "metrics.json").read_text())
    assert metrics["params"]["val_slices"] == [10, 12] and metrics["params"]["train_slices"] == [0, 8]
    assert metrics["params"]["threshold"] == decisions["cell_threshold"]
    val = [s for s in metrics["per_slice"] if s["subset"] == "val"]
    assert [s["z"] for s in val] == [10, 11] and all(0 <= s["pixel_error"] < 0.5 for s in val)
    assert [s["z"] for s in metrics["per_slice"] if s["subset"] == "calibrate"] == [8, 9]
    assert open_image(tmp_path / "results" / "other" / "instances.ome.zarr").shape == (12, 200, 300)
    assert (tmp_path / "results" / "report" / "report.md").exists()


def test_instances_3d_with_method_auto_calibrates_in_3d(tmp_path):
    """postprocess.instances 3d with method auto: calibrate chooses 3D decisions (--instances 3d) and the
    3D postprocess jobs take them from the decisions file."""
    cfg = small_config()
    cfg["postprocess"] = {**cfg.get("postprocess", {}), "instances": "3d", "method": "auto"}
    proc = run_snakemake(tmp_path, "-n", "-p", "--forceall", config=cfg)
    lines = expand_args_files(proc.stdout + proc.stderr, tmp_path).splitlines()
    commands = [line.split("unet-pipe ", 1)[1] for line in lines if "unet-pipe " in line]
    calibrate = [c for c in commands if c.startswith("calibrate ")]
    assert len(calibrate) == 1 and "--instances 3d" in calibrate[0], commands
    post = [c for c in commands if c.startswith("postprocess ")]
    assert post and all("--decisions" in c and "--instances 3d" in c for c in post), post


@pytest.mark.slow
def test_isotropic_preset_runs_in_3d_end_to_end(tmp_path):
    """config/isotropic-cpu.yaml with only its data shrunk (a synthetic 3D cube of 84 x 96 x 96) and its
    steps cut to 10, for time: every stage runs, the decisions are chosen in 3D, the instances are 3D
    objects (ids spanning slices) and evaluate reports 3D scores on the held-out range."""
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({
        "results": "results",
        "datasets": {"cube": {"synthetic": {"shape": [84, 96, 96], "seed": 1, "mode": "3d"},
                              "voxel_size": [0.01, 0.01, 0.01]}},
        "train": {"steps": 10, "val_every": 10, "checkpoint_every": 10},
    }))
    proc = run_snakemake(tmp_path, "--cores", "2", "--configfile", str(REPO / "config" / "isotropic-cpu.yaml"),
                         str(tmp_path / "small.yaml"))  # fmt: skip
    assert "dataset 'cube' split automatically: train [0, 56], calibrate [56, 70], val [70, 84]" in proc.stderr
    results = tmp_path / "results"
    decisions = json.loads((results / "model" / "decisions.json").read_text())
    assert decisions["instances"] == "3d" and decisions["decisions"]["instances"] == "3d"
    assert decisions["windows"] == {"cube": [[[56, 70], [0, 96], [0, 96]]]}
    inst = np.asarray(open_image(results / "cube" / "instances.ome.zarr")[:])
    assert inst.shape == (84, 96, 96)
    own = json.loads((results / "cube" / "instances.ome.zarr" / ".zattrs").read_text())["unet_pipe"]
    assert own["instances_mode"] == "3d"
    metrics = json.loads((results / "cube" / "metrics.json").read_text())
    val3d = metrics["summary"]["val"]["scores_3d"]
    assert val3d["z"] == [70, 84] and 0 <= val3d["are"] <= 1 and val3d["truth_objects"] > 0
    assert (results / "report" / "report.md").exists()
