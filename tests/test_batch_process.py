"""batch_process_patients.py: every volume of a folder, resumable, past failures, with a summary."""

from __future__ import annotations

import errno
import gzip
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest

import batch_process_patients
from inference import batch as inference_batch
from inference import volume as inference_volume
from inference.batch import BatchRow, find_inputs, read_summary, summarise, translate_folder
from inference.volume import load_generator
from options.cli import run_cli
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


# -- the pipeline: read ahead, write behind ----------------------------------------------------


def translate_all(tiny_run: Path, input_dir: Path, output_dir: Path, overlap: bool) -> list[BatchRow]:
    generator = load_generator(tiny_run.parent, tiny_run.name)
    return list(translate_folder(generator, find_inputs(input_dir), output_dir, overlap=overlap))


def test_overlapped_stages_write_the_same_files_as_one_stage_at_a_time(tmp_path, tiny_run, patient_data):
    overlapped = translate_all(tiny_run, patient_data, tmp_path / "overlapped", overlap=True)
    in_turn = translate_all(tiny_run, patient_data, tmp_path / "in_turn", overlap=False)

    def outcome(rows):
        return [(row.file, row.status, row.error, row.slices) for row in rows]

    assert outcome(overlapped) == outcome(in_turn)  # same rows, in input order, the corrupt file first
    assert [row.status for row in overlapped] == ["failed", "ok", "ok", "ok"]
    files = sorted(p.relative_to(tmp_path / "in_turn") for p in (tmp_path / "in_turn").rglob("*") if p.is_file())
    assert len(files) == 3 + 3 * 12  # three volumes and their PNG slices
    assert files == sorted(
        p.relative_to(tmp_path / "overlapped") for p in (tmp_path / "overlapped").rglob("*") if p.is_file()
    )
    for name in files:
        assert (tmp_path / "overlapped" / name).read_bytes() == (tmp_path / "in_turn" / name).read_bytes(), name


def test_the_next_volume_is_read_and_the_last_written_while_the_network_runs(
    tmp_path, tiny_run, patient_data, monkeypatch
):
    """Each stage waits until its neighbours are under way: file k's network until file k+1's read
    and file k-1's write have started, and those until file k's network has. Stages that ran one
    after another would wait for ever (here: fail after 20 s)."""
    (patient_data / CORRUPT).unlink()
    names = [path.name for path in find_inputs(patient_data)]
    started = {(stage, name): threading.Event() for stage in ("read", "network", "write") for name in names}

    def wait_for(stage: str, index: int) -> None:
        if 0 <= index < len(names):
            assert started[stage, names[index]].wait(20), f"{stage} of {names[index]} did not run alongside"

    def alongside(stage: str, function, neighbours):
        def run(*args, **kwargs):
            name = next(arg for arg in args if isinstance(arg, Path) and arg.name in names).name
            started[stage, name].set()
            for neighbour, offset in neighbours:
                wait_for(neighbour, names.index(name) + offset)
            return function(*args, **kwargs)

        return run

    patch = monkeypatch.setattr
    patch(inference_batch, "read_input", alongside("read", inference_batch.read_input, [("network", -1)]))
    patch(inference_batch, "generate", alongside("network", inference_batch.generate, [("read", 1), ("write", -1)]))
    patch(inference_batch, "write_outputs", alongside("write", inference_batch.write_outputs, [("network", 1)]))

    rows = translate_all(tiny_run, patient_data, tmp_path / "out", overlap=True)
    assert [(row.file, row.status) for row in rows] == [(name, "ok") for name in names]


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "in_turn"])
def test_a_file_that_cannot_be_written_is_one_line_and_the_others_complete(
    overlap, tmp_path, tiny_run, patient_data, monkeypatch, capsys
):
    """A failure in the writer thread reaches the summary and stderr like any other, in input order."""
    monkeypatch.setattr(batch_process_patients, "translate_folder", partial(translate_folder, overlap=overlap))
    (patient_data / CORRUPT).unlink()
    write_volume = inference_volume.write_volume

    def disk_full_for_patient_2(path, *args, **kwargs):
        if "patient_2" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_volume(path, *args, **kwargs)

    monkeypatch.setattr(inference_volume, "write_volume", disk_full_for_patient_2)
    output_dir = tmp_path / "out"
    assert run_batch(tiny_run, patient_data, output_dir) == 1
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "patient_2_phase0.nii.gz: cannot be written (No space left on device)" in warnings[0]
    assert "3 files: 2 ok, 0 skipped (exists), 1 failed" in captured.out
    assert [(row["file"], row["status"]) for row in read_summary(output_dir / "summary.csv")] == [
        ("patient_1.nii.gz", "ok"),
        ("patient_2.nii.gz", "failed"),
        ("patient_3.nii", "ok"),
    ]
    assert sorted(p.name for p in output_dir.iterdir()) == [
        "patient_1_phase0.nii.gz",
        "patient_1_slices",
        "patient_3_phase0.nii.gz",
        "patient_3_slices",
        "summary.csv",
    ]


def test_summary_line_names_each_status():
    rows = [BatchRow("a", "ok", slices=3), BatchRow("b", "skipped"), BatchRow("c", "failed", "c: broken")]
    assert summarise(rows) == "3 files: 1 ok, 1 skipped (exists), 1 failed"
