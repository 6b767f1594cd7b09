"""``--model pix2pix``: a conditional GAN, G: A -> B, with an L1 term (Isola et al., 2017).

Losses: ``G_GAN`` (``lambda_GAN`` times the loss of fooling D), ``G_L1`` (``lambda_L1 *
|G(A) - B|``, over the whole slice or, with ``--l1_region body``, over the body only),
``D_real``, ``D_fake``; with ``--gan_mode wgangp`` the discriminator loss adds a gradient
penalty (``D_GP``). D judges the pair ``cat(A, B)`` in overlapping patches (70x70 for
``--netD basic``). With ``--lambda_GAN 0`` the generator learns from L1 alone and D is
neither run nor updated (its losses read 0), which saves its share of each step.

Under torchrun the training step runs G, and D where it learns, through DistributedDataParallel
(:meth:`BaseModel.replica`): each backward pass averages that network's gradients over the
processes while it runs. The G step's pass through D uses the bare D: D is fixed there, its
parameters take no gradient, so there is nothing to average. With ``--lambda_GAN 0`` D never
runs and is not wrapped. Saved and loaded are the bare networks, so the state-dict keys stay
upstream's.

With ``--precision bf16``/``fp16`` (util/fast_path.py) the forward passes and the losses run
under autocast, the weights, optimisers and losses stay float32, and the WGAN-GP penalty is
taken in float32. A step whose losses are NaN/Inf is not applied (BaseModel.step).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from models import MODELS
from models.base_model import BaseModel
from models.networks import GAN_MODES, BodyL1Loss, GANLoss, cal_gradient_penalty, define_D, define_G
from util.run_folder import phase_outputs


def set_requires_grad(nets: list[nn.Module], requires_grad: bool) -> None:
    for net in nets:
        for param in net.parameters():
            param.requires_grad = requires_grad


@MODELS.register("pix2pix")
class Pix2PixModel(BaseModel):
    @staticmethod
    def modify_commandline_options(parser: argparse.ArgumentParser, is_train: bool) -> argparse.ArgumentParser:
        # pix2pix's defaults: U-Net 256 with batch norm, no image pool, vanilla GAN loss.
        parser.set_defaults(norm="batch", netG="unet_256")
        if is_train:
            g = parser.add_argument_group("losses (--model pix2pix)")
            g.add_argument("--gan_mode", default="vanilla", choices=GAN_MODES,
                           help="vanilla: cross-entropy; lsgan: least squares; wgangp: Wasserstein with gradient penalty")
            g.add_argument("--lambda_L1", type=float, default=100.0, help="weight of the L1 loss")
            g.add_argument("--lambda_GAN", type=float, default=1.0,
                           help="weight of the generator's GAN loss; 0 trains G on L1 alone and skips D")
            g.add_argument("--l1_region", default="image", choices=("image", "body"),
                           help="where the L1 loss is averaged: the whole slice, or the body of the target only")
            g.add_argument("--lambda_gp", type=float, default=10.0, help="weight of the gradient penalty (wgangp)")
        return parser

    def __init__(self, opt: argparse.Namespace, device: torch.device):
        super().__init__(opt, device)
        self.loss_names = ["G_GAN", "G_L1", "D_real", "D_fake"]
        self.visual_names = ["real_A", "fake_B", "real_B"]
        self.model_names = ["G", "D"] if self.is_train else ["G"]
        layout = self.fast_path.torch_memory_format  # --memory_format (contiguous for testing)
        self.netG = define_G(
            input_nc=opt.input_nc, output_nc=opt.output_nc, ngf=opt.ngf, netG=opt.netG, norm=opt.norm,
            use_dropout=not opt.no_dropout, init_type=opt.init_type, init_gain=opt.init_gain,
            residual=opt.residual, device=device, residual_centre=phase_outputs(vars(opt)),
        ).to(memory_format=layout)
        if not self.is_train:
            return
        # D sees the condition and the image: (B, input_nc + output_nc, H, W)
        self.netD = define_D(
            input_nc=opt.input_nc + opt.output_nc, ndf=opt.ndf, netD=opt.netD, n_layers_D=opt.n_layers_D,
            norm=opt.norm, init_type=opt.init_type, init_gain=opt.init_gain, device=device,
        ).to(memory_format=layout)
        if opt.gan_mode == "wgangp":
            self.loss_names.append("D_GP")
        self.criterionGAN = GANLoss(opt.gan_mode).to(device)
        self.criterionL1 = BodyL1Loss() if opt.l1_region == "body" else nn.L1Loss()
        self.optimizer_G = self.fast_path.adam(self.netG.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))
        self.optimizer_D = self.fast_path.adam(self.netD.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))
        self.optimizers = [self.optimizer_G, self.optimizer_D]

    def set_input(self, batch: dict) -> None:
        """``batch["A"]``: (B, input_nc, H, W), ``batch["B"]``: (B, output_nc, H, W), in [-1, 1]."""
        layout = self.fast_path.torch_memory_format
        self.real_A = batch["A"].to(self.device, torch.float32, non_blocking=True, memory_format=layout)
        self.real_B = batch["B"].to(self.device, torch.float32, non_blocking=True, memory_format=layout)
        self.image_paths = batch["A_paths"]

    def learning_networks(self) -> list[str]:
        return ["G", "D"] if self.opt.lambda_GAN > 0 else ["G"]

    def forward(self) -> None:
        self.fake_B = self.netG(self.real_A)

    def backward_D(self) -> None:
        netD = self.replica("D")
        with self.fast_path.autocast():
            # float32 under autocast too (cat promotes to its widest input)
            fake_AB = torch.cat((self.real_A, self.fake_B), 1).detach()  # no gradient into G here
            real_AB = torch.cat((self.real_A, self.real_B), 1)
            self.loss_D_fake = self.criterionGAN(netD(fake_AB), False)
            self.loss_D_real = self.criterionGAN(netD(real_AB), True)
            self.loss_D = (self.loss_D_fake + self.loss_D_real) * 0.5
        if self.opt.gan_mode == "wgangp":
            # Outside autocast: the penalty differentiates D's input gradient, which float16 could underflow.
            self.loss_D_GP, _ = cal_gradient_penalty(netD, real_AB, fake_AB, self.device, lambda_gp=self.opt.lambda_gp)
            self.loss_D = self.loss_D + self.loss_D_GP
        self.backward(self.loss_D, "D_fake", "D_real", "D_GP")

    def backward_G(self) -> None:
        with self.fast_path.autocast():
            if self.opt.lambda_GAN > 0:
                fake_AB = torch.cat((self.real_A, self.fake_B), 1)
                # The bare D: fixed in this step, it has no gradients for DDP to average.
                self.loss_G_GAN = self.criterionGAN(self.netD(fake_AB), True) * self.opt.lambda_GAN
            else:
                self.loss_G_GAN = self.real_B.new_zeros(())
            # fake_B in float32, so that --l1_region body counts its pixels exactly under bf16 autocast
            self.loss_G_L1 = self.criterionL1(self.fake_B.float(), self.real_B) * self.opt.lambda_L1
            self.loss_G = self.loss_G_GAN + self.loss_G_L1
        self.backward(self.loss_G, "G_GAN", "G_L1")

    def optimize_parameters(self) -> None:
        self.start_step()
        with self.fast_path.autocast():  # --precision: bf16/fp16 activations, float32 weights
            self.fake_B = self.replica("G")(self.real_A)  # forward() through DDP under torchrun
        if self.opt.lambda_GAN > 0:
            self.update_D()
        else:
            self.loss_D_real = self.loss_D_fake = self.real_B.new_zeros(())
        self.optimizer_G.zero_grad(set_to_none=True)
        self.backward_G()
        self.step(self.optimizer_G)  # not applied if a loss of this step, D's or G's, is NaN/Inf
        self.end_step()

    def update_D(self) -> None:
        set_requires_grad([self.netD], True)
        self.optimizer_D.zero_grad(set_to_none=True)
        self.backward_D()
        self.step(self.optimizer_D)  # not applied if D's loss is NaN/Inf: NaN never reaches the weights
        set_requires_grad([self.netD], False)  # D is fixed while G learns
