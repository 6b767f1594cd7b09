"""Training in several processes (torchrun, DistributedDataParallel): one model, whoever holds it.

Two CPU processes with the gloo backend stand in for two GPUs. Every rank must end with the
same weights (each saw other slices); rank 0 alone writes the run folder, whose checkpoints
hold the bare networks (upstream's keys), load in a single process, and resume under torchrun
exactly where they were saved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO, TINY_TRAIN_FLAGS, run_script

from inference.volume import load_generator
from models.networks import define_D, define_G
from tests.distributed_worker import take_steps

WORKER = REPO / "tests" / "distributed_worker.py"
NAME = "ct_phase0_generator_optimized_multigpu"

pytestmark = pytest.mark.slow  # every test here starts processes

# The reference's multi-GPU flags (--norm sync_instance) on the tiny phantom: 8 slices, split
# over 2 processes of batch 2, so an epoch is 2 steps. --save_by_iter --save_latest_freq 12
# also keeps iter_12: epoch 2 after its first step, a checkpoint from the middle of an epoch.
FLAGS = [*TINY_TRAIN_FLAGS, "--name", NAME, "--norm", "sync_instance", "--batch_size", "2",
         "--max_dataset_size", "8", "--val_freq", "0", "--n_epochs", "1", "--n_epochs_decay", "1",
         "--save_by_iter", "--save_latest_freq", "12"]


def torchrun(out_dir: Path, *flags: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2`` running train.py's main; each rank then saves ``out_dir/rank<R>.pth``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(WORKER), str(out_dir), *flags],
        cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def differing_keys(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The keys where two state dicts differ (all of them if the key sets differ)."""
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [key for key in a if not torch.equal(a[key], b[key])]


def tmp_copy(workdir: Path, name: str) -> Path:
    """A fresh work folder holding a copy of the two-epoch run's checkpoints."""
    copy = workdir.parent / f"{workdir.name}_{name}"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    return copy


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, phantom_root):
    """Two processes, two epochs; returns the work folder (run folder under checkpoints/, ranks under ranks/)."""
    workdir = tmp_path_factory.mktemp("ddp")
    result = torchrun(workdir / "ranks", "--dataroot", str(phantom_root), *FLAGS, cwd=workdir)
    return workdir, result


def test_both_processes_end_two_epochs_with_identical_weights(two_epochs):
    workdir, _ = two_epochs
    rank0 = torch.load(workdir / "ranks" / "rank0.pth", weights_only=True)
    rank1 = torch.load(workdir / "ranks" / "rank1.pth", weights_only=True)
    for net in ("G", "D"):
        assert differing_keys(rank0[net], rank1[net]) == [], net
    # ... and they trained: epoch 2 moved them away from the end of epoch 1.
    after_epoch_1 = torch.load(workdir / "checkpoints" / NAME / "1_net_G.pth", weights_only=True)
    assert differing_keys(after_epoch_1, rank0["G"]) != []


def test_rank_0_alone_writes_the_run_folder_and_the_log(two_epochs):
    workdir, result = two_epochs
    run = workdir / "checkpoints" / NAME
    rank0 = torch.load(workdir / "ranks" / "rank0.pth", weights_only=True)
    for net in ("G", "D"):
        assert differing_keys(torch.load(run / f"latest_net_{net}.pth", weights_only=True), rank0[net]) == [], net
    assert len(list((workdir / "logs").glob("train_log_*.txt"))) == 1
    assert result.stdout.count("epoch 2 took") == 1  # the other rank logs nothing
    assert "8 slices per epoch in 2 steps of 4 slices" in result.stdout  # batch 2 per process, 2 processes


def test_the_checkpoint_holds_the_bare_networks_with_upstreams_keys(two_epochs):
    run = two_epochs[0] / "checkpoints" / NAME
    bare_G = define_G(input_nc=1, output_nc=1, ngf=4, netG="unet_128", norm="sync_instance")
    bare_D = define_D(input_nc=2, ndf=4, netD="basic", norm="sync_instance")
    assert torch.load(run / "latest_net_G.pth", weights_only=True).keys() == bare_G.state_dict().keys()
    assert torch.load(run / "latest_net_D.pth", weights_only=True).keys() == bare_D.state_dict().keys()


def test_the_checkpoint_loads_in_a_single_process(two_epochs, phantom_root):
    workdir, _ = two_epochs
    generator = load_generator(workdir / "checkpoints", NAME, "latest")
    rank0 = torch.load(workdir / "ranks" / "rank0.pth", weights_only=True)
    assert differing_keys(generator.net.state_dict(), rank0["G"]) == []

    single = tmp_copy(workdir, "single")
    result = run_script("train.py", "--dataroot", phantom_root, "--name", NAME, "--continue_train",
                        "--checkpoints_dir", single / "checkpoints", "--n_epochs", "2", "--n_epochs_decay", "1",
                        "--gpu_ids", "-1", "--num_threads", "0", "--display_id", "0", cwd=single)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training epochs 3..3" in result.stdout
    assert "saved by 2 process(es), this run has 1" in result.stdout


def test_continue_train_under_torchrun_from_the_middle_of_an_epoch_ends_as_the_uninterrupted_run(two_epochs,
                                                                                                phantom_root):
    workdir, _ = two_epochs
    resumed = tmp_copy(workdir, "resumed")
    result = torchrun(resumed / "ranks", "--dataroot", str(phantom_root), *FLAGS, "--continue_train",
                      "--load_iter", "12", "--checkpoints_dir", str(resumed / "checkpoints"), cwd=resumed)
    assert "training epochs 2..2" in result.stdout and "resuming at step 2" in result.stdout
    straight = torch.load(workdir / "ranks" / "rank0.pth", weights_only=True)
    for rank in (0, 1):
        got = torch.load(resumed / "ranks" / f"rank{rank}.pth", weights_only=True)
        for net in ("G", "D"):
            assert differing_keys(straight[net], got[net]) == [], (rank, net)


# Every way the pix2pix step can be set up, in two processes: the weights must stay equal.
CONFIGS = {
    "vanilla": [],
    "no_gan": ["--lambda_GAN", "0"],  # D never runs: not wrapped, never updated
    "wgangp": ["--gan_mode", "wgangp"],  # a third pass through D, and a gradient of a gradient
    "batch_norm": ["--norm", "batch"],  # running statistics stay each process's own
    # (--norm syncbatch is left out: SyncBatchNorm runs on GPUs only.)
    "residual": ["--residual"],
    "bf16_fused": ["--precision", "bf16", "--fused_adam"],  # CUDA's default path: autocast, fused Adam
    "fp16_scaler": ["--precision", "fp16", "--fused_adam"],  # GPUs without bf16: a gradient scaler
}


def test_every_kind_of_pix2pix_step_keeps_the_processes_equal(tmp_path, phantom_root):
    configs = {name: [*TINY_TRAIN_FLAGS, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path),
                      *flags] for name, flags in CONFIGS.items()}
    mp.spawn(take_steps, args=(2, f"file://{tmp_path / 'rendezvous'}", configs, str(tmp_path)), nprocs=2)
    for name in CONFIGS:
        rank0 = torch.load(tmp_path / f"{name}_rank0.pth", weights_only=True)
        rank1 = torch.load(tmp_path / f"{name}_rank1.pth", weights_only=True)
        assert rank0["replicas"] == (["G"] if name == "no_gan" else ["D", "G"]), name
        for net in ("G", "D"):
            different = differing_keys(rank0[net], rank1[net])
            if name == "batch_norm":  # each process's own batches: only the running statistics may differ
                different = [key for key in different if not key.endswith(("running_mean", "running_var"))]
            assert different == [], (name, net)


def test_a_cyclegan_step_keeps_the_processes_equal(tmp_path, phantom_root):
    """CycleGAN runs each generator two or three times before one backward pass, and pools its fakes."""
    pix2pix_only = TINY_TRAIN_FLAGS.index("--lambda_L1")
    tiny = TINY_TRAIN_FLAGS[:pix2pix_only] + TINY_TRAIN_FLAGS[pix2pix_only + 2:]
    flags = [*tiny, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path),
             "--model", "cycle_gan", "--dataset_mode", "unaligned_nifti", "--lambda_identity", "0.5", "--pool_size", "2"]
    mp.spawn(take_steps, args=(2, f"file://{tmp_path / 'rendezvous'}", {"cycle_gan": flags}, str(tmp_path), 3), nprocs=2)
    rank0 = torch.load(tmp_path / "cycle_gan_rank0.pth", weights_only=True)
    rank1 = torch.load(tmp_path / "cycle_gan_rank1.pth", weights_only=True)
    assert rank0["replicas"] == ["D_A", "D_B", "G_A", "G_B"]
    assert rank0["nonfinite"] == [0.0, 0.0, 0.0]
    for net in ("G_A", "G_B", "D_A", "D_B"):
        assert differing_keys(rank0[net], rank1[net]) == [], net


@pytest.mark.parametrize("path", [[], ["--precision", "bf16", "--fused_adam"]])
def test_a_nan_loss_on_one_process_skips_that_step_on_every_process(tmp_path, phantom_root, path):
    configs = {"nan": [*TINY_TRAIN_FLAGS, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path), *path]}
    mp.spawn(take_steps, args=(2, f"file://{tmp_path / 'rendezvous'}", configs, str(tmp_path), 2, (1, 0)), nprocs=2)
    rank0 = torch.load(tmp_path / "nan_rank0.pth", weights_only=True)
    rank1 = torch.load(tmp_path / "nan_rank1.pth", weights_only=True)
    # Rank 0's own losses were finite at step 0, yet it skipped that step with rank 1.
    assert rank0["nonfinite"] == rank1["nonfinite"] == [1.0, 0.0]
    for net in ("G", "D"):
        assert differing_keys(rank0[net], rank1[net]) == [], net
