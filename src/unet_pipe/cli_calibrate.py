"""Command line of the calibration stage: ``unet-pipe calibrate`` (thin wrapper)."""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from unet_pipe.calibrate import DEFAULT_MAX_PIXELS, calibrate
from unet_pipe.cli_common import check_option, named_values, progress_enabled
from unet_pipe.errors import UnetPipeError
from unet_pipe.postprocess import METHODS

log = logging.getLogger("unet_pipe")


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose the cell threshold and instance method on labelled calibration slices",
        description=(
            "Choose the decisions that postprocess and evaluate use (cell threshold; threshold + "
            "connected components or seeded watershed with its seeds and minimum size) from the "
            "predicted probabilities of labelled slices, by the rule documented in "
            "unet_pipe.calibrate: the best mean foreground-restricted Rand score, ties by pixel "
            "error. Writes OUT (JSON) with every candidate tried and its scores."
        ),
    )
    for key, what in (("probabilities", "predicted cell probabilities"), ("truth", "label store")):
        p.add_argument(
            f"--{key}", action="append", default=[], required=True, metavar="NAME=PATH",
            help=f"{what} of dataset NAME (repeatable)",
        )
    p.add_argument(
        "--slices", action="append", default=[], required=True, metavar="NAME=START:STOP",
        help="calibration slices [START, STOP) of dataset NAME (repeatable)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="decisions.json")
    p.add_argument("--truth-mode", choices=("binary", "instances"), default="binary")
    p.add_argument("--foreground-value", type=int, default=255, help="cell value of binary truth (default 255)")
    p.add_argument(
        "--unlabelled-value", type=int, metavar="V", help="truth value of unannotated pixels, left out of every score"
    )
    p.add_argument(
        "--methods", default="threshold,watershed", help="instance methods to consider (default: threshold,watershed)"
    )
    p.add_argument(
        "--instances", choices=("2d", "3d"), default="2d",
        help="2d: choose slice by slice (postprocess's default); 3d: each range as one volume, scored by the 3D "
        "adapted Rand error, for postprocess --instances 3d (the decisions say so)",
    )
    p.add_argument(
        "--max-pixels", type=int, metavar="N",
        help="score at most N pixels, sampled by a fixed rule when the slices hold more (default 4194304; 0: all)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    prob = named_values(args.probabilities, "--probabilities")
    truth = named_values(args.truth, "--truth")
    slices = named_values(args.slices, "--slices", "START:STOP")
    if not set(prob) == set(truth) == set(slices):
        raise UnetPipeError(None, "--probabilities, --truth and --slices must name the same datasets")
    datasets = {}
    for name in prob:
        match = re.fullmatch(r"(\d+):(\d+)", slices[name])
        if not match or int(match[1]) >= int(match[2]):
            raise UnetPipeError(None, f"--slices {name}={slices[name]}: expected START:STOP with START < STOP")
        datasets[name] = {"probabilities": prob[name], "truth": truth[name], "slices": [int(match[1]), int(match[2])]}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise UnetPipeError(None, f"--methods must list some of {', '.join(METHODS)}, got {args.methods!r}")
    check_option("--max-pixels", args.max_pixels, 0, 1 << 40)
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    calibrate(
        datasets, args.out, truth_mode=args.truth_mode, foreground_value=args.foreground_value, methods=methods,
        unlabelled_value=args.unlabelled_value, max_pixels=max_pixels, instances=args.instances,
        progress=progress_enabled(args),
    )
    log.info("wrote %s", args.out)
    return 0
