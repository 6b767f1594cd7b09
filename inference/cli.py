"""Command-line pieces shared by use_model.py, batch_process_patients.py and export_model.py.

Each flag is defined once here and added to every script that takes it, so the scripts
cannot drift apart (``--gpu_ids``, which train.py and test.py take too, is util/device.py's).
:func:`run_cli` turns the errors a user can cause (a bad file, a missing checkpoint) into
one line on stderr and exit code 1, without a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from data.volume_io import OUTPUT_DTYPES, VolumeError
from models.base_model import CheckpointError
from options.base_options import OneLineErrorParser, OptionsError
from util.cli import run_reporting_errors

# Errors that mean "this input or this run folder cannot be used", as opposed to a bug.
# Each message starts with the file at fault.
USER_ERRORS = (VolumeError, CheckpointError, OptionsError)


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose flag errors are one line on stderr (exit code 2)."""
    return OneLineErrorParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model_name``, ``--epoch``, ``--checkpoints_dir``: which trained generator to load.

    Everything else about the network (``--netG``, ``--norm``, ``--resize_to``, the
    intensity window, ...) comes from the run folder's ``train_opt.json``.
    """
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model_name",
        required=True,
        help="the run's --name at training: weights are read from <checkpoints_dir>/<model_name>/",
    )
    g.add_argument("--epoch", default="latest", help="which checkpoint: latest, or an epoch number (<epoch>_net_G.pth)")
    g.add_argument("--checkpoints_dir", default="./checkpoints", help="folder that holds the run folders")


def add_translation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output_dtype``, ``--frame``, ``--batch_size``, ``--no_slices``: how volumes are translated and written."""
    g = parser.add_argument_group("volumes")
    g.add_argument(
        "--output_dtype",
        default="int16",
        choices=OUTPUT_DTYPES,
        help="data type of the written volume (int16: HU rounded to whole numbers)",
    )
    g.add_argument(
        "--frame",
        type=_non_negative_int,
        default=None,
        help="for 4D inputs with several frames: which frame (0-based) to translate",
    )
    g.add_argument(
        "--batch_size", type=_positive_int, default=8, help="slices per forward pass (lower it if memory runs out)"
    )
    g.add_argument("--no_slices", action="store_true", help="do not write the PNG slices, only the volume")


def run_cli(
    main: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run ``main(opt)`` and return the exit code.

    A user error (:data:`USER_ERRORS`) becomes exactly one line on stderr,
    ``<prog>: error: <path>: <problem>``, and exit code 1; Ctrl-C exits with 130.
    ``main`` returns None (success) or an exit code.
    """
    opt = parser.parse_args(argv)
    return run_reporting_errors(parser.prog, lambda: main(opt), USER_ERRORS)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value
