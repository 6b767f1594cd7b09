"""``--gpu_ids``: one flag in every script, checked while parsing, made into one device that reaches the networks."""

from __future__ import annotations

import pytest
import torch

import batch_process_patients
import use_model
from models import create_model
from models.networks import define_G
from options.test_options import TestOptions
from options.train_options import TrainOptions
from util.device import CPU, DeviceError, select_device

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")


def parse_train(phantom_root, *flags):
    return TrainOptions().parse(["--dataroot", str(phantom_root), "--netG", "unet_128", "--resize_to", "128", *flags])


def parse_test(phantom_root, *flags):
    return TestOptions().parse(["--dataroot", str(phantom_root), "--netG", "unet_128", "--resize_to", "128", *flags])


def parse_use_model(_, *flags):
    return use_model.get_args_parser().parse_args(["--input_nifti", "a.nii.gz", "--model_name", "m", *flags])


def parse_batch(_, *flags):
    return batch_process_patients.get_args_parser().parse_args(
        ["--input_dir", "in", "--output_dir", "out", "--model_name", "m", *flags])


PARSERS = {"train.py": parse_train, "test.py": parse_test, "use_model.py": parse_use_model,
           "batch_process_patients.py": parse_batch}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_script_reads_gpu_ids_the_same_way(script, phantom_root):
    parse = PARSERS[script]
    assert parse(phantom_root, "--gpu_ids", "-1").gpu_ids == []
    assert parse(phantom_root).gpu_ids == ([0] if torch.cuda.is_available() else [])


@NO_CUDA
@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_script_refuses_a_gpu_this_machine_lacks_while_parsing(script, phantom_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        PARSERS[script](phantom_root, "--gpu_ids", "0")
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--gpu_ids: 0: CUDA is not available on this machine; use --gpu_ids -1 for the CPU" in line


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_gpu_ids_that_are_not_numbers_are_refused(script, phantom_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        PARSERS[script](phantom_root, "--gpu_ids", "first")
    assert exit_info.value.code == 2
    assert "expected comma-separated integers such as 0 or 0,1 or -1, got 'first'" in capsys.readouterr().err


def test_no_gpu_ids_means_the_cpu_also_under_torchrun():
    assert select_device([]) == CPU
    assert select_device([], local_rank=1) == CPU


@NO_CUDA
def test_a_gpu_asked_for_in_code_fails_with_advice():
    with pytest.raises(DeviceError, match=r"--gpu_ids 0: CUDA is not available on this machine; use --gpu_ids -1"):
        select_device([0])


def test_the_device_given_to_the_model_is_where_its_networks_are(phantom_root):
    # "meta": a device that is neither the default CPU nor needs a GPU, so the test sees it arrive.
    meta = torch.device("meta")
    model = create_model(parse_train(phantom_root, "--ngf", "4", "--ndf", "4", "--gpu_ids", "-1"), meta)
    for name, net in model.networks().items():
        assert {p.device for p in net.parameters()} == {meta}, name


def test_define_G_takes_a_device_or_upstreams_gpu_ids_but_not_both():
    assert next(define_G(1, 1, 4, "unet_128", gpu_ids=[]).parameters()).device == CPU
    assert next(define_G(1, 1, 4, "unet_128", device=torch.device("meta")).parameters()).is_meta
    with pytest.raises(ValueError, match="pass one of them"):
        define_G(1, 1, 4, "unet_128", gpu_ids=[0], device=CPU)
