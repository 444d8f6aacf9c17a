"""``unet-pipe weights``: the loss-weight maps (:mod:`unet_pipe.weights`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unet_pipe.cli_common import (
    MAX_PYRAMID_LEVELS,
    MAX_THREADS,
    add_ngff_option,
    check_option,
    load_config,
    ngff_choice,
    progress_enabled,
)
from unet_pipe.errors import UnetPipeError
from unet_pipe.weights import WeightParams, compute_weight_store, write_preview

log = logging.getLogger("unet_pipe")


def add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="the paper's loss-weight map w = w_c + w0 exp(-(d1+d2)^2 / 2 sigma^2)",
        description=(
            "Write the float32 weight map of LABELS to DEST (OME-Zarr, same chunks and voxel size): "
            "class balancing w_c = N / (2 N_class) over the whole volume plus the border term of "
            "Ronneberger et al. (2015, eq. 2) on background pixels, d1/d2 the distances (x pixels) to "
            "the nearest and second-nearest cell. Computed block by block with a halo; equal to the "
            "whole-slice result. Settings: flags, else --config's weights section, else the defaults. "
            "With --preview, also draw one slice like the paper's figure 3 (DEST may then be omitted)."
        ),
    )
    p.add_argument("labels", metavar="LABELS.ome.zarr", type=Path)
    p.add_argument("dest", metavar="DEST.ome.zarr", type=Path, nargs="?")
    p.add_argument("--w0", type=float, help="amplitude of the border term (default 10)")
    p.add_argument("--sigma", type=float, help="width of the border term in pixels (default 5)")
    p.add_argument(
        "--tolerance", type=float, help="border term set to 0 below TOLERANCE * w0 (default 1e-6); the error bound"
    )
    p.add_argument(
        "--label-mode", choices=("binary", "instances"),
        help="binary (default): 0 = membrane, FOREGROUND_VALUE = cell; instances: ids, 0 = background",
    )
    p.add_argument("--foreground-value", type=int, help="cell value of binary labels (default 255)")
    p.add_argument("--mode", choices=("2d", "3d"), help="2d (default): per slice; 3d: volumetric, voxel size")
    p.add_argument(
        "--unlabelled-value", type=int, metavar="V", help="label value of unannotated pixels (weight 0; default none)"
    )
    p.add_argument(
        "--no-class-balance", dest="class_balance", action="store_const", const=False,
        help="w_c = 1 for both classes (default: the paper's balance N / (K N_k))",
    )  # fmt: skip
    p.add_argument("--config", help="take the settings not given as flags from this config's weights section")
    p.add_argument("--threads", type=int, default=1, help="Dask threads (default 1)")
    p.add_argument("--pyramid-levels", type=int, help="default: as many as LABELS")
    p.add_argument("--preview", type=Path, metavar="PNG", help="draw raw, labels and weights of one slice")
    p.add_argument("--raw", type=Path, metavar="RAW.ome.zarr", help="raw image shown in the preview")
    p.add_argument("--slice", type=int, metavar="Z", help="slice of the preview (default: the middle one)")
    p.add_argument("--overwrite", action="store_true", help="replace DEST once the new store is complete")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming DEST.partial")
    add_ngff_option(p)
    p.set_defaults(func=_cmd_weights)


def _cmd_weights(args: argparse.Namespace) -> int:
    if args.dest is None and args.preview is None:
        raise UnetPipeError(None, "give DEST.ome.zarr, --preview PNG, or both")
    check_option("--threads", args.threads, 1, MAX_THREADS)
    check_option("--pyramid-levels", args.pyramid_levels, 0, MAX_PYRAMID_LEVELS)
    config = load_config(args.config)
    params = WeightParams.from_config(
        config["weights"] if config else None,
        w0=args.w0,
        sigma=args.sigma,
        tolerance=args.tolerance,
        label_mode=args.label_mode,
        foreground_value=args.foreground_value,
        mode=args.mode,
        unlabelled_value=args.unlabelled_value,
        class_balance=args.class_balance,
    )
    if args.dest is not None:
        summary = compute_weight_store(
            args.labels,
            args.dest,
            params,
            threads=args.threads,
            overwrite=args.overwrite,
            resume=not args.no_resume,
            pyramid_levels=args.pyramid_levels,
            progress=progress_enabled(args),
            ngff=ngff_choice(args, config),
        )
        log.info("wrote %s (class weights background, cell: %s)", args.dest, summary["class_weights"])
    if args.preview is not None:
        write_preview(args.labels, args.preview, params, weights_path=args.dest, raw_path=args.raw, z=args.slice)
        log.info("wrote %s", args.preview)
    return 0
