"""End to end: the reference's training command on a tiny phantom writes what the reference lists, and resumes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_script

# The reference's command (Step 4), with the dataroot, size and epochs of a test.
REFERENCE_COMMAND = (
    "--name ct_phase0_generator_optimized --model pix2pix --dataset_mode robust_nifti --skip_corrupted "
    "--preprocess none --input_nc 1 --output_nc 1 --axial_slice --norm instance --netG unet_128 --batch_size 4 "
    "--lambda_L1 50 --lr 0.0001 --resize_to 128 --display_freq 100 --save_epoch_freq 1"
)
SMALL = ["--ngf", "4", "--ndf", "4", "--num_threads", "0", "--max_dataset_size", "8", "--gpu_ids", "-1"]

pytestmark = pytest.mark.slow  # every test here runs train.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_root):
    """Two epochs of training, then a resume for a third."""
    workdir = tmp_path_factory.mktemp("train")
    first = run_script(
        "train.py", "--dataroot", phantom_root, *shlex.split(REFERENCE_COMMAND), *SMALL,
        "--n_epochs", "1", "--n_epochs_decay", "1", "--print_freq", "4", cwd=workdir,
    )
    resumed = run_script(
        "train.py", "--dataroot", phantom_root, "--name", "ct_phase0_generator_optimized", "--continue_train",
        *SMALL, "--n_epochs", "2", "--n_epochs_decay", "1", "--save_epoch_freq", "1", cwd=workdir,
    )
    return workdir, first, resumed


def test_training_writes_the_files_the_reference_lists(trained):
    workdir, first, _ = trained
    assert first.returncode == 0, first.stderr[-3000:]
    run = workdir / "checkpoints" / "ct_phase0_generator_optimized"
    for name in ("latest_net_G.pth", "latest_net_D.pth", "1_net_G.pth", "1_net_D.pth", "2_net_G.pth",
                 "train_opt.txt", "train_opt.json", "loss_log.txt", "web/index.html"):
        assert (run / name).is_file(), name
    assert list((run / "web" / "images").glob("epoch001_fake_B.png"))
    saved = json.loads((run / "train_opt.json").read_text())
    assert (saved["netG"], saved["norm"], saved["lambda_L1"]) == ("unet_128", "instance", 50.0)


def test_the_log_file_holds_options_dataset_summary_losses_and_epoch_times(trained):
    workdir, _, _ = trained
    logs = sorted((workdir / "logs").glob("train_log_*.txt"))
    assert logs, "logs/train_log_YYYYMMDD_HHMMSS.txt is missing"
    text = logs[0].read_text()
    assert "netG: unet_128" in text.replace("  ", " ").replace("  ", " ") or "unet_128" in text
    assert "3 volume pairs, 8 valid slices, 0 skipped files" in text
    assert "epoch 1 took" in text and "epoch 2 took" in text
    assert "mean losses G_GAN:" in text and "G_L1:" in text


def test_redirected_output_has_no_progress_bar_and_counts_steps_and_slices(trained):
    """Output captured, as in a file or a pipe (not a terminal): plain lines, no carriage return;
    a step is one batch (of 4 slices here), slices count samples."""
    _, first, resumed = trained
    for run in (first, resumed):
        assert "\r" not in run.stdout + run.stderr
    out = first.stdout.split("----------------- End -------------------")[1]  # after the options table
    assert "8 slices per epoch in 2 steps of 4 slices" in out
    assert "(epoch: 1, step: 1/2, slices: 4, compute: " in out and "(epoch: 2, step: 2/2, slices: 8, compute: " in out
    assert "epoch 1 took" in out and "s (2 steps, 8 slices)" in out
    assert not re.search(r"\biter(s|ations?)\b", out)


def test_max_dataset_size_says_what_it_leaves_out(trained):
    _, first, _ = trained
    (line,) = [line for line in first.stdout.splitlines() if line.startswith("--max_dataset_size")]
    assert "using the first 8 of" in line and "from 1 of the 3 volume pairs" in line and "leave it out" in line


def test_without_a_visdom_server_training_warns_once_and_goes_on(trained):
    _, first, _ = trained
    visdom_lines = [line for line in first.stdout.splitlines() if "Visdom" in line]
    assert len(visdom_lines) == 1, visdom_lines


def test_continue_train_resumes_after_the_last_saved_epoch(trained):
    workdir, _, resumed = trained
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "training epochs 3..3" in resumed.stdout
    run = workdir / "checkpoints" / "ct_phase0_generator_optimized"
    assert (run / "3_net_G.pth").is_file()
    assert json.loads((run / "latest_checkpoint.json").read_text())["counters"]["epoch"] == 3
    # Model-defining options came from the run folder, not from repeated flags.
    assert "netG: unet_128" in " ".join(resumed.stdout.split())


def test_torchrun_trains_with_two_processes_on_the_cpu(tmp_path, phantom_root):
    """The reference's multi-GPU command, with two CPU processes (gloo) standing in for GPUs."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(REPO / "train.py"),
         "--dataroot", str(phantom_root), "--name", "ct_phase0_generator_optimized_multigpu", "--model", "pix2pix",
         "--dataset_mode", "robust_nifti", "--norm", "sync_instance", "--batch_size", "2", "--netG", "unet_128",
         "--resize_to", "128", *SMALL, "--n_epochs", "1", "--n_epochs_decay", "0", "--display_id", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 valid slices" in result.stdout
    assert (tmp_path / "checkpoints" / "ct_phase0_generator_optimized_multigpu" / "latest_net_G.pth").is_file()
