"""A view store: the raw image with its label images as NGFF ``labels/``, in one open.

Viewers that follow OME-Zarr (ome-zarr-py, and napari-ome-zarr, which is built
on it) show an image group's ``labels/`` subgroup as label layers over the
image: ``labels/.zattrs`` lists the names (``{"labels": [...]}``) and each
``labels/<name>`` is a multiscales group with ``image-label`` metadata whose
``source.image`` ("../../") leads back to the image.

The pipeline's stores are separate Snakemake outputs, and NGFF dataset paths
must stay inside their group, so a label group cannot point at another store.
Copying every level would double the disk use; writing into ``raw.ome.zarr``
would change an input of every other rule.  ``build_view`` therefore writes a
separate, small store whose metadata is its own and whose arrays are *relative
symbolic links* to the levels of the published stores::

    view.ome.zarr/.zattrs            multiscales of raw (+ our marker; zarr.json in 0.5)
    view.ome.zarr/0 -> ../raw.ome.zarr/0
    view.ome.zarr/labels/.zattrs     {"labels": ["labels", "instances"]}
    view.ome.zarr/labels/instances/.zattrs   multiscales + image-label
    view.ome.zarr/labels/instances/0 -> ../../../instances.ome.zarr/0

Relative links keep the view valid when the results folder is moved or
copied as a whole (``cp -r``, ``rsync -a``); ``copy=True`` writes real
copies instead, for object stores, archives or file systems without links.
The view has the NGFF version of the stores it shows (0.4: ``.zattrs``; 0.5:
``zarr.json`` with the NGFF keys under ``ome``): a zarr group cannot hold
arrays of another zarr format, so raw and label stores of different versions
are refused.  Only integer images can be label layers (NGFF 0.4 requires integer label
data; napari's Labels layer refuses floats): the float probabilities stay a
separate store that is opened next to the view.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np

from unet_pipe.errors import InputError, OutputError
from unet_pipe.ngff import group_attributes, image_metadata, write_group
from unet_pipe.safety import (
    STAGING_MARKER,
    check_replaceable,
    is_our_staging,
    mark_staging,
    recover_swap,
    remove_staging,
    replace_with,
)

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _place_levels(src: Path, dest: Path, multiscales: dict, copy: bool) -> None:
    """Link (or copy) every dataset of ``src``'s multiscales into ``dest`` under the same name."""
    for dataset in multiscales["datasets"]:
        name = dataset["path"]
        if copy:
            shutil.copytree(src / name, dest / name)
        else:
            # Relative to the link's own folder: the view survives moving the results together.
            # Both ends resolved: the kernel follows a relative link from the folder it really
            # lies in, so a path written through a symlinked folder would point elsewhere.
            target = os.path.relpath((src / name).resolve(), (dest / name).parent.resolve())
            os.symlink(target, dest / name, target_is_directory=True)


def build_view(
    raw: str | Path,
    dest: str | Path,
    labels: Mapping[str, str | Path],
    *,
    copy: bool = False,
    overwrite: bool = False,
    unlabelled: Mapping[str, int] | None = None,
) -> Path:
    """Write ``dest``: the image ``raw`` with each ``labels[name]`` as its label layer ``name``.

    Every label store must be an integer image of raw's voxel size (z, y, x in
    micrometres) that lies inside raw: of raw's shape, or a crop of it whose
    offset (``unet_pipe.offset``) is kept as its NGFF translation.
    ``unlabelled[name]``: the value of unannotated pixels in layer ``name``
    (sparse labels), shown transparent (NGFF ``image-label`` colour).  Nothing
    in ``raw`` or the label stores is changed.  Returns ``dest``.
    """
    raw, dest = Path(raw), Path(dest)
    meta = image_metadata(raw)
    checked: dict[str, tuple[Path, dict]] = {}
    for name, path in labels.items():
        if not name or not set(name) <= _NAME_CHARS or name.startswith("."):
            raise InputError(Path(path), f"label name {name!r} must be letters, digits, '_', '-' or '.'")
        if name in checked:
            raise InputError(Path(path), f"label name {name!r} given twice")
        label = image_metadata(path)
        # Labels of a crop (ingested with labels_offset) record their offset and carry the NGFF
        # translation that places them in the view; any other label image has raw's shape.
        if label.offset == (0, 0, 0) and label.shape != meta.shape:
            raise InputError(label.path, f"shape {label.shape} differs from {meta.shape} of {raw}")
        if any(o + s > n for o, s, n in zip(label.offset, label.shape, meta.shape)):
            raise InputError(label.path, f"shape {label.shape} at offset {list(label.offset)} does not lie inside "
                             f"{meta.shape} of {raw}")
        if not np.allclose(label.voxel_size, meta.voxel_size, rtol=1e-6):
            raise InputError(label.path, f"voxel size {label.voxel_size} differs from {meta.voxel_size} of {raw}")
        if label.dtype.kind not in "uib":
            raise InputError(label.path, f"a label layer needs integers, found dtype {label.dtype}")
        if label.ngff != meta.ngff:
            raise InputError(label.path, f"is NGFF {label.ngff} but {raw} is NGFF {meta.ngff}; a view needs one "
                             "version (rerun the stages with the same ngff_version)")
        checked[name] = (label.path, label.multiscales)
    for name in unlabelled or {}:
        if name not in checked:
            raise InputError(None, f"unlabelled value given for {name!r}, which is not a label layer")
    recover_swap(dest)  # an --overwrite swap a kill interrupted
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise OutputError(dest, "already exists; remove it or pass --overwrite")
    if overwrite:
        check_replaceable(dest)
    staging = dest.with_name(dest.name + ".partial")
    remove_staging(staging)  # refuses a DEST.partial that is not ours
    staging.mkdir(parents=True)
    mark_staging(staging)
    try:
        raw_ms = dict(meta.multiscales, name=dest.name)
        own = {"kind": "view", "image": str(raw), "labels": {n: str(p) for n, (p, _) in checked.items()}, "copy": copy}
        write_group(staging, group_attributes(meta.ngff, multiscales=raw_ms, own=own), meta.ngff)
        _place_levels(raw, staging, raw_ms, copy)
        if checked:
            write_group(staging / "labels", group_attributes(meta.ngff, labels=list(checked)), meta.ngff)
        for name, (path, multiscales) in checked.items():
            group = staging / "labels" / name
            image_label: dict = {"source": {"image": "../../"}}
            if unlabelled and name in unlabelled:
                # Unannotated is not a class: transparent, so the raw shows through.
                image_label["colors"] = [{"label-value": int(unlabelled[name]), "rgba": [0, 0, 0, 0]}]
            attrs = group_attributes(meta.ngff, multiscales=dict(multiscales, name=name, type="nearest"),
                                     image_label=image_label)
            write_group(group, attrs, meta.ngff)
            _place_levels(path, group, multiscales, copy)
        (staging / STAGING_MARKER).unlink()
        replace_with(staging, dest)
    except BaseException:
        if is_our_staging(staging):
            shutil.rmtree(staging, ignore_errors=True)  # removes links, never what they point to
        raise
    return dest
