"""Applying a trained model to new stacks: ``segment`` and ``tiff`` (thin wrappers).

``segment`` runs ingest, predict, postprocess, view (and an ImageJ TIFF) on new
stacks (:mod:`unet_pipe.segment`); ``tiff`` writes instances as an ImageJ TIFF.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from unet_pipe.cli_common import (
    MAX_PYRAMID_LEVELS,
    MAX_THREADS,
    add_decision_options,
    add_ngff_option,
    check_option,
    check_voxel_size,
    decision_overrides,
    ngff_choice,
    parse_chunks,
    progress_enabled,
)
from unet_pipe.io import DEFAULT_CHUNKS
from unet_pipe.summary import size_line

log = logging.getLogger("unet_pipe")


# ---------------------------------------------------------------------- segment


def add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment new stacks with a trained model: ingest, predict, instances, view, summary in one command",
        description=(
            "Segment each INPUT (a TIFF stack, a folder of TIFF slices or an OME-Zarr image) with MODEL (a unet-pipe "
            "checkpoint, best the model.pt of a workflow run, or a bioimage.io zip exported by unet-pipe) into "
            "OUT/<input stem>/: raw, probabilities and instances as OME-Zarr, view.ome.zarr (raw with the instances "
            "as a label layer, one open in napari), summary.json (objects, their sizes, voxel size, seconds per "
            "stage) and, with --tiff, instances.tif (an ImageJ TIFF with the voxel size, for Fiji); OUT/report.md "
            "shows them all. Instances follow the decisions the model carries (calibrated on labelled slices); the "
            "options below replace them. A killed run resumes where it stopped when run again."
        ),
    )
    p.add_argument("model", metavar="MODEL", type=Path, help="checkpoint (.pt) or bioimage.io package (.zip)")
    p.add_argument("inputs", metavar="INPUT", type=Path, nargs="+", help="TIFF, folder of TIFF slices or OME-Zarr")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (one subfolder per input)")
    p.add_argument("--tiff", action="store_true", help="also write instances.tif (ImageJ, with the voxel size)")
    add_decision_options(p, "the decisions the model carries, else p > 0.5 with a warning")
    p.add_argument("--instances", choices=("2d", "3d"), default=None,
                   help="2d: each slice on its own; 3d: 6-connected objects across slices, ids unique in the volume "
                   "(min size in voxels); default: what the decisions were calibrated for, else 2d")
    p.add_argument("--block", nargs=3, type=int, metavar=("Z", "Y", "X"),
                   help="3d: labelling block, multiples of the chunks (default: the chunks grown to ~4 Mvoxels)")
    p.add_argument("--halo", type=int, default=32,
                   help="3d watershed: voxels added on each side of a block for its flood (default 32)")
    p.add_argument("--voxel-size", nargs=3, type=float, metavar=("Z", "Y", "X"),
                   help="micrometres, for every INPUT (default: each file's metadata, else the model's)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on CPUs with AMX/AVX512-BF16 and on GPUs, else float32")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU cores to use (default: all this process may use)")
    p.add_argument("--workers", type=int, help="parallel predict workers (default 1; with GPUs one per GPU)")
    p.add_argument("--tile", nargs="+", type=int, metavar="N", help="predict's output tile (default: largest that fits)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="average over the 8 rotations/flips (8x the compute)")
    p.add_argument("--dtype", choices=["float32", "float16", "uint8"], default="float32",
                   help="stored probability dtype (uint8 = round(255 p), a quarter of the space)")
    p.add_argument("--chunks", type=parse_chunks, default=None, help="Z,Y,X chunks of the stores (default 1,512,512)")
    p.add_argument("--pyramid-levels", type=int, default=2, help="2x (y, x) downsampled levels (default 2)")
    p.add_argument("--figures", type=int, default=1, help="slices shown per input in OUT/report.md (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs of an earlier run with another input, model or options (ours only)")
    add_ngff_option(p)
    p.set_defaults(func=_cmd_segment)


def _cmd_segment(args: argparse.Namespace) -> int:
    # torch loads with this module (~2 s): imported when the command runs, not on every `unet-pipe` call.
    from unet_pipe.model_bundle import override_decisions, read_any_decisions
    from unet_pipe.segment import segment

    check_option("--threads", args.threads, 1, MAX_THREADS)
    check_option("--workers", args.workers, 1, MAX_THREADS)
    check_option("--pyramid-levels", args.pyramid_levels, 0, MAX_PYRAMID_LEVELS)
    check_option("--figures", args.figures, 0, 100)
    check_option("--tile", args.tile, 1)
    check_option("--block", args.block, 1, 1 << 30)
    check_option("--halo", args.halo, 0, 1 << 20)
    check_voxel_size(args.voxel_size)
    overrides = decision_overrides(args)
    decisions = None
    if args.decisions is not None:  # a file, with the options over it; else the model's, with them over it
        decisions = override_decisions(read_any_decisions(args.decisions), overrides, args.decisions)
    summaries = segment(
        args.model, args.inputs, args.out,
        decisions=decisions, decision_overrides=overrides, tiff=args.tiff,
        voxel_size=args.voxel_size, precision=args.precision, device=args.device, threads=args.threads,
        workers=args.workers, tile=args.tile, tta=args.tta, dtype=args.dtype,
        chunks=args.chunks or DEFAULT_CHUNKS, pyramid_levels=args.pyramid_levels, ngff=ngff_choice(args, None),
        figures=args.figures, overwrite=args.overwrite, progress=progress_enabled(args),
        instances=args.instances, block=args.block, halo=args.halo,
    )  # fmt: skip
    for s in summaries:  # one line per input on stdout: the short summary
        total = sum(v for v in s["seconds"].values() if isinstance(v, (int, float)))
        print(f"{s['dataset']}: {s['objects']} objects, {size_line(s)}, voxel size "
              f"{' x '.join(f'{v:g}' for v in s['voxel_size_um'])} µm, {total:.1f} s -> {Path(args.out) / s['dataset']}")
    print(f"report: {Path(args.out) / 'report.md'}", file=sys.stdout)
    return 0


# ------------------------------------------------------------------------ tiff


def add_tiff(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tiff",
        help="instances as an ImageJ TIFF with the voxel size (opens in Fiji)",
        description=(
            "Write the instance store INST as DEST.tif: an ImageJ hyperstack (uint16 ids, float32 beyond 65535) "
            "with the voxel size in µm, which Fiji opens without conversion. Slice by slice."
        ),
    )
    p.add_argument("instances", metavar="INST.ome.zarr", type=Path)
    p.add_argument("dest", metavar="DEST.tif", type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace DEST if unet-pipe wrote it")
    p.set_defaults(func=_cmd_tiff)


def _cmd_tiff(args: argparse.Namespace) -> int:
    # torch loads with this module (~2 s): imported when the command runs, not on every `unet-pipe` call.
    from unet_pipe.segment import instances_to_tiff

    instances_to_tiff(args.instances, args.dest, overwrite=args.overwrite)
    log.info("wrote %s", args.dest)
    return 0
