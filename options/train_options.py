"""Training flags: display, saving, schedule, resume."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from models.networks import LR_POLICIES
from options.base_options import BaseOptions, OptionsError, load_saved_options
from options.presets import PRESETS
from util.fast_path import MEMORY_FORMATS, PRECISIONS, SPEED_OPTIONS
from util.image import add_display_window_argument
from util.run_folder import (
    CheckpointError,
    RunLock,
    checkpoint_label,
    generator_file,
    holds_checkpoints,
    open_checkpoint,
)

# Flags a resumed run never takes from the saved run: they say where and what to resume,
# and the device and the speed flags (util/fast_path.py) are properties of the machine that resumes.
NOT_RESUMED = ("continue_train", "epoch_count", "epoch", "load_iter", "name", "checkpoints_dir", "gpu_ids", "suffix",
               "overwrite", *SPEED_OPTIONS)


class TrainOptions(BaseOptions):
    is_train = True

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = super().initialize(parser)
        g = parser.add_argument_group("display and logging")
        g.add_argument("--display_freq", type=int, default=400, help="show training images every N slices trained on")
        g.add_argument("--display_ncols", type=int, default=4, help="images per row in Visdom")
        g.add_argument("--display_id", type=int, default=1, help="Visdom window id; 0 turns Visdom off")
        g.add_argument("--display_server", default="http://localhost", help="Visdom server")
        g.add_argument("--display_env", default="main", help="Visdom environment")
        g.add_argument("--display_port", type=int, default=8097, help="Visdom port")
        g.add_argument("--update_html_freq", type=int, default=1000, help="also save the shown images to the HTML page every N slices")
        g.add_argument("--print_freq", type=int, default=100, help="print and log the losses of a step every N slices")
        g.add_argument("--no_html", action="store_true", help="do not write <checkpoints_dir>/<name>/web/")
        add_display_window_argument(g, "the training page (with --intensity hu)")
        g.add_argument("--log_dir", default="./logs", help="train_log_YYYYMMDD_HHMMSS.txt goes here")

        g = parser.add_argument_group("saving and resuming")
        g.add_argument("--save_latest_freq", type=int, default=5000, help="save 'latest' every N slices (and at the end of every epoch)")
        g.add_argument("--save_epoch_freq", type=int, default=5, help="save <epoch>_net_*.pth every N epochs")
        g.add_argument("--save_by_iter", action="store_true", help="every --save_latest_freq slices, save iter_<N> (N: slices trained on so far) instead of 'latest'")
        g.add_argument("--continue_train", action="store_true", help="resume from the checkpoint named by --epoch or --load_iter")
        g.add_argument("--epoch_count", type=int, default=1,
                       help="number of the first epoch; on resume, defaults to the epoch after the saved one")
        g.add_argument("--phase", default="train", help="data subfolders <phase>A/ and <phase>B/")
        g.add_argument("--save_optimizer_every_epoch", action="store_true",
                       help="keep the optimiser state with every <epoch> checkpoint, not only with latest and best "
                       "(it is twice the generator's size)")
        g.add_argument("--overwrite", action="store_true",
                       help="start a new run in a run folder that already holds checkpoints, deleting them")

        g = parser.add_argument_group("validation and safety")
        g.add_argument("--val_freq", type=int, default=-1,
                       help="score the generator on held-out patients (valA/+valB/, else testA/+testB/) every N "
                       "epochs and keep the best as 'best'; -1: every epoch when such a split exists; 0: never")
        g.add_argument("--num_val", type=int, default=5, help="held-out patients scored at each validation")
        g.add_argument("--lpips", action="store_true", help="add LPIPS to validation (needs torchvision's AlexNet weights)")
        g.add_argument("--skip_nonfinite", type=int, default=0,
                       help="skip up to N steps whose loss is NaN/Inf; 0: the first one stops the run")

        g = parser.add_argument_group("optimisation")
        g.add_argument("--preset", choices=sorted(PRESETS),
                       help="a measured training recipe (options/presets.py; phase0 is the README's recommendation): "
                       "sets the defaults of its flags, which the command line can still change")
        g.add_argument("--n_epochs", type=int, default=100, help="epochs at the initial learning rate")
        g.add_argument("--n_epochs_decay", type=int, default=100, help="epochs over which the learning rate decays to zero")
        g.add_argument("--beta1", type=float, default=0.5, help="Adam momentum term")
        g.add_argument("--lr", type=float, default=0.0002, help="initial Adam learning rate")
        g.add_argument("--lr_policy", default="linear", choices=LR_POLICIES, help="learning-rate schedule")
        g.add_argument("--lr_decay_iters", type=int, default=50, help="step policy: multiply by 0.1 every N epochs")

        # util/fast_path.py says what each part does and why the CPU's defaults differ.
        g = parser.add_argument_group("speed (the fast path: on by default with CUDA)")
        g.add_argument("--precision", default="auto", choices=sorted(PRECISIONS),
                       help="; ".join(f"{name}: {meaning}" for name, meaning in PRECISIONS.items()))
        g.add_argument("--fused_adam", action="store_true", default=torch.cuda.is_available(),
                       help="Adam's update in one fused kernel, which also skips a NaN/Inf step on the device "
                       "(on by default where CUDA is available); --fused_adam False turns it off")
        g.add_argument("--memory_format", default="contiguous", choices=sorted(MEMORY_FORMATS),
                       help="layout of the networks' weights and inputs; instance norm returns contiguous tensors, "
                       "so channels_last adds copies unless measured faster")
        g.add_argument("--sync_every_step", action="store_true",
                       help="read losses and the NaN/Inf check on the host after every step (stops at the very step); "
                       "by default, with fused Adam, they are read every --print_freq slices and at saves")
        return parser

    def set_saved_defaults(self, parser: argparse.ArgumentParser, known: argparse.Namespace) -> None:
        if known.preset:
            parser.set_defaults(**PRESETS[known.preset])
        if not known.continue_train:
            return
        run_folder = Path(known.checkpoints_dir) / known.name
        saved = load_saved_options(run_folder)
        if saved is not None:
            # Resuming continues the same run: every saved training flag is the default,
            # except those that say where and from which checkpoint to resume.
            known_flags = {action.dest for action in parser._actions}
            parser.set_defaults(**{
                key: (float("inf") if value is None and key == "max_dataset_size" else value)
                for key, value in saved.items()
                if key in known_flags and key not in NOT_RESUMED
            })
        label = checkpoint_label(known.epoch, known.load_iter)
        try:
            checkpoint = open_checkpoint(run_folder, label, verify=False)
        except CheckpointError:
            return  # validate() says what is missing
        if "next_epoch" in checkpoint.counters:
            parser.set_defaults(epoch_count=int(checkpoint.counters["next_epoch"]))

    def validate(self, opt: argparse.Namespace, argv: list[str]) -> None:
        super().validate(opt, argv)
        if not opt.dataroot:
            raise OptionsError("--dataroot is required: the folder that holds trainA/ and trainB/")
        if not Path(opt.dataroot).is_dir():
            raise OptionsError(f"--dataroot {opt.dataroot}: folder not found")
        if opt.n_epochs < 0 or opt.n_epochs_decay < 0 or opt.n_epochs + opt.n_epochs_decay < 1:
            raise OptionsError(f"--n_epochs {opt.n_epochs} --n_epochs_decay {opt.n_epochs_decay}: need at least one epoch in all")
        if opt.epoch_count < 1:
            raise OptionsError(f"--epoch_count must be at least 1, got {opt.epoch_count}")
        if opt.lr <= 0:
            raise OptionsError(f"--lr must be positive, got {opt.lr}")
        for flag in ("print_freq", "display_freq", "update_html_freq", "save_latest_freq", "save_epoch_freq", "num_val"):
            if getattr(opt, flag) < 1:
                raise OptionsError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
        if opt.val_freq < -1 or opt.skip_nonfinite < 0:
            raise OptionsError("--val_freq must be -1 (auto), 0 (off) or a number of epochs; --skip_nonfinite 0 or more")
        run_folder = Path(opt.checkpoints_dir) / opt.name
        if opt.continue_train:
            label = checkpoint_label(opt.epoch, opt.load_iter)
            if not generator_file(run_folder, label).is_file():
                raise OptionsError(f"--continue_train: {generator_file(run_folder, label)} not found; nothing to resume")
            if opt.overwrite:
                raise OptionsError("--continue_train and --overwrite contradict each other: resume, or start afresh")
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 holds the lock for all
            try:
                RunLock(run_folder).check_free()
            except CheckpointError as err:
                raise OptionsError(str(err)) from None
        if not opt.continue_train and not opt.overwrite and holds_checkpoints(run_folder):
            raise OptionsError(
                f"{run_folder}: already holds checkpoints of a run; resume it with --continue_train, "
                "start afresh with --overwrite (deletes them), or choose another --name"
            )

