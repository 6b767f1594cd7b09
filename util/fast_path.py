"""The fast training path: precision, fused Adam, memory format, and when the host reads the losses.

On CUDA every part is on by default, and each has a flag that turns it off:

| part | default on CUDA | turned off by |
|---|---|---|
| autocast to bf16 (fp16 + a gradient scaler on GPUs without bf16) | on | ``--precision fp32`` (the upstream step: TF32 off too) or ``tf32`` |
| fused Adam (the whole update in one multi-tensor kernel call) | on | ``--fused_adam False`` |
| no host-device synchronisation per step | on | ``--sync_every_step`` |
| memory format | contiguous | (``--memory_format channels_last`` is the other choice) |

On the CPU the default is fp32, Adam not fused, losses read after every step: the CPU has no
device queue to keep full, so a per-step read costs nothing there; bf16 rounds activations to
8 significant bits and pays only on CPUs with bf16 matrix units (``benchmarks/train_speed.py``
measures it on the machine at hand), so fp32 keeps CPU runs at full accuracy and comparable
with the project's CPU figures. Each part can still be forced on the CPU (``--precision bf16
--fused_adam``), which is how the tests run it.

Memory format: the networks use instance norm, whose output is contiguous whatever its input
(it normalises through a reshape), so with channels-last every norm layer and the convolution
after it copy between the two formats (issue 9's profile of an earlier bf16 step found 35% of
GPU time in such copies). The default stays contiguous until channels-last is measured faster
on a GPU (``benchmarks/train_speed.py --fast_flags "--memory_format channels_last"``).
``torch.compile`` and CUDA graphs are not used: not measured on this fork.

A NaN/Inf loss never reaches the weights. The model computes a flag on the device at each
backward pass (1 once a loss of the step is NaN/Inf, on any process) and the optimiser
step is skipped with it: inside the fused Adam kernel (its ``found_inf`` argument, which
also leaves Adam's step count alone), by the gradient scaler (a non-finite loss is made to
turn every gradient NaN, which the scaler's own check skips), or, for Adam not fused, by
reading the flag on the host before stepping. The training loop reads the losses and flags
of the steps since its last read at once (one synchronisation), every ``--print_freq``
slices, at every save, display and stop, and at the end of each epoch; then it skips or
stops for each non-finite step as ``--skip_nonfinite`` says, naming that step. The cost of
not reading every step: a run that must stop at a NaN/Inf step stops at the next read, up to
``--print_freq`` slices later; the steps after the bad one are lost with the run, as nothing
is saved before that read. Under torchrun the processes also agree on a stop signal (an
all-reduce, which waits for the device) only at those reads and at the end of each epoch, so
SIGTERM stops the run up to ``--print_freq`` slices after it arrives.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch

# --precision: what each value means; "auto" picks by device.
PRECISIONS = {
    "auto": "bf16 on a GPU that has it, else fp16; fp32 on the CPU",
    "bf16": "autocast to bfloat16 (weights, optimiser and losses stay float32)",
    "fp16": "autocast to float16 with a gradient scaler",
    "tf32": "float32 with TF32 matrix units for convolutions and matmuls (CUDA; fp32 on the CPU)",
    "fp32": "float32, TF32 off: the upstream pix2pix step",
}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# The flags of this module. Like --gpu_ids they belong to the machine that runs, so a resumed run
# takes them from its own command line and defaults, not from the run it resumes.
SPEED_OPTIONS = ("precision", "fused_adam", "memory_format", "sync_every_step")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``--precision`` for ``device``: "auto" becomes bf16 or fp16 on CUDA (by what the GPU has), fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    with torch.cuda.device(device):
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def tf32_allowed(precision: str) -> bool:
    """Whether float32 convolutions and matmuls may use TF32 (CUDA): all but the upstream fp32 step."""
    return precision != "fp32"


@dataclass(frozen=True)
class FastPath:
    """How a training step runs on ``device``; built once per model from the options.

    Attributes:
        device: where the step runs.
        precision: resolved, one of bf16, fp16, tf32, fp32.
        fused_adam: Adam's update as one fused kernel, which can also skip a step on the device.
        memory_format: a key of :data:`MEMORY_FORMATS`, for the networks and their inputs.
        sync_every_step: read the losses on the host after every step, even where the device could skip.
    """

    device: torch.device
    precision: str = "fp32"
    fused_adam: bool = False
    memory_format: str = "contiguous"
    sync_every_step: bool = False

    @classmethod
    def from_options(cls, opt: argparse.Namespace, device: torch.device) -> FastPath:
        """The path the training flags ask for (``--precision``, ``--fused_adam``, ``--memory_format``, ``--sync_every_step``)."""
        return cls(
            device=device,
            precision=resolve_precision(opt.precision, device),
            fused_adam=opt.fused_adam,
            memory_format=opt.memory_format,
            sync_every_step=opt.sync_every_step,
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.precision)

    @property
    def uses_grad_scaler(self) -> bool:
        # float16's range ends at 65504 and small gradients underflow: scale the loss up, and
        # skip the steps whose scaled gradients overflow. bfloat16 has float32's range.
        return self.precision == "fp16"

    @property
    def reads_losses_every_step(self) -> bool:
        """True where the loop must read each step on the host: the step is skipped on the
        device only by a fused optimiser (directly or through the gradient scaler)."""
        return self.sync_every_step or not self.fused_adam

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return MEMORY_FORMATS[self.memory_format]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of a forward pass and its losses (the backward pass runs outside it)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def new_grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.uses_grad_scaler else None

    def adam(self, params, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
        """Adam, fused when asked (else torch's default implementation for the device)."""
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True if self.fused_adam else None)

    def describe(self) -> str:
        """One line for the log at start: each part, and the flag that changes it."""
        if self.precision in AUTOCAST_DTYPES:
            scaler = " with a gradient scaler" if self.uses_grad_scaler else ""
            precision = f"{self.precision} autocast{scaler} (--precision fp32 for the upstream step)"
        elif self.precision == "tf32":
            precision = "fp32 with TF32" if self.device.type == "cuda" else "fp32 (TF32 is CUDA's)"
        else:
            precision = "fp32, TF32 off (the upstream step)" if self.device.type == "cuda" else "fp32"
        adam = "fused Adam (--fused_adam False to turn off)" if self.fused_adam else "Adam, not fused"
        if self.reads_losses_every_step:
            reads = "losses and NaN/Inf checks read on the host after every step"
        else:
            reads = (
                "losses and NaN/Inf checks stay on the device, read every --print_freq slices and at saves "
                "(--sync_every_step to read every step)"
            )
        return f"{precision}; {adam}; {self.memory_format} memory format; {reads}; torch.compile and CUDA graphs off"


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load an optimiser state saved by a fused or an unfused Adam into ``optimizer``, keeping its own kind.

    ``Optimizer.load_state_dict`` takes the saved groups' ``fused``/``foreach``/``capturable``
    with their hyper-parameters, so a checkpoint of a fused run would make a resumed
    ``--fused_adam False`` run fused again (and the reverse). Those keys stay this optimiser's,
    and each step count goes where its kind keeps it: a float32 tensor beside the weights
    when fused or capturable, else on the CPU (so that the unfused update reads it without a
    device synchronisation).
    """
    kinds = [
        {key: group[key] for key in ("fused", "foreach", "capturable") if key in group}
        for group in optimizer.param_groups
    ]
    optimizer.load_state_dict(saved)
    for group, kind in zip(optimizer.param_groups, kinds, strict=True):
        group.update(kind)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(device=param.device if on_device else "cpu", dtype=torch.float32)
