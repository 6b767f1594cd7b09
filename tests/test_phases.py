"""The phases of a 4D-CT as targets: both layouts of <phase>B/, the refusals, --phases, the code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.base_dataset import DatasetError
from data.phases import PhaseSource, find_phase_sets, parse_phases, phase_code, read_phase
from data.volume_io import frame_count, new_volume_meta, write_volume

SHAPE = (6, 5, 4)
META = new_volume_meta(np.diag([-2.0, 2.0, 3.0, 1.0]), SHAPE)


def cycle(n: int) -> np.ndarray:
    """(X, Y, Z, N): phase K is filled with 100 K HU, so a read tells which phase it was."""
    return np.stack([np.full(SHAPE, 100.0 * k, dtype=np.float32) for k in range(n)], axis=-1)


def write_4d(folder: Path, patient: str, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_volume(folder / f"{patient}.nii.gz", cycle(n) if n > 1 else cycle(1)[..., 0], META)


def write_per_phase(folder: Path, patient: str, phases) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in phases:
        write_volume(folder / f"{patient}_phase{k}.nii.gz", np.full(SHAPE, 100.0 * k, np.float32), META)


def test_a_4d_file_holds_one_phase_per_frame(tmp_path):
    write_4d(tmp_path, "p1", 4)
    write_4d(tmp_path, "p2", 4)
    sets, n = find_phase_sets(tmp_path, ["p1", "p2"])
    assert n == 4 and sorted(sets) == ["p1", "p2"]
    assert sets["p1"].sources == tuple(PhaseSource(tmp_path / "p1.nii.gz", k) for k in range(4))
    for k, source in enumerate(sets["p2"].sources):
        volume, meta = read_phase(source)
        assert meta.canonical_shape == SHAPE and np.all(volume == 100.0 * k)


def test_one_file_per_phase_is_read_in_phase_order(tmp_path):
    write_per_phase(tmp_path, "p1", [2, 0, 1])  # written out of order
    sets, n = find_phase_sets(tmp_path, ["p1"])
    assert n == 3
    assert [s.path.name for s in sets["p1"].sources] == ["p1_phase0.nii.gz", "p1_phase1.nii.gz", "p1_phase2.nii.gz"]
    assert all(s.frame is None for s in sets["p1"].sources)
    assert np.all(read_phase(sets["p1"].sources[2])[0] == 200.0)


def test_a_3d_target_is_one_phase_as_before(tmp_path):
    write_4d(tmp_path, "p1", 1)
    sets, n = find_phase_sets(tmp_path, ["p1"])
    assert n == 1 and sets["p1"].sources == (PhaseSource(tmp_path / "p1.nii.gz", None),)
    assert frame_count(tmp_path / "p1.nii.gz") == 1


def test_the_layouts_may_differ_between_patients_if_the_count_agrees(tmp_path):
    write_4d(tmp_path, "p1", 3)
    write_per_phase(tmp_path, "p2", range(3))
    sets, n = find_phase_sets(tmp_path, ["p1", "p2"])
    assert n == 3 and sets["p1"].sources[1].frame == 1 and sets["p2"].sources[1].frame is None


def test_patients_without_targets_are_left_out(tmp_path):
    write_4d(tmp_path, "p1", 2)
    sets, n = find_phase_sets(tmp_path, ["p1", "p9"])
    assert list(sets) == ["p1"] and n == 2
    assert find_phase_sets(tmp_path / "missing", ["p1"]) == ({}, 1)


def test_a_missing_phase_is_named(tmp_path):
    write_per_phase(tmp_path, "p1", [0, 1, 3, 5])
    with pytest.raises(DatasetError, match=r"p1 has phases 0-1, 3, 5 but not 2, 4"):
        find_phase_sets(tmp_path, ["p1"])


def test_mixed_layouts_of_one_patient_are_refused(tmp_path):
    write_4d(tmp_path, "p1", 3)
    write_per_phase(tmp_path, "p1", range(3))
    with pytest.raises(DatasetError, match=r"p1.nii.gz: mixed layouts for patient p1"):
        find_phase_sets(tmp_path, ["p1"])


def test_phase_counts_must_agree_between_patients(tmp_path):
    for patient in ("p1", "p2"):
        write_4d(tmp_path, patient, 4)
    write_per_phase(tmp_path, "p3", range(3))
    with pytest.raises(DatasetError, match=r"most have 4, but p3 \(3\)"):
        find_phase_sets(tmp_path, ["p1", "p2", "p3"])


def test_a_per_phase_file_must_be_3d(tmp_path):
    write_per_phase(tmp_path, "p1", [0])
    write_volume(tmp_path / "p1_phase1.nii.gz", cycle(2), META)
    with pytest.raises(DatasetError, match=r"p1_phase1.nii.gz: a per-phase file must be 3D"):
        find_phase_sets(tmp_path, ["p1"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", (0,)), ("all", tuple(range(10))), ("ALL", tuple(range(10))), ("5,0", (0, 5)), ("0, 5,5", (0, 5))],
)
def test_phases_names_phases_of_the_cycle(text, expected):
    assert parse_phases(text, 10) == expected


@pytest.mark.parametrize(
    ("text", "num_phases", "message"),
    [("10", 10, r"phase 10 is out of range; the data have 10 phases \(0..9\)"), ("1", 1, r"1 phase \(0..0\)"),
     ("-1", 4, "out of range"), ("first", 4, "expected 'all' or phase numbers"), ("", 4, "expected")],
)
def test_phases_outside_the_data_are_refused(text, num_phases, message):
    with pytest.raises(ValueError, match=message):
        parse_phases(text, num_phases)


def test_the_phase_code_runs_through_the_cycle_in_the_network_range():
    codes = [phase_code(k, 10) for k in range(10)]
    assert codes[0] == -1.0 and codes == sorted(codes) and max(codes) < 1.0
    assert np.allclose(np.diff(codes), 0.2)
    with pytest.raises(ValueError):
        phase_code(10, 10)


def test_inputs_pair_with_their_phase_sets_and_the_rest_is_listed(tmp_path):
    from data.pairing import find_phase_pairs

    for name in ("p1", "p2", "p3"):
        write_4d(tmp_path / "trainA", name, 1)  # the average CTs (3D)
    write_4d(tmp_path / "trainB", "p1", 3)
    write_per_phase(tmp_path / "trainB", "p2", range(3))
    write_4d(tmp_path / "trainB", "orphan", 3)
    pairs, unpaired, n = find_phase_pairs(tmp_path, "train", (0, 2))
    assert n == 3
    assert [(a.name, [(s.path.name, s.frame) for s in sources]) for a, sources in pairs] == [
        ("p1.nii.gz", [("p1.nii.gz", 0), ("p1.nii.gz", 2)]),
        ("p2.nii.gz", [("p2_phase0.nii.gz", None), ("p2_phase2.nii.gz", None)]),
    ]
    assert [p.name for p in unpaired] == ["p3.nii.gz", "orphan.nii.gz"]
    with pytest.raises(DatasetError, match=r"asks for phase 3, but the targets have 3 phases"):
        find_phase_pairs(tmp_path, "train", (0, 3))
