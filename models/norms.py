"""Normalisation layers for ``--norm``.

A norm layer factory is a callable ``factory(num_features: int) -> nn.Module``. The
networks call it once per normalised feature map and decide whether their convolutions
need a bias by asking :func:`uses_bias`: instance norm here has no affine parameters, so
the convolution before it must carry the bias; batch norm has its own shift, so a conv
bias would be redundant. This is upstream pix2pix's rule, and it decides which
state-dict keys exist, so it must not change.

Layers per name (state-dict keys are what upstream checkpoints contain):

============== ====================================== ===============================
name           layer                                  state-dict keys per layer
============== ====================================== ===============================
batch          BatchNorm2d(affine, running stats)     weight, bias, running_mean,
                                                      running_var, num_batches_tracked
syncbatch      as batch; SyncBatchNorm under DDP      as batch
instance       InstanceNorm2d(no affine, no stats)    none
sync_instance  exactly ``instance``                   none
none           nn.Identity                            none
============== ====================================== ===============================
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.distributed as dist
from torch import nn

from util.registry import lookup

NormFactory = Callable[[int], nn.Module]


def _no_norm(num_features: int) -> nn.Module:
    """Identity stand-in so the networks can call the factory unconditionally."""
    del num_features  # part of the factory contract, unused here
    return nn.Identity()


_batch = functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
# Upstream's current setting: no affine parameters and no running statistics, so
# instance-norm checkpoints hold no norm keys and eval() normalises like train().
_instance = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)

NORM_LAYERS: dict[str, NormFactory] = {
    "batch": _batch,
    # Built as BatchNorm2d (so it runs anywhere, keys == "batch"); define_G/define_D
    # convert it with to_sync_batchnorm() once torch.distributed is initialised.
    "syncbatch": _batch,
    "instance": _instance,
    # Instance norm normalises each sample with its own statistics, so there is nothing
    # to synchronise across GPUs: the same layers as "instance", kept as a name because
    # existing commands use it.
    "sync_instance": _instance,
    "none": _no_norm,
}

NORM_HELP = (
    "normalisation layer: batch | syncbatch (batch norm synchronised across processes "
    "under DistributedDataParallel, plain batch norm otherwise) | instance | "
    "sync_instance (identical to instance: instance norm uses per-sample statistics, "
    "so there is nothing to synchronise) | none"
)


def get_norm_layer(norm_type: str) -> NormFactory:
    """The layer factory for ``norm_type`` (a key of :data:`NORM_LAYERS`).

    Returns:
        ``factory(num_features) -> nn.Module``; for "batch", "syncbatch", "instance" and
        "sync_instance" a ``functools.partial`` whose ``.func`` is the layer class.

    Raises:
        ValueError: unknown name (the message lists the valid names and the closest).
    """
    return lookup(NORM_LAYERS, norm_type, "normalisation layer (--norm)")


def uses_bias(norm_layer: NormFactory) -> bool:
    """Whether convolutions followed by ``norm_layer`` need their own bias (upstream rule).

    True only for InstanceNorm2d: it has no affine shift here, whereas batch norm adds
    its own. "none" is False, as upstream (whose Identity factory is not InstanceNorm2d).
    """
    func = norm_layer.func if isinstance(norm_layer, functools.partial) else norm_layer
    return func is nn.InstanceNorm2d


def to_sync_batchnorm(net: nn.Module, norm_type: str) -> nn.Module:
    """Convert batch norms to SyncBatchNorm for ``norm_type == "syncbatch"`` under DDP.

    Only converts when torch.distributed is initialised: on a single process a plain
    BatchNorm2d computes the same thing and, unlike SyncBatchNorm in some torch
    versions, also runs on the CPU. The conversion keeps parameter and buffer names, so
    state dicts stay interchangeable with "batch". SyncBatchNorm itself needs CUDA
    tensors when it synchronises.
    """
    if norm_type == "syncbatch" and dist.is_available() and dist.is_initialized():
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net
