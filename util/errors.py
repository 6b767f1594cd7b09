"""The one base class of the errors that a user should see as a single line, not a traceback.

A :class:`UserError` means "this input, flag, run folder or machine cannot be used", never a
bug: its message names the file or flag at fault, says what is wrong and, where it can, what
to do. Every script ends through ``options/cli.py``'s ``run_reporting_errors``, which turns
any of them into ``<script>: error: <message>`` on stderr and exit code 1.

Each package raises its own kind, defined beside the code that raises it, so that callers can
still catch one kind (``except VolumeError``)::

    UserError
    ├── VolumeError      data/volume_io.py      a file that cannot be used as a volume
    ├── DatasetError     data/base_dataset.py   a data set that cannot be used
    │   └── CacheError                          the slice cache cannot be written
    ├── CheckpointError  util/run_folder.py     a run folder or checkpoint missing, damaged or in use
    ├── OptionsError     options/base_options.py  flag values that cannot work together
    ├── DeviceError      util/device.py         GPUs asked for that the machine lacks
    └── NonFiniteError   models/base_model.py   a loss or weight that is NaN or Inf

Each also derives from the built-in exception it was before this base existed (ValueError,
FileNotFoundError, RuntimeError), so ``except ValueError`` still catches a VolumeError.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message is all a user needs: ``str(err)`` names what is at fault and why."""
