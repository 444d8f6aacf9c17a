"""The batch workflow with a trained model (segment.model): no training, any number of unlabelled
datasets, ingest -> predict -> postprocess -> summary -> one report; adding a dataset runs its jobs only."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_segment import DECISIONS, VOXEL, tiny_checkpoint, write_stack
from unet_pipe.io import open_image
from unet_pipe.model_bundle import bundle_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N_DATASETS = 10


def batch_config(root: Path, n: int = N_DATASETS) -> dict:
    return {
        "results": "results",
        "datasets": {f"stack{i:02d}": {"raw": f"new/stack{i:02d}.tif"} for i in range(n)},
        "segment": {"model": "models/model.pt", "tiff": True},
        "ingest": {"chunks": [1, 64, 64], "pyramid_levels": 1},
        "predict": {"precision": "float32"},
        "evaluate": {"figures": 1},
    }


@pytest.fixture
def batch(tmp_path) -> Path:
    """A trained (tiny) model carrying its decisions and 11 small unlabelled stacks; config for 10."""
    ckpt = tiny_checkpoint(tmp_path / "models" / "checkpoint.pt")
    bundle_model(ckpt, tmp_path / "models" / "model.pt", decisions={**DECISIONS, "source": "calibrate"})
    for i in range(N_DATASETS + 1):
        write_stack(tmp_path / "new" / f"stack{i:02d}.tif", shape=(2, 64, 64 + 8 * (i % 3)), seed=i)
    (tmp_path / "batch.yaml").write_text(yaml.safe_dump(batch_config(tmp_path)))
    return tmp_path


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "batch.yaml"), *args],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def planned_jobs(text: str) -> dict[str, int]:
    """``{rule: count}`` from Snakemake's job-stats table."""
    table = text[text.find("Job stats:"):]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_check_config_prints_the_composed_batch_config(batch):
    proc = subprocess.run([str(BIN / "unet-pipe"), "check-config", "--print", "batch.yaml"], cwd=batch,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert config["segment"] == {"model": "models/model.pt", "tiff": True}
    assert len(config["datasets"]) == N_DATASETS and config["train"]["datasets"] == {}
    assert config["calibrate"]["datasets"] == {} and "split automatically" not in proc.stderr


def test_a_trained_model_with_training_datasets_is_refused(batch, run_cli, monkeypatch):
    cfg = batch_config(batch)
    cfg["train"] = {"datasets": {"stack00": {"train": [0, 1], "val": [1, 2]}}}
    (batch / "bad.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(batch)
    code, _, err = run_cli("check-config", "bad.yaml")
    assert code == 2 and "key 'train.datasets': segment.model applies a trained model" in err
    cfg = batch_config(batch)
    cfg["segment"]["model"] = "models/nothing.pt"
    (batch / "bad.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("check-config", "bad.yaml")
    assert code == 2 and "key 'segment.model': 'models/nothing.pt' is not a file" in err


def test_dry_run_plans_no_training_and_one_chain_per_dataset(batch):
    jobs = planned_jobs(snakemake(batch, "-n").stdout)
    for rule in ("train", "weights", "calibrate", "evaluate", "ingest_labels", "report", "synth"):
        assert rule not in jobs, jobs
    for rule in ("ingest_raw", "predict_prepare", "predict", "predict_gather", "postprocess", "view", "summarize",
                 "instances_tiff"):
        assert jobs[rule] == N_DATASETS, (rule, jobs)
    assert jobs["bundle"] == 1 and jobs["segmentation_report"] == 1


@pytest.mark.slow  # ~150 s on 2 cores: 83 jobs
def test_batch_run_segments_every_dataset_and_adding_one_runs_only_its_jobs(batch):
    from unet_pipe.segment import segment

    snakemake(batch, "--cores", "2")
    results = batch / "results"
    reference = segment(batch / "models" / "model.pt", [batch / "new" / "stack03.tif"], batch / "ref",
                        precision="float32")[0]
    expected = np.asarray(open_image(batch / "ref" / "stack03" / "instances.ome.zarr")[:])
    np.testing.assert_array_equal(open_image(results / "stack03" / "instances.ome.zarr")[:], expected)
    report = (results / "report" / "segmentation.md").read_text()
    for i in range(N_DATASETS):
        name = f"stack{i:02d}"
        summary = json.loads((results / name / "summary.json").read_text())
        inst = np.asarray(open_image(results / name / "instances.ome.zarr")[:])
        assert summary["objects"] == len(np.unique(inst[inst > 0])) > 0
        assert summary["voxel_size_um"] == pytest.approx(list(VOXEL))
        assert summary["decisions"]["threshold"] == DECISIONS["threshold"]
        assert re.search(rf"^\| {name} \| 2 × 64 × {64 + 8 * (i % 3)} \| .* \| {summary['objects']} \|", report, re.M)
        assert (results / name / "instances.tif").is_file() and (results / name / "view.ome.zarr").is_dir()
    assert summary_row_count(report) == N_DATASETS
    assert reference["objects"] == json.loads((results / "stack03" / "summary.json").read_text())["objects"]
    assert (results / "report" / "segmentation_figures" / "stack00_slices.jpg").is_file()
    # Nothing left to do; one more dataset plans its own chain and the report only.
    assert "Nothing to be done" in snakemake(batch, "-n").stdout + snakemake(batch, "-n").stderr
    (batch / "batch.yaml").write_text(yaml.safe_dump(batch_config(batch, N_DATASETS + 1)))
    jobs = planned_jobs(snakemake(batch, "-n").stdout)
    assert jobs.pop("segmentation_report") == 1 and jobs.pop("all") == 1
    assert set(jobs.values()) == {1}, jobs  # ingest, predict x3, postprocess, view, summarize, tiff of stack10
    proc = snakemake(batch, "-n", "-p")
    assert "stack10" in proc.stdout and "stack09/raw.ome.zarr --" not in proc.stdout


def summary_row_count(report: str) -> int:
    table = report[report.find("## Summary"):report.find("\n\n", report.find("| dataset"))]
    return len(re.findall(r"^\| stack\d\d \|", table, re.M))
