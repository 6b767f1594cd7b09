"""Learning-rate schedules for ``--lr_policy`` (upstream pix2pix semantics).

The training loop calls ``scheduler.step()`` once per epoch (``step(metric)`` for
"plateau"), so every period below is counted in epochs, and a scheduler's ``last_epoch``
is the number of epochs complete. A run that starts at ``--epoch_count N`` gets a schedule
advanced by ``N - 1`` steps, so it sits where epoch N of a new run would; a resumed run
loads the saved schedule instead (which is already there). Either way the offset is
counted once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch.optim import Optimizer, lr_scheduler

from util.registry import lookup


def _linear(
    optimizer: Optimizer,
    *,
    epoch_count: int,
    n_epochs: int,
    n_epochs_decay: int,
    lr_decay_iters: int,
) -> lr_scheduler.LRScheduler:
    """Initial lr for ``n_epochs`` epochs, then linearly towards 0 over ``n_epochs_decay``.

    ``done`` epochs complete means epoch ``done + 1`` is running (upstream's formula with
    ``epoch_count`` 1). The ``+ 1`` keeps the last epoch's factor above zero.
    """

    def factor(done: int) -> float:
        return 1.0 - max(0, done + 1 - n_epochs) / float(n_epochs_decay + 1)

    return lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)


def _step(
    optimizer: Optimizer,
    *,
    epoch_count: int,
    n_epochs: int,
    n_epochs_decay: int,
    lr_decay_iters: int,
) -> lr_scheduler.LRScheduler:
    """lr divided by 10 every ``lr_decay_iters`` epochs."""
    return lr_scheduler.StepLR(optimizer, step_size=lr_decay_iters, gamma=0.1)


def _plateau(
    optimizer: Optimizer,
    *,
    epoch_count: int,
    n_epochs: int,
    n_epochs_decay: int,
    lr_decay_iters: int,
) -> lr_scheduler.ReduceLROnPlateau:
    """lr times 0.2 when the metric passed to ``step`` stops falling by 1% for 5 epochs."""
    return lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.2, threshold=0.01, patience=5
    )


def _cosine(
    optimizer: Optimizer,
    *,
    epoch_count: int,
    n_epochs: int,
    n_epochs_decay: int,
    lr_decay_iters: int,
) -> lr_scheduler.LRScheduler:
    """Half a cosine from the initial lr to 0 over ``n_epochs`` epochs."""
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_epochs, eta_min=0)


# Every entry takes (optimizer, *, epoch_count, n_epochs, n_epochs_decay, lr_decay_iters).
LR_POLICIES: dict[str, Callable[..., lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau]] = {
    "linear": _linear,
    "step": _step,
    "plateau": _plateau,
    "cosine": _cosine,
}


def get_scheduler(
    optimizer: Optimizer,
    lr_policy: str,
    *,
    epoch_count: int,
    n_epochs: int,
    n_epochs_decay: int,
    lr_decay_iters: int,
) -> lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau:
    """The scheduler for ``lr_policy`` (a key of :data:`LR_POLICIES`) on ``optimizer``.

    Args:
        optimizer: the optimiser whose learning rate is scheduled.
        lr_policy: "linear" | "step" | "plateau" | "cosine".
        epoch_count: number of the first epoch of this run: the schedule is advanced by
            ``epoch_count - 1`` epochs (every policy but plateau, which follows a metric).
        n_epochs: epochs at the initial lr (linear); the cosine period (cosine).
        n_epochs_decay: epochs of linear decay to 0 (linear).
        lr_decay_iters: epochs between tenfold drops (step).

    Raises:
        ValueError: unknown ``lr_policy``.
    """
    build = lookup(LR_POLICIES, lr_policy, "learning-rate policy (--lr_policy)")
    scheduler = build(
        optimizer,
        epoch_count=epoch_count,
        n_epochs=n_epochs,
        n_epochs_decay=n_epochs_decay,
        lr_decay_iters=lr_decay_iters,
    )
    if not isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        with warnings.catch_warnings():
            # Advancing before any optimiser step is what we mean here, not a misuse.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for _ in range(epoch_count - 1):
                scheduler.step()
    return scheduler
