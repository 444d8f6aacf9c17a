"""Project exception types.

Every user mistake (bad file, bad config, foreign checkpoint) is raised as a
:class:`UnetPipeError` whose message names the file and the problem.  The CLI
prints ``unet-pipe: error: <message>`` on one line and exits non-zero, never a
traceback.
"""
from __future__ import annotations

from pathlib import Path


class UnetPipeError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class InputError(UnetPipeError):
    """An input file (TIFF, OME-Zarr) is missing, corrupt or inconsistent."""


class ConfigError(UnetPipeError):
    """The configuration is invalid (unknown key, wrong type, missing input)."""


class CheckpointError(UnetPipeError):
    """A checkpoint is foreign, malicious or of a different architecture."""


class OutputError(UnetPipeError):
    """An output path holds something that must not be overwritten."""
