"""``unet-pipe summarize``: the summary of one segmented stack (:mod:`unet_pipe.summary`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unet_pipe.summary import summarize

log = logging.getLogger("unet_pipe")


def add_summarize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summarize",
        help="summary of a segmented stack: objects, their size distribution, voxel size",
        description=(
            "Write OUT (JSON): the object count, object areas (px and µm², quantiles and a log-spaced histogram), "
            "cell fraction, voxel size, decisions and precision of the instances INST (with RAW and PROB, shown by "
            "`unet-pipe report --summaries`). Needs no ground truth."
        ),
    )
    p.add_argument("--raw", required=True, type=Path, metavar="RAW.ome.zarr")
    p.add_argument("--probabilities", required=True, type=Path, metavar="PROB.ome.zarr")
    p.add_argument("--instances", required=True, type=Path, metavar="INST.ome.zarr")
    p.add_argument("--out", required=True, type=Path, metavar="summary.json")
    p.add_argument("--dataset", help="name shown in the report (default: the folder holding INST)")
    p.set_defaults(func=_cmd_summarize)


def _cmd_summarize(args: argparse.Namespace) -> int:
    s = summarize(args.raw, args.probabilities, args.instances, args.out, dataset=args.dataset)
    log.info("wrote %s: %d objects", args.out, s["objects"])
    return 0
