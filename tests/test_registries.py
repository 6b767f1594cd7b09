"""Every registered model and dataset mode works on the CPU: a new plug-in is covered without a new test.

A model takes one optimisation step on a tiny batch and every network that learns changes; a
model that cannot train (``test``) runs a forward pass instead. A dataset mode is built on a
tiny phantom, serves one batch through its DataLoader, and that batch trains (or, without
targets, runs) a model that consumes it.
"""

from __future__ import annotations

import math

import pytest
import torch

import data
import models
from data import create_dataloader, create_dataset
from models import create_model, find_model_using_name
from options.test_options import TestOptions
from options.train_options import TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")  # two threads per process contend on the 2-core machine

# Small and cheap: ResNet generators take 32 px slices.
TINY = ["--netG", "resnet_6blocks", "--ngf", "4", "--ndf", "4", "--resize_to", "32", "--batch_size", "2",
        "--num_threads", "0", "--gpu_ids", "-1"]
TRAIN = ["--display_id", "0", "--n_epochs", "1", "--n_epochs_decay", "0"]


def trainable(model_name: str) -> bool:
    return getattr(find_model_using_name(model_name), "can_train", True)


def tiny_batch(n_in: int, n_out: int, size: int = 32) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"A": torch.rand(2, n_in, size, size, generator=generator) * 2 - 1,
            "B": torch.rand(2, n_out, size, size, generator=generator) * 2 - 1,
            "A_paths": ["a.nii.gz"] * 2, "B_paths": ["b.nii.gz"] * 2}


def assert_one_step_trains(model) -> None:
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in model.networks().items()}
    model.optimize_parameters()
    losses = model.get_current_losses()
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    for name, net in model.networks().items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters())), f"net{name} did not change"
    for label, image in model.get_current_visuals().items():
        assert image.shape[-2:] == (32, 32) and bool(torch.isfinite(image).all()), label


@pytest.mark.parametrize("model_name", models.MODEL_NAMES)
def test_every_model_takes_a_step_or_a_forward_pass(phantom_root, tmp_path, model_name):
    if trainable(model_name):
        opt = TrainOptions().parse([*TINY, *TRAIN, "--model", model_name, "--dataroot", str(phantom_root),
                                    "--checkpoints_dir", str(tmp_path)])
        model = create_model(opt, torch.device("cpu"))
        model.setup(opt)
        model.set_input(tiny_batch(opt.input_nc, opt.output_nc))
        assert_one_step_trains(model)
    else:
        with pytest.raises(SystemExit):  # refused by train.py's options, with one line
            TrainOptions().parse([*TINY, *TRAIN, "--model", model_name, "--dataroot", str(phantom_root)])
        opt = TestOptions().parse([*TINY, "--model", model_name, "--dataroot", str(phantom_root),
                                   "--checkpoints_dir", str(tmp_path)])
        model = create_model(opt, torch.device("cpu"))  # not set up: there are no weights to load
        model.set_input(tiny_batch(opt.input_nc, opt.output_nc))
        model.test()
        visuals = model.get_current_visuals()
        assert visuals and all(v.shape == (2, opt.output_nc, 32, 32) for k, v in visuals.items() if k != "real")


# The model each dataset mode's batches are meant for: a paired or unpaired batch trains, one without targets runs.
CONSUMER = {"robust_nifti": "pix2pix", "unaligned_nifti": "cycle_gan", "single_nifti": "test"}


@pytest.mark.parametrize("dataset_mode", data.DATASET_MODES)
def test_every_dataset_mode_serves_a_batch_a_model_learns_from(phantom_root, tmp_path, dataset_mode):
    model_name = CONSUMER.get(dataset_mode, "pix2pix")
    common = [*TINY, "--dataset_mode", dataset_mode, "--cache_dir", str(tmp_path / "cache"),
              "--checkpoints_dir", str(tmp_path)]
    if trainable(model_name):
        opt = TrainOptions().parse([*common, *TRAIN, "--model", model_name, "--dataroot", str(phantom_root)])
    else:
        opt = TestOptions().parse([*common, "--model", model_name, "--dataroot", str(phantom_root / "testA")])
    dataset = create_dataset(opt)
    assert len(dataset) > 0 and dataset.summary_lines()
    batch = next(iter(create_dataloader(dataset, opt)))
    assert batch["A"].shape == (2, opt.input_nc, 32, 32)
    assert -1 <= float(batch["A"].min()) and float(batch["A"].max()) <= 1
    model = create_model(opt, torch.device("cpu"))
    if trainable(model_name):
        assert batch["B"].shape == (2, opt.output_nc, 32, 32)
        model.setup(opt)
        model.set_input(batch)
        assert_one_step_trains(model)
    else:
        model.set_input(batch)
        model.test()
        assert model.fake.shape == (2, opt.output_nc, 32, 32)
