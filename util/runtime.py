"""One place that sets device, seeds, backend flags and (under torchrun) the process group."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from util.device import select_device
from util.fast_path import tf32_allowed


@dataclass(frozen=True)
class Runtime:
    """Where this process runs. ``rank``/``world_size`` are 0/1 outside torchrun."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(opt: argparse.Namespace) -> Runtime:
    """Pick the device, seed every generator and, under torchrun, join the process group.

    Under torchrun each process takes GPU ``LOCAL_RANK`` (or the CPU with ``--gpu_ids -1``,
    using the gloo backend, which is how the multi-process path is tested without GPUs).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None
    device = select_device(opt.gpu_ids, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Fixed slice sizes: let cuDNN pick the fastest kernels once. TF32 matmuls and convolutions
        # on Ampere+, except for the upstream step (--precision fp32).
        torch.backends.cudnn.benchmark = True
        tf32 = tf32_allowed(getattr(opt, "precision", "auto"))  # test.py has no --precision
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    seed = opt.seed + rank  # different shuffles and flips per process; weights come from rank 0
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return Runtime(device=device, rank=rank, world_size=world_size)


def capture_rng() -> dict:
    """Every random generator's state (Python, NumPy, torch, CUDA), in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what :func:`capture_rng` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(runtime: Runtime) -> list[dict]:
    """Every rank's :func:`capture_rng` (a collective call under torchrun)."""
    mine = capture_rng()
    if not runtime.distributed:
        return [mine]
    states: list = [None] * runtime.world_size
    dist.all_gather_object(states, mine)
    return states


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not break a tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def setup_logging(log_file: Path | None, verbose: bool = False, quiet: bool = False) -> None:
    """Log to the console (unless ``quiet``) and, if given, to ``log_file``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not quiet:
        console = _TqdmHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(to_file)
