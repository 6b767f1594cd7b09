"""GAN objectives for ``--gan_mode`` and the WGAN-GP gradient penalty (upstream semantics)."""

from __future__ import annotations

import torch
from torch import nn

from util.registry import unknown_name_error

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

    def __init__(
        self, gan_mode: str, target_real_label: float = 1.0, target_fake_label: float = 0.0
    ) -> None:
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
