"""--dataset_mode robust_nifti: paired, canonical, normalised slices served from the slice cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import data.slice_cache
from data import create_dataloader, create_dataset
from data.base_dataset import DatasetError
from data.intensity import HUWindow, network_to_pixels, pixels_to_network
from data.robust_nifti_dataset import RobustNiftiDataset
from data.slicing import resize_slices
from data.volume_io import new_volume_meta, write_volume
from options.train_options import TrainOptions

SHAPE = (16, 12, 6)  # canonical (X, Y, Z): all different, so a swapped axis shows
LPS = np.diag([-2.0, -2.0, 3.0, 1.0])  # DICOM-like storage: rows right -> left, columns anterior -> posterior


def ct(seed: int, shape=SHAPE) -> np.ndarray:
    """A canonical volume of integer HU with structure in every slice."""
    rng = np.random.default_rng(seed)
    return np.rint(rng.uniform(-1000, 1500, size=shape)).astype(np.float32)


def write(path: Path, volume: np.ndarray, affine: np.ndarray = LPS, dtype: str = "int16") -> Path:
    """Write a canonical volume stored with ``affine`` (a signed permutation times spacing)."""
    axes = np.argmax(np.abs(affine[:3, :3]), axis=0)  # world (= canonical) axis of each storage axis
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_volume(path, volume, new_volume_meta(affine, tuple(volume.shape[a] for a in axes)), dtype=dtype)


def make_root(root: Path, n_pairs: int = 2, suffix: str = ".nii.gz") -> Path:
    for i in range(n_pairs):
        write(root / "trainA" / f"p{i}{suffix}", ct(2 * i))
        write(root / "trainB" / f"p{i}{suffix}", ct(2 * i + 1))
    return root


def options(root: Path, *flags: str) -> object:
    return TrainOptions().parse([
        "--dataroot", str(root), "--netG", "resnet_6blocks", "--resize_to", "16", "--num_threads", "0",
        "--gpu_ids", "-1", "--no_flip", "--serial_batches", "--cache_dir", str(root / "cache"), *flags,
    ])  # fmt: skip


def dataset(root: Path, *flags: str) -> RobustNiftiDataset:
    return create_dataset(options(root, *flags))


def as_hu(sample: torch.Tensor, window: HUWindow) -> np.ndarray:
    return window.inverse(network_to_pixels(sample.float().numpy()))


# -- pairing -------------------------------------------------------------------------------
def test_pairs_by_file_name_and_serves_every_slice(tmp_path):
    root = make_root(tmp_path, n_pairs=2)
    write(root / "trainA" / "plain.nii", ct(10))
    write(root / "trainB" / "plain.nii", ct(11))
    ds = dataset(root)
    assert [Path(a.source).name for a, _ in ds.report.pairs] == ["p0.nii.gz", "p1.nii.gz", "plain.nii"]
    assert len(ds) == 3 * SHAPE[2]
    item = ds[0]
    assert item["A"].shape == item["B"].shape == (1, 16, 16)
    assert item["A_paths"].endswith("trainA/p0.nii.gz") and item["B_paths"].endswith("trainB/p0.nii.gz")
    assert item["patient"] == "p0" and item["slice_index"] == 0


def test_start_report_counts_pairs_slices_and_skips(tmp_path):
    root = make_root(tmp_path, n_pairs=2)
    line = dataset(root).summary_lines()[0]
    assert line.startswith(f"2 volume pairs, {2 * SHAPE[2]} valid slices, 0 skipped")


def test_unpaired_files_are_listed_not_silently_dropped(tmp_path, caplog):
    root = make_root(tmp_path, n_pairs=2)
    write(root / "trainA" / "only_a.nii.gz", ct(5))
    write(root / "trainB" / "only_b.nii", ct(6))
    with caplog.at_level(logging.WARNING):
        ds = dataset(root)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "only_a.nii.gz" in warning and "only_b.nii" in warning
    assert len(ds.report.pairs) == 2
    assert any("only_a.nii.gz" in line and "only_b.nii" in line for line in ds.summary_lines())


def test_same_stem_with_another_suffix_is_not_a_partner(tmp_path, caplog):
    root = make_root(tmp_path, n_pairs=1)
    write(root / "trainA" / "x.nii", ct(5))
    write(root / "trainB" / "x.nii.gz", ct(6))
    with caplog.at_level(logging.WARNING):
        ds = dataset(root)
    assert len(ds.report.pairs) == 1 and "x.nii" in caplog.text


# -- geometry: canonical slices whatever the storage order --------------------------------
STORAGE_ORDERS = {
    "LPS": LPS,
    "RAS": np.diag([2.0, 2.0, 3.0, 1.0]),
    "axial slices first (S, L, P)": np.array([[0, -2.0, 0, 0], [0, 0, -2.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]]),
    "sagittal stack (P, I, R)": np.array([[0, 0, 2.0, 0], [-2.0, 0, 0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("order", sorted(STORAGE_ORDERS))
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slices_are_anatomical_whatever_the_storage_order(tmp_path, order, axis):
    volume_a, volume_b = ct(1), ct(2)
    write(tmp_path / "trainA" / "p.nii.gz", volume_a, STORAGE_ORDERS[order])
    write(tmp_path / "trainB" / "p.nii.gz", volume_b, STORAGE_ORDERS[order])
    axis_index = {"sagittal": 0, "coronal": 1, "axial": 2}[axis]
    ds = dataset(tmp_path, "--slice_axis", axis, "--intensity", "hu", "--resize_to", "16")
    assert len(ds) == SHAPE[axis_index]

    k = 3
    # The true anatomical slice, windowed and resized the way the dataset does it.
    truth = np.take(volume_a, k, axis=axis_index)[None]  # (1, H, W) in HU
    expected = pixels_to_network(resize_slices(HUWindow(-1024, 3071)(truth), (16, 16)).numpy())
    np.testing.assert_allclose(ds[k]["A"].float().numpy(), expected, atol=1e-3)


def test_axial_slice_flag_means_axial(tmp_path):
    root = make_root(tmp_path, n_pairs=1)
    assert len(dataset(root, "--slice_axis", "sagittal", "--axial_slice")) == SHAPE[2]


def test_slices_are_resized(tmp_path):
    root = make_root(tmp_path, n_pairs=1)
    assert dataset(root, "--resize_to", "32")[0]["A"].shape == (1, 32, 32)


# -- intensities ---------------------------------------------------------------------------
def test_volume_window_fills_the_range_per_volume(tmp_path):
    volume = ct(0, shape=(16, 16, 6))  # square slices: no resizing
    write(tmp_path / "trainA" / "p.nii.gz", volume)
    write(tmp_path / "trainB" / "p.nii.gz", volume + 100)
    ds = dataset(tmp_path)
    for side in "AB":
        values = torch.stack([ds[i][side] for i in range(len(ds))]).float()
        assert values.min() == -1 and values.max() == 1  # each volume's own min and max
    assert ds.report.pairs[0][1].window == HUWindow(float(volume.min()) + 100, float(volume.max()) + 100)


def test_hu_window_is_fixed_and_inverts_to_hu(tmp_path):
    volume = ct(3, shape=(16, 16, 6))  # square slices: no resizing
    write(tmp_path / "trainA" / "p.nii.gz", volume)
    write(tmp_path / "trainB" / "p.nii.gz", volume + 100)
    ds = dataset(tmp_path, "--intensity", "hu", "--hu_min", "-1024", "--hu_max", "3071")
    window = HUWindow(-1024, 3071)
    assert ds.report.pairs[0][0].window == window == ds.report.pairs[0][1].window
    for k in range(SHAPE[2]):
        # float16 in [-1, 1] holds the 4095 HU window to within half a HU
        np.testing.assert_allclose(as_hu(ds[k]["A"], window)[0], volume[:, :, k], atol=0.5)
        np.testing.assert_allclose(as_hu(ds[k]["B"], window)[0], volume[:, :, k] + 100, atol=0.5)


def test_hu_window_and_its_inverse_round_trip():
    window = HUWindow(-1024, 3071)
    hu = np.arange(-1024, 3072, dtype=np.float32)
    np.testing.assert_allclose(window.inverse(window(hu)), hu, atol=1e-3)
    assert window(np.array([-3000.0, 5000.0])).tolist() == [0.0, 255.0]  # clipped outside the window
    with pytest.raises(ValueError, match="lo_hu < hi_hu"):
        HUWindow(100, 100)


# -- samples -------------------------------------------------------------------------------
def test_blank_and_non_finite_slices_are_skipped(tmp_path, caplog):
    volume = ct(4)
    volume[:, :, 1] = -1000  # blank: constant air
    volume[3, 3, 4] = np.nan
    write(tmp_path / "trainA" / "p.nii.gz", volume, dtype="float32")
    write(tmp_path / "trainB" / "p.nii.gz", ct(5), dtype="float32")
    ds = dataset(tmp_path)
    assert [ds[i]["slice_index"] for i in range(len(ds))] == [0, 2, 3, 5]
    assert ds.summary_lines()[0].startswith("1 volume pairs, 4 valid slices, 0 skipped files, 2 skipped slices")
    assert all(torch.isfinite(ds[i]["A"].float()).all() for i in range(len(ds)))


@pytest.mark.parametrize("context", [1, 2])
def test_context_slices_are_neighbours_with_edges_repeated(tmp_path, context):
    volume = np.repeat(np.arange(SHAPE[2], dtype=np.float32)[None, None, :] * 100, 16, 0).repeat(16, 1)
    volume[0, 0, :] = 3000  # keep slices non-constant
    write(tmp_path / "trainA" / "p.nii.gz", volume)
    write(tmp_path / "trainB" / "p.nii.gz", volume)
    opt = options(tmp_path, "--context_slices", str(context), "--intensity", "hu")
    assert opt.input_nc == 1 + 2 * context
    ds = create_dataset(opt)
    window = HUWindow(-1024, 3071)
    for k in (0, 2, SHAPE[2] - 1):
        item = ds[k]
        assert item["A"].shape == (1 + 2 * context, 16, 16) and item["B"].shape == (1, 16, 16)
        neighbours = np.clip(np.arange(k - context, k + context + 1), 0, SHAPE[2] - 1)
        np.testing.assert_allclose(as_hu(item["A"], window)[:, 5, 5], neighbours * 100, atol=0.5)


@pytest.mark.parametrize("context", [0, 1])
def test_flips_a_and_b_together(tmp_path, context):
    volume = ct(6)
    write(tmp_path / "trainA" / "p.nii.gz", volume)
    write(tmp_path / "trainB" / "p.nii.gz", volume)
    opt = TrainOptions().parse([
        "--dataroot", str(tmp_path), "--netG", "resnet_6blocks", "--resize_to", "16", "--gpu_ids", "-1",
        "--cache_dir", str(tmp_path / "cache"), "--context_slices", str(context),
    ])  # fmt: skip
    ds = create_dataset(opt)
    unflipped = ds.report.pairs[0][0].open_slices()
    flips = 0
    for _ in range(8):
        for k in range(SHAPE[2]):
            item = ds[k]
            centre = item["A"][context].numpy()  # the slice itself, between its neighbours
            assert np.array_equal(centre, item["B"][0].numpy())
            flipped = not np.array_equal(centre, unflipped[k])
            assert not flipped or np.array_equal(centre, unflipped[k][:, ::-1])
            neighbours = np.clip(np.arange(k - context, k + context + 1), 0, SHAPE[2] - 1)
            expected = unflipped[neighbours][..., ::-1] if flipped else unflipped[neighbours]
            assert np.array_equal(item["A"].numpy(), expected)  # neighbours flipped with it
            flips += flipped
    assert 0 < flips < 8 * SHAPE[2]


def test_a_plain_dataloader_gives_the_same_batches(tmp_path):
    root = make_root(tmp_path, n_pairs=2)
    ds = dataset(root)
    ours = list(create_dataloader(ds, options(root, "--batch_size", "4")))  # with the dataset's collate_fn
    plain = list(torch.utils.data.DataLoader(ds, batch_size=4))  # torch's default_collate
    assert len(ours) == len(plain) == -(-len(ds) // 4)
    for mine, theirs in zip(ours, plain):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]) if key in ("A", "B", "slice_index") else mine[key] == theirs[key]


def test_a_batch_holds_the_same_samples_as_single_items(tmp_path):
    root = make_root(tmp_path, n_pairs=2)
    ds = dataset(root, "--context_slices", "1")
    indices = [0, 5, 7, 11]
    batch = ds.collate_fn(ds.__getitems__(indices))  # what the DataLoader does per batch
    assert isinstance(batch["A_paths"], list) and len(batch["A_paths"]) == 4
    assert batch["A"].shape == (4, 3, 16, 16) and batch["B"].shape == (4, 1, 16, 16)
    assert batch["slice_index"].dtype == torch.int64
    for i, index in enumerate(indices):
        item = ds[index]
        assert torch.equal(batch["A"][i], item["A"]) and torch.equal(batch["B"][i], item["B"])
        for key in ("A_paths", "B_paths", "patient", "slice_index"):
            assert batch[key][i] == item[key]


def test_direction_b_to_a_swaps_the_sides(tmp_path):
    root = make_root(tmp_path, n_pairs=1)
    forward, backward = dataset(root)[2], dataset(root, "--direction", "BtoA")[2]
    assert torch.equal(forward["A"], backward["B"]) and torch.equal(forward["B"], backward["A"])


def test_max_dataset_size(tmp_path):
    root = make_root(tmp_path, n_pairs=2)
    assert len(dataset(root, "--max_dataset_size", "5")) == 5


def test_samples_are_float16_for_the_model_to_cast(tmp_path):
    root = make_root(tmp_path, n_pairs=1)
    item = dataset(root)[0]
    assert item["A"].dtype == item["B"].dtype == torch.float16


# -- the cache: decoded once, workers read the cache only ----------------------------------
@pytest.fixture
def count_reads(monkeypatch):
    reads = []
    original = data.slice_cache.read_volume

    def counting(path, *args, **kwargs):
        reads.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(data.slice_cache, "read_volume", counting)
    return reads


def test_each_volume_is_decoded_once_and_later_runs_decode_none(tmp_path, count_reads):
    root = make_root(tmp_path, n_pairs=2)
    first = dataset(root)
    [first[i] for i in range(len(first))]
    assert sorted(count_reads) == ["p0.nii.gz", "p0.nii.gz", "p1.nii.gz", "p1.nii.gz"]  # one A, one B each
    count_reads.clear()
    second = dataset(root)
    assert count_reads == [] and second.report.built == 0
    assert "0 volumes decoded" in second.summary_lines()[0]


def test_workers_read_slices_without_touching_nifti_files(tmp_path, monkeypatch):
    root = make_root(tmp_path, n_pairs=2)
    opt = options(root, "--num_threads", "2", "--batch_size", "4")
    reference = torch.cat([batch["A"] for batch in create_dataloader(create_dataset(opt), options(root))])

    def no_decoding(path, *args, **kwargs):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(data.slice_cache, "read_volume", no_decoding)  # forked workers inherit it
    ds = create_dataset(opt)
    batches = list(create_dataloader(ds, opt))
    assert len(batches) == -(-len(ds) // 4)
    assert torch.equal(torch.cat([b["A"] for b in batches]), reference)


def test_no_cache_uses_a_temporary_folder(tmp_path, count_reads):
    root = make_root(tmp_path, n_pairs=1)
    ds = dataset(root, "--no_cache")
    assert not (root / "cache").exists()
    assert ds.report.pairs[0][0].folder.exists() and len(count_reads) == 2
    assert len(dataset(root, "--no_cache")) == len(ds) and len(count_reads) == 4


def test_no_usable_pair_is_an_error(tmp_path):
    write(tmp_path / "trainA" / "p.nii.gz", np.full(SHAPE, 5.0, dtype=np.float32))
    write(tmp_path / "trainB" / "p.nii.gz", ct(1))
    with pytest.raises(DatasetError, match="no usable volume pair"):
        dataset(tmp_path, "--skip_corrupted")


def test_opening_the_dataset_prunes_entries_of_changed_or_deleted_files(tmp_path, caplog):
    root = make_root(tmp_path, n_pairs=2)
    first = dataset(root)
    stale = {entry.folder for entry in first.report.pairs[1]}
    (root / "trainA" / "p1.nii.gz").unlink()  # p1's pair goes: both its entries are stale
    (root / "trainB" / "p1.nii.gz").unlink()
    with caplog.at_level(logging.INFO):
        second = dataset(root)
    assert len(second.report.pairs) == 1
    cached = {path for path in (root / "cache").iterdir()}
    assert cached == {entry.folder for entry in second.report.pairs[0]} and not stale & cached
    assert "pruned 2 stale entries" in caplog.text


def test_identities_are_read_once_per_volume_when_opening(tmp_path, monkeypatch):
    root = make_root(tmp_path, n_pairs=2)
    dataset(root)
    looked_up = []
    original = data.slice_cache.source_identity

    def counting(path):
        looked_up.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(data.slice_cache, "source_identity", counting)
    dataset(root)  # warm: prunes nothing, decodes nothing
    assert sorted(looked_up) == ["p0.nii.gz", "p0.nii.gz", "p1.nii.gz", "p1.nii.gz"]  # one A, one B each
