"""Options: the reference's commands parse as written, upstream's defaults hold, bad values stop early."""

from __future__ import annotations

import shlex

import pytest
import torch

from data.slice_cache import SliceSettings
from options.test_options import TestOptions
from options.train_options import TrainOptions
from tests.conftest import make_run_folder, run_script

REFERENCE_TRAIN = (
    "--name ct_phase0_generator_optimized --model pix2pix --dataset_mode robust_nifti --skip_corrupted "
    "--preprocess none --input_nc 1 --output_nc 1 --axial_slice --norm instance --netG unet_512 --batch_size 4 "
    "--lambda_L1 50 --lr 0.0001 --resize_to 512 --display_freq 100 --save_epoch_freq 5 --n_epochs 100 --n_epochs_decay 100"
)
REFERENCE_TEST = (
    "--name ct_phase0_generator_optimized --model pix2pix --dataset_mode robust_nifti --preprocess none "
    "--input_nc 1 --output_nc 1 --axial_slice --resize_to 512 --epoch latest"
)


def parse_train(args: str, dataroot) -> object:
    return TrainOptions().parse([*shlex.split(args), "--dataroot", str(dataroot), "--gpu_ids", "-1"])


def test_reference_training_command_means_what_the_reference_says(phantom_root):
    opt = parse_train(REFERENCE_TRAIN, phantom_root)
    assert (opt.netG, opt.norm, opt.batch_size, opt.lambda_L1, opt.lr) == ("unet_512", "instance", 4, 50.0, 0.0001)
    assert (opt.resize_to, opt.display_freq, opt.save_epoch_freq) == (512, 100, 5)
    assert opt.skip_corrupted and opt.axial_slice and opt.preprocess == "none"
    assert (opt.input_nc, opt.output_nc, opt.n_epochs, opt.n_epochs_decay) == (1, 1, 100, 100)


def test_upstream_pix2pix_defaults(phantom_root):
    opt = TrainOptions().parse(["--dataroot", str(phantom_root), "--gpu_ids", "-1"])
    expected = {
        "netG": "unet_256", "norm": "batch", "netD": "basic", "ngf": 64, "ndf": 64, "n_layers_D": 3,
        "gan_mode": "vanilla", "lambda_L1": 100.0, "lr": 0.0002, "beta1": 0.5, "lr_policy": "linear",
        "lr_decay_iters": 50, "n_epochs": 100, "n_epochs_decay": 100, "epoch_count": 1, "batch_size": 1,
        "print_freq": 100, "display_freq": 400, "update_html_freq": 1000, "save_latest_freq": 5000,
        "save_epoch_freq": 5, "display_id": 1, "display_port": 8097, "epoch": "latest", "load_iter": 0,
        "direction": "AtoB", "init_type": "normal", "init_gain": 0.02, "phase": "train",
        "checkpoints_dir": "./checkpoints", "no_dropout": False, "continue_train": False,
    }
    assert {k: getattr(opt, k) for k in expected} == expected
    # Upstream's 4 loader workers beside a GPU; none on a CPU, where they only slow loading.
    assert opt.num_threads == (4 if torch.cuda.is_available() else 0)


@pytest.mark.parametrize(
    "extra",
    [
        "--norm sync_instance --batch_size 8",  # the reference's multi-GPU command
        "--norm syncbatch",
        "--gan_mode wgangp --lr_policy cosine",
        "--netD n_layers --n_layers_D 4 --netG resnet_9blocks --resize_to 256",
        "--suffix {netG}_bs{batch_size}",
        "--slice_axis coronal --context_slices 2",
        "--intensity hu --hu_min -1000 --hu_max 2000",
    ],
)
def test_flag_combinations_that_work(phantom_root, extra):
    parse_train(f"{REFERENCE_TRAIN} {extra}", phantom_root)


def test_context_slices_set_input_channels(phantom_root):
    opt = TrainOptions().parse(["--dataroot", str(phantom_root), "--gpu_ids", "-1", "--context_slices", "2"])
    assert opt.input_nc == 5


def test_the_references_input_nc_1_counts_the_ct_channel_beside_its_neighbours(phantom_root):
    # The reference's Step-4 command with the recommended preset (one neighbour on each side)
    opt = parse_train(f"{REFERENCE_TRAIN} --preset phase0", phantom_root)
    assert (opt.context_slices, opt.input_nc) == (1, 3)


def test_suffix_extends_the_name(phantom_root):
    opt = parse_train("--name run --suffix {netG}_bs{batch_size} --batch_size 2", phantom_root)
    assert opt.name == "run_unet_256_bs2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--netG unet_512 --resize_to 256", "--resize_to 256 does not fit --netG unet_512"),
        ("--netG unet_256 --resize_to 300", "multiple of 256"),
        ("--netG unet512", "did you mean 'unet_512'"),
        ("--norm instanse", "did you mean 'instance'"),
        ("--context_slices 2 --input_nc 3", "--input_nc 3 does not match --context_slices 2"),
        ("--intensity hu --hu_min 100 --hu_max -100", "--hu_max -100.0 must be above --hu_min 100.0"),
        ("--batch_size 0", "--batch_size must be at least 1"),
        ("--n_epochs 0 --n_epochs_decay 0", "need at least one epoch"),
        ("--continue_train --name never_trained", "nothing to resume"),
    ],
)
def test_bad_values_stop_with_one_line_before_any_data_is_read(tmp_path, phantom_root, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        TrainOptions().parse(["--dataroot", str(phantom_root), "--gpu_ids", "-1", *shlex.split(args)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "cache").exists(), "no data may be read before the options are valid"


@pytest.mark.slow
def test_the_script_prints_one_line_and_exits_2_on_a_bad_value(tmp_path, phantom_root):
    result = run_script("train.py", "--dataroot", phantom_root, "--gpu_ids", "-1", "--netG", "unet_512", "--resize_to", "256", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--resize_to 256 does not fit --netG unet_512" in result.stderr


@pytest.mark.slow
def test_missing_dataroot_is_named(tmp_path):
    result = run_script("train.py", "--dataroot", tmp_path / "nowhere", "--gpu_ids", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert f"--dataroot {tmp_path / 'nowhere'}: folder not found" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_request_without_cuda_is_refused(phantom_root):
    with pytest.raises(SystemExit) as exit_info:
        TrainOptions().parse(["--dataroot", str(phantom_root), "--gpu_ids", "0"])
    assert exit_info.value.code == 2


def test_test_options_rebuild_the_trained_model_without_repeating_flags(tmp_path, phantom_root):
    make_run_folder(tmp_path, "ct_phase0_generator_optimized", phantom_root, ["--ngf", "8", "--intensity", "hu"])
    opt = TestOptions().parse(
        [*shlex.split(REFERENCE_TEST), "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path), "--resize_to", "128"]
    )
    # The reference's test command names neither --netG nor --norm: they come from train_opt.json.
    assert (opt.netG, opt.norm, opt.ngf, opt.intensity) == ("unet_128", "instance", 8, "hu")
    assert opt.no_flip and opt.serial_batches and not opt.isTrain


def test_explicit_flags_win_over_the_saved_ones(tmp_path, phantom_root):
    make_run_folder(tmp_path, "run", phantom_root)
    opt = TestOptions().parse(
        ["--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path), "--name", "run", "--ngf", "16"]
    )
    assert opt.ngf == 16 and opt.netG == "unet_128"


def test_a_preset_sets_its_flags_and_the_command_line_still_wins(phantom_root):
    from options.presets import PRESETS

    opt = parse_train("--preset phase0", phantom_root)
    for flag, value in PRESETS["phase0"].items():
        assert getattr(opt, flag) == value, flag
    plain = parse_train("", phantom_root)
    assert not plain.residual and plain.preset is None
    changed = parse_train("--preset phase0 --lambda_L1 7 --intensity volume", phantom_root)
    assert changed.lambda_L1 == 7.0 and changed.intensity == "volume" and changed.residual


@pytest.mark.parametrize(
    ("words", "axial_slice", "skip_corrupted"),
    [
        ("--axial_slice --skip_corrupted", True, True),  # bare flags, as in the reference's commands
        ("--axial_slice True --skip_corrupted True", True, True),  # as its parameter table writes them
        ("--axial_slice true --skip_corrupted yes", True, True),
        ("--axial_slice False --skip_corrupted False", False, False),
        ("--axial_slice=False --skip_corrupted 0", False, False),
        ("", False, False),
    ],
)
def test_on_off_flags_also_take_true_or_false(phantom_root, words, axial_slice, skip_corrupted):
    # --slice_axis coronal shows whether --axial_slice acts: when on, it makes the slices axial.
    opt = parse_train(f"{words} --slice_axis coronal", phantom_root)
    assert (opt.axial_slice, opt.skip_corrupted) == (axial_slice, skip_corrupted)
    assert SliceSettings.from_options(opt).slice_axis == ("axial" if axial_slice else "coronal")


def test_the_reference_parameter_table_parses_as_written(phantom_root):
    table_form = REFERENCE_TRAIN.replace("--skip_corrupted", "--skip_corrupted True").replace(
        "--axial_slice", "--axial_slice True"
    )
    assert vars(parse_train(table_form, phantom_root)) == vars(parse_train(REFERENCE_TRAIN, phantom_root))
    assert parse_train("--no_dropout False", phantom_root).no_dropout is False
    assert parse_train("--no_dropout True", phantom_root).no_dropout is True


@pytest.mark.parametrize("options_class", [TrainOptions, TestOptions])
def test_an_on_off_flag_with_another_value_is_one_line(phantom_root, capsys, options_class):
    with pytest.raises(SystemExit) as exit_info:
        options_class().parse(["--dataroot", str(phantom_root), "--gpu_ids", "-1", "--axial_slice", "maybe"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--axial_slice: expected True or False, got 'maybe'" in lines[0], lines
