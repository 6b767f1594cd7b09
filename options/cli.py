"""How every script starts and ends: its parser, the flags the inference scripts share, its exit.

* **Start.** :class:`OneLineErrorParser` is the parser of every script (train.py and test.py
  through options/base_options.py): a bad flag is one line on stderr and exit code 2, and
  on/off flags also take ``True``/``False`` (:class:`BooleanFlag`). use_model.py,
  batch_process_patients.py and export_model.py build theirs with :func:`new_parser` and add
  the flags they share with :func:`add_checkpoint_arguments` and
  :func:`add_translation_arguments`, so the scripts cannot drift apart. (``--gpu_ids``, which
  every script but export_model.py takes, is util/device.py's.)
* **End.** :func:`run_reporting_errors` runs a script's ``main``: a
  :class:`~util.errors.UserError` (a bad file, flag, run folder or device), CUDA running out of
  memory and the OS errors a user can fix become one line, ``<prog>: error: <message>``, and
  exit code 1, without a traceback; Ctrl-C and SIGTERM exit with 128 + the signal.
  :func:`run_cli` is parse-then-run for the inference scripts.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence

import torch

from data.volume_io import OUTPUT_DTYPES
from util.errors import UserError
from util.registry import unknown_name_error

# OS errors a user can fix (a full disk, a read-only or vanished folder): one line naming the path.
_USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT)


# -- parsers ------------------------------------------------------------------------------
def parse_bool(text: str) -> bool:
    """``True``/``False`` (any case; also yes/no, 1/0) -> bool."""
    word = text.strip().lower()
    if word in ("true", "yes", "1"):
        return True
    if word in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class BooleanFlag(argparse.Action):
    """An on/off flag: given bare (``--axial_slice``) it is on, and it also takes an explicit
    value (``--axial_slice True``, ``--axial_slice False``), as the reference's parameter
    table writes its flags. Default off."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs="?", const=True, default=default, type=parse_bool,
                         required=required, help=help, metavar="True|False")

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2, and whose
    ``action="store_true"`` flags are :class:`BooleanFlag` (they also take True/False)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Registered by name, so that plug-ins' flags and argument groups get it too.
        self.register("action", "store_true", BooleanFlag)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def _check_value(self, action, value):
        # argparse lists the choices; we also suggest the closest one, as every registry does.
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, str(unknown_name_error("value", value, map(str, action.choices))))


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of an inference script: one-line flag errors, defaults shown in ``--help``."""
    return OneLineErrorParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


# -- flags the inference scripts share ------------------------------------------------------
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
    g.add_argument(
        "--direction",
        default=None,
        choices=("AtoB", "BtoA"),
        help="which way to translate: a cycle_gan run's G_A (AtoB) or G_B (BtoA); a pix2pix run has one "
        "generator, for the direction it was trained in (the default: the run's --direction)",
    )


def add_output_dtype_argument(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--output_dtype``, for every script that writes generated volumes (test.py too)."""
    group.add_argument(
        "--output_dtype",
        default="int16",
        choices=OUTPUT_DTYPES,
        help="data type of the written volumes (int16: HU rounded to whole numbers)",
    )


def add_translation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output_dtype``, ``--frame``, ``--batch_size``, ``--no_slices``, ``--precision``, ``--verbose``:
    how volumes are translated and written; then :func:`add_phase_output_arguments`."""
    g = parser.add_argument_group("volumes")
    add_output_dtype_argument(g)
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
    g.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="how the network runs: auto is bf16 autocast on a CUDA GPU that has it (fp16 on older ones) and "
        "fp32 on the CPU; fp32 gives test.py's numbers",
    )
    g.add_argument(
        "--verbose", action="store_true", help="print the time of each stage: load model, read, network, write"
    )
    add_phase_output_arguments(parser)


def add_phase_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--split_phases``, ``--mip``, ``--average``: what is written of a model trained on several
    phases (``train.py --phases all``); see inference/volume.py's ``PhaseOutputs``."""
    g = parser.add_argument_group(
        "the whole breathing cycle (a model trained with --phases all or a list)",
        "such a model writes its phases as one 4D <name>_phases.nii.gz, frame k = the k-th phase it was trained "
        "on; a model of one phase K writes <name>_phase<K>.nii.gz",
    )
    g.add_argument("--split_phases", action="store_true",
                   help="write one 3D file per phase, <name>_phase<K>.nii.gz, instead of one 4D file")
    g.add_argument("--mip", action="store_true",
                   help="also write <name>_mip.nii.gz, the maximum-intensity projection over the generated phases")
    g.add_argument("--average", action="store_true",
                   help="also write <name>_average.nii.gz, the mean of the generated phases, and report its MAE "
                   "against the input in the body (a good model's average of phases equals its input)")


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


# -- the end of a script --------------------------------------------------------------------
def run_cli(
    main: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` (default: the command line), run ``main(opt)`` and return the exit code
    (see :func:`run_reporting_errors`). ``main`` returns None (success) or an exit code."""
    opt = parser.parse_args(argv)
    return run_reporting_errors(parser.prog, lambda: main(opt))


def run_reporting_errors(prog: str, main: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run ``main()`` and return the script's exit code.

    A :class:`~util.errors.UserError` (a bad file, a missing checkpoint: its message names the
    file) becomes exactly one line on stderr, ``<prog>: error: <message>``, and exit code 1,
    without a traceback. So do CUDA running out of memory (with advice) and the OS errors a
    user can fix (disk full, read-only folder, a file that vanished), naming the path. An
    interrupt prints its own message (``interrupted`` for a plain Ctrl-C) and gives 128 +
    the signal number (130 for Ctrl-C).
    """
    try:
        return main() or 0
    except UserError as err:
        return _error(prog, str(err))
    except torch.OutOfMemoryError as err:
        return _error(prog, out_of_memory_message(err))
    except OSError as err:
        if err.errno not in _USER_OS_ERRORS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        return _error(prog, f"{where}{err.strerror or err}")
    except KeyboardInterrupt as err:
        print(f"{prog}: {str(err) or interrupted}", file=sys.stderr)
        return getattr(err, "exit_code", 130)


def out_of_memory_message(err: BaseException) -> str:
    """One line for CUDA running out of memory, with what to change."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"CUDA out of memory ({first[:160]}); lower --batch_size, or use smaller slices with a matching "
        "U-Net (e.g. --resize_to 256 --netG unet_256); for inference lower --batch_size"
    )


def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1
