"""The worked example of docs/worked-example.md is a config that works: its mine.yaml,
taken verbatim from the document with only /data/em/ pointed at a small synthetic stack of
the same layout (OME-Zarr raw, a sparse labelled crop in its NGFF labels group, placed by
its translation), composes with the ISBI CPU preset, and the document's command block, run
as a dry run, plans every stage."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_workflow import expand_args_files

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOC = REPO / "docs" / "worked-example.md"
SCALE = [0.04, 0.005, 0.005]  # µm, the worked example's voxel size
CROP = (40, 16, 24)  # voxel where the annotated box starts: slices 40-59, as in the worked example


def readme_mine_yaml() -> str:
    text = DOC.read_text()
    match = re.search(r"```yaml\n(# mine\.yaml.*?)```", text, re.S)
    assert match, "docs/worked-example.md has no ```yaml block starting with '# mine.yaml'"
    return match.group(1)


def workflow_block() -> str:
    """The document's command block that checks the config and runs the workflow."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    (block,) = [b for b in blocks if "snakemake --configfile config/isbi2012-cpu.yaml mine.yaml" in b]
    return block


def write_stack(root: Path) -> None:
    """/data/em/stack.ome.zarr with labels/annotations: a (20, 48, 40) crop of 0 / 255 / 128."""
    import zarr
    from ome_zarr.writer import write_multiscale, write_multiscale_labels

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (64, 80, 80), dtype=np.uint8)
    crop = np.full((20, 48, 40), 255, np.uint8)
    crop[:, ::8] = 0  # membranes
    crop[:, :, 30:] = 128  # nobody traced these
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    at = [o * s for o, s in zip(CROP, SCALE)]
    group = zarr.open_group(str(root / "stack.ome.zarr"), mode="w", zarr_format=2)
    with warnings.catch_warnings():  # coordinate_transformations: deprecated in ome-zarr-py, still its way
        warnings.simplefilter("ignore")
        write_multiscale([raw], group, axes=axes, coordinate_transformations=[[{"type": "scale", "scale": SCALE}]])
        write_multiscale_labels(
            [crop], group, name="annotations", axes=axes,
            coordinate_transformations=[[{"type": "scale", "scale": SCALE}, {"type": "translation", "translation": at}]],
        )  # fmt: skip


@pytest.fixture
def example(tmp_path) -> Path:
    import torch

    from unet_pipe.model import UNet, save_checkpoint

    write_stack(tmp_path / "data" / "em")
    mine = readme_mine_yaml().replace("/data/em/", f"{tmp_path}/data/em/")
    (tmp_path / "mine.yaml").write_text(mine)
    init = yaml.safe_load(mine)["train"]["init_from"]
    torch.manual_seed(0)
    save_checkpoint(tmp_path / init, UNet(depth=4, base_channels=16))  # the preset's network: fine-tuned from
    return tmp_path


def test_readme_example_composes_with_the_preset(example) -> None:
    proc = subprocess.run(
        [str(BIN / "unet-pipe"), "check-config", "--print", str(REPO / "config" / "isbi2012-cpu.yaml"), "mine.yaml"],
        cwd=example, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert sorted(config["datasets"]) == ["mystack"]  # the preset's isbi and isbi_test are gone
    assert config["train"]["datasets"] == {"mystack": {"train": [40, 52], "val": [56, 60]}}
    assert config["calibrate"]["datasets"] == {"mystack": [52, 56]}
    assert config["weights"]["unlabelled_value"] == 128 and config["weights"]["w0"] == 10.0  # merged key by key
    assert (config["model"]["depth"], config["model"]["base_channels"], config["train"]["tile"]) == (4, 16, 252)
    assert config["train"]["steps"] == 1000 and config["export"]["enabled"] is True


@pytest.mark.slow
def test_readme_example_plans_every_stage(example) -> None:
    """The document's block as typed, from a folder laid out as the repository root, as a dry run."""
    for name in ("Snakefile", "workflow", "profiles", "config"):
        (example / name).symlink_to(REPO / name)
    block = workflow_block()
    assert block.count("\nsnakemake ") == 1
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.replace("\nsnakemake ", "\nsnakemake -n -p ")], cwd=example,
        capture_output=True, text=True, timeout=600, env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(example)},
    )  # fmt: skip
    text = expand_args_files(proc.stdout + proc.stderr, example)
    assert proc.returncode == 0, text[-3000:]
    for rule in ("ingest", "weights", "train", "predict", "calibrate", "postprocess", "evaluate", "view", "export"):
        assert re.search(rf"^rule {rule}", text, re.M) or re.search(rf"\b{rule}\s+\d+", text), rule
    assert "--unlabelled-value 128" in text
    assert "mystack=52:56" in text  # calibration on its own slices
    assert "results/mine/model/bioimageio.zip" in text


def only_datasets_yaml(example: Path) -> Path:
    """The preset run unchanged but for the data: an overlay that gives nothing but the dataset."""
    mine = yaml.safe_load((example / "mine.yaml").read_text())
    path = example / "only-data.yaml"
    path.write_text(yaml.safe_dump({"results": "results/only-data", "datasets": mine["datasets"]}))
    return path


def test_preset_with_only_the_datasets_replaced_splits_them(example) -> None:
    """The labelled crop's slices 40-59 are split automatically: train 40-53, calibrate 54-56, val 57-59."""
    proc = subprocess.run(
        [str(BIN / "unet-pipe"), "check-config", "--print", str(REPO / "config" / "isbi2012-cpu.yaml"),
         str(only_datasets_yaml(example))],
        cwd=example, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert config["train"]["datasets"] == {"mystack": {"train": [40, 54], "val": [57, 60]}}
    assert config["calibrate"]["datasets"] == {"mystack": [54, 57]}
    assert "dataset 'mystack' split automatically" in proc.stderr


@pytest.mark.slow
def test_preset_with_only_the_datasets_replaced_plans_every_stage(example) -> None:
    proc = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(example), "-n", "-p",
         "--configfile", str(REPO / "config" / "isbi2012-cpu.yaml"), str(only_datasets_yaml(example))],
        capture_output=True, text=True, timeout=600, env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(example)},
    )  # fmt: skip
    text = expand_args_files(proc.stdout + proc.stderr, example)
    assert proc.returncode == 0, text[-3000:]
    for rule in ("ingest", "weights", "train", "predict", "calibrate", "postprocess", "evaluate", "view"):
        assert re.search(rf"^rule {rule}", text, re.M) or re.search(rf"\b{rule}\s+\d+", text), rule
    assert text.count("split automatically: train [40, 54], calibrate [54, 57], val [57, 60]") == 1
    assert "mystack=54:57" in text and "--val 57 60" in text
