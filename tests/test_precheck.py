"""The pre-check: ``check-config`` and the workflow's parse-time check find the same problems, all at once."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from unet_pipe.cli import main
from unet_pipe.config import precheck, read_config_file, validate_config
from unet_pipe.errors import ConfigError, ConfigErrors, UnetPipeError, error_lines

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def small_config() -> dict:
    """The demo config shrunk (as tests/test_workflow.py shrinks it)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["demo"]["synthetic"]["shape"] = [4, 96, 96]
    cfg["train"]["datasets"] = {"demo": {"train": [0, 3], "val": [3, 4]}}
    cfg["train"].update(steps=4, val_every=2, checkpoint_every=2, tile=92)
    cfg["model"].update(depth=2, base_channels=4)
    return cfg


def problems(exc: ConfigError) -> list[str]:
    return [str(e) for e in getattr(exc, "errors", [exc])]


def write_stack(path: Path, shape: tuple[int, ...], dtype: str) -> None:
    tifffile.imwrite(path, np.zeros(shape, dtype=dtype), photometric="minisblack")


def write_checkpoint(path: Path, **arch) -> None:
    from unet_pipe.model import UNet, save_checkpoint

    save_checkpoint(path, UNet(**arch))


# ---------------------------------------------------------------- duplicate keys


def test_duplicate_keys_are_refused_every_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 0\nweights:\n  w0: 10\n  sigma: 5\n  w0: 3\nseed: 1\n")
    with pytest.raises(ConfigErrors) as info:
        read_config_file(path)
    assert problems(info.value) == [
        f"{path}: key 'w0' given twice (lines 3 and 5): YAML keys must be unique; keep one",
        f"{path}: key 'seed' given twice (lines 1 and 6): YAML keys must be unique; keep one",
    ]
    path.write_text("train: {steps: 3, steps: 4}\n")  # in a flow mapping, on one line
    with pytest.raises(ConfigError, match=r"key 'steps' given twice \(lines 1 and 1\)"):
        read_config_file(path)


def test_merge_keys_override_without_being_duplicates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {w0: 10, sigma: 5}\nweights:\n  <<: *b\n  w0: 3\n")
    assert read_config_file(path)["weights"] == {"w0": 3, "sigma": 5}


def test_duplicates_in_every_overlay_at_once(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("seed: 0\nseed: 1\n")
    b.write_text("results: r\nresults: s\n")
    with pytest.raises(ConfigErrors) as info:
        precheck([a, b])
    assert [e.path for e in info.value.errors] == [str(a), str(b)]


def test_each_problem_names_the_overlay_that_gave_its_key(tmp_path):
    preset, mine = tmp_path / "preset.yaml", tmp_path / "mine.yaml"
    cfg = small_config()
    cfg["weights"]["sigma"] = "five"
    write_yaml(preset, cfg)
    write_yaml(mine, {"train": {"step": 5, "tile": 92}})
    with pytest.raises(ConfigErrors) as info:
        precheck([preset, mine], check_inputs=False)
    assert problems(info.value) == [f"{mine}: unknown key 'train.step' (did you mean 'train.steps'?)",
                                    f"{preset}: key 'weights.sigma': 'five' is not of type 'number'"]
    with pytest.raises(ConfigErrors) as info:  # --config (Snakemake's) last: its sigma counts
        precheck([mine, preset], {"weights": {"sigma": 2}, "seed": -1}, check_inputs=False)
    assert problems(info.value) == ["--config: key 'seed': -1 is less than the minimum of 0",
                                    f"{mine}: unknown key 'train.step' (did you mean 'train.steps'?)"]
    # A key that no file gives (a default): the composed files are named.
    write_yaml(preset, {"datasets": {"a": {"synthetic": {}}}, "train": {"datasets": {"a": {"train": [0, 3]}}}})
    write_yaml(mine, {"seed": 1})
    with pytest.raises(ConfigError) as info:
        precheck([preset, mine], check_inputs=False)
    assert problems(info.value)[0].startswith(f"{preset}+{mine}: key 'postprocess.method': auto chooses")


# ---------------------------------------------------------------- unknown keys, several problems


def test_unknown_key_suggests_the_close_match():
    cfg = small_config()
    cfg["train"]["step"] = 5
    cfg["weights"]["zzz"] = 1
    with pytest.raises(ConfigErrors) as info:
        validate_config(cfg, "c.yaml")
    lines = problems(info.value)
    assert lines[0] == "c.yaml: unknown key 'train.step' (did you mean 'train.steps'?)"
    assert lines[1].startswith("c.yaml: unknown key 'weights.zzz' (allowed: class_balance, foreground_value, label_mode,")
    assert len(lines) == 2


def test_all_schema_problems_of_a_file_at_once():
    cfg = small_config()
    cfg["sedd"] = 1
    cfg["weights"]["sigma"] = "five"
    cfg["predict"]["tta"] = "maybe"
    with pytest.raises(ConfigErrors) as info:
        validate_config(cfg, "c.yaml")
    lines = problems(info.value)
    assert lines[0] == "c.yaml: unknown key 'sedd' (did you mean 'seed'?)"
    assert "c.yaml: key 'weights.sigma': 'five' is not of type 'number'" in lines
    assert any(line.startswith("c.yaml: key 'predict.tta'") for line in lines)
    assert len(lines) == 3


def test_all_problems_between_keys_at_once():
    cfg = small_config()
    cfg["train"]["datasets"] = {"demo": {"train": [0, 3], "val": [2, 6]}, "nope": {"train": [0, 1]}}
    cfg["predict"]["datasets"] = ["gone"]
    cfg["export"] = {"sample": "gone"}
    with pytest.raises(ConfigErrors) as info:
        validate_config(cfg, "c.yaml")
    assert problems(info.value) == [
        "c.yaml: key 'train.datasets.demo': train [0, 3] and val [2, 6] overlap (validation slices must be held out)",
        "c.yaml: key 'train.datasets.nope': no such dataset in 'datasets'",
        "c.yaml: key 'predict.datasets': no such dataset 'gone'",
        "c.yaml: key 'export.sample': no such dataset 'gone'",
        "c.yaml: key 'train.datasets.demo.val': range [2, 6] goes beyond the 4 slices of the synthetic stack "
        "(datasets.demo.synthetic.shape)",
    ]


def test_synthetic_ranges_beyond_the_stack():
    cfg = small_config()
    cfg["calibrate"] = {"datasets": {"demo": [3, 5]}}
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, "c.yaml")
    assert problems(info.value) == ["c.yaml: key 'calibrate.datasets.demo': range [3, 5] goes beyond the 4 slices "
                                    "of the synthetic stack (datasets.demo.synthetic.shape)"]
    cfg["calibrate"] = {"datasets": {"demo": [3, 4]}}
    validate_config(cfg, "c.yaml")  # the last slice is inside


# ---------------------------------------------------------------- inputs: existence, headers, init_from


def file_config(tmp_path: Path) -> dict:
    """A raw TIFF of 6 slices with labels, training on it."""
    write_stack(tmp_path / "raw.tif", (6, 16, 16), "uint8")
    write_stack(tmp_path / "labels.tif", (6, 16, 16), "uint8")
    cfg = small_config()
    cfg["datasets"] = {"mine": {"raw": "raw.tif", "labels": "labels.tif"}}
    cfg["train"]["datasets"] = {"mine": {"train": [0, 4], "val": [4, 6]}}
    cfg["predict"]["datasets"] = ["mine"]
    return cfg


def test_label_dtype_that_cannot_hold_the_class_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = file_config(tmp_path)
    write_stack(tmp_path / "labels.tif", (6, 16, 16), "int8")  # 255 (foreground_value) is no int8
    cfg["weights"]["unlabelled_value"] = 200
    with pytest.raises(ConfigErrors) as info:
        precheck([write_yaml(tmp_path / "c.yaml", cfg)])
    assert problems(info.value) == [
        "labels.tif: labels of dtype int8 (values -128..127) cannot hold weights.unlabelled_value 200 "
        "(key 'weights.unlabelled_value')",
        "labels.tif: labels of dtype int8 (values -128..127) cannot hold weights.foreground_value 255 "
        "(key 'weights.foreground_value')",
    ]


def test_init_from_missing_or_of_another_architecture(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = file_config(tmp_path)
    cfg["train"]["init_from"] = "pre/model.pt"
    with pytest.raises(ConfigError) as info:
        precheck([write_yaml(tmp_path / "c.yaml", cfg)])
    assert problems(info.value) == [f"{tmp_path / 'c.yaml'}: key 'train.init_from': 'pre/model.pt' is not a file "
                                    "(a unet-pipe checkpoint)"]
    write_checkpoint(tmp_path / "pre" / "model.pt", depth=3, base_channels=4, dropout=0.1)
    with pytest.raises(ConfigError) as info:
        precheck([tmp_path / "c.yaml"])
    assert problems(info.value) == ["pre/model.pt: key 'train.init_from': architecture differs from the config's "
                                    "model section: depth 3 (config: 2)"]
    write_checkpoint(tmp_path / "pre" / "model.pt", depth=2, base_channels=4, dropout=0.1)  # dropout may differ
    config, _ = precheck([tmp_path / "c.yaml"])
    assert config["train"]["init_from"] == "pre/model.pt"
    (tmp_path / "pre" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UnetPipeError, match=r"^pre/model\.pt: not a unet-pipe checkpoint"):
        precheck([tmp_path / "c.yaml"])


def write_yaml(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------- check-config == snakemake -n


def bad_yaml(tmp_path: Path) -> dict | str:
    return "seed: 0\nresults: results\nseed: 1\n"


def bad_keys(tmp_path: Path) -> dict:
    cfg = small_config()
    cfg["train"]["step"] = 5
    cfg["weights"]["sigma"] = "five"
    return cfg


def bad_ranges(tmp_path: Path) -> dict:
    cfg = small_config()
    cfg["train"]["datasets"]["demo"]["val"] = [3, 9]
    cfg["calibrate"] = {"datasets": {"demo": [2, 5]}}
    return cfg


def missing_inputs(tmp_path: Path) -> dict:
    cfg = file_config(tmp_path)
    cfg["datasets"]["mine"]["labels"] = "nowhere/labels.tif"
    cfg["train"]["init_from"] = "pre/model.pt"
    return cfg


def bad_headers(tmp_path: Path) -> dict:
    cfg = file_config(tmp_path)
    write_stack(tmp_path / "labels.tif", (6, 16, 12), "int8")
    write_checkpoint(tmp_path / "pre.pt", depth=3, base_channels=4)
    cfg["train"]["init_from"] = "pre.pt"
    cfg["train"]["datasets"]["mine"]["val"] = [4, 8]
    return cfg


@pytest.mark.parametrize("case, count", [(bad_yaml, 1), (bad_keys, 2), (bad_ranges, 2), (missing_inputs, 2),
                                         (bad_headers, 4)])
def test_check_config_and_the_workflow_find_the_same(tmp_path, monkeypatch, capsys, case, count):
    """The same error lines from ``unet-pipe check-config`` and from ``snakemake -n`` (before any job)."""
    monkeypatch.chdir(tmp_path)
    cfg = case(tmp_path)
    path = tmp_path / "config" / "config.yaml"
    path.parent.mkdir()
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    assert main(["check-config", "config/config.yaml"]) == 2
    cli = capsys.readouterr().err.splitlines()
    assert len(cli) == count and all(line.startswith("unet-pipe: error: ") for line in cli), cli
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "-n", "--configfile", "config/config.yaml"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    workflow = [line for line in proc.stderr.splitlines() if line.startswith("unet-pipe: error: ")]
    assert workflow == cli, proc.stderr[-3000:]
    assert "MissingInputException" not in proc.stderr and not (tmp_path / "results").exists()
    assert all("config/config.yaml: " in line or line.startswith(("unet-pipe: error: labels.tif: ",
                                                                  "unet-pipe: error: pre.pt: ")) for line in cli)


def test_error_lines_one_per_problem():
    many = ConfigErrors([ConfigError("a.yaml", "key 'x': bad"), ConfigError("b.yaml", "key 'y': bad")])
    assert str(many) == "a.yaml: key 'x': bad"
    assert error_lines(many) == ["unet-pipe: error: a.yaml: key 'x': bad", "unet-pipe: error: b.yaml: key 'y': bad"]
    assert error_lines(ConfigError("c.yaml", "p")) == ["unet-pipe: error: c.yaml: p"]
    copied = copy.deepcopy(many)  # pickles (dask workers) with every problem
    assert [str(e) for e in copied.errors] == [str(e) for e in many.errors]


def test_the_workflow_names_overlays_and_its_config_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = small_config()
    cfg["weights"]["sigma"] = "five"
    write_yaml(tmp_path / "preset.yaml", cfg)
    write_yaml(tmp_path / "mine.yaml", {"train": {"step": 5}})
    assert main(["check-config", "preset.yaml", "mine.yaml"]) == 2
    cli = capsys.readouterr().err.splitlines()
    assert cli == ["unet-pipe: error: mine.yaml: unknown key 'train.step' (did you mean 'train.steps'?)",
                   "unet-pipe: error: preset.yaml: key 'weights.sigma': 'five' is not of type 'number'"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "-n", "--configfile", "preset.yaml", "mine.yaml", "--config", "seed=-1"],
                          capture_output=True, text=True, env=env, timeout=600)
    workflow = [line for line in proc.stderr.splitlines() if line.startswith("unet-pipe: error: ")]
    assert workflow == ["unet-pipe: error: --config: key 'seed': -1 is less than the minimum of 0", *cli]
