"""The model that travels: a checkpoint carrying everything that applying it needs.

Applying a trained U-Net to a new stack needs more than its weights: the
architecture, the input normalisation rule, the precision it was trained in,
the *decisions* that turn probabilities into instances (cell threshold,
instance method and its parameters, chosen by :mod:`unet_pipe.calibrate`) and
the voxel size it was trained at.  ``train`` records all but the decisions in
its checkpoint; ``calibrate`` writes them to ``decisions.json`` beside it (the
readable record, with every candidate's scores).

:func:`bundle_model` joins the two into *the model*: a copy of the checkpoint
(the same plain state dict, read with ``torch.load(weights_only=True)``)
without the optimiser state, whose ``extra`` holds ``decisions`` (with their
``source``) and ``voxel_size``.  The workflow writes it as
``RESULTS/model/model.pt`` (rule ``bundle``); ``segment``, ``postprocess
--decisions MODEL`` and ``export`` read it.  :func:`application_record` is the
one description of a model's application, stored as such in the exported
bioimage.io package (``config.unet_pipe.application``), so a package is turned
back into the same checkpoint by :func:`checkpoint_from_package`.

A model without decisions (a checkpoint straight from ``train``, or from an
older release) still segments: with :data:`DEFAULT_DECISIONS`, the softmax's
own decision (cell where p > 0.5, connected components), and a warning.
"""
from __future__ import annotations

import io
import logging
import math
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from unet_pipe.calibrate import check_decisions, read_decisions
from unet_pipe.errors import CheckpointError, InputError, OutputError
from unet_pipe.model import UNet, load_checkpoint, model_from_checkpoint, save_checkpoint
from unet_pipe.provenance import file_sha256

log = logging.getLogger(__name__)

#: Decisions of a model that carries none: the softmax's argmax (p > 0.5) and connected components.
#: Not fitted to any data; a warning says so whenever they are used.
DEFAULT_DECISIONS: dict[str, Any] = {
    "method": "threshold", "threshold": 0.5, "seed_threshold": 0.9, "seed_prominence": 5.0, "min_size": 0,
    "cell_threshold": 0.5,
}
#: ``extra`` entries of a training checkpoint that only resuming needs (left out of the model).
_TRAINING_STATE = ("tile_rng", "aug_rng", "cuda_rng", "scaler")
_PRECISION_KEYS = ("precision", "cpu_model", "cpu_bf16_flags", "cpu_bf16_native")
#: Relative difference of a voxel edge from the model's beyond which segment warns.
VOXEL_TOLERANCE = 0.1


def is_package(path: str | Path) -> bool:
    """True for a zip file (a bioimage.io package); checkpoints are torch zip files too, so by name."""
    path = Path(path)
    return path.suffix == ".zip" and zipfile.is_zipfile(path)


def training_voxel_size(extra: dict) -> list[float] | None:
    """The voxel size (z, y, x µm) a model was trained at: the recorded one, else that of its
    training stacks when they agree (None: unknown, e.g. a checkpoint of an older release)."""
    if isinstance(extra.get("voxel_size"), list) and len(extra["voxel_size"]) == 3:
        return [float(v) for v in extra["voxel_size"]]
    sizes = [tuple(float(v) for v in s) for s in (extra.get("voxel_sizes") or {}).values()]
    if sizes and all(all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(s, sizes[0])) for s in sizes):
        return list(sizes[0])
    return None


def application_record(data: dict) -> dict[str, Any]:
    """What applying the model of checkpoint payload ``data`` needs, as plain JSON-able data:
    ``arch``, ``input_normalization`` (the rule, :func:`unet_pipe.predict.input_intensity`),
    ``input_dtype`` (legacy checkpoints), ``precision`` (the training precision record),
    ``decisions`` (None when it carries none) and ``voxel_size`` (z, y, x µm; None: unknown)."""
    extra = data.get("extra") or {}
    return {
        "arch": dict(data["arch"]),
        "input_normalization": extra.get("input_normalization"),
        "input_dtype": extra.get("input_dtype"),
        "precision": {k: extra[k] for k in _PRECISION_KEYS if k in extra} or None,
        "decisions": extra.get("decisions"),
        "voxel_size": training_voxel_size(extra),
    }


def model_decisions(data: dict, where: str | Path, warn: bool = True) -> dict[str, Any]:
    """The decisions a model carries, checked; :data:`DEFAULT_DECISIONS` (with a warning unless
    ``warn`` is False) when none.

    The result has a ``source`` entry: where the decisions come from (``calibrate``,
    ``config``, ``given`` or ``default``)."""
    recorded = (data.get("extra") or {}).get("decisions")
    if recorded is None:
        if not warn:
            return {**DEFAULT_DECISIONS, "source": "default"}
        log.warning(
            "%s carries no calibrated decisions; using the default: cell where p > 0.5, connected components "
            "(bundle it with its decisions.json: `unet-pipe bundle`, or give --decisions or --threshold)", where,
        )
        return {**DEFAULT_DECISIONS, "source": "default"}
    return {**check_decisions(recorded, where), "source": str(recorded.get("source", "given"))}


def override_decisions(base: dict[str, Any], overrides: dict[str, Any], where: str | Path | None) -> dict[str, Any]:
    """``base`` decisions with the entries of ``overrides`` replaced, checked.

    A threshold given over the default decisions is the cell threshold too; a threshold
    raised above the seed threshold lifts the seed threshold with it (unless that is given)."""
    if not overrides:
        return base
    merged = {**base, **overrides}
    if "threshold" in overrides and "seed_threshold" not in overrides:
        merged["seed_threshold"] = max(merged["seed_threshold"], merged["threshold"])
    if "threshold" in overrides and base.get("source") == "default":
        merged["cell_threshold"] = overrides["threshold"]
    return {**check_decisions(merged, where or "options"), "source": f"{base.get('source', 'given')} + options"}


def read_any_decisions(path: str | Path) -> dict[str, Any]:
    """Decisions from a ``decisions.json`` or from a model (checkpoint or bioimage.io package)."""
    path = Path(path)
    if path.suffix == ".json":
        return {**read_decisions(path), "source": "calibrate"}
    if is_package(path):
        return model_decisions({"extra": package_record(path)}, path)
    return model_decisions(load_checkpoint(path), path)


def _check_model_dest(dest: Path, overwrite: bool) -> None:
    if not (dest.exists() or dest.is_symlink()):
        return
    if dest.is_symlink() or not dest.is_file():
        raise OutputError(dest, "exists and is not a unet-pipe checkpoint; refusing to replace it")
    if not overwrite:
        raise OutputError(dest, "already exists; remove it or pass --overwrite")
    try:
        load_checkpoint(dest)
    except CheckpointError:
        raise OutputError(dest, "exists and is not a unet-pipe checkpoint; refusing to replace it") from None


def bundle_model(
    source: str | Path,
    dest: str | Path,
    *,
    decisions: dict[str, Any] | None = None,
    voxel_size: Sequence[float] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the model of ``source`` (a checkpoint or one of our bioimage.io packages) to ``dest``
    with ``decisions`` (checked; None: keep those ``source`` carries) and ``voxel_size`` (None:
    keep the recorded one) in its ``extra``; no optimiser or generator state.  Atomic.

    Returns the :func:`application_record` of the written model.
    """
    source, dest = Path(source), Path(dest)
    _check_model_dest(dest, overwrite)
    if is_package(source):
        model, data = model_from_package(source)
    else:
        model, data = model_from_checkpoint(source)
    extra = {k: v for k, v in (data.get("extra") or {}).items() if k not in _TRAINING_STATE}
    if decisions is not None:
        extra["decisions"] = {**check_decisions(decisions, source), "source": decisions.get("source", "given")}
    recorded = training_voxel_size(extra) if voxel_size is None else [float(v) for v in voxel_size]
    if voxel_size is not None and not all(math.isfinite(v) and v > 0 for v in recorded):
        raise InputError(None, f"voxel size must be three positive numbers, got {list(voxel_size)}")
    extra["voxel_size"] = recorded
    extra["bundled_from"] = {"path": str(source), "sha256": file_sha256(source)}
    save_checkpoint(dest, model, None, step=int(data.get("step", 0)), config=data.get("config"), extra=extra)
    record = application_record(load_checkpoint(dest))
    log.info("wrote %s: decisions %s, voxel size %s µm", dest, _describe(record["decisions"]), record["voxel_size"])
    return record


def _describe(decisions: dict | None) -> str:
    if decisions is None:
        return "none (default p > 0.5 at use)"
    return f"{decisions['method']} at {decisions['threshold']:g} ({decisions.get('source', 'given')})"


# ----------------------------------------------------------------- bioimage.io packages


def _read_rdf(path: Path, zf: zipfile.ZipFile) -> dict:
    try:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
    except (KeyError, yaml.YAMLError):
        raise CheckpointError(path, "not a bioimage.io package (no readable rdf.yaml)") from None
    own = ((rdf or {}).get("config") or {}).get("unet_pipe") if isinstance(rdf, dict) else None
    if not isinstance(own, dict) or not isinstance(own.get("application"), dict):
        raise CheckpointError(
            path, "is not a bioimage.io package exported by this unet-pipe (no config.unet_pipe.application); "
            "export the model again with `unet-pipe export`"
        )
    return rdf


def package_record(path: str | Path) -> dict[str, Any]:
    """The ``extra`` a checkpoint made from package ``path`` carries (its application record)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            app = _read_rdf(path, zf)["config"]["unet_pipe"]["application"]
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, f"cannot read the package ({type(exc).__name__})") from None
    return _extra_of(app)


def _extra_of(app: dict) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "input_normalization": app.get("input_normalization"),
        "decisions": app.get("decisions"),
        "voxel_size": app.get("voxel_size"),
        **(app.get("precision") or {}),
    }
    if app.get("input_dtype") is not None:
        extra["input_dtype"] = app["input_dtype"]
    return extra


def model_from_package(path: str | Path) -> tuple[UNet, dict]:
    """The network of one of our bioimage.io packages and a checkpoint payload describing it
    (``arch``, ``extra`` from ``config.unet_pipe.application``); weights read with ``weights_only``."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            rdf = _read_rdf(path, zf)
            app = rdf["config"]["unet_pipe"]["application"]
            source = (((rdf.get("weights") or {}).get("pytorch_state_dict")) or {}).get("source")
            if not isinstance(source, str):
                raise CheckpointError(path, "the package has no pytorch_state_dict weights")
            state = torch.load(io.BytesIO(zf.read(source)), map_location="cpu", weights_only=True)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(path, f"cannot read the package ({type(exc).__name__})") from None
    except Exception as exc:  # torch.load of foreign bytes raises many types
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(path, f"cannot read the package's weights ({type(exc).__name__})") from None
    try:
        model = UNet(**app["arch"])
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(path, f"weights do not match the recorded architecture ({type(exc).__name__})") from None
    model.eval()
    return model, {"arch": dict(model.arch), "extra": _extra_of(app), "step": 0, "config": None}


def checkpoint_from_package(path: str | Path, dest: str | Path) -> Path:
    """Write the checkpoint of package ``path`` to ``dest`` (atomically); predict reads it like any."""
    path, dest = Path(path), Path(dest)
    model, data = model_from_package(path)
    extra = {**data["extra"], "bundled_from": {"path": str(path), "sha256": file_sha256(path)}}
    return save_checkpoint(dest, model, None, step=0, config=None, extra=extra)


def describe_record(record: dict[str, Any]) -> str:
    """One line for logs: architecture, decisions and voxel size of an application record."""
    arch = record["arch"]
    return (f"{arch['dims']}D U-Net depth {arch['depth']}, {arch['in_channels']} input channel(s); decisions "
            f"{_describe(record['decisions'])}; trained at {record['voxel_size'] or 'an unrecorded'} µm")
