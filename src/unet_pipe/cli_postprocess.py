"""``unet-pipe postprocess``: instances from cell probabilities (:mod:`unet_pipe.postprocess`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unet_pipe.cli_common import (
    MAX_PYRAMID_LEVELS,
    MAX_THREADS,
    add_ngff_option,
    check_option,
    ngff_choice,
    progress_enabled,
)
from unet_pipe.determinism import help_text
from unet_pipe.errors import UnetPipeError
from unet_pipe.postprocess import postprocess

log = logging.getLogger("unet_pipe")


def add_postprocess(sub: argparse._SubParsersAction) -> None:
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
    if args.decisions is not None:
        # torch loads with this module (~2 s): imported when the command runs, not on every `unet-pipe` call.
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
