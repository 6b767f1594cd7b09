"""data/slice_cache.py's SlicePipeline: training and inference give the network the same inputs for the same volume.

A skew between the two sides raises no error. The model just sees, at inference, inputs it
was not trained on. So for every intensity mode, slice axis and 2.5D context these tests
build the training side (the slice cache and the data set's samples) and the inference side
(what :meth:`PhaseGenerator.translate` hands the generator), and hold them equal bit for bit.
The cache stores float16 and inference computes float32, so inference's inputs are rounded
to float16 before the comparison. That rounding is the only tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data import create_dataset
from data.intensity import INTENSITY_MODES
from data.robust_nifti_dataset import RobustNiftiDataset
from data.slice_cache import SliceSettings
from data.slicing import SLICE_AXES
from data.volume_io import new_volume_meta, read_volume, write_volume
from inference.volume import PhaseGenerator
from options.train_options import TrainOptions

# Canonical (X, Y, Z), every side different and none the network's size: at --resize_to 16,
# axial (20, 12) and coronal (20, 7) slices shrink along one side (antialiased) and grow
# along the other, and sagittal (12, 7) slices grow along both.
SHAPE = (20, 12, 7)
SIZE = 16
NAN_VOXEL = (3, 4, 2)  # in sagittal slice 3, coronal slice 4, axial slice 2
INF_VOXEL = (10, 9, 5)


def ct(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Integer HU, partly outside the fixed window (-1024..3071), with a NaN and a +Inf voxel."""
    volume = np.rint(np.random.default_rng(seed).uniform(-1500, 3500, size=shape)).astype(np.float32)
    volume[NAN_VOXEL], volume[INF_VOXEL] = np.nan, np.inf
    return volume


def write(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_volume(path, volume, new_volume_meta(np.diag([2.0, 2.0, 3.0, 1.0]), volume.shape), dtype="float32")


def training_options(root: Path, intensity: str, slice_axis: str, context_slices: int):
    return TrainOptions().parse([
        "--dataroot", str(root), "--netG", "resnet_6blocks", "--num_threads", "0", "--gpu_ids", "-1",
        "--no_flip", "--serial_batches", "--cache_dir", str(root / "cache"), "--resize_to", str(SIZE),
        "--intensity", intensity, "--slice_axis", slice_axis, "--context_slices", str(context_slices),
    ])  # fmt: skip


class RecordingGenerator(torch.nn.Module):
    """Stands in for the generator: keeps every batch inference feeds it, gives back the slice itself."""

    def __init__(self, context_slices: int):
        super().__init__()
        self.context_slices = context_slices
        self.inputs: list[torch.Tensor] = []

    def forward(self, real_A: torch.Tensor) -> torch.Tensor:
        self.inputs.append(real_A.clone())
        centre = self.context_slices
        return real_A[:, centre : centre + 1]  # (B, 1, S, S): channel K is the slice itself

    def fed(self) -> torch.Tensor:
        """(N, 1+2K, S, S): every input, in slice order."""
        return torch.cat(self.inputs)


def inference_inputs(opt, volume: np.ndarray) -> torch.Tensor:
    """What inference hands the generator for ``volume`` under ``opt``'s settings: (N, 1+2K, S, S)."""
    recorder = RecordingGenerator(opt.context_slices)
    generator = PhaseGenerator(net=recorder, settings=SliceSettings.from_options(opt),
                               context_slices=opt.context_slices, device=torch.device("cpu"))  # fmt: skip
    generator.translate(volume, batch_size=3)  # batches of 3: the last one is short on every axis
    return recorder.fed()


@pytest.mark.parametrize("context_slices", [0, 1])
@pytest.mark.parametrize("slice_axis", sorted(SLICE_AXES))
@pytest.mark.parametrize("intensity", INTENSITY_MODES)
def test_inference_feeds_the_network_what_training_serves(tmp_path, intensity, slice_axis, context_slices):
    source = write(tmp_path / "trainA" / "p.nii.gz", ct(0))
    write(tmp_path / "trainB" / "p.nii.gz", ct(1))
    opt = training_options(tmp_path, intensity, slice_axis, context_slices)
    dataset: RobustNiftiDataset = create_dataset(opt)
    volume, _ = read_volume(source)  # as use_model.py reads it
    fed = inference_inputs(opt, volume)

    n_slices = SHAPE[SLICE_AXES[slice_axis]]
    assert fed.dtype == torch.float32 and fed.shape == (n_slices, 1 + 2 * context_slices, SIZE, SIZE)
    as_stored = fed.half().numpy()  # inference's float32 inputs at the cache's precision

    # The cache entry: every slice, those with NaN/Inf (never samples, still neighbours) included.
    entry = dataset.report.pairs[0][0]
    np.testing.assert_array_equal(as_stored[:, context_slices], entry.open_slices(), err_msg="cached slices")

    # The samples training draws: each slice with its neighbours, edges repeated.
    assert len(dataset) == n_slices - 2  # the slices with the NaN and the +Inf voxel are left out
    for i in range(len(dataset)):
        sample = dataset[i]
        k = sample["slice_index"]
        assert sample["A"].dtype == torch.float16
        np.testing.assert_array_equal(as_stored[k], sample["A"].numpy(), err_msg=f"sample of slice {k}")


@pytest.mark.parametrize("slice_axis", sorted(SLICE_AXES))
@pytest.mark.parametrize("intensity", INTENSITY_MODES)
def test_the_way_back_gives_the_input_in_hu_on_its_grid(intensity, slice_axis):
    """A generator that returns its input gives back the input volume, inside the window,
    with NaN at the window's low end and +Inf at its high end."""
    settings = SliceSettings(slice_axis=slice_axis, resize_to=SIZE, intensity=intensity)
    cube = ct(2, shape=(SIZE, SIZE, SIZE))  # slices already at the network's size: nothing resized
    generator = PhaseGenerator(net=RecordingGenerator(0), settings=settings, context_slices=0,
                               device=torch.device("cpu"))  # fmt: skip
    output, window = generator.translate(cube, batch_size=5)
    lo, hi = window.lo_hu, window.hi_hu
    if intensity == "hu":
        assert (lo, hi) == (settings.hu_min, settings.hu_max)
    expected = np.clip(np.nan_to_num(cube, nan=lo, posinf=hi, neginf=lo), lo, hi)
    np.testing.assert_allclose(output, expected, rtol=0, atol=0.01)

    # On a grid the network's size does not fit, the output still lies on the input's grid.
    output, _ = generator.translate(ct(3), batch_size=5)
    assert output.shape == SHAPE and output.dtype == np.float32 and np.isfinite(output).all()
