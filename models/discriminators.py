"""Discriminators for ``--netD``: upstream pix2pix's PatchGAN and PixelGAN, key for key.

pix2pix's discriminator sees the condition and the image together, so ``input_nc`` is
``input_nc + output_nc`` of the generator (2 for our single-channel CT slices). The
output is a map of raw logits, one per patch; the GAN loss decides how to read them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .generators import NormFactory, uses_bias


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 4x4 convs, one stride-1 conv, a 1-channel conv.

    With ``n_layers=3`` (``--netD basic``) each output logit sees a 70x70 patch, and a
    256x256 input gives a 30x30 map. ``self.model`` indices are upstream's: 0 conv (with
    bias, no norm), 1 LeakyReLU, then ``[conv, norm, LeakyReLU]`` triples starting at 2,
    last the 1-channel conv.

    Args:
        input_nc: channels of the input (condition and image concatenated).
        ndf: filters in the first conv; later layers use up to ``ndf * 8``.
        n_layers: stride-2 convs.
        norm_layer: norm factory from :func:`models.networks.get_norm_layer`.

    Shapes: ``(B, input_nc, H, W) -> (B, 1, H', W')`` with, per stride-2 conv,
    ``H -> H // 2`` and then ``H -> H - 1`` for each of the two stride-1 convs.
    """

    def __init__(
        self,
        input_nc: int,
        ndf: int = 64,
        n_layers: int = 3,
        norm_layer: NormFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        use_bias = uses_bias(norm_layer)
        kw, padw = 4, 1
        sequence: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            sequence += [
                nn.Conv2d(
                    ndf * nf_mult_prev, ndf * nf_mult, kw, stride=2, padding=padw, bias=use_bias
                ),
                norm_layer(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        sequence += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kw, stride=1, padding=padw, bias=use_bias),
            norm_layer(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw),
        ]
        self.model = nn.Sequential(*sequence)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


class PixelDiscriminator(nn.Module):
    """1x1 PatchGAN (PixelGAN): judges every pixel on its own; ``self.net`` as upstream.

    Shapes: ``(B, input_nc, H, W) -> (B, 1, H, W)``.
    """

    def __init__(
        self, input_nc: int, ndf: int = 64, norm_layer: NormFactory = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        use_bias = uses_bias(norm_layer)
        self.net = nn.Sequential(
            nn.Conv2d(input_nc, ndf, kernel_size=1, stride=1, padding=0),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, kernel_size=1, stride=1, padding=0, bias=use_bias),
            norm_layer(ndf * 2),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, kernel_size=1, stride=1, padding=0, bias=use_bias),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.net(input)


# Every entry is called as factory(input_nc, ndf, n_layers_D, norm_layer); only
# "n_layers" reads n_layers_D ("basic" is n_layers=3 whatever --n_layers_D says).
DiscriminatorFactory = Callable[[int, int, int, NormFactory], nn.Module]


def _basic(input_nc: int, ndf: int, n_layers_D: int, norm_layer: NormFactory) -> nn.Module:
    del n_layers_D  # the 70x70 PatchGAN is fixed at three layers
    return NLayerDiscriminator(input_nc, ndf, n_layers=3, norm_layer=norm_layer)


def _n_layers(input_nc: int, ndf: int, n_layers_D: int, norm_layer: NormFactory) -> nn.Module:
    return NLayerDiscriminator(input_nc, ndf, n_layers=n_layers_D, norm_layer=norm_layer)


def _pixel(input_nc: int, ndf: int, n_layers_D: int, norm_layer: NormFactory) -> nn.Module:
    del n_layers_D  # 1x1 convolutions only: no depth to choose
    return PixelDiscriminator(input_nc, ndf, norm_layer=norm_layer)


DISCRIMINATORS: dict[str, DiscriminatorFactory] = {
    "basic": _basic,
    "n_layers": _n_layers,
    "pixel": _pixel,
}
