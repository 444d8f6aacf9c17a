"""``unet-pipe train`` (:mod:`unet_pipe.train`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unet_pipe.cli_common import MAX_THREADS, check_option, load_config, named_values, progress_enabled
from unet_pipe.config import validate_config
from unet_pipe.determinism import help_text
from unet_pipe.errors import ConfigError, UnetPipeError

log = logging.getLogger("unet_pipe")


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the U-Net on raw/labels/weights OME-Zarr stores",
        description=(
            "Train the U-Net described by CONFIG (model and train sections) on random tiles of the "
            "datasets in train.datasets. Stores are given per dataset as NAME=PATH; datasets without "
            "--raw/--labels/--weights are read from RESULTS/NAME/{raw,labels,weights}.ome.zarr. Writes "
            "periodic checkpoints to OUT.partial and the final one to OUT (atomically); --resume "
            "continues an interrupted or finished run exactly (bit-identical on the CPU)."
        ),
        epilog=help_text("train"),
    )
    p.add_argument("config", metavar="CONFIG.yaml", nargs="?")
    p.add_argument(
        "--config-json", metavar="JSON", help="the configuration as a JSON string instead of CONFIG.yaml (Snakemake)"
    )
    for key in ("raw", "labels", "weights"):
        p.add_argument(
            f"--{key}", action="append", default=[], metavar="NAME=PATH",
            help=f"{key} OME-Zarr of dataset NAME (repeatable)",
        )
    p.add_argument("--results", type=Path, help="folder of the ingested stores (default: the config's results)")
    p.add_argument("--out", type=Path, required=True, metavar="CKPT", help="checkpoint to write")
    p.add_argument("--log", type=Path, metavar="CSV", help="per-step metrics (step, loss, lr, validation errors)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial or OUT when present")
    p.add_argument("--overwrite", action="store_true", help="start over even if OUT exists")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda[:N]")
    p.add_argument("--until-step", type=int, metavar="N", help="stop after step N (checkpoint to OUT.partial)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores of this process)")
    p.add_argument("--tensorboard", type=Path, metavar="DIR", help="also log to TensorBoard (needs tensorboard)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                   help="auto: bfloat16 on CPUs with AMX/AVX512-BF16, float32 on other CPUs, float16 AMP on CUDA "
                        "(default: the config's train.precision)")
    p.set_defaults(func=_cmd_train)


def _named_paths(values: list[str], option: str) -> dict[str, Path]:
    return {name: Path(path) for name, path in named_values(values, option).items()}


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    # torch loads with this module (~2 s): imported when the command runs, not on every `unet-pipe` call.
    from unet_pipe.train import train

    if (args.config is None) == (args.config_json is None):
        raise UnetPipeError(None, "give either CONFIG.yaml or --config-json, not both or neither")
    if args.config_json is not None:
        try:
            config = validate_config(json.loads(args.config_json), "--config-json")
        except json.JSONDecodeError as exc:
            raise ConfigError("--config-json", f"not valid JSON ({exc.msg} at position {exc.pos})") from None
    else:
        config = load_config(args.config)
    check_option("--threads", args.threads, 1, MAX_THREADS)
    check_option("--until-step", args.until_step, 1)
    if args.precision is not None:  # recorded in the checkpoint's config like the rest
        config["train"] = {**config["train"], "precision": args.precision}
    given = {key: _named_paths(getattr(args, key), f"--{key}") for key in ("raw", "labels", "weights")}
    results = args.results if args.results is not None else Path(config["results"])
    stores: dict[str, dict[str, Path]] = {}
    for name in config["train"]["datasets"]:
        explicit = any(name in given[key] for key in given)
        stores[name] = {}
        for key in ("raw", "labels", "weights"):
            if name in given[key]:
                stores[name][key] = given[key][name]
            elif not explicit:
                stores[name][key] = results / name / f"{key}.ome.zarr"
    summary = train(
        config,
        stores,
        args.out,
        args.log,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        until_step=args.until_step,
        threads=args.threads,
        progress=progress_enabled(args),
        tensorboard_dir=args.tensorboard,
    )
    log.info(
        "step %d%s: loss %.4f, validation pixel error %.4f, Rand error %.4f (%.0f s, %s on %s); wrote %s",
        summary["step"], "" if summary["finished"] else " (stopped early)", summary["loss"],
        summary["val_pixel_error"], summary["val_rand_error"], summary["seconds"], summary["precision"],
        summary["cpu_model"], summary["checkpoint"],
    )
    return 0
