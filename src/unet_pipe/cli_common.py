"""What every subcommand shares: option checks and parsers, the config loader, and the guard that
turns a failure into one line ``unet-pipe: error: <file>: <problem>`` (exit 2).

The stage modules ``cli_<stage>`` import from here; :mod:`unet_pipe.cli` builds the parser from
them and dispatches, so nothing here imports a stage.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

from unet_pipe.config import load_config as _load_config_file
from unet_pipe.errors import UnetPipeError, error_lines
from unet_pipe.integrity import CorruptChunk
from unet_pipe.safety import DestLock, check_dest, check_not_inside_store, leftover_note

log = logging.getLogger("unet_pipe")


def load_config(path: str | None) -> dict | None:
    if path is None:
        return None
    return _load_config_file(path, check_inputs=False)


def add_ngff_option(p: argparse.ArgumentParser) -> None:
    """``--ngff``: the OME-Zarr flavour of the store a command writes."""
    p.add_argument("--ngff", choices=("0.4", "0.5"), default=None,
                   help="0.4: zarr format 2, read by every OME-Zarr viewer (default: the config's ngff_version, "
                        "else 0.4); 0.5: zarr format 3")


def ngff_choice(args: argparse.Namespace, config: dict | None) -> str:
    """The flag, else the config's ``ngff_version``, else 0.4."""
    return args.ngff or (config or {}).get("ngff_version") or "0.4"


#: More threads than this is a typo, not a machine (torch crashed at 100000).
MAX_THREADS = 1024
MAX_PYRAMID_LEVELS = 16


def check_option(option: str, value: float | Sequence[float] | None, low: float | None = None,
                 high: float | None = None, *, above: bool = False) -> None:
    """Refuse a numeric option that is not finite or lies outside [low, high] (``above``: > low).

    Called by every subcommand for its counts, sizes and thresholds, so that a
    zero, a negative, NaN, inf or an absurd value is one line and exit 2 before
    any work, never a traceback or a silently empty result.
    """
    if value is None:
        return
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        bad = not math.isfinite(v) or (low is not None and (v <= low if above else v < low))
        if bad or (high is not None and v > high):
            if low is not None and high is not None:
                wanted = f"in {'(' if above else '['}{low:g}, {high:g}]"
            elif low is not None:
                wanted = f"{'>' if above else '>='} {low:g}"
            else:
                wanted = f"<= {high:g}"
            shown = " ".join(str(x) for x in values)
            raise UnetPipeError(None, f"{option} must be a finite number {wanted}, got {shown}")


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress unless --quiet: a bar on a terminal, else a line per 30 s (unet_pipe.progress)."""
    return not args.quiet


_OUTPUT_ARGS = ("dest", "out", "preview", "log", "out_dir", "tensorboard")


_INPUT_ARGS = ("src", "labels", "probabilities", "checkpoint", "raw", "like", "prediction", "truth", "path",
               "weights", "metrics", "training_log", "decisions", "model", "inputs", "instances", "summaries")


def _paths(value: object) -> list[Path]:
    if isinstance(value, Path):
        return [value]
    if isinstance(value, str) and "=" in value:  # train's NAME=PATH
        return [Path(value.partition("=")[2])]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return []


@contextlib.contextmanager
def guard_outputs(args: argparse.Namespace):
    """Refuse outputs that overlap inputs; hold a lock on DEST (or --out) while writing."""
    inputs = [p for name in _INPUT_ARGS for p in _paths(getattr(args, name, None))]
    outputs = [p for name in _OUTPUT_ARGS for p in _paths(getattr(args, name, None))]
    for i, out in enumerate(outputs):
        check_dest(out, inputs)
        check_not_inside_store(out)
        # Two outputs of one command in one place (train --log equal to --out): one would replace the other.
        check_dest(out, outputs[i + 1:], kind="output")
    main_out = getattr(args, "dest", None) or getattr(args, "out", None)
    if not isinstance(main_out, Path):
        yield
        return
    # Shards of one predict write disjoint regions of one staging store at once: no lock there.
    shard = bool(getattr(args, "shard", None) or getattr(args, "z_range", None))
    started = time.time() - 1  # mtimes may be coarser than the clock
    with contextlib.nullcontext() if shard else DestLock(main_out):
        try:
            yield
        except (UnetPipeError, OSError) as exc:
            # Say on the error line what the failure left: a resumable staging folder, or nothing.
            # A chunk that failed to decode outside open_image (which names the input store) is
            # one of our staging store's: it is damaged, and resuming it would fail again.
            damaged = isinstance(exc, CorruptChunk) and exc.path is None
            exc.leftover = leftover_note(  # type: ignore[union-attr]
                main_out, since=started, remove_empty=not shard, damaged=damaged
            )
            raise


def parse_chunks(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunks must be Z,Y,X integers, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"chunks must be three positive integers Z,Y,X, got {text!r}")
    return parts  # type: ignore[return-value]


def parse_compression(text: str) -> dict:
    cname, _, rest = text.partition(":")
    level, _, blocksize = rest.partition(":")
    if (
        cname not in ("zstd", "lz4", "lz4hc", "zlib", "blosclz")
        or not level.isdigit()
        or not 0 <= int(level) <= 9
        or (blocksize and not blocksize.isdigit())
    ):
        raise argparse.ArgumentTypeError(
            "compression must be CODEC:LEVEL[:BLOCKSIZE] (codec zstd|lz4|lz4hc|zlib|blosclz, level 0-9, "
            f"Blosc block size in bytes, 0 = automatic), got {text!r}"
        )
    return {"cname": cname, "clevel": int(level), **({"blocksize": int(blocksize)} if blocksize else {})}


def check_voxel_size(values: Sequence[float] | None) -> None:
    if values is not None and not all(math.isfinite(v) and v > 0 for v in values):
        raise UnetPipeError(None, f"--voxel-size must be three finite positive numbers, got {' '.join(map(str, values))}")


def named_values(values: list[str], option: str, what: str = "PATH") -> dict[str, str]:
    """``NAME=VALUE`` options (repeatable) as a dict; a malformed or repeated NAME is one line."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise UnetPipeError(None, f"{option} expects NAME={what}, got {value!r}")
        if name in out:
            raise UnetPipeError(None, f"{option} names dataset {name!r} twice")
        out[name] = rest
    return out


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed subcommand under :func:`guard_outputs`; a user mistake or a failing
    environment becomes one line on stderr and exit 2, an interrupt exit 130."""
    try:
        with guard_outputs(args):
            return int(args.func(args) or 0)
    except UnetPipeError as exc:
        lines = error_lines(exc)
        lines[-1] += getattr(exc, "leftover", "")
        print("\n".join(lines), file=sys.stderr)
        return 2
    except OSError as exc:
        # The environment, not a bug: a full disk (ENOSPC), a folder made read-only, an I/O error.
        where = exc.filename or getattr(args, "dest", None) or getattr(args, "out", None)
        line = UnetPipeError(where, exc.strerror or f"{type(exc).__name__}: {exc}")
        print(f"unet-pipe: error: {line}{getattr(exc, 'leftover', '')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unet-pipe: interrupted", file=sys.stderr)
        return 130


DECISION_OPTIONS = ("method", "threshold", "seed_threshold", "seed_prominence", "min_size")


def add_decision_options(p: argparse.ArgumentParser, default_text: str) -> None:
    """The instance options of ``postprocess``, unset by default (then: ``default_text``)."""
    p.add_argument("--decisions", type=Path, metavar="FILE",
                   help="decisions.json of `unet-pipe calibrate`, or a model carrying decisions "
                        f"(default: {default_text})")
    p.add_argument("--method", choices=("threshold", "watershed"), default=None,
                   help="instance method (replaces the decisions' one)")
    p.add_argument("--threshold", type=float, default=None, help="cell where p > THRESHOLD")
    p.add_argument("--seed-threshold", type=float, default=None, help="watershed: confident region p > this")
    p.add_argument("--seed-prominence", type=float, default=None,
                   help="watershed: pixels a distance maximum must rise above its saddle to seed a cell")
    p.add_argument("--min-size", type=int, default=None, help="segments smaller than this (pixels) become membrane")


def decision_overrides(args: argparse.Namespace) -> dict:
    given = {k: getattr(args, k) for k in DECISION_OPTIONS if getattr(args, k) is not None}
    for key in ("threshold", "seed_threshold"):
        check_option(f"--{key.replace('_', '-')}", given.get(key), 0, 1)
    check_option("--seed-prominence", given.get("seed_prominence"), 0, above=True)
    check_option("--min-size", given.get("min_size"), 0)
    return given
