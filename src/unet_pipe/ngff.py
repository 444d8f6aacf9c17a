"""OME-Zarr metadata and reading, for NGFF 0.4 (zarr format 2) and NGFF 0.5 (zarr format 3).

Writing lives in :mod:`unet_pipe.io`; every public name here is importable from there too.

The two versions hold the same information in different places:

* **0.4** (the default: what napari-ome-zarr, Fiji/MoBIE and neuroglancer read
  today): group ``.zattrs`` with ``multiscales`` (each carrying ``"version":
  "0.4"``), ``image-label`` and ``labels`` at the top level; arrays are zarr
  format 2 with ``/``-separated chunk keys (``0/z/y/x``).
* **0.5**: group ``zarr.json`` whose ``attributes.ome`` holds ``{"version":
  "0.5", "multiscales": [...], "image-label": {...}, "labels": [...]}`` (no
  version inside ``multiscales`` or ``image-label``); arrays are zarr format 3
  with the default chunk key encoding (``0/c/z/y/x``) and a ``blosc`` codec.

In both, the project's own attributes (marker, provenance, checksums) sit
beside the NGFF keys under ``unet_pipe``.  Readers detect the version from
the store, so every stage reads either.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from unet_pipe.errors import InputError
from unet_pipe.integrity import CHUNKS_KEY, CheckedArray, check_chunks
from unet_pipe.safety import ATTRS_KEY

NGFF_VERSIONS: tuple[str, ...] = ("0.4", "0.5")
DEFAULT_NGFF = "0.4"
ZARR_FORMATS: dict[str, int] = {"0.4": 2, "0.5": 3}


def check_ngff(ngff: str) -> str:
    """``ngff`` if it is a version the pipeline writes, else ValueError (a programming error:
    the CLI and the config schema only offer these)."""
    if ngff not in NGFF_VERSIONS:
        raise ValueError(f"NGFF version must be one of {', '.join(NGFF_VERSIONS)}, got {ngff!r}")
    return ngff


@dataclass(frozen=True)
class ImageMeta:
    """What the pipeline needs to know about an OME-Zarr image.

    ``attrs`` are the group's attributes as stored (NGFF 0.5 keeps its keys under
    ``ome``); ``multiscales`` is the first multiscales block whatever the version.
    """

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    voxel_size: tuple[float, float, float]
    levels: int
    attrs: dict = field(default_factory=dict)
    ngff: str = DEFAULT_NGFF
    multiscales: dict = field(default_factory=dict)

    @property
    def offset(self) -> tuple[int, int, int]:
        """(z, y, x) pixel offset of a labelled crop in its raw image (``unet_pipe.offset``; default 0)."""
        value = self.attrs.get(ATTRS_KEY, {}).get("offset") if isinstance(self.attrs.get(ATTRS_KEY), dict) else None
        if value is None:
            return (0, 0, 0)
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and v >= 0 for v in value)):
            raise InputError(self.path, f"offset {value!r} must be three non-negative integers (z, y, x)")
        return (value[0], value[1], value[2])


def multiscales_metadata(
    name: str,
    voxel_size: Sequence[float],
    levels: int,
    kind: str = "image",
    offset: Sequence[int] | None = None,
    ngff: str = DEFAULT_NGFF,
) -> dict[str, Any]:
    """NGFF ``multiscales`` block: level 0 first, each further level 2x coarser in y, x.

    ``offset``: (z, y, x) pixel position of this image's first voxel in the image it
    annotates (a labelled crop), written as an NGFF ``translation`` in micrometres.
    NGFF 0.5 states its version once, in ``ome``, not per block.
    """
    vz, vy, vx = (float(v) for v in voxel_size)
    moved = offset is not None and any(int(o) for o in offset)
    datasets = []
    for level in range(levels + 1):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [vz, vy * 2**level, vx * 2**level]}]
        if moved:
            oz, oy, ox = (int(o) for o in offset)
            transforms.append({"type": "translation", "translation": [oz * vz, oy * vy, ox * vx]})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    block: dict[str, Any] = {"version": ngff} if check_ngff(ngff) == "0.4" else {}
    return {
        **block,
        "name": name,
        "axes": [{"name": ax, "type": "space", "unit": "micrometer"} for ax in "zyx"],
        "datasets": datasets,
        "type": "mean" if kind == "image" else "nearest",
    }


def group_attributes(
    ngff: str,
    *,
    multiscales: dict | None = None,
    image_label: dict | None = None,
    labels: list[str] | None = None,
    own: dict | None = None,
) -> dict[str, Any]:
    """A group's attributes in the layout of ``ngff``; ``own`` goes under ``unet_pipe``.

    ``image_label`` is given without a version (0.4 adds its own); ``multiscales``
    as :func:`multiscales_metadata` made it for the same version.
    """
    keys: dict[str, Any] = {}
    if multiscales is not None:
        keys["multiscales"] = [multiscales]
    if image_label is not None:
        keys["image-label"] = {"version": ngff, **image_label} if check_ngff(ngff) == "0.4" else dict(image_label)
    if labels is not None:
        keys["labels"] = list(labels)
    attrs = keys if check_ngff(ngff) == "0.4" else {"ome": {"version": ngff, **keys}}
    return {**attrs, **({ATTRS_KEY: own} if own is not None else {})}


def ngff_keys(attrs: dict) -> tuple[str, dict]:
    """(version, the NGFF keys) of a group's attributes in either layout."""
    ome = attrs.get("ome")
    if isinstance(ome, dict):
        return str(ome.get("version", "0.5")), ome
    multiscales = attrs.get("multiscales")
    version = multiscales[0].get("version", "0.4") if isinstance(multiscales, list) and multiscales and isinstance(
        multiscales[0], dict) else "0.4"
    return str(version), attrs


def write_group(folder: Path, attrs: dict, ngff: str) -> None:
    """Write the metadata of a zarr group (no arrays): format 2 for NGFF 0.4, format 3 for 0.5."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if ZARR_FORMATS[check_ngff(ngff)] == 2:
        (folder / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
        (folder / ".zattrs").write_text(json.dumps(attrs, indent=2))
    else:
        meta = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
        (folder / "zarr.json").write_text(json.dumps(meta, indent=2))


def entry_in_store(store: str | Path, entry: Any, what: str) -> str:
    """``entry``, a path that metadata of ``store`` names (a dataset, a label image), if it stays inside.

    Every path read from NGFF metadata goes through here before it is opened: an
    absolute entry, ``..``, a backslash, or one that resolves outside the store
    (symbolic links followed) would make a stage read what the user did not give it.
    ``what`` says which metadata named it, for the error line.
    """
    store = Path(store)
    if (not isinstance(entry, str) or not entry.strip("/") or entry.startswith("/") or "\\" in entry
            or ".." in Path(entry).parts or Path(entry).is_absolute()):
        raise InputError(store, f"{what} {entry!r} is not a relative name inside the store")
    root = store.resolve()
    target = (store / entry).resolve()
    if target == root or not target.is_relative_to(root):
        raise InputError(store, f"{what} {entry!r} leads outside the store (to {target}); "
                         "unet-pipe reads only inside the store it was given")
    return entry


def _open_group(path: Path) -> zarr.Group:
    if not path.exists():
        raise InputError(path, "not found")
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise InputError(path, f"not a zarr group ({type(exc).__name__})") from None


def image_metadata(path: str | Path) -> ImageMeta:
    """Read the NGFF metadata (0.4 or 0.5, detected) of an OME-Zarr image written by the pipeline
    (or compatible)."""
    path = Path(path)
    group = _open_group(path)
    attrs = group.attrs.asdict()
    version, keys = ngff_keys(attrs)
    try:
        ms = keys["multiscales"][0]
        level0 = ms["datasets"][0]
        scale = next(t["scale"] for t in level0["coordinateTransformations"] if t["type"] == "scale")
        name = level0["path"]
    except (KeyError, IndexError, StopIteration, TypeError, AttributeError):
        raise InputError(path, "not an OME-Zarr image (no valid 'multiscales' metadata)") from None
    own = attrs.get(ATTRS_KEY)
    for ds in ms.get("datasets", []):
        try:
            entry_in_store(path, ds.get("path") if isinstance(ds, dict) else None, "multiscales dataset path")
        except InputError as exc:
            if isinstance(own, dict) and own.get("kind") == "view":
                raise InputError(path, f"{exc.problem}: a view links to the stores it shows, for viewers; "
                                 "give a stage those stores") from None
            raise
    try:
        array = group[name]
    except KeyError:
        raise InputError(path, f"multiscales names dataset {name!r}, which is missing") from None
    except Exception as exc:  # garbled .zarray / zarr.json: zarr raises many types
        raise InputError(path, f"dataset {name!r} has unreadable array metadata ({type(exc).__name__})") from None
    if not isinstance(array, zarr.Array):
        raise InputError(path, f"multiscales dataset {name!r} is a group, not an array")
    if array.ndim != 3:
        raise InputError(path, f"expected a 3D (z, y, x) image, found {array.ndim} dimensions")
    if (not isinstance(scale, list) or len(scale) != array.ndim
            or not all(isinstance(v, (int, float)) and np.isfinite(v) and v > 0 for v in scale)):
        raise InputError(path, f"scale {scale!r} of level {name!r} must be {array.ndim} finite positive numbers")
    return ImageMeta(
        path=path,
        shape=tuple(array.shape),
        dtype=np.dtype(array.dtype),
        chunks=tuple(array.chunks),
        voxel_size=(float(scale[-3]), float(scale[-2]), float(scale[-1])),
        levels=len(ms["datasets"]) - 1,
        attrs=attrs,
        ngff=version,
        multiscales=ms,
    )


def open_image(path: str | Path, level: int = 0) -> CheckedArray:
    """Open one level (0 = full resolution) of an OME-Zarr image read-only.

    Reads of a corrupt or truncated chunk raise :class:`InputError` naming the
    store and the chunk (see :mod:`unet_pipe.integrity`).
    """
    path = Path(path)
    meta = image_metadata(path)  # validates
    datasets = meta.multiscales["datasets"]
    if not 0 <= level < len(datasets):
        raise InputError(path, f"has no pyramid level {level}")
    name = datasets[level]["path"]
    array = _open_group(path)[name]
    check_chunks(path, name, array, own_attributes(meta.attrs).get(CHUNKS_KEY))
    return CheckedArray(array, path, name)


# What each kind of store we publish records (under unet_pipe), and the command that writes it.
_ROLE_MARKS = (("probabilities", "probability_scale", "predict"), ("instances", "instances", "postprocess"),
               ("weights", "weights", "weights"))


def store_role(attrs: dict) -> str | None:
    """What a store unet-pipe published holds: "raw", "labels", "weights", "probabilities" or
    "instances"; None for a store of another tool (or one written without its records)."""
    own = own_attributes(attrs)
    for role, mark, _ in _ROLE_MARKS:
        if mark in own:
            return role
    if "source" in own:  # ingest records its input
        return "labels" if own.get("kind") == "labels" else "raw"
    return None


def check_role(meta: ImageMeta, allowed: Sequence[str], what: str) -> None:
    """Refuse one of our stores that holds another kind of data than ``what`` takes (``allowed``
    roles): e.g. labels or a weight map given as the raw image, read as if it were one.
    Stores of other tools are not judged here (their values are checked where they are read)."""
    refuse_role(meta.path, store_role(meta.attrs), allowed, what)


def refuse_role(path: str | Path, role: str | None, allowed: Sequence[str], what: str) -> None:
    """:func:`check_role` for a store whose role is known (:func:`store_role`)."""
    if role is None or role in allowed:
        return
    command = next((c for r, _, c in _ROLE_MARKS if r == role), "ingest")
    raise InputError(path, f"holds {role} (written by `unet-pipe {command}`), but {what} takes "
                     f"{' or '.join(allowed)}")


def own_attributes(attrs: dict) -> dict:
    """The ``unet_pipe`` attributes of a group ({} for a store of another tool)."""
    own = attrs.get(ATTRS_KEY)
    return own if isinstance(own, dict) else {}


def describe(path: str | Path) -> str:
    """A one-line human summary of an OME-Zarr image (used by the CLI)."""
    meta = image_metadata(path)
    return json.dumps(
        {
            "path": str(meta.path),
            "ngff": meta.ngff,
            "shape": meta.shape,
            "dtype": str(meta.dtype),
            "chunks": meta.chunks,
            "voxel_size_um": meta.voxel_size,
            "levels": meta.levels + 1,
        }
    )
