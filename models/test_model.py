"""``--model test``: one generator in one direction, for inference only (upstream's TestModel).

    python test.py --dataroot ./patients --name my_cyclegan --model test --dataset_mode single_nifti \
        --model_suffix _A

loads ``<epoch>_net_G_A.pth`` of a CycleGAN run (``--model_suffix _B``: G_B; no suffix: a
pix2pix run's G) and translates every volume of ``--dataroot`` without scoring, as
upstream's ``--model test --dataset_mode single`` does. Left out, ``--model_suffix`` follows
``--direction`` on a CycleGAN run (AtoB: ``_A``, BtoA: ``_B``). It cannot be trained.
"""

from __future__ import annotations

import argparse

import torch

from models import MODELS
from models.base_model import BaseModel
from models.networks import define_G


@MODELS.register("test")
class TestModel(BaseModel):
    can_train = False

    @staticmethod
    def modify_commandline_options(parser: argparse.ArgumentParser, is_train: bool) -> argparse.ArgumentParser:
        if is_train:
            parser.error("--model test only runs in test.py: train with --model pix2pix or cycle_gan")
        parser.set_defaults(dataset_mode="single_nifti")
        parser.add_argument(
            "--model_suffix", default=None, choices=("", "_A", "_B"),
            help="which generator: <epoch>_net_G<suffix>.pth ('' for pix2pix's G, _A or _B for CycleGAN's); "
            "left out: G for a pix2pix run, and for a CycleGAN run G_A with --direction AtoB, G_B with BtoA",
        )
        return parser

    @staticmethod
    def option_problems(opt: argparse.Namespace) -> str | None:
        # One volume out per volume in: a run of several phases writes 4D volumes through use_model.py.
        if len(getattr(opt, "phase_list", [0])) > 1:
            return (f"--model test writes one phase per input, and run {opt.name} makes phases "
                    f"{','.join(map(str, opt.phase_list))}: use use_model.py or batch_process_patients.py "
                    "(a 4D volume, or --split_phases)")
        return None

    def __init__(self, opt: argparse.Namespace, device: torch.device):
        super().__init__(opt, device)
        suffix = opt.model_suffix or ""
        self.loss_names = []
        self.visual_names = ["real", "fake"]
        self.model_names = ["G" + suffix]  # loads <epoch>_net_G<suffix>.pth
        self.netG = define_G(
            input_nc=opt.input_nc, output_nc=opt.output_nc, ngf=opt.ngf, netG=opt.netG, norm=opt.norm,
            use_dropout=not opt.no_dropout, init_type=opt.init_type, init_gain=opt.init_gain,
            residual=opt.residual, device=device,
        )
        setattr(self, "netG" + suffix, self.netG)  # the name the checkpoint's file carries

    def set_input(self, batch: dict) -> None:
        """``batch["A"]``: (B, input_nc, H, W) in [-1, 1]."""
        self.real = batch["A"].to(self.device, torch.float32)
        self.image_paths = batch["A_paths"]

    def forward(self) -> None:
        self.fake = self.netG(self.real)

    def optimize_parameters(self) -> None:
        raise RuntimeError("the test model has no training step")
