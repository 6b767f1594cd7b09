"""``--model cycle_gan``: two generators, G_A: A -> B and G_B: B -> A, trained without pairs (Zhu et al., 2017).

For average and phase volumes that are not registered voxel to voxel, where pix2pix's L1
to a misplaced target teaches blur and shift. Losses (upstream's names):

* ``G_A``, ``G_B``: least squares (``--gan_mode``) of fooling D_A (judges B-side images) and D_B
  (judges A-side images);
* ``cycle_A`` = ``lambda_A * |G_B(G_A(A)) - A|``, ``cycle_B`` = ``lambda_B * |G_A(G_B(B)) - B|``;
* ``idt_A`` = ``lambda_B * lambda_identity * |G_A(B) - B|``, ``idt_B`` = ``lambda_A *
  lambda_identity * |G_B(A) - A|``: each generator leaves an image of its target side as it
  is, which keeps intensities (HU) in place. Average and phase CT differ only where things
  move, so this term, with ``--residual`` generators, is what keeps CycleGAN near the identity;
* ``D_A``, ``D_B``: each discriminator's (real + fake) / 2, its fakes drawn from an image pool
  (util/image_pool.py, ``--pool_size``), whose contents are saved with the training state.

Unlike pix2pix's conditional D, each D sees one image (``output_nc`` or ``input_nc`` channels),
not a pair. ``--direction BtoA`` swaps the data's sides (``real_A`` is then the B folder's
slice), as upstream; G_A always maps ``real_A`` to the other side. 2.5D context
(``--context_slices``) is refused: G_B would have to produce the neighbour slices too.

Checkpoints: ``<label>_net_G_A.pth``, ``_G_B``, ``_D_A``, ``_D_B``, upstream's names and keys;
inference picks G_A (``--direction AtoB``) or G_B (``BtoA``). The training step follows
pix2pix's: autocast on the fast path, networks that learn run through :meth:`BaseModel.replica`
under torchrun, a NaN/Inf loss leaves the weights as they were.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

from models import MODELS
from models.base_model import BaseModel
from models.networks import GAN_MODES, GANLoss, define_D, define_G
from models.pix2pix_model import set_requires_grad
from util.image_pool import ImagePool


@MODELS.register("cycle_gan")
class CycleGANModel(BaseModel):
    # Difference maps on the training page (picture - reference, in HU): what G_A changed, and what the
    # A -> B -> A cycle failed to bring back. real_B is another patient's slice: no difference with it means anything.
    difference_pairs = (("fake_B", "real_A"), ("rec_A", "real_A"))
    # The training page's words for its slices: real_B is not real_A's target here.
    visuals_description = ("real_A an input, fake_B = G_A(real_A), rec_A = G_B(fake_B); real_B an unpaired "
                           "B-side slice, fake_A = G_B(real_B), rec_B = G_A(fake_A); idt_A = G_A(real_B), "
                           "idt_B = G_B(real_A)")

    @staticmethod
    def modify_commandline_options(parser: argparse.ArgumentParser, is_train: bool) -> argparse.ArgumentParser:
        # Upstream CycleGAN's defaults: ResNet 9 blocks, instance norm, no dropout, unaligned data.
        parser.set_defaults(no_dropout=True, netG="resnet_9blocks", norm="instance", dataset_mode="unaligned_nifti")
        if is_train:
            g = parser.add_argument_group("losses (--model cycle_gan)")
            g.add_argument("--gan_mode", default="lsgan", choices=GAN_MODES,
                           help="lsgan: least squares (upstream's for CycleGAN); vanilla: cross-entropy; wgangp is refused")
            g.add_argument("--lambda_A", type=float, default=10.0, help="weight of the cycle loss A -> B -> A")
            g.add_argument("--lambda_B", type=float, default=10.0, help="weight of the cycle loss B -> A -> B")
            g.add_argument("--lambda_identity", type=float, default=0.5,
                           help="weight of the identity loss, relative to lambda_A/lambda_B: G_A(B) should be B, "
                           "G_B(A) should be A; 0 turns it off")
            g.add_argument("--pool_size", type=int, default=50,
                           help="generated images kept for the discriminators (0: D sees only the latest)")
        return parser

    @staticmethod
    def option_problems(opt: argparse.Namespace) -> str | None:
        if str(getattr(opt, "phases", "0")) != "0":
            return f"--model cycle_gan makes phase 0 alone: --phases {opt.phases} is pix2pix's (leave --phases out)"
        if getattr(opt, "context_slices", 0):
            return (f"--model cycle_gan with --context_slices {opt.context_slices}: G_B would have to generate the "
                    "neighbour slices that G_A reads; use --context_slices 0")
        if opt.isTrain and opt.lambda_identity > 0 and opt.input_nc != opt.output_nc:
            return (f"--lambda_identity {opt.lambda_identity} needs --input_nc == --output_nc "
                    f"(got {opt.input_nc} and {opt.output_nc}); or pass --lambda_identity 0")
        if opt.isTrain and opt.gan_mode == "wgangp":
            return "--model cycle_gan takes --gan_mode lsgan or vanilla (wgangp's gradient penalty is pix2pix's)"
        if opt.isTrain and opt.pool_size < 0:
            return f"--pool_size must be 0 or more, got {opt.pool_size}"
        return None

    def __init__(self, opt: argparse.Namespace, device: torch.device):
        super().__init__(opt, device)
        self.loss_names = ["D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B"]
        visual_names_A = ["real_A", "fake_B", "rec_A"]
        visual_names_B = ["real_B", "fake_A", "rec_B"]
        if self.is_train and opt.lambda_identity > 0:
            visual_names_A.append("idt_B")  # G_B(A): G_B should leave an A-side image as it is
            visual_names_B.append("idt_A")
        self.visual_names = visual_names_A + visual_names_B
        self.model_names = ["G_A", "G_B", "D_A", "D_B"] if self.is_train else ["G_A", "G_B"]
        layout = self.fast_path.torch_memory_format

        def generator(input_nc: int, output_nc: int) -> nn.Module:
            return define_G(
                input_nc=input_nc, output_nc=output_nc, ngf=opt.ngf, netG=opt.netG, norm=opt.norm,
                use_dropout=not opt.no_dropout, init_type=opt.init_type, init_gain=opt.init_gain,
                residual=opt.residual, device=device,
            ).to(memory_format=layout)

        self.netG_A = generator(opt.input_nc, opt.output_nc)
        self.netG_B = generator(opt.output_nc, opt.input_nc)
        if not self.is_train:
            return

        def discriminator(input_nc: int) -> nn.Module:
            return define_D(
                input_nc=input_nc, ndf=opt.ndf, netD=opt.netD, n_layers_D=opt.n_layers_D, norm=opt.norm,
                init_type=opt.init_type, init_gain=opt.init_gain, device=device,
            ).to(memory_format=layout)

        self.netD_A = discriminator(opt.output_nc)  # judges B-side images: real_B against G_A(A)
        self.netD_B = discriminator(opt.input_nc)  # judges A-side images: real_A against G_B(B)
        self.fake_A_pool = ImagePool(opt.pool_size, seed=opt.seed * 2 + 1)
        self.fake_B_pool = ImagePool(opt.pool_size, seed=opt.seed * 2)
        self.criterionGAN = GANLoss(opt.gan_mode).to(device)
        self.criterionCycle = nn.L1Loss()
        self.criterionIdt = nn.L1Loss()
        betas = (opt.beta1, 0.999)
        self.optimizer_G = self.fast_path.adam(itertools.chain(self.netG_A.parameters(), self.netG_B.parameters()),
                                               lr=opt.lr, betas=betas)
        self.optimizer_D = self.fast_path.adam(itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()),
                                               lr=opt.lr, betas=betas)
        self.optimizers = [self.optimizer_G, self.optimizer_D]

    @property
    def netG(self) -> nn.Module:
        """The generator of the direction the run was trained for (A -> B): what validation scores."""
        return self.netG_A

    def set_input(self, batch: dict) -> None:
        """``batch["A"]``: (B, input_nc, H, W), ``batch["B"]``: (B, output_nc, H, W), in [-1, 1]; not paired."""
        layout = self.fast_path.torch_memory_format
        self.real_A = batch["A"].to(self.device, torch.float32, non_blocking=True, memory_format=layout)
        self.real_B = batch["B"].to(self.device, torch.float32, non_blocking=True, memory_format=layout)
        self.image_paths = batch["A_paths"]

    def forward(self) -> None:
        self.fake_B = self.netG_A(self.real_A)  # G_A(A)
        self.rec_A = self.netG_B(self.fake_B)  # G_B(G_A(A))
        self.fake_A = self.netG_B(self.real_B)  # G_B(B)
        self.rec_B = self.netG_A(self.fake_A)  # G_A(G_B(B))

    def backward_D_basic(self, netD: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """D's loss: real images as real, (pooled, detached) generated ones as fake, halved."""
        with self.fast_path.autocast():
            loss_real = self.criterionGAN(netD(real), True)
            loss_fake = self.criterionGAN(netD(fake.detach()), False)
            return (loss_real + loss_fake) * 0.5

    def backward_G(self) -> None:
        lambda_idt, lambda_A, lambda_B = self.opt.lambda_identity, self.opt.lambda_A, self.opt.lambda_B
        with self.fast_path.autocast():
            if lambda_idt > 0:
                self.idt_A = self.replica("G_A")(self.real_B)  # G_A should leave B-side images as they are
                self.loss_idt_A = self.criterionIdt(self.idt_A.float(), self.real_B) * lambda_B * lambda_idt
                self.idt_B = self.replica("G_B")(self.real_A)
                self.loss_idt_B = self.criterionIdt(self.idt_B.float(), self.real_A) * lambda_A * lambda_idt
            else:
                self.loss_idt_A = self.loss_idt_B = self.real_A.new_zeros(())
            # The bare Ds: fixed in this step, they have no gradients for DDP to average.
            self.loss_G_A = self.criterionGAN(self.netD_A(self.fake_B), True)
            self.loss_G_B = self.criterionGAN(self.netD_B(self.fake_A), True)
            self.loss_cycle_A = self.criterionCycle(self.rec_A.float(), self.real_A) * lambda_A
            self.loss_cycle_B = self.criterionCycle(self.rec_B.float(), self.real_B) * lambda_B
            self.loss_G = (self.loss_G_A + self.loss_G_B + self.loss_cycle_A + self.loss_cycle_B
                           + self.loss_idt_A + self.loss_idt_B)
        self.backward(self.loss_G, "G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B")

    def optimize_parameters(self) -> None:
        self.start_step()
        with self.fast_path.autocast():  # forward() through DDP under torchrun
            self.fake_B = self.replica("G_A")(self.real_A)
            self.rec_A = self.replica("G_B")(self.fake_B)
            self.fake_A = self.replica("G_B")(self.real_B)
            self.rec_B = self.replica("G_A")(self.fake_A)
        # G_A and G_B first, with the Ds fixed (upstream's order).
        set_requires_grad([self.netD_A, self.netD_B], False)
        self.optimizer_G.zero_grad(set_to_none=True)
        self.backward_G()
        self.step(self.optimizer_G)  # not applied if a loss of this step is NaN/Inf
        # Then D_A and D_B, on pooled fakes.
        set_requires_grad([self.netD_A, self.netD_B], True)
        self.optimizer_D.zero_grad(set_to_none=True)
        fake_B = self.fake_B_pool.query(self.fake_B.float())
        self.loss_D_A = self.backward_D_basic(self.replica("D_A"), self.real_B, fake_B)
        fake_A = self.fake_A_pool.query(self.fake_A.float())
        self.loss_D_B = self.backward_D_basic(self.replica("D_B"), self.real_A, fake_A)
        self.backward(self.loss_D_A + self.loss_D_B, "D_A", "D_B")
        self.step(self.optimizer_D)
        self.end_step()

    # -- the pools travel with the training state, so a resumed run draws what this one would ----------
    def training_state(self, with_optimizers: bool) -> dict:
        state = super().training_state(with_optimizers)
        if with_optimizers and self.is_train:
            state["image_pools"] = {"fake_A": self.fake_A_pool.state_dict(), "fake_B": self.fake_B_pool.state_dict()}
        return state

    def load_training_state(self, checkpoint, epoch_count: int) -> dict:
        state = super().load_training_state(checkpoint, epoch_count)
        pools = state.get("image_pools")
        if pools:
            self.fake_A_pool.load_state_dict(pools["fake_A"], self.device)
            self.fake_B_pool.load_state_dict(pools["fake_B"], self.device)
        return state
