"""``unet-pipe report``: the Markdown report (:mod:`unet_pipe.report`, :mod:`unet_pipe.summary`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unet_pipe.cli_common import check_option
from unet_pipe.errors import UnetPipeError
from unet_pipe.report import write_report
from unet_pipe.summary import write_summary_report

log = logging.getLogger("unet_pipe")


def add_report(sub: argparse._SubParsersAction) -> None:
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
    check_option("--figures", args.figures, 0)  # more than the slices: all of them
    if (args.metrics is None) == (args.summaries is None):
        raise UnetPipeError(None, "give either --metrics (labelled data) or --summaries (unlabelled), not both")
    if args.summaries is not None:
        title = "unet-pipe segmentation" if args.title == "unet-pipe evaluation" else args.title
        write_summary_report(args.out, args.summaries, figures=args.figures, title=title)
        log.info("wrote %s", args.out)
        return 0
    write_report(args.out, args.metrics, training_logs=args.training_log, figures=args.figures, title=args.title)
    log.info("wrote %s", args.out)
    return 0
