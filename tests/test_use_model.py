"""use_model.py: one average CT in, its phase-0 volume out, on exactly the input's grid.

The same anatomy stored in odd ways (permuted and flipped axes, big-endian, scaled uint16,
NIfTI-2, uncompressed, 4D) must give the same output in world space, written back in the
input's own way. A file that cannot be used gives one line on stderr, exit code 1, and
leaves nothing behind. Most cases call the script's ``main`` in-process (fast); a few run
the real script as a user would.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib  # tests craft odd files directly; project code reads them only through data.volume_io
import numpy as np
import pytest
import torch

import use_model
from data.volume_io import VolumeError, read_volume
from inference import volume as inference_volume
from inference.volume import load_generator, translate_file
from options.cli import run_cli
from tests.conftest import REPO, make_run_folder, run_script

# Storage orientation of the "permuted and flipped" file, as a nibabel ``ornt``: canonical
# axis i is stored as axis PERMUTED_FLIPPED[i, 0], reversed where PERMUTED_FLIPPED[i, 1] == -1.
PERMUTED_FLIPPED = np.array([[2, -1], [0, 1], [1, -1]])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def anatomy(phantom_root) -> tuple[Path, np.ndarray, np.ndarray]:
    """A phantom average CT: its file, its canonical (X, Y, Z) HU array and canonical affine."""
    path = sorted((phantom_root / "testA").glob("*.nii.gz"))[0]
    volume, meta = read_volume(path)
    return path, volume, meta.canonical_affine


def run_use_model(tiny_run: Path, input_path: Path, output_dir: Path, *flags: str) -> int:
    """``use_model.py`` in-process, as the script runs it (parse, main, one-line errors)."""
    argv = [
        "--input_nifti",
        str(input_path),
        "--model_name",
        tiny_run.name,
        "--epoch",
        "latest",
        "--output_dir",
        str(output_dir),
        "--checkpoints_dir",
        str(tiny_run.parent),
        "--gpu_ids",
        "-1",
        *flags,
    ]
    return run_cli(use_model.main, use_model.get_args_parser(), argv)


def save_nifti(
    path: Path,
    canonical_hu: np.ndarray,
    canonical_affine: np.ndarray,
    *,
    ornt: np.ndarray | None = None,
    image_class: type = nib.Nifti1Image,
    endianness: str = "<",
    dtype: type = np.int16,
    slope: float = 1.0,
    inter: float = 0.0,
    qform_code: int = 1,
    sform_code: int = 1,
    frames: int | None = None,
) -> Path:
    """Store a canonical HU volume in a chosen way; the world position of every voxel is kept.

    Args:
        ornt: storage orientation (nibabel ``ornt``) relative to canonical; None keeps RAS.
        slope, inter: stored value = (HU - inter) / slope, in ``dtype``.
        frames: if given, a 4D file of that many frames; frame k holds HU + 100 * (k - frames // 2),
            so the middle frame holds the anatomy itself.
    """
    image = nib.Nifti1Image(canonical_hu, canonical_affine)
    if ornt is not None:
        image = image.as_reoriented(ornt)
    data, affine = np.asarray(image.dataobj), image.affine
    if frames is not None:
        data = np.stack([data + 100.0 * (k - frames // 2) for k in range(frames)], axis=-1)
    header = image_class.header_class(endianness=endianness)
    header.set_data_dtype(dtype)
    stored = (data - inter) / slope
    if np.issubdtype(dtype, np.integer):
        stored = np.rint(stored)
    image = image_class(stored.astype(dtype), affine, header=header)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    image.header.set_xyzt_units(xyz="mm")
    if (slope, inter) != (1.0, 0.0):
        image.header.set_slope_inter(slope, inter)
    nib.save(image, path)
    return path


def assert_same_spatial_header(output: nib.Nifti1Image, source: nib.Nifti1Image) -> None:
    """NIfTI version, byte order, affine, qform/sform and their codes, voxel sizes: the spatial part of the header."""
    assert type(output) is type(source)  # NIfTI-1 stays NIfTI-1, NIfTI-2 stays NIfTI-2
    assert output.header.endianness == source.header.endianness
    np.testing.assert_array_equal(output.affine, source.affine)
    for name in ("qform", "sform"):
        out_affine, out_code = getattr(output.header, f"get_{name}")(coded=True)
        in_affine, in_code = getattr(source.header, f"get_{name}")(coded=True)
        assert int(out_code) == int(in_code), name
        if in_affine is not None:
            np.testing.assert_array_equal(out_affine, in_affine)
    np.testing.assert_array_equal(output.header["pixdim"][:4], source.header["pixdim"][:4])


def assert_same_grid(output_path: Path, input_path: Path, dtype: str = "int16") -> None:
    """The output overlays the input: shape, affine, qform/sform and codes, voxel sizes, NIfTI version, byte order."""
    source, output = nib.load(input_path), nib.load(output_path)
    assert output.shape == source.shape[:3]
    assert_same_spatial_header(output, source)
    assert output.header.get_xyzt_units()[0] == source.header.get_xyzt_units()[0]
    assert output.header.get_data_dtype().name == dtype
    assert output.dataobj.slope == 1.0 and output.dataobj.inter == 0.0


def assert_same_world_volume(output_path: Path, reference_path: Path) -> None:
    """Read canonically, both outputs are the same volume at the same place (within 1 HU)."""
    output, output_meta = read_volume(output_path)
    reference, reference_meta = read_volume(reference_path)
    assert output.shape == reference.shape
    np.testing.assert_allclose(output_meta.canonical_affine, reference_meta.canonical_affine, atol=1e-4)
    assert np.abs(output - reference).max() <= 1.0


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_run, anatomy) -> Path:
    """The phantom file translated as it is: the output every other storage must reproduce."""
    output_dir = tmp_path_factory.mktemp("baseline")
    assert run_use_model(tiny_run, anatomy[0], output_dir, "--no_slices") == 0
    return output_dir / f"{anatomy[0].name.removesuffix('.nii.gz')}_phase0.nii.gz"


# Each entry: file name and save_nifti keywords. All hold the phantom's anatomy at its place.
STORAGES = {
    "ras": ("ras.nii.gz", {}),
    "permuted_flipped": ("permuted.nii.gz", {"ornt": PERMUTED_FLIPPED}),
    "big_endian": ("big_endian.nii.gz", {"endianness": ">", "qform_code": 1, "sform_code": 2}),
    "scaled_uint16": ("scaled.nii.gz", {"dtype": np.uint16, "slope": 0.5, "inter": -1024.0}),
    "nifti2_qform_only": ("nifti2.nii.gz", {"image_class": nib.Nifti2Image, "sform_code": 0, "ornt": PERMUTED_FLIPPED}),
    "uncompressed_float32": ("plain.nii", {"dtype": np.float32, "sform_code": 4}),
    "4d_one_frame": ("one_frame.nii.gz", {"frames": 1}),
}


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_any_storage_gives_the_same_volume_on_its_own_grid(storage, tmp_path, tiny_run, anatomy, baseline):
    name, options = STORAGES[storage]
    source = save_nifti(tmp_path / name, anatomy[1], anatomy[2], **options)
    if "slope" in options:  # the file really is scaled, so the test tests what it says
        assert nib.load(source).dataobj.slope == 0.5 and nib.load(source).get_data_dtype() == np.uint16
    if options.get("endianness") == ">":
        with gzip.open(source) as f:
            assert int.from_bytes(f.read(4), "big") == 348  # sizeof_hdr, stored big-endian

    assert run_use_model(tiny_run, source, tmp_path / "out", "--no_slices") == 0

    output = tmp_path / "out" / f"{name.split('.')[0]}_phase0.nii.gz"
    assert_same_grid(output, source)
    assert_same_world_volume(output, baseline)


def test_size_other_than_the_training_size_comes_back_at_its_own_size(tmp_path, tiny_run, anatomy):
    """48 x 40 x 10 voxels (the model takes 128 x 128 slices), stored permuted, written as float32."""
    _, hu, affine = anatomy
    crop = hu[8:56, 12:52, 1:11]
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ [8, 12, 1] + affine[:3, 3]  # the crop keeps its place in the world
    source = save_nifti(tmp_path / "crop.nii.gz", crop, shifted, ornt=PERMUTED_FLIPPED)

    assert run_use_model(tiny_run, source, tmp_path / "out", "--output_dtype", "float32") == 0

    output = tmp_path / "out" / "crop_phase0.nii.gz"
    assert nib.load(source).shape == (40, 10, 48)  # stored permuted
    assert_same_grid(output, source, dtype="float32")
    volume, meta = read_volume(output)
    assert volume.shape == (48, 40, 10) and np.isfinite(volume).all()
    np.testing.assert_allclose(meta.canonical_affine, shifted, atol=1e-4)
    assert len(list((tmp_path / "out" / "crop_slices").glob("*.png"))) == 10


def test_4d_file_needs_frame_and_translates_the_chosen_one(tmp_path, tiny_run, anatomy, baseline, capsys):
    _, hu, affine = anatomy
    source = save_nifti(
        tmp_path / "phases.nii.gz", hu, affine, frames=3
    )  # frame 1 holds the anatomy itself, 0 and 2 are shifted

    assert run_use_model(tiny_run, source, tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(source) in error and "--frame" in error
    assert not (tmp_path / "out").exists()

    assert run_use_model(tiny_run, source, tmp_path / "out", "--frame", "1", "--no_slices") == 0
    output = tmp_path / "out" / "phases_phase0.nii.gz"
    assert_same_grid(output, source)
    assert_same_world_volume(output, baseline)


@pytest.mark.slow
def test_reference_command_writes_volume_and_slices(tmp_path, tiny_run, anatomy):
    """The reference's Step 7 "Single Volume Inference" command, run as a user runs it."""
    source = tmp_path / "datasets" / "ct_phases_dataset" / "testA" / "patient_1.nii.gz"
    source.parent.mkdir(parents=True)
    shutil.copy(anatomy[0], source)
    result = run_script(
        "use_model.py",
        "--input_nifti",
        "./datasets/ct_phases_dataset/testA/patient_1.nii.gz",
        "--model_name",
        tiny_run.name,
        "--epoch",
        "latest",
        "--output_dir",
        "./results",
        "--checkpoints_dir",
        tiny_run.parent,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "results/patient_1_phase0.nii.gz"
    assert_same_grid(tmp_path / "results" / "patient_1_phase0.nii.gz", source)
    pngs = sorted((tmp_path / "results" / "patient_1_slices").iterdir())
    assert [p.name for p in pngs] == [f"slice_{k:02d}.png" for k in range(12)]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["patient_1_phase0.nii.gz", "patient_1_slices"]


# -- inputs that cannot be used --------------------------------------------------------------


def _not_nifti(folder: Path, anatomy) -> Path:
    path = folder / "notes.nii.gz"
    path.write_text("patient notes, not an image\n")
    return path


def _truncated_gz(folder: Path, anatomy) -> Path:
    data = anatomy[0].read_bytes()
    path = folder / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_nii(folder: Path, anatomy) -> Path:
    full = save_nifti(folder / "full.nii", anatomy[1], anatomy[2])
    path = folder / "truncated.nii"
    path.write_bytes(full.read_bytes()[:20_000])
    full.unlink()
    return path


def _empty(folder: Path, anatomy) -> Path:
    path = folder / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def _two_dimensional(folder: Path, anatomy) -> Path:
    path = folder / "slice.nii.gz"
    nib.save(nib.Nifti1Image(anatomy[1][:, :, 5].astype(np.int16), anatomy[2]), path)
    return path


def _all_nan(folder: Path, anatomy) -> Path:
    return save_nifti(folder / "nan.nii.gz", np.full(anatomy[1].shape, np.nan), anatomy[2], dtype=np.float32)


BAD_INPUTS = {
    "not_nifti": (_not_nifti, "cannot be read as NIfTI"),
    "truncated_gz": (_truncated_gz, ""),
    "truncated_nii": (_truncated_nii, "truncated"),
    "empty": (_empty, "empty"),
    "2d": (_two_dimensional, "2D"),
    "all_nan": (_all_nan, "NaN"),
}


def assert_one_line_error(rc: int, stderr: str, names: Path) -> None:
    assert rc == 1
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert stderr.startswith(f"use_model.py: error: {names}: "), stderr
    assert "Traceback" not in stderr


def assert_nothing_written(output_dir: Path) -> None:
    assert not output_dir.exists() or not any(output_dir.iterdir()), list(output_dir.iterdir())


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_unusable_input_gives_one_line_and_no_output(case, tmp_path, tiny_run, anatomy, capsys):
    make, expected = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    source = make(tmp_path / "in", anatomy)
    capsys.readouterr()

    rc = run_use_model(tiny_run, source, tmp_path / "out")

    captured = capsys.readouterr()
    assert_one_line_error(rc, captured.err, source)
    assert expected in captured.err
    assert_nothing_written(tmp_path / "out")


def test_missing_checkpoint_and_missing_options_name_the_file(tmp_path, tiny_run, anatomy, capsys):
    rc = run_use_model(tiny_run, anatomy[0], tmp_path / "out", "--epoch", "99")
    assert_one_line_error(rc, capsys.readouterr().err, tiny_run / "99_net_G.pth")

    bare = tmp_path / "checkpoints" / "bare"
    bare.mkdir(parents=True)
    shutil.copy(tiny_run / "latest_net_G.pth", bare)
    rc = run_cli(
        use_model.main,
        use_model.get_args_parser(),
        [
            "--input_nifti",
            str(anatomy[0]),
            "--model_name",
            "bare",
            "--checkpoints_dir",
            str(bare.parent),
            "--output_dir",
            str(tmp_path / "out"),
            "--gpu_ids",
            "-1",
        ],
    )
    assert_one_line_error(rc, capsys.readouterr().err, bare / "train_opt.json")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.slow
def test_script_reports_a_truncated_file_in_one_line(tmp_path, tiny_run, anatomy):
    source = _truncated_gz(tmp_path, anatomy)
    result = run_script(
        "use_model.py",
        "--input_nifti",
        source,
        "--model_name",
        tiny_run.name,
        "--checkpoints_dir",
        tiny_run.parent,
        "--output_dir",
        tmp_path / "out",
        "--gpu_ids",
        "-1",
        cwd=tmp_path,
        timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, source)
    assert_nothing_written(tmp_path / "out")


# -- failures while writing leave nothing half-made ------------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_run):
    return load_generator(tiny_run.parent, tiny_run.name, "latest")


def test_failure_while_writing_pngs_leaves_nothing(tmp_path, generator, anatomy, monkeypatch):
    written = []

    def save_png_then_fail(image, path, **options):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(path)
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(inference_volume, "save_png", save_png_then_fail)
    with pytest.raises(inference_volume.VolumeError, match="No space left on device"):
        translate_file(generator, anatomy[0], tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_failure_while_writing_the_volume_removes_its_pngs(tmp_path, generator, anatomy, monkeypatch):
    def write_volume_fails(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inference_volume, "write_volume", write_volume_fails)
    with pytest.raises(inference_volume.VolumeError, match=r"patient_\d_phase0.nii.gz: cannot be written"):
        translate_file(generator, anatomy[0], tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_rerun_replaces_outputs_and_leaves_no_temporary_files(tmp_path, generator, anatomy):
    first = translate_file(generator, anatomy[0], tmp_path / "out")
    (first.slices_dir / "stale.png").write_bytes(b"from an older run")
    second = translate_file(generator, anatomy[0], tmp_path / "out")
    assert second.output_path == first.output_path and second.n_slices == 12
    assert not (second.slices_dir / "stale.png").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [first.output_path.name, first.slices_dir.name]
    )


def test_batch_size_and_neighbour_slices_do_not_change_the_result(tmp_path, phantom_root, anatomy):
    """2.5D models (--context_slices 1: each slice with one neighbour on each side) on an odd-sized
    volume: the result does not depend on how many slices go through the network at once."""
    run = make_run_folder(
        tmp_path, "context", phantom_root, ["--intensity", "hu", "--context_slices", "1", "--input_nc", "3"]
    )
    generator = load_generator(run.parent, run.name, "latest")
    crop = np.ascontiguousarray(anatomy[1][8:56, 12:52])
    one_at_a_time, _ = generator.translate(crop, batch_size=1)
    all_at_once, _ = generator.translate(crop, batch_size=100)
    assert one_at_a_time.shape == crop.shape == (48, 40, 12)
    np.testing.assert_allclose(one_at_a_time, all_at_once, atol=1e-3)


def test_a_checkpoint_with_nan_weights_is_refused_naming_it(tmp_path, tiny_run, anatomy, capsys):
    broken = tmp_path / "checkpoints" / "broken"
    shutil.copytree(tiny_run, broken)
    state = torch.load(broken / "latest_net_G.pth", weights_only=True)
    first = next(key for key, value in state.items() if value.is_floating_point())
    state[first][...] = float("nan")
    torch.save(state, broken / "latest_net_G.pth")
    rc = run_cli(use_model.main, use_model.get_args_parser(),
                 ["--input_nifti", str(anatomy[0]), "--model_name", "broken", "--checkpoints_dir", str(broken.parent),
                  "--output_dir", str(tmp_path / "out"), "--gpu_ids", "-1"])
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, broken / "latest_net_G.pth")
    assert "holds NaN/Inf weights" in err
    assert_nothing_written(tmp_path / "out")


def test_a_network_output_with_nan_is_refused_not_written(tmp_path, generator, anatomy):
    class NaNNet(torch.nn.Module):
        def forward(self, x):
            return torch.full_like(x[:, :1], float("nan"))

    broken = dataclasses.replace(generator, net=NaNNet())
    with pytest.raises(VolumeError, match="the network's output holds NaN/Inf"):
        translate_file(broken, anatomy[0], tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


# -- precision, stage times, start-up ---------------------------------------------------------

# |reduced - fp32| in HU, (mean, max), allowed on the phantom volume. bf16 keeps 8 bits of
# mantissa, fp16 11. Measured with this file's untrained unet_128 (ngf 4, fixed HU window) on
# a 2-core x86 CPU: bf16 0.97 HU on average and 15.5 HU at most; fp16 0.13 and 1.5 HU.
PRECISION_TOLERANCE_HU = {"bf16": (2.0, 30.0), "fp16": (0.3, 4.0)}


@pytest.mark.parametrize("precision", sorted(PRECISION_TOLERANCE_HU))
def test_reduced_precision_stays_within_its_tolerance_of_fp32(precision, generator, anatomy):
    assert generator.precision == "fp32"
    expected, _ = generator.translate(anatomy[1])
    reduced, _ = dataclasses.replace(generator, precision=precision).translate(anatomy[1])
    difference = np.abs(reduced - expected)
    mean_limit, max_limit = PRECISION_TOLERANCE_HU[precision]
    assert difference.max() > 0.01, f"{precision} gave fp32's output: the network did not run in {precision}"
    assert difference.mean() <= mean_limit and difference.max() <= max_limit, (difference.mean(), difference.max())


def test_auto_precision_is_fp32_on_the_cpu(tiny_run):
    generator = load_generator(tiny_run.parent, tiny_run.name, precision="auto")
    assert generator.precision == "fp32" and generator.describe().endswith("on cpu in fp32")


def test_verbose_prints_the_time_of_each_stage(tmp_path, tiny_run, anatomy, capsys):
    assert run_use_model(tiny_run, anatomy[0], tmp_path / "out", "--verbose") == 0
    lines = capsys.readouterr().out.splitlines()
    (times,) = [line for line in lines if line.startswith("times: ")]
    stages = re.findall(r"(load model|read|network|write volume|write PNGs) (\d+\.\d\d) s", times)
    assert [stage for stage, _ in stages] == ["load model", "read", "network", "write volume", "write PNGs"]
    assert "side by side: " in times
    assert lines[-1].endswith("_phase0.nii.gz")


def test_the_inference_scripts_do_not_import_what_they_do_not_use():
    """Start-up pays for torch, nibabel and PIL, not for the pages, plots, metrics or export."""
    unused = ("dominate", "visdom", "skimage", "onnx", "onnxruntime", "onnxscript", "lpips", "matplotlib")
    code = (
        "import sys; import use_model, batch_process_patients; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({unused!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

