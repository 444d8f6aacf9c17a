"""Project exception types.

Every user mistake (bad file, bad config, foreign checkpoint) is raised as a
:class:`UnetPipeError` whose message names the file and the problem.  The CLI
prints ``unet-pipe: error: <message>`` on one line and exits non-zero, never a
traceback.
"""
from __future__ import annotations

from pathlib import Path


def _bounded(text: str, limit: int) -> str:
    text = text.replace("\r", " ").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 5] + " ..."


class UnetPipeError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else _bounded(str(path), 300)
        self.problem = _bounded(str(problem), 700)  # one readable line, whatever the input holds
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)

    def __reduce__(self) -> tuple:
        # Raised in dask or process-pool workers: must survive pickling with both fields.
        return (type(self), (self.path, self.problem))


class InputError(UnetPipeError):
    """An input file (TIFF, OME-Zarr) is missing, corrupt or inconsistent."""


class ConfigError(UnetPipeError):
    """The configuration is invalid (unknown key, wrong type, missing input)."""


class CheckpointError(UnetPipeError):
    """A checkpoint is foreign, malicious or of a different architecture."""


class OutputError(UnetPipeError):
    """An output path holds something that must not be overwritten."""


class ConfigErrors(ConfigError):
    """Every problem found in a configuration at once; the CLI prints one line per problem.

    Reads as its first problem (``path``, ``problem``, ``str``), so code that expects one
    :class:`ConfigError` keeps working; ``errors`` holds them all, in the order found.
    """

    def __init__(self, errors: list[UnetPipeError]) -> None:
        self.errors = list(errors)
        super().__init__(self.errors[0].path, self.errors[0].problem)

    def __reduce__(self) -> tuple:
        return (type(self), (self.errors,))


def error_lines(exc: UnetPipeError) -> list[str]:
    """The lines ``unet-pipe: error: <file>: <problem>`` of an error: one per problem."""
    return [f"unet-pipe: error: {err}" for err in getattr(exc, "errors", [exc])]
