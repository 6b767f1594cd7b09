"""batch_process_patients.py: every volume of a folder, resumable, past failures, with a summary."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

import batch_process_patients
from inference.batch import BatchRow, read_summary, summarise
from inference.cli import run_cli
from tests.conftest import run_script

GOOD = ("patient_1.nii.gz", "patient_2.nii.gz", "patient_3.nii")
CORRUPT = "patient_0_corrupt.nii.gz"  # sorts first: the batch must go on past it


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def patient_data(tmp_path, phantom_root) -> Path:
    """Three average CTs (one stored uncompressed) and one corrupt file."""
    folder = tmp_path / "patient_data"
    folder.mkdir()
    sources = sorted((phantom_root / "trainA").glob("*.nii.gz"))
    for source, name in zip(sources, GOOD[:2]):
        shutil.copy(source, folder / name)
    (folder / GOOD[2]).write_bytes(gzip.decompress(sources[2].read_bytes()))
    (folder / CORRUPT).write_bytes(b"\x1f\x8b not really gzip")
    (folder / "notes.txt").write_text("not a volume; ignored")
    return folder


def statuses(output_dir: Path) -> dict[str, str]:
    return {row["file"]: row["status"] for row in read_summary(output_dir / "summary.csv")}


def run_batch(tiny_run: Path, input_dir: Path, output_dir: Path, *flags: str) -> int:
    """The script in-process, as it runs (parse, main, one-line errors)."""
    argv = [
        "--input_dir",
        str(input_dir),
        "--output_dir",
        str(output_dir),
        "--model_name",
        tiny_run.name,
        "--checkpoints_dir",
        str(tiny_run.parent),
        "--gpu_ids",
        "-1",
        *flags,
    ]
    return run_cli(batch_process_patients.main, batch_process_patients.get_args_parser(), argv)


@pytest.mark.slow
def test_batch_goes_past_a_corrupt_file_and_resumes(tmp_path, tiny_run, patient_data, capsys):
    output_dir = tmp_path / "processed_results"
    # The reference's "Batch Processing" command, run as a user runs it.
    result = run_script(
        "batch_process_patients.py",
        "--input_dir",
        "./patient_data",
        "--output_dir",
        "./processed_results",
        "--model_name",
        tiny_run.name,
        "--checkpoints_dir",
        tiny_run.parent,
        cwd=tmp_path,
        timeout=180,
    )

    assert result.returncode == 1, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and CORRUPT in warnings[0]
    assert "Traceback" not in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("4 files: 3 ok, 0 skipped (exists), 1 failed")
    rows = read_summary(output_dir / "summary.csv")
    assert list(rows[0]) == ["file", "status", "error", "slices", "seconds"]
    assert [row["file"] for row in rows] == sorted([*GOOD, CORRUPT])
    by_file = {row["file"]: row for row in rows}
    assert by_file[CORRUPT]["status"] == "failed" and CORRUPT in by_file[CORRUPT]["error"]
    assert by_file[CORRUPT]["slices"] == ""
    for name in GOOD:
        assert by_file[name]["status"] == "ok" and by_file[name]["error"] == ""
        assert by_file[name]["slices"] == "12" and float(by_file[name]["seconds"]) > 0
    outputs = {p.name for p in output_dir.iterdir()}
    expected = (
        {"summary.csv"} | {f"patient_{k}_phase0.nii.gz" for k in (1, 2, 3)} | {f"patient_{k}_slices" for k in (1, 2, 3)}
    )
    assert outputs == expected

    # Rerun: finished files are skipped, the corrupt one fails again.
    written = {name: (output_dir / name).stat().st_mtime_ns for name in outputs if name.endswith(".nii.gz")}
    assert run_batch(tiny_run, patient_data, output_dir) == 1
    assert "4 files: 0 ok, 3 skipped (exists), 1 failed" in capsys.readouterr().out
    assert statuses(output_dir) == {**dict.fromkeys(GOOD, "skipped"), CORRUPT: "failed"}

    # After one output is deleted, only that one is made again.
    (output_dir / "patient_2_phase0.nii.gz").unlink()
    assert run_batch(tiny_run, patient_data, output_dir) == 1
    assert statuses(output_dir) == {
        "patient_1.nii.gz": "skipped",
        "patient_2.nii.gz": "ok",
        "patient_3.nii": "skipped",
        CORRUPT: "failed",
    }
    for name, mtime in written.items():
        if name != "patient_2_phase0.nii.gz":
            assert (output_dir / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert (output_dir / "patient_2_phase0.nii.gz").is_file()


def test_all_good_files_exit_zero(tmp_path, tiny_run, patient_data, capsys):
    (patient_data / CORRUPT).unlink()
    assert run_batch(tiny_run, patient_data, tmp_path / "out", "--no_slices", "--output_dtype", "float32") == 0
    assert statuses(tmp_path / "out") == dict.fromkeys(GOOD, "ok")
    assert not any(p.name.endswith("_slices") for p in (tmp_path / "out").iterdir())


@pytest.mark.parametrize("case", ["missing_folder", "no_volumes", "same_folder"])
def test_unusable_folders_give_one_line(case, tmp_path, tiny_run, patient_data, capsys):
    input_dir, output_dir = patient_data, tmp_path / "out"
    if case == "missing_folder":
        input_dir = tmp_path / "nowhere"
    elif case == "no_volumes":
        input_dir = tmp_path / "empty"
        input_dir.mkdir()
    else:
        output_dir = patient_data
    capsys.readouterr()
    assert run_batch(tiny_run, input_dir, output_dir) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("batch_process_patients.py: error: ")
    assert not (tmp_path / "out").exists()


def test_summary_line_names_each_status():
    rows = [BatchRow("a", "ok", slices=3), BatchRow("b", "skipped"), BatchRow("c", "failed", "c: broken")]
    assert summarise(rows) == "3 files: 1 ok, 1 skipped (exists), 1 failed"
