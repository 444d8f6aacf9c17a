"""``unet-pipe synth``: a synthetic EM-like stack with known labels (:mod:`unet_pipe.synth`)."""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from unet_pipe.cli_common import check_option, check_voxel_size
from unet_pipe.errors import UnetPipeError
from unet_pipe.synth import write_synthetic

log = logging.getLogger("unet_pipe")


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


def _cmd_synth(args: argparse.Namespace) -> int:
    check_option("--seed", args.seed, 0)
    if min(args.shape) < 1 or min(args.shape[1:]) < 8:
        raise UnetPipeError(None, f"--shape must be at least 1 8 8, got {' '.join(map(str, args.shape))}")
    if math.prod(args.shape) > SYNTH_MAX_VOXELS:
        raise UnetPipeError(None, f"--shape {' '.join(map(str, args.shape))} is over {SYNTH_MAX_VOXELS:.0e} voxels "
                            "(synthetic stacks are made in memory)")
    check_voxel_size(args.voxel_size)
    import psutil

    need, free = math.prod(args.shape) * SYNTH_BYTES_PER_VOXEL, psutil.virtual_memory().available
    if need > free:  # else the kernel kills the process part-way, with no message
        raise UnetPipeError(None, f"--shape {' '.join(map(str, args.shape))} needs about {need / 2**30:.1f} GiB of "
                            f"memory, {free / 2**30:.1f} GiB are available")
    paths = write_synthetic(args.out_dir, args.shape, args.seed, args.voxel_size)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0
