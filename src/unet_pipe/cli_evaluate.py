"""``unet-pipe evaluate``: scores against ground truth (:mod:`unet_pipe.evaluate`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unet_pipe.calibrate import read_decisions
from unet_pipe.cli_common import check_option, progress_enabled
from unet_pipe.errors import UnetPipeError
from unet_pipe.evaluate import evaluate

log = logging.getLogger("unet_pipe")


def add_evaluate(sub: argparse._SubParsersAction) -> None:
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
    check_option("--threshold", args.threshold, 0, 1)
    if args.out.suffix == ".csv":  # the per-slice CSV goes to OUT with suffix .csv: it would replace OUT
        raise UnetPipeError(args.out, "--out must not end in .csv (the per-slice table is written there); use .json")
    decisions = None
    if args.decisions is not None:
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
