"""Every registered model takes one optimisation step on the CPU, with every GAN loss."""

from __future__ import annotations

import math

import pytest
import torch

from models import create_model
from models.base_model import NonFiniteError
from models.networks import GAN_MODES, BodyL1Loss, body_region
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


# pix2pix's losses with every GAN loss; tests/test_registries.py takes a step with every registered model.
@pytest.mark.parametrize("model_name", ["pix2pix"])
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


def test_lambda_gan_zero_trains_the_generator_on_l1_alone(phantom_root, tmp_path):
    opt = TrainOptions().parse(
        [*TINY_TRAIN_FLAGS, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path),
         "--lambda_GAN", "0", "--batch_size", "2"]
    )
    model = create_model(opt, torch.device("cpu"))
    model.setup(opt)
    d_before = [p.detach().clone() for p in model.netD.parameters()]
    g_before = [p.detach().clone() for p in model.netG.parameters()]
    model.set_input(tiny_batch(2, opt.input_nc))
    model.optimize_parameters()
    losses = model.get_current_losses()
    assert losses["G_GAN"] == 0.0 and losses["D_real"] == 0.0 and losses["D_fake"] == 0.0
    assert losses["G_L1"] > 0.0
    assert all(torch.equal(a, b) for a, b in zip(d_before, model.netD.parameters())), "D must not be updated"
    assert any(not torch.equal(a, b) for a, b in zip(g_before, model.netG.parameters()))


def slice_with_lungs(size: int = 32) -> torch.Tensor:
    """(1, 1, size, size) in [-1, 1]: air, an elliptical body of soft tissue, two air-filled lungs."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.full((size, size), -1.0)
    image[(x / 0.8) ** 2 + (y / 0.6) ** 2 < 1] = 0.0
    for centre in (-0.35, 0.35):
        image[((x - centre) / 0.2) ** 2 + (y / 0.3) ** 2 < 1] = -0.92  # -850 HU in the fixed window
    return image[None, None]


def test_body_region_holds_the_lungs_and_not_the_air_around_the_body():
    image = slice_with_lungs()
    body = body_region(image)[0, 0]
    lungs = (image[0, 0] < -0.9) & (image[0, 0] > -1.0)
    assert body[lungs].all(), "the lungs are inside the body"
    assert not body[image[0, 0] == -1.0].any(), "the air around the body is not"


def test_body_l1_loss_ignores_errors_in_the_air_outside_the_body():
    real = slice_with_lungs()
    outside = ~body_region(real)
    off_in_air = real + 0.5 * outside
    assert BodyL1Loss()(off_in_air, real).item() == 0.0
    assert torch.nn.L1Loss()(off_in_air, real).item() > 0.0
    off_in_body = real + 0.5 * ~outside
    assert BodyL1Loss()(off_in_body, real).item() == pytest.approx(0.5)
