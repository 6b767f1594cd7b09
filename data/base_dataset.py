"""The interface every ``--dataset_mode`` plug-in implements."""

from __future__ import annotations

import argparse

import torch.utils.data

from util.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used; the message names the file or folder and the problem."""


class CacheError(DatasetError):
    """The slice cache (``--cache_dir``) cannot be written, or vanished while a run read it.

    Not a problem of one volume: ``--skip_corrupted`` does not skip it, the run stops with
    one line naming the cache path, the problem and what to do.
    """

    def __init__(self, message: str):
        # Raised in a DataLoader worker, it reaches the main process rebuilt from torch's
        # "Caught CacheError in DataLoader worker process N.\nOriginal Traceback ...", whose
        # last line is "data.base_dataset.CacheError: <message>": keep the one line.
        if message.startswith(f"Caught {type(self).__name__} "):
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class BaseDataset(torch.utils.data.Dataset):
    """A map-style dataset of paired samples ``{"A": tensor, "B": tensor, "A_paths": ..., ...}``.

    Subclasses add their own flags in :meth:`modify_commandline_options` and register
    themselves in ``data.DATASETS`` under the name that ``--dataset_mode`` takes.
    """

    # How a DataLoader joins samples into a batch (create_dataloader passes it on);
    # None: torch's default_collate.
    collate_fn = None

    @staticmethod
    def modify_commandline_options(parser: argparse.ArgumentParser, is_train: bool) -> argparse.ArgumentParser:
        return parser

    def summary_lines(self) -> list[str]:
        """Lines describing what was loaded (printed and logged at start)."""
        return []
