"""Weight initialisation (``--init_type``, ``--init_gain``) and device placement.

Deviation from upstream: :func:`init_net` never wraps the network in
``nn.DataParallel``. Upstream's wrapper prefixes every state-dict key with ``module.``
and forces callers to unwrap before saving; here the returned module is the network
itself, so ``net.load_state_dict(torch.load(path))`` works directly (as our users'
export snippet expects) and the saved keys equal upstream's saved keys (upstream
saves ``net.module.state_dict()``). Multi-GPU training wraps the model itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import init

from util.device import select_device
from util.registry import lookup

logger = logging.getLogger(__name__)


def _normal(weight: torch.Tensor, gain: float) -> None:
    init.normal_(weight, 0.0, gain)


def _xavier(weight: torch.Tensor, gain: float) -> None:
    init.xavier_normal_(weight, gain=gain)


def _kaiming(weight: torch.Tensor, gain: float) -> None:
    del gain  # upstream ignores the gain here: He init fixes the scale from fan-in
    init.kaiming_normal_(weight, a=0, mode="fan_in")


def _orthogonal(weight: torch.Tensor, gain: float) -> None:
    init.orthogonal_(weight, gain=gain)


# name -> fn(weight, gain) that fills a conv/linear weight in place.
INIT_TYPES: dict[str, Callable[[torch.Tensor, float], None]] = {
    "normal": _normal,
    "xavier": _xavier,
    "kaiming": _kaiming,
    "orthogonal": _orthogonal,
}


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> None:
    """Re-initialise ``net`` in place, as upstream.

    Conv and Linear weights by ``init_type`` (gain ``init_gain``: the std for "normal",
    the gain for "xavier"/"orthogonal", unused by "kaiming"), their biases to 0.
    BatchNorm2d (and SyncBatchNorm) weights ~ N(1, init_gain), biases 0. Other modules
    keep PyTorch's defaults.

    Raises:
        ValueError: unknown ``init_type`` (checked before anything is changed).
    """
    fill = lookup(INIT_TYPES, init_type, "initialisation (--init_type)")

    def init_module(m: nn.Module) -> None:
        # Upstream matches on the class name, which also catches ConvTranspose2d.
        classname = m.__class__.__name__
        is_weighted = "Conv" in classname or "Linear" in classname
        if is_weighted and getattr(m, "weight", None) is not None:
            fill(m.weight.data, init_gain)
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias.data, 0.0)
        elif "BatchNorm2d" in classname or classname == "SyncBatchNorm":
            init.normal_(m.weight.data, 1.0, init_gain)
            init.constant_(m.bias.data, 0.0)

    logger.info("initialise network with %s (gain %g)", init_type, init_gain)
    net.apply(init_module)


def init_net(
    net: nn.Module,
    init_type: str = "normal",
    init_gain: float = 0.02,
    gpu_ids: Sequence[int] = (),
    device: torch.device | None = None,
) -> nn.Module:
    """Move ``net`` to ``device``, then initialise it.

    Args:
        net: the network.
        init_type / init_gain: see :func:`init_weights`.
        gpu_ids: upstream's way to give the device (GPU indices, empty for the CPU; only the
            first is used: the network is not wrapped in DataParallel, see the module
            docstring). Kept for code written against upstream.
        device: where the network goes; give it or ``gpu_ids``, not both. Default: the CPU.

    Returns:
        ``net`` itself, on its device, with fresh weights.

    Raises:
        RuntimeError: GPUs requested but CUDA is not available, or an index is out of
            range (util.device.DeviceError).
        ValueError: unknown ``init_type``, or both ``gpu_ids`` and ``device`` given.
    """
    if device is None:
        device = select_device(gpu_ids)
    elif gpu_ids:
        raise ValueError(f"gpu_ids {list(gpu_ids)} and device {device} given: pass one of them")
    net.to(device)
    init_weights(net, init_type, init_gain)
    return net
