"""``--help`` tells the truth: every flag a run has, each with the value that run would use.

The help of ``train.py`` and ``test.py`` is built from the same parser as the run, after the
chosen ``--model`` and ``--dataset_mode`` have added their flags and defaults (and, for
``test.py`` and presets, after the saved run or preset has set its own), so what it shows is
what a run given the same command line gets.
"""

from __future__ import annotations

import itertools
import re
import shlex

import pytest

from options.test_options import TestOptions
from options.train_options import TrainOptions
from tests.conftest import run_script

# The flags that issue 11 found missing from `train.py --help` (added by the plug-ins).
PLUG_IN_FLAGS = {
    "losses (--model pix2pix)": ["--gan_mode", "--lambda_L1", "--lambda_GAN", "--l1_region", "--lambda_gp"],
    "slices and intensities (--dataset_mode robust_nifti)": [
        "--resize_to", "--slice_axis", "--axial_slice", "--context_slices", "--intensity", "--hu_min", "--hu_max",
    ],
    "files and slice cache (--dataset_mode robust_nifti)": ["--skip_corrupted", "--cache_dir", "--no_cache"],
}
_ENTRY_START = re.compile(r"^  -", re.MULTILINE)
_FLAG = re.compile(r"--\w+")
_DEFAULT = re.compile(r"\(default: (.*)\)$")


def help_entries(text: str) -> dict[str, tuple[str, str | None]]:
    """``--flag`` -> (its group's title, the default its entry shows, or None) from a --help text."""
    entries = {}
    body = text[text.index("\n\n") + 2:]  # after the usage block
    for section in re.split(r"\n\n(?=\S)", body):
        title, _, listing = section.partition("\n")
        starts = [m.start() for m in _ENTRY_START.finditer(listing)] + [len(listing)]
        for start, end in itertools.pairwise(starts):
            entry = " ".join(listing[start:end].split())  # undo the wrapping
            flag = _FLAG.search(entry).group()
            default = _DEFAULT.search(entry)
            entries[flag] = (title.rstrip(":"), default.group(1) if default else None)
    return entries


def assert_help_matches_run(entries: dict, opt, argv: list[str]) -> None:
    """The help lists exactly the run's flags, and each flag not on the command line shows the
    run's value as its default."""
    derived = ("isTrain", "phase_list")  # set by parsing, not flags: the mode, and --phases resolved
    assert {f"--{key}" for key in vars(opt) if key not in derived} == set(entries) - {"--help"}
    given = {arg for arg in argv if arg.startswith("--")}
    for key, value in vars(opt).items():
        if key not in derived and f"--{key}" not in given:
            assert entries[f"--{key}"][1] == str(value), key


def help_of(options_class, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        options_class().parse([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        "",  # pix2pix + robust_nifti, the defaults
        "--model pix2pix --dataset_mode robust_nifti --netG unet_128 --resize_to 128",
        "--preset phase0",  # a preset's values are the defaults, input_nc follows its context slices
        "--context_slices 2",
    ],
)
def test_train_help_lists_every_flag_with_the_value_a_run_gets(args, phantom_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default ./checkpoints must be empty
    argv = ["--dataroot", str(phantom_root), *shlex.split(args)]
    opt = TrainOptions().parse(argv)
    entries = help_entries(help_of(TrainOptions, argv, capsys))

    assert_help_matches_run(entries, opt, argv)


def test_train_help_shows_pix2pix_defaults_and_the_plug_in_flags_in_their_groups(phantom_root, capsys):
    entries = help_entries(help_of(TrainOptions, [], capsys))
    # pix2pix's own defaults, not the base parser's resnet_9blocks/instance
    assert entries["--netG"][1] == "unet_256" and entries["--norm"][1] == "batch"
    for group, flags in PLUG_IN_FLAGS.items():
        for flag in flags:
            assert entries[flag][0] == group, flag
    assert entries["--netG"][0] == entries["--residual"][0] == "model"
    assert entries["--lr"][0] == "optimisation"


def test_test_help_shows_the_saved_run_as_the_defaults(tiny_run, phantom_root, capsys):
    argv = ["--dataroot", str(phantom_root), "--name", tiny_run.name, "--checkpoints_dir", str(tiny_run.parent)]
    opt = TestOptions().parse(argv)
    entries = help_entries(help_of(TestOptions, argv, capsys))

    assert (entries["--netG"][1], entries["--ngf"][1], entries["--intensity"][1]) == ("unet_128", "4", "hu")
    assert_help_matches_run(entries, opt, argv)
    assert "--lambda_L1" not in entries  # a training flag: test.py does not take it


@pytest.mark.slow
def test_the_scripts_print_the_full_help(tmp_path):
    for script in ("train.py", "test.py"):
        result = run_script(script, "--help", cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr
        entries = help_entries(result.stdout)
        assert entries["--netG"][1] == "unet_256" and entries["--axial_slice"][1] == "False", script
        assert "--skip_corrupted" in entries and "--intensity" in entries, script
