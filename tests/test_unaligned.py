"""--dataset_mode unaligned_nifti and single_nifti: robust_nifti's loading and faults, without pairs.

Unaligned: A's and B's slices are drawn independently (other counts, other names, other grids
allowed), the data set is as long as the larger side, an item's B slice depends on the seed
alone, and a broken file is refused or skipped exactly as robust_nifti refuses or skips it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from data import create_dataset
from data.base_dataset import DatasetError
from data.volume_io import new_volume_meta, read_volume, write_volume
from options.test_options import TestOptions
from options.train_options import TrainOptions

FLAGS = ["--netG", "resnet_6blocks", "--resize_to", "32", "--num_threads", "0", "--gpu_ids", "-1",
         "--display_id", "0", "--intensity", "hu", "--model", "cycle_gan"]


@pytest.fixture
def unpaired_root(tmp_path, phantom_root) -> Path:
    """trainA: the phantom's 3 averages; trainB: one phase-0 volume under another name, on a smaller grid."""
    root = tmp_path / "data"
    shutil.copytree(phantom_root / "trainA", root / "trainA")
    (root / "trainB").mkdir()
    volume, meta = read_volume(phantom_root / "trainB" / "patient_2.nii.gz")
    cropped = volume[4:-4, 4:-4, 2:-2]  # another grid than any A volume: never registered to them
    write_volume(root / "trainB" / "other_patient.nii.gz", cropped,
                 new_volume_meta(affine=meta.affine, shape=cropped.shape), dtype="int16")
    return root


def dataset(root: Path, tmp_path: Path, *flags: str):
    opt = TrainOptions().parse([*FLAGS, "--dataroot", str(root), "--checkpoints_dir", str(tmp_path / "ck"),
                                "--cache_dir", str(tmp_path / "cache"), *flags])
    return create_dataset(opt)


def test_sides_are_drawn_independently_without_names_counts_or_grids_in_common(unpaired_root, tmp_path):
    data = dataset(unpaired_root, tmp_path)
    n_a, n_b = len(data.samples["A"]), len(data.samples["B"])
    assert (len(data.reports["A"].volumes), len(data.reports["B"].volumes)) == (3, 1)
    assert n_a > n_b > 0 and len(data) == n_a  # as long as the larger side
    items = [data[i] for i in range(len(data))]
    assert {Path(item["B_paths"]).name for item in items} == {"other_patient.nii.gz"}
    assert {Path(item["A_paths"]).name for item in items} == {"patient_1.nii.gz", "patient_2.nii.gz", "patient_3.nii.gz"}
    assert sorted({item["B_slice_index"] for item in items}) == [k for _, k in data.samples["B"]]  # every B slice
    assert all(item["A"].shape == item["B"].shape == (1, 32, 32) for item in items)


def test_an_items_b_slice_depends_on_the_seed_alone(unpaired_root, tmp_path):
    first, again = dataset(unpaired_root, tmp_path), dataset(unpaired_root, tmp_path)
    other_seed = dataset(unpaired_root, tmp_path, "--seed", "7")
    serial = dataset(unpaired_root, tmp_path, "--serial_batches")
    assert first.order_b == again.order_b != other_seed.order_b
    assert serial.order_b == sorted(serial.order_b)
    batch = first.__getitems__([(0, True), (5, False)]).batch
    assert np.array_equal(batch["B"].numpy(), again.__getitems__([(0, True), (5, False)]).batch["B"].numpy())


def test_btoa_swaps_the_folders(unpaired_root, tmp_path):
    data = dataset(unpaired_root, tmp_path, "--direction", "BtoA")
    assert Path(data[0]["A_paths"]).name == "other_patient.nii.gz"


def test_a_broken_file_is_refused_or_skipped_as_robust_nifti_does(unpaired_root, tmp_path):
    broken = unpaired_root / "trainB" / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    with pytest.raises(DatasetError, match=r"broken\.nii\.gz: .*pass --skip_corrupted"):
        dataset(unpaired_root, tmp_path)
    data = dataset(unpaired_root, tmp_path, "--skip_corrupted")
    assert [path.name for path, _ in data.reports["B"].skipped] == ["broken.nii.gz"]
    assert any("skipped" in line and "broken.nii.gz" in line for line in data.summary_lines())


def test_an_empty_side_stops_with_one_line_naming_the_folder(unpaired_root, tmp_path):
    for path in (unpaired_root / "trainB").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"trainB: holds no \.nii"):
        dataset(unpaired_root, tmp_path)


def test_single_nifti_serves_the_slices_of_the_folder_itself(phantom_root, tmp_path):
    opt = TestOptions().parse(["--model", "test", "--dataroot", str(phantom_root / "testA"), "--resize_to", "32",
                               "--netG", "resnet_6blocks", "--gpu_ids", "-1", "--cache_dir", str(tmp_path / "cache"),
                               "--checkpoints_dir", str(tmp_path)])
    data = create_dataset(opt)
    assert {Path(data[i]["A_paths"]).name for i in range(len(data))} == {"patient_1.nii.gz", "patient_2.nii.gz"}
    assert "B" not in data[0]
