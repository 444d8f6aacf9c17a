"""Configuration: safe YAML loading, JSON-Schema validation, defaults.

The schema lives in ``workflow/schemas/config.schema.yaml`` (the package holds a
link to it) and is the single source of truth: the Snakefile validates with
``snakemake.utils.validate`` against the same file, the CLI with
:func:`load_config`.
"""
from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jsonschema
import yaml

from unet_pipe.errors import ConfigError, ConfigErrors, InputError, UnetPipeError
from unet_pipe.truth import unlabelled_problem
from unet_pipe.zarr_input import crop_offset, open_input_stack, source_frame

log = logging.getLogger(__name__)
SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


@lru_cache(maxsize=1)
def load_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _fill_defaults(instance: Any, schema: dict) -> None:
    """Insert schema defaults into ``instance`` in place (objects only, recursively)."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra)


def _describe(error: jsonschema.ValidationError) -> list[str]:
    """The problems of one schema error, one line each (an unknown key with its closest allowed one)."""
    key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed), key=str) if isinstance(error.instance, dict) else []
        where = f"{key}." if key != "<top level>" else ""
        lines = []
        for name in extra or ["?"]:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = (f" (did you mean '{where}{close[0]}'?)" if close
                    else f" (allowed: {', '.join(allowed)})" if allowed else "")
            lines.append(f"unknown key '{where}{name}'{hint}")
        return lines
    if error.validator == "oneOf" and key.startswith("datasets."):
        return [f"key '{key}': give either 'synthetic' or 'raw' (with optional 'labels'), not both"]
    return [f"key '{key}': {error.message}"]


def raise_all(problems: Iterable[UnetPipeError]) -> None:
    """Raise every problem at once (:class:`ConfigErrors`; a single one as itself); nothing if none."""
    errors = list(problems)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


def validate_config(config: dict, source: str | Path | None = None) -> dict:
    """Validate ``config`` against the schema and return a copy with defaults filled.

    Raises :class:`ConfigError` (:class:`ConfigErrors` for several) naming every offending key:
    schema problems first; the checks between keys only once the schema holds.
    """
    if not isinstance(config, dict):
        raise ConfigError(source, "the configuration must be a YAML mapping")
    _check_finite(config, source, "")
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    raise_all(ConfigError(source, line) for error in errors for line in _describe(error))
    filled = copy.deepcopy(config)
    _fill_defaults(filled, schema)
    raise_all(_semantic_problems(filled, source))
    return filled


MAX_CONFIG_INT = 2**53


def _check_finite(value: Any, source: str | Path | None, key: str) -> None:
    """Refuse NaN and infinities (YAML ``.nan``/``.inf``, numbers that overflow a float)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(source, f"key '{key or '.'}': {value} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
        # Such numbers overflow numpy/torch integers later, in the middle of a job.
        raise ConfigError(source, f"key '{key or '.'}': {str(value)[:30]} is too large (limit 2**53)")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, source, f"{key}[{i}]")


def applies_model(config: dict) -> bool:
    """Whether the run segments with a trained model (``segment.model``) instead of training one."""
    return (config.get("segment") or {}).get("model") is not None


def is_labelled(dataset: dict) -> bool:
    """Whether a ``datasets`` entry has labels: a label image, or a synthetic stack's own truth."""
    return "labels" in dataset or "synthetic" in dataset


def _semantic_problems(config: dict, source: str | Path | None) -> Iterator[ConfigError]:
    """Problems between keys of a schema-valid config (every one, in order), no file read."""
    datasets = config["datasets"]
    for name, ds in datasets.items():
        for key in ("raw", "labels"):
            if isinstance(ds.get(key), str) and ("{" in ds[key] or "}" in ds[key]):
                yield ConfigError(source, f"key 'datasets.{name}.{key}': braces in paths are not supported "
                                  "(Snakemake reads them as wildcards); rename the file or folder")
    for key, value in (("results", config.get("results")), ("segment.model", config["segment"]["model"])):
        if value is not None and ("{" in str(value) or "}" in str(value)):
            yield ConfigError(source, f"key '{key}': braces in paths are not supported (Snakemake wildcards)")
    if applies_model(config):
        for key in ("train", "calibrate"):
            if config[key]["datasets"]:
                yield ConfigError(source, f"key '{key}.datasets': segment.model applies a trained model, nothing "
                                  "is trained or calibrated; remove it (or set segment.model: null to train)")
    for name, ds in datasets.items():
        if ds.get("labels_offset") is not None and "labels" not in ds:
            yield ConfigError(source, f"key 'datasets.{name}.labels_offset': the dataset has no 'labels'")
    for name, ranges in config["train"]["datasets"].items():
        if name not in datasets:
            yield ConfigError(source, f"key 'train.datasets.{name}': no such dataset in 'datasets'")
            continue
        offset = datasets[name].get("labels_offset")
        for part in ("train", "val"):
            if offset is not None and part in ranges and ranges[part][0] < offset[0]:
                yield ConfigError(source, f"key 'train.datasets.{name}.{part}': range {ranges[part]} starts before "
                                  f"the labelled crop (labels_offset z = {offset[0]})")
        if not is_labelled(datasets[name]):
            yield ConfigError(source, f"key 'train.datasets.{name}': dataset has no 'labels' to train on")
        for part in ("train", "val"):
            if part in ranges and ranges[part][0] >= ranges[part][1]:
                yield ConfigError(source, f"key 'train.datasets.{name}.{part}': empty range {ranges[part]}")
        if "train" in ranges and "val" in ranges:
            (a0, a1), (b0, b1) = ranges["train"], ranges["val"]
            if a0 < b1 and b0 < a1:
                yield ConfigError(
                    source, f"key 'train.datasets.{name}': train {ranges['train']} and val {ranges['val']} overlap "
                    "(validation slices must be held out)"
                )
    weights = config["weights"]
    problem = unlabelled_problem(weights["label_mode"], weights["foreground_value"], weights.get("unlabelled_value"))
    if problem:
        yield ConfigError(source, f"key 'weights.unlabelled_value': {problem}")
    init = config["train"].get("init_from")
    if init is not None and os.path.normpath(init) == os.path.normpath(f"{config['results']}/model/checkpoint.pt"):
        # The workflow's own output: as an input of train it would be a cycle.
        yield ConfigError(source, "key 'train.init_from': is this run's own model/checkpoint.pt; copy it elsewhere "
                          "or use another 'results' folder")
    for name in config["predict"]["datasets"]:
        if name not in datasets:
            yield ConfigError(source, f"key 'predict.datasets': no such dataset '{name}'")
    for name, (start, stop) in config["calibrate"]["datasets"].items():
        if name not in datasets or not is_labelled(datasets[name]):
            yield ConfigError(source, f"key 'calibrate.datasets.{name}': no labelled dataset of that name")
        elif start >= stop:
            yield ConfigError(source, f"key 'calibrate.datasets.{name}': empty range {[start, stop]}")
    sample = config["export"]["sample"]
    if sample is not None and sample not in datasets:
        yield ConfigError(source, f"key 'export.sample': no such dataset '{sample}'")
    for name, ds in datasets.items():
        if "synthetic" in ds:
            # The demo stack's depth is its configured shape: known before it is generated.
            depth = int(ds["synthetic"]["shape"][0])
            yield from _range_problems(config, name, depth, f"the synthetic stack (datasets.{name}.synthetic.shape)",
                                       source)


def check_workflow(config: dict, source: str | Path | None = None) -> None:
    """What the whole workflow needs beyond a valid config (``check-config`` and the workflow's
    pre-check; a stage run on its own, e.g. ``unet-pipe train``, does not need it)."""
    raise_all(_workflow_problems(config, source))


def _workflow_problems(config: dict, source: str | Path | None) -> Iterator[ConfigError]:
    if applies_model(config):
        return  # nothing to train or calibrate: any datasets, labelled or not
    if not config["train"]["datasets"] and not any(is_labelled(d) for d in config["datasets"].values()):
        yield ConfigError(source, "key 'train.datasets': empty, and no dataset has 'labels' to train on")
    if config["postprocess"]["method"] == "auto" and config["train"]["datasets"] and not calibration_slices(config):
        yield ConfigError(
            source, "key 'postprocess.method': auto chooses the decisions on labelled slices, but no training "
            "dataset has a 'val' range and 'calibrate.datasets' is empty; add one, or set the method to "
            "threshold or watershed with its parameters"
        )
    if config["postprocess"]["instances"] == "3d" and config["postprocess"]["min_size"] and (
        config["postprocess"]["method"] == "watershed"
    ):
        yield ConfigError(source, "key 'postprocess.min_size': not supported with instances 3d and the watershed; "
                          "set it to 0 or use method threshold")


def calibration_slices(config: dict) -> dict[str, list[int]]:
    """The slices calibration chooses on: ``calibrate.datasets``, else every training
    dataset's ``val`` range (``{name: [start, stop]}``)."""
    given = config.get("calibrate", {}).get("datasets") or {}
    if given:
        return {name: list(r) for name, r in given.items()}
    return {name: list(r["val"]) for name, r in config["train"]["datasets"].items() if "val" in r}


# The automatic split of a labelled dataset's slices when ``train.datasets`` is empty: the last
# sixth (at least one slice) is held out for validation, the sixth before it chooses the decisions
# (calibration), the rest trains.  ISBI 2012's 30 labelled slices give the ISBI preset's own split
# 0-20 / 20-25 / 25-30.  By slice position only: no pixel is read to make it.
SPLIT_SIXTH = 6


def split_labelled_slices(start: int, stop: int) -> dict[str, list[int]]:
    """The automatic split of the labelled slices ``[start, stop)``: ``{train, calibrate, val}``
    half-open ranges (see :data:`SPLIT_SIXTH`); ``ValueError`` below 3 slices."""
    n = stop - start
    k = max(1, (n + SPLIT_SIXTH // 2) // SPLIT_SIXTH)  # n / 6, rounded half up
    if n - 2 * k < 1:
        raise ValueError(f"{n} labelled slice(s); the automatic split needs at least 3")
    return {"train": [start, stop - 2 * k], "calibrate": [stop - 2 * k, stop - k], "val": [stop - k, stop]}


def fill_default_splits(config: dict, base: str | Path = ".", source: str | Path | None = None) -> list[str]:
    """Give every labelled dataset the automatic split when ``train.datasets`` is empty.

    A preset used with other data (``--configfile preset.yaml mine.yaml`` where mine.yaml gives
    only ``datasets``) loses the preset's dataset-keyed ranges; rather than train on nothing, each
    labelled dataset's labelled z extent (its label image's depth, placed at its crop offset;
    headers only) is split by :func:`split_labelled_slices`.  ``calibrate.datasets`` gets the
    calibration ranges unless it is given.  Changes ``config`` in place; returns one line per
    dataset saying what was chosen (nothing when ``train.datasets`` was given).
    """
    if config["train"]["datasets"] or applies_model(config):
        return []
    splits, said = {}, []
    for name, ds in sorted(config["datasets"].items()):
        if not is_labelled(ds):
            continue
        if "synthetic" in ds:
            start, stop = 0, int(ds["synthetic"]["shape"][0])
        else:
            _, labels, offset = _open_dataset(ds, base)
            start = 0 if offset is None else int(offset[0])
            stop = start + int(labels.shape[0])
        try:
            splits[name] = split_labelled_slices(start, stop)
        except ValueError as exc:
            raise ConfigError(source, f"key 'train.datasets': empty, and dataset '{name}' has {exc}; give "
                              f"train.datasets.{name} with train and val ranges") from None
        s = splits[name]
        said.append(f"train.datasets is empty: dataset '{name}' split automatically: train {s['train']}, "
                    f"calibrate {s['calibrate']}, val {s['val']}")
    config["train"]["datasets"] = {n: {"train": s["train"], "val": s["val"]} for n, s in splits.items()}
    if not config["calibrate"]["datasets"]:
        config["calibrate"]["datasets"] = {n: s["calibrate"] for n, s in splits.items()}
    return said


def check_inputs_exist(config: dict, base: str | Path = ".", source: str | Path | None = None) -> None:
    """Raise :class:`ConfigError` if an input file the config names (``datasets``, ``segment.model``,
    ``train.init_from``) does not exist, naming its key (every such key at once)."""
    raise_all(_missing_inputs(config, base, source))


def _missing_inputs(config: dict, base: str | Path, source: str | Path | None) -> Iterator[ConfigError]:
    # Every file a rule takes from the config is checked here, so that Snakemake's own
    # MissingInputException (which names no key) is never what the user sees.
    model = config["segment"]["model"]
    if model is not None and not (Path(base) / model).is_file():
        yield ConfigError(source, f"key 'segment.model': '{model}' is not a file (a checkpoint or a bioimage.io zip)")
    init = config["train"].get("init_from")
    if init is not None and not applies_model(config) and not (Path(base) / init).is_file():
        yield ConfigError(source, f"key 'train.init_from': '{init}' is not a file (a unet-pipe checkpoint)")
    for name, ds in config["datasets"].items():
        for key in ("raw", "labels"):
            if key in ds and not (Path(base) / ds[key]).exists():
                yield ConfigError(source, f"key 'datasets.{name}.{key}': input '{ds[key]}' does not exist")
            elif key in ds:
                # Results written into an input (a folder of slices) would change that input.
                results = Path(os.path.realpath(Path(base) / config["results"]))
                given = Path(os.path.realpath(Path(base) / ds[key]))
                if results == given or given in results.parents:
                    yield ConfigError(source, f"key 'results': '{config['results']}' is or lies inside the input "
                                      f"'{ds[key]}' (datasets.{name}.{key}); keep results apart from the inputs")


def _crop_problems(config: dict, name: str, label_shape: Sequence[int], raw_shape: Sequence[int],
                   source: str | Path | None = None, offset: Sequence[int] | None = None) -> Iterator[ConfigError]:
    """Dataset ``name``'s labels at ``offset`` (default: its ``labels_offset``) must lie inside
    its raw stack, and its train/val/calibrate ranges inside the crop's z range."""
    configured = config["datasets"][name].get("labels_offset")
    offset = [int(o) for o in (configured if offset is None else offset)]
    if any(o + s > n for o, s, n in zip(offset, label_shape, raw_shape)):
        # An offset the label image's translation gave is its file's fault, not the key's.
        where = f"key 'datasets.{name}.labels_offset'" if configured is not None else "its translation places"
        yield ConfigError(source, f"{where}: labels of shape {tuple(label_shape)} at "
                          f"{offset} do not lie inside the raw stack of shape {tuple(raw_shape)}")
        return
    ranges = {f"train.datasets.{name}.{part}": r for part, r in config["train"]["datasets"].get(name, {}).items()
              if part in ("train", "val")}
    if name in config["calibrate"]["datasets"]:
        ranges[f"calibrate.datasets.{name}"] = config["calibrate"]["datasets"][name]
    low, high = offset[0], offset[0] + label_shape[0]
    for key, (start, stop) in ranges.items():
        if start < low or stop > high:
            yield ConfigError(source, f"key '{key}': range {[start, stop]} is not inside the labelled slices "
                              f"[{low}, {high})")


MAX_CONFIG_BYTES = 2**20
MAX_EXPANDED_NODES = 100_000


def _expanded_size(root: Any) -> int:
    """Node count of a composed YAML document with every alias expanded (memoised, no recursion)."""
    if root is None:
        return 0
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in sizes:
            continue
        if not ready and id(node) in visiting:
            return MAX_EXPANDED_NODES + 1  # a recursive alias: infinite
        visiting.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            sizes[id(node)] = 1
            continue
        if ready:
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a key given twice in one mapping is recorded, not last-wins.

    YAML requires unique keys; PyYAML silently keeps the last value, so a setting
    pasted twice would quietly override the first.  The duplicates are collected in
    ``duplicates`` (key, first line, repeated line) so that all of them are reported.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merges are YAML's documented way to override: not duplicates
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    self.duplicates.append((str(key), seen[key], line))
                else:
                    seen[key] = line
            except TypeError:
                continue  # an unhashable key: SafeLoader itself refuses it below
        return super().construct_mapping(node, deep=deep)


def load_unique_yaml(text: str, path: str | Path | None = None) -> Any:
    """Parse YAML text with :class:`UniqueKeyLoader`; raise :class:`ConfigError` naming every duplicate key."""
    loader = UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    raise_all(ConfigError(path, f"key '{key}' given twice (lines {first} and {again}): YAML keys must be "
                          "unique; keep one") for key, first, again in sorted(loader.duplicates, key=lambda d: d[2]))
    return data


def read_config_file(path: str | Path) -> dict:
    """Read one YAML config file safely (size, alias-expansion and UTF-8 checks); no validation.

    Returns the mapping as written: a layer of :func:`compose_configs`.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(path, f"larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a configuration")
        text = path.read_text(encoding="utf-8")
        # Size of the document with aliases expanded, computed on the composed node graph
        # (shared, not expanded): a "billion laughs" file of a few hundred bytes would
        # otherwise take minutes in the schema check.
        expanded = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if expanded > MAX_EXPANDED_NODES:
            raise ConfigError(path, f"YAML aliases expand to {expanded:.3g} nodes (limit {MAX_EXPANDED_NODES}): refused")
        raw = load_unique_yaml(text, path)
    except FileNotFoundError:
        raise ConfigError(path, "config file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, "a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(path, f"not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(path, "the configuration must be a YAML mapping")
    return raw


# The "dataset maps": keys whose value names datasets. A later layer's value
# replaces an earlier one's whole (never merged name by name), and a layer that
# gives ``datasets`` also drops the earlier layers' ``train.datasets`` and
# ``predict.datasets``: they name the datasets it replaced, so keeping them would
# either leak a preset's dataset into the run or point at one that is gone.
DATASET_MAPS = ("datasets", "train.datasets", "predict.datasets", "calibrate.datasets")


def _merge_layer(base: dict, layer: dict, prefix: str = "") -> dict:
    merged = dict(base)
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if path not in DATASET_MAPS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_layer(merged[key], value, f"{path}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def compose_configs(layers: list[dict]) -> dict:
    """Compose config layers in order, later over earlier (inputs are not changed).

    * dataset maps (:data:`DATASET_MAPS`: ``datasets``, ``train.datasets``,
      ``predict.datasets``, ``calibrate.datasets``) are replaced whole by a later
      layer that gives them; a layer giving ``datasets`` also discards the earlier
      ``train.datasets``, ``predict.datasets`` and ``calibrate.datasets`` (those it
      does not give take their defaults);
    * every other mapping is merged key by key, recursively;
    * lists, scalars and null replace the earlier value.
    """
    composed: dict = {}
    for layer in layers:
        if "datasets" in layer:
            for section in ("train", "predict", "calibrate"):
                if isinstance(composed.get(section), dict) and "datasets" in composed[section]:
                    composed[section] = {k: v for k, v in composed[section].items() if k != "datasets"}
        composed = _merge_layer(composed, layer)
    return composed


def config_source(paths: list[str | Path]) -> str:
    """How errors name a composed config: its files joined by '+' (one file: that file)."""
    return "+".join(str(p) for p in paths)


def load_configs(
    paths: list[str | Path], check_inputs: bool = True, overrides: dict | None = None
) -> dict:
    """Read config files, compose them (:func:`compose_configs`, ``overrides`` last), validate, fill defaults."""
    if not paths:
        raise ConfigError(None, "no config file given")
    layers = _read_layers(paths)
    if overrides:
        layers.append(dict(overrides))
    source = config_source(list(paths))
    config = validate_config(compose_configs(layers), source)
    if check_inputs:
        check_inputs_exist(config, source=source)
        for line in fill_default_splits(config, source=source):
            log.info("%s", line)
    return config


def _read_layers(paths: Sequence[str | Path]) -> list[dict]:
    """:func:`read_config_file` of each file; the problems of every file at once."""
    layers, problems = [], []
    for path in paths:
        try:
            layers.append(read_config_file(path))
        except UnetPipeError as exc:
            problems += getattr(exc, "errors", [exc])
    raise_all(problems)
    return layers


def precheck(
    paths: Sequence[str | Path], overrides: dict | None = None, *, base: str | Path = ".",
    check_inputs: bool = True, read_inputs: bool = True,
) -> tuple[dict, list[str]]:
    """Everything that can be known wrong before any job runs: ``check-config`` and the
    workflow's own pre-check (``workflow/rules/common.smk``) both call this, so both find
    the same problems.

    In order, each stage only once the one before holds: the files (YAML syntax, duplicate
    keys); the composed config (schema, unknown keys with a close match, the checks between
    keys, synthetic stacks' slice ranges); with ``check_inputs`` every input file the config
    names exists; with ``read_inputs`` the inputs' headers (shapes, dtypes, slice ranges,
    label values, ``train.init_from``'s architecture; no pixel read); last the workflow's own
    needs (:func:`check_workflow`).  Raises every problem of the failing stage at once
    (:class:`ConfigErrors`, one line each), each naming the file that gave its key
    (``--config`` for ``overrides``; :func:`_attribute`); returns the validated config with
    defaults and the automatic split filled, and the lines saying what was chosen automatically.
    """
    if not paths:
        raise ConfigError(None, "no config file given")
    layers = _read_layers(paths)
    names = [str(p) for p in paths]
    if overrides:
        layers.append(dict(overrides))
        names.append("--config")
    source = config_source(list(paths))
    try:
        config = validate_config(compose_configs(layers), source)
        said: list[str] = []
        if check_inputs:
            raise_all(_missing_inputs(config, base, source))
            if read_inputs:
                raise_all(_input_problems(config, base, source))
            said = fill_default_splits(config, base, source)
        raise_all(_workflow_problems(config, source))
        return config, said
    except UnetPipeError as exc:
        found = getattr(exc, "errors", [exc])
    raise_all(_attribute(err, layers, names, source) for err in found)


_KEY_IN_PROBLEM = re.compile(r"^(?:unknown )?key '([^']+)'")


def _attribute(error: UnetPipeError, layers: list[dict], names: list[str], source: str) -> UnetPipeError:
    """``error`` naming the layer that gave its key rather than the whole composition ``a.yaml+b.yaml``.

    The layer holding the longest part of the key's path wins, the later one on a tie (it is the
    one that counts); for a key of a dataset map only layers from the last one giving
    ``datasets`` on count (earlier ones were discarded, :func:`compose_configs`).  A problem
    naming another file, or a key no layer gives (a default), is left as it is.
    """
    match = _KEY_IN_PROBLEM.match(error.problem)
    if error.path != source or len(layers) < 2 or match is None:
        return error
    parts = match.group(1).split(".")
    first = 0
    if ".".join(parts[:2]) in DATASET_MAPS[1:]:
        first = max((i for i, layer in enumerate(layers) if "datasets" in layer), default=0)
    best, depth = None, 0
    for i in range(first, len(layers)):
        node, held = layers[i], 0
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                break
            node, held = node[part], held + 1
        if held and held >= depth:
            best, depth = i, held
    return error if best is None else type(error)(names[best], error.problem)


def load_config(path: str | Path, check_inputs: bool = True) -> dict:
    """Read one YAML config safely, validate it and fill in defaults."""
    return load_configs([path], check_inputs=check_inputs)


def schema_markdown() -> str:
    """A Markdown table of every config key (path, type, default, description) from the schema.

    ``config/README.md`` embeds this table; a test keeps the two in sync.
    """
    rows: list[str] = []

    def walk(schema: dict, prefix: str) -> None:
        for key, sub in schema.get("properties", {}).items():
            path = f"{prefix}{key}"
            kind = sub.get("type", "")
            kind = " or ".join(kind) if isinstance(kind, list) else kind
            if "enum" in sub:
                kind = " / ".join(str(v) for v in sub["enum"])
            default = sub.get("default", "")
            default = "" if default == {} and kind == "object" else f"`{json.dumps(default)}`" if "default" in sub else ""
            text = " ".join(str(sub.get("description", "")).split())
            rows.append(f"| `{path}` | {kind} | {default} | {text} |")
            walk(sub, f"{path}.")
            extra = sub.get("additionalProperties")
            if isinstance(extra, dict) and extra.get("properties"):
                walk(extra, f"{path}.<name>.")

    walk(load_schema(), "")
    header = "| key | type | default | meaning |\n|---|---|---|---|\n"
    return header + "\n".join(rows) + "\n"


def _open_dataset(ds: dict, base: str | Path) -> tuple[Any, Any, tuple[int, int, int] | None]:
    """A file dataset's raw and labels (None without labels), opened lazily (headers only), and the raw
    voxel where the labels start (None: they cover the raw), :func:`unet_pipe.zarr_input.crop_offset`."""
    raw = open_input_stack(Path(base) / ds["raw"])
    if "labels" not in ds:
        return raw, None, None
    labels = open_input_stack(Path(base) / ds["labels"])
    return raw, labels, crop_offset(labels, source_frame(raw, ds.get("voxel_size")), raw.shape[0], ds.get("labels_offset"))


def check_input_stacks(config: dict, base: str | Path = ".", source: str | Path | None = None) -> None:
    """Open the headers of every input (TIFF or OME-Zarr); raise :class:`InputError` for an unreadable stack.

    Catches corrupt files, folders of mismatched slices, non-integer labels, label
    stacks that do not fit their raw stack (at ``labels_offset`` or where an
    OME-Zarr label image's translation puts them), label dtypes that cannot hold the
    configured class values, slice ranges beyond a stack and a ``train.init_from`` of
    another architecture, before any job runs (headers only: no pixel data is read).
    Every problem at once (:class:`ConfigErrors` for several).
    """
    raise_all(_input_problems(config, base, source))


def _input_problems(config: dict, base: str | Path = ".", source: str | Path | None = None
                    ) -> Iterator[UnetPipeError]:
    for ds_name, ds in config["datasets"].items():
        if "raw" not in ds:
            continue
        try:
            raw, labels, offset = _open_dataset(ds, base)
        except UnetPipeError as exc:
            yield exc
            continue
        yield from _range_problems(config, ds_name, raw.shape[0], raw.path, source)
        if labels is None:
            continue
        if labels.dtype.kind not in "uib":
            yield InputError(labels.path, f"labels must be integers, found dtype {labels.dtype}")
            continue
        yield from _label_value_problems(config, labels.dtype, labels.path)
        if offset is not None:
            yield from _crop_problems(config, ds_name, labels.shape, raw.shape, labels.path, offset)
        elif labels.shape != raw.shape:
            yield InputError(labels.path, f"shape {labels.shape} differs from {raw.shape} of {raw.path} "
                             f"(labels of a crop: set datasets.{ds_name}.labels_offset)")
    yield from _init_from_problems(config, base)


def _range_problems(config: dict, name: str, depth: int, path: str | Path,
                    source: str | Path | None = None) -> Iterator[ConfigError]:
    """Train/val/calibrate slice ranges of dataset ``name`` must lie within its ``depth`` slices."""
    ranges = {f"train.datasets.{name}.{part}": r for part, r in config["train"]["datasets"].get(name, {}).items()
              if part in ("train", "val")}
    if name in config["calibrate"]["datasets"]:
        ranges[f"calibrate.datasets.{name}"] = config["calibrate"]["datasets"][name]
    for key, r in ranges.items():
        if r[1] > depth:
            yield ConfigError(source, f"key '{key}': range {list(r)} goes beyond the {depth} slices of {path}")


def _label_value_problems(config: dict, dtype: Any, path: str | Path) -> Iterator[InputError]:
    """The class values the config gives the labels must be values of their dtype (from the header)."""
    import numpy as np

    dtype = np.dtype(dtype)
    low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    weights = config["weights"]
    values = {"weights.unlabelled_value": weights.get("unlabelled_value")}
    if weights["label_mode"] == "binary":
        values["weights.foreground_value"] = weights["foreground_value"]
    for key, value in values.items():
        if value is not None and not low <= value <= high:
            # Such a value never occurs in the file: every pixel would read as another class.
            yield InputError(path, f"labels of dtype {dtype} (values {low}..{high}) cannot hold "
                             f"{key} {value} (key '{key}')")


def _init_from_problems(config: dict, base: str | Path = ".") -> Iterator[UnetPipeError]:
    """``train.init_from`` must be a unet-pipe checkpoint of the model section's architecture
    (dropout may differ), read with ``torch.load(weights_only=True)``."""
    init = config["train"].get("init_from")
    if init is None or applies_model(config) or not (Path(base) / init).is_file():
        return  # absent: said by _missing_inputs
    from unet_pipe.model import _ARCH_FREE, load_checkpoint

    try:
        arch = load_checkpoint(Path(base) / init)["arch"]
    except UnetPipeError as exc:
        yield exc
        return
    wanted = {"in_channels": 1, **config["model"]}
    differing = [f"{key} {arch.get(key)!r} (config: {value!r})" for key, value in wanted.items()
                 if key not in _ARCH_FREE and arch.get(key) != value]
    if differing:
        yield ConfigError(init, "key 'train.init_from': architecture differs from the config's model section: "
                          + ", ".join(differing))
