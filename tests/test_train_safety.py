"""train.py as users break it: signals, NaN, a second run, damaged checkpoints, bad values, full or read-only disks.

Each failure ends with one line on stderr naming the cause, a non-zero exit, and no
broken checkpoint; each interruption can be resumed.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_TRAIN_FLAGS, run_script

from options.cli import run_reporting_errors
from util.run_folder import open_checkpoint

pytestmark = pytest.mark.slow

# 3 epochs of 4 steps of 2 slices; every step printed, so a test can follow the run.
FLAGS = [*TINY_TRAIN_FLAGS, "--max_dataset_size", "8", "--batch_size", "2", "--n_epochs", "2", "--n_epochs_decay", "1",
         "--print_freq", "2", "--val_freq", "0"]


def train_args(phantom_root, name: str, *extra: str) -> list[str]:
    return ["--dataroot", str(phantom_root), *FLAGS, "--name", name, *extra]


def stderr_lines(result) -> list[str]:
    """What the run wrote to stderr, less the progress bar (tqdm redraws its line with carriage returns)."""
    pieces = (piece.strip() for piece in re.split(r"[\r\n]", result.stderr))
    return [piece for piece in pieces if piece and not re.match(r"epoch \d+: ", piece)]


def final_weights(run_folder) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(run_folder, "latest")
    return {f"{role}.{k}": v for role in ("net_G", "net_D")
            for k, v in torch.load(checkpoint.files[role], weights_only=True).items()}


def test_sigterm_at_a_random_step_then_resume_ends_as_an_uninterrupted_run(tmp_path, phantom_root, one_thread):
    straight = run_script("train.py", *train_args(phantom_root, "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    stop_after = random.Random().randint(1, 10)  # progress lines: one per step
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *train_args(phantom_root, "stopped")],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = 0
    for line in process.stdout:
        seen += line.startswith("(epoch:")
        if seen == stop_after:
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, (stop_after, stderr[-2000:])
    assert "train.py: stopped by SIGTERM at epoch" in stderr and "'latest' saved" in stderr, stderr[-2000:]
    counters = open_checkpoint(tmp_path / "checkpoints" / "stopped", "latest").counters
    assert 0 < counters["total_iters"] < 24

    resumed = run_script("train.py", *train_args(phantom_root, "stopped", "--continue_train"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = final_weights(tmp_path / "checkpoints" / "straight")
    got = final_weights(tmp_path / "checkpoints" / "stopped")
    assert open_checkpoint(tmp_path / "checkpoints" / "stopped", "latest").counters["total_iters"] == 24
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == [], f"stopped after {stop_after} steps"


def test_a_non_finite_loss_stops_the_run_with_one_line_and_saves_nothing(tmp_path, phantom_root, one_thread):
    result = run_script("train.py", *train_args(phantom_root, "nan", "--lr", "1e30"), cwd=tmp_path)
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: epoch 1, step "), lines
    assert "non-finite loss" in lines[0] and "slices in all" in lines[0] and "= nan" in lines[0]
    assert not list((tmp_path / "checkpoints" / "nan").glob("*.pth"))


def test_skip_nonfinite_skips_batches_up_to_its_limit(tmp_path, phantom_root, one_thread):
    result = run_script("train.py", *train_args(phantom_root, "nan", "--lr", "1e30", "--skip_nonfinite", "2"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.count("batch skipped") == 2
    assert "after 2 skipped batch(es)" in stderr_lines(result)[0]


def test_a_second_run_with_the_same_name_is_refused_while_the_first_is_live(tmp_path, phantom_root, one_thread):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                              *train_args(phantom_root, "shared", "--n_epochs", "200")],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in first.stdout:
            if line.startswith("training epochs"):
                break
        second = run_script("train.py", *train_args(phantom_root, "shared", "--overwrite"), cwd=tmp_path)
        assert second.returncode == 2
        assert f"in use by another training run (process {first.pid} on" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130  # Ctrl-C: saved and stopped


def test_a_new_run_into_a_folder_with_checkpoints_needs_continue_train_or_overwrite(tmp_path, phantom_root, one_thread):
    args = train_args(phantom_root, "again", "--n_epochs", "1", "--n_epochs_decay", "0", "--max_dataset_size", "2")
    assert run_script("train.py", *args, cwd=tmp_path).returncode == 0
    refused = run_script("train.py", *args, cwd=tmp_path)
    assert refused.returncode == 2
    assert "already holds checkpoints of a run; resume it with --continue_train, start afresh with --overwrite" in refused.stderr
    (tmp_path / "checkpoints" / "again" / "notes.md").write_text("kept")
    fresh = run_script("train.py", *args, "--overwrite", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "--overwrite: removed" in fresh.stdout
    assert (tmp_path / "checkpoints" / "again" / "notes.md").read_text() == "kept"


@pytest.mark.parametrize("damage", ["truncated state", "foreign state", "damaged manifest"])
def test_a_damaged_checkpoint_is_a_one_line_error_not_a_fresh_start(tmp_path, phantom_root, one_thread, damage):
    args = train_args(phantom_root, "damaged", "--n_epochs", "1", "--n_epochs_decay", "1", "--max_dataset_size", "2")
    assert run_script("train.py", *args, cwd=tmp_path).returncode == 0
    folder = tmp_path / "checkpoints" / "damaged"
    state = folder / "latest_train_state.pth"
    if damage == "truncated state":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "foreign state":
        torch.save({"optimizers": [{}], "schedulers": []}, state)
    else:
        (folder / "latest_checkpoint.json").write_text("{")
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pth")}
    result = run_script("train.py", *args, "--continue_train", cwd=tmp_path)
    assert result.returncode in (1, 2)
    lines = stderr_lines(result)
    assert len(lines) == 1 and "latest_" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pth")} == before  # no silent restart


@pytest.mark.parametrize("flags, message", [
    (["--hu_min=-3e38", "--hu_max", "3e38", "--intensity", "hu"], "overflows float32"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lambda_L1", "1e39"], "--lambda_L1 1e+39: must be a finite number"),
    (["--name", "../outside"], "one folder name inside --checkpoints_dir"),
])
def test_values_that_cannot_work_are_refused_before_any_data_is_read(tmp_path, phantom_root, flags, message):
    result = run_script("train.py", *train_args(phantom_root, "refused"), *flags, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(stderr_lines(result)) == 1
    assert not (tmp_path / "cache").exists()


def test_cuda_out_of_memory_and_a_full_disk_become_one_line_with_advice(capsys):
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "results/run/volumes/p1_phase0.nii.gz")

    assert run_reporting_errors("train.py", out_of_memory) == 1
    assert run_reporting_errors("test.py", full_disk) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train.py: error: CUDA out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "lower --batch_size" in lines[0] and "--resize_to 256 --netG unet_256" in lines[0]
    assert lines[1] == "test.py: error: results/run/volumes/p1_phase0.nii.gz: No space left on device"
