"""Config validation: defaults, one clear message naming the key."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from unet_pipe.config import load_config, validate_config
from unet_pipe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_demo_config_is_valid_and_defaults_filled(demo_config):
    cfg = validate_config(demo_config)
    assert cfg["weights"]["w0"] == 10.0 and cfg["weights"]["sigma"] == 5.0
    assert cfg["train"]["momentum"] == 0.99
    minimal = validate_config({"datasets": {"a": {"synthetic": {}}}})
    assert minimal["datasets"]["a"]["synthetic"] == {"shape": [12, 256, 256], "seed": 0}
    assert minimal["ingest"]["compression"] == {"cname": "zstd", "clevel": 1, "blocksize": 262144}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["weights"].update(w00=1), r"unknown key 'weights.w00'"),
        (lambda c: c.update(sedd=1), r"unknown key 'sedd'"),
        (lambda c: c["weights"].update(sigma="five"), r"key 'weights.sigma': 'five' is not of type 'number'"),
        (lambda c: c["ingest"].update(chunks=[1, 2]), r"key 'ingest.chunks'"),
        (lambda c: c["datasets"]["demo"].update(raw="x.tif"), r"key 'datasets.demo': give either 'synthetic' or 'raw'"),
        (lambda c: c["train"]["datasets"].update(nope={"train": [0, 1]}), r"'train.datasets.nope': no such dataset"),
        (lambda c: c.update(calibrate={"datasets": {"nope": [0, 1]}}), r"'calibrate.datasets.nope': no labelled"),
        (lambda c: c.update(calibrate={"datasets": {"demo": [3, 3]}}), r"'calibrate.datasets.demo': empty range"),
        (lambda c: c["postprocess"].update(method="magic"), r"key 'postprocess.method'"),
    ],
)
def test_bad_config_names_the_key(demo_config, mutate, message):
    cfg = copy.deepcopy(demo_config)
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, "config.yaml")


def test_missing_input_and_bad_yaml(tmp_path, demo_config):
    cfg = {"datasets": {"mine": {"raw": "does/not/exist.tif"}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"key 'datasets.mine.raw': input 'does/not/exist.tif' does not exist"):
        load_config(path)
    path.write_text("datasets: [unclosed")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML at line 1"):
        load_config(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("datasets: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_input_stacks_are_checked_before_any_job(tmp_path):
    import numpy as np
    import tifffile

    from unet_pipe.config import check_input_stacks
    from unet_pipe.errors import InputError

    tifffile.imwrite(tmp_path / "raw.tif", np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((3, 8, 9), np.uint8), photometric="minisblack")
    cfg = validate_config({"datasets": {"d": {"raw": "raw.tif", "labels": "lab.tif"}}})
    with pytest.raises(InputError, match=r"lab\.tif: shape \(3, 8, 9\) differs from \(3, 8, 8\)"):
        check_input_stacks(cfg, base=tmp_path)
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    check_input_stacks(cfg, base=tmp_path)


@pytest.mark.parametrize("preset", ["config.yaml", "isbi2012.yaml", "isbi2012-cpu.yaml"])
def test_presets_are_valid(preset, isbi_dir, monkeypatch):
    monkeypatch.chdir(REPO)  # preset paths are relative to the repository root
    cfg = load_config(REPO / "config" / preset, check_inputs=True)
    assert cfg["weights"]["w0"] == 10.0


def test_config_abuse_is_refused_fast_and_short(tmp_path, demo_config):
    import time

    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand") as info:
        load_config(tmp_path / "bomb.yaml")
    assert time.perf_counter() - start < 5 and len(str(info.value)) < 1100
    (tmp_path / "rec.yaml").write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="aliases expand"):
        load_config(tmp_path / "rec.yaml")
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = copy.deepcopy(demo_config)
        bad["train"]["lr"] = value
        with pytest.raises(ConfigError, match=r"key 'train.lr': .* not a finite number"):
            validate_config(bad)
    (tmp_path / "inf.yaml").write_text(yaml.safe_dump(demo_config).replace("lr: 0.001", "lr: .inf"))
    with pytest.raises(ConfigError, match="not a finite number"):
        load_config(tmp_path / "inf.yaml", check_inputs=False)
    huge = copy.deepcopy(demo_config)
    huge["train"]["steps"] = 10**30
    with pytest.raises(ConfigError, match=r"key 'train.steps': .* too large"):
        validate_config(huge)
    overlap = copy.deepcopy(demo_config)
    overlap["train"]["datasets"]["demo"] = {"train": [0, 10], "val": [9, 12]}
    with pytest.raises(ConfigError, match="overlap"):
        validate_config(overlap)
    braces = copy.deepcopy(demo_config)
    braces["datasets"]["x"] = {"raw": "data/{sample}.tif"}
    with pytest.raises(ConfigError, match="braces"):
        validate_config(braces)
    # A long value (here a long key path) never yields a huge message.
    long_key = copy.deepcopy(demo_config)
    long_key["x" * 100000] = 1
    with pytest.raises(ConfigError) as info:
        validate_config(long_key)
    assert len(str(info.value)) < 1100


def test_slice_ranges_beyond_the_stack_are_refused(tmp_path):
    import numpy as np
    import tifffile

    from unet_pipe.config import check_input_stacks

    tifffile.imwrite(tmp_path / "raw.tif", np.zeros((4, 8, 8), np.uint8), photometric="minisblack")
    cfg = validate_config({"datasets": {"d": {"raw": "raw.tif", "labels": "raw.tif"}},
                           "train": {"datasets": {"d": {"train": [0, 3], "val": [3, 6]}}}})
    with pytest.raises(ConfigError, match=r"train.datasets.d.val': range \[3, 6\] goes beyond the 4 slices"):
        check_input_stacks(cfg, base=tmp_path)
    cfg = validate_config({"datasets": {"d": {"raw": "raw.tif", "labels": "raw.tif"}},
                           "train": {"datasets": {"d": {"train": [0, 3], "val": [3, 4]}}},
                           "calibrate": {"datasets": {"d": [2, 5]}}})
    with pytest.raises(ConfigError, match=r"calibrate.datasets.d': range \[2, 5\] goes beyond the 4 slices"):
        check_input_stacks(cfg, base=tmp_path)


def test_auto_decisions_need_calibration_slices_in_the_workflow(demo_config, tmp_path, run_cli):
    from unet_pipe.config import check_workflow

    demo_config["train"]["datasets"]["demo"].pop("val")
    cfg = validate_config(demo_config)  # a stage on its own (e.g. train) needs no calibration
    with pytest.raises(ConfigError, match=r"'postprocess.method': auto chooses the decisions"):
        check_workflow(cfg)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(demo_config))
    code, _, err = run_cli("check-config", tmp_path / "c.yaml")
    assert code == 2 and "auto chooses the decisions" in err
    demo_config["postprocess"]["method"] = "threshold"
    check_workflow(validate_config(demo_config))


def test_calibration_slices_default_to_the_val_ranges(demo_config):
    from unet_pipe.config import calibration_slices

    cfg = validate_config(demo_config)
    assert cfg["postprocess"]["method"] == "auto"
    assert calibration_slices(cfg) == {"demo": [9, 12]}
    cfg["calibrate"]["datasets"] = {"demo": [6, 9]}
    assert calibration_slices(cfg) == {"demo": [6, 9]}



# ------------------------------------------------------------------ overlays


def test_compose_replaces_dataset_maps_and_merges_sections():
    from unet_pipe.config import compose_configs

    preset = {
        "results": "results/preset",
        "datasets": {"isbi": {"raw": "isbi.tif", "labels": "isbi-labels.tif"}, "isbi_test": {"raw": "t.tif"}},
        "model": {"depth": 4, "base_channels": 16},
        "train": {"datasets": {"isbi": {"train": [0, 25]}}, "steps": 5000, "augment": {"rotate": True, "shift": 0.0}},
        "predict": {"datasets": ["isbi", "isbi_test"], "tta": True},
        "calibrate": {"datasets": {"isbi": [20, 25]}, "methods": ["threshold"]},
        "ingest": {"chunks": [1, 512, 512]},
    }
    mine = {
        "results": "results/mine",
        "datasets": {"mine": {"raw": "m.tif", "labels": "ml.tif"}},
        "train": {"datasets": {"mine": {"train": [0, 8]}}, "augment": {"shift": 2.0}},
        "ingest": {"chunks": [1, 256, 256]},
    }
    before = copy.deepcopy(preset)
    assert compose_configs([preset, mine]) == {
        "results": "results/mine",
        "datasets": {"mine": {"raw": "m.tif", "labels": "ml.tif"}},
        "model": {"depth": 4, "base_channels": 16},
        "train": {"datasets": {"mine": {"train": [0, 8]}}, "steps": 5000, "augment": {"rotate": True, "shift": 2.0}},
        # predict/calibrate.datasets named the preset's datasets: dropped with them (defaults apply).
        "predict": {"tta": True},
        "calibrate": {"methods": ["threshold"]},
        "ingest": {"chunks": [1, 256, 256]},
    }
    assert preset == before  # layers are not changed
    # Without `datasets`, a later train.datasets replaces the earlier one alone (a subset of the
    # preset's datasets); the preset's datasets and predict.datasets stay.
    assert compose_configs([preset, {"train": {"datasets": {"isbi": {"train": [0, 5]}}}, "predict": {"tta": False}}]) == {
        **before,
        "train": {"datasets": {"isbi": {"train": [0, 5]}}, "steps": 5000, "augment": {"rotate": True, "shift": 0.0}},
        "predict": {"datasets": ["isbi", "isbi_test"], "tta": False},
    }
    # A later dataset entry replaces the earlier one whole (its keys are not merged), and
    # a null or a list replaces a mapping or a list.
    assert compose_configs(
        [{"datasets": {"a": {"synthetic": {"seed": 1}}}, "predict": {"tile": 64}},
         {"datasets": {"a": {"raw": "a.tif"}}, "predict": {"tile": None}}]
    ) == {"datasets": {"a": {"raw": "a.tif"}}, "predict": {"tile": None}}


def test_two_files_compose_into_a_valid_config(tmp_path, monkeypatch):
    from unet_pipe.config import load_configs

    monkeypatch.chdir(REPO)
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "results: results/mine\n"
        "datasets: {mine: {synthetic: {shape: [4, 96, 96]}}}\n"
        "train: {datasets: {mine: {train: [0, 3], val: [3, 4]}}, steps: 7}\n"
    )
    # Inputs are not checked: the preset's ISBI paths must not matter once replaced.
    cfg = load_configs([REPO / "config" / "isbi2012-cpu.yaml", mine], check_inputs=True)
    assert sorted(cfg["datasets"]) == ["mine"]
    assert cfg["train"]["datasets"] == {"mine": {"train": [0, 3], "val": [3, 4]}}
    assert cfg["predict"]["datasets"] == []  # default: every dataset (the preset's named isbi)
    assert (cfg["train"]["steps"], cfg["train"]["tile"], cfg["model"]["depth"]) == (7, 252, 4)
    assert (cfg["model"]["base_channels"], cfg["train"]["optimizer"]) == (16, "adam")  # the preset's method
    assert cfg["calibrate"]["datasets"] == {}  # named the preset's isbi: dropped, so the val ranges
    assert cfg["postprocess"]["method"] == "auto" and cfg["results"] == "results/mine"
    mine.write_text("train: {steps: 0}\n")
    with pytest.raises(ConfigError, match=r"isbi2012-cpu\.yaml\+.*mine\.yaml: key 'train.steps'"):
        load_configs([REPO / "config" / "isbi2012-cpu.yaml", mine], check_inputs=False)
    mine.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: the configuration must be a YAML mapping"):
        load_configs([REPO / "config" / "isbi2012-cpu.yaml", mine], check_inputs=False)


@pytest.mark.parametrize(
    "start, stop, expected",
    [
        (0, 30, ([0, 20], [20, 25], [25, 30])),  # ISBI 2012: the preset's own split
        (0, 3, ([0, 1], [1, 2], [2, 3])),  # the smallest stack it splits
        (0, 4, ([0, 2], [2, 3], [3, 4])),
        (0, 15, ([0, 9], [9, 12], [12, 15])),  # 15 / 6 = 2.5 rounds up
        (40, 60, ([40, 54], [54, 57], [57, 60])),  # a crop: its own slices only
    ],
)
def test_automatic_split_of_labelled_slices(start, stop, expected):
    from unet_pipe.config import split_labelled_slices

    split = split_labelled_slices(start, stop)
    assert (split["train"], split["calibrate"], split["val"]) == expected


def test_automatic_split_refuses_fewer_than_three_slices():
    from unet_pipe.config import split_labelled_slices

    with pytest.raises(ValueError, match="2 labelled slice"):
        split_labelled_slices(5, 7)


def _stacks(tmp_path, depths: dict[str, int]) -> None:
    import numpy as np
    import tifffile

    for name, depth in depths.items():
        tifffile.imwrite(tmp_path / name, np.zeros((depth, 8, 8), np.uint8), photometric="minisblack")


def test_datasets_without_train_ranges_get_the_automatic_split(tmp_path):
    """A preset with only its datasets replaced trains, calibrates and validates on slices of its own."""
    from unet_pipe.config import check_workflow, fill_default_splits

    _stacks(tmp_path, {"raw.tif": 30, "lab.tif": 30, "crop.tif": 12, "big.tif": 40, "test.tif": 5})
    cfg = validate_config({"datasets": {
        "a": {"raw": "raw.tif", "labels": "lab.tif"},
        "b": {"raw": "big.tif", "labels": "crop.tif", "labels_offset": [10, 0, 0]},  # labelled slices 10-21
        "s": {"synthetic": {"shape": [6, 64, 64]}},
        "unlabelled": {"raw": "test.tif"},
    }})  # fmt: skip
    said = fill_default_splits(cfg, base=tmp_path)
    assert cfg["train"]["datasets"] == {
        "a": {"train": [0, 20], "val": [25, 30]},
        "b": {"train": [10, 18], "val": [20, 22]},
        "s": {"train": [0, 4], "val": [5, 6]},
    }
    assert cfg["calibrate"]["datasets"] == {"a": [20, 25], "b": [18, 20], "s": [4, 5]}
    assert len(said) == 3 and "dataset 'b' split automatically: train [10, 18], calibrate [18, 20], val [20, 22]" in said[1]
    check_workflow(cfg)
    validate_config(cfg)  # what it filled is a valid config


def test_given_ranges_are_kept_and_a_given_calibration_too(tmp_path):
    from unet_pipe.config import fill_default_splits

    _stacks(tmp_path, {"raw.tif": 30, "lab.tif": 30})
    given = {"datasets": {"a": {"raw": "raw.tif", "labels": "lab.tif"}}, "train": {"datasets": {"a": {"train": [0, 3]}}}}
    cfg = validate_config(copy.deepcopy(given))
    assert fill_default_splits(cfg, base=tmp_path) == [] and cfg["train"]["datasets"] == {"a": {"train": [0, 3]}}
    cfg = validate_config({"datasets": given["datasets"], "calibrate": {"datasets": {"a": [0, 2]}}})
    fill_default_splits(cfg, base=tmp_path)
    assert cfg["train"]["datasets"]["a"] == {"train": [0, 20], "val": [25, 30]}
    assert cfg["calibrate"]["datasets"] == {"a": [0, 2]}  # the user's choice stands


def test_no_split_is_made_up_where_none_fits(tmp_path):
    from unet_pipe.config import check_workflow, fill_default_splits

    _stacks(tmp_path, {"raw.tif": 2, "lab.tif": 2})
    cfg = validate_config({"datasets": {"a": {"raw": "raw.tif", "labels": "lab.tif"}}})
    with pytest.raises(ConfigError, match=r"dataset 'a' has 2 labelled slice\(s\); the automatic split needs at "
                       r"least 3; give train.datasets.a with train and val ranges"):
        fill_default_splits(cfg, base=tmp_path)
    cfg = validate_config({"datasets": {"t": {"raw": "raw.tif"}}})
    assert fill_default_splits(cfg, base=tmp_path) == []
    with pytest.raises(ConfigError, match="key 'train.datasets': empty, and no dataset has 'labels' to train on"):
        check_workflow(cfg)
