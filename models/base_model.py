"""What every model shares: checkpoints, schedules, and the lists that make logging generic.

A subclass fills ``loss_names``, ``model_names``, ``visual_names`` and ``optimizers`` and
implements ``set_input``, ``forward`` and ``optimize_parameters``. Under torchrun, its training
step runs each network that learns through :meth:`BaseModel.replica` (the network wrapped in
DistributedDataParallel); the bare networks (``netG``, ...) are what is saved, loaded,
validated and shown, so checkpoints keep upstream's keys. Where and how a
checkpoint is written is the run folder's business (util/run_folder.py); the model hands it
its networks' state dicts (never with NaN/Inf in them) and its optimiser and schedule state.

A training step goes ``start_step()``; per optimiser, forward and losses under
``fast_path.autocast()``, then ``backward(loss, *names)`` and ``step(optimizer)``; then
``end_step()``. ``backward`` notes on the device whether a loss of ``names`` is NaN/Inf (on
any process); ``step`` then leaves that optimiser's weights and state untouched, and so does
every later ``step`` of the same training step. Nothing is read on the host unless Adam is not
fused (util/fast_path.py); the loop reads ``loss_vector()`` and ``step_nonfinite`` when it needs them.
"""

from __future__ import annotations

import argparse
import logging
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.networks import get_scheduler
from util.errors import UserError
from util.fast_path import FastPath, load_optimizer_state
from util.run_folder import Checkpoint, CheckpointError, checkpoint_label, open_checkpoint

__all__ = ["BaseModel", "NonFiniteError", "load_state_dict_file"]

logger = logging.getLogger(__name__)

# Keys that old checkpoints of instance-normalised networks may carry and ours do not.
_STALE_NORM_KEYS = ("running_mean", "running_var", "num_batches_tracked")


class NonFiniteError(UserError, ValueError):
    """A loss or a weight that is NaN or Inf: training cannot go on from it, and it is never saved."""

    def __init__(self, message: str, losses: dict[str, float] | None = None):
        super().__init__(message)
        self.losses = losses or {}


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
        self.replicas: dict[str, DistributedDataParallel] = {}  # under torchrun, filled by setup()
        # How the training step runs (precision, fused Adam, memory format); plain fp32 for testing.
        self.fast_path = FastPath.from_options(opt, device) if self.is_train else FastPath(device)
        self.grad_scaler = self.fast_path.new_grad_scaler()  # fp16 only
        self.step_nonfinite = torch.zeros((), device=device)  # 1.0 once a loss of this training step is NaN/Inf

    @staticmethod
    def modify_commandline_options(parser: argparse.ArgumentParser, is_train: bool) -> argparse.ArgumentParser:
        """Add model-specific flags or change defaults."""
        return parser

    @staticmethod
    def option_problems(opt: argparse.Namespace) -> str | None:
        """Why the parsed options cannot work with this model (one line for the user), or None.

        The options' validation calls it, so a bad combination stops before any data is read.
        """
        return None

    @abstractmethod
    def set_input(self, batch: dict) -> None: ...

    @abstractmethod
    def forward(self) -> None: ...

    @abstractmethod
    def optimize_parameters(self) -> None: ...

    # -- set-up ---------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {name: getattr(self, f"net{name}") for name in self.model_names}

    def learning_networks(self) -> list[str]:
        """The networks whose optimisers step in training (wrapped in DDP under torchrun)."""
        return list(self.model_names) if self.is_train else []

    def replica(self, name: str) -> nn.Module:
        """What a training step runs for network ``name``: under torchrun its DDP wrapper, whose
        backward pass averages the gradients over the processes; else the network itself."""
        return self.replicas.get(name, getattr(self, f"net{name}"))

    def setup(self, opt: argparse.Namespace) -> Checkpoint | None:
        """Create schedules; load networks for testing or resuming; sync ranks under torchrun.

        Returns:
            The checkpoint resumed from (its counters say where training continues), or None.
        """
        checkpoint = None
        if self.is_train:
            self.schedulers = [self._new_scheduler(optimizer, opt.epoch_count) for optimizer in self.optimizers]
        if not self.is_train or opt.continue_train:
            label = checkpoint_label(opt.epoch, opt.load_iter)
            checkpoint = open_checkpoint(self.save_dir, label, verify=self.is_train)
            self.load_networks(checkpoint)
            if self.is_train:
                self.load_training_state(checkpoint, opt.epoch_count)
        if dist.is_available() and dist.is_initialized():
            for net in self.networks().values():
                for tensor in net.state_dict().values():
                    dist.broadcast(tensor, src=0)  # every rank starts from rank 0's weights
            if dist.get_world_size() > 1:
                self.replicas = {name: self._replicate(getattr(self, f"net{name}")) for name in self.learning_networks()}
        if opt.verbose:
            self.print_networks()
        return checkpoint

    def _replicate(self, net: nn.Module) -> DistributedDataParallel:
        """``net`` in DDP: gradients are averaged in buckets while the backward pass still runs."""
        return DistributedDataParallel(
            net,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            init_sync=False,  # setup() has just broadcast rank 0's weights and buffers
            # Buffers (batch norm's running statistics; instance norm has none) stay each
            # process's own, as with one process: rank 0's are saved. Syncing them would cost a
            # broadcast before each of D's two or three forward passes per step.
            forward_sync_buffers=False,
        )

    def _new_scheduler(self, optimizer: torch.optim.Optimizer, epoch_count: int):
        opt = self.opt
        return get_scheduler(optimizer, opt.lr_policy, epoch_count=epoch_count, n_epochs=opt.n_epochs,
                             n_epochs_decay=opt.n_epochs_decay, lr_decay_iters=opt.lr_decay_iters)

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

    def loss_vector(self) -> torch.Tensor:
        """(len(loss_names),) float32 on the device: this step's losses, in ``loss_names`` order, not yet read."""
        return torch.stack([torch.as_tensor(getattr(self, f"loss_{name}"), device=self.device).detach().float()
                            for name in self.loss_names])

    # -- the training step ----------------------------------------------------------------
    def start_step(self) -> None:
        """A new training step: none of its losses is non-finite yet."""
        self.step_nonfinite = torch.zeros((), device=self.device)

    def backward(self, loss: torch.Tensor, *names: str) -> None:
        """Back-propagate ``loss``, first noting on the device whether a loss of ``names`` is NaN/Inf.

        Under torchrun the note is the maximum over the processes, so that all of them skip the
        same steps (else the next all-reduce would wait forever). With a gradient scaler (fp16)
        the loss is scaled, and a non-finite step's loss is multiplied by NaN so that every
        gradient is NaN: the scaler's own check then skips the optimiser step.
        """
        losses = [getattr(self, f"loss_{name}", None) for name in names]  # D_GP only with wgangp
        values = torch.stack([value.detach().float() for value in losses if isinstance(value, torch.Tensor)])
        nonfinite = (~torch.isfinite(values)).any().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        self.step_nonfinite = torch.maximum(self.step_nonfinite, nonfinite)
        if self.grad_scaler is not None:
            poison = torch.where(self.step_nonfinite > 0, math.nan, 1.0)
            loss = self.grad_scaler.scale(loss * poison)
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` unless a loss of this training step was NaN/Inf: then its weights, moments and
        step count stay as they were."""
        if self.grad_scaler is not None:
            self.grad_scaler.step(optimizer)  # skips where gradients are not finite (see backward)
        elif self.fast_path.fused_adam:
            # The contract GradScaler uses: a fused optimiser skips its update, in the kernel, where found_inf is 1.
            optimizer.found_inf = self.step_nonfinite
            optimizer.step()
        elif not bool(self.step_nonfinite):  # read on the host: Adam not fused cannot skip on the device
            optimizer.step()

    def end_step(self) -> None:
        """After the last ``step`` of a training step: the gradient scaler adapts its scale."""
        if self.grad_scaler is not None:
            self.grad_scaler.update()

    def get_current_visuals(self) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((name, getattr(self, name)) for name in self.visual_names)

    def print_networks(self) -> None:
        for name, net in self.networks().items():
            count = sum(p.numel() for p in net.parameters())
            logger.info("[Network %s] %d parameters (%.3f M)\n%s", name, count, count / 1e6, net)

    def update_learning_rate(self) -> float:
        """Step every schedule once (at the end of an epoch); returns the new learning rate.

        The plateau policy follows ``self.metric``, which the training loop sets (the
        validation MAE when there is validation, else the epoch's mean L1 loss).
        """
        for scheduler in self.schedulers:
            if self.opt.lr_policy == "plateau":
                scheduler.step(self.metric)
            else:
                scheduler.step()
        return self.optimizers[0].param_groups[0]["lr"]

    # -- checkpoints ----------------------------------------------------------------------
    def network_states(self) -> dict[str, dict]:
        """Each network's state dict, checked finite.

        Raises:
            NonFiniteError: a weight or buffer holds NaN/Inf; nothing may be saved from it.
        """
        states = {}
        for name, net in self.networks().items():
            state = net.state_dict()
            for key, tensor in state.items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise NonFiniteError(f"network {name} holds NaN/Inf in {key}; such weights are never saved")
            states[name] = state
        return states

    def training_state(self, with_optimizers: bool) -> dict:
        """Schedules and, if asked, optimisers: what resuming needs besides the weights."""
        state: dict = {"schedulers": [s.state_dict() for s in self.schedulers]}
        if with_optimizers:
            state["optimizers"] = [o.state_dict() for o in self.optimizers]
        if self.grad_scaler is not None:  # fp16: the loss scale that training has found
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_networks(self, checkpoint: Checkpoint) -> None:
        """Load every network from ``checkpoint``'s files.

        Raises:
            CheckpointError: a file is missing, unreadable or built for another network.
        """
        for name, net in self.networks().items():
            path = checkpoint.files.get(f"net_{name}", self.save_dir / f"{checkpoint.label}_net_{name}.pth")
            load_state_dict_file(net, path, self.device)

    def load_training_state(self, checkpoint: Checkpoint, epoch_count: int) -> dict:
        """Restore optimisers and schedules from ``checkpoint``; returns the whole saved state.

        Every schedule but plateau (which follows a metric and is loaded) is rebuilt for
        ``epoch_count``, where the saved counters say training continues unless the flag says otherwise.

        Raises:
            CheckpointError: the state file is unreadable or does not fit these optimisers.
        """
        path = checkpoint.files.get("train_state")
        state: dict = {}
        if path is None:
            logger.warning("checkpoint '%s' has no training state: optimisers and schedules start afresh", checkpoint.label)
        else:
            try:
                state = torch.load(path, map_location=self.device, weights_only=True)
                if not isinstance(state, dict):
                    raise TypeError(f"holds a {type(state).__name__}, not a dict")
                optimizers = state.get("optimizers")
                if optimizers is not None:
                    for optimizer, saved in zip(self.optimizers, optimizers, strict=True):
                        load_optimizer_state(optimizer, saved)  # fused or not, as this run asks
                else:
                    logger.warning("%s: no optimiser state kept for this checkpoint; Adam's moments start afresh "
                                   "(--save_optimizer_every_epoch keeps them)", path)
                if self.opt.lr_policy == "plateau" and state.get("schedulers"):
                    for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
                        scheduler.load_state_dict(saved)
                if self.grad_scaler is not None and state.get("grad_scaler"):
                    self.grad_scaler.load_state_dict(state["grad_scaler"])
                elif self.grad_scaler is not None:
                    logger.info("%s: saved without fp16's gradient scaler (another --precision): the loss scale "
                                "starts afresh", path)
            except Exception as err:
                raise CheckpointError(
                    f"{path}: unusable training state ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                    "was it saved by another model or optimiser? Resume from another checkpoint with --epoch"
                ) from err
        if self.opt.lr_policy != "plateau":
            # The schedule is a function of the epoch: rebuild it at epoch_count from the initial
            # lr, stepping as the uninterrupted run stepped, so the lr equals that run's exactly,
            # and follows the schedule flags given now if they changed.
            for i, optimizer in enumerate(self.optimizers):
                for group in optimizer.param_groups:
                    group["lr"] = group.get("initial_lr", self.opt.lr)
                self.schedulers[i] = self._new_scheduler(optimizer, epoch_count)
        checkpoint.train_state = state
        return state


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
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {first})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if k != "_metadata"}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: holds NaN/Inf weights ({bad[0]}); the model is broken, use another checkpoint")
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
