"""What a model of the whole breathing cycle writes: one 4D file of its phases on the input's grid
(or one file per phase), the MIP and the average of the phases, atomically.

The 4D file must overlay the input exactly as today's 3D output does (tests/test_use_model.py's
checks, frame by frame), whatever way the input stores its voxels, and its 4th axis says which
phase each frame is. The model is a real one, trained on all phases of a tiny phantom
(``multi_phase_run`` in tests/conftest.py).
"""

from __future__ import annotations

import csv
import dataclasses

import nibabel as nib  # the header's phase labels are checked in the file itself
import numpy as np
import pytest

import batch_process_patients
import use_model
from data.body import body_mask
from data.volume_io import describe_phases, new_volume_meta, read_volume, write_volume
from inference import volume as inference_volume
from inference.batch import find_inputs, translate_folder
from inference.volume import PhaseOutputs, load_generator, output_names, translate_file
from options.cli import run_cli
from tests.conftest import run_script
from tests.test_use_model import PERMUTED_FLIPPED, assert_same_grid, assert_same_spatial_header, save_nifti
from tests.test_volume_io import STORAGE_AFFINES, coordinate_volume, storage_meta
from util.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# -- data/volume_io.py: a 4D file of phases ------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STORAGE_AFFINES))
def test_each_frame_of_a_4d_file_reads_back_as_the_phase_written(tmp_path, name):
    meta = storage_meta(STORAGE_AFFINES[name])
    phases = np.stack([coordinate_volume() + 1000 * k for k in range(3)], axis=-1)  # (X, Y, Z, P)

    path = write_volume(tmp_path / "phases.nii.gz", phases, meta, phases=(0, 1, 2), num_phases=3)

    for k in range(3):
        frame, frame_meta = read_volume(path, frame=k)
        np.testing.assert_array_equal(frame, phases[..., k])
        np.testing.assert_array_equal(frame_meta.affine, meta.affine)
    assert nib.load(path).shape == (*meta.storage_shape, 3)


@pytest.mark.parametrize(
    ("phases", "num_phases", "toffset", "step", "descrip"),
    [
        ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), 10, 0, 1, "breathing phases 0-9 of 10, frame k = k-th listed"),
        ((0, 5), 10, 0, 5, "breathing phases 0,5 of 10, frame k = k-th listed"),
        ((2, 4, 6), 10, 2, 2, "breathing phases 2,4,6 of 10, frame k = k-th listed"),
        ((0, 1, 5), 10, 0, 1, "breathing phases 0-1,5 of 10, frame k = k-th listed"),  # not equally spaced
    ],
)
def test_the_4th_axis_is_labelled_as_breathing_phases(tmp_path, phases, num_phases, toffset, step, descrip):
    """Frame k's 4th coordinate (toffset + k * pixdim[4]) is its phase number where the phases are
    equally spaced; descrip always lists them; the time unit is not claimed to be seconds."""
    meta = storage_meta(STORAGE_AFFINES["LPS (DICOM-like)"])
    volumes = np.zeros((*meta.canonical_shape, len(phases)), dtype=np.float32)

    header = nib.load(write_volume(tmp_path / "p.nii.gz", volumes, meta, phases=phases, num_phases=num_phases)).header

    assert header["descrip"].tobytes().decode().rstrip("\0") == descrip
    assert header["intent_name"].tobytes().decode().rstrip("\0") == "breathing phase"
    assert (float(header["toffset"]), float(header["pixdim"][4])) == (toffset, step)
    assert header.get_xyzt_units() == ("mm", "unknown")
    if len(set(np.diff(phases))) == 1:  # equally spaced
        assert [toffset + k * step for k in range(len(phases))] == list(phases)


def test_a_long_phase_list_still_fits_the_80_character_descrip():
    text = describe_phases(tuple(range(0, 60, 2)), 60)
    assert len(text) <= 80 and "30 of 60" in text


def test_a_4d_write_rounds_like_a_3d_one_and_is_atomic(tmp_path, monkeypatch):
    meta = new_volume_meta(np.eye(4), (2, 2, 2))
    values = np.array([1.4, 1.6, -1e6, 1e6, 0, 0, 0, 0], dtype=np.float32).reshape(2, 2, 2)
    path = write_volume(tmp_path / "v.nii", np.stack([values, -values], axis=-1), meta, dtype="int16")
    assert read_volume(path, frame=0)[0].ravel()[:4].tolist() == [1, 2, -32768, 32767]
    assert read_volume(path, frame=1)[0].ravel()[:4].tolist() == [-1, -2, 32767, -32768]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", fail)
    with pytest.raises(OSError, match="disk full"):
        write_volume(tmp_path / "w.nii.gz", np.stack([values, values], axis=-1), meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii"]


# -- inference: what a multi-phase model writes ----------------------------------------------------
@pytest.fixture(scope="module")
def cycle(multi_phase_run, cycle_root):
    """The multi-phase model (all 4 phases of the tiny phantom's cycle) and one test input."""
    generator = load_generator(multi_phase_run.parent, multi_phase_run.name)
    assert generator.phases == (0, 1, 2, 3) and generator.num_phases == 4
    return generator, sorted((cycle_root / "testA").glob("*.nii.gz"))[0]


def assert_4d_output_overlays(output, source, phases, num_phases, dtype="int16"):
    """Each frame of the 4D output overlays the input as a 3D output does (test_use_model.py's
    assert_same_spatial_header, shared with assert_same_grid), and its 4th axis is labelled."""
    source_image, output_image = nib.load(source), nib.load(output)
    assert output_image.shape == (*source_image.shape[:3], len(phases))
    assert_same_spatial_header(output_image, source_image)
    assert output_image.header.get_xyzt_units() == (source_image.header.get_xyzt_units()[0], "unknown")
    assert output_image.header.get_data_dtype().name == dtype
    assert output_image.dataobj.slope == 1.0 and output_image.dataobj.inter == 0.0
    assert output_image.header["descrip"].tobytes().decode().rstrip("\0") == describe_phases(phases, num_phases)


@pytest.mark.parametrize("storage", ["permuted_flipped", "big_endian_nifti2"])
def test_the_phases_are_one_4d_file_on_the_inputs_own_grid(tmp_path, cycle, storage):
    generator, source = cycle
    hu, meta = read_volume(source)
    options = {"ornt": PERMUTED_FLIPPED} if storage == "permuted_flipped" else {
        "image_class": nib.Nifti2Image, "endianness": ">", "sform_code": 2}
    stored = save_nifti(tmp_path / f"{storage}.nii.gz", hu, meta.canonical_affine, **options)

    result = translate_file(generator, stored, tmp_path / "out")

    assert result.output_path == tmp_path / "out" / f"{storage}_phases.nii.gz"
    assert result.output_paths == (result.output_path,)
    assert_4d_output_overlays(result.output_path, stored, generator.phases, generator.num_phases)
    # Read canonically, each frame is what the generator makes of the input, at the input's place.
    expected, _ = generator.translate_phases(hu)
    for k in range(len(generator.phases)):
        frame, frame_meta = read_volume(result.output_path, frame=k)
        np.testing.assert_allclose(frame_meta.canonical_affine, meta.canonical_affine, atol=1e-4)
        assert np.abs(frame - expected[k]).max() <= 0.5 + 1e-3  # rounded to int16
    # PNG slices: one folder per phase.
    assert sorted(p.name for p in result.slices_dir.iterdir()) == [f"phase{k}" for k in generator.phases]
    assert len(list((result.slices_dir / "phase0").glob("*.png"))) == hu.shape[2]


def test_split_phases_mip_and_average(tmp_path, cycle):
    generator, source = cycle
    hu, _ = read_volume(source)
    outputs = PhaseOutputs(split_phases=True, mip=True, average=True)

    result = translate_file(generator, source, tmp_path / "out", output_dtype="float32", save_slices=False,
                            outputs=outputs)

    stem = source.name.removesuffix(".nii.gz")
    names = ["mip", "average", *(f"phase{k}" for k in generator.phases)]
    assert [p.name for p in result.output_paths] == [f"{stem}_{n}.nii.gz" for n in names]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in result.output_paths)
    phases = np.stack([read_volume(tmp_path / "out" / f"{stem}_phase{k}.nii.gz")[0] for k in generator.phases])
    for path in result.output_paths:
        assert_same_grid(path, source, "float32")
    np.testing.assert_array_equal(read_volume(result.output_paths[0])[0], phases.max(axis=0))
    np.testing.assert_allclose(read_volume(result.output_paths[1])[0], phases.mean(axis=0), atol=1e-3)
    assert phases.max(axis=0).mean() > phases.mean(axis=0).mean()  # the MIP is not the average
    # The consistency check: the average of the phases against the input, in the input's body.
    body = body_mask(hu)
    assert result.average_mae_hu == pytest.approx(np.abs(phases.mean(axis=0) - hu)[body].mean(), rel=1e-4)


def test_a_failed_write_leaves_no_new_file(tmp_path, cycle, monkeypatch):
    generator, source = cycle
    calls = []

    def fail_on_the_second(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return write_volume(path, *args, **kwargs)

    monkeypatch.setattr(inference_volume, "write_volume", fail_on_the_second)
    with pytest.raises(UserError, match="No space left"):
        translate_file(generator, source, tmp_path / "out", outputs=PhaseOutputs(mip=True, average=True))
    assert len(calls) == 2
    assert list((tmp_path / "out").iterdir()) == []  # neither the MIP written first, nor PNGs


def test_a_one_phase_model_writes_what_it_always_wrote_and_refuses_mip(tmp_path, tiny_run, cycle):
    source = cycle[1]
    generator = load_generator(tiny_run.parent, tiny_run.name)
    assert generator.phases == (0,)
    assert output_names(source, generator.phases, PhaseOutputs(split_phases=True)) == {
        "phase0": source.name.replace(".nii.gz", "_phase0.nii.gz")}
    with pytest.raises(UserError, match=r"trained on phase 0 only; --mip and --average need"):
        translate_file(generator, source, tmp_path / "out", outputs=PhaseOutputs(mip=True, average=True))
    assert not (tmp_path / "out").exists()
    only_k = dataclasses.replace(generator, phases=(3,), num_phases=10)  # a model of phase 3 alone
    assert translate_file(only_k, source, tmp_path / "out").output_path.name.endswith("_phase3.nii.gz")


# -- the scripts ------------------------------------------------------------------------------------
def test_use_model_prints_the_average_check_and_every_output(tmp_path, cycle, multi_phase_run, capsys):
    _, source = cycle
    argv = ["--input_nifti", str(source), "--model_name", multi_phase_run.name, "--checkpoints_dir",
            str(multi_phase_run.parent), "--output_dir", str(tmp_path), "--gpu_ids", "-1", "--no_slices",
            "--mip", "--average"]
    assert run_cli(use_model.main, use_model.get_args_parser(), argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    stem = source.name.removesuffix(".nii.gz")
    assert lines[-3:] == [str(tmp_path / f"{stem}_{kind}.nii.gz") for kind in ("mip", "average", "phases")]
    assert any(line.startswith("average of the generated phases vs the input: MAE ") for line in lines)


def test_batch_lists_what_it_wrote_and_skips_only_complete_sets(tmp_path, cycle, multi_phase_run, cycle_root):
    generator, _ = cycle
    inputs = find_inputs(cycle_root / "testA")
    outputs = PhaseOutputs(mip=True, average=True)
    rows = list(translate_folder(generator, inputs, tmp_path, save_slices=False, outputs=outputs))
    assert [row.status for row in rows] == ["ok"] * len(inputs)
    stem = inputs[0].name.removesuffix(".nii.gz")
    assert rows[0].outputs == f"{stem}_mip.nii.gz {stem}_average.nii.gz {stem}_phases.nii.gz"
    assert rows[0].average_mae_hu is not None and rows[0].average_mae_hu >= 0

    (tmp_path / f"{stem}_average.nii.gz").unlink()  # an incomplete set is made again
    rows = list(translate_folder(generator, inputs, tmp_path, save_slices=False, outputs=outputs))
    assert [row.status for row in rows] == ["ok"] + ["skipped"] * (len(inputs) - 1)

    argv = ["--input_dir", str(cycle_root / "testA"), "--output_dir", str(tmp_path / "script"),
            "--model_name", multi_phase_run.name, "--checkpoints_dir", str(multi_phase_run.parent),
            "--gpu_ids", "-1", "--no_slices", "--split_phases", "--average"]
    assert run_cli(batch_process_patients.main, batch_process_patients.get_args_parser(), argv) == 0
    with open(tmp_path / "script" / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert summary[0]["outputs"].split() == [f"{stem}_average.nii.gz",
                                             *(f"{stem}_phase{k}.nii.gz" for k in generator.phases)]
    assert float(summary[0]["average_mae_hu"]) >= 0


@pytest.mark.slow
def test_use_model_as_a_user_runs_it(tmp_path, cycle, multi_phase_run):
    _, source = cycle
    result = run_script("use_model.py", "--input_nifti", source, "--model_name", multi_phase_run.name,
                        "--checkpoints_dir", multi_phase_run.parent, "--output_dir", tmp_path / "out",
                        "--split_phases", "--mip", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    stem = source.name.removesuffix(".nii.gz")
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "out" / f"{stem}_phase{max(cycle[0].phases)}.nii.gz")


def test_the_test_model_refuses_a_run_of_several_phases_in_one_line(multi_phase_run, tmp_path):
    result = run_script(
        "test.py", "--dataroot", multi_phase_run.parent, "--name", multi_phase_run.name, "--model", "test",
        "--checkpoints_dir", multi_phase_run.parent, "--results_dir", tmp_path, "--gpu_ids", "-1", cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--model test writes one phase per input" in result.stderr and "use_model.py" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
