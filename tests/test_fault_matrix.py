"""What robust_nifti does with each kind of broken input.

With ``--skip_corrupted`` a broken file is skipped with a warning that names it and says why,
and the run goes on; without it, the first one stops the run before training with one
:class:`DatasetError` whose message names the file. Some inputs are not errors at all
(misregistered affines, unpaired files, stray non-NIfTI files) and some always are (an
empty folder).
"""

from __future__ import annotations

import builtins
import errno
import gzip
import logging
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch.utils.data

import data.slice_cache
import data.volume_io
from data import create_dataset
from data.base_dataset import CacheError, DatasetError
from data.volume_io import new_volume_meta, write_volume
from options.train_options import TrainOptions
from tests.conftest import TINY_TRAIN_FLAGS, run_script

SHAPE = (16, 16, 6)
AFFINE = np.diag([-2.0, -2.0, 3.0, 1.0])
GOOD_SLICES = 2 * SHAPE[2]  # the two good pairs every case starts from


def ct(seed: int, shape=SHAPE) -> np.ndarray:
    return np.rint(np.random.default_rng(seed).uniform(-1000, 1500, size=shape)).astype(np.float32)


def write(path: Path, volume: np.ndarray, affine: np.ndarray = AFFINE, dtype: str = "int16") -> Path:
    return write_volume(path, volume, new_volume_meta(affine, volume.shape), dtype=dtype)


def nifti_bytes(volume: np.ndarray) -> bytes:
    return nib.Nifti1Image(volume.astype(np.int16), AFFINE).to_bytes()


@pytest.fixture
def root(tmp_path) -> Path:
    """trainA/ and trainB/ with two good pairs, good_1 and good_2."""
    for side in "AB":
        (tmp_path / f"train{side}").mkdir()
    for i in (1, 2):
        write(tmp_path / "trainA" / f"good_{i}.nii.gz", ct(10 * i))
        write(tmp_path / "trainB" / f"good_{i}.nii.gz", ct(10 * i + 1))
    return tmp_path


def load(root: Path, skip: bool):
    flags = [
        "--dataroot", str(root), "--netG", "resnet_6blocks", "--resize_to", "16", "--num_threads", "0",
        "--gpu_ids", "-1", "--cache_dir", str(root / "cache"),
    ]  # fmt: skip
    return create_dataset(TrainOptions().parse(flags + (["--skip_corrupted"] if skip else [])))


# -- broken files: each writes trainA/bad.<suffix> (and a good partner in trainB/) ---------
def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def truncated_gz(path: Path) -> None:
    blob = gzip.compress(nifti_bytes(ct(1)))
    path.write_bytes(blob[: len(blob) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(3000))


def header_claims_more_voxels(path: Path) -> None:
    raw = bytearray(nifti_bytes(ct(1)))
    struct.pack_into("<h", raw, 46, 600)  # dim[3]: 6 -> 600 slices, data for 6
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))


def header_claims_2_to_the_31_voxels(path: Path) -> None:
    raw = bytearray(nifti_bytes(ct(1)))
    struct.pack_into("<hhh", raw, 42, 2048, 2048, 512)  # 4 GiB of int16 claimed by a 3 KB file
    path.write_bytes(gzip.compress(bytes(raw)))


def text_file(path: Path) -> None:
    path.write_text("patient: 7\nphase: 0\n" * 50)


def image_2d(path: Path) -> None:
    nib.save(nib.Nifti1Image(ct(1)[:, :, 0].astype(np.int16), AFFINE), path)


def image_4d(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.stack([ct(1), ct(2), ct(3)], axis=-1).astype(np.int16), AFFINE), path)


def all_nan(path: Path) -> None:
    write(path, np.full(SHAPE, np.nan, np.float32), dtype="float32")


def all_inf(path: Path) -> None:
    volume = np.full(SHAPE, np.inf, np.float32)
    volume[::2] = -np.inf
    write(path, volume, dtype="float32")


def constant(path: Path) -> None:
    write(path, np.full(SHAPE, -1000.0, np.float32))


def other_shape(path: Path) -> None:
    write(path, ct(1, shape=(16, 16, 8)))


# (writer, suffix, side that is broken, words the reason must contain)
BROKEN = {
    "zero-byte file": (zero_bytes, ".nii.gz", "A", "empty"),
    "truncated .nii.gz": (truncated_gz, ".nii.gz", "A", ""),
    "random bytes named .nii.gz": (random_bytes, ".nii.gz", "A", "cannot be read as NIfTI"),
    "header claims more voxels (.nii)": (header_claims_more_voxels, ".nii", "A", "claims"),
    "header claims more voxels (.nii.gz)": (header_claims_more_voxels, ".nii.gz", "A", "claims"),
    "header claims 2**31 voxels (.nii.gz)": (header_claims_2_to_the_31_voxels, ".nii.gz", "A", "claims"),
    "text file named .nii": (text_file, ".nii", "A", "cannot be read as NIfTI"),
    "2D image": (image_2d, ".nii.gz", "A", "2D"),
    "4D image with several frames": (image_4d, ".nii.gz", "A", "4D with 3 frames"),
    "all voxels NaN": (all_nan, ".nii.gz", "A", "no finite voxels"),
    "all voxels +-Inf": (all_inf, ".nii.gz", "A", "no finite voxels"),
    "constant volume": (constant, ".nii.gz", "A", "constant"),
    "A and B of different shapes": (other_shape, ".nii.gz", "B", "grid"),
}


def make_broken(root: Path, case: str) -> Path:
    writer, suffix, side, _ = BROKEN[case]
    partner = "B" if side == "A" else "A"
    write(root / f"train{partner}" / f"bad{suffix}", ct(5))
    writer(root / f"train{side}" / f"bad{suffix}")
    return root / f"train{side}" / f"bad{suffix}"


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_is_skipped_with_a_warning_naming_it(root, case, caplog):
    broken = make_broken(root, case)
    with caplog.at_level(logging.WARNING):
        ds = load(root, skip=True)
    assert len(ds.report.pairs) == 2 and len(ds) == GOOD_SLICES  # the run goes on with the rest
    (warning,) = [r.getMessage() for r in caplog.records if str(broken) in r.getMessage()]
    assert BROKEN[case][3] in warning
    assert [path for path, _ in ds.report.skipped] == [broken]
    assert ds.summary_lines()[0].startswith(f"2 volume pairs, {GOOD_SLICES} valid slices, 1 skipped")
    assert any(str(broken) in line for line in ds.summary_lines()[1:])


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_stops_the_run_naming_it(root, case):
    broken = make_broken(root, case)
    with pytest.raises(DatasetError) as caught:
        load(root, skip=False)
    message = str(caught.value)
    assert message.startswith(str(broken)) and BROKEN[case][3] in message
    assert "--skip_corrupted" in message and "\n" not in message


def test_unreadable_file(root, monkeypatch):
    """A file without read permission. Root reads anything, so there the denial is simulated."""
    bad = write(root / "trainA" / "locked.nii.gz", ct(5))
    write(root / "trainB" / "locked.nii.gz", ct(6))
    bad.chmod(0)
    try:
        if os.access(bad, os.R_OK):  # running as root: permissions are not enforced

            def denying_open(file, *args, **kwargs):
                if Path(file) == bad:
                    raise PermissionError(13, "Permission denied", str(file))
                return builtins.open(file, *args, **kwargs)

            monkeypatch.setattr(data.volume_io, "open", denying_open, raising=False)
        with pytest.raises(DatasetError, match=r"locked\.nii\.gz: cannot be opened \(Permission denied\)"):
            load(root, skip=False)
        ds = load(root, skip=True)
        assert [path for path, _ in ds.report.skipped] == [bad] and len(ds) == GOOD_SLICES
    finally:
        bad.chmod(0o644)


@pytest.mark.parametrize("skip", [True, False])
def test_a_volume_too_large_for_free_memory_is_a_broken_file(root, monkeypatch, skip):
    big = write(root / "trainA" / "big.nii.gz", ct(5, shape=(32, 32, 6)))
    write(root / "trainB" / "big.nii.gz", ct(6, shape=(32, 32, 6)))
    # Room for the 16 x 16 x 6 volumes (9 KB to decode), not for this one (37 KB).
    monkeypatch.setattr(data.volume_io, "AVAILABLE_MEMORY_BYTES", 20_000)
    if skip:
        ds = load(root, skip=True)
        assert [path for path, _ in ds.report.skipped] == [big] and len(ds) == GOOD_SLICES
    else:
        with pytest.raises(
            DatasetError, match=rf"^{big}: header claims shape \(32, 32, 6\) of int16 voxels: decoding "
        ):
            load(root, skip=False)


# -- the cache under faults: never a file's problem, so --skip_corrupted does not skip them ----
@pytest.mark.parametrize("skip", [True, False])
def test_a_full_disk_stops_the_run_with_one_line_naming_the_cache(root, monkeypatch, skip):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data.slice_cache, "_reserve_space", disk_full)  # the disk has no room for an entry
    with pytest.raises(CacheError) as caught:
        load(root, skip=skip)
    message = str(caught.value)
    assert message.startswith(f"{root / 'cache'}: no space left on device while caching {root}")
    assert message.endswith("; free space or point --cache_dir elsewhere") and "\n" not in message
    assert list((root / "cache").iterdir()) == []  # no partial entry left behind


def test_a_cache_removed_while_training_reads_it_stops_with_one_clear_error(root):
    ds = load(root, skip=False)
    shutil.rmtree(root / "cache")  # rm -rf ./cache while the run goes on
    with pytest.raises(CacheError, match=r"slices\.npy: not found: the slice cache was removed while this run was "):
        ds[0]
    again = load(root, skip=False)  # the next run rebuilds it
    assert len(again) == GOOD_SLICES and again.report.built == 4


@pytest.mark.slow  # its DataLoader worker takes ~5 s to shut down afterwards
def test_a_cache_removed_under_dataloader_workers_is_still_one_line(root):
    ds = load(root, skip=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=ds.collate_fn)
    shutil.rmtree(root / "cache")
    with pytest.raises(CacheError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(root / "cache"))
    assert message.endswith("removed while this run was reading it; run again to rebuild it")


# -- inputs that are not errors --------------------------------------------------------------
@pytest.mark.parametrize("skip", [True, False])
def test_nan_or_inf_slices_are_skipped_not_the_file(root, skip):
    volume = ct(5)
    volume[2, 3, 1] = np.nan
    volume[:, :, 4] = np.inf
    write(root / "trainA" / "holes.nii.gz", volume, dtype="float32")
    write(root / "trainB" / "holes.nii.gz", ct(6))
    ds = load(root, skip=skip)
    assert len(ds.report.pairs) == 3 and len(ds) == GOOD_SLICES + SHAPE[2] - 2
    assert {ds[i]["slice_index"] for i in range(len(ds)) if ds[i]["patient"] == "holes"} == {0, 2, 3, 5}
    assert "2 skipped slices" in ds.summary_lines()[0]


@pytest.mark.parametrize("skip", [True, False])
def test_disagreeing_affines_warn_of_misregistration_and_keep_the_pair(root, skip, caplog):
    write(root / "trainA" / "shifted.nii.gz", ct(5))
    shifted = AFFINE.copy()
    shifted[:3, 3] = [10.0, 0, 0]  # 10 mm to the right
    write(root / "trainB" / "shifted.nii.gz", ct(6), affine=shifted)
    with caplog.at_level(logging.WARNING):
        ds = load(root, skip=skip)
    assert len(ds.report.pairs) == 3 and ds.report.skipped == []
    (warning,) = [r.getMessage() for r in caplog.records if "shifted.nii.gz" in r.getMessage()]
    assert "misregistered" in warning and "10 mm" in warning


@pytest.mark.parametrize("skip", [True, False])
def test_a_file_on_one_side_only_is_listed(root, skip, caplog):
    write(root / "trainB" / "lonely.nii.gz", ct(5))
    with caplog.at_level(logging.WARNING):
        ds = load(root, skip=skip)
    assert len(ds.report.pairs) == 2
    assert "lonely.nii.gz" in caplog.text and any("lonely.nii.gz" in line for line in ds.summary_lines())


@pytest.mark.parametrize("skip", [True, False])
def test_non_nifti_files_are_ignored(root, skip, caplog):
    for name in ("README.txt", ".DS_Store", "notes.json", "scan.mha"):
        (root / "trainA" / name).write_text("not an image")
    (root / "trainB" / "subfolder").mkdir()
    with caplog.at_level(logging.WARNING):
        ds = load(root, skip=skip)
    assert len(ds.report.pairs) == 2 and caplog.records == []


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("emptied", ["trainA", "trainB"])
def test_an_empty_folder_is_a_clear_error(root, skip, emptied):
    for path in (root / emptied).iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=rf"{emptied}: no \.nii or \.nii\.gz files"):
        load(root, skip=skip)


def test_a_missing_folder_is_a_clear_error(root):
    (root / "trainB" / "good_1.nii.gz").unlink()
    (root / "trainB" / "good_2.nii.gz").unlink()
    (root / "trainB").rmdir()
    with pytest.raises(DatasetError, match="trainB: folder not found"):
        load(root, skip=True)


# -- end to end: train.py ---------------------------------------------------------------------
def train(root: Path, *flags: str):
    tiny = [flag for flag in TINY_TRAIN_FLAGS if flag != "--skip_corrupted"]
    return run_script(
        "train.py", *tiny, "--dataroot", root, "--name", "run", "--checkpoints_dir", root / "checkpoints",
        "--log_dir", root / "logs", "--cache_dir", root / "cache", "--n_epochs", "1", "--n_epochs_decay", "0",
        "--max_dataset_size", "4", *flags, cwd=root, timeout=300,
    )  # fmt: skip


@pytest.fixture
def root_with_corrupt_file(root) -> tuple[Path, Path]:
    bad = root / "trainA" / "corrupt.nii.gz"
    truncated_gz(bad)
    write(root / "trainB" / "corrupt.nii.gz", ct(5))
    return root, bad


@pytest.mark.slow
def test_train_stops_with_one_line_naming_the_corrupt_file(root_with_corrupt_file):
    root, bad = root_with_corrupt_file
    done = train(root)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and lines[0].startswith("train.py: error:"), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (root / "checkpoints" / "run" / "latest_net_G.pth").exists()


@pytest.mark.slow
def test_train_skips_the_corrupt_file_and_trains(root_with_corrupt_file):
    root, bad = root_with_corrupt_file
    done = train(root, "--skip_corrupted")
    assert done.returncode == 0, done.stderr
    assert str(bad) in done.stdout  # the warning and the start report name it
    assert (root / "checkpoints" / "run" / "latest_net_G.pth").is_file()
