"""evaluation.validation: scoring the in-training generator on held-out patients, leaving training as it was."""

from __future__ import annotations

import logging
import math
import random
import shutil

import numpy as np
import pytest
import torch
from test_lpips import TinyBackbone
from torch import nn

from data.base_dataset import DatasetError
from data.slice_cache import SliceSettings
from evaluation.perceptual import LpipsScorer
from evaluation.validation import describe_validation, find_validation_cases, validate
from inference.volume import PhaseGenerator, load_generator

SCORES = ("mae_hu", "psnr_db", "ssim", "mae_lungs_hu", "mae_moving_hu", "mae_static_hu")
KEYS = {*SCORES, *(f"baseline_{m}" for m in SCORES), "n_patients"}


class Identity(nn.Module):
    """A generator that returns its input: it must score exactly as the input average does."""

    def forward(self, x):
        return x[:, :1]


@pytest.fixture
def generator(tiny_run) -> PhaseGenerator:
    """The tiny run's untrained U-Net (with dropout, so train mode would change its output)."""
    return load_generator(tiny_run.parent, tiny_run.name, "latest")


@pytest.fixture
def cases(phantom_root):
    return find_validation_cases(phantom_root, 5)[1]


def touch_split(root, phase, names_a, names_b):
    for side, names in (("A", names_a), ("B", names_b)):
        (root / f"{phase}{side}").mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / f"{phase}{side}" / name).touch()


def test_find_validation_cases_prefers_val_over_test(tmp_path):
    touch_split(tmp_path, "test", ["p1.nii.gz"], ["p1.nii.gz"])
    touch_split(tmp_path, "val", ["v2.nii.gz", "v1.nii.gz", "v3.nii"], ["v1.nii.gz", "v2.nii.gz", "v3.nii"])
    phase, pairs = find_validation_cases(tmp_path, 2)
    assert phase == "val"
    assert pairs == [(tmp_path / "valA" / n, tmp_path / "valB" / n) for n in ("v1.nii.gz", "v2.nii.gz")]


def test_find_validation_cases_falls_back_to_test_and_notes_unpaired_files(tmp_path, caplog):
    touch_split(tmp_path, "test", ["p1.nii.gz", "p2.nii.gz"], ["p1.nii.gz"])
    (tmp_path / "valA").mkdir()  # a validation split without targets is not one
    with caplog.at_level(logging.WARNING):
        phase, pairs = find_validation_cases(tmp_path, 5)
    assert (phase, pairs) == ("test", [(tmp_path / "testA" / "p1.nii.gz", tmp_path / "testB" / "p1.nii.gz")])
    assert "only valA/" in caplog.text and "testA/p2.nii.gz" in caplog.text


def test_find_validation_cases_without_a_held_out_split_is_empty(tmp_path):
    touch_split(tmp_path, "train", ["p1.nii.gz"], ["p1.nii.gz"])
    assert find_validation_cases(tmp_path, 5) == ("", [])


def test_find_validation_cases_refuses_a_split_without_common_names_or_a_bad_count(tmp_path):
    touch_split(tmp_path, "val", ["a.nii.gz"], ["b.nii.gz"])
    with pytest.raises(DatasetError, match="no file name appears in both"):
        find_validation_cases(tmp_path, 5)
    with pytest.raises(ValueError, match="at least 1"):
        find_validation_cases(tmp_path, 0)


def test_validate_scores_each_patient_and_the_input_average_baseline(generator, cases):
    metrics = validate(generator, cases)
    assert set(metrics) == KEYS and metrics["n_patients"] == 2
    assert all(math.isfinite(metrics[key]) for key in KEYS)
    assert 0 < metrics["baseline_mae_hu"] < 100  # the phantom's average vs its phase 0


def test_validate_leaves_the_network_mode_and_every_random_state_as_it_found_them(generator, cases):
    net = generator.net
    net.train()
    next(net.children()).eval()  # a mixed state is restored too
    modes = [m.training for m in net.modules()]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

    in_train_mode = validate(generator, cases)

    assert [m.training for m in net.modules()] == modes
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    # Dropout was off: the scores are those of the network in eval mode.
    net.eval()
    assert validate(generator, cases) == in_train_mode
    assert not net.training


def test_an_identity_generator_scores_exactly_the_input_average(cases):
    settings = SliceSettings(slice_axis="axial", resize_to=64, intensity="hu")  # the phantom's slice size: no resizing
    identity = PhaseGenerator(net=Identity(), settings=settings, context_slices=0, device=torch.device("cpu"))
    metrics = validate(identity, cases)
    for score in SCORES:
        assert metrics[score] == pytest.approx(metrics[f"baseline_{score}"], rel=1e-6, abs=1e-4)


def test_unreadable_pairs_are_skipped_with_a_warning(tmp_path, phantom_root, generator, caplog):
    for side in "AB":
        shutil.copytree(phantom_root / f"test{side}", tmp_path / f"val{side}")
    (tmp_path / "valB" / "patient_2.nii.gz").write_bytes(b"not a volume")
    _, cases = find_validation_cases(tmp_path, 5)
    with caplog.at_level(logging.WARNING):
        metrics = validate(generator, cases)
    assert metrics["n_patients"] == 1
    assert "validation skips" in caplog.text and "patient_2.nii.gz" in caplog.text
    assert validate(generator, cases[1:]) == {"n_patients": 0}


def test_validate_adds_lpips_with_a_scorer(generator, cases):
    scorer = LpipsScorer(TinyBackbone(), [torch.ones(c) for c in TinyBackbone.channels], min_size_px=1)
    metrics = validate(generator, cases[:1], scorer)
    assert set(metrics) == KEYS | {"lpips", "baseline_lpips"}
    assert metrics["lpips"] > 0 and metrics["baseline_lpips"] > 0


BEATS = {
    "mae_hu": 24.7,
    "baseline_mae_hu": 32.0,
    "psnr_db": 34.551,
    "baseline_psnr_db": 30.44,
    "ssim": 0.9569,
    "baseline_ssim": 0.9103,
    "n_patients": 2,
}


def test_describe_validation_says_plainly_whether_the_model_beats_the_input_average():
    assert describe_validation(BEATS) == (
        "validation (2 patients): MAE 24.7 HU vs input average 32.0 HU: beats the input average by 22.8%; "
        "PSNR 34.55 vs 30.44 dB; SSIM 0.957 vs 0.910"
    )
    worse = {**BEATS, "mae_hu": 40.1, "n_patients": 1}
    assert describe_validation(worse).startswith(
        "validation (1 patient): does NOT beat the input average yet (MAE 40.1 vs 32.0 HU, 25.3% worse); PSNR"
    )
    assert describe_validation({**BEATS, "lpips": 0.081, "baseline_lpips": 0.112}).endswith("; LPIPS 0.081 vs 0.112")
    assert describe_validation({"n_patients": 0}) == "validation: no patient could be scored"
