"""Flags shared by training and testing, and the parse -> validate -> save sequence.

Options are parsed in stages, as in upstream pix2pix: the base flags first, then the flags
that the chosen ``--model`` and ``--dataset_mode`` add, then (for test and resume) the
defaults that the run folder's ``train_opt.json`` supplies, so that a trained model is
rebuilt without repeating its training flags. The result is validated once and never
changed afterwards.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

import data
import models
from data.phases import PHASE_CONDITIONINGS, conditioning_channels, count_phases, parse_phases
from models.networks import DISCRIMINATORS, GENERATORS, INIT_TYPES, NORM_HELP, NORM_LAYERS, required_divisor
from options.cli import OneLineErrorParser
from util.device import add_gpu_ids_argument
from util.errors import UserError
from util.run_folder import (
    MODEL_DEFINING_OPTIONS,
    OPTIONS_JSON,
    CheckpointError,
    check_run_name,
    load_options,
    save_options,
)

__all__ = ["MODEL_DEFINING_OPTIONS", "OPTIONS_JSON", "BaseOptions", "OptionsError", "load_saved_options"]
# The largest magnitude a float option may take: values go through float32 tensors.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class OptionsError(UserError, ValueError):
    """A flag value, or a combination of values, that cannot work."""


def positive_int_or_inf(text: str) -> float:
    value = float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


class BaseOptions:
    """Build the parser, parse the command line once, validate, print and save."""

    is_train = False

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        g = parser.add_argument_group("experiment")
        g.add_argument("--dataroot", help="folder holding <phase>A/ and <phase>B/ (e.g. trainA/, trainB/)")
        g.add_argument("--name", default="experiment_name", help="run name: checkpoints go to <checkpoints_dir>/<name>/")
        add_gpu_ids_argument(g, "GPU ids, e.g. 0 or 0,1 (under torchrun each process takes GPU LOCAL_RANK)")
        g.add_argument("--checkpoints_dir", default="./checkpoints", help="models are saved here")
        g.add_argument("--seed", type=int, default=0, help="random seed for weights, shuffling and flips")

        g = parser.add_argument_group("model")
        g.add_argument("--model", default="pix2pix", choices=models.MODEL_NAMES, help="which model (models/<model>_model.py)")
        g.add_argument("--input_nc", type=int, default=1, help="input channels: 1 for CT; with --context_slices K the network takes 1+2K, and 1 is read as the CT channel beside its 2K neighbours")
        g.add_argument("--output_nc", type=int, default=1, help="output channels (1 for CT)")
        g.add_argument("--ngf", type=int, default=64, help="generator filters in the last conv layer")
        g.add_argument("--ndf", type=int, default=64, help="discriminator filters in the first conv layer")
        g.add_argument("--netD", default="basic", choices=sorted(DISCRIMINATORS),
                       help="basic: 70x70 PatchGAN; n_layers: PatchGAN with --n_layers_D; pixel: 1x1 PixelGAN")
        g.add_argument("--netG", default="resnet_9blocks", choices=sorted(GENERATORS),
                       help="generator; unet_N halves N x N slices down to 1x1 (--resize_to a multiple of N); the default is --model's")
        g.add_argument("--n_layers_D", type=int, default=3, help="layers of the n_layers discriminator")
        g.add_argument("--norm", default="instance", choices=sorted(NORM_LAYERS), help=NORM_HELP)
        g.add_argument("--init_type", default="normal", choices=sorted(INIT_TYPES), help="weight initialisation")
        g.add_argument("--init_gain", type=float, default=0.02, help="scale for normal, xavier and orthogonal init")
        g.add_argument("--no_dropout", action="store_true", help="no dropout in the generator")
        g.add_argument("--residual", action="store_true",
                       help="the generator predicts the change to its input slice (output = input + G(input)); "
                       "starts from the identity and learns far faster when input and target differ only where things move")
        g.add_argument("--phases", default="0",
                       help="which phases of the breathing cycle to make: 0 (phase 0 alone), all, or a list such as 0,5; "
                       "several phases train one generator, told the phase by --phase_conditioning")
        g.add_argument("--phase_conditioning", default="output", choices=sorted(PHASE_CONDITIONINGS),
                       help="with several --phases: " + "; ".join(f"{k}: {v}" for k, v in PHASE_CONDITIONINGS.items()))
        g.add_argument("--num_phases", type=int, default=None,
                       help="phases in the targets' breathing cycle; read from <dataroot>/<phase>B/ for --phases other than 0, "
                       "saved with the run (leave it out)")

        g = parser.add_argument_group("data")
        g.add_argument("--dataset_mode", default="robust_nifti", choices=data.DATASET_MODES, help="data/<mode>_dataset.py")
        g.add_argument("--direction", default="AtoB", choices=("AtoB", "BtoA"), help="AtoB: average -> phase 0")
        g.add_argument("--serial_batches", action="store_true", help="take slices in order instead of shuffling")
        # Slices come from a local cache at >2,000/s in the main process (benchmarks/data_throughput.py);
        # on a CPU, worker processes only add shared-memory copies, so they help only beside a GPU.
        default_workers = 4 if torch.cuda.is_available() else 0
        g.add_argument("--num_threads", type=int, default=default_workers,
                       help="DataLoader worker processes; 0 loads in the main process (the default without CUDA; 4 with it)")
        g.add_argument("--batch_size", type=int, default=1, help="slices per batch (per GPU under torchrun)")
        g.add_argument("--preprocess", default="none", choices=("none",),
                       help="kept for pix2pix compatibility; slices are resized with --resize_to")
        g.add_argument("--no_flip", action="store_true", help="no random left-right flips of training slices")
        g.add_argument("--max_dataset_size", type=positive_int_or_inf, default=float("inf"),
                       help="use at most this many slices")
        g.add_argument("--display_winsize", type=int, default=256, help="display size of images in Visdom and HTML")

        g = parser.add_argument_group("loading")
        g.add_argument("--epoch", default="latest", help="which checkpoint to load: latest, or an epoch number")
        g.add_argument("--load_iter", type=int, default=0,
                       help="if > 0, load the checkpoint iter_<N> (saved by --save_by_iter after N slices) instead of --epoch")
        g.add_argument("--verbose", action="store_true", help="print network architectures and debug messages")
        g.add_argument("--suffix", default="", help="appended to --name, formatted with the options: e.g. {model}_{netG}")
        return parser

    # -- parsing ---------------------------------------------------------------------------
    def build_parser(self, argv: list[str]) -> argparse.ArgumentParser:
        """The full parser for ``argv``: base flags, plus those of the chosen plug-ins, with
        defaults taken from a saved run where one applies."""
        # --help is added last: parsed any earlier, it would print and exit before the
        # plug-ins had added their flags and set their defaults (pix2pix's unet_256, ...).
        parser = self.initialize(OneLineErrorParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=False))
        known, _ = parser.parse_known_args(argv)
        models.get_option_setter(known.model)(parser, self.is_train)
        known, _ = parser.parse_known_args(argv)
        data.get_option_setter(known.dataset_mode)(parser, self.is_train)
        known, _ = parser.parse_known_args(argv)
        self.set_saved_defaults(parser, known)
        known, _ = parser.parse_known_args(argv)
        context = getattr(known, "context_slices", 0)
        if context > 0 and not _given(argv, "--input_nc"):
            parser.set_defaults(input_nc=1 + 2 * context)
        if known.num_phases is None:  # a saved run's count, else (training) the data's
            parser.set_defaults(num_phases=self.data_phase_count(known))
        parser.add_argument("-h", "--help", action="help", default=argparse.SUPPRESS,
                            help="show this help message, with the defaults of this command line's --model, "
                            "--dataset_mode (and saved run), and exit")
        return parser

    def set_saved_defaults(self, parser: argparse.ArgumentParser, known: argparse.Namespace) -> None:
        """Hook for test/resume: take model-defining defaults from the run's train_opt.json."""

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        """Parse ``argv`` (default: the command line) into a validated, final ``opt``."""
        argv = sys.argv[1:] if argv is None else list(argv)
        parser = self.build_parser(argv)
        opt = parser.parse_args(argv)
        opt.isTrain = self.is_train
        if opt.suffix:
            opt.name = f"{opt.name}_{opt.suffix.format(**vars(opt))}"
        if getattr(opt, "context_slices", 0) and opt.input_nc == 1:
            # The reference's commands write --input_nc 1 for CT's one channel: 2.5D adds the
            # 2K neighbours to it, so those commands run as written on a --preset phase0 run.
            opt.input_nc = 1 + 2 * opt.context_slices
        try:
            self.resolve_phases(opt)
            self.validate(opt, argv)
        except OptionsError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
        self.parser = parser
        return opt

    def resolve_phases(self, opt: argparse.Namespace) -> None:
        """``--phases`` against the targets' phase count: sets ``num_phases``, ``phase_list``
        and the channels the phases add (data/phases.py's ``conditioning_channels``): one
        phase-code input channel, or one output channel per phase. ``--input_nc`` given as the
        CT channels (1 or 1+2K) and ``--output_nc 1`` are read as before phases existed.
        """
        try:
            phase_list = parse_phases(opt.phases, opt.num_phases)
        except ValueError as err:
            raise OptionsError(str(err)) from None
        opt.phase_list = list(phase_list)
        code_nc, output_nc = conditioning_channels(len(phase_list), opt.phase_conditioning)
        ct_channels = 1 + 2 * getattr(opt, "context_slices", 0)
        if code_nc and opt.input_nc == ct_channels:
            opt.input_nc = ct_channels + code_nc
        if output_nc > 1 and opt.output_nc == 1:
            opt.output_nc = output_nc

    def data_phase_count(self, known: argparse.Namespace) -> int:
        """N of the training targets, for ``--num_phases``'s default: read (headers only) when
        ``--phases`` asks for more than phase 0, which every layout holds; else 1."""
        if not (self.is_train and known.dataroot and str(known.phases).strip() != "0"):
            return 1
        folder = Path(known.dataroot)
        return count_phases(folder / f"{known.phase}A", folder / f"{known.phase}B")

    def validate(self, opt: argparse.Namespace, argv: list[str]) -> None:
        """Refuse values that cannot work, before any data is read."""
        try:
            check_run_name(opt.name)
        except ValueError as err:
            raise OptionsError(str(err)) from None
        for key, value in sorted(vars(opt).items()):
            if isinstance(value, float) and key != "max_dataset_size" and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                raise OptionsError(f"--{key} {value}: must be a finite number within float32's range (|x| <= {FLOAT32_MAX:.3g})")
        if hasattr(opt, "resize_to"):
            divisor = required_divisor(opt.netG)
            if opt.resize_to < divisor or opt.resize_to % divisor:
                raise OptionsError(
                    f"--resize_to {opt.resize_to} does not fit --netG {opt.netG}: its input must be a multiple of "
                    f"{divisor} pixels to be halved down to 1x1 (use --resize_to {max(divisor, opt.resize_to // divisor * divisor)} "
                    "or a smaller U-Net)"
                )
        if getattr(opt, "context_slices", 0) < 0:
            raise OptionsError(f"--context_slices must be 0 or more, got {opt.context_slices}")
        code_nc, phase_outputs = conditioning_channels(len(opt.phase_list), opt.phase_conditioning)
        if getattr(opt, "context_slices", 0) and opt.input_nc != 1 + 2 * opt.context_slices + code_nc:
            raise OptionsError(
                f"--input_nc {opt.input_nc} does not match --context_slices {opt.context_slices}: "
                f"the input has 1+2K = {1 + 2 * opt.context_slices} channels (give 1 or 1+2K, or leave --input_nc out)"
                + (" plus the phase code" if code_nc else "")
            )
        if code_nc and opt.input_nc != 1 + 2 * getattr(opt, "context_slices", 0) + code_nc:
            raise OptionsError(f"--input_nc {opt.input_nc}: with --phase_conditioning input the input is the CT slice(s) "
                               "plus one phase-code channel; leave --input_nc out")
        if phase_outputs > 1 and opt.output_nc != phase_outputs:
            raise OptionsError(f"--output_nc {opt.output_nc}: --phases {opt.phases} with --phase_conditioning output makes "
                               f"one output channel per phase, {phase_outputs}; leave --output_nc out")
        if code_nc and opt.netG.startswith("resnet") and opt.norm in ("instance", "sync_instance"):
            # The code is a constant channel: the first convolution turns it into a constant per
            # feature map, which the instance norm right after it subtracts. The network would be
            # blind to the phase (tests/test_whole_cycle_training.py measures it).
            raise OptionsError(
                f"--phase_conditioning input with --netG {opt.netG} --norm {opt.norm}: instance normalisation after the "
                "first convolution removes the constant phase-code channel, so every phase would get the same output; "
                "use --phase_conditioning output (or a unet_* generator, or --norm batch)"
            )
        if len(opt.phase_list) > 1 and opt.direction == "BtoA":
            raise OptionsError(f"--phases {opt.phases}: several phases are targets of one input, AtoB; not --direction BtoA")
        if len(opt.phase_list) > 1 and self.is_train and (opt.model != "pix2pix" or opt.dataset_mode != "robust_nifti"):
            raise OptionsError(f"--phases {opt.phases}: several phases train with --model pix2pix and --dataset_mode "
                               f"robust_nifti, not --model {opt.model} --dataset_mode {opt.dataset_mode}")
        if opt.residual and phase_outputs == 1 and opt.output_nc not in (1, opt.input_nc):
            raise OptionsError(f"--residual adds the input slice to the output: --output_nc must be 1 or --input_nc, got {opt.output_nc}")
        if hasattr(opt, "hu_min") and opt.hu_max <= opt.hu_min:
            raise OptionsError(f"--hu_max {opt.hu_max} must be above --hu_min {opt.hu_min}")
        if hasattr(opt, "hu_min") and opt.hu_max - opt.hu_min > FLOAT32_MAX:
            raise OptionsError(f"--hu_min {opt.hu_min} --hu_max {opt.hu_max}: the window's width overflows float32")
        for flag in ("batch_size", "input_nc", "output_nc", "ngf", "ndf"):
            if getattr(opt, flag) < 1:
                raise OptionsError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
        if opt.num_threads < 0:
            raise OptionsError(f"--num_threads must be 0 or more, got {opt.num_threads}")
        problem = models.find_model_using_name(opt.model).option_problems(opt)
        if problem:
            raise OptionsError(problem)

    # -- reporting -------------------------------------------------------------------------
    def format_options(self, opt: argparse.Namespace) -> str:
        """The options as a table, marking values that differ from the defaults."""
        lines = ["----------------- Options ---------------"]
        for key, value in sorted(vars(opt).items()):
            default = self.parser.get_default(key)
            note = f"\t[default: {default}]" if default is not None and value != default else ""
            lines.append(f"{key:>25}: {value!s:<30}{note}")
        lines.append("----------------- End -------------------")
        return "\n".join(lines)

    def save(self, opt: argparse.Namespace, folder: Path, phase: str) -> None:
        """Write ``<phase>_opt.txt`` (for people) and, for training, ``train_opt.json`` (for code)."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{phase}_opt.txt").write_text(self.format_options(opt) + "\n")
        if phase == "train":
            save_options(folder, vars(opt))


def load_saved_options(run_folder: Path) -> dict | None:
    """The options a run was trained with (``train_opt.json``), or None if there are none.

    Raises:
        OptionsError: the file is unreadable or of a newer format.
    """
    try:
        return load_options(run_folder)
    except CheckpointError as err:
        raise OptionsError(str(err)) from err


def saved_model_defaults(parser: argparse.ArgumentParser, saved: dict) -> dict:
    """The model-defining values of ``saved`` that ``parser`` knows."""
    known = {action.dest for action in parser._actions}
    return {key: saved[key] for key in MODEL_DEFINING_OPTIONS if key in saved and key in known}


def _given(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)
