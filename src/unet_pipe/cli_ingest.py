"""``unet-pipe ingest`` and ``info``: a TIFF stack or an OME-Zarr image into our OME-Zarr store
(:mod:`unet_pipe.ingest`), and what a store holds (:mod:`unet_pipe.ngff`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unet_pipe.cli_common import (
    MAX_PYRAMID_LEVELS,
    MAX_THREADS,
    add_ngff_option,
    check_option,
    check_voxel_size,
    load_config,
    ngff_choice,
    parse_chunks,
    parse_compression,
    progress_enabled,
)
from unet_pipe.ingest import ingest_tiff
from unet_pipe.io import DEFAULT_CHUNKS, describe
from unet_pipe.provenance import provenance

log = logging.getLogger("unet_pipe")


def add_ingest(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--chunks", type=parse_chunks, default=None, help="Z,Y,X chunk shape (default: config or 1,512,512)")
    p.add_argument("--labels", action="store_true", help="the stack holds labels (integer dtype, nearest pyramid)")
    p.add_argument("--like", type=Path, metavar="RAW.ome.zarr", help="check that SRC has the shape of this image")
    p.add_argument(
        "--offset", nargs=3, type=int, metavar=("Z", "Y", "X"),
        help="with --like: SRC labels a crop of RAW starting at this voxel (recorded as an NGFF translation); "
        "an OME-Zarr SRC with a translation gives its own offset, which this must match",
    )
    p.add_argument("--voxel-size", nargs=3, type=float, metavar=("Z", "Y", "X"), help="micrometres")
    p.add_argument("--pyramid-levels", type=int, default=None, help="2x (y, x) downsampled levels (default 2)")
    p.add_argument("--compression", type=parse_compression, default=None, metavar="CODEC:LEVEL[:BLOCKSIZE]",
                   help="Blosc codec, level and block size in bytes, 0 = automatic (default: config, else zstd:1:262144)")
    p.add_argument("--config", help="take chunks, compression and pyramid levels from this config")
    p.add_argument("--threads", type=int, help="chunk-encoding threads (default: the cores this process may use)")
    add_ngff_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace DEST once the new store is complete")
    p.set_defaults(func=_cmd_ingest)


def _cmd_ingest(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    section = config["ingest"] if config else {}
    chunks = args.chunks or tuple(section.get("chunks", DEFAULT_CHUNKS))
    levels = args.pyramid_levels if args.pyramid_levels is not None else section.get("pyramid_levels", 2)
    ngff = ngff_choice(args, config)
    params = {"chunks": list(chunks), "pyramid_levels": levels, "labels": args.labels, "voxel_size": args.voxel_size,
              "ngff": ngff}
    check_option("--threads", args.threads, 1, MAX_THREADS)
    check_voxel_size(args.voxel_size)
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


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print shape, dtype, chunks and voxel size of an OME-Zarr image")
    p.add_argument("path", metavar="IMAGE.ome.zarr", type=Path)
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    print(describe(args.path))
    return 0
