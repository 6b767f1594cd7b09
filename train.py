"""Train a pix2pix model on paired CT volumes.

    python train.py --dataroot ./datasets/ct_phases_dataset --name ct_phase0_generator_optimized \
        --model pix2pix --dataset_mode robust_nifti --axial_slice --netG unet_512 --resize_to 512 ...

Checkpoints go to ``<checkpoints_dir>/<name>/``, the log to ``<log_dir>/train_log_<time>.txt``,
training images to ``<checkpoints_dir>/<name>/web/index.html``. Under ``torchrun
--nproc_per_node=N`` each process trains on its share of the slices. SIGINT (Ctrl-C) or
SIGTERM saves ``latest`` at the current step and stops; ``--continue_train`` resumes there.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from options.cli import run_reporting_errors
from options.train_options import TrainOptions
from training.loop import train
from training.signals import StopRequests
from util.run_folder import RunLock, clear_run
from util.runtime import setup_logging, setup_runtime, shutdown

logger = logging.getLogger("train")


def new_log_file(log_dir: Path, name: str) -> Path:
    """``train_log_YYYYMMDD_HHMMSS.txt`` as the reference names it; another run's log of the
    same second is never appended to (the run name is added then)."""
    path = log_dir / f"train_log_{time.strftime('%Y%m%d_%H%M%S')}.txt"
    return path.with_name(f"{path.stem}_{name}.txt") if path.exists() else path


def main(opt: argparse.Namespace, options: TrainOptions) -> None:
    stop = StopRequests().install()
    runtime = setup_runtime(opt)
    run_folder = Path(opt.checkpoints_dir) / opt.name
    lock = RunLock(run_folder)
    try:
        if runtime.is_main:
            lock.acquire()  # one live run per folder; released however this process ends
            if opt.overwrite:
                removed = clear_run(run_folder)
                if removed:
                    print(f"--overwrite: removed {len(removed)} file(s) of the previous run in {run_folder}")
        log_file = new_log_file(Path(opt.log_dir), opt.name) if runtime.is_main else None
        setup_logging(log_file, verbose=opt.verbose, quiet=not runtime.is_main)
        logger.info(options.format_options(opt))
        if runtime.is_main:
            options.save(opt, run_folder, "train")
            logger.info("log file: %s", log_file)
        train(opt, runtime, stop)
    finally:
        lock.release()
        shutdown(runtime)


if __name__ == "__main__":
    options = TrainOptions()
    opt = options.parse()
    sys.exit(run_reporting_errors("train.py", lambda: main(opt, options), interrupted="interrupted; nothing was saved"))
