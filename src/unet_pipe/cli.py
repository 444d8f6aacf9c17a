"""Command-line interface: thin argparse wrappers around the library.

Each stage is one subcommand (``unet-pipe STAGE --help``).  A user mistake
(bad file, bad config, foreign checkpoint) is printed as one line
``unet-pipe: error: <file>: <problem>`` with exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from unet_pipe import __version__
from unet_pipe.cli_calibrate import add_calibrate
from unet_pipe.cli_export import add_export
from unet_pipe.cli_view import add_view
from unet_pipe.cli_model import add_predict, add_train
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


def load_config(path: str | None) -> dict | None:
    if path is None:
        return None
    from unet_pipe.config import load_config

    return load_config(path, check_inputs=False)


def add_ngff_option(p: argparse.ArgumentParser) -> None:
    """``--ngff``: the OME-Zarr flavour of the store a command writes."""
    p.add_argument("--ngff", choices=("0.4", "0.5"), default=None,
                   help="0.4: zarr format 2, read by every OME-Zarr viewer (default: the config's ngff_version, "
                        "else 0.4); 0.5: zarr format 3")


def ngff_choice(args: argparse.Namespace, config: dict | None) -> str:
    """The flag, else the config's ``ngff_version``, else 0.4."""
    return args.ngff or (config or {}).get("ngff_version") or "0.4"


# ------------------------------------------------------------------------ synth


def _add_synth(sub: argparse._SubParsersAction) -> None:
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
#: More threads than this is a typo, not a machine (torch crashed at 100000).
MAX_THREADS = 1024
MAX_PYRAMID_LEVELS = 16


def check_option(option: str, value: float | Sequence[float] | None, low: float | None = None,
                 high: float | None = None, *, above: bool = False) -> None:
    """Refuse a numeric option that is not finite or lies outside [low, high] (``above``: > low).

    Called by every subcommand for its counts, sizes and thresholds, so that a
    zero, a negative, NaN, inf or an absurd value is one line and exit 2 before
    any work, never a traceback or a silently empty result.
    """
    if value is None:
        return
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        bad = not math.isfinite(v) or (low is not None and (v <= low if above else v < low))
        if bad or (high is not None and v > high):
            if low is not None and high is not None:
                wanted = f"in {'(' if above else '['}{low:g}, {high:g}]"
            elif low is not None:
                wanted = f"{'>' if above else '>='} {low:g}"
            else:
                wanted = f"<= {high:g}"
            shown = " ".join(str(x) for x in values)
            raise UnetPipeError(None, f"{option} must be a finite number {wanted}, got {shown}")


def _check_voxel_size(values: Sequence[float] | None) -> None:
    if values is not None and not all(math.isfinite(v) and v > 0 for v in values):
        raise UnetPipeError(None, f"--voxel-size must be three finite positive numbers, got {' '.join(map(str, values))}")


def _cmd_synth(args: argparse.Namespace) -> int:
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


def _add_ingest(sub: argparse._SubParsersAction) -> None:
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


# ---------------------------------------------------------------------- config


def _add_check_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a config file (or several, composed as overlays) against the schema",
        description=(
            "Validate CONFIG.yaml against the schema. Several files are composed in order as "
            "`snakemake --configfile A.yaml B.yaml` composes them: dataset maps (datasets, "
            "train.datasets, predict.datasets) of a later file replace the earlier ones, every other "
            "section merges key by key (lists and values replaced). --print shows the result."
        ),
    )
    p.add_argument("config", metavar="CONFIG.yaml", nargs="+")
    p.add_argument("--print", action="store_true", help="print the composed config (defaults filled) as YAML")
    p.add_argument("--no-inputs", action="store_true", help="do not check that input TIFF paths exist")
    p.set_defaults(func=_cmd_check_config)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from unet_pipe.config import check_workflow, config_source, load_configs

    config = load_configs(args.config, check_inputs=not args.no_inputs)
    check_workflow(config, config_source(args.config))
    if args.print:
        import yaml

        print(yaml.safe_dump(config, sort_keys=False), end="")
    log.info("%s: valid", config_source(args.config))
    return 0


def _add_install_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "install-profile",
        help="install profiles/NAME where `snakemake --profile NAME` finds it by name",
        description=(
            "Copy the repository's profiles/NAME to Snakemake's user profile folder "
            "($XDG_CONFIG_HOME/snakemake, default ~/.config/snakemake; --site: /etc/xdg/snakemake), so that "
            "`snakemake --profile NAME` works from the repository root. For the slurm profile the CPU and GPU "
            "partitions come from the options, else from $UNET_PIPE_PARTITION_CPU/$UNET_PIPE_PARTITION_GPU, "
            "else are asked for on a terminal. A folder of that name that unet-pipe did not install, or "
            "that was edited since, is never replaced."
        ),
    )
    p.add_argument("name", metavar="NAME", help="profile in profiles/ (slurm or local)")
    p.add_argument("--partition-cpu", metavar="PARTITION", help="SLURM partition of the CPU jobs")
    p.add_argument("--partition-gpu", metavar="PARTITION", help="SLURM partition of train and predict (GPU jobs)")
    p.add_argument("--account", help="SLURM account to charge (default: $UNET_PIPE_SLURM_ACCOUNT, else none)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config-dir", type=Path, metavar="DIR", help="install into DIR/NAME instead")
    where.add_argument("--site", action="store_true", help="install for every user (site config folder)")
    p.set_defaults(func=_cmd_install_profile)


def _partition(args: argparse.Namespace, kind: str) -> str:
    import os

    from unet_pipe.profiles import PARTITION_ENV

    given = getattr(args, f"partition_{kind}") or os.environ.get(PARTITION_ENV[kind])
    if given:
        return given
    if not sys.stdin.isatty():
        raise UnetPipeError(
            None, f"no {kind.upper()} partition: pass --partition-{kind} or set {PARTITION_ENV[kind]} "
            "(`sinfo -s` lists your cluster's partitions)"
        )
    answer = input(f"SLURM partition for {kind.upper()} jobs (`sinfo -s` lists them): ").strip()
    if not answer:
        raise UnetPipeError(None, f"no {kind.upper()} partition given")
    return answer


def _cmd_install_profile(args: argparse.Namespace) -> int:
    import os

    from unet_pipe.profiles import ACCOUNT_ENV, install_profile, profile_search_dir, repository_profiles

    source = repository_profiles() / args.name
    partitions = None
    if (source / "config.yaml").is_file() and "slurm_partition:" in (source / "config.yaml").read_text():
        partitions = {kind: _partition(args, kind) for kind in ("cpu", "gpu")}
    root = args.config_dir if args.config_dir is not None else profile_search_dir(site=args.site)
    dest = install_profile(args.name, root, partitions, args.account or os.environ.get(ACCOUNT_ENV) or None, source)
    log.info("installed %s (from %s); from the repository root run: snakemake --profile %s", dest, source, args.name)
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print shape, dtype, chunks and voxel size of an OME-Zarr image")
    p.add_argument("path", metavar="IMAGE.ome.zarr", type=Path)
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from unet_pipe.io import describe

    print(describe(args.path))
    return 0


# ---------------------------------------------------------------- weights


def _add_weights(sub: argparse._SubParsersAction) -> None:
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


# ------------------------------------------------------------ postprocess


def _add_postprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "postprocess",
        help="instances from cell probabilities (threshold or seeded watershed), per slice",
        description=(
            "Segment each z slice of PROB (cell probability, float or uint8 = p*255) into instances: "
            "'threshold' labels the 4-connected components of p > THRESHOLD; 'watershed' splits them "
            "further by a watershed on 1 - p, seeded by the distance-transform maxima (prominence >= "
            "SEED_PROMINENCE px) of the confident region p > SEED_THRESHOLD. "
            "Writes uint32 ids unique across the stack (0 = membrane) to DEST as an OME-Zarr label "
            "image with the chunks of PROB. An interrupted run resumes where it stopped."
        ),
    )
    p.add_argument("probabilities", metavar="PROB.ome.zarr", type=Path)
    p.add_argument("dest", metavar="DEST.ome.zarr", type=Path)
    p.add_argument("--method", choices=("threshold", "watershed"), default="threshold")
    p.add_argument("--threshold", type=float, default=0.5, help="cell where p > THRESHOLD (default 0.5)")
    p.add_argument(
        "--seed-threshold", type=float, default=0.9, help="watershed: confident cell region p > this (default 0.9)"
    )
    p.add_argument(
        "--seed-prominence", type=float, default=5.0,
        help="watershed: pixels a distance maximum must rise above its saddle to seed a cell "
        "(default 5; about a quarter of the cell radius)",
    )
    p.add_argument("--min-size", type=int, default=0, help="segments smaller than this (pixels) become membrane")
    p.add_argument(
        "--decisions", type=Path, metavar="decisions.json",
        help="take method, thresholds, seeds and min size from `unet-pipe calibrate` (instead of the options)",
    )
    p.add_argument("--pyramid-levels", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace DEST once the new store is complete")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming DEST.partial")
    add_ngff_option(p)
    p.set_defaults(func=_cmd_postprocess)


def _cmd_postprocess(args: argparse.Namespace) -> int:
    from unet_pipe.postprocess import postprocess

    if args.decisions is not None:
        from unet_pipe.calibrate import read_decisions

        chosen = read_decisions(args.decisions)
        for key in ("method", "threshold", "seed_threshold", "seed_prominence", "min_size"):
            setattr(args, key, chosen[key])
        log.info("decisions from %s: %s", args.decisions, {k: chosen[k] for k in ("method", "threshold", "min_size")})
    if not 0.0 <= args.threshold <= args.seed_threshold <= 1.0:
        raise UnetPipeError(None, "need 0 <= --threshold <= --seed-threshold <= 1")
    check_option("--seed-prominence", args.seed_prominence, 0, above=True)
    check_option("--min-size", args.min_size, 0)  # above the slice area: refused by postprocess()
    check_option("--pyramid-levels", args.pyramid_levels, 0, MAX_PYRAMID_LEVELS)
    postprocess(
        args.probabilities,
        args.dest,
        method=args.method,
        threshold=args.threshold,
        seed_threshold=args.seed_threshold,
        seed_prominence=args.seed_prominence,
        min_size=args.min_size,
        pyramid_levels=args.pyramid_levels,
        overwrite=args.overwrite,
        resume=not args.no_resume,
        progress=progress_enabled(args),
        ngff=ngff_choice(args, None),
    )
    return 0


# --------------------------------------------------------------- evaluate


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score instances (and probabilities) against ground truth",
        description=(
            "Per-slice and summary metrics as in ISBI 2012: pixel error (from --probabilities), "
            "foreground-restricted Rand error (1 - V_rand) and variation of information (from the "
            "instances), and foreground IoU. Writes OUT (JSON) and OUT with suffix .csv (one row per slice)."
        ),
    )
    p.add_argument("--prediction", required=True, type=Path, metavar="INST.ome.zarr", help="instances (0 = membrane)")
    p.add_argument("--truth", required=True, type=Path, metavar="LABELS.ome.zarr")
    p.add_argument("--out", required=True, type=Path, metavar="metrics.json")
    p.add_argument("--probabilities", type=Path, metavar="PROB.ome.zarr", help="cell probabilities for the pixel error")
    p.add_argument("--raw", type=Path, metavar="RAW.ome.zarr", help="raw image, recorded for the report's figures")
    p.add_argument("--dataset", help="name shown in the report (default: the folder holding --prediction)")
    p.add_argument("--slices", nargs=2, type=int, metavar=("START", "STOP"), help="evaluate z in [START, STOP) only")
    p.add_argument("--train", nargs=2, type=int, metavar=("START", "STOP"), help="tag [START, STOP) as training slices")
    p.add_argument("--val", nargs=2, type=int, metavar=("START", "STOP"), help="tag [START, STOP) as held-out slices")
    p.add_argument("--threshold", type=float, default=0.5, help="cell where p > THRESHOLD for the pixel error")
    p.add_argument(
        "--decisions", type=Path, metavar="decisions.json",
        help="use the calibrated cell threshold (`unet-pipe calibrate`) and record the decisions",
    )
    p.add_argument(
        "--truth-mode", choices=("binary", "instances"), default="binary",
        help="binary: 0 = membrane, cells = --foreground-value (default nonzero), instances by connected "
        "components per slice; instances: truth holds ids (0 = membrane)",
    )
    p.add_argument("--foreground-value", type=int, default=None, help="cell value of binary truth (default: nonzero)")
    p.add_argument(
        "--unlabelled-value", type=int, metavar="V", help="truth value of unannotated pixels, left out of every score"
    )
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from unet_pipe.evaluate import evaluate

    check_option("--threshold", args.threshold, 0, 1)
    if args.out.suffix == ".csv":  # the per-slice CSV goes to OUT with suffix .csv: it would replace OUT
        raise UnetPipeError(args.out, "--out must not end in .csv (the per-slice table is written there); use .json")
    decisions = None
    if args.decisions is not None:
        from unet_pipe.calibrate import read_decisions

        decisions = read_decisions(args.decisions)
        args.threshold = decisions["cell_threshold"]
    evaluate(
        args.prediction,
        args.truth,
        args.out,
        probabilities=args.probabilities,
        raw=args.raw,
        dataset=args.dataset,
        slices=args.slices,
        train_slices=args.train,
        val_slices=args.val,
        threshold=args.threshold,
        truth_mode=args.truth_mode,
        foreground_value=args.foreground_value,
        unlabelled_value=args.unlabelled_value,
        decisions=decisions,
        progress=progress_enabled(args),
    )
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".csv"))
    return 0


# ----------------------------------------------------------------- report


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="Markdown report with metric tables, slice figures and training curves",
        description=(
            "Write OUT (Markdown) and its PNG figures in OUT_STEM_figures/ from metrics files of "
            "`unet-pipe evaluate` (figures read the stores recorded in them) and training log CSVs."
        ),
    )
    p.add_argument("--metrics", nargs="+", required=True, type=Path, metavar="metrics.json")
    p.add_argument("--out", required=True, type=Path, metavar="report.md")
    p.add_argument("--training-log", nargs="*", default=[], type=Path, metavar="train.csv")
    p.add_argument("--figures", type=int, default=3, help="slices shown per dataset (default 3; 0 = none)")
    p.add_argument("--title", default="unet-pipe evaluation")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from unet_pipe.report import write_report

    check_option("--figures", args.figures, 0)  # more than the slices: all of them
    write_report(args.out, args.metrics, training_logs=args.training_log, figures=args.figures, title=args.title)
    log.info("wrote %s", args.out)
    return 0


# ---------------------------------------------------------------------- driver

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth,
    _add_ingest,
    _add_check_config,
    _add_install_profile,
    _add_info,
    _add_weights,
    add_train,
    add_calibrate,
    _add_postprocess,
    _add_evaluate,
    _add_report,
    add_predict,
    add_view,
    add_export,
]


def progress_enabled(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in the project's one-line form (exit 2, as argparse does)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("unet-pipe").strip()  # "predict", or "" for the top level
        line = UnetPipeError(command or None, f"{message} (see {self.prog} --help)")
        self.exit(2, f"unet-pipe: error: {line}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unet-pipe", description="U-Net segmentation of EM stacks (Ronneberger et al. 2015), stage by stage."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:  # third-party chatter only at -vv
        for name in ("distributed", "numcodecs", "matplotlib", "PIL", "asyncio"):
            logging.getLogger(name).setLevel(logging.WARNING)


_OUTPUT_ARGS = ("dest", "out", "preview", "log", "out_dir", "tensorboard")
_INPUT_ARGS = ("src", "labels", "probabilities", "checkpoint", "raw", "like", "prediction", "truth", "path",
               "weights", "metrics", "training_log", "decisions")


def _paths(value: object) -> list[Path]:
    if isinstance(value, Path):
        return [value]
    if isinstance(value, str) and "=" in value:  # train's NAME=PATH
        return [Path(value.partition("=")[2])]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return []


@contextlib.contextmanager
def _guard_outputs(args: argparse.Namespace):
    """Refuse outputs that overlap inputs; hold a lock on DEST (or --out) while writing."""
    from unet_pipe.integrity import CorruptChunk
    from unet_pipe.safety import DestLock, check_dest, check_not_inside_store, leftover_note

    inputs = [p for name in _INPUT_ARGS for p in _paths(getattr(args, name, None))]
    outputs = [p for name in _OUTPUT_ARGS for p in _paths(getattr(args, name, None))]
    for i, out in enumerate(outputs):
        check_dest(out, inputs)
        check_not_inside_store(out)
        # Two outputs of one command in one place (train --log equal to --out): one would replace the other.
        check_dest(out, outputs[i + 1:], kind="output")
    main_out = getattr(args, "dest", None) or getattr(args, "out", None)
    if not isinstance(main_out, Path):
        yield
        return
    # Shards of one predict write disjoint regions of one staging store at once: no lock there.
    shard = bool(getattr(args, "shard", None) or getattr(args, "z_range", None))
    started = time.time() - 1  # mtimes may be coarser than the clock
    with contextlib.nullcontext() if shard else DestLock(main_out):
        try:
            yield
        except (UnetPipeError, OSError) as exc:
            # Say on the error line what the failure left: a resumable staging folder, or nothing.
            # A chunk that failed to decode outside open_image (which names the input store) is
            # one of our staging store's: it is damaged, and resuming it would fail again.
            damaged = isinstance(exc, CorruptChunk) and exc.path is None
            exc.leftover = leftover_note(  # type: ignore[union-attr]
                main_out, since=started, remove_empty=not shard, damaged=damaged
            )
            raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        with _guard_outputs(args):
            return int(args.func(args) or 0)
    except UnetPipeError as exc:
        print(f"unet-pipe: error: {exc}{getattr(exc, 'leftover', '')}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The environment, not a bug: a full disk (ENOSPC), a folder made read-only, an I/O error.
        where = exc.filename or getattr(args, "dest", None) or getattr(args, "out", None)
        line = UnetPipeError(where, exc.strerror or f"{type(exc).__name__}: {exc}")
        print(f"unet-pipe: error: {line}{getattr(exc, 'leftover', '')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unet-pipe: interrupted", file=sys.stderr)
        return 130
