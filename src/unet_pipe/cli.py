"""Command-line interface: thin argparse wrappers around the library.

Each stage is one subcommand (``unet-pipe STAGE --help``).  A user mistake
(bad file, bad config, foreign checkpoint) is printed as one line
``unet-pipe: error: <file>: <problem>`` with exit status 2, never a traceback.
This module holds the parser, the options and checks the subcommands share, the
error handling and the postprocess/evaluate/report subcommands; the others are
registered from ``cli_data`` (synth, ingest, info, weights), ``cli_config``
(check-config, install-profile), ``cli_model`` (train, predict),
``cli_calibrate``, ``cli_view``, ``cli_export`` and ``cli_segment`` (segment,
bundle, summarize).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from unet_pipe import __version__
from unet_pipe.cli_calibrate import add_calibrate
from unet_pipe.cli_config import add_check_config, add_install_profile
from unet_pipe.cli_data import add_info, add_ingest, add_synth, add_weights
from unet_pipe.cli_export import add_export
from unet_pipe.cli_view import add_view
from unet_pipe.cli_model import add_predict, add_train
from unet_pipe.cli_segment import add_bundle, add_segment, add_summarize, add_tiff
from unet_pipe.determinism import help_text
from unet_pipe.errors import UnetPipeError, error_lines

log = logging.getLogger("unet_pipe")


def load_config(path: str | None) -> dict | None:
    if path is None:
        return None
    from unet_pipe.config import load_config

    return load_config(path, check_inputs=False)


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


# ------------------------------------------------------------ postprocess


def _add_postprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "postprocess",
        help="instances from cell probabilities (threshold or seeded watershed), per slice",
        description=(
            "Segment each z slice of PROB (cell probability, float or uint8 = p*255) into instances: "
            "'threshold' labels the 4-connected components of p > THRESHOLD; 'watershed' splits them "
            "further by a watershed on 1 - p, seeded by the distance-transform maxima (prominence >= "
            "SEED_PROMINENCE px) of the confident region p > SEED_THRESHOLD. "
            "Writes uint32 ids unique across the stack (0 = membrane) to DEST as an OME-Zarr label "
            "image with the chunks of PROB. An interrupted run resumes where it stopped."
        ),
        epilog=help_text("postprocess"),
    )
    p.add_argument("probabilities", metavar="PROB.ome.zarr", type=Path)
    p.add_argument("dest", metavar="DEST.ome.zarr", type=Path)
    p.add_argument("--method", choices=("threshold", "watershed"), default="threshold")
    p.add_argument("--threshold", type=float, default=0.5, help="cell where p > THRESHOLD (default 0.5)")
    p.add_argument(
        "--seed-threshold", type=float, default=0.9, help="watershed: confident cell region p > this (default 0.9)"
    )
    p.add_argument(
        "--seed-prominence", type=float, default=5.0,
        help="watershed: pixels a distance maximum must rise above its saddle to seed a cell "
        "(default 5; about a quarter of the cell radius)",
    )
    p.add_argument("--min-size", type=int, default=0, help="segments smaller than this (pixels) become membrane")
    p.add_argument(
        "--decisions", type=Path, metavar="decisions.json",
        help="take method, thresholds, seeds and min size from `unet-pipe calibrate`'s decisions.json, or from a "
        "model that carries them (`unet-pipe bundle`, an exported .zip), instead of the options",
    )
    p.add_argument(
        "--instances", choices=("2d", "3d"), default=None,
        help="2d (default): each slice on its own; 3d: 6-connected objects across slices, labelled block by block "
        "with ids unique across the volume (min size in voxels; watershed seeds: components of p > SEED_THRESHOLD)",
    )
    p.add_argument("--block", nargs=3, type=int, metavar=("Z", "Y", "X"),
                   help="3d: labelling block, multiples of PROB's chunks (default: the chunks grown to ~4 Mvoxels)")
    p.add_argument("--halo", type=int, default=32,
                   help="3d watershed: voxels added on each side of a block for its flood (default 32); exact where "
                   "every mask component near the block fits in the grown block")
    p.add_argument("--threads", type=int, default=1, help="3d: blocks labelled at once (the result does not depend on it)")
    p.add_argument("--step", choices=("all", "prepare", "faces", "merge", "write", "flood", "finalize"), default="all",
                   help="3d: one stage of a sharded run (prepare, then faces/merge/write/flood, then finalize)")
    p.add_argument("--shard", nargs=2, type=int, metavar=("I", "N"),
                   help="3d with --step faces/write/flood: every N-th block from the I-th (0-based)")
    p.add_argument("--pyramid-levels", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace DEST once the new store is complete")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming DEST.partial")
    add_ngff_option(p)
    p.set_defaults(func=_cmd_postprocess)


def _cmd_postprocess(args: argparse.Namespace) -> int:
    from unet_pipe.postprocess import postprocess

    if args.decisions is not None:
        from unet_pipe.model_bundle import read_any_decisions

        chosen = read_any_decisions(args.decisions)
        for key in ("method", "threshold", "seed_threshold", "seed_prominence", "min_size"):
            setattr(args, key, chosen[key])
        if args.instances is None:
            args.instances = chosen.get("instances", "2d")
        elif args.instances != chosen.get("instances", "2d"):
            raise UnetPipeError(args.decisions, f"the decisions were calibrated for instances "
                                f"{chosen.get('instances', '2d')}, not --instances {args.instances}")
        log.info("decisions from %s: %s", args.decisions, {k: chosen[k] for k in ("method", "threshold", "min_size")})
    if not 0.0 <= args.threshold <= args.seed_threshold <= 1.0:
        raise UnetPipeError(None, "need 0 <= --threshold <= --seed-threshold <= 1")
    check_option("--seed-prominence", args.seed_prominence, 0, above=True)
    check_option("--min-size", args.min_size, 0)  # above the slice area: refused by postprocess()
    check_option("--pyramid-levels", args.pyramid_levels, 0, MAX_PYRAMID_LEVELS)
    instances = args.instances or "2d"
    options_3d: dict = {}
    if instances == "3d":
        check_option("--block", args.block, 1, 1 << 30)
        check_option("--halo", args.halo, 0, 1 << 20)
        check_option("--threads", args.threads, 1, MAX_THREADS)
        options_3d = {"block": args.block, "halo": args.halo, "workers": args.threads, "step": args.step,
                      "shard": None if args.shard is None else tuple(args.shard)}
    else:
        given = [flag for flag, value in (("--block", args.block), ("--shard", args.shard),
                                          ("--step", args.step != "all" or None)) if value]
        if given:
            raise UnetPipeError(None, f"{', '.join(given)} need --instances 3d")
    postprocess(
        args.probabilities,
        args.dest,
        method=args.method,
        threshold=args.threshold,
        seed_threshold=args.seed_threshold,
        seed_prominence=args.seed_prominence,
        min_size=args.min_size,
        pyramid_levels=args.pyramid_levels,
        overwrite=args.overwrite,
        resume=not args.no_resume,
        progress=progress_enabled(args),
        ngff=ngff_choice(args, None),
        instances=instances,
        **options_3d,
    )
    return 0


# --------------------------------------------------------------- evaluate


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score instances (and probabilities) against ground truth",
        description=(
            "Per-slice and summary metrics as in ISBI 2012: pixel error (from --probabilities), "
            "foreground-restricted Rand error (1 - V_rand) and variation of information (from the "
            "instances), and foreground IoU. Writes OUT (JSON) and OUT with suffix .csv (one row per slice)."
        ),
    )
    p.add_argument("--prediction", required=True, type=Path, metavar="INST.ome.zarr", help="instances (0 = membrane)")
    p.add_argument("--truth", required=True, type=Path, metavar="LABELS.ome.zarr")
    p.add_argument("--out", required=True, type=Path, metavar="metrics.json")
    p.add_argument("--probabilities", type=Path, metavar="PROB.ome.zarr", help="cell probabilities for the pixel error")
    p.add_argument("--raw", type=Path, metavar="RAW.ome.zarr", help="raw image, recorded for the report's figures")
    p.add_argument("--dataset", help="name shown in the report (default: the folder holding --prediction)")
    p.add_argument("--slices", nargs=2, type=int, metavar=("START", "STOP"), help="evaluate z in [START, STOP) only")
    p.add_argument("--train", nargs=2, type=int, metavar=("START", "STOP"), help="tag [START, STOP) as training slices")
    p.add_argument("--val", nargs=2, type=int, metavar=("START", "STOP"), help="tag [START, STOP) as held-out slices")
    p.add_argument("--threshold", type=float, default=0.5, help="cell where p > THRESHOLD for the pixel error")
    p.add_argument(
        "--decisions", type=Path, metavar="decisions.json",
        help="use the calibrated cell threshold (`unet-pipe calibrate`) and record the decisions",
    )
    p.add_argument(
        "--truth-mode", choices=("binary", "instances"), default="binary",
        help="binary: 0 = membrane, cells = --foreground-value (default nonzero), instances by connected "
        "components per slice; instances: truth holds ids (0 = membrane)",
    )
    p.add_argument("--foreground-value", type=int, default=None, help="cell value of binary truth (default: nonzero)")
    p.add_argument(
        "--unlabelled-value", type=int, metavar="V", help="truth value of unannotated pixels, left out of every score"
    )
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from unet_pipe.evaluate import evaluate

    check_option("--threshold", args.threshold, 0, 1)
    if args.out.suffix == ".csv":  # the per-slice CSV goes to OUT with suffix .csv: it would replace OUT
        raise UnetPipeError(args.out, "--out must not end in .csv (the per-slice table is written there); use .json")
    decisions = None
    if args.decisions is not None:
        from unet_pipe.calibrate import read_decisions

        decisions = read_decisions(args.decisions)
        args.threshold = decisions["cell_threshold"]
    evaluate(
        args.prediction,
        args.truth,
        args.out,
        probabilities=args.probabilities,
        raw=args.raw,
        dataset=args.dataset,
        slices=args.slices,
        train_slices=args.train,
        val_slices=args.val,
        threshold=args.threshold,
        truth_mode=args.truth_mode,
        foreground_value=args.foreground_value,
        unlabelled_value=args.unlabelled_value,
        decisions=decisions,
        progress=progress_enabled(args),
    )
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".csv"))
    return 0


# ----------------------------------------------------------------- report


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="Markdown report with metric tables, slice figures and training curves",
        description=(
            "Write OUT (Markdown) and its PNG figures in OUT_STEM_figures/ from metrics files of "
            "`unet-pipe evaluate` (figures read the stores recorded in them) and training log CSVs."
        ),
    )
    p.add_argument("--metrics", nargs="+", type=Path, metavar="metrics.json")
    p.add_argument("--summaries", nargs="+", type=Path, metavar="summary.json",
                   help="instead of --metrics: summaries of unlabelled stacks (`unet-pipe summarize`): one table "
                   "over all, raw/probability/instance panels with a scale bar and size histograms per stack")
    p.add_argument("--out", required=True, type=Path, metavar="report.md")
    p.add_argument("--training-log", nargs="*", default=[], type=Path, metavar="train.csv")
    p.add_argument("--figures", type=int, default=3, help="slices shown per dataset (default 3; 0 = none)")
    p.add_argument("--title", default="unet-pipe evaluation")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from unet_pipe.report import write_report

    check_option("--figures", args.figures, 0)  # more than the slices: all of them
    if (args.metrics is None) == (args.summaries is None):
        raise UnetPipeError(None, "give either --metrics (labelled data) or --summaries (unlabelled), not both")
    if args.summaries is not None:
        from unet_pipe.summary import write_summary_report

        title = "unet-pipe segmentation" if args.title == "unet-pipe evaluation" else args.title
        write_summary_report(args.out, args.summaries, figures=args.figures, title=title)
        log.info("wrote %s", args.out)
        return 0
    write_report(args.out, args.metrics, training_logs=args.training_log, figures=args.figures, title=args.title)
    log.info("wrote %s", args.out)
    return 0


# ---------------------------------------------------------------------- driver

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_synth,
    add_ingest,
    add_check_config,
    add_install_profile,
    add_info,
    add_weights,
    add_train,
    add_calibrate,
    _add_postprocess,
    _add_evaluate,
    _add_report,
    add_predict,
    add_view,
    add_export,
    add_bundle,
    add_segment,
    add_summarize,
    add_tiff,
]


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress unless --quiet: a bar on a terminal, else a line per 30 s (unet_pipe.progress)."""
    return not args.quiet


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in the project's one-line form (exit 2, as argparse does)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("unet-pipe").strip()  # "predict", or "" for the top level
        line = UnetPipeError(command or None, f"{message} (see {self.prog} --help)")
        self.exit(2, f"unet-pipe: error: {line}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unet-pipe", description="U-Net segmentation of EM stacks (Ronneberger et al. 2015), stage by stage.",
        epilog="@FILE anywhere on the command line stands for the arguments in FILE, one per line "
               "(the workflow passes each job's settings so; see results/logs/args/).",
        # The workflow's rules hand their options over as @FILE: a short, readable command line.
        fromfile_prefix_chars="@",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:  # third-party chatter only at -vv
        for name in ("distributed", "numcodecs", "matplotlib", "PIL", "asyncio"):
            logging.getLogger(name).setLevel(logging.WARNING)


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
def _guard_outputs(args: argparse.Namespace):
    """Refuse outputs that overlap inputs; hold a lock on DEST (or --out) while writing."""
    from unet_pipe.integrity import CorruptChunk
    from unet_pipe.safety import DestLock, check_dest, check_not_inside_store, leftover_note

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        with _guard_outputs(args):
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
