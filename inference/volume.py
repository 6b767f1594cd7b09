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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from data.body import body_mask
from data.intensity import HUWindow
from data.phases import conditioning_channels, phase_code
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
    phase_options,
    phase_outputs,
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
        phases: the breathing phases the model makes, in the order of its outputs (``--phases``).
        num_phases: N, the phases of the training data's whole cycle.
        conditioning: how a model of several phases is told the phase (``--phase_conditioning``,
            data/phases.py): ``input``, a phase-code channel before the CT channels, one pass per
            phase; ``output``, one output channel per phase, all in one pass.
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
    phases: tuple[int, ...] = (0,)
    num_phases: int = 1
    conditioning: str = "output"

    @property
    def code_channels(self) -> int:
        """Phase-code input channels: 1 for a model of several phases with input conditioning, else 0."""
        return conditioning_channels(len(self.phases), self.conditioning)[0]

    @property
    def input_nc(self) -> int:
        """Channels of the network's input: the phase code (if any), the slice and its K neighbours on each side."""
        return self.code_channels + 1 + 2 * self.context_slices

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
        outputs, window = self._generate(volume, batch_size, first_only=True)
        return outputs[0], window

    @torch.no_grad()
    def translate_phases(self, volume: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, HUWindow]:
        """Generate every phase the model makes (``phases``) for one input volume.

        Args:
            volume: canonical (X, Y, Z) array in HU (``read_volume``'s output).
            batch_size: slices per forward pass.

        Returns:
            ``(outputs, window)``: (P, X, Y, Z) float32 HU on the input's grid, ``outputs[j]``
            phase ``phases[j]``; and the intensity window used for the input.

        Raises:
            ValueError: as :meth:`translate`.
        """
        return self._generate(volume, batch_size, first_only=False)

    def _generate(self, volume: np.ndarray, batch_size: int, first_only: bool) -> tuple[np.ndarray, HUWindow]:
        """(P, X, Y, Z) HU of the requested phases (only the first with ``first_only``), and the window."""
        pipeline = SlicePipeline.for_volume(volume, self.settings)
        count = 1 if first_only else len(self.phases)
        output = np.empty((count, *pipeline.slices.shape), dtype=np.float32)  # (P, N, H, W) in HU
        # Input conditioning: one pass per phase, its code before the CT channels (as the data set
        # serves it); output conditioning (or one phase): one pass makes every phase.
        passes = [(j, phase_code(k, self.num_phases)) for j, k in enumerate(self.phases[:count])] if self.code_channels else [(None, None)]
        for start in range(0, pipeline.n_slices, batch_size):
            stop = min(start + batch_size, pipeline.n_slices)
            batch = pipeline.network_inputs(range(start, stop), self.context_slices)  # (B, 1+2K, S, S)
            for j, code in passes:
                inputs = batch if code is None else torch.cat([torch.full_like(batch[:, :1], code), batch], dim=1)
                with self.autocast():
                    fake = self.net(inputs.to(self.device))
                fake = fake.float().cpu()  # (B, C_out, S, S) in [-1, 1]
                if not bool(torch.isfinite(fake).all()):
                    raise ValueError(f"the network's output holds NaN/Inf (slices {start}..{stop - 1}): "
                                     f"the model {self.weights or ''} is broken; use another checkpoint")
                for c, target in ((0, j),) if j is not None else ((c, c) for c in range(count)):
                    output[target, start:stop] = pipeline.to_hu(fake[:, c])
        return np.stack([pipeline.to_volume(slices) for slices in output]), pipeline.window


def generator_name(saved: dict, direction: str | None, options_file: Path | str = OPTIONS_JSON) -> str:
    """Which generator of a run translates in ``direction``: ``G`` for pix2pix; for CycleGAN ``G_A``
    (``AtoB``, or None) or ``G_B`` (``BtoA``), each mapping its side of training to the other.

    Raises:
        CheckpointError: ``BtoA`` asked of a run whose one generator maps the other way.
    """
    if saved.get("model") == "cycle_gan":
        return "G_B" if direction == "BtoA" else "G_A"
    if direction is not None and direction != saved.get("direction", "AtoB"):
        raise CheckpointError(
            f"{options_file}: --direction {direction}: this {saved.get('model', 'pix2pix')} run has one generator, "
            f"trained {saved.get('direction', 'AtoB')}; only a cycle_gan run translates both ways"
        )
    return "G"


def load_generator(
    checkpoints_dir: str | Path,
    name: str,
    epoch: str = "latest",
    device: torch.device = CPU,
    precision: str = "fp32",
    direction: str | None = None,
    net_name: str | None = None,
) -> PhaseGenerator:
    """Rebuild the generator of run ``name`` from its folder and load ``<epoch>_net_<G>.pth``.

    ``<G>`` is ``net_name`` if given, else chosen by :func:`generator_name` from the run's model
    and ``direction``: pix2pix's ``G``; CycleGAN's ``G_A`` (AtoB, the default) or ``G_B`` (BtoA).

    Args:
        checkpoints_dir: folder holding the run folders.
        name: the run's name (``--name`` at training, ``--model_name`` here).
        epoch: checkpoint label: ``latest`` or an epoch number.
        device: where the generator runs (util/device.py's ``select_device(--gpu_ids)``).
        precision: ``--precision``: auto, bf16, fp16 or fp32, resolved as training resolves it
            (util/fast_path.py): "auto" is bf16 autocast on a CUDA GPU that has it (else fp16)
            and fp32 on the CPU. test.py keeps fp32, the precision of its metrics.
        direction: ``--direction``: AtoB or BtoA (None: the direction the run was trained for).
        net_name: the network's name in the file (``G``, ``G_A``, ``G_B``), overriding ``direction``.

    Raises:
        CheckpointError: the run folder, its ``train_opt.json`` or the weights are missing,
            unreadable or do not fit together, or ``direction`` is BtoA for a pix2pix run trained
            AtoB. The message starts with the file at fault.
    """
    try:
        check_run_name(name)
    except ValueError as err:
        raise CheckpointError(str(err).replace("--name", "--model_name")) from None
    run_folder = Path(checkpoints_dir) / name
    options_file = run_folder / OPTIONS_JSON
    saved = load_options(run_folder)
    if net_name is None:
        net_name = generator_name(saved or {}, direction, options_file)
    weights = run_folder / network_file(epoch, net_name)
    if not weights.is_file():
        available = list_labels(run_folder)
        hint = f"this run has: {', '.join(available)}" if available else "check --model_name, --epoch and --checkpoints_dir"
        raise CheckpointError(f"{weights}: checkpoint not found ({hint})")
    if saved is None:
        raise CheckpointError(f"{options_file}: not found; the run folder does not say how the model was trained")
    missing = [key for key in GENERATOR_OPTIONS if key not in saved]
    if missing:
        raise CheckpointError(f"{options_file}: lacks {', '.join(missing)}; was it written by this version's train.py?")
    opt = argparse.Namespace(**saved)
    if net_name == "G_B":  # CycleGAN's G_B maps the output side back to the input side
        opt.input_nc, opt.output_nc = opt.output_nc, opt.input_nc
    try:
        net = define_G(input_nc=opt.input_nc, output_nc=opt.output_nc, ngf=opt.ngf, netG=opt.netG, norm=opt.norm,
                       use_dropout=not opt.no_dropout, init_type=opt.init_type, init_gain=opt.init_gain,
                       residual=opt.residual, device=device, residual_centre=phase_outputs(saved))
        settings = SliceSettings.from_options(opt)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{options_file}: describes a network that cannot be built ({err})") from err
    load_state_dict_file(net, weights, device)
    net.eval()
    return PhaseGenerator(net=net, settings=settings, context_slices=int(opt.context_slices), device=device,
                          netG=opt.netG, weights=weights, output_nc=int(opt.output_nc), residual=bool(opt.residual),
                          precision=resolve_precision(precision, device), **generator_phases(saved))


def generator_phases(saved: dict) -> dict:
    """The :class:`PhaseGenerator` fields of a run's saved options; a run saved before phases
    existed makes phase 0 alone."""
    values = phase_options(saved)
    return {"phases": tuple(int(k) for k in values["phase_list"]), "num_phases": int(values["num_phases"]),
            "conditioning": str(values["phase_conditioning"])}


@dataclass(frozen=True)
class PhaseOutputs:
    """What is written of a model's generated phases (``--split_phases``, ``--mip``, ``--average``).

    A model trained on one phase K writes ``<name>_phase<K>.nii.gz``, as it always did. A model
    trained on several writes them as one 4D ``<name>_phases.nii.gz`` (frame k = the k-th phase
    of the run's ``phases``) or, with ``split_phases``, as ``<name>_phase<K>.nii.gz`` each.

    Attributes:
        split_phases: one 3D file per phase instead of one 4D file.
        mip: also ``<name>_mip.nii.gz``: the voxel-wise maximum over the generated phases (the
            maximum-intensity projection from which an internal target volume is drawn).
        average: also ``<name>_average.nii.gz``: their mean. The input is an average of the
            true phases, so a good model's average of phases equals its input: the MAE between
            the two inside the input's body is reported (``TranslationResult.average_mae_hu``).
    """

    split_phases: bool = False
    mip: bool = False
    average: bool = False

    def check(self, generator: PhaseGenerator) -> None:
        """Refuse ``mip``/``average`` for a model of one phase: a projection of one volume is itself.

        Raises:
            CheckpointError: naming the weights and the phase they were trained on.
        """
        if len(generator.phases) == 1 and (self.mip or self.average):
            flags = " and ".join(flag for flag, on in (("--mip", self.mip), ("--average", self.average)) if on)
            raise CheckpointError(
                f"{generator.weights}: trained on phase {generator.phases[0]} only; {flags} need a model trained on "
                "several phases (train.py --phases all)"
            )


DEFAULT_OUTPUTS = PhaseOutputs()  # the phases only: one 4D file (one 3D file for a one-phase model)


@dataclass(frozen=True)
class TranslationResult:
    """What :func:`translate_file` (or :func:`write_outputs`) wrote, and how long each stage took.

    Attributes:
        output_path: the volume written last (its existence says every output is complete):
            ``<name>_phase<K>.nii.gz`` for a one-phase model, ``<name>_phases.nii.gz`` (or, with
            ``--split_phases``, the last phase's file) for a multi-phase one.
        output_paths: every volume written, ``output_path`` last.
        average_mae_hu: with ``--average``: mean |average of the generated phases - input| in
            the input's body (data/body.py), HU; else None.
        stage_seconds: seconds of each stage that ran: ``read``, ``network``, ``write volume``,
            ``write PNGs`` (the last two side by side, in two threads), ``write`` (both together).
        seconds: the stages' time added up (``write`` once).
    """

    output_path: Path
    slices_dir: Path | None
    n_slices: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    output_paths: tuple[Path, ...] = ()
    average_mae_hu: float | None = None

    @property
    def seconds(self) -> float:
        return total_seconds(self.stage_seconds)


def total_seconds(stage_seconds: dict[str, float]) -> float:
    """The time the stages took, added up: read, network and writing (volume and PNGs together)."""
    return sum(stage_seconds.get(stage, 0.0) for stage in ("read", "network", "write"))


def output_names(input_path: Path, phases: tuple[int, ...] = (0,), outputs: PhaseOutputs = DEFAULT_OUTPUTS) -> dict[str, str]:
    """What each output volume of ``input_path`` is called, in the order they are renamed into place.

    ``patient_1.nii.gz`` with phases (0,) -> ``{"phase0": "patient_1_phase0.nii.gz"}``; with
    phases 0..9 and ``mip``, ``average`` -> ``{"mip": "patient_1_mip.nii.gz", "average":
    "patient_1_average.nii.gz", "phases": "patient_1_phases.nii.gz"}``; with ``split_phases``
    the last entries are ``"phase0"`` .. ``"phase9"`` instead of ``"phases"``. The last name
    is :func:`output_name`.
    """
    stem = strip_nifti_suffix(Path(input_path).name)
    names = {kind: f"{stem}_{kind}.nii.gz" for kind, on in (("mip", outputs.mip), ("average", outputs.average)) if on}
    if len(phases) > 1 and not outputs.split_phases:
        names["phases"] = f"{stem}_phases.nii.gz"
    else:
        names.update({f"phase{k}": f"{stem}_phase{k}.nii.gz" for k in phases})
    return names


def output_name(input_path: Path, phases: tuple[int, ...] = (0,), outputs: PhaseOutputs = DEFAULT_OUTPUTS) -> str:
    """The output volume written last: ``patient_1.nii.gz`` -> ``patient_1_phase0.nii.gz`` (phase-0 model)."""
    return list(output_names(input_path, phases, outputs).values())[-1]


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
    outputs: PhaseOutputs = DEFAULT_OUTPUTS,
) -> TranslationResult:
    """Read one NIfTI volume, generate the model's phases and write them on the input's grid.

    :func:`read_input`, :func:`generate` and :func:`write_outputs` in turn; see
    :func:`write_outputs` for what is written and how a failure leaves nothing half-made.

    Raises:
        VolumeError: the input cannot be read or holds no usable intensities, or the
            outputs cannot be written. The message starts with the file at fault.
        CheckpointError: ``outputs`` asks a one-phase model for a MIP or an average.
    """
    outputs.check(generator)
    input_path = Path(input_path)
    seconds: dict[str, float] = {}
    volume, meta = timed(seconds, "read", read_input, input_path, frame)
    generated, window = timed(seconds, "network", generate, generator, input_path, volume, batch_size)
    result = write_outputs(
        generator, input_path, output_dir, generated, window, meta, output_dtype, save_slices, outputs, volume
    )
    return replace(result, stage_seconds={**seconds, **result.stage_seconds})


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
    """The generated volume: :meth:`PhaseGenerator.translate` for a model of one phase, (X, Y, Z);
    :meth:`PhaseGenerator.translate_phases` for one of several, (P, X, Y, Z) in the order of
    ``generator.phases``. Its refusals are named after ``input_path``.

    Raises:
        VolumeError: the volume holds no usable intensities, or the network's output is not finite.
    """
    try:
        if len(generator.phases) > 1:
            return generator.translate_phases(volume, batch_size=batch_size)
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
    outputs: PhaseOutputs = DEFAULT_OUTPUTS,
    input_volume: np.ndarray | None = None,
) -> TranslationResult:
    """Write the generated volume(s) in ``output_dir`` on the input's grid (:func:`output_names`)
    and, if ``save_slices``, their slices as PNG files in ``<output_dir>/<name>_slices/`` (a
    multi-phase model: one subfolder ``phase<K>/`` per phase).

    The PNGs are written by a worker thread while this one compresses the volumes. Every
    volume is written under a temporary name and renamed into place only once all of them and
    the PNGs are complete, the one :func:`output_name` names last, so it exists only once
    everything is complete (a batch that finds it may skip the input): the PNGs go to a hidden
    temporary folder, renamed into place before the volumes, and are removed again if a volume
    cannot be written. A failure leaves no new file behind.

    Args:
        generated: :func:`generate`'s output: (X, Y, Z) HU for a one-phase model, (P, X, Y, Z)
            in the order of ``generator.phases`` for a multi-phase one.
        input_volume: the input (X, Y, Z) HU, for ``outputs.average``'s consistency check.

    Raises:
        VolumeError: the outputs cannot be written (its message starts with the file).
    """
    output_dir = Path(output_dir)
    phases = tuple(generator.phases)
    names = output_names(input_path, phases, outputs)
    volumes = _output_volumes(generated, phases, outputs)  # kind -> (array, 4D phase numbers or None)
    slices_dir = output_dir / slices_dir_name(input_path) if save_slices else None
    make_output_dir(output_dir)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    average_mae_hu = None
    if outputs.average and input_volume is not None:
        average_mae_hu = average_consistency_hu(volumes["average"][0], input_volume, output_dtype)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="png-writer") as png_writer:
        pngs = None
        if slices_dir is not None:
            by_folder = {"": generated} if len(phases) == 1 else {f"phase{k}": v for k, v in zip(phases, generated)}
            axis = generator.settings.slice_axis
            pngs = png_writer.submit(
                timed, seconds, "write PNGs", _write_slices_atomically, by_folder, window, axis, slices_dir
            )
        output_path = output_dir / names[next(reversed(names))]
        try:
            with contextlib.ExitStack() as renames:
                # Entered in reverse, so that they are renamed in order, the last name last.
                temporaries = {
                    kind: renames.enter_context(atomic_path(output_dir / names[kind], suffix=".nii.gz"))
                    for kind in reversed(names)
                }
                write_start = time.perf_counter()
                for kind, (array, frame_phases) in volumes.items():
                    output_path = output_dir / names[kind]
                    write_volume(temporaries[kind], array, meta, dtype=output_dtype, phases=frame_phases,
                                 num_phases=generator.num_phases)
                seconds["write volume"] = time.perf_counter() - write_start
                if pngs is not None:
                    pngs.result()
        except BaseException as err:
            # Nothing half-made stays: these PNGs belong to volumes that were not written.
            if pngs is not None and pngs.exception() is None:
                shutil.rmtree(slices_dir, ignore_errors=True)
            if isinstance(err, OSError):
                raise VolumeError(output_path, f"cannot be written ({err.strerror or err})") from err
            raise
    seconds["write"] = time.perf_counter() - start
    n_slices = volume_to_slices(generated[0] if len(phases) > 1 else generated, generator.settings.slice_axis).shape[0]
    paths = tuple(output_dir / name for name in names.values())
    return TranslationResult(paths[-1], slices_dir, n_slices, seconds, paths, average_mae_hu)


def _output_volumes(
    generated: np.ndarray, phases: tuple[int, ...], outputs: PhaseOutputs
) -> dict[str, tuple[np.ndarray, tuple[int, ...] | None]]:
    """Each output kind of :func:`output_names` -> (the array to write, the phase of each frame
    of a 4D file or None). The 4D file is (X, Y, Z, P), as NIfTI stores frames last."""
    if len(phases) == 1:
        return {f"phase{phases[0]}": (generated, None)}
    volumes = {}
    if outputs.mip:
        volumes["mip"] = (generated.max(axis=0), None)
    if outputs.average:
        volumes["average"] = (generated.mean(axis=0, dtype=np.float32), None)
    if outputs.split_phases:
        volumes.update({f"phase{k}": (v, None) for k, v in zip(phases, generated)})
    else:
        volumes["phases"] = (np.moveaxis(generated, 0, -1), phases)
    return volumes


def average_consistency_hu(average_hu: np.ndarray, input_hu: np.ndarray, output_dtype: str = "float32") -> float:
    """Mean |average of the generated phases - input| inside the input's body, in HU.

    The input is the average of the true phases, so this is what a perfect model scores 0 on
    (up to rounding); the average is taken as written (rounded with ``output_dtype`` int16).

    NaN when the input has no body (no voxel above -500 HU).
    """
    average = np.rint(average_hu) if output_dtype == "int16" else average_hu
    body = body_mask(input_hu)
    if not body.any():
        return float("nan")
    return float(np.abs(average[body] - input_hu[body], dtype=np.float64).mean())


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


def _write_slices_atomically(
    volumes: dict[str, np.ndarray], window: HUWindow, slice_axis: str, folder: Path
) -> None:
    """:func:`save_slice_pngs` of each volume into a hidden temporary folder, then rename it to
    ``folder`` (replacing an older one), so ``folder`` never holds a half-written set.

    Args:
        volumes: subfolder name (``""``: the folder itself; ``"phase3"``) -> (X, Y, Z) HU volume.
    """
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for subfolder, volume in volumes.items():
            save_slice_pngs(volume, window, slice_axis, partial / subfolder)
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
