"""The synthetic 4D-CT phantom: A = average CT, B = phase 0 (end-inhale), in HU."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from data.volume_io import read_volume
from datasets.make_phantom import (
    HU,
    SPLIT_DIRS,
    Grid,
    Patient,
    body_mask,
    breathing_curve,
    lung_to_exhale,
    make_patient,
    render,
    sample_patient,
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


@pytest.fixture(scope="module")
def one_patient() -> Patient:
    """The anatomy and vessels of patient(seed=0), to render phase by phase without noise."""
    return sample_patient(np.random.default_rng(0), Grid.centred(SHAPE, SPACING_MM))


def lung_voxels(*volumes: np.ndarray) -> np.ndarray:
    """Voxels that are lung (below -500 HU inside the body) in every one of the volumes."""
    return np.logical_and.reduce([(v < -500) & body_mask(v) for v in volumes])


def thoracic_cavity(patient: Patient) -> np.ndarray:
    """(X, Y, Z) bool: inside the thoracic cavity's ellipse, within the chest wall."""
    a = patient.anatomy
    x, y = patient.grid.plane()
    r2 = ((x - a.body_centre[0]) / a.cavity_semi_axes[0]) ** 2 + ((y - a.body_centre[1]) / a.cavity_semi_axes[1]) ** 2
    return np.broadcast_to((r2 < 1)[:, :, None], patient.grid.shape)


def test_breathing_curve_starts_at_end_inhale():
    curve = breathing_curve(10)
    assert curve[0] == 1.0  # phase 0: diaphragm fully down
    assert curve.argmin() == 5 and curve.min() < 1e-12  # end-exhale half a cycle later
    assert curve.mean() == pytest.approx(3 / 8)  # mean of cos^4 over a cycle
    np.testing.assert_array_equal(curve[1:5], curve[9:5:-1])  # inhaling and exhaling through the same point


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
    # Parenchyma at end-inhale, lifted a little by the vessels that share its 5.5 mm voxels.
    assert HU["lung"] - 5 < np.median(phase0[lungs]) < HU["lung"] + 30
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


def test_without_noise_only_the_thoracic_cavity_differs(one_patient, noise_free_pair):
    average, phase0 = noise_free_pair
    changed = average != phase0
    assert changed.any()
    assert changed.sum() < 0.4 * body_mask(phase0).sum()
    assert not changed[~thoracic_cavity(one_patient)].any()
    assert (phase0[changed] < HU["cancellous_bone"]).all()  # never bone


def test_the_lungs_slide_along_a_static_chest_wall_and_spine(one_patient):
    inhale, exhale = render(one_patient, [1.0]), render(one_patient, [0.0])
    wall = ~thoracic_cavity(one_patient)
    np.testing.assert_array_equal(inhale[wall], exhale[wall])  # chest wall, fat, ribs, outer spine
    bone = exhale >= HU["cancellous_bone"]
    np.testing.assert_array_equal(inhale[bone], exhale[bone])  # the vertebral body too
    # The lung just inside the wall changes: it slides (and breathes) along the still wall.
    rim = thoracic_cavity(one_patient) & ndimage.binary_dilation(wall, np.ones((3, 3, 1), bool))
    rim_lung = rim & lung_voxels(inhale, exhale)
    assert rim_lung.sum() > 50 and (inhale[rim_lung] != exhale[rim_lung]).mean() > 0.9


def test_the_diaphragm_descends_by_the_amplitude_while_the_apex_stays(one_patient):
    a = one_patient.anatomy
    assert 10 <= a.amplitude_mm <= 20
    for lung in a.lungs:
        x, y = lung.centre
        forward_mm = lung.ap_growth_mm / 2  # the front moves ap_growth_mm, the posterior edge none
        dome, apex = lung.base_z + lung.dome_mm, lung.apex_z  # of the central column, at end-exhale
        # At end-inhale the central column runs from dome - amplitude up to the apex.
        z = np.linspace(dome - a.amplitude_mm, apex, 50)
        y0, z0 = lung_to_exhale(lung, a.amplitude_mm, 1.0, x, y + forward_mm, z)
        np.testing.assert_allclose(y0, y, atol=1e-6)
        descent_mm = z0 - z
        assert descent_mm[0] == pytest.approx(a.amplitude_mm)  # the diaphragm
        assert descent_mm[-1] == pytest.approx(0, abs=1e-6)  # the apex
        assert (np.diff(descent_mm) < 0).all()  # less and less towards the apex
        # Halfway through the breath, half the excursion.
        _, z0_half = lung_to_exhale(lung, a.amplitude_mm, 0.5, x, y + forward_mm / 2, dome - a.amplitude_mm / 2)
        assert z0_half == pytest.approx(dome)


def test_the_lesion_moves_with_the_lung_around_it(one_patient):
    a = one_patient.anatomy
    lesion, lung = a.lesion, a.lungs[a.lesion_lung]
    x, y, z = lesion.centre
    shift_y, shift_z = lesion.inhale_shift_mm
    assert shift_z < 0 and 0 <= shift_y < lung.ap_growth_mm
    y0, z0 = lung_to_exhale(lung, a.amplitude_mm, 1.0, x, y + shift_y, z + shift_z)
    assert (y0, z0) == pytest.approx((y, z))
    assert -0.4 * a.amplitude_mm <= a.heart.inhale_shift_mm[1] <= -0.25 * a.amplitude_mm  # the heart follows


def test_lungs_are_less_dense_at_end_inhale(one_patient):
    inhale, exhale = render(one_patient, [1.0]), render(one_patient, [0.0])
    lungs = lung_voxels(inhale, exhale)

    def parenchyma(volume):  # the commonest lung value: parenchyma between the vessels
        values, counts = np.unique(np.rint(volume[lungs]), return_counts=True)
        return values[counts.argmax()]

    assert parenchyma(inhale) == HU["lung"] and parenchyma(exhale) == HU["lung_exhale"]
    assert HU["lung"] < HU["lung_exhale"]
    assert 30 < exhale[lungs].mean() - inhale[lungs].mean() < 70


def test_the_average_blurs_the_moving_vessels_that_phase0_shows_sharp(noise_free_pair):
    average, phase0 = noise_free_pair  # without noise: the blur is the motion's alone
    lungs = ndimage.binary_erosion(lung_voxels(average, phase0))
    assert (phase0[lungs] > -700).sum() > 100  # vessels

    def detail(volume):  # high-frequency energy: the squared residual of a 3x3x3 mean
        return (volume - ndimage.uniform_filter(volume, 3)) ** 2

    lower = lungs.copy()  # the lower half of the lungs, which moves most
    z = np.nonzero(lungs.any(axis=(0, 1)))[0]
    lower[:, :, (z.min() + z.max()) // 2 :] = False
    assert detail(average)[lungs].mean() < 0.9 * detail(phase0)[lungs].mean()
    assert detail(average)[lower].mean() < 0.85 * detail(phase0)[lower].mean()


def test_a_thick_slice_is_the_average_of_the_thin_slices_it_spans():
    # The same patient (same field of view and in-plane grid) at 8 mm and at 8/3 mm slices.
    thick = sample_patient(np.random.default_rng(0), Grid.centred(SHAPE, SPACING_MM))
    thin = sample_patient(np.random.default_rng(0), Grid.centred((*SHAPE[:2], 3 * SHAPE[2]), (*SPACING_MM[:2], 8 / 3)))
    assert thick.anatomy == thin.anatomy
    thick_hu = render(thick, [1.0])
    thin_hu = render(thin, [1.0]).reshape(*SHAPE, 3)  # (X, Y, Z, the 3 thin slices in each thick one)
    body = body_mask(thick_hu)
    slab_error = np.abs(thick_hu - thin_hu.mean(axis=-1))[body].mean()
    point_error = np.abs(thick_hu - thin_hu[..., 1])[body].mean()  # as if the thick slice were sampled at its centre
    assert slab_error < 0.25 * point_error

    # Without the vessels (sampled from a map) every structure is averaged over the slab exactly.
    def without_vessels(patient: Patient) -> Patient:
        return patient._replace(vessels=patient.vessels._replace(fraction=np.zeros_like(patient.vessels.fraction)))

    np.testing.assert_allclose(
        render(without_vessels(thick), [1.0]),
        render(without_vessels(thin), [1.0]).reshape(*SHAPE, 3).mean(axis=-1),
        atol=0.01,
    )


def test_the_slice_that_the_diaphragm_cuts_holds_lung_and_tissue_in_proportion(one_patient):
    a, grid = one_patient.anatomy, one_patient.grid
    lung = a.lungs[0]  # the right lung: no heart on its dome
    patient = one_patient._replace(
        vessels=one_patient.vessels._replace(fraction=np.zeros_like(one_patient.vessels.fraction))
    )
    column = render(patient, [0.0])[np.abs(grid.x - lung.centre[0]).argmin(), np.abs(grid.y - lung.centre[1]).argmin()]
    dome = lung.base_z + lung.dome_mm  # near enough for the voxel nearest the lung's centre
    k = int(np.floor((dome - grid.z[0]) / grid.spacing_mm[2] + 0.5))  # the slice the dome cuts
    lung_share = (grid.z[k] + grid.spacing_mm[2] / 2 - dome) / grid.spacing_mm[2]
    expected = HU["soft_tissue"] + lung_share * (HU["lung_exhale"] - HU["soft_tissue"])
    assert column[k] == pytest.approx(expected, abs=15)
    assert column[k - 1] == pytest.approx(HU["soft_tissue"]) and column[k + 1] == pytest.approx(HU["lung_exhale"])


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


def test_all_phases_share_phase0_with_the_single_phase_phantom_and_average_to_side_a():
    from datasets.make_phantom import make_patient_phases

    grid = ((32, 32, 10), (11.0, 11.0, 20.0), 4)
    average, phase0 = make_patient(np.random.default_rng(5), *grid)
    average_all, phases = make_patient_phases(np.random.default_rng(5), *grid)
    assert phases.shape == (32, 32, 10, 4)
    np.testing.assert_array_equal(phases[..., 0], phase0)  # same patient, same phase 0, noise included
    # Side A is the mean of the written phases, up to their rounding to whole HU.
    assert np.abs(average_all - phases.mean(axis=-1)).max() <= 0.5 + 1e-4
    assert np.abs(average_all - average).mean() < 10.0  # another noise draw of the same average
    lung = lung_voxels(phases[..., 0])
    assert (phases[..., 0] != phases[..., 2]).any() and lung.sum() > (lung_voxels(phases[..., 2])).sum()


@pytest.mark.parametrize("layout", ["4d", "files"])
def test_write_all_phases_in_either_layout_reads_back_as_one_phase_set(tmp_path, layout):
    from data.phases import find_phase_sets, read_phase

    grid = {"shape": (32, 32, 8), "spacing_mm": (11.0, 11.0, 24.0), "num_phases": 3, "seed": 3}
    pairs = write_dataset(tmp_path, num_train=2, num_test=1, phase_layout=layout, **grid)
    names = sorted(p.name for p in (tmp_path / "trainB").iterdir())
    if layout == "4d":
        assert names == ["patient_1.nii.gz", "patient_2.nii.gz"]
    else:
        assert names == [f"patient_{i}_phase{k}.nii.gz" for i in (1, 2) for k in range(3)]
    sets, num_phases = find_phase_sets(tmp_path / "trainB", ["patient_1", "patient_2"])
    assert num_phases == 3
    average, meta = read_volume(tmp_path / "trainA" / "patient_1.nii.gz")
    phases = np.stack([read_phase(s)[0] for s in sets["patient_1"].sources], axis=-1)
    assert phases.shape == (*average.shape, 3) and read_phase(sets["patient_1"].sources[2])[1].canonical_shape == meta.canonical_shape
    assert np.abs(average - phases.mean(axis=-1)).max() <= 0.5 + 1e-4
    np.testing.assert_array_equal(read_phase(sets["patient_1"].sources[0])[0], read_volume(pairs[0].phase0_path, frame=0 if layout == "4d" else None)[0])
