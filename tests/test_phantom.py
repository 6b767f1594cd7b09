"""The synthetic 4D-CT phantom: A = average CT, B = phase 0 (end-inhale), in HU."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.volume_io import read_volume
from datasets.make_phantom import (
    HU,
    SPLIT_DIRS,
    body_mask,
    breathing_curve,
    make_patient,
    storage_affine,
    write_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# A coarse grid with the presets' 350 mm field of view and a 190 mm tall thorax.
SHAPE = (64, 64, 24)
SPACING_MM = (5.5, 5.5, 8.0)
NUM_PHASES = 10


def patient(seed: int, noise_sd_hu: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    return make_patient(np.random.default_rng(seed), SHAPE, SPACING_MM, NUM_PHASES, noise_sd_hu=noise_sd_hu)


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    return patient(seed=0)


@pytest.fixture(scope="module")
def noise_free_pair() -> tuple[np.ndarray, np.ndarray]:
    return patient(seed=0, noise_sd_hu=0.0)


def test_breathing_curve_starts_at_end_inhale():
    curve = breathing_curve(10)
    assert curve[0] == 1.0  # phase 0: diaphragm fully down
    assert curve.argmin() == 5 and curve.min() < 1e-12  # end-exhale half a cycle later
    assert curve.mean() == pytest.approx(3 / 8)  # mean of cos^4 over a cycle


def test_storage_affine_is_dicom_like_and_centred():
    affine = storage_affine((64, 64, 24), (5.5, 5.5, 8.0))
    np.testing.assert_allclose(np.diag(affine)[:3], [-5.5, -5.5, 8.0])
    np.testing.assert_allclose(affine @ [31.5, 31.5, 11.5, 1.0], [0, 0, 0, 1])


def test_shapes_and_plausible_hu(pair):
    average, phase0 = pair
    body = body_mask(phase0)
    for volume in (average, phase0):
        assert volume.shape == SHAPE and volume.dtype == np.float32
        np.testing.assert_array_equal(volume, np.rint(volume))  # integer HU, as written to int16
        assert -1024 <= volume.min() and volume.max() <= 3071
        assert abs(np.median(volume[~body]) - HU["air"]) < 5
        assert (volume > 200).sum() > 100  # spine and ribs
    lungs = (phase0 < -500) & body
    assert abs(np.median(phase0[lungs]) - HU["lung"]) < 5
    assert 0.1 < lungs.sum() / body.sum() < 0.6


def test_body_mask_includes_the_lungs(noise_free_pair):
    _, phase0 = noise_free_pair
    body = body_mask(phase0)
    assert body[phase0 == HU["lung"]].all()
    assert not body[phase0 == HU["air"]].any()


def test_phase0_is_end_inhale_with_the_largest_lungs(pair):
    average, phase0 = pair
    body = body_mask(phase0)
    assert np.abs(average - phase0)[body].mean() > 5
    lungs_in_phase0 = ((phase0 < -500) & body).sum()
    lungs_in_average = ((average < -500) & body).sum()
    assert lungs_in_phase0 > 1.05 * lungs_in_average


def test_average_is_smoother_than_phase0(pair, noise_free_pair):
    average, phase0 = pair
    clean_average, clean_phase0 = noise_free_pair  # same seed: same anatomy
    soft_tissue = (clean_average == HU["soft_tissue"]) & (clean_phase0 == HU["soft_tissue"])
    assert np.std(phase0[soft_tissue]) == pytest.approx(10, abs=1.5)
    assert np.std(average[soft_tissue]) < 0.5 * np.std(phase0[soft_tissue])


def test_without_noise_only_breathing_structures_differ(noise_free_pair):
    average, phase0 = noise_free_pair
    changed = average != phase0
    assert changed.any()
    assert changed.sum() < 0.2 * body_mask(phase0).sum()
    breathing = [HU[name] for name in ("lung", "lesion", "soft_tissue", "blood")]
    assert np.isin(phase0[changed], breathing).all()  # never bone, fat or air


def test_spine_is_static_up_to_noise(pair, noise_free_pair):
    average, phase0 = pair
    bone = noise_free_pair[1] >= HU["cancellous_bone"]
    difference = average[bone] - phase0[bone]
    assert abs(difference.mean()) < 1.5
    assert difference.std() < 12  # noise alone: 10 HU * sqrt(1 - 1/N)


def test_same_seed_same_patient_other_seed_other_patient(pair):
    again = patient(seed=0)
    other = patient(seed=1)
    for volume, same, different in zip(pair, again, other):
        np.testing.assert_array_equal(volume, same)
        assert np.abs(volume - different).mean() > 20


def run_script(output_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "datasets/make_phantom.py", "--output_dir", str(output_dir)]
    command += ["--num_train", "2", "--num_test", "1", "--num_phases", "4"]
    command += ["--shape", "48", "48", "16", "--spacing_mm", "7.3", "7.3", "12"]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_script_writes_matching_pairs_on_the_requested_grid(tmp_path):
    output_dir = tmp_path / "ct_phases_dataset"
    result = run_script(output_dir)
    assert result.returncode == 0, result.stderr
    assert "mean |A - B| inside the body" in result.stdout

    names = {split: sorted(p.name for p in (output_dir / split).iterdir()) for split in SPLIT_DIRS}
    assert names["trainA"] == names["trainB"] == ["patient_1.nii.gz", "patient_2.nii.gz"]
    assert names["testA"] == names["testB"] == ["patient_1.nii.gz"]  # each split numbers from 1, as the reference does

    average, meta = read_volume(output_dir / "trainA" / "patient_1.nii.gz")
    phase0, _ = read_volume(output_dir / "trainB" / "patient_1.nii.gz")
    other, _ = read_volume(output_dir / "trainB" / "patient_2.nii.gz")
    assert average.shape == phase0.shape == (48, 48, 16)
    np.testing.assert_allclose(meta.spacing_mm, (7.3, 7.3, 12.0), rtol=1e-5)
    assert meta.affine[0, 0] < 0 and meta.affine[1, 1] < 0  # stored L/P-flipped, like DICOM
    assert (phase0 > 200).any() and (phase0 < -500).any()
    assert not np.array_equal(phase0, other)
    test_phase0, _ = read_volume(output_dir / "testB" / "patient_1.nii.gz")
    assert not np.array_equal(test_phase0, phase0), "testB/patient_1 must be another patient than trainB/patient_1"


@pytest.mark.slow
def test_script_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    result = run_script(tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--overwrite" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_stale_patients_and_a_patient_depends_on_its_place_in_the_set(tmp_path):
    grid = {"shape": (32, 32, 8), "spacing_mm": (11.0, 11.0, 24.0), "num_phases": 4, "seed": 3}
    write_dataset(tmp_path, num_train=3, num_test=0, **grid)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_dataset(tmp_path, num_train=1, num_test=1, **grid)
    first_patient_2, _ = read_volume(tmp_path / "trainB" / "patient_2.nii.gz")

    write_dataset(tmp_path, num_train=1, num_test=1, overwrite=True, **grid)
    assert sorted(p.name for p in (tmp_path / "trainA").iterdir()) == ["patient_1.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "testB").iterdir()) == ["patient_1.nii.gz"]
    # The second patient of the set, now the first test patient, is the same anatomy.
    test_patient_1, _ = read_volume(tmp_path / "testB" / "patient_1.nii.gz")
    np.testing.assert_array_equal(test_patient_1, first_patient_2)
