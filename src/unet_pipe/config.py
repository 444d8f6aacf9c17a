"""Configuration: safe YAML loading, JSON-Schema validation, defaults.

The schema lives in ``workflow/schemas/config.schema.yaml`` (the package holds a
link to it) and is the single source of truth: the Snakefile validates with
``snakemake.utils.validate`` against the same file, the CLI with
:func:`load_config`.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from unet_pipe.errors import ConfigError

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


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        where = f"{key}." if key != "<top level>" else ""
        return f"unknown key '{where}{extra[0] if extra else '?'}'{hint}"
    if error.validator == "oneOf" and key.startswith("datasets."):
        return f"key '{key}': give either 'synthetic' or 'raw' (with optional 'labels'), not both"
    return f"key '{key}': {error.message}"


def validate_config(config: dict, source: str | Path | None = None) -> dict:
    """Validate ``config`` against the schema and return a copy with defaults filled.

    Raises :class:`ConfigError` naming the first offending key.
    """
    if not isinstance(config, dict):
        raise ConfigError(source, "the configuration must be a YAML mapping")
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise ConfigError(source, _describe(errors[0]))
    filled = copy.deepcopy(config)
    _fill_defaults(filled, schema)
    _check_semantics(filled, source)
    return filled


def _check_semantics(config: dict, source: str | Path | None) -> None:
    datasets = config["datasets"]
    for name, ranges in config["train"]["datasets"].items():
        if name not in datasets:
            raise ConfigError(source, f"key 'train.datasets.{name}': no such dataset in 'datasets'")
        if "labels" not in datasets[name] and "synthetic" not in datasets[name]:
            raise ConfigError(source, f"key 'train.datasets.{name}': dataset has no 'labels' to train on")
        for part in ("train", "val"):
            if part in ranges and ranges[part][0] >= ranges[part][1]:
                raise ConfigError(source, f"key 'train.datasets.{name}.{part}': empty range {ranges[part]}")
    for name in config["predict"]["datasets"]:
        if name not in datasets:
            raise ConfigError(source, f"key 'predict.datasets': no such dataset '{name}'")


def check_inputs_exist(config: dict, base: str | Path = ".", source: str | Path | None = None) -> None:
    """Raise :class:`ConfigError` if a TIFF path named in ``datasets`` does not exist."""
    for name, ds in config["datasets"].items():
        for key in ("raw", "labels"):
            if key in ds and not (Path(base) / ds[key]).exists():
                raise ConfigError(source, f"key 'datasets.{name}.{key}': input '{ds[key]}' does not exist")


def load_config(path: str | Path, check_inputs: bool = True) -> dict:
    """Read a YAML config safely, validate it and fill in defaults."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "config file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(path, f"not valid YAML{where}") from None
    config = validate_config(raw, path)
    if check_inputs:
        check_inputs_exist(config, source=path)
    return config


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


def check_input_stacks(config: dict, base: str | Path = ".") -> None:
    """Open the headers of every TIFF input; raise :class:`InputError` for an unreadable stack.

    Catches corrupt files, folders of mismatched slices and label stacks whose
    shape differs from their raw stack before any job runs (headers only: no
    pixel data is read).
    """
    from unet_pipe.errors import InputError
    from unet_pipe.tiff import open_tiff_stack

    for ds in config["datasets"].values():
        if "raw" not in ds:
            continue
        raw = open_tiff_stack(Path(base) / ds["raw"])
        if "labels" in ds:
            labels = open_tiff_stack(Path(base) / ds["labels"])
            if labels.shape != raw.shape:
                raise InputError(labels.path, f"shape {labels.shape} differs from {raw.shape} of {raw.path}")
