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
        "--voxel-size", nargs=3, type=float, metavar=("Z", "Y", "X"), default=None,
        help="voxel size in micrometres written to the TIFF metadata (default: ISBI-like 0.05 0.004 0.004; "
        "--mode 3d: 0.01 isotropic, z times --anisotropy)",
    )
    p.add_argument("--mode", choices=("2d", "3d"), default="2d",
                   help="2d: serial sections, cells drawn slice by slice (ISBI-like); 3d: touching 3D cells with "
                   "dense 3D truth and membranes with small gaps (FIB-SEM-like; unet_pipe.synth3d)")
    p.add_argument("--anisotropy", type=float, default=1.0,
                   help="--mode 3d: z voxel edge over the y/x edge (default 1: isotropic)")
    p.set_defaults(func=_cmd_synth)


SYNTH_MAX_VOXELS = 2e9


#: Peak memory of synthesize() per voxel (tracemalloc, shape 4 x 512 x 512: 80 bytes).
SYNTH_BYTES_PER_VOXEL = 80


def _cmd_synth(args: argparse.Namespace) -> int:
    check_option("--seed", args.seed, 0)
    check_option("--anisotropy", args.anisotropy, 0, 100, above=True)
    low = (4, 4, 4) if args.mode == "3d" else (1, 8, 8)
    if any(s < m for s, m in zip(args.shape, low)):
        raise UnetPipeError(None, f"--shape must be at least {' '.join(map(str, low))}, got "
                            f"{' '.join(map(str, args.shape))}")
    if args.voxel_size is None:
        args.voxel_size = [0.01 * args.anisotropy, 0.01, 0.01] if args.mode == "3d" else [0.05, 0.004, 0.004]
    if math.prod(args.shape) > SYNTH_MAX_VOXELS:
        raise UnetPipeError(None, f"--shape {' '.join(map(str, args.shape))} is over {SYNTH_MAX_VOXELS:.0e} voxels "
                            "(synthetic stacks are made in memory)")
    check_voxel_size(args.voxel_size)
    import psutil

    need, free = math.prod(args.shape) * SYNTH_BYTES_PER_VOXEL, psutil.virtual_memory().available
    if need > free:  # else the kernel kills the process part-way, with no message
        raise UnetPipeError(None, f"--shape {' '.join(map(str, args.shape))} needs about {need / 2**30:.1f} GiB of "
                            f"memory, {free / 2**30:.1f} GiB are available")
    paths = write_synthetic(args.out_dir, args.shape, args.seed, args.voxel_size, mode=args.mode,
                            anisotropy=args.anisotropy)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0
