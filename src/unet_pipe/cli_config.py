"""The configuration subcommands: ``check-config`` and ``install-profile`` (thin wrappers).

Schema validation of (composed) config files around :mod:`unet_pipe.config`,
and installation of a Snakemake profile around :mod:`unet_pipe.profiles`.
Split from :mod:`unet_pipe.cli` to keep each module one concept.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from unet_pipe.config import config_source, precheck
from unet_pipe.errors import UnetPipeError
from unet_pipe.profiles import ACCOUNT_ENV, PARTITION_ENV, install_profile, profile_search_dir, repository_profiles

log = logging.getLogger("unet_pipe")


# ---------------------------------------------------------------------- config


def add_check_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a config file (or several, composed as overlays) against the schema",
        description=(
            "Validate CONFIG.yaml against the schema. Several files are composed in order as "
            "`snakemake --configfile A.yaml B.yaml` composes them: dataset maps (datasets, "
            "train.datasets, predict.datasets, calibrate.datasets) of a later file replace the earlier ones, every other "
            "section merges key by key (lists and values replaced). --print shows the result. "
            "It finds what the workflow's own pre-check finds (the same function), every problem at once, "
            "one line each: YAML errors and duplicate keys, unknown keys (with the closest known one), "
            "the checks between keys, input files that do not exist, and from the inputs' headers (no pixel "
            "read) slice ranges beyond a stack, labels that do not fit the raw stack or cannot hold the "
            "configured class values, and a train.init_from of another architecture."
        ),
    )
    p.add_argument("config", metavar="CONFIG.yaml", nargs="+")
    p.add_argument("--print", action="store_true", help="print the composed config (defaults filled) as YAML")
    p.add_argument("--no-inputs", action="store_true", help="do not check the input files (existence, headers, train.init_from)")
    p.set_defaults(func=_cmd_check_config)


def _cmd_check_config(args: argparse.Namespace) -> int:
    # The workflow's pre-check (workflow/rules/common.smk) calls the same function.
    config, said = precheck(args.config, check_inputs=not args.no_inputs)
    for line in said:
        log.info("%s", line)
    if args.print:
        import yaml

        print(yaml.safe_dump(config, sort_keys=False), end="")
    log.info("%s: valid", config_source(args.config))
    return 0


def add_install_profile(sub: argparse._SubParsersAction) -> None:
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

    source = repository_profiles() / args.name
    partitions = None
    if (source / "config.yaml").is_file() and "slurm_partition:" in (source / "config.yaml").read_text():
        partitions = {kind: _partition(args, kind) for kind in ("cpu", "gpu")}
    root = args.config_dir if args.config_dir is not None else profile_search_dir(site=args.site)
    dest = install_profile(args.name, root, partitions, args.account or os.environ.get(ACCOUNT_ENV) or None, source)
    log.info("installed %s (from %s); from the repository root run: snakemake --profile %s", dest, source, args.name)
    return 0
