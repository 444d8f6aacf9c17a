"""The README's front-page block "Segment new stacks with a trained model", run verbatim: the one
command and the batch workflow, on a tiny bundled model and two small stacks (a TIFF and a folder
of slices) laid out where the block expects them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from test_segment import DECISIONS, VOXEL, tiny_checkpoint, write_stack
from unet_pipe.io import open_image
from unet_pipe.model_bundle import bundle_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- segment:begin.*?-->\n```bash\n(.*?)```\n<!-- segment:end -->", text, re.S)
    assert match, "README has no ```bash block between <!-- segment:begin --> and <!-- segment:end -->"
    return match.group(1)


def block_yaml(block: str) -> dict:
    match = re.search(r"cat > segment\.yaml <<'YAML'\n(.*?)\nYAML\n", block, re.S)
    assert match, "the block writes no segment.yaml"
    return yaml.safe_load(match.group(1))


@pytest.fixture
def lab(tmp_path) -> Path:
    """The files the block names: the model of a training run and the new stacks."""
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt")
    model = tmp_path / "results" / "isbi2012-cpu" / "model" / "model.pt"
    bundle_model(ckpt, model, decisions={**DECISIONS, "source": "calibrate"})
    write_stack(tmp_path / "new" / "run_0412.tif", shape=(2, 64, 72))
    slices = write_stack(tmp_path / "slices.tif", shape=(2, 64, 64), seed=3)
    (tmp_path / "new" / "run_0413").mkdir()
    for z, page in enumerate(tifffile.imread(slices)):
        tifffile.imwrite(tmp_path / "new" / "run_0413" / f"s{z}.tif", page, imagej=True,
                         resolution=(1 / VOXEL[2], 1 / VOXEL[1]), metadata={"unit": "um"})
    for name in ("Snakefile", "workflow", "profiles"):  # the block runs from the repository root
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def test_readme_block_config_is_valid(lab):
    config = block_yaml(readme_block())
    (lab / "segment.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([str(BIN / "unet-pipe"), "check-config", "--print", "segment.yaml"], cwd=lab,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    composed = yaml.safe_load(proc.stdout)
    assert composed["segment"]["model"] == "results/isbi2012-cpu/model/model.pt"
    assert sorted(composed["datasets"]) == ["run_0412", "run_0413"] and composed["train"]["datasets"] == {}


@pytest.mark.slow  # the block runs segment on 2 stacks and the workflow (19 jobs): ~60 s on 2 cores
def test_readme_block_runs_verbatim(lab):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(lab)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=lab, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    for name, shape in (("run_0412", (2, 64, 72)), ("run_0413", (2, 64, 64))):
        one = lab / "segmented" / name
        batch = lab / "results" / "segmented" / name
        summary = json.loads((one / "summary.json").read_text())
        inst = np.asarray(open_image(one / "instances.ome.zarr")[:])
        assert inst.shape == shape and summary["objects"] == len(np.unique(inst[inst > 0])) > 0
        assert summary["decisions"]["threshold"] == DECISIONS["threshold"]
        assert summary["voxel_size_um"][1:] == pytest.approx(list(VOXEL[1:]))
        np.testing.assert_array_equal(tifffile.imread(one / "instances.tif"), inst)
        assert (one / "view.ome.zarr").is_dir() and (batch / "view.ome.zarr").is_dir()
        # The same model, stack and decisions give the same instances in the workflow.
        np.testing.assert_array_equal(open_image(batch / "instances.ome.zarr")[:], inst)
        assert (batch / "instances.tif").is_file()
    report = (lab / "results" / "segmented" / "report" / "segmentation.md").read_text()
    assert "| run_0412 | 2 × 64 × 72 |" in report and "| run_0413 | 2 × 64 × 64 |" in report
    assert (lab / "segmented" / "report.md").is_file()
    assert not (lab / "results" / "segmented" / "model" / "checkpoint.pt").exists()  # nothing trained
