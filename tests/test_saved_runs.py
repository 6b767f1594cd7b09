"""Run folders written by earlier versions still load, resume and give the same output.

``tests/data/saved_runs/4f5df0b/tiny/`` is the epoch-1 checkpoint set of a real
``train.py`` run made at commit 4f5df0b (before issue 10 moved the model helpers, the
errors and the CLI modules), copied as train.py wrote it: ``train_opt.json``/``.txt``,
``1_net_G.pth``, ``1_net_D.pth``, ``1_train_state.pth`` and the manifest
``1_checkpoint.json``. The run: 2 phantom patients of 64 x 64 x 12 voxels, one epoch, the
reference's flags scaled down (``--netG unet_128 --ngf 2 --ndf 2 --norm instance
--resize_to 128``) with ``--intensity hu --context_slices 1 --residual --lr 0.001``, so that
the checkpoint exercises the 2.5D input, the residual forward and the fixed HU window.

``tiny_epoch1_output.npy`` is what that code generated from :func:`fixed_volume` (float32 HU,
canonical (X, Y, Z)). Trained for only six steps, the generator differs from an untrained one
by about 1.5 HU on average (4 HU at most), far above the tolerance below, so weights that
silently fail to load, or preprocessing that changes, fail the comparison.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.slice_cache import SliceSettings
from inference.volume import load_generator
from models import create_model
from options.test_options import TestOptions
from options.train_options import TrainOptions
from util.device import CPU
from util.run_folder import CheckpointError, open_checkpoint

SAVED_RUNS = Path(__file__).parent / "data" / "saved_runs" / "4f5df0b"
RUN = SAVED_RUNS / "tiny"
EXPECTED_OUTPUT = SAVED_RUNS / "tiny_epoch1_output.npy"
# CPU kernels may round differently from one machine to another: 1e-6 of the network's range is
# about 0.002 HU. A weight that did not load moves the output by 1.5 HU on average.
TOLERANCE_HU = 0.02


def fixed_volume() -> np.ndarray:
    """(48, 40, 6) float32 HU: an elliptical body (40 HU) in air, two lungs (-820..-780 HU along Z).

    Not square and not the model's 128 pixels, so the way in and the way back both resize.
    """
    x, y, z = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 40), np.linspace(0, 1, 6), indexing="ij")
    body = (x / 0.9) ** 2 + (y / 0.75) ** 2 < 1
    lungs = ((np.abs(x) - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1
    volume = np.full(x.shape, -1000.0, dtype=np.float32)
    volume[body] = 40.0
    volume[lungs] = -820.0 + 40 * z[lungs]
    return volume


def test_the_saved_checkpoint_is_whole():
    checkpoint = open_checkpoint(RUN, "1", verify=True)
    assert checkpoint.verified and set(checkpoint.files) == {"net_G", "net_D", "train_state"}
    assert (checkpoint.counters["epoch"], checkpoint.counters["next_epoch"]) == (1, 2)


def test_the_saved_generator_is_rebuilt_from_its_folder_and_gives_the_saved_output():
    generator = load_generator(SAVED_RUNS, "tiny", "1", CPU)
    assert generator.settings == SliceSettings(slice_axis="axial", resize_to=128, intensity="hu")
    assert (generator.netG, generator.input_nc, generator.context_slices, generator.residual) == ("unet_128", 3, 1, True)

    generated, _ = generator.translate(fixed_volume())

    expected = np.load(EXPECTED_OUTPUT)
    assert generated.shape == expected.shape == (48, 40, 6)
    np.testing.assert_allclose(generated, expected, rtol=0, atol=TOLERANCE_HU)


def test_test_options_take_the_saved_model_flags(phantom_root):
    opt = TestOptions().parse(["--dataroot", str(phantom_root), "--name", "tiny", "--checkpoints_dir", str(SAVED_RUNS),
                               "--epoch", "1"])  # fmt: skip
    assert (opt.netG, opt.ngf, opt.input_nc, opt.context_slices, opt.intensity, opt.residual) == (
        "unet_128", 2, 3, 1, "hu", True,
    )


def test_training_resumes_from_the_saved_checkpoint(tmp_path, phantom_root):
    shutil.copytree(RUN, tmp_path / "tiny")  # resuming takes the run's lock: never in the repository
    opt = TrainOptions().parse(["--dataroot", str(phantom_root), "--name", "tiny", "--checkpoints_dir", str(tmp_path),
                                "--continue_train", "--epoch", "1", "--gpu_ids", "-1"])  # fmt: skip
    assert (opt.ngf, opt.ndf, opt.lr, opt.epoch_count) == (2, 2, 0.001, 2)  # the saved run's, and the next epoch

    model = create_model(opt, CPU)
    checkpoint = model.setup(opt)

    assert checkpoint.counters["total_iters"] == 24
    for name in ("G", "D"):
        saved = torch.load(RUN / f"1_net_{name}.pth", weights_only=True)
        loaded = getattr(model, f"net{name}").state_dict()
        assert saved.keys() == loaded.keys(), name
        assert all(torch.equal(saved[key], loaded[key]) for key in saved), name


@pytest.mark.parametrize("broken", ["missing", "other_network"])
def test_a_saved_generator_that_does_not_load_is_one_line_naming_the_file(tmp_path, broken):
    shutil.copytree(RUN, tmp_path / "tiny")
    weights = tmp_path / "tiny" / "1_net_G.pth"
    if broken == "missing":
        weights.unlink()
    else:
        state = torch.load(weights, weights_only=True)
        torch.save({key.replace("model.model.0", "model.model.9"): value for key, value in state.items()}, weights)
    with pytest.raises(CheckpointError, match=str(weights)):
        load_generator(tmp_path, "tiny", "1", CPU)
