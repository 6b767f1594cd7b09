"""pix2pix's networks and what builds them, laid out as upstream's ``models/networks.py``.

In this file, in upstream's order: the normalisation layers (``--norm``,
:func:`get_norm_layer`), the learning-rate schedules (``--lr_policy``, :func:`get_scheduler`),
weight initialisation (``--init_type``, :func:`init_weights`, :func:`init_net`), the
factories :func:`define_G` and :func:`define_D`, and the losses (``--gan_mode``,
:class:`GANLoss`, :func:`cal_gradient_penalty`; ``--l1_region body``, :class:`BodyL1Loss`).
The networks themselves sit beside it, in ``generators.py`` (``--netG``: U-Nets, ResNets)
and ``discriminators.py`` (``--netD``: PatchGAN, PixelGAN); they are re-exported here, so
code written against junyanz/pytorch-CycleGAN-and-pix2pix (``from models.networks import
define_G, UnetGenerator``) keeps working, the reference's export snippet included.

The one deliberate difference from upstream is :func:`init_net`: no DataParallel wrapper,
so the returned network loads plain state dicts directly.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import init
from torch.optim import Optimizer, lr_scheduler

from util.device import select_device
from util.registry import lookup, unknown_name_error

from .discriminators import DISCRIMINATORS, NLayerDiscriminator, PixelDiscriminator
from .generators import (
    GENERATORS,
    NormFactory,
    ResnetBlock,
    ResnetGenerator,
    UnetGenerator,
    UnetSkipConnectionBlock,
    required_divisor,
)

__all__ = [
    "DISCRIMINATORS",
    "GAN_MODES",
    "GENERATORS",
    "INIT_TYPES",
    "LR_POLICIES",
    "NORM_HELP",
    "NORM_LAYERS",
    "BodyL1Loss",
    "GANLoss",
    "NLayerDiscriminator",
    "PixelDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "UnetGenerator",
    "UnetSkipConnectionBlock",
    "body_region",
    "cal_gradient_penalty",
    "define_D",
    "define_G",
    "get_norm_layer",
    "get_scheduler",
    "init_net",
    "init_weights",
    "required_divisor",
]

logger = logging.getLogger(__name__)


# -- normalisation layers (--norm) ---------------------------------------------------------
# A norm factory is called once per normalised feature map: factory(num_features) -> layer.
# State-dict keys per layer, as upstream checkpoints contain them: batch and syncbatch have
# weight, bias, running_mean, running_var, num_batches_tracked; instance, sync_instance and
# none have none. Whether the conv before a norm has a bias is generators.uses_bias.
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


# -- learning-rate schedules (--lr_policy) -------------------------------------------------
# The training loop calls scheduler.step() once per epoch (step(metric) for "plateau"), so
# every period is counted in epochs and a scheduler's last_epoch is the number of epochs
# complete. Every entry takes (optimizer, *, n_epochs, n_epochs_decay, lr_decay_iters).
def _linear(optimizer: Optimizer, *, n_epochs: int, n_epochs_decay: int, **_) -> lr_scheduler.LRScheduler:
    """Initial lr for ``n_epochs`` epochs, then linearly towards 0 over ``n_epochs_decay``.

    ``done`` epochs complete means epoch ``done + 1`` is running (upstream's formula with
    ``epoch_count`` 1). The ``+ 1`` keeps the last epoch's factor above zero.
    """

    def factor(done: int) -> float:
        return 1.0 - max(0, done + 1 - n_epochs) / float(n_epochs_decay + 1)

    return lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)


def _step(optimizer: Optimizer, *, lr_decay_iters: int, **_) -> lr_scheduler.LRScheduler:
    """lr divided by 10 every ``lr_decay_iters`` epochs."""
    return lr_scheduler.StepLR(optimizer, step_size=lr_decay_iters, gamma=0.1)


def _plateau(optimizer: Optimizer, **_) -> lr_scheduler.ReduceLROnPlateau:
    """lr times 0.2 when the metric passed to ``step`` stops falling by 1% for 5 epochs."""
    return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, threshold=0.01, patience=5)


def _cosine(optimizer: Optimizer, *, n_epochs: int, **_) -> lr_scheduler.LRScheduler:
    """Half a cosine from the initial lr to 0 over ``n_epochs`` epochs."""
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_epochs, eta_min=0)


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

    A run that starts at ``epoch_count`` N gets a schedule advanced by N - 1 steps, so it sits
    where epoch N of a new run would; a resumed run loads the saved schedule instead (which
    is already there). Either way the offset is counted once.

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
    scheduler = build(optimizer, n_epochs=n_epochs, n_epochs_decay=n_epochs_decay, lr_decay_iters=lr_decay_iters)
    if not isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        with warnings.catch_warnings():
            # Advancing before any optimiser step is what we mean here, not a misuse.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for _ in range(epoch_count - 1):
                scheduler.step()
    return scheduler


# -- weight initialisation (--init_type, --init_gain) --------------------------------------
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

    Unlike upstream, never wraps the network in ``nn.DataParallel``: upstream's wrapper
    prefixes every state-dict key with ``module.`` and forces callers to unwrap before
    saving. Here the returned module is the network itself, so
    ``net.load_state_dict(torch.load(path))`` works directly (as our users' export snippet
    expects) and the saved keys equal upstream's (upstream saves ``net.module.state_dict()``).
    Multi-GPU training wraps the model itself.

    Args:
        net: the network.
        init_type / init_gain: see :func:`init_weights`.
        gpu_ids: upstream's way to give the device (GPU indices, empty for the CPU; only the
            first is used). Kept for code written against upstream.
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


# -- the factories -------------------------------------------------------------------------
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
    residual_centre: bool = False,
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
        residual_centre: with ``residual``, every output channel adds the centre input channel
            (one output channel per breathing phase), even when the channel counts agree.
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
    net = factory(input_nc, output_nc, ngf=ngf, norm_layer=norm_layer, use_dropout=use_dropout, residual=residual,
                  residual_centre=residual_centre)
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


# -- losses (--gan_mode, --l1_region) ------------------------------------------------------
# vanilla: the original GAN's cross-entropy on logits (pix2pix's default);
# lsgan: least squares; wgangp: Wasserstein critic, use with cal_gradient_penalty.
GAN_MODES: tuple[str, ...] = ("vanilla", "lsgan", "wgangp")


class GANLoss(nn.Module):
    """The adversarial loss of a discriminator prediction against "real" or "fake".

    Hides the target tensor: ``loss(prediction, target_is_real)`` expands the stored
    label to the prediction's shape. The labels are registered buffers (``real_label``,
    ``fake_label``), as upstream, so ``.to(device)`` moves them.

    Args:
        gan_mode: one of :data:`GAN_MODES`.
        target_real_label / target_fake_label: targets for vanilla and lsgan (unused
            by wgangp).

    Call: ``prediction`` (B, 1, H', W') raw discriminator logits (no sigmoid);
    returns a scalar tensor. For wgangp the loss is ``-mean(prediction)`` for real
    targets and ``+mean(prediction)`` for fake ones, so minimising it pushes real scores
    up and fake scores down.

    Raises:
        ValueError: unknown ``gan_mode``.
    """

    def __init__(self, gan_mode: str, target_real_label: float = 1.0, target_fake_label: float = 0.0) -> None:
        super().__init__()
        if gan_mode not in GAN_MODES:
            raise unknown_name_error("GAN mode (--gan_mode)", gan_mode, GAN_MODES)
        self.register_buffer("real_label", torch.tensor(target_real_label))
        self.register_buffer("fake_label", torch.tensor(target_fake_label))
        self.gan_mode = gan_mode
        self.loss: nn.Module | None = {
            "vanilla": nn.BCEWithLogitsLoss(),
            "lsgan": nn.MSELoss(),
            "wgangp": None,
        }[gan_mode]

    def get_target_tensor(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        """The label as a tensor of ``prediction``'s shape (a broadcast view, no copy)."""
        label = self.real_label if target_is_real else self.fake_label
        return label.expand_as(prediction)

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        if self.loss is None:  # wgangp
            return -prediction.mean() if target_is_real else prediction.mean()
        return self.loss(prediction, self.get_target_tensor(prediction, target_is_real))


_PENALTY_POINTS = ("real", "fake", "mixed")


def cal_gradient_penalty(
    netD: nn.Module,
    real_data: torch.Tensor,
    fake_data: torch.Tensor,
    device: torch.device | str,
    type: str = "mixed",
    constant: float = 1.0,
    lambda_gp: float = 10.0,
) -> tuple[torch.Tensor | float, torch.Tensor | None]:
    """WGAN-GP penalty ``lambda_gp * mean((||grad netD(x)||_2 - constant)^2)``.

    Args:
        netD: the discriminator.
        real_data / fake_data: (B, C, H, W) batches of the same shape.
        device: where the interpolation weights are made.
        type: where ``x`` is taken: "real", "fake", or "mixed" (a random point on the
            line between each real and fake sample, as in Gulrajani et al.).
        constant: the target gradient norm.
        lambda_gp: the penalty weight; 0 disables it.

    Returns:
        ``(penalty, gradients)``: a scalar tensor that keeps the graph (so it can be
        back-propagated into netD) and the (B, C*H*W) input gradients; ``(0.0, None)``
        when ``lambda_gp <= 0``, as upstream.

    Raises:
        ValueError: unknown ``type``.
    """
    if lambda_gp <= 0.0:
        return 0.0, None
    if type == "real":
        points = real_data
    elif type == "fake":
        points = fake_data
    elif type == "mixed":
        # One weight per sample, broadcast over (C, H, W).
        alpha = torch.rand(real_data.shape[0], 1, 1, 1, device=device)
        points = alpha * real_data + (1 - alpha) * fake_data
    else:
        raise unknown_name_error("gradient penalty type", type, _PENALTY_POINTS)
    # detach() so that "real"/"fake" do not turn a caller's leaf tensor into one that
    # requires grad; the penalty only needs gradients with respect to these points.
    points = points.detach().requires_grad_(True)
    scores = netD(points)
    (gradients,) = torch.autograd.grad(
        outputs=scores,
        inputs=points,
        grad_outputs=torch.ones_like(scores),
        create_graph=True,
        retain_graph=True,
    )
    gradients = gradients.view(real_data.size(0), -1)
    # The epsilon keeps the norm differentiable where a gradient is exactly zero.
    penalty = (((gradients + 1e-16).norm(2, dim=1) - constant) ** 2).mean() * lambda_gp
    return penalty, gradients


# Air in the network's [-1, 1] scale: -500 HU in the fixed window (-1024..3071 HU). With
# per-volume scaling (--intensity volume) air is still near -1 and tissue well above this,
# so the same cut-off finds the body there too.
BODY_THRESHOLD = 2 * (-500.0 + 1024.0) / 4095.0 - 1


def body_region(target: torch.Tensor, threshold: float = BODY_THRESHOLD) -> torch.Tensor:
    """(B, C, H, W) bool: pixels inside the body outline of each slice, lungs included.

    Tissue is ``target > threshold``; a pixel is inside the body when tissue lies on both
    sides of it along its row and along its column. That fills the lungs (air enclosed by
    the chest wall) without a hole-filling pass, so it runs on the GPU with no host round
    trip; concave outlines are filled only where both directions close them.
    """
    tissue = target > threshold

    def between(mask: torch.Tensor, dim: int) -> torch.Tensor:
        ahead = torch.cummax(mask.to(torch.uint8), dim=dim).values.bool()
        behind = torch.cummax(mask.flip(dim).to(torch.uint8), dim=dim).values.flip(dim).bool()
        return ahead & behind

    return between(tissue, -1) & between(tissue, -2)


class BodyL1Loss(nn.Module):
    """``--l1_region body``: mean |fake - real| over the body of the target slice only.

    Outside the body the target is air, which a residual generator passes through from the
    start; averaging the L1 loss over the whole slice spends the loss's weight on those
    pixels. A batch with no body pixel falls back to the whole slice.
    """

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        weight = body_region(real).to(fake.dtype)
        count = weight.sum()
        error = (fake - real).abs()
        return torch.where(count > 0, (error * weight).sum() / count.clamp(min=1), error.mean())
