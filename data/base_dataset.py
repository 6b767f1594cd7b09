"""The interface every ``--dataset_mode`` plug-in implements."""

from __future__ import annotations

import argparse

import torch.utils.data


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file or folder and the problem."""


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
