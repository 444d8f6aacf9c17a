"""The data subcommands: ``synth``, ``ingest``, ``info`` and ``weights`` (thin wrappers).

Test stacks, OME-Zarr conversion, store inspection and the loss-weight maps:
argument checks around :mod:`unet_pipe.synth`, :mod:`unet_pipe.io` and
:mod:`unet_pipe.weights`.  Split from :mod:`unet_pipe.cli` to keep each module
one concept; the parser, the shared option checks and the error handling live
there (imported when a command runs: no import cycle).
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Sequence

from unet_pipe.errors import UnetPipeError

log = logging.getLogger("unet_pipe")


def _chunks(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunks must be Z,Y,X integers, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"chunks must be three positive integers Z,Y,X, got {text!r}")
    return parts  # type: ignore[return-value]


def _compression(text: str) -> dict:
    cname, _, rest = text.partition(":")
    level, _, blocksize = rest.partition(":")
    if (
        cname not in ("zstd", "lz4", "lz4hc", "zlib", "blosclz")
        or not level.isdigit()
        or not 0 <= int(level) <= 9
        or (blocksize and not blocksize.isdigit())
    ):
        raise argparse.ArgumentTypeError(
            "compression must be CODEC:LEVEL[:BLOCKSIZE] (codec zstd|lz4|lz4hc|zlib|blosclz, level 0-9, "
            f"Blosc block size in bytes, 0 = automatic), got {text!r}"
        )
    return {"cname": cname, "clevel": int(level), **({"blocksize": int(blocksize)} if blocksize else {})}


# ------------------------------------------------------------------------ synth


def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="generate a synthetic EM-like stack with known labels",
        description="Write raw.tif, labels.tif (0 = membrane, 255 = cell) and instances.tif to OUT_DIR.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.add_argument("--shape", nargs=3, type=int, metavar=("Z", "Y", "X"), default=[12, 256, 256])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--voxel-size", nargs=3, type=float, metavar=("Z", "Y", "X"), default=[0.05, 0.004, 0.004],
        help="voxel size in micrometres written to the TIFF metadata (default: ISBI-like 0.05 0.004 0.004)",
    )
    p.set_defaults(func=_cmd_synth)


SYNTH_MAX_VOXELS = 2e9
#: Peak memory of synthesize() per voxel (tracemalloc, shape 4 x 512 x 512: 80 bytes).
SYNTH_BYTES_PER_VOXEL = 80


def _check_voxel_size(values: Sequence[float] | None) -> None:
    if values is not None and not all(math.isfinite(v) and v > 0 for v in values):
        raise UnetPipeError(None, f"--voxel-size must be three finite positive numbers, got {' '.join(map(str, values))}")


def _cmd_synth(args: argparse.Namespace) -> int:
    from unet_pipe.cli import check_option
    from unet_pipe.synth import write_synthetic

    check_option("--seed", args.seed, 0)
    if min(args.shape) < 1 or min(args.shape[1:]) < 8:
        raise UnetPipeError(None, f"--shape must be at least 1 8 8, got {' '.join(map(str, args.shape))}")
    if math.prod(args.shape) > SYNTH_MAX_VOXELS:
        raise UnetPipeError(None, f"--shape {' '.join(map(str, args.shape))} is over {SYNTH_MAX_VOXELS:.0e} voxels "
                            "(synthetic stacks are made in memory)")
    _check_voxel_size(args.voxel_size)
    import psutil

    need, free = math.prod(args.shape) * SYNTH_BYTES_PER_VOXEL, psutil.virtual_memory().available
    if need > free:  # else the kernel kills the process part-way, with no message
        raise UnetPipeError(None, f"--shape {' '.join(map(str, args.shape))} needs about {need / 2**30:.1f} GiB of "
                            f"memory, {free / 2**30:.1f} GiB are available")
    paths = write_synthetic(args.out_dir, args.shape, args.seed, args.voxel_size)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


# ----------------------------------------------------------------------- ingest


def add_ingest(sub: argparse._SubParsersAction) -> None:
    from unet_pipe.cli import add_ngff_option

    p = sub.add_parser(
        "ingest",
        help="stream a TIFF stack or an OME-Zarr image into our OME-Zarr store",
        description=(
            "Convert SRC (multi-page TIFF, BigTIFF, OME-TIFF, a folder of single-slice TIFFs, level 0 of an "
            "OME-Zarr image of NGFF 0.4 or 0.5, or a plain zarr array) into an OME-Zarr image DEST (NGFF 0.4, "
            "or 0.5 with --ngff 0.5), slice by slice, with a 2x pyramid. Values and dtype are kept; SRC is only read."
        ),
    )
    p.add_argument("src", metavar="SRC", type=Path)
    p.add_argument("dest", metavar="DEST.ome.zarr", type=Path)
    p.add_argument("--chunks", type=_chunks, default=None, help="Z,Y,X chunk shape (default: config or 1,512,512)")
    p.add_argument("--labels", action="store_true", help="the stack holds labels (integer dtype, nearest pyramid)")
    p.add_argument("--like", type=Path, metavar="RAW.ome.zarr", help="check that SRC has the shape of this image")
    p.add_argument(
        "--offset", nargs=3, type=int, metavar=("Z", "Y", "X"),
        help="with --like: SRC labels a crop of RAW starting at this voxel (recorded as an NGFF translation); "
        "an OME-Zarr SRC with a translation gives its own offset, which this must match",
    )
    p.add_argument("--voxel-size", nargs=3, type=float, metavar=("Z", "Y", "X"), help="micrometres")
    p.add_argument("--pyramid-levels", type=int, default=None, help="2x (y, x) downsampled levels (default 2)")
    p.add_argument("--compression", type=_compression, default=None, metavar="CODEC:LEVEL[:BLOCKSIZE]",
                   help="Blosc codec, level and block size in bytes, 0 = automatic (default: config, else zstd:1:262144)")
    p.add_argument("--config", help="take chunks, compression and pyramid levels from this config")
    p.add_argument("--threads", type=int, help="chunk-encoding threads (default: the cores this process may use)")
    add_ngff_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace DEST once the new store is complete")
    p.set_defaults(func=_cmd_ingest)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from unet_pipe.cli import MAX_PYRAMID_LEVELS, MAX_THREADS, check_option, load_config, ngff_choice, progress_enabled
    from unet_pipe.io import DEFAULT_CHUNKS, describe, ingest_tiff
    from unet_pipe.provenance import provenance

    config = load_config(args.config)
    section = config["ingest"] if config else {}
    chunks = args.chunks or tuple(section.get("chunks", DEFAULT_CHUNKS))
    levels = args.pyramid_levels if args.pyramid_levels is not None else section.get("pyramid_levels", 2)
    ngff = ngff_choice(args, config)
    params = {"chunks": list(chunks), "pyramid_levels": levels, "labels": args.labels, "voxel_size": args.voxel_size,
              "ngff": ngff}
    check_option("--threads", args.threads, 1, MAX_THREADS)
    _check_voxel_size(args.voxel_size)
    check_option("--pyramid-levels", levels, 0, MAX_PYRAMID_LEVELS)
    ingest_tiff(
        args.src,
        args.dest,
        chunks=chunks,
        voxel_size=args.voxel_size,
        pyramid_levels=levels,
        compression=args.compression or section.get("compression"),
        kind="labels" if args.labels else "image",
        like=args.like,
        offset=args.offset,
        overwrite=args.overwrite,
        # The source's checksum is the sha256 of its array bytes, computed while
        # streaming (attrs unet_pipe.array_sha256): hashing the file would read it twice.
        provenance=provenance(None, {**params, "source": str(args.src)}),
        progress=progress_enabled(args),
        threads=args.threads,
        ngff=ngff,
    )
    log.info("wrote %s", describe(args.dest))
    return 0


# ------------------------------------------------------------------------- info


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print shape, dtype, chunks and voxel size of an OME-Zarr image")
    p.add_argument("path", metavar="IMAGE.ome.zarr", type=Path)
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from unet_pipe.io import describe

    print(describe(args.path))
    return 0


# ---------------------------------------------------------------- weights


def add_weights(sub: argparse._SubParsersAction) -> None:
    from unet_pipe.cli import add_ngff_option

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
    from unet_pipe.cli import MAX_PYRAMID_LEVELS, MAX_THREADS, check_option, load_config, ngff_choice, progress_enabled
    from unet_pipe.weights import WeightParams, compute_weight_store, write_preview

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


