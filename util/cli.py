"""How every script ends: success, one error line for a user's mistake, or 130 on Ctrl-C."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_reporting_errors(
    prog: str,
    main: Callable[[], int | None],
    user_errors: tuple[type[BaseException], ...],
    interrupted: str = "interrupted",
) -> int:
    """Run ``main()`` and return the script's exit code.

    An error in ``user_errors`` (a bad file, a missing checkpoint: its message names the
    file) becomes exactly one line on stderr, ``<prog>: error: <message>``, and exit code 1,
    without a traceback; Ctrl-C prints ``<prog>: <interrupted>`` and gives 130.
    """
    try:
        return main() or 0
    except user_errors as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
