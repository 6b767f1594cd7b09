"""Every registered model takes one optimisation step on the CPU, with every GAN loss."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models import create_model
from models.base_model import NonFiniteError
from models.networks import GAN_MODES
from options.train_options import TrainOptions
from tests.conftest import TINY_TRAIN_FLAGS
from util.run_folder import open_checkpoint, save_checkpoint


def tiny_batch(batch_size: int, input_nc: int, size: int = 128) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "A": torch.rand(batch_size, input_nc, size, size, generator=generator) * 2 - 1,
        "B": torch.rand(batch_size, 1, size, size, generator=generator) * 2 - 1,
        "A_paths": ["a.nii.gz"] * batch_size,
        "B_paths": ["b.nii.gz"] * batch_size,
    }


@pytest.mark.parametrize("model_name", models.MODEL_NAMES)
@pytest.mark.parametrize("gan_mode", GAN_MODES)
def test_one_step_changes_both_networks_and_reports_finite_losses(phantom_root, tmp_path, model_name, gan_mode):
    opt = TrainOptions().parse(
        [*TINY_TRAIN_FLAGS, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path),
         "--model", model_name, "--gan_mode", gan_mode, "--batch_size", "2"]
    )
    model = create_model(opt, torch.device("cpu"))
    model.setup(opt)
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in model.networks().items()}
    model.set_input(tiny_batch(2, opt.input_nc))
    model.optimize_parameters()

    losses = model.get_current_losses()
    assert set(losses) >= {"G_GAN", "G_L1", "D_real", "D_fake"}
    assert all(math.isfinite(v) for v in losses.values()), losses
    for name, net in model.networks().items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters()))
        assert changed, f"net{name} did not change"
    visuals = model.get_current_visuals()
    assert visuals["fake_B"].shape == (2, 1, 128, 128)


def test_save_and_load_round_trip_uses_upstream_file_names(phantom_root, tmp_path):
    opt = TrainOptions().parse([*TINY_TRAIN_FLAGS, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path), "--name", "r"])
    model = create_model(opt, torch.device("cpu"))
    model.setup(opt)
    save_checkpoint(model.save_dir, "3", model.network_states(), model.training_state(with_optimizers=False),
                    {"epoch": 3, "next_epoch": 4, "next_step": 0, "total_iters": 12})
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert {"3_net_G.pth", "3_net_D.pth", "3_train_state.pth", "3_checkpoint.json"} <= set(names)
    assert not [n for n in names if "partial" in n], "no temporary file may be left behind"

    other = create_model(opt, torch.device("cpu"))
    other.load_networks(open_checkpoint(model.save_dir, "3"))
    for key, value in model.netG.state_dict().items():
        assert torch.equal(value, other.netG.state_dict()[key])


def test_a_model_with_nan_weights_has_nothing_to_save(phantom_root, tmp_path):
    opt = TrainOptions().parse([*TINY_TRAIN_FLAGS, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path)])
    model = create_model(opt, torch.device("cpu"))
    with torch.no_grad():
        next(model.netD.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match="network D holds NaN/Inf in"):
        model.network_states()
