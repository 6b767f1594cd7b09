"""Test a trained model on the test volumes: generated volumes, metrics and an HTML page.

    python test.py --dataroot ./datasets/ct_phases_dataset --name ct_phase0_generator_optimized \
        --model pix2pix --dataset_mode robust_nifti --preprocess none --input_nc 1 --output_nc 1 \
        --axial_slice --resize_to 512 --epoch latest

The network is rebuilt from ``<checkpoints_dir>/<name>/train_opt.json``. Results go to
``<results_dir>/<name>/<phase>_<epoch>/``: ``volumes/``, ``index.html`` and, where
``<phase>B/`` holds targets, ``metrics.csv`` and ``metrics.json`` (see evaluation/results.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from evaluation.results import results_folder, run_test
from options.cli import run_reporting_errors
from options.test_options import TestOptions
from util.runtime import setup_logging, setup_runtime

logger = logging.getLogger("test")


def main(opt: argparse.Namespace, options: TestOptions) -> None:
    runtime = setup_runtime(opt)
    setup_logging(None, verbose=opt.verbose)
    logger.info(options.format_options(opt))
    report = run_test(opt, runtime.device)
    options.save(opt, results_folder(opt), "test")
    for line in report.summary_lines():
        print(line)


if __name__ == "__main__":
    options = TestOptions()
    opt = options.parse()
    sys.exit(run_reporting_errors("test.py", lambda: main(opt, options)))
