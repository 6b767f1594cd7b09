"""Train a pix2pix model on paired CT volumes.

    python train.py --dataroot ./datasets/ct_phases_dataset --name ct_phase0_generator_optimized \
        --model pix2pix --dataset_mode robust_nifti --axial_slice --netG unet_512 --resize_to 512 ...

Checkpoints go to ``<checkpoints_dir>/<name>/``, the log to ``<log_dir>/train_log_<time>.txt``,
training images to ``<checkpoints_dir>/<name>/web/index.html``. Under ``torchrun
--nproc_per_node=N`` each process trains on its share of the slices.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from data.base_dataset import DatasetError
from models.base_model import CheckpointError
from options.train_options import TrainOptions
from training.loop import train
from util.cli import run_reporting_errors
from util.runtime import setup_logging, setup_runtime, shutdown

logger = logging.getLogger("train")


def main(opt: argparse.Namespace, options: TrainOptions) -> None:
    runtime = setup_runtime(opt)
    log_file = Path(opt.log_dir) / f"train_log_{time.strftime('%Y%m%d_%H%M%S')}.txt" if runtime.is_main else None
    setup_logging(log_file, verbose=opt.verbose, quiet=not runtime.is_main)
    logger.info(options.format_options(opt))
    if runtime.is_main:
        options.save(opt, Path(opt.checkpoints_dir) / opt.name, "train")
        logger.info("log file: %s", log_file)
    try:
        train(opt, runtime)
    finally:
        shutdown(runtime)


if __name__ == "__main__":
    options = TrainOptions()
    opt = options.parse()
    sys.exit(
        run_reporting_errors(
            "train.py", lambda: main(opt, options), (DatasetError, CheckpointError),
            interrupted="interrupted; 'latest' checkpoint saved, resume with --continue_train",
        )
    )
