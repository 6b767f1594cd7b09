"""Volume in, volume out: the one inference function behind use_model.py, batch_process_patients.py and test.py.

A trained run folder (``<checkpoints_dir>/<name>/``) describes itself: ``train_opt.json``
says which generator, norm, channels, slice axis, size and intensity window the model was
trained with, so :func:`load_generator` rebuilds it from the folder alone.

:meth:`PhaseGenerator.translate` takes a canonical (X, Y, Z) volume in HU, cuts it into
slices along the training slice axis, normalises them exactly as training did, resizes
them to the model's size, runs the generator in batches, resizes back, maps the output to
HU and reassembles the volume on the input's grid. Intensities go back to HU through the
inverse of the window: exact (inside the window) with ``--intensity hu``; with
``--intensity volume`` the *input's* min..max window is inverted, an approximation where
the target's range differs from the input's.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.intensity import HUWindow, network_to_pixels, pixels_to_network, window_for
from data.slice_cache import SliceSettings
from data.slicing import context_indices, resize_slices, slice_for_display, slices_to_volume, volume_to_slices
from data.volume_io import VolumeError, read_volume, strip_nifti_suffix, write_volume
from models.base_model import CheckpointError, load_state_dict_file
from models.networks import define_G
from options.base_options import load_saved_options
from util.image import save_png

logger = logging.getLogger(__name__)


@dataclass
class PhaseGenerator:
    """A trained generator and the slice settings it was trained with.

    Attributes:
        net: the generator, in eval mode, on ``device``.
        settings: slice axis, size and intensity window of training.
        context_slices: K neighbours on each side fed as extra channels.
        device: where ``net`` runs.
    """

    net: torch.nn.Module
    settings: SliceSettings
    context_slices: int
    device: torch.device

    @torch.no_grad()
    def translate(self, volume: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, HUWindow]:
        """Generate the phase volume for one input volume.

        Args:
            volume: canonical (X, Y, Z) array in HU (``read_volume``'s output).
            batch_size: slices per forward pass.

        Returns:
            ``(output, window)``: the generated (X, Y, Z) float32 volume in HU on the same
            grid, and the intensity window used for the input.

        Raises:
            ValueError: the volume has no finite voxels, or (``--intensity volume``) is constant.
        """
        window = window_for(volume, self.settings.intensity, self.settings.hu_min, self.settings.hu_max)
        raw = volume_to_slices(volume, self.settings.slice_axis)  # (N, H, W) in HU
        n_slices, height, width = raw.shape
        size = (self.settings.resize_to, self.settings.resize_to)
        pixels = window(np.nan_to_num(raw, nan=window.lo_hu, posinf=window.hi_hu, neginf=window.lo_hu))
        inputs = torch.from_numpy(pixels_to_network(resize_slices(pixels, size).numpy()))  # (N, S, S)

        output = np.empty((n_slices, height, width), dtype=np.float32)
        for start in range(0, n_slices, batch_size):
            indices = range(start, min(start + batch_size, n_slices))
            # (B, 1+2K, S, S): each slice with its K neighbours on each side
            batch = torch.stack([inputs[context_indices(k, n_slices, self.context_slices)] for k in indices])
            fake = self.net(batch.to(self.device)).float().cpu()[:, 0]  # (B, S, S) in [-1, 1]
            fake_pixels = network_to_pixels(resize_slices(fake, (height, width)).numpy())
            output[indices.start : indices.stop] = window.inverse(fake_pixels)
        return slices_to_volume(output, self.settings.slice_axis), window


def load_generator(
    checkpoints_dir: str | Path, name: str, epoch: str = "latest", gpu_ids: list[int] | tuple[int, ...] = ()
) -> PhaseGenerator:
    """Rebuild the generator of run ``name`` from its folder and load ``<epoch>_net_G.pth``.

    Raises:
        CheckpointError: the run folder, its ``train_opt.json`` or the weights are missing
            or do not fit together.
    """
    run_folder = Path(checkpoints_dir) / name
    weights = run_folder / f"{epoch}_net_G.pth"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: checkpoint not found (check --model_name/--name, --epoch and --checkpoints_dir)")
    saved = load_saved_options(run_folder)
    if saved is None:
        raise CheckpointError(f"{run_folder / 'train_opt.json'}: not found; the run folder does not say how the model was trained")
    opt = argparse.Namespace(**saved)
    device = torch.device("cuda", gpu_ids[0]) if gpu_ids else torch.device("cpu")
    net = define_G(opt.input_nc, opt.output_nc, opt.ngf, opt.netG, opt.norm, not opt.no_dropout,
                   opt.init_type, opt.init_gain, list(gpu_ids))
    load_state_dict_file(net, weights, device)
    net.eval()
    settings = SliceSettings(
        slice_axis="axial" if opt.axial_slice else opt.slice_axis,
        resize_to=opt.resize_to,
        intensity=opt.intensity,
        hu_min=opt.hu_min,
        hu_max=opt.hu_max,
    )
    return PhaseGenerator(net=net, settings=settings, context_slices=opt.context_slices, device=device)


@dataclass(frozen=True)
class TranslationResult:
    """What :func:`translate_file` wrote."""

    output_path: Path
    slices_dir: Path | None
    n_slices: int
    seconds: float


def output_name(input_path: Path) -> str:
    """``patient_1.nii.gz`` -> ``patient_1_phase0.nii.gz``."""
    return f"{strip_nifti_suffix(Path(input_path).name)}_phase0.nii.gz"


def translate_file(
    generator: PhaseGenerator,
    input_path: str | Path,
    output_dir: str | Path,
    output_dtype: str = "int16",
    frame: int | None = None,
    batch_size: int = 8,
    save_slices: bool = True,
) -> TranslationResult:
    """Read one NIfTI volume, generate its phase-0 volume and write it on the input's grid.

    Writes ``<output_dir>/<name>_phase0.nii.gz`` (atomically) and, if ``save_slices``, the
    generated slices as PNG files in ``<output_dir>/<name>_slices/``.

    Raises:
        VolumeError: the input cannot be read or holds no usable intensities.
    """
    start = time.time()
    input_path = Path(input_path)
    volume, meta = read_volume(input_path, frame=frame)
    if not np.isfinite(volume).any():
        raise VolumeError(input_path, "has no finite voxel (all NaN/Inf)")
    try:
        generated, window = generator.translate(volume, batch_size=batch_size)
    except ValueError as err:
        raise VolumeError(input_path, str(err)) from err

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output_path = write_volume(output_dir / output_name(input_path), generated, meta, dtype=output_dtype)
    slices_dir = None
    if save_slices:
        slices_dir = output_dir / f"{strip_nifti_suffix(input_path.name)}_slices"
        save_slice_pngs(generated, window, generator.settings.slice_axis, slices_dir)
    n_slices = volume_to_slices(generated, generator.settings.slice_axis).shape[0]
    return TranslationResult(output_path, slices_dir, n_slices, time.time() - start)


def save_slice_pngs(volume: np.ndarray, window: HUWindow, slice_axis: str, folder: Path) -> None:
    """Every slice of a HU volume as ``slice_<k>.png`` (0-255 through ``window``, display orientation)."""
    folder.mkdir(parents=True, exist_ok=True)
    slices = volume_to_slices(volume, slice_axis)
    digits = len(str(len(slices) - 1))
    for k, image in enumerate(slices):
        pixels = np.rint(window(slice_for_display(image, slice_axis))).astype(np.uint8)
        save_png(pixels, folder / f"slice_{k:0{digits}d}.png")
