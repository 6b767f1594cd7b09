"""Volume in, volume out: the one inference function behind use_model.py, batch_process_patients.py and test.py.

A trained run folder (``<checkpoints_dir>/<name>/``) describes itself: ``train_opt.json``
says which generator, norm, channels, slice axis, size and intensity window the model was
trained with, so :func:`load_generator` rebuilds it from the folder alone.

:meth:`PhaseGenerator.translate` takes a canonical (X, Y, Z) volume in HU and turns it into
the generator's inputs with the slice cache's own preprocessing
(:class:`~data.slice_cache.SlicePipeline`: cut along the training slice axis, window,
resize to the model's size). It runs the generator in batches, then resizes the output
back, maps it to HU and reassembles the volume on the input's grid. Intensities go back
to HU through the inverse of the window. With ``--intensity hu`` this is exact inside
the window. With ``--intensity volume`` the *input's* min..max window is inverted, which
is an approximation where the target's range differs from the input's. The network runs in
the precision :func:`load_generator` is given (``--precision``; "auto": bf16 autocast on a
CUDA GPU, fp32 on the CPU); everything after it is float32.

:func:`translate_file` is one volume's three stages in turn: :func:`read_input`,
:func:`generate` and :func:`write_outputs`. batch_process_patients.py runs the same three
stages on a pipeline (inference/batch.py), so a volume is read while the one before it goes
through the network and the one before that is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.intensity import HUWindow
from data.slice_cache import SlicePipeline, SliceSettings
from data.slicing import slice_for_display, volume_to_slices
from data.volume_io import VolumeError, VolumeMeta, read_volume, strip_nifti_suffix, write_volume
from models.base_model import load_state_dict_file
from models.networks import define_G
from util.atomic import atomic_path
from util.device import CPU
from util.fast_path import AUTOCAST_DTYPES, resolve_precision
from util.image import save_png
from util.run_folder import (
    GENERATOR_OPTIONS,
    OPTIONS_JSON,
    CheckpointError,
    check_run_name,
    list_labels,
    load_options,
    network_file,
)

logger = logging.getLogger(__name__)

# The generated slices as PNG: zlib level 1 takes a fifth of the time of PIL's default 6 for
# 17% more bytes (512 x 512 CT slices: 8.4 against 39.1 ms and 98 against 84 kB a slice).
PNG_COMPRESS_LEVEL = 1
# The stages of one volume, in order, as TranslationResult.stage_seconds names them.
STAGES = ("read", "network", "write volume", "write PNGs")


@dataclass
class PhaseGenerator:
    """A trained generator and the slice settings it was trained with.

    Attributes:
        net: the generator, in eval mode, on ``device``.
        settings: slice axis, size and intensity window of training.
        context_slices: K neighbours on each side fed as extra channels.
        device: where ``net`` runs.
        netG: the generator's name (a key of ``GENERATORS``), for messages.
        weights: the ``.pth`` file the weights came from, for messages.
        output_nc: channels of the network's output; channel 0 is the generated slice.
        residual: the network adds its input slice to its output (``--residual``; inside ``net``).
        precision: how the network runs: ``fp32``, or ``bf16``/``fp16`` autocast (resolved, never "auto").
    """

    net: torch.nn.Module
    settings: SliceSettings
    context_slices: int
    device: torch.device
    netG: str = ""
    weights: Path | None = None
    output_nc: int = 1
    residual: bool = False
    precision: str = "fp32"

    @property
    def input_nc(self) -> int:
        """Channels of the network's input: the slice and its K neighbours on each side."""
        return 1 + 2 * self.context_slices

    def describe(self) -> str:
        """One line for people: which weights, which network, which slices and window."""
        s = self.settings
        window = f"fixed window {s.hu_min:g}..{s.hu_max:g} HU" if s.intensity == "hu" else "each volume's own min..max"
        return (f"{self.weights}: {self.netG}, {s.slice_axis} slices at {s.resize_to}x{s.resize_to}, "
                f"{self.input_nc} input channel(s), intensity {window}, on {self.device} in {self.precision}")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the network runs in: autocast to bf16/fp16, or nothing for fp32."""
        if self.precision not in AUTOCAST_DTYPES:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

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
        pipeline = SlicePipeline.for_volume(volume, self.settings)
        output = np.empty(pipeline.slices.shape, dtype=np.float32)  # (N, H, W) in HU
        for start in range(0, pipeline.n_slices, batch_size):
            stop = min(start + batch_size, pipeline.n_slices)
            batch = pipeline.network_inputs(range(start, stop), self.context_slices)  # (B, 1+2K, S, S)
            with self.autocast():
                fake = self.net(batch.to(self.device))
            fake = fake.float().cpu()[:, 0]  # (B, S, S) in [-1, 1]
            if not bool(torch.isfinite(fake).all()):
                raise ValueError(f"the network's output holds NaN/Inf (slices {start}..{stop - 1}): "
                                 f"the model {self.weights or ''} is broken; use another checkpoint")
            output[start:stop] = pipeline.to_hu(fake)
        return pipeline.to_volume(output), pipeline.window


def load_generator(
    checkpoints_dir: str | Path, name: str, epoch: str = "latest", device: torch.device = CPU, precision: str = "fp32"
) -> PhaseGenerator:
    """Rebuild the generator of run ``name`` from its folder and load ``<epoch>_net_G.pth``.

    Args:
        checkpoints_dir: folder holding the run folders.
        name: the run's name (``--name`` at training, ``--model_name`` here).
        epoch: checkpoint label: ``latest`` or an epoch number.
        device: where the generator runs (util/device.py's ``select_device(--gpu_ids)``).
        precision: ``--precision``: auto, bf16, fp16 or fp32, resolved as training resolves it
            (util/fast_path.py): "auto" is bf16 autocast on a CUDA GPU that has it (else fp16)
            and fp32 on the CPU. test.py keeps fp32, the precision of its metrics.

    Raises:
        CheckpointError: the run folder, its ``train_opt.json`` or the weights are missing,
            unreadable or do not fit together. The message starts with the file at fault.
    """
    try:
        check_run_name(name)
    except ValueError as err:
        raise CheckpointError(str(err).replace("--name", "--model_name")) from None
    run_folder = Path(checkpoints_dir) / name
    weights = run_folder / network_file(epoch, "G")
    options_file = run_folder / OPTIONS_JSON
    if not weights.is_file():
        available = list_labels(run_folder)
        hint = f"this run has: {', '.join(available)}" if available else "check --model_name, --epoch and --checkpoints_dir"
        raise CheckpointError(f"{weights}: checkpoint not found ({hint})")
    saved = load_options(run_folder)
    if saved is None:
        raise CheckpointError(f"{options_file}: not found; the run folder does not say how the model was trained")
    missing = [key for key in GENERATOR_OPTIONS if key not in saved]
    if missing:
        raise CheckpointError(f"{options_file}: lacks {', '.join(missing)}; was it written by this version's train.py?")
    opt = argparse.Namespace(**saved)
    try:
        net = define_G(input_nc=opt.input_nc, output_nc=opt.output_nc, ngf=opt.ngf, netG=opt.netG, norm=opt.norm,
                       use_dropout=not opt.no_dropout, init_type=opt.init_type, init_gain=opt.init_gain,
                       residual=opt.residual, device=device)
        settings = SliceSettings.from_options(opt)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{options_file}: describes a network that cannot be built ({err})") from err
    load_state_dict_file(net, weights, device)
    net.eval()
    return PhaseGenerator(net=net, settings=settings, context_slices=int(opt.context_slices), device=device,
                          netG=opt.netG, weights=weights, output_nc=int(opt.output_nc), residual=bool(opt.residual),
                          precision=resolve_precision(precision, device))


@dataclass(frozen=True)
class TranslationResult:
    """What :func:`translate_file` (or :func:`write_outputs`) wrote, and how long each stage took.

    Attributes:
        stage_seconds: seconds of each stage that ran: ``read``, ``network``, ``write volume``,
            ``write PNGs`` (the last two side by side, in two threads), ``write`` (both together).
        seconds: the stages' time added up (``write`` once).
    """

    output_path: Path
    slices_dir: Path | None
    n_slices: int
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return total_seconds(self.stage_seconds)


def total_seconds(stage_seconds: dict[str, float]) -> float:
    """The time the stages took, added up: read, network and writing (volume and PNGs together)."""
    return sum(stage_seconds.get(stage, 0.0) for stage in ("read", "network", "write"))


def output_name(input_path: Path) -> str:
    """``patient_1.nii.gz`` -> ``patient_1_phase0.nii.gz``."""
    return f"{strip_nifti_suffix(Path(input_path).name)}_phase0.nii.gz"


def slices_dir_name(input_path: Path) -> str:
    """``patient_1.nii.gz`` -> ``patient_1_slices``."""
    return f"{strip_nifti_suffix(Path(input_path).name)}_slices"


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

    :func:`read_input`, :func:`generate` and :func:`write_outputs` in turn; see
    :func:`write_outputs` for what is written and how a failure leaves nothing half-made.

    Raises:
        VolumeError: the input cannot be read or holds no usable intensities, or the
            outputs cannot be written. The message starts with the file at fault.
    """
    input_path = Path(input_path)
    seconds: dict[str, float] = {}
    volume, meta = timed(seconds, "read", read_input, input_path, frame)
    generated, window = timed(seconds, "network", generate, generator, input_path, volume, batch_size)
    result = write_outputs(generator, input_path, output_dir, generated, window, meta, output_dtype, save_slices)
    stage_seconds = {**seconds, **result.stage_seconds}
    return TranslationResult(result.output_path, result.slices_dir, result.n_slices, stage_seconds)


def read_input(input_path: Path, frame: int | None = None) -> tuple[np.ndarray, VolumeMeta]:
    """:func:`~data.volume_io.read_volume`, refusing a volume without a single finite voxel.

    Raises:
        VolumeError: the input cannot be read, or holds only NaN/Inf.
    """
    volume, meta = read_volume(input_path, frame=frame)
    if not np.isfinite(volume).any():
        raise VolumeError(input_path, "has no finite voxel (all NaN/Inf)")
    return volume, meta


def generate(
    generator: PhaseGenerator, input_path: Path, volume: np.ndarray, batch_size: int = 8
) -> tuple[np.ndarray, HUWindow]:
    """:meth:`PhaseGenerator.translate`, its refusals named after ``input_path``.

    Raises:
        VolumeError: the volume holds no usable intensities, or the network's output is not finite.
    """
    try:
        return generator.translate(volume, batch_size=batch_size)
    except ValueError as err:
        raise VolumeError(input_path, str(err)) from err


def write_outputs(
    generator: PhaseGenerator,
    input_path: Path,
    output_dir: str | Path,
    generated: np.ndarray,
    window: HUWindow,
    meta: VolumeMeta,
    output_dtype: str = "int16",
    save_slices: bool = True,
) -> TranslationResult:
    """Write the generated volume as ``<output_dir>/<name>_phase0.nii.gz`` on the input's grid
    and, if ``save_slices``, its slices as PNG files in ``<output_dir>/<name>_slices/``.

    The PNGs are written by a worker thread while this one compresses the volume. The volume
    is renamed into place last, so it exists only once everything is complete (a batch that
    finds it may skip the input): the PNGs go to a hidden temporary folder, renamed into place
    before the volume, and are removed again if the volume cannot be written. A failure
    leaves no new file behind.

    Raises:
        VolumeError: the outputs cannot be written (its message starts with the file).
    """
    output_dir = Path(output_dir)
    output_path = output_dir / output_name(input_path)
    slices_dir = output_dir / slices_dir_name(input_path) if save_slices else None
    make_output_dir(output_dir)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="png-writer") as png_writer:
        pngs = None
        if slices_dir is not None:
            axis = generator.settings.slice_axis
            pngs = png_writer.submit(
                timed, seconds, "write PNGs", _write_slices_atomically, generated, window, axis, slices_dir
            )
        try:
            with atomic_path(output_path, suffix=".nii.gz") as temporary:
                timed(seconds, "write volume", write_volume, temporary, generated, meta, dtype=output_dtype)
                if pngs is not None:
                    pngs.result()
        except BaseException as err:
            # Nothing half-made stays: these PNGs belong to a volume that was not written.
            if pngs is not None and pngs.exception() is None:
                shutil.rmtree(slices_dir, ignore_errors=True)
            if isinstance(err, OSError):
                raise VolumeError(output_path, f"cannot be written ({err.strerror or err})") from err
            raise
    seconds["write"] = time.perf_counter() - start
    n_slices = volume_to_slices(generated, generator.settings.slice_axis).shape[0]
    return TranslationResult(output_path, slices_dir, n_slices, seconds)


def describe_stages(stage_seconds: dict[str, float]) -> str:
    """``"read 0.52 s, network 0.71 s, write volume 0.31 s, write PNGs 0.40 s (side by side: 0.41 s)"``."""
    parts = [f"{stage} {stage_seconds[stage]:.2f} s" for stage in STAGES if stage in stage_seconds]
    if "write" in stage_seconds and "write PNGs" in stage_seconds:
        parts[-1] += f" (side by side: {stage_seconds['write']:.2f} s)"
    return ", ".join(parts)


def timed(seconds: dict[str, float], stage: str, function, *args, **kwargs):
    """``function(*args, **kwargs)``, its wall time stored as ``seconds[stage]``."""
    start = time.perf_counter()
    try:
        return function(*args, **kwargs)
    finally:
        seconds[stage] = time.perf_counter() - start


def make_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` (and its parents) if needed.

    Raises:
        VolumeError: it cannot be created (a file of that name, no permission, ...).
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VolumeError(output_dir, f"cannot create the output folder ({err.strerror or err})") from err
    return output_dir


def _write_slices_atomically(volume: np.ndarray, window: HUWindow, slice_axis: str, folder: Path) -> None:
    """:func:`save_slice_pngs` into a hidden temporary folder, then rename it to ``folder``
    (replacing an older one), so ``folder`` never holds a half-written set."""
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save_slice_pngs(volume, window, slice_axis, partial)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def save_slice_pngs(volume: np.ndarray, window: HUWindow, slice_axis: str, folder: Path) -> None:
    """Every slice of a HU volume as ``slice_<k>.png`` (0-255 through ``window``, display orientation)."""
    folder.mkdir(parents=True, exist_ok=True)
    slices = volume_to_slices(volume, slice_axis)
    digits = len(str(len(slices) - 1))
    for k, image in enumerate(slices):
        pixels = np.rint(window(slice_for_display(image, slice_axis))).astype(np.uint8)
        save_png(pixels, folder / f"slice_{k:0{digits}d}.png", compress_level=PNG_COMPRESS_LEVEL)
