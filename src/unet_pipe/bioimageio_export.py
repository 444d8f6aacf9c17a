"""A checkpoint as a bioimage.io model package (``unet-pipe export``).

The package (format 0.5 of the bioimage.io model spec, written with
``bioimageio.spec``) holds:

* weights twice: a ``pytorch_state_dict`` with its architecture source
  (:mod:`unet_pipe.model` itself, callable ``UNet`` with the checkpoint's
  ``arch`` as kwargs; the module imports only torch and numpy at its top) and
  a TorchScript trace of the same network (its parent);
* one input ``raw`` (batch, channel, [z,] y, x) whose spatial sizes are the
  valid inputs of the net, ``min + n * step`` with ``step = 2**(depth-1)``,
  and one output ``probabilities`` (batch, class, [z,] y, x) whose sizes are
  the input's minus ``2 * margin`` (the context a valid-convolution net uses
  up; declared as a size offset, since the net crops it itself);
* the preprocessing as ``ensure_dtype float32`` + a fixed ``scale_linear``
  (gain ``1 / (high - low)``, offset ``-low / (high - low)``), where
  ``low``/``high`` are the checkpoint's percentiles of the *sample* stack, by
  the very function predict uses (:func:`unet_pipe.intensity.intensity_range`):
  on that stack it is predict's normalisation exactly.  bioimage.io's
  ``scale_range`` would take the percentiles of each tile instead, which
  differs from predict's per-stack range; a stack of other contrast needs its
  own export (or predict).  Legacy checkpoints (dtype scaling) get the gain
  ``1 / dtype max``.  The postprocessing is a softmax over the class axis;
* test tensors from the user's data: a centred valid-size tile of the sample
  (middle slice for 2D nets) as stored, and the softmax probabilities of the
  net on it in float32, computed as predict does;
* the paper cited, authors, licence, name and description from the config's
  ``export`` section, and ``config.unet_pipe`` with our marker, the
  checkpoint's sha256 and the normalisation, by which a later export knows
  the file as ours, and ``application``: the checkpoint's
  :func:`unet_pipe.model_bundle.application_record` (architecture,
  normalisation rule, training precision, calibrated decisions, training voxel
  size), from which ``unet-pipe segment`` rebuilds the checkpoint exactly.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

import unet_pipe
from unet_pipe import model as model_module
from unet_pipe.config import load_schema
from unet_pipe.intensity import IntensityRange, normalize_raw
from unet_pipe.errors import CheckpointError, ConfigError, InputError, OutputError
from unet_pipe.io import image_metadata, open_image
from unet_pipe.model import UNet, class_probabilities, margin, model_from_checkpoint, nearest_valid_input_size
from unet_pipe.ngff import check_role
from unet_pipe.model_bundle import application_record
from unet_pipe.predict import input_intensity
from unet_pipe.provenance import file_sha256
from unet_pipe.atomic import atomic_output

log = logging.getLogger(__name__)

#: ``config.unet_pipe.format`` of the packages we write: the mark that lets us replace one.
PACKAGE_FORMAT = "unet-pipe-bioimageio-export"
INSTALL_HINT = "bioimage.io export needs bioimageio.spec and bioimageio.core: install unet-pipe[bioimageio]"
#: Test tiles are at most this many pixels per axis (or the smallest valid input, if larger):
#: enough to show the net's behaviour, small enough for a package on a mail or a website.
TEST_TILE_EDGE = 256
PAPER = {
    "text": "Ronneberger O., Fischer P., Brox T. (2015). U-Net: Convolutional Networks for Biomedical "
    "Image Segmentation. MICCAI 2015, LNCS 9351, 234-241.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
#: The package settings of the config's ``export`` section, with the schema's defaults.
DEFAULTS = {
    key: load_schema()["properties"]["export"]["properties"][key]["default"]
    for key in ("name", "description", "authors", "license")
}


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_model` wrote: the package and its test tile (z, y, x start and size)."""

    dest: Path
    tile_start: tuple[int, ...]
    tile_shape: tuple[int, ...]
    weight_formats: tuple[str, ...]


def require_bioimageio() -> None:
    """Raise a one-line :class:`ConfigError` when the optional packages are not installed."""
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise ConfigError(None, INSTALL_HINT) from None


def is_our_package(path: Path) -> bool:
    """True for a zip whose ``rdf.yaml`` carries our marker (a package this module wrote)."""
    try:
        with zipfile.ZipFile(path) as zf:
            rdf = yaml.safe_load(zf.read("rdf.yaml"))
    except (OSError, KeyError, zipfile.BadZipFile, yaml.YAMLError):
        return False
    marker = ((rdf or {}).get("config") or {}).get("unet_pipe") if isinstance(rdf, dict) else None
    return isinstance(marker, dict) and marker.get("format") == PACKAGE_FORMAT


def export_settings(config: dict | None) -> dict:
    """The ``export`` section of a validated config with its defaults (none given: the defaults)."""
    section = (config or {}).get("export") or {}
    return {key: section.get(key, default) for key, default in DEFAULTS.items()}


def test_tile(shape: tuple[int, ...], depth: int, dims: int, where: Any = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Start and size (z, y, x) of the test tile: centred, the largest valid input edge
    <= :data:`TEST_TILE_EDGE` per spatial axis; 2D nets take one slice, the middle one.

    Raises :class:`InputError` when the stack is smaller than the net's smallest input.
    """
    smallest = nearest_min(depth)
    spatial = shape[3 - dims:]
    if min(spatial) < smallest:
        raise InputError(
            where, f"shape {list(shape)} is smaller than the smallest input of this depth-{depth} net "
            f"({smallest} pixels per axis); give a larger sample stack"
        )
    sizes = [nearest_valid_input_size(min(n, max(TEST_TILE_EDGE, smallest)), depth) for n in spatial]
    starts = [(n - s) // 2 for n, s in zip(spatial, sizes)]
    if dims == 2:
        return (shape[0] // 2, *starts), (1, *sizes)
    return tuple(starts), tuple(sizes)


def input_scaling(intensity: IntensityRange | None, dtype: np.dtype) -> tuple[float, float]:
    """Gain and offset with ``gain * raw + offset`` = :func:`unet_pipe.intensity.normalize_raw`."""
    if intensity is not None:
        gain = 1.0 / (intensity.high - intensity.low)
        return gain, -intensity.low * gain
    if np.issubdtype(dtype, np.integer):
        return 1.0 / float(np.iinfo(dtype).max), 0.0
    return 1.0, 0.0


def default_sample(data: dict, checkpoint: Path) -> Path:
    """The raw store of the checkpoint's first training dataset, as the workflow lays it out."""
    config = data.get("config") or {}
    names = sorted((config.get("train") or {}).get("datasets") or {})
    if not names:
        raise CheckpointError(checkpoint, "records no training dataset; give --sample RAW.ome.zarr")
    path = Path(config.get("results", "results")) / names[0] / "raw.ome.zarr"
    if not path.exists():
        raise InputError(path, "the training raw store recorded in the checkpoint is not here; give --sample RAW.ome.zarr")
    return path


def _check_dest(dest: Path, overwrite: bool) -> None:
    if dest.suffix != ".zip":
        raise OutputError(dest, "a bioimage.io package is a .zip file; name it DEST.zip")
    if not (dest.exists() or dest.is_symlink()):
        return
    if dest.is_symlink() or not dest.is_file() or not is_our_package(dest):
        raise OutputError(dest, "exists and is not a bioimage.io package written by unet-pipe; refusing to replace it")
    if not overwrite:
        raise OutputError(dest, "exists (a package of ours); pass --overwrite to replace it")


def _documentation(arch: dict, low_high: tuple[float, float] | None, gain: float, offset: float,
                   sample: Path, start: tuple[int, ...], size: tuple[int, ...]) -> str:
    depth, m = arch["depth"], margin(arch["depth"])
    norm = (
        f"`(raw - {low_high[0]:.6g}) / ({low_high[1]:.6g} - {low_high[0]:.6g})`, the percentiles of the "
        "sample stack (unet-pipe normalises every stack by its own percentiles: export again for a stack "
        "of other contrast, or run `unet-pipe predict`)" if low_high else f"`raw * {gain:.6g} + {offset:.6g}`"
    )
    return (
        "# U-Net (unet-pipe)\n\n"
        "The U-Net of Ronneberger, Fischer and Brox (2015, doi:10.1007/978-3-319-24574-4_28), "
        f"{arch['dims']}D, depth {depth}, {arch['base_channels']} base channels, {arch['n_classes']} classes, "
        "trained and exported with unet-pipe.\n\n"
        "## Input and output\n\n"
        f"* Input: gray values, normalised by {norm}.\n"
        f"* Valid convolutions: each spatial input edge must be {nearest_min(depth)} + n * {2 ** (depth - 1)} "
        f"pixels; the output is {m} pixels smaller on each side (the context the net uses). To cover a "
        f"whole image, tile it with {m} pixels of overlap per side and mirror the borders (overlap-tile).\n"
        "* Output: softmax probabilities per class (channel 1: cell, channel 0: membrane/background).\n"
        "* Instances: `config.unet_pipe.application.decisions` holds the calibrated decisions (cell where "
        "p > threshold, then connected components or a seeded watershed) and `voxel_size` the voxel size "
        "(z, y, x µm) the net was trained at; `unet-pipe segment MODEL.zip STACK.tif --out DIR` applies both.\n\n"
        "## Test data\n\n"
        f"A tile of `{sample.name}` at (z, y, x) {list(start)} of size {list(size)}, and the net's "
        "float32 output on it.\n\n"
        "## Validation\n\n"
        "unet-pipe's tests run `bioimageio.core.test_model` on an exported package (both weight formats "
        "reproduce the test output) and compare its prediction with `unet-pipe predict` on the same pixels. "
        "Segmentation quality depends on the training data: see the unet-pipe report of the run.\n"
    )


def nearest_min(depth: int) -> int:
    """Smallest valid input edge of a U-Net of ``depth`` levels (188 for depth 5)."""
    size = 1
    while True:  # at most 6 * 2**(depth-1) cheap checks
        try:
            model_module.valid_output_size(size, depth)
            return size
        except ValueError:
            size += 1


def _trace(model: UNet, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # The size checks in UNet.forward turn sizes into Python ints (TracerWarning); the crops
        # stay traced size arithmetic, so the trace serves every valid size (the package's test
        # runs it on other sizes than the example's). torch also flags jit.trace as deprecated.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return torch.jit.trace(model, example, check_trace=False)


def _tensor_descrs(work: Path, arch: dict, voxel_size: Sequence[float], test_dtype: np.dtype, gain: float,
                   offset: float) -> tuple[Any, Any]:
    """The input (raw, normalised by the preprocessing) and output (class probabilities) descriptions."""
    from bioimageio.spec.model import v0_5

    axes_ids = ["z", "y", "x"][3 - arch["dims"]:]
    voxel = dict(zip(["z", "y", "x"], voxel_size))
    step, m = 2 ** (arch["depth"] - 1), margin(arch["depth"])
    smallest = nearest_min(arch["depth"])
    classes = ["membrane", "cell"] if arch["n_classes"] == 2 else [f"class{i}" for i in range(arch["n_classes"])]

    raw_id, out_id = v0_5.TensorId("raw"), v0_5.TensorId("probabilities")
    inputs = v0_5.InputTensorDescr(
        id=raw_id,
        description="raw gray values as stored (the preprocessing normalises them)",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=[v0_5.Identifier("raw")])] + [
            v0_5.SpaceInputAxis(id=v0_5.AxisId(a), size=v0_5.ParameterizedSize(min=smallest, step=step),
                                unit="micrometer", scale=voxel[a])
            for a in axes_ids
        ],
        test_tensor=v0_5.FileDescr(source=work / "test_input.npy"),
        data=v0_5.IntervalOrRatioDataDescr(type=str(test_dtype)),
        preprocessing=[
            v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")),
            v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(gain=gain, offset=offset)),
            # Else the spec appends a cast back to the stored dtype (uint8) before the net.
            v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")),
        ],
    )
    outputs = v0_5.OutputTensorDescr(
        id=out_id,
        description="softmax probability of each class; the cell probability is channel 1",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=[v0_5.Identifier(c) for c in classes])] + [
            v0_5.SpaceOutputAxis(
                id=v0_5.AxisId(a), unit="micrometer", scale=voxel[a],
                size=v0_5.SizeReference(tensor_id=raw_id, axis_id=v0_5.AxisId(a), offset=-2 * m),
            )
            for a in axes_ids
        ],
        test_tensor=v0_5.FileDescr(source=work / "test_output.npy"),
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[v0_5.SoftmaxDescr(kwargs=v0_5.SoftmaxKwargs(axis=v0_5.AxisId("channel")))],
    )
    return inputs, outputs


def _weights_descr(work: Path, arch: dict, torch_version: str) -> Any:
    """The state-dict weights (architecture from the copied model.py) and their TorchScript child."""
    from bioimageio.spec.model import v0_5

    weights = v0_5.WeightsDescr(
        pytorch_state_dict=v0_5.PytorchStateDictWeightsDescr(
            source=work / "weights.pt",
            architecture=v0_5.ArchitectureFromFileDescr(
                source=work / "unet_model.py", callable=v0_5.Identifier("UNet"), kwargs=arch
            ),
            pytorch_version=v0_5.Version(torch_version),
        ),
        torchscript=v0_5.TorchscriptWeightsDescr(
            source=work / "weights.torchscript.pt", pytorch_version=v0_5.Version(torch_version),
            parent="pytorch_state_dict",
        ),
    )
    return weights


def _package_config(checkpoint: Path, data: dict, arch: dict, intensity: IntensityRange | None, gain: float,
                    offset: float, sample: Path, start: Sequence[int], size: Sequence[int]) -> dict[str, Any]:
    """The package's ``config.unet_pipe``: provenance, normalisation, test tile and what applying it needs."""
    m = margin(arch["depth"])
    return {
        "format": PACKAGE_FORMAT,
        "package_version": unet_pipe.__version__,
        "checkpoint_sha256": file_sha256(checkpoint),
        "arch": arch,
        "input_normalization": {
            "rule": "dtype-max" if intensity is None else "percentile",
            "range": None if intensity is None else intensity.to_list(),
            "gain": gain,
            "offset": offset,
            "sample": str(sample),
        },
        "test_tile": {"start": list(start), "shape": list(size)},
        "margin": m,
        # What applying the model needs, as the checkpoint carries it (unet_pipe.model_bundle):
        # segment turns the package back into that checkpoint, decisions and voxel size included.
        "application": application_record(data),
    }


def export_model(checkpoint: str | Path, dest: str | Path, *, sample: str | Path | None = None,
                 settings: dict | None = None, overwrite: bool = False) -> ExportSummary:
    """Write the bioimage.io package of ``checkpoint`` to ``dest`` (a .zip), atomically.

    ``sample``: raw OME-Zarr stack of the test tile and the normalisation range
    (default: the checkpoint's first training dataset, :func:`default_sample`);
    ``settings``: name, description, authors, license (:func:`export_settings`).
    """
    require_bioimageio()
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5

    checkpoint, dest = Path(checkpoint), Path(dest)
    settings = {**DEFAULTS, **(settings or {})}
    if not settings["authors"]:
        raise ConfigError(None, "export.authors is empty: bioimage.io packages name at least one author "
                          "(config export.authors: [{name: ...}])")
    _check_dest(dest, overwrite)
    model, data = model_from_checkpoint(checkpoint, map_location="cpu")
    arch = dict(model.arch)
    if arch["in_channels"] != 1:
        raise CheckpointError(checkpoint, f"expects {arch['in_channels']} input channels; EM stacks have 1")
    sample = Path(sample) if sample is not None else default_sample(data, checkpoint)
    meta = image_metadata(sample)
    check_role(meta, ("raw",), "export's --sample")
    intensity = input_intensity(data.get("extra") or {}, checkpoint, meta)  # as predict normalises it
    gain, offset = input_scaling(intensity, meta.dtype)
    start, size = test_tile(meta.shape, arch["depth"], arch["dims"], where=sample)
    raw_tile = np.asarray(open_image(sample)[tuple(slice(a, a + n) for a, n in zip(start, size))])
    spatial = raw_tile if arch["dims"] == 3 else raw_tile[0]
    with torch.no_grad():  # not inference_mode: x is also the trace's example, which needs normal tensors
        x = torch.from_numpy(normalize_raw(spatial, intensity))[None, None]
        probabilities = class_probabilities(model(x)).numpy()
    test_input = spatial[None, None]

    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        np.save(work / "test_input.npy", test_input)
        np.save(work / "test_output.npy", probabilities)
        torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, work / "weights.pt")
        _trace(model, x).save(str(work / "weights.torchscript.pt"))
        shutil.copyfile(model_module.__file__, work / "unet_model.py")
        (work / "README.md").write_text(_documentation(
            arch, None if intensity is None else (intensity.low, intensity.high), gain, offset, sample, start, size
        ))
        torch_version = torch.__version__.split("+")[0]
        inputs, outputs = _tensor_descrs(work, arch, meta.voxel_size, test_input.dtype, gain, offset)
        weights = _weights_descr(work, arch, torch_version)
        descr = v0_5.ModelDescr(
            name=settings["name"],
            description=settings["description"],
            authors=[v0_5.Author(**author) for author in settings["authors"]],
            cite=[v0_5.CiteEntry(text=PAPER["text"], doi=v0_5.Doi(PAPER["doi"]))],
            license=v0_5.LicenseId(settings["license"]),
            documentation=v0_5.FileDescr(source=work / "README.md"),
            tags=["unet", "semantic-segmentation", "electron-microscopy", f"{arch['dims']}d", "pytorch", "unet-pipe"],
            inputs=[inputs],
            outputs=[outputs],
            weights=weights,
            config=v0_5.Config(unet_pipe=_package_config(
                checkpoint, data, arch, intensity, gain, offset, sample, start, size
            )),
        )
        with atomic_output(dest, recognise=is_our_package) as tmp:
            save_bioimageio_package(descr, output_path=tmp)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(None, f"the bioimage.io description is invalid: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportSummary(dest, tuple(start), tuple(size), ("pytorch_state_dict", "torchscript"))
