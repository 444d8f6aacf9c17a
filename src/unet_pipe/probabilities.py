"""The stored probability format, both sides: how ``predict`` encodes probabilities
(:func:`encode_probabilities`, :data:`OUTPUT_DTYPES`) and how ``postprocess``, ``calibrate``
and ``evaluate`` read them (``p = stored * scale``; uint8 stores ``round(255 p)``), and the
check that refuses values that are not probabilities.  Any float OME-Zarr with
values in [0, 1], or uint8, from another tool reads the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unet_pipe.errors import InputError
from unet_pipe.io import ATTRS_KEY, image_metadata, open_image
from unet_pipe.ngff import check_role

#: The attribute (under ``unet_pipe``) that ``predict`` writes for the stored scale.
PROBABILITY_SCALE_KEY = "probability_scale"


def probability_scale(attrs: dict, dtype: np.dtype) -> float:
    """The factor from stored values back to probabilities: ``p = stored * scale``.

    Read from the attribute ``unet_pipe.probability_scale`` written by
    :mod:`unet_pipe.predict` (nested under ``unet_pipe``, or as a flat dotted
    key); otherwise inferred from the dtype: 1/255 for uint8 (stored as
    ``round(255 p)``), 1 for floats.
    """
    own = attrs.get(ATTRS_KEY, {})
    scale = own.get(PROBABILITY_SCALE_KEY) if isinstance(own, dict) else None
    if scale is None:
        scale = attrs.get(f"{ATTRS_KEY}.{PROBABILITY_SCALE_KEY}")
    if scale is not None:
        return float(scale)
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 1.0 / 255.0
    if dtype.kind == "f":
        return 1.0
    raise ValueError(f"cannot infer the probability scale of dtype {dtype}; set unet_pipe.{PROBABILITY_SCALE_KEY}")


def as_probability(data: np.ndarray, scale: float) -> np.ndarray:
    """Stored probabilities (any dtype) as float32 in [0, 1]: ``stored * scale``."""
    out = np.asarray(data, dtype=np.float32)
    if scale != 1.0:
        out = out * np.float32(scale)
    return out


def check_probabilities(p: np.ndarray, path: str | Path, where: str) -> np.ndarray:
    """``p`` (float probabilities) unchanged, or an :class:`InputError` when a value lies outside [0, 1] or is NaN."""
    if p.size:
        low, high = float(np.min(p)), float(np.max(p))
        if not (low >= 0.0 and high <= 1.0):  # NaN fails both
            raise InputError(path, f"values must be probabilities in [0, 1] (float, or uint8 = 255 p); found "
                             f"{low:g} .. {high:g} {where}")
    return p


def needs_range_check(dtype: np.dtype, scale: float) -> bool:
    """Whether stored values times ``scale`` can leave [0, 1] (not for uint8 stored as 255 p)."""
    dtype = np.dtype(dtype)
    return not (dtype.kind == "u" and np.iinfo(dtype).max * scale <= 1.0 + 1e-6)


def read_probabilities(array: Any, scale: float, path: str | Path, selection: Any, where: str) -> np.ndarray:
    """``array[selection]`` as float32 probabilities, refused (naming ``path``) when a value is not one.

    The one read of stored probabilities for stages that read them whole or by slice
    (calibrate, evaluate, summarize): a weight map or raw stack given as probabilities
    is refused by each, as postprocess refuses it.
    """
    p = as_probability(array[selection], scale)
    if needs_range_check(array.dtype, scale):
        check_probabilities(p, path, where)
    return p


def open_probabilities(path: str | Path) -> tuple[Any, float]:
    """Open a probability OME-Zarr: (level-0 zarr array, scale); checks the dtype."""
    meta = image_metadata(path)
    check_role(meta, ("probabilities",), "a probability input")
    try:
        scale = probability_scale(meta.attrs, meta.dtype)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    if not scale > 0:
        raise InputError(path, f"probability scale must be positive, got {scale}")
    return open_image(path), scale


#: Output dtypes and the factor that maps stored values back to probabilities.
OUTPUT_DTYPES: dict[str, tuple[type, float]] = {
    "float32": (np.float32, 1.0),
    "float16": (np.float16, 1.0),
    "uint8": (np.uint8, 1.0 / 255.0),
}


def encode_probabilities(probs: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities in [0, 1] as the stored dtype (uint8: ``round(255 p)``)."""
    if dtype == "uint8":
        return np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)
    return probs.astype(OUTPUT_DTYPES[dtype][0])
