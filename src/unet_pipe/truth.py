"""Truth labels as every stage takes them: one set of checks for weights, train, calibrate and evaluate.

A stage that accepted what another refuses would give a wrong result with exit 0,
so the checks on truth live here and each stage calls them:

* :func:`unlabelled_problem`: ``unlabelled_value`` must be neither class (0 is
  membrane/background; in binary mode ``foreground_value`` is the cell), else
  annotated pixels silently drop out of every loss and score;
* :func:`check_binary_values`: binary truth holds only 0, the cell value and the
  unlabelled value (another value, e.g. instance ids, would silently count as membrane);
* :func:`require_annotated`: the truth a stage uses must hold an annotated pixel
  (one not equal to ``unlabelled_value``), else there is nothing to learn or score.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from unet_pipe.errors import InputError


def unlabelled_problem(label_mode: str, foreground_value: int | None, unlabelled_value: int | None) -> str | None:
    """Why ``unlabelled_value`` cannot be used with these labels, or None when it can."""
    if unlabelled_value is None:
        return None
    pick = "; pick a value the labels use for neither class"
    if unlabelled_value == 0:
        return "0 is a class value: it must differ from 0 (membrane/background)" + pick
    if label_mode == "binary" and foreground_value is not None and unlabelled_value == foreground_value:
        return f"{unlabelled_value} is a class value: it must differ from the cell value {unlabelled_value}" + pick
    return None


def check_unlabelled_value(
    where: str | Path | None, label_mode: str, foreground_value: int | None, unlabelled_value: int | None
) -> None:
    """Raise :class:`InputError` naming ``where`` when ``unlabelled_value`` is a class value."""
    problem = unlabelled_problem(label_mode, foreground_value, unlabelled_value)
    if problem:
        raise InputError(where, f"unlabelled value {unlabelled_value}: {problem}")


def check_binary_values(
    where: str | Path | None, values: np.ndarray, foreground_value: int, unlabelled_value: int | None
) -> None:
    """Raise :class:`InputError` when binary truth holds a value other than 0, the cell value or the
    unlabelled value; ``values``: the distinct values found (sorted, as :func:`numpy.unique` gives)."""
    values = np.asarray(values)
    unexpected = values[(values != 0) & (values != foreground_value) & (values != unlabelled_value)]
    if not unexpected.size:
        return
    shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
    nonzero = values[values != 0]
    hint = (f"; set foreground_value to {nonzero[0]}" if nonzero.size == 1
            else "; instance ids need label_mode 'instances'")
    raise InputError(
        where,
        f"binary labels must hold only 0 (membrane/background) and {foreground_value} (cell)"
        + ("" if unlabelled_value is None else f" and {unlabelled_value} (unlabelled)")
        + f", found values {shown}{hint}",
    )


def require_annotated(where: str | Path | None, annotated_pixels: int, unlabelled_value: int | None,
                      scope: str) -> None:
    """Raise :class:`InputError` when ``scope`` (e.g. "the evaluated slices") holds no annotated pixel."""
    if annotated_pixels == 0:
        every = "" if unlabelled_value is None else f" (every label equals the unlabelled value {unlabelled_value})"
        raise InputError(where, f"{scope} hold no annotated pixel{every}: nothing to use as truth")
