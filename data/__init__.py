"""Dataset plug-ins: ``--dataset_mode Y`` finds ``data/Y_dataset.py``.

A plug-in module defines a :class:`data.base_dataset.BaseDataset` subclass and registers it
with ``@DATASETS.register("Y")``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.utils.data

from util.registry import PluginRegistry

DATASETS = PluginRegistry("dataset mode", "data", Path(__file__).parent, "_dataset")
DATASET_MODES = DATASETS.names


def find_dataset_using_name(dataset_mode: str):
    """The dataset class registered as ``dataset_mode`` (imports its module)."""
    return DATASETS.load(dataset_mode)


def get_option_setter(dataset_mode: str):
    return find_dataset_using_name(dataset_mode).modify_commandline_options


def create_dataset(opt: argparse.Namespace):
    """Build the dataset named by ``opt.dataset_mode``."""
    return find_dataset_using_name(opt.dataset_mode)(opt)


def create_dataloader(
    dataset,
    opt: argparse.Namespace,
    sampler=None,
    *,
    pin_memory: bool = False,
    persistent_workers: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with the loader flags of ``opt``.

    Args:
        dataset: a map-style dataset, e.g. from :func:`create_dataset`.
        opt: supplies ``num_threads`` (worker processes), ``batch_size`` and ``serial_batches``.
        sampler: e.g. a ``DistributedSampler`` under torchrun; shuffling is then its job.
        pin_memory: page-locked batches for faster copies to the GPU (ask for it when
            the batches go to a CUDA device).
        persistent_workers: keep worker processes between epochs; default: when there are
            workers (benchmarks/data_throughput.py measures both).
        generator: draws the loader's base seed (worker seeds) instead of the global
            generator, so that starting an epoch consumes nothing of the global state
            (resumed training repeats dropout exactly).
    """
    workers = int(opt.num_threads)
    if persistent_workers is None:
        persistent_workers = workers > 0
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=opt.batch_size,
        shuffle=(sampler is None and not opt.serial_batches),
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and workers > 0,
        collate_fn=getattr(dataset, "collate_fn", None),
        drop_last=False,
        generator=generator,
    )
