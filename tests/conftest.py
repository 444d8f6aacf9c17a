"""Shared fixtures: real-data location, tiny stacks, CLI runner."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ISBI_DIR = Path(os.environ.get("UNET_PIPE_ISBI_DIR", REPO.parent / "shared" / "data" / "isbi2012"))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    """The ISBI 2012 stack in ../shared/data/isbi2012 (never copied into the project).

    Skipped only when the folder is absent *and* this is not CI; in CI a
    missing folder fails the test, so real-data tests never vanish silently.
    """
    if not (ISBI_DIR / "train-volume.tif").exists():
        if _in_ci():
            pytest.fail(f"ISBI 2012 data missing at {ISBI_DIR} in CI")
        pytest.skip(f"ISBI 2012 data not found at {ISBI_DIR}")
    return ISBI_DIR


@pytest.fixture
def tiny_stack() -> np.ndarray:
    """A (3, 5, 7) uint16 stack with unique values: any misplaced voxel shows."""
    return np.arange(3 * 5 * 7, dtype=np.uint16).reshape(3, 5, 7) * 7


@pytest.fixture
def run_cli(capsys):
    """Run ``unet-pipe ARGS`` in-process; return (exit code, stdout, stderr)."""
    from unet_pipe.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
