"""Shared fixtures: tiny phantom data sets and tiny trained-looking run folders, made in tmp dirs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from datasets.make_phantom import write_dataset  # noqa: E402
from models.networks import define_G  # noqa: E402
from options.train_options import TrainOptions  # noqa: E402

# Small enough for the 2-core CI machine, big enough to hold the phantom's anatomy.
TINY_SHAPE = (64, 64, 12)
TINY_SPACING_MM = (5.5, 5.5, 10.0)

# The flags of the reference's training command, scaled down for tests.
TINY_TRAIN_FLAGS = [
    "--model", "pix2pix", "--dataset_mode", "robust_nifti", "--skip_corrupted", "--preprocess", "none",
    "--input_nc", "1", "--output_nc", "1", "--axial_slice", "--norm", "instance", "--netG", "unet_128",
    "--ngf", "4", "--ndf", "4", "--batch_size", "4", "--lambda_L1", "50", "--lr", "0.0001",
    "--resize_to", "128", "--display_freq", "100", "--save_epoch_freq", "1", "--num_threads", "0",
    "--gpu_ids", "-1", "--display_id", "0",
]


def run_script(script: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def one_thread():
    """One thread: on the shared 2-core CI machine, two threads per process contend and run slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # for the scripts run as subprocesses
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A tiny paired phantom: trainA/B with 3 patients, testA/B with 2 (int16 HU NIfTI)."""
    root = tmp_path_factory.mktemp("phantom")
    write_dataset(root, num_train=3, num_test=2, shape=TINY_SHAPE, spacing_mm=TINY_SPACING_MM, num_phases=6, seed=1)
    return root


def make_run_folder(checkpoints_dir: Path, name: str, dataroot: Path, extra_flags: list[str] = ()) -> Path:
    """A run folder as training leaves it (options + an untrained generator), without training."""
    argv = [*TINY_TRAIN_FLAGS, "--dataroot", str(dataroot), "--name", name,
            "--checkpoints_dir", str(checkpoints_dir), *extra_flags]
    options = TrainOptions()
    opt = options.parse(argv)
    run_folder = checkpoints_dir / name
    options.save(opt, run_folder, "train")
    torch.manual_seed(0)
    net = define_G(input_nc=opt.input_nc, output_nc=opt.output_nc, ngf=opt.ngf, netG=opt.netG, norm=opt.norm,
                   use_dropout=False, init_type=opt.init_type, init_gain=opt.init_gain)
    torch.save(net.state_dict(), run_folder / "latest_net_G.pth")
    return run_folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, phantom_root) -> Path:
    """``<checkpoints>/tiny/`` with train_opt.json and latest_net_G.pth (unet_128, ngf 4, HU window)."""
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    return make_run_folder(checkpoints, "tiny", phantom_root, ["--intensity", "hu"])


@pytest.fixture(scope="session")
def cycle_root(tmp_path_factory) -> Path:
    """A tiny phantom with the whole breathing cycle in side B: 4 phases as one 4D file per patient
    (``make_phantom.py --write_all_phases``); trainA/B and testA/B with 2 patients each."""
    root = tmp_path_factory.mktemp("cycle")
    write_dataset(root, num_train=2, num_test=2, shape=TINY_SHAPE, spacing_mm=TINY_SPACING_MM, num_phases=4, seed=1,
                  phase_layout="4d")
    return root


@pytest.fixture(scope="session")
def multi_phase_run(tmp_path_factory, cycle_root) -> Path:
    """``<checkpoints>/cycle/``: ``train.py --phases all`` for one short epoch on :func:`cycle_root`
    (unet_128, ngf 4, 8 slices), a real model of all 4 phases."""
    checkpoints = tmp_path_factory.mktemp("cycle_checkpoints")
    result = run_script(
        "train.py", *TINY_TRAIN_FLAGS, "--dataroot", cycle_root, "--name", "cycle", "--checkpoints_dir", checkpoints,
        "--phases", "all", "--n_epochs", "1", "--n_epochs_decay", "0", "--max_dataset_size", "8", "--val_freq", "0",
        cwd=checkpoints, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return checkpoints / "cycle"
