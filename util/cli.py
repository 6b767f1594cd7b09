"""How every script ends: success, one error line for a user's mistake, or 128 + the signal on an interrupt."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

import torch

# OS errors a user can fix (a full disk, a read-only or vanished folder): one line naming the path.
_USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT)


def run_reporting_errors(
    prog: str,
    main: Callable[[], int | None],
    user_errors: tuple[type[BaseException], ...],
    interrupted: str = "interrupted",
) -> int:
    """Run ``main()`` and return the script's exit code.

    An error in ``user_errors`` (a bad file, a missing checkpoint: its message names the
    file) becomes exactly one line on stderr, ``<prog>: error: <message>``, and exit code 1,
    without a traceback. So do CUDA running out of memory (with advice) and the OS errors a
    user can fix (disk full, read-only folder, a file that vanished), naming the path. An
    interrupt prints its own message (``interrupted`` for a plain Ctrl-C) and gives 128 +
    the signal number (130 for Ctrl-C).
    """
    try:
        return main() or 0
    except user_errors as err:
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
