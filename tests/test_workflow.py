"""The Snakemake workflow: config errors before any job, dry run, a real demo run."""
from __future__ import annotations

import os
import subprocess
import sys
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


def test_dry_run_lists_the_chain(tmp_path):
    proc = run_snakemake(tmp_path, "-n", "--quiet", "rules")
    for rule in ("synth", "ingest_raw", "ingest_labels"):
        assert rule in proc.stdout + proc.stderr


def test_bad_config_stops_before_any_job(tmp_path):
    cfg = small_config()
    cfg["weights"]["sigmaa"] = 3
    proc = run_snakemake(tmp_path, "--cores", "1", config=cfg, check=False)
    assert proc.returncode != 0
    assert "unet-pipe: error: config: unknown key 'weights.sigmaa'" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_missing_input_stops_before_any_job(tmp_path):
    cfg = small_config(datasets={"mine": {"raw": "nowhere/stack.tif"}})
    cfg["train"]["datasets"] = {}
    cfg["predict"]["datasets"] = []
    proc = run_snakemake(tmp_path, "--cores", "1", config=cfg, check=False)
    assert proc.returncode != 0
    assert "key 'datasets.mine.raw': input 'nowhere/stack.tif' does not exist" in proc.stderr


@pytest.mark.slow
def test_demo_dag_runs_and_second_run_does_nothing(tmp_path):
    run_snakemake(tmp_path, "--cores", "2")
    raw = open_image(tmp_path / "results" / "demo" / "raw.ome.zarr")
    labels = open_image(tmp_path / "results" / "demo" / "labels.ome.zarr")
    assert raw.shape == labels.shape == (4, 96, 96)
    assert set(np.unique(labels[:])) == {0, 255}
    again = run_snakemake(tmp_path, "--cores", "2")
    assert "Nothing to be done" in again.stdout + again.stderr
