"""SIGINT and SIGTERM during training: the first asks for a save and a stop, a second stops at once.

Job schedulers send SIGTERM some seconds before they kill a job; people press Ctrl-C.
Either way a day of training should not be lost. Once training proper has started
(:meth:`StopRequests.arm`), the first signal only sets a flag: the loop finishes the step
it is in, saves ``latest`` with the counters of that step and raises :class:`Interrupted`
(``saved=True``). A second signal, or any signal before training started (while the slice
cache is built), raises :class:`Interrupted` (``saved=False``) at once; the checkpoint
save in progress, if any, is abandoned whole (see util/run_folder.py), so nothing claims a
save that did not happen.
"""

from __future__ import annotations

import logging
import signal

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal. ``str(err)`` is the line for the user; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int, saved: bool):
        super().__init__(message)
        self.signum = signum
        self.saved = saved
        self.exit_code = 128 + signum


class StopRequests:
    """Turns SIGINT/SIGTERM into a request the training loop polls (:attr:`requested`)."""

    def __init__(self):
        self.signum: int | None = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequests:
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def arm(self) -> None:
        """From now on the first signal asks for a save instead of stopping at once."""
        self.armed = True

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(
                f"interrupted by {name} before training started (while reading the data and building the "
                "slice cache); nothing was saved", signum, saved=False,
            )
        if self.signum is None:
            self.signum = signum
            logger.warning("%s received: saving 'latest' after this step, then stopping (send it again to stop at "
                           "once without saving)", name)
            return
        raise Interrupted(
            f"second signal ({name}): stopped at once without saving; 'latest' holds the last complete save",
            signum, saved=False,
        )
