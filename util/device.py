"""``--gpu_ids``, from the command line to a ``torch.device``: defined, checked and turned into a device here.

The flag goes one way, down:

1. :func:`add_gpu_ids_argument` defines it, for every script's parser (train.py and test.py
   through options/base_options.py; use_model.py and batch_process_patients.py directly).
   Its type, :func:`parse_gpu_ids`, refuses ids this machine lacks while the command line
   is parsed, so a bad value is a one-line error (exit code 2) before anything runs.
2. :func:`select_device` makes the one ``torch.device`` of the process (util/runtime.py's
   ``setup_runtime`` for train.py and test.py; use_model.py and batch_process_patients.py
   call it themselves).
3. That device, not the ids, is what the model, ``define_G``/``define_D`` and
   ``load_generator`` take. export_model.py, which has no ``--gpu_ids``, passes :data:`CPU`.

``gpu_ids`` lists stay accepted by ``define_G``/``define_D``/``init_net`` only for code written
against upstream pix2pix (the reference's export snippet calls ``define_G(..., gpu_ids=[0])``);
they go through :func:`select_device` too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from util.errors import UserError

CPU = torch.device("cpu")


class DeviceError(UserError, RuntimeError):
    """GPUs asked for that this machine does not have."""


def gpu_ids_problem(gpu_ids: Sequence[int]) -> str | None:
    """Why this machine cannot serve ``gpu_ids`` (with what to do instead), or None if it can."""
    if not gpu_ids:
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine; use --gpu_ids -1 for the CPU"
    count = torch.cuda.device_count()
    if max(gpu_ids) >= count:
        return f"this machine has {count} GPU(s) (valid ids 0..{count - 1})"
    return None


def parse_gpu_ids(text: str) -> list[int]:
    """argparse type of ``--gpu_ids``: ``"0,1"`` -> ``[0, 1]``, ``"-1"`` -> ``[]`` (the CPU).

    Raises:
        argparse.ArgumentTypeError: not comma-separated integers, or ids this machine lacks.
    """
    try:
        ids = [int(part) for part in str(text).split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0 or 0,1 or -1, got {text!r}") from None
    ids = [i for i in ids if i >= 0]
    problem = gpu_ids_problem(ids)
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return ids


def add_gpu_ids_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                         help_text: str = "GPU to run on, e.g. 0") -> None:
    """Add ``--gpu_ids``; its default is GPU 0 where CUDA is available, else the CPU.

    Args:
        parser: the parser or argument group to add it to.
        help_text: what the ids mean for this script; the default is appended.
    """
    cuda = torch.cuda.is_available()
    parser.add_argument("--gpu_ids", type=parse_gpu_ids, default=[0] if cuda else [],
                        help=f"{help_text}; -1 for the CPU (default here: {'0' if cuda else '-1'})")


def select_device(gpu_ids: Sequence[int], local_rank: int | None = None) -> torch.device:
    """The device this process runs on: the CPU for no ids, else a CUDA device.

    Args:
        gpu_ids: ``--gpu_ids`` (empty for the CPU).
        local_rank: under torchrun, this process's index on its machine: it takes GPU
            ``local_rank`` (torchrun starts one process per GPU). Else GPU ``gpu_ids[0]``.

    Raises:
        DeviceError: CUDA is not available, or the GPU does not exist on this machine.
    """
    gpu_ids = list(gpu_ids)
    if not gpu_ids:
        return CPU
    problem = gpu_ids_problem(gpu_ids)
    if problem:
        raise DeviceError(f"--gpu_ids {','.join(map(str, gpu_ids))}: {problem}")
    if local_rank is None:
        return torch.device("cuda", gpu_ids[0])
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"torchrun process {local_rank} of this machine takes GPU {local_rank}, but the machine has "
                          f"{count}; start at most {count} process(es) per machine (--nproc_per_node)")
    return torch.device("cuda", local_rank)
