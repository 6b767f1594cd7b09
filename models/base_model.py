"""What every model shares: saving, loading, schedules, and the lists that make logging generic.

A subclass fills ``loss_names``, ``model_names``, ``visual_names`` and ``optimizers`` and
implements ``set_input``, ``forward`` and ``optimize_parameters``. Networks are saved as
plain state dicts of CPU tensors, ``<label>_net_<name>.pth``, exactly as upstream names them;
beside them ``<label>_train_state.pth`` holds optimiser and schedule state for resuming and
``<label>_train_state.json`` the epoch and iteration it was saved at.
"""

from __future__ import annotations

import argparse
import json
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models.networks import get_scheduler
from util.atomic import atomic_path

logger = logging.getLogger(__name__)

# Keys that old checkpoints of instance-normalised networks may carry and ours do not.
_STALE_NORM_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def read_train_state(run_folder: Path, label: str) -> dict | None:
    """``{"epoch": ..., "total_iters": ...}`` saved with checkpoint ``label``, or None."""
    path = Path(run_folder) / f"{label}_train_state.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def atomic_torch_save(obj, path: Path) -> None:
    """Save to a temporary name, then rename: an interrupted save never corrupts ``path``."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing or does not fit the network."""


class BaseModel(ABC):
    """Base class of ``--model`` plug-ins.

    Args:
        opt: the parsed options (the model layer is the lowest one that reads ``opt``).
        device: where the networks run.
    """

    def __init__(self, opt: argparse.Namespace, device: torch.device):
        self.opt = opt
        self.is_train = opt.isTrain
        self.device = device
        self.save_dir = Path(opt.checkpoints_dir) / opt.name
        self.loss_names: list[str] = []
        self.model_names: list[str] = []
        self.visual_names: list[str] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list = []
        self.metric = 0.0  # for the plateau schedule

    @staticmethod
    def modify_commandline_options(parser: argparse.ArgumentParser, is_train: bool) -> argparse.ArgumentParser:
        """Add model-specific flags or change defaults."""
        return parser

    @abstractmethod
    def set_input(self, batch: dict) -> None: ...

    @abstractmethod
    def forward(self) -> None: ...

    @abstractmethod
    def optimize_parameters(self) -> None: ...

    # -- set-up ---------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {name: getattr(self, f"net{name}") for name in self.model_names}

    def setup(self, opt: argparse.Namespace) -> None:
        """Create schedules; load networks for testing or resuming; sync ranks under torchrun."""
        if self.is_train:
            self.schedulers = [
                get_scheduler(
                    optimizer, opt.lr_policy, epoch_count=opt.epoch_count, n_epochs=opt.n_epochs,
                    n_epochs_decay=opt.n_epochs_decay, lr_decay_iters=opt.lr_decay_iters,
                )
                for optimizer in self.optimizers
            ]
        if not self.is_train or opt.continue_train:
            label = f"iter_{opt.load_iter}" if opt.load_iter > 0 else opt.epoch
            self.load_networks(label)
            if self.is_train:
                self.load_train_state(label)
        if dist.is_available() and dist.is_initialized():
            for net in self.networks().values():
                for tensor in net.state_dict().values():
                    dist.broadcast(tensor, src=0)  # every rank starts from rank 0's weights
        if opt.verbose:
            self.print_networks()

    def eval(self) -> None:
        for net in self.networks().values():
            net.eval()

    def train(self) -> None:
        for net in self.networks().values():
            net.train()

    @torch.no_grad()
    def test(self) -> None:
        self.forward()

    # -- reporting ------------------------------------------------------------------------
    def get_current_losses(self) -> OrderedDict[str, float]:
        return OrderedDict((name, getattr(self, f"loss_{name}").item()) for name in self.loss_names)

    def get_current_visuals(self) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((name, getattr(self, name)) for name in self.visual_names)

    def print_networks(self) -> None:
        for name, net in self.networks().items():
            count = sum(p.numel() for p in net.parameters())
            logger.info("[Network %s] %d parameters (%.3f M)\n%s", name, count, count / 1e6, net)

    def update_learning_rate(self) -> float:
        """Step every schedule once (at the end of an epoch); returns the new learning rate."""
        for scheduler in self.schedulers:
            if self.opt.lr_policy == "plateau":
                scheduler.step(self.metric)
            else:
                scheduler.step()
        return self.optimizers[0].param_groups[0]["lr"]

    # -- checkpoints ----------------------------------------------------------------------
    def save_networks(self, label: str | int) -> None:
        """Write ``<label>_net_<name>.pth`` (CPU state dicts) for every network."""
        self.save_dir.mkdir(parents=True, exist_ok=True)
        for name, net in self.networks().items():
            state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            atomic_torch_save(state, self.save_dir / f"{label}_net_{name}.pth")

    def save_train_state(self, label: str | int, epoch: int, total_iters: int) -> None:
        """Optimiser and schedule state, plus the epoch and iteration, saved beside the networks."""
        state = {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }
        atomic_torch_save(state, self.save_dir / f"{label}_train_state.pth")
        counters = self.save_dir / f"{label}_train_state.json"
        with atomic_path(counters) as temporary:
            temporary.write_text(json.dumps({"epoch": epoch, "total_iters": total_iters}))

    def load_networks(self, label: str | int) -> None:
        """Load ``<label>_net_<name>.pth`` into every network.

        Raises:
            CheckpointError: a file is missing, unreadable or built for another network.
        """
        for name, net in self.networks().items():
            path = self.save_dir / f"{label}_net_{name}.pth"
            load_state_dict_file(net, path, self.device)

    def load_train_state(self, label: str | int) -> None:
        path = self.save_dir / f"{label}_train_state.pth"
        if not path.is_file():
            logger.warning("%s not found: optimisers and schedules start afresh", path)
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)


def load_state_dict_file(net: nn.Module, path: Path, device: torch.device) -> None:
    """Load a plain state-dict file into ``net``, accepting upstream's and DataParallel's variants.

    Raises:
        CheckpointError: missing file, unreadable file, or keys/shapes that do not fit ``net``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (check --name, --epoch and --checkpoints_dir)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if k != "_metadata"}
    expected = net.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith(_STALE_NORM_KEYS)}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise CheckpointError(
            f"{path}: does not fit the network built from the options ({detail}); "
            "was it trained with another --netG, --norm, --ngf or --input_nc?"
        ) from err
