"""Training steps' losses, kept on the device until the loop needs them as numbers.

Reading a tensor on the host (``.item()``, ``float()``) waits until the device has done all
the work queued before it. Read after every step, that leaves the GPU idle while the host
queues the next step. So the loop keeps each step's losses and its non-finite flag
(``BaseModel.loss_vector()`` and ``BaseModel.step_nonfinite``) here, as device tensors, and
:meth:`PendingSteps.read` copies all of them to the host at once when numbers are needed:
to print, display, save or stop, and at the end of an epoch (util/fast_path.py says when
every step is read instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepResult:
    """One training step, as read on the host.

    Attributes:
        step: the step of its epoch, from 1.
        slices: slices trained on in all after it (all processes; the checkpoints' ``total_iters``).
        losses: each loss by name.
        nonfinite: a loss of the step was NaN/Inf here or on another process: the step was not applied.
    """

    step: int
    slices: int
    losses: dict[str, float]
    nonfinite: bool

    def describe_nonfinite(self) -> str:
        """``"G_L1 = nan, D_real = inf"``: the losses that were not finite (another process's, if none here)."""
        bad = [f"{name} = {value}" for name, value in self.losses.items() if not math.isfinite(value)]
        return ", ".join(bad) or "(another process) = nan"


class PendingSteps:
    """The steps not read yet, in order; :meth:`read` empties it.

    Args:
        loss_names: the names of the entries of each step's loss vector.
    """

    def __init__(self, loss_names: list[str]):
        self.loss_names = list(loss_names)
        self._steps: list[tuple[int, int]] = []
        self._losses: list[torch.Tensor] = []  # each (len(loss_names),) float32
        self._flags: list[torch.Tensor] = []  # each () float32, 1.0 for a non-finite step

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, slices: int, losses: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """Keep a step's losses and flag (device tensors, not read)."""
        self._steps.append((step, slices))
        self._losses.append(losses)
        self._flags.append(nonfinite.reshape(1).float())

    def read(self) -> list[StepResult]:
        """Every pending step, oldest first, copied to the host in one transfer."""
        if not self._steps:
            return []
        # (N, len(loss_names) + 1): each step's losses, then its flag
        table = torch.cat([torch.stack(self._losses), torch.stack(self._flags)], dim=1).tolist()
        results = [
            StepResult(step, slices, dict(zip(self.loss_names, row[:-1], strict=True)), row[-1] > 0)
            for (step, slices), row in zip(self._steps, table, strict=True)
        ]
        self._steps, self._losses, self._flags = [], [], []
        return results
