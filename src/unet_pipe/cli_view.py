"""Command line of ``unet-pipe view``: raw with its label images as layers (thin wrapper)."""
from __future__ import annotations

import argparse
from pathlib import Path

from unet_pipe.errors import InputError
from unet_pipe.view import build_view


def add_view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="write a view store: the raw image with label images as NGFF labels/ layers",
        description=(
            "Write DEST.ome.zarr: the image RAW with each --labels NAME=PATH as its label layer NAME "
            "(NGFF 0.4 labels/ group), so that one open in napari (napari-ome-zarr) or any ome-zarr-py "
            "reader shows them together. The levels are relative links into the stores (no copy, "
            "nothing changed in them) unless --copy. Label stores must be integer images of RAW's "
            "voxel size, of RAW's shape or a crop of it (placed at its recorded offset)."
        ),
    )
    p.add_argument("raw", metavar="RAW.ome.zarr", type=Path)
    p.add_argument("dest", metavar="DEST.ome.zarr", type=Path)
    p.add_argument("--labels", action="append", default=[], metavar="NAME=PATH",
                   help="a label image shown as layer NAME (repeatable, in this order)")
    p.add_argument("--unlabelled", action="append", default=[], metavar="NAME=V",
                   help="value V of unannotated pixels in layer NAME (sparse labels), shown transparent")
    p.add_argument("--copy", action="store_true", help="copy the levels instead of linking them")
    p.add_argument("--overwrite", action="store_true", help="replace DEST (a view written by unet-pipe)")
    p.set_defaults(func=_cmd_view)


def _cmd_view(args: argparse.Namespace) -> int:
    labels: dict[str, Path] = {}
    for item in args.labels:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise InputError(None, f"--labels {item!r}: expected NAME=PATH")
        if name in labels:
            raise InputError(Path(path), f"--labels: name {name!r} given twice")
        labels[name] = Path(path)
    unlabelled: dict[str, int] = {}
    for item in args.unlabelled:
        name, sep, value = item.partition("=")
        try:
            unlabelled[name] = int(value)
        except ValueError:
            raise InputError(None, f"--unlabelled {item!r}: expected NAME=V with an integer V") from None
        if not sep:
            raise InputError(None, f"--unlabelled {item!r}: expected NAME=V with an integer V")
    build_view(args.raw, args.dest, labels, copy=args.copy, overwrite=args.overwrite, unlabelled=unlabelled)
    return 0
