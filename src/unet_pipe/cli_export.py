"""Command line of the bioimage.io export: ``unet-pipe export`` (thin wrapper)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from unet_pipe.cli_common import load_config
from unet_pipe.errors import ConfigError, UnetPipeError

log = logging.getLogger("unet_pipe")


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a bioimage.io model package (state dict + TorchScript) of a checkpoint",
        description=(
            "Write the model of CHECKPOINT as a bioimage.io model package DEST.zip (spec 0.5): weights as a "
            "PyTorch state dict with the architecture source and as TorchScript, the input normalisation as "
            "preprocessing, the valid-size and halo constraints, test input and output from a tile of RAW_STORE, "
            "and the name, description, authors and licence of CONFIG's export section. Needs "
            "unet-pipe[bioimageio]."
        ),
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    p.add_argument("dest", metavar="DEST.zip", type=Path)
    p.add_argument("--config", help="take name, description, authors and licence from this config's export section")
    p.add_argument("--export-json", metavar="JSON",
                   help="the config's export section as a JSON object instead of --config (Snakemake)")
    p.add_argument(
        "--sample", dest="raw", type=Path, metavar="RAW_STORE",
        help="raw OME-Zarr stack of the test tile and the normalisation range "
             "(default: the checkpoint's first training dataset under its results folder)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it is a package written by unet-pipe")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    # torch loads with this module (~2 s): imported when the command runs, not on every `unet-pipe` call.
    from unet_pipe.bioimageio_export import DEFAULTS, export_model, export_settings, require_bioimageio

    require_bioimageio()  # before any work: the one line that says what to install
    if args.export_json is not None:
        if args.config is not None:
            raise UnetPipeError(None, "give --config or --export-json, not both")
        try:
            section = json.loads(args.export_json)
        except json.JSONDecodeError as exc:
            raise ConfigError("--export-json", f"not valid JSON ({exc.msg} at position {exc.pos})") from None
        if not isinstance(section, dict) or set(section) - {"enabled", "sample", *DEFAULTS}:
            raise ConfigError("--export-json", f"expected the export section (keys {', '.join(DEFAULTS)})")
        settings = export_settings({"export": section})
    else:
        settings = export_settings(load_config(args.config))
    summary = export_model(args.checkpoint, args.dest, sample=args.raw, settings=settings, overwrite=args.overwrite)
    log.info(
        "wrote %s (weights: %s; test tile at z, y, x %s, size %s)", summary.dest, ", ".join(summary.weight_formats),
        list(summary.tile_start), list(summary.tile_shape),
    )
    return 0
