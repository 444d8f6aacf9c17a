"""``unet-pipe bundle``: a model that carries its decisions and voxel size (:mod:`unet_pipe.model_bundle`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unet_pipe.cli_common import add_decision_options, check_voxel_size, decision_overrides

log = logging.getLogger("unet_pipe")


def add_bundle(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bundle",
        help="write the model that travels: a checkpoint carrying its decisions and voxel size",
        description=(
            "Write DEST.pt: the model of SOURCE (a checkpoint or a unet-pipe bioimage.io zip) without its optimiser "
            "state, carrying the decisions (from --decisions decisions.json, or the instance options; default: "
            "those SOURCE carries) and the voxel size it was trained at, so that `unet-pipe segment`, `postprocess "
            "--decisions DEST.pt` and `export` apply it as calibrated. A plain checkpoint (weights_only loading)."
        ),
    )
    p.add_argument("checkpoint", metavar="SOURCE", type=Path)
    p.add_argument("dest", metavar="DEST.pt", type=Path)
    add_decision_options(p, "the decisions SOURCE carries, if any")
    p.add_argument("--voxel-size", nargs=3, type=float, metavar=("Z", "Y", "X"),
                   help="micrometres the model was trained at (default: recorded by train)")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it is a unet-pipe checkpoint")
    p.set_defaults(func=_cmd_bundle)


def _cmd_bundle(args: argparse.Namespace) -> int:
    # torch loads with this module (~2 s): imported when the command runs, not on every `unet-pipe` call.
    from unet_pipe.model_bundle import DEFAULT_DECISIONS, bundle_model, override_decisions, read_any_decisions

    check_voxel_size(args.voxel_size)
    overrides = decision_overrides(args)
    decisions = None
    if args.decisions is not None:
        decisions = override_decisions(read_any_decisions(args.decisions), overrides, args.decisions)
    elif overrides:  # the options alone (the workflow's postprocess section when its method is not auto)
        decisions = {**override_decisions({**DEFAULT_DECISIONS, "source": "default"}, overrides, None),
                     "source": "config"}
    bundle_model(args.checkpoint, args.dest, decisions=decisions, voxel_size=args.voxel_size,
                 overwrite=args.overwrite)
    return 0
