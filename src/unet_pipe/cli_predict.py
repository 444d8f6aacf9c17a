"""``unet-pipe predict``: cell probabilities block by block (:mod:`unet_pipe.predict`)."""
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
from unet_pipe.determinism import help_text
from unet_pipe.errors import UnetPipeError

log = logging.getLogger("unet_pipe")


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="overlap-tile inference: probabilities OME-Zarr from a checkpoint and a raw stack",
        description=(
            "Predict the foreground (cell) probability of RAW with the U-Net in CHECKPOINT into the OME-Zarr DEST "
            "(same shape, chunks and voxel size), block by block with Dask. Borders are mirrored; tiles lie on the "
            "pooling grid, so a tiled result equals the whole-slice forward pass (see Determinism below). An "
            "interrupted run resumes from its finished blocks. "
            "Sharded (e.g. SLURM) runs: --prepare once, then --shard I N per job, then --finalize."
        ),
        epilog=help_text("predict"),
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    p.add_argument("raw", metavar="RAW.ome.zarr", type=Path)
    p.add_argument("dest", metavar="DEST.ome.zarr", type=Path)
    p.add_argument("--tile", nargs="+", type=int, metavar="N",
                   help="output tile edge(s): EDGE, Y X (2D) or Z Y X (3D), multiples of the pooling factor "
                        "(default: largest that fits the free memory)")
    p.add_argument("--block", nargs=3, type=int, metavar=("Z", "Y", "X"),
                   help="voxels per Dask task, multiples of the output chunks (default: chosen from the tile)")
    p.add_argument("--batch", type=int, help="tiles per forward pass (default: as many as fit in memory, <= 16)")
    p.add_argument("--workers", type=int,
                   help="parallel workers: CPU workers share the cores (torch threads = cores / workers; default 1); "
                        "with GPUs one per GPU")
    p.add_argument("--threads", type=int, help="CPU cores to use (default: all cores this process may use)")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu or cuda")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average over the 8 rotations/flips (paper, ISBI 2012)")
    p.add_argument("--tta-flips", dest="tta", action="store_const", const="flips",
                   help="average over the 4 mirrorings (identity, flip x, flip y, both): half --tta's cost")
    p.add_argument("--dtype", choices=["float32", "float16", "uint8"], default=None,
                   help="stored dtype (uint8 = round(255 p); default float32)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                   help="auto: bfloat16 on CPUs with AMX/AVX512-BF16 and on GPUs (else float16), float32 on other "
                        "CPUs (default: the config's predict.precision, else auto)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run the blocks on this dask.distributed scheduler")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--shard", nargs=2, type=int, metavar=("I", "N"),
                       help="compute the I-th of N z ranges of a prepared run (0-based); does not publish")
    where.add_argument("--z-range", nargs=2, type=int, metavar=("A", "B"),
                       help="compute the blocks starting at z in [A, B) of a prepared run; does not publish")
    where.add_argument("--prepare", action="store_true",
                       help="create the staging store DEST.partial for --shard jobs; compute nothing")
    where.add_argument("--finalize", action="store_true", help="check every block is done and publish DEST")
    p.add_argument("--expect-arch", metavar="JSON",
                   help='fail unless the checkpoint architecture has these values, e.g. \'{"depth": 5}\'')
    p.add_argument("--pyramid-levels", type=int, default=None, help="2x (y, x) downsampled levels (default 2)")
    p.add_argument("--config", help="take tile, tta, dtype, precision and the expected architecture from this config")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DEST once the new one is complete")
    add_ngff_option(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    # torch loads with this module (~2 s): imported when the command runs, not on every `unet-pipe` call.
    from unet_pipe.predict import PredictRequest, finalize, predict, tune_allocator

    check_option("--threads", args.threads, 1, MAX_THREADS)
    check_option("--workers", args.workers, 1, MAX_THREADS)
    check_option("--batch", args.batch, 1)
    check_option("--pyramid-levels", args.pyramid_levels, 0, MAX_PYRAMID_LEVELS)
    if args.shard and not 0 <= args.shard[0] < args.shard[1]:
        raise UnetPipeError(None, f"--shard must be I N with 0 <= I < N, got {args.shard[0]} {args.shard[1]}")
    if args.z_range and not 0 <= args.z_range[0] < args.z_range[1]:
        raise UnetPipeError(None, f"--z-range must be A B with 0 <= A < B, got {args.z_range[0]} {args.z_range[1]}")

    tune_allocator()  # this process only predicts: keep big activations' pages for reuse
    config = load_config(args.config)
    section = config["predict"] if config else {}
    expected = dict(config["model"]) if config else None
    if args.expect_arch:
        try:
            expected = {**(expected or {}), **json.loads(args.expect_arch)}
        except (json.JSONDecodeError, TypeError):
            raise UnetPipeError(None, f"--expect-arch must be a JSON object, got {args.expect_arch!r}") from None
    # The flags over the config's predict section, checked here once and passed down as they are.
    request = PredictRequest(
        tile=args.tile if args.tile is not None else section.get("tile"),
        block=args.block,
        batch=args.batch,
        tta=args.tta if args.tta is not None else section.get("tta", False),
        dtype=args.dtype or section.get("dtype", "float32"),
        precision=args.precision or section.get("precision", "auto"),
        ngff=ngff_choice(args, config),
    )
    options = dict(
        pyramid_levels=args.pyramid_levels if args.pyramid_levels is not None
        else (config["ingest"]["pyramid_levels"] if config else 2),
        expected_arch=expected,
    )
    if args.finalize:
        finalize(args.checkpoint, args.raw, args.dest, request, overwrite=args.overwrite, **options)
        log.info("wrote %s", args.dest)
        return 0
    result = predict(
        args.checkpoint,
        args.raw,
        args.dest,
        request,
        workers=args.workers,
        threads=args.threads,
        device=args.device,
        scheduler=args.scheduler,
        shard=tuple(args.shard) if args.shard else None,
        z_range=args.z_range,
        prepare_only=args.prepare,
        overwrite=args.overwrite,
        progress=progress_enabled(args),
        **options,
    )
    plan = result.plan
    if plan is None:
        log.info("%s: staging store ready (%s.partial)", args.dest, args.dest.name)
        return 0
    log.info(
        "%s: %d of %d blocks computed in %.1f s (%.2f Mvox/s); tile %s, block %s, batch %d%s",
        args.dest, result.computed, result.total, result.seconds, result.voxels_per_s / 1e6,
        list(plan.tile), list(plan.block), plan.batch, ", published" if result.committed else "",
    )  # fmt: skip
    return 0
