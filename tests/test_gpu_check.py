"""benchmarks/gpu_check: the prepared GPU run, kept from rotting by its CPU dry mode."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_steps  # noqa: E402


def test_junit_counts(tmp_path) -> None:
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2&#10;more">x</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_gpu"><skipped message="no CUDA device"/></testcase>'
        '<testcase classname="tests.test_b" name="test_broken"><error message="fixture failed"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert gpu_check_steps.junit_counts(xml) == {
        "passed": 1, "failed": 1, "skipped": 1, "errors": 1,
        "failures": ["tests.test_a::test_bad: assert 1 == 2", "tests.test_b::test_broken: fixture failed"],
    }


def test_plan_flops_counts_every_tile_of_the_plan() -> None:
    from unet_pipe.tiling import TilePlan

    # Depth 2, base 2, window 20^2 (output 4^2): 1->2 at 18^2, 2->2 at 16^2, 2->4 at 6^2, 4->4 at 4^2,
    # up-conv 4->2 (2x2) from 4^2, 4->2 at 6^2, 2->2 at 4^2, head 2->2 (1x1) at 4^2; 2 FLOPs per MAC.
    per_window = 2 * (1*2*9*18**2 + 2*2*9*16**2 + 2*4*9*6**2 + 4*4*9*4**2 + 4*2*4*4**2 + 4*2*9*6**2
                      + 2*2*9*4**2 + 2*2*1*4**2)  # fmt: skip
    assert per_window == 47376
    plan = TilePlan(shape=(2, 8, 8), chunks=(1, 8, 8), tile=(1, 4, 4), block=(1, 8, 8), batch=4, depth=2, dims=2)
    arch = {"in_channels": 1, "n_classes": 2, "depth": 2, "base_channels": 2, "dims": 2, "dropout": 0.0}
    assert gpu_check_steps.plan_flops(arch, plan) == (8 * 47376, 8)  # 2 blocks of 2 x 2 tiles


def test_targets_and_strict_json() -> None:
    result = {"mode": "gpu", "isbi": {"pixel_error": 0.071},
              "gigavoxel": {"fraction_of_conv_rate": 0.5, "seconds_per_gigavoxel": None}}
    assert gpu_check.targets(result) == {
        "isbi_pixel_error_le_0.07": False, "fraction_of_conv_rate_ge_0.5": True, "gigavoxel_le_60s": None,
    }
    assert set(gpu_check.targets({**result, "mode": "dry"}).values()) == {None}
    import numpy as np

    assert json.dumps(gpu_check.json_safe({"a": float("nan"), "b": np.float32(0.5), "c": (np.int64(3), Path("x"))})) \
        == '{"a": null, "b": 0.5, "c": [3, "x"]}'


def test_a_step_past_its_limit_is_killed_and_reported(tmp_path) -> None:
    """pytest's collection alone (torch, zarr, dask, every test module) takes longer than 3 s:
    the step is killed with its pytest, and the JSON names the stage it was in."""
    params = {"dry": True, "device": "cpu", "workdir": str(tmp_path), "sizes": gpu_check.DRY, "isbi": ""}
    report = gpu_check.run_step("tests", params, 3.0, tmp_path, tmp_path / "log")
    assert set(report) == set(gpu_check.STEP_KEYS["tests"])
    assert report["error"] == "timed out after 3 s (during pytest)"
    assert report["passed"] is None and 3.0 <= report["seconds"] < 10.0


@pytest.mark.slow
def test_dry_mode_runs_every_step(tmp_path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {"gpu_check.log", "isbi_train.csv", "isbi_metrics.json", "tests.xml"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    assert result["mode"] == "dry" and result["total_seconds"] < result["budget_seconds"] == 280
    for step, keys in gpu_check.STEP_KEYS.items():
        assert tuple(result[step]) == keys, step
        assert result[step]["error"] is None, (step, result[step]["error"])
    assert set(result["targets"].values()) == {None}

    env_ = result["env"]
    assert env_["device"] == "cpu" and env_["cores"] >= 1 and env_["cpu"] and env_["torch"]
    assert env_["packages"]["zarr"] and env_["packages"]["torch"] == env_["torch"]

    tests = result["tests"]
    import torch

    ran = tests["passed"] + tests["failed"] + tests["skipped"] + tests["errors"]
    assert ran >= 3 and tests["failed"] == tests["errors"] == 0 and tests["deselected"] > 100
    assert tests["skipped"] == (0 if torch.cuda.is_available() else ran)

    giga = result["gigavoxel"]
    assert giga["shape"] == [4, 512, 512] and giga["voxels"] == 4 * 512 * 512
    assert giga["gigavoxels"] == pytest.approx(giga["voxels"] / 1e9, rel=1e-12)
    assert giga["predict_seconds"] > 0 and giga["write_input_seconds"] > 0 and giga["pyramid_seconds"] > 0
    assert giga["voxels_per_s"] == pytest.approx(giga["voxels"] / giga["predict_seconds"], rel=1e-9)
    assert giga["seconds_per_gigavoxel"] == pytest.approx(giga["predict_seconds"] / giga["gigavoxels"], rel=1e-9)
    assert giga["achieved_flops_per_s"] == pytest.approx(giga["model_flops"] / giga["predict_seconds"], rel=1e-9)
    assert giga["conv_rate_flops_per_s"] == max(giga["conv_rates"].values()) > 0
    assert len(giga["conv_rates"]) == 3 and giga["conv_rate_dtype"] == "float32"  # depth 3, CPU
    assert 0 < giga["fraction_of_conv_rate"] < 2 and giga["bare_model_seconds"] > 0
    assert giga["efficiency_vs_bare_model"] == pytest.approx(
        giga["bare_model_seconds"] / giga["predict_seconds"], rel=1e-9)
    assert giga["fraction_of_conv_rate"] == pytest.approx(
        giga["achieved_flops_per_s"] / giga["conv_rate_flops_per_s"], rel=1e-9)
    assert giga["tiles"] >= 4 and 0 < giga["useful_fraction"] <= 1 and giga["output_dtype"] == "uint8"
    assert giga["computed_output_ratio"] == pytest.approx(
        giga["tiles"] * math.prod(giga["tile"]) / giga["voxels"], rel=1e-12) and giga["computed_output_ratio"] >= 1

    isbi = result["isbi"]
    from unet_pipe.model import UNet

    assert isbi["network"] == {"depth": 3, "base_channels": 4, "dims": 2, "tile": 124, "output": 84}
    assert isbi["parameters"] == sum(p.numel() for p in UNet(depth=3, base_channels=4).parameters())
    assert isbi["train_slices"] == [0, 20] and isbi["val_slices"] == [25, 30] and isbi["tta"] is True
    assert isbi["seconds_per_step"] > 0 and isbi["train_budget_seconds"] == 3.0
    assert isbi["steps"] == max(isbi["warmup_steps"], int(isbi["train_budget_seconds"] / isbi["seconds_per_step"]))
    assert isbi["train_seconds"] > 0 and math.isfinite(isbi["final_loss"]) and isbi["predict_seconds"] > 0
    assert 0 <= isbi["pixel_error"] <= 1 and 0 <= isbi["rand_error"] <= 1
    decision = isbi["decision"]
    assert decision["source"] == "calibrate" and decision["method"] in ("threshold", "watershed")
    assert 0 < decision["threshold"] < 1 and 0 < decision["cell_threshold"] < 1
    metrics = json.loads((tmp_path / "out" / "isbi_metrics.json").read_text())
    assert metrics["summary"]["all"]["pixel_error"] == pytest.approx(isbi["pixel_error"], abs=1e-12)
    assert [r["z"] for r in metrics["per_slice"]] == [25, 26, 27, 28, 29]
