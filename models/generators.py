"""Generators for ``--netG``: upstream pix2pix's U-Nets and ResNets, key for key.

Module structure and attribute names follow junyanz/pytorch-CycleGAN-and-pix2pix
exactly, so a state dict saved by upstream loads here and vice versa. That is why
the indices inside ``nn.Sequential`` matter and why the skip-connection block keeps its
``self.model`` name even though it nests.

All generators map ``(B, input_nc, H, W)`` to ``(B, output_nc, H, W)`` in [-1, 1]
(the last layer is Tanh). ``H`` and ``W`` must be multiples of
:func:`required_divisor`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from util.registry import lookup

# A norm layer factory (``--norm``, networks.get_norm_layer): called once per normalised
# feature map, ``factory(num_features) -> nn.Module``.
NormFactory = Callable[[int], nn.Module]


def uses_bias(norm_layer: NormFactory) -> bool:
    """Whether convolutions followed by ``norm_layer`` need their own bias (upstream's rule).

    True only for InstanceNorm2d: it has no affine shift here, whereas batch norm adds its
    own, so a conv bias would be redundant. "none" is False, as upstream (whose Identity
    factory is not InstanceNorm2d). The rule decides which state-dict keys exist, so it must
    not change; the discriminators follow it too.
    """
    func = norm_layer.func if isinstance(norm_layer, functools.partial) else norm_layer
    return func is nn.InstanceNorm2d


class UnetSkipConnectionBlock(nn.Module):
    """One U-Net level: downsample, inner levels, upsample, concatenated with the input.

    ``self.model`` is an ``nn.Sequential`` whose indices are upstream's:

    - outermost: ``[downconv, submodule, ReLU, upconv, Tanh]``
    - innermost: ``[LeakyReLU, downconv, ReLU, upconv, upnorm]``
    - otherwise: ``[LeakyReLU, downconv, downnorm, submodule, ReLU, upconv, upnorm]``
      plus ``Dropout(0.5)`` when ``use_dropout``.

    Args:
        outer_nc: channels this block returns (before the skip concatenation).
        inner_nc: channels after this block's downsampling conv.
        input_nc: channels of this block's input; defaults to ``outer_nc``.
        submodule: the next inner block (None for the innermost).
        outermost / innermost: position in the U-Net.
        norm_layer: norm factory from :func:`models.networks.get_norm_layer`.
        use_dropout: dropout after the upsampling of middle blocks.

    Shapes: ``(B, input_nc, H, W) -> (B, input_nc + outer_nc, H, W)``, or
    ``(B, outer_nc, H, W)`` for the outermost block (no skip around the whole net).
    """

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        norm_layer: NormFactory = nn.BatchNorm2d,
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        use_bias = uses_bias(norm_layer)
        if input_nc is None:
            input_nc = outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu = nn.LeakyReLU(0.2, True)
        downnorm = norm_layer(inner_nc)
        uprelu = nn.ReLU(True)
        upnorm = norm_layer(outer_nc)

        if outermost:
            # Inner blocks return their input concatenated with their output, hence * 2.
            # No norm follows, so this conv always has a bias.
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(
                inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias
            )
            model = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(
                inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias
            )
            model = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


def add_input(input: torch.Tensor, output: torch.Tensor, centre_only: bool = False) -> torch.Tensor:
    """``--residual``: the generator predicts a change to its input instead of a new image.

    Adds the input's centre channel (the slice itself, when neighbours ride along as extra
    channels) to the network's output, then clamps to [-1, 1]. An untrained network then
    already returns its input, so training starts from the identity and learns the
    difference, which converges far faster when input and target differ only where
    things move. No parameters: the state dict is unchanged.

    With as many output as input channels, each output channel gets its own input channel;
    otherwise, or with ``centre_only`` (one output channel per breathing phase, however many
    there are), every output channel gets the centre channel. A phase-code channel prepended
    to the 1+2K CT channels (``--phase_conditioning input``) keeps ``C_in // 2`` on the centre
    CT slice.

    Shapes: input (B, C_in, H, W), output (B, C_out, H, W) -> (B, C_out, H, W).
    """
    centre = input.shape[1] // 2
    whole = input.shape[1] == output.shape[1] and not centre_only
    base = input if whole else input[:, centre : centre + 1]  # (B, 1, H, W) broadcasts over C_out
    return torch.clamp(base + output, -1.0, 1.0)


class UnetGenerator(nn.Module):
    """U-Net whose ``num_downs`` stride-2 convs take a ``2**num_downs`` image to 1x1.

    ``self.model`` is the outermost :class:`UnetSkipConnectionBlock`; each block nests the
    next at index 1 (outermost) or 3 (middle), giving upstream's state-dict keys such as
    ``model.model.0.weight`` and ``model.model.1.model.3.model.1.weight``.

    Args:
        input_nc / output_nc: image channels in and out.
        num_downs: downsamplings (>= 5); 7 for unet_128, 8 for unet_256, 9 for unet_512.
        ngf: filters in the outermost conv; inner levels use up to ``ngf * 8``.
        norm_layer: norm factory.
        use_dropout: dropout in the ``num_downs - 5`` innermost middle blocks.
        residual: add the input to the output (see :func:`add_input`).
        residual_centre: with ``residual``, add the centre input channel to every output channel.

    Shapes: ``(B, input_nc, H, W) -> (B, output_nc, H, W)`` in [-1, 1]; H and W
    multiples of ``2**num_downs``.
    """

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        num_downs: int,
        ngf: int = 64,
        norm_layer: NormFactory = nn.BatchNorm2d,
        use_dropout: bool = False,
        residual: bool = False,
        residual_centre: bool = False,
    ) -> None:
        super().__init__()
        self.residual, self.residual_centre = residual, residual_centre
        if num_downs < 5:
            raise ValueError(f"UnetGenerator needs num_downs >= 5, got {num_downs}")
        # Built from the inside out: innermost, num_downs - 5 middle blocks at ngf * 8,
        # then three blocks halving the filters, then the outermost.
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, norm_layer=norm_layer, innermost=True)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(
                ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer, use_dropout=use_dropout
            )
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm_layer=norm_layer)
        self.model = UnetSkipConnectionBlock(
            output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True,
            norm_layer=norm_layer,
        )  # fmt: skip

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self.model(input)
        return add_input(input, output, self.residual_centre) if self.residual else output


class ResnetBlock(nn.Module):
    """Residual block ``x + conv_block(x)``; ``self.conv_block`` is upstream's Sequential.

    ``conv_block`` = ``[pad, conv3x3, norm, ReLU, (Dropout), pad, conv3x3, norm]``, where
    ``pad`` is a padding layer for "reflect"/"replicate" and absent for "zero" (the conv
    pads instead). Shapes: ``(B, dim, H, W) -> (B, dim, H, W)``.
    """

    def __init__(
        self,
        dim: int,
        padding_type: str,
        norm_layer: NormFactory,
        use_dropout: bool,
        use_bias: bool,
    ) -> None:
        super().__init__()
        self.conv_block = self.build_conv_block(
            dim, padding_type, norm_layer, use_dropout, use_bias
        )

    @staticmethod
    def build_conv_block(
        dim: int, padding_type: str, norm_layer: NormFactory, use_dropout: bool, use_bias: bool
    ) -> nn.Sequential:
        pad = lookup(_PADDINGS, padding_type, "padding type")
        conv_padding = 1 if pad is None else 0

        def padded_conv() -> list[nn.Module]:
            conv = nn.Conv2d(dim, dim, 3, padding=conv_padding, bias=use_bias)
            return [conv] if pad is None else [pad(1), conv]

        layers = [*padded_conv(), norm_layer(dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [*padded_conv(), norm_layer(dim)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


# None: zero padding done by the conv itself, so no layer (and no index) is added.
_PADDINGS: dict[str, Callable[[int], nn.Module] | None] = {
    "reflect": nn.ReflectionPad2d,
    "replicate": nn.ReplicationPad2d,
    "zero": None,
}


class ResnetGenerator(nn.Module):
    """Johnson et al.'s encoder, ``n_blocks`` ResNet blocks, decoder (upstream layout).

    ``self.model`` indices for ``n_blocks = N``: 0 pad, 1-3 conv7/norm/ReLU, 4-9 two
    stride-2 downsamplings, 10 .. 9+N ResNet blocks, then two transposed-conv
    upsamplings (3 layers each), pad, conv7, Tanh.

    Args:
        input_nc / output_nc: image channels in and out.
        ngf: filters after the first conv; the blocks run at ``ngf * 4``.
        norm_layer: norm factory.
        use_dropout: dropout inside each ResNet block.
        n_blocks: number of ResNet blocks (>= 0).
        padding_type: "reflect" | "replicate" | "zero", inside the blocks.
        residual: add the input to the output (see :func:`add_input`).
        residual_centre: with ``residual``, add the centre input channel to every output channel.

    Shapes: ``(B, input_nc, H, W) -> (B, output_nc, H, W)`` in [-1, 1]; H and W
    multiples of 4.
    """

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 64,
        norm_layer: NormFactory = nn.BatchNorm2d,
        use_dropout: bool = False,
        n_blocks: int = 6,
        padding_type: str = "reflect",
        residual: bool = False,
        residual_centre: bool = False,
    ) -> None:
        if n_blocks < 0:
            raise ValueError(f"ResnetGenerator needs n_blocks >= 0, got {n_blocks}")
        super().__init__()
        self.residual, self.residual_centre = residual, residual_centre
        use_bias = uses_bias(norm_layer)
        model: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
            norm_layer(ngf),
            nn.ReLU(True),
        ]
        n_downsampling = 2
        for i in range(n_downsampling):
            mult = 2**i
            model += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias),
                norm_layer(ngf * mult * 2),
                nn.ReLU(True),
            ]
        mult = 2**n_downsampling
        model += [
            ResnetBlock(ngf * mult, padding_type, norm_layer, use_dropout, use_bias)
            for _ in range(n_blocks)
        ]
        for i in range(n_downsampling):
            mult = 2 ** (n_downsampling - i)
            model += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, kernel_size=3, stride=2, padding=1,
                    output_padding=1, bias=use_bias,
                ),
                norm_layer(ngf * mult // 2),
                nn.ReLU(True),
            ]  # fmt: skip
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self.model(input)
        return add_input(input, output, self.residual_centre) if self.residual else output


GeneratorFactory = Callable[..., nn.Module]

# Each entry is called as factory(input_nc, output_nc, ngf=..., norm_layer=..., use_dropout=...);
# ngf by keyword because UnetGenerator keeps upstream's (input_nc, output_nc, num_downs, ngf).
GENERATORS: dict[str, GeneratorFactory] = {
    "unet_128": functools.partial(UnetGenerator, num_downs=7),
    "unet_256": functools.partial(UnetGenerator, num_downs=8),
    "unet_512": functools.partial(UnetGenerator, num_downs=9),
    "resnet_6blocks": functools.partial(ResnetGenerator, n_blocks=6),
    "resnet_9blocks": functools.partial(ResnetGenerator, n_blocks=9),
}


def required_divisor(netG: str) -> int:
    """The number that image height and width must be multiples of for ``netG``.

    A U-Net halves the image ``num_downs`` times down to a 1x1 bottleneck, so it needs
    multiples of ``2**num_downs``: 128 for unet_128, 256 for unet_256 and 512 for
    unet_512 (a 256x256 slice cannot go through unet_512). A ResNet generator
    downsamples twice, so it needs multiples of 4.

    Raises:
        ValueError: unknown ``netG``.
    """
    factory = lookup(GENERATORS, netG, "generator (--netG)")
    if getattr(factory, "func", None) is UnetGenerator:
        return 2 ** factory.keywords["num_downs"]
    return 4
