"""Upstream's ``models.networks`` entry points, re-exported from the small modules here.

Code written against junyanz/pytorch-CycleGAN-and-pix2pix (``from models.networks
import define_G``) keeps working; the pieces live in:

- :mod:`models.norms`: ``--norm`` (``get_norm_layer``)
- :mod:`models.generators`: ``--netG`` (U-Nets, ResNets)
- :mod:`models.discriminators`: ``--netD`` (PatchGAN, PixelGAN)
- :mod:`models.losses`: ``--gan_mode`` (``GANLoss``, ``cal_gradient_penalty``)
- :mod:`models.weights`: ``--init_type`` (``init_weights``, ``init_net``)
- :mod:`models.schedulers`: ``--lr_policy`` (``get_scheduler``)

The one deliberate difference is :func:`init_net`: no DataParallel wrapper, so the
returned network loads plain state dicts directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from util.registry import lookup

from .discriminators import DISCRIMINATORS, NLayerDiscriminator, PixelDiscriminator
from .generators import (
    GENERATORS,
    ResnetBlock,
    ResnetGenerator,
    UnetGenerator,
    UnetSkipConnectionBlock,
    required_divisor,
)
from .losses import GAN_MODES, GANLoss, cal_gradient_penalty
from .norms import NORM_HELP, NORM_LAYERS, get_norm_layer, to_sync_batchnorm
from .schedulers import LR_POLICIES, get_scheduler
from .weights import INIT_TYPES, init_net, init_weights

__all__ = [
    "DISCRIMINATORS",
    "GAN_MODES",
    "GENERATORS",
    "INIT_TYPES",
    "LR_POLICIES",
    "NORM_HELP",
    "NORM_LAYERS",
    "GANLoss",
    "NLayerDiscriminator",
    "PixelDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "UnetGenerator",
    "UnetSkipConnectionBlock",
    "cal_gradient_penalty",
    "define_D",
    "define_G",
    "get_norm_layer",
    "get_scheduler",
    "init_net",
    "init_weights",
    "required_divisor",
]


def define_G(
    input_nc: int,
    output_nc: int,
    ngf: int,
    netG: str,
    norm: str = "batch",
    use_dropout: bool = False,
    init_type: str = "normal",
    init_gain: float = 0.02,
    gpu_ids: Sequence[int] = (),
    residual: bool = False,
    device: torch.device | None = None,
) -> nn.Module:
    """Build, place and initialise the generator ``netG`` (a key of ``GENERATORS``).

    Args:
        input_nc / output_nc: image channels in and out (1 and 1 for CT slices).
        ngf: filters in the last conv layer.
        netG: "unet_128" | "unet_256" | "unet_512" | "resnet_6blocks" | "resnet_9blocks".
        norm: a key of ``NORM_LAYERS``.
        use_dropout: dropout in the U-Net's middle blocks / the ResNet blocks.
        init_type / init_gain: see :func:`init_weights`.
        gpu_ids: upstream's way to say where the network goes: CUDA device indices, empty
            for the CPU. Kept for code written against upstream (the reference's export
            snippet); this project's code passes ``device``.
        residual: the network predicts a change to its input (``--residual``); same weights
            and keys, different forward.
        device: where the network goes (util/device.py's ``select_device``); give it or
            ``gpu_ids``, not both. Default: the CPU.

    Returns:
        The generator (not wrapped): ``(B, input_nc, H, W) -> (B, output_nc, H, W)`` in
        [-1, 1], H and W multiples of ``required_divisor(netG)``.

    Raises:
        ValueError: unknown ``netG``, ``norm`` or ``init_type``.
        RuntimeError: ``gpu_ids`` given but CUDA is not available.
    """
    factory = lookup(GENERATORS, netG, "generator (--netG)")
    norm_layer = get_norm_layer(norm)
    net = factory(input_nc, output_nc, ngf=ngf, norm_layer=norm_layer, use_dropout=use_dropout, residual=residual)
    net = init_net(to_sync_batchnorm(net, norm), init_type, init_gain, gpu_ids, device=device)
    if residual:
        # A randomly initialised output layer adds ~200 HU of noise to every voxel; zeroed,
        # the untrained network returns its input exactly and training starts from there.
        output_layer = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)][-1]
        nn.init.zeros_(output_layer.weight)
        if output_layer.bias is not None:
            nn.init.zeros_(output_layer.bias)
    return net


def define_D(
    input_nc: int,
    ndf: int,
    netD: str,
    n_layers_D: int = 3,
    norm: str = "batch",
    init_type: str = "normal",
    init_gain: float = 0.02,
    gpu_ids: Sequence[int] = (),
    device: torch.device | None = None,
) -> nn.Module:
    """Build, place and initialise the discriminator ``netD`` (a key of ``DISCRIMINATORS``).

    Args:
        input_nc: channels it sees; for pix2pix the generator's input_nc + output_nc.
        ndf: filters in the first conv layer.
        netD: "basic" (70x70 PatchGAN) | "n_layers" (PatchGAN with ``n_layers_D``
            stride-2 convs) | "pixel" (1x1 PatchGAN).
        n_layers_D: depth for "n_layers"; ignored otherwise.
        norm, init_type, init_gain, gpu_ids, device: as :func:`define_G`.

    Returns:
        The discriminator (not wrapped): ``(B, input_nc, H, W) -> (B, 1, H', W')`` logits.

    Raises:
        ValueError: unknown ``netD``, ``norm`` or ``init_type``.
        RuntimeError: ``gpu_ids`` given but CUDA is not available.
    """
    factory = lookup(DISCRIMINATORS, netD, "discriminator (--netD)")
    norm_layer = get_norm_layer(norm)
    net = factory(input_nc, ndf, n_layers_D, norm_layer)
    return init_net(to_sync_batchnorm(net, norm), init_type, init_gain, gpu_ids, device=device)
