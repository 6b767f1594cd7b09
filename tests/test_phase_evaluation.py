"""test.py for a model of the whole breathing cycle: every phase scored against its target, the MIP
against the true MIP, per-phase rows in metrics.json and metrics.csv, and a page whose strip
shows one coronal slice across all phases.

The scoring functions are checked on synthetic volumes whose answers are known; test.py itself
runs in-process on a real model of all 4 phases of a tiny phantom (tests/conftest.py's
``multi_phase_run``), for targets stored as 4D files and as one file per phase.
"""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nibabel as nib
import numpy as np
import pytest

from data.base_dataset import DatasetError
from data.volume_io import read_volume, write_volume
from evaluation.metrics import evaluate_patient
from evaluation.phases import MIP_PHASE, find_phase_targets, mean_over_phases, score_phases, summarise_by_phase
from evaluation.results import run_test
from options.test_options import TestOptions
from util.device import CPU

pytestmark = pytest.mark.usefixtures("one_thread")


def body_phantom(shift: int, shape=(24, 20, 12)) -> np.ndarray:
    """(X, Y, Z) HU: a soft-tissue box with a lung-like cavity whose floor (a diaphragm) is at z = 4 + shift."""
    volume = np.full(shape, -1000.0, dtype=np.float32)
    volume[3:21, 3:17, :] = 40.0
    volume[6:18, 6:14, 4 + shift : 10] = -800.0
    return volume


# -- the scores, on volumes whose answers are known -------------------------------------------
def test_each_phase_is_scored_against_its_own_target_and_the_mip_against_the_true_mip():
    targets = np.stack([body_phantom(shift) for shift in (0, 1, 3)])  # (P, X, Y, Z)
    average = targets.mean(axis=0)
    generated = targets.copy()
    generated[2] += 10.0  # phase 4 off by 10 HU everywhere

    rows = score_phases(average, generated, targets, (0, 2, 4))

    assert [row["phase"] for row in rows] == [0, 2, 4, MIP_PHASE]
    assert rows[0]["mae_hu"] == 0 and rows[1]["mae_hu"] == 0 and rows[2]["mae_hu"] == pytest.approx(10.0)
    for row, target in zip(rows, targets):  # the baseline: the input average against that phase
        assert row["baseline_mae_hu"] == pytest.approx(evaluate_patient(average, target, target)["baseline_mae_hu"])
    # The MIP is the maximum over the phases, scored against the maximum over the targets.
    expected_mip = evaluate_patient(average, generated.max(axis=0), targets.max(axis=0))
    assert rows[3]["mae_hu"] == pytest.approx(expected_mip["mae_hu"]) and rows[3]["mae_hu"] > 0
    assert rows[3]["baseline_mae_hu"] == pytest.approx(expected_mip["baseline_mae_hu"])

    overall = mean_over_phases(rows)  # the MIP row is not a phase
    assert overall["mae_hu"] == pytest.approx(10.0 / 3)


def test_one_phase_has_no_mip_and_summaries_are_per_phase():
    target = body_phantom(2)[None]
    rows = score_phases(body_phantom(0), target, target, (5,))
    assert [row["phase"] for row in rows] == [5]

    two_patients = [{"patient": p, **row} for p in ("a", "b")
                    for row in score_phases(body_phantom(0), np.stack([body_phantom(1)] * 2),
                                            np.stack([body_phantom(1), body_phantom(2)]), (0, 1))]
    summary = summarise_by_phase(two_patients)
    assert list(summary) == ["0", "1", MIP_PHASE]
    assert summary["0"]["mae_hu"]["n"] == 2 and summary["0"]["mae_hu"]["mean"] == 0
    assert summary["1"]["mae_hu"]["mean"] > 0


def test_a_model_phase_beyond_the_targets_cycle_is_refused(cycle_root):
    inputs = sorted((cycle_root / "testA").glob("*.nii.gz"))
    targets, num_phases = find_phase_targets(cycle_root / "testB", inputs, (1, 3))
    assert num_phases == 4 and [s.frame for s in targets[inputs[0]]] == [1, 3]
    with pytest.raises(DatasetError, match=r"makes phase 7, but the targets have 4 phases \(0..3\)"):
        find_phase_targets(cycle_root / "testB", inputs, (0, 7))


# -- test.py on a real model of the whole cycle -------------------------------------------------
class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def run_test_in_process(dataroot: Path, run: Path, results: Path, *flags: str):
    argv = ["--dataroot", str(dataroot), "--name", run.name, "--checkpoints_dir", str(run.parent),
            "--results_dir", str(results), "--gpu_ids", "-1", "--num_images", "1", *flags]
    opt = TestOptions().parse(argv)
    return run_test(opt, CPU), results / run.name / "test_latest"


@pytest.fixture(scope="module")
def per_phase_files_root(cycle_root, tmp_path_factory) -> Path:
    """The tiny cycle phantom with its test targets stored as ``<patient>_phase<K>.nii.gz`` files."""
    root = tmp_path_factory.mktemp("per_phase")
    shutil.copytree(cycle_root / "testA", root / "testA")
    (root / "testB").mkdir()
    for path in sorted((cycle_root / "testB").glob("*.nii.gz")):
        for k in range(4):
            volume, meta = read_volume(path, frame=k)
            write_volume(root / "testB" / path.name.replace(".nii.gz", f"_phase{k}.nii.gz"), volume, meta)
    return root


@pytest.mark.parametrize("layout", ["4d", "files"])
def test_test_py_scores_every_phase_and_the_mip(tmp_path, multi_phase_run, cycle_root, per_phase_files_root, layout):
    dataroot = cycle_root if layout == "4d" else per_phase_files_root
    report, folder = run_test_in_process(dataroot, multi_phase_run, tmp_path)

    document = json.loads((folder / "metrics.json").read_text())
    assert document["phases"] == [0, 1, 2, 3]
    rows = document["phase_rows"]
    assert [(row["patient"], row["phase"]) for row in rows] == [
        (patient, phase) for patient in ("patient_1", "patient_2") for phase in (0, 1, 2, 3, "mip")]
    assert list(document["phase_summary"]) == ["0", "1", "2", "3", "mip"]
    # The same scores as scoring the written volumes against the targets by hand.
    generated, _ = read_volume(folder / "volumes" / "patient_1_phases.nii.gz", frame=2)
    average, _ = read_volume(dataroot / "testA" / "patient_1.nii.gz")
    target, _ = read_volume(cycle_root / "testB" / "patient_1.nii.gz", frame=2)
    assert rows[2]["mae_hu"] == pytest.approx(evaluate_patient(average, generated, target)["mae_hu"], rel=1e-6)
    assert rows[2]["baseline_mae_hu"] == pytest.approx(np.abs(average - target)[target > -500].mean(), rel=0.1)
    mip, _ = read_volume(folder / "volumes" / "patient_1_mip.nii.gz")
    phases = np.stack([read_volume(folder / "volumes" / "patient_1_phases.nii.gz", frame=k)[0] for k in range(4)])
    np.testing.assert_array_equal(mip, phases.max(axis=0))
    # The overall rows are each patient's mean over its phases.
    patient_1 = document["patients"][0]
    assert patient_1["mae_hu"] == pytest.approx(np.mean([row["mae_hu"] for row in rows[:4]]))

    with open(folder / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["phase"] for row in table] == ["0", "1", "2", "3", "mip"] * 2
    assert float(table[4]["mae_hu"]) == pytest.approx(rows[4]["mae_hu"])
    assert any(line.startswith("MIP vs true MIP: MAE (HU) in body generated") for line in report.summary_lines())

    # The page: the strip of all phases (generated, target, difference) and the MIP, no broken image.
    parser = ImageSources()
    parser.feed((folder / "index.html").read_text())
    assert parser.images and all((folder / unquote(src)).is_file() for src in parser.images)
    strip = [src for src in parser.images if "patient_1_strip" in src]
    assert len(strip) == 4 * (2 * 2 + 1)  # 4 phases x (2 windows x generated/target + difference)
    assert any("patient_1_mip_coronal" in src and "generated_lung" in src for src in parser.images)
    assert any("patient_1_mip_coronal" in src and "target_lung" in src for src in parser.images)
    assert nib.load(folder / "volumes" / "patient_1_phases.nii.gz").shape == (64, 64, 12, 4)


def test_a_phase_0_model_on_targets_stored_as_phases_is_scored_on_phase_0(tmp_path, tiny_run, cycle_root):
    _, folder = run_test_in_process(cycle_root, tiny_run, tmp_path)

    document = json.loads((folder / "metrics.json").read_text())
    assert [(row["patient"], row["phase"]) for row in document["phase_rows"]] == [("patient_1", 0), ("patient_2", 0)]
    generated, _ = read_volume(folder / "volumes" / "patient_1_phase0.nii.gz")
    average, _ = read_volume(cycle_root / "testA" / "patient_1.nii.gz")
    target, _ = read_volume(cycle_root / "testB" / "patient_1.nii.gz", frame=0)
    expected = evaluate_patient(average, generated, target)
    assert document["patients"][0]["mae_hu"] == pytest.approx(expected["mae_hu"], rel=1e-6)
    assert not (folder / "volumes" / "patient_1_mip.nii.gz").exists()
