"""Command-line interface: builds the parser and dispatches, nothing else.

Each stage is one subcommand (``unet-pipe STAGE --help``) defined in its own
module ``cli_<stage>`` (``cli_ingest`` holds ingest and info, ``cli_config``
check-config and install-profile, ``cli_segment`` segment and tiff).  The options,
checks and error handling they share live in :mod:`unet_pipe.cli_common`: a user
mistake (bad file, bad config, foreign checkpoint) is printed as one line
``unet-pipe: error: <file>: <problem>`` with exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn, Sequence

from unet_pipe import __version__
from unet_pipe.cli_bundle import add_bundle
from unet_pipe.cli_calibrate import add_calibrate
from unet_pipe.cli_common import run_command
from unet_pipe.cli_config import add_check_config, add_install_profile
from unet_pipe.cli_evaluate import add_evaluate
from unet_pipe.cli_export import add_export
from unet_pipe.cli_ingest import add_info, add_ingest
from unet_pipe.cli_postprocess import add_postprocess
from unet_pipe.cli_predict import add_predict
from unet_pipe.cli_report import add_report
from unet_pipe.cli_segment import add_segment, add_tiff
from unet_pipe.cli_summary import add_summarize
from unet_pipe.cli_synth import add_synth
from unet_pipe.cli_train import add_train
from unet_pipe.cli_view import add_view
from unet_pipe.cli_weights import add_weights
from unet_pipe.errors import UnetPipeError

log = logging.getLogger("unet_pipe")


# ---------------------------------------------------------------------- driver

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_synth,
    add_ingest,
    add_check_config,
    add_install_profile,
    add_info,
    add_weights,
    add_train,
    add_calibrate,
    add_postprocess,
    add_evaluate,
    add_report,
    add_predict,
    add_view,
    add_export,
    add_bundle,
    add_segment,
    add_summarize,
    add_tiff,
]


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in the project's one-line form (exit 2, as argparse does)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("unet-pipe").strip()  # "predict", or "" for the top level
        line = UnetPipeError(command or None, f"{message} (see {self.prog} --help)")
        self.exit(2, f"unet-pipe: error: {line}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unet-pipe", description="U-Net segmentation of EM stacks (Ronneberger et al. 2015), stage by stage.",
        epilog="@FILE anywhere on the command line stands for the arguments in FILE, one per line "
               "(the workflow passes each job's settings so; see results/logs/args/).",
        # The workflow's rules hand their options over as @FILE: a short, readable command line.
        fromfile_prefix_chars="@",
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return run_command(args)
