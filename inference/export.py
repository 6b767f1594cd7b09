"""Exporting a trained generator for deployment, and checking the export against PyTorch.

Two formats, each a file beside the other in ``output_dir``:

* ``torchscript``: ``<name>_<epoch>_G.pt``, the generator traced with ``torch.jit.trace``;
  load it with ``torch.jit.load(path, map_location=...)``, no project code needed.
* ``onnx``: ``<name>_<epoch>_G.onnx``, from ``torch.onnx.export`` (the torch.export-based
  exporter, opset 18 by default), weights inside the file, for ONNX Runtime or TensorRT.

Both take ``real_A``, a float32 ``(B, input_nc, S, S)`` batch of slices in [-1, 1] (the
window and resize of :meth:`~inference.volume.PhaseGenerator.translate` are *not* part of
the export), and return ``fake_B``, ``(B, output_nc, S, S)`` in [-1, 1]. The batch axis is
dynamic; S is the model's training size (``resize_to`` in ``train_opt.json``).

Each export describes itself: :func:`preprocessing_metadata` (the intensity window or
per-volume mode, slice axis, size, context slices, residual, channels, and the steps of
:class:`~data.slice_cache.SlicePipeline` that turn a volume into inputs and outputs back
into HU) is stored as JSON in the ONNX file's ``metadata_props`` under
:data:`METADATA_KEY`, in the TorchScript file's extra files as :data:`METADATA_EXTRA_FILE`,
and beside them as ``<name>_<epoch>_G.json``. ``examples/run_onnx_export.py`` runs an ONNX
export on a NIfTI volume from that metadata alone.

Exports are made from the CPU copy of the network, so they load on any machine, and are
written atomically. :func:`max_differences` runs each export (ONNX through onnxruntime) on a
random batch of another size than the one exported with, and compares it with the eager
network.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.slicing import SLICE_AXES
from inference.volume import PhaseGenerator
from util.atomic import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # what the torch.export-based exporter writes natively (older ones are converted)
DEFAULT_TOLERANCE = 1e-4  # max abs difference, in the network's [-1, 1] output range
INPUT_NAME, OUTPUT_NAME = "real_A", "fake_B"
# The batch sizes used to export and to verify differ, so verifying also proves the
# batch axis dynamic. Neither is 1: torch.export specialises size-1 dimensions.
EXPORT_BATCH, VERIFY_BATCH = 2, 3
METADATA_KEY = "ct_phase_generator"  # ONNX metadata_props key of the preprocessing JSON
METADATA_EXTRA_FILE = "ct_phase_generator.json"  # its name among a TorchScript file's extra files
METADATA_FORMAT = 1  # bump when a field's meaning changes


@dataclass(frozen=True)
class Exporter:
    """How one format is written and run.

    Attributes:
        suffix: file-name ending, e.g. ``".onnx"``.
        export: ``export(net, example_input, path, opset, metadata_json)`` writes the file,
            with the preprocessing JSON inside it.
        run: ``run(path, batch)`` -> the exported model's output as a numpy array.
        read_metadata: ``read_metadata(path)`` -> the preprocessing JSON stored in the file.
    """

    suffix: str
    export: Callable[[torch.nn.Module, torch.Tensor, Path, int, str], None]
    run: Callable[[Path, torch.Tensor], np.ndarray]
    read_metadata: Callable[[Path], str]


def _export_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, metadata: str) -> None:
    # TorchScript is deprecated upstream in favour of torch.export but still the format that
    # C++/libtorch deployments load; silence the warning that says so. The tracer also warns
    # that instance norm's checks of channel count and slice size become constants: both are
    # fixed by the model, and only the batch size varies (checked by max_differences).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example)
        _save_atomically(path, lambda temporary: traced.save(temporary, _extra_files={METADATA_EXTRA_FILE: metadata}))


def _run_torchscript(path: Path, batch: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(batch).numpy()


def _read_torchscript_metadata(path: Path) -> str:
    extra_files = {METADATA_EXTRA_FILE: ""}  # filled in by torch.jit.load
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    return extra_files[METADATA_EXTRA_FILE].decode()  # torch.jit.load fills in bytes


def _export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, metadata: str) -> None:
    with _quiet_onnx_exporter():
        program = torch.onnx.export(
            net,
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    program.model.metadata_props[METADATA_KEY] = metadata
    # One self-contained file (an unet_512 is ~220 MB, far below protobuf's 2 GB limit).
    _save_atomically(path, lambda temporary: program.save(temporary, external_data=False))


def _run_onnx(path: Path, batch: torch.Tensor) -> np.ndarray:
    import onnxruntime  # only export needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]


def _read_onnx_metadata(path: Path) -> str:
    import onnx  # only export needs it

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}[METADATA_KEY]


EXPORTERS = {
    "torchscript": Exporter(".pt", _export_torchscript, _run_torchscript, _read_torchscript_metadata),
    "onnx": Exporter(".onnx", _export_onnx, _run_onnx, _read_onnx_metadata),
}


def preprocessing_metadata(generator: PhaseGenerator, name: str, epoch: str) -> dict:
    """What a user of an exported file needs to turn a volume into its input and its output
    back into HU: the settings of :class:`~data.slice_cache.SlicePipeline` and its steps.

    Returns:
        A JSON-serialisable dict. ``hu_min``/``hu_max`` are the fixed window with
        ``intensity == "hu"`` and None with ``"volume"`` (each volume's own finite min..max).
    """
    s = generator.settings
    fixed = s.intensity == "hu"
    window = "hu_min..hu_max" if fixed else "the volume's own finite min..max"
    return {
        "format": METADATA_FORMAT,
        "run": name,
        "epoch": str(epoch),
        "netG": generator.netG,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_nc": generator.input_nc,
        "output_nc": generator.output_nc,
        "output_channel": 0,
        "orientation": "RAS+",
        "slice_axis": s.slice_axis,
        "slice_axis_index": SLICE_AXES[s.slice_axis],
        "resize_to": s.resize_to,
        "intensity": s.intensity,
        "hu_min": float(s.hu_min) if fixed else None,
        "hu_max": float(s.hu_max) if fixed else None,
        "context_slices": generator.context_slices,
        "residual": generator.residual,
        # --phases: output channel j is phase phases[j] (output conditioning), or one pass per
        # phase with its code in input channel 0 (input conditioning); (0,) for a phase-0 model.
        "phases": list(generator.phases),
        "num_phases": generator.num_phases,
        "phase_conditioning": generator.conditioning if len(generator.phases) > 1 else None,
        "phase_code": ("input channel 0 = 2 * K / num_phases - 1 for phase K; the CT channels follow"
                       if generator.code_channels else None),
        "steps": [
            "read the volume in HU and reorient it to the closest canonical RAS+ axes (nibabel.as_closest_canonical)",
            f"cut it into slices along canonical array axis {SLICE_AXES[s.slice_axis]} ({s.slice_axis}): (N, H, W)",
            f"window [lo, hi] = {window}; NaN and -Inf become lo, +Inf becomes hi",
            "pixels = clip((HU - lo) * 255 / (hi - lo), 0, 255)",
            f"resize each slice to {s.resize_to} x {s.resize_to}: bilinear, align_corners=False, antialiased "
            "when either side shrinks (torch.nn.functional.interpolate); a slice already that size is kept",
            "network value = pixels / 127.5 - 1",
            f"input of slice k: channels k-{generator.context_slices}..k+{generator.context_slices} in order "
            "(channel context_slices is slice k), indices clipped to 0..N-1"
            + (", after the phase code (phase_code)" if generator.code_channels else ""),
            "the network's residual (output = clamp(input slice + G(input), -1, 1)) is inside the exported file"
            if generator.residual else "the network is not residual: it outputs the slice itself",
            ("output channel j is phase phases[j]; each" if generator.output_nc > 1 and len(generator.phases) > 1
             else "output channel output_channel")
            + ", resized back to H x W as above, pixels = clip((value + 1) * 127.5, 0, 255), "
            "HU = pixels * (hi - lo) / 255 + lo with the input's window; slices back along the slice axis",
        ],
    }


def network_label(generator: PhaseGenerator) -> str:
    """Which network of the run was loaded, as its weights file names it: ``G`` for pix2pix,
    ``G_A``/``G_B`` for CycleGAN, so that the exports of both directions do not overwrite each other."""
    stem = generator.weights.name.removesuffix(".pth") if generator.weights else ""
    return stem.split("_net_", 1)[1] if "_net_" in stem else "G"


def metadata_path(output_dir: str | Path, name: str, epoch: str, net: str = "G") -> Path:
    """``<output_dir>/<name>_<epoch>_<net>.json``: the preprocessing JSON beside the exports."""
    return Path(output_dir) / f"{name}_{epoch}_{net}.json"


def read_metadata(path: str | Path) -> dict:
    """The preprocessing metadata stored inside an exported file (``.onnx`` or ``.pt``)."""
    path = Path(path)
    fmt = next(fmt for fmt, exporter in EXPORTERS.items() if path.name.endswith(exporter.suffix))
    return json.loads(EXPORTERS[fmt].read_metadata(path))


def export_path(output_dir: str | Path, name: str, epoch: str, fmt: str, net: str = "G") -> Path:
    """``<output_dir>/<name>_<epoch>_<net><suffix>``, e.g. ``exports/ct_latest_G.onnx`` (``_G_A`` for CycleGAN's G_A)."""
    return Path(output_dir) / f"{name}_{epoch}_{net}{EXPORTERS[fmt].suffix}"


def example_input(generator: PhaseGenerator, batch_size: int, seed: int = 0) -> torch.Tensor:
    """A reproducible random ``(batch_size, input_nc, S, S)`` batch in [-1, 1] at the model's size."""
    size = generator.settings.resize_to
    rng = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, generator.input_nc, size, size, generator=rng) * 2 - 1


def export_generator(
    generator: PhaseGenerator,
    output_dir: str | Path,
    name: str,
    epoch: str,
    formats: Iterable[str] = tuple(EXPORTERS),
    opset: int = DEFAULT_OPSET,
) -> dict[str, Path]:
    """Write ``generator`` in each of ``formats`` (keys of :data:`EXPORTERS`), each with
    :func:`preprocessing_metadata` inside, and that metadata beside them (:func:`metadata_path`).

    Returns:
        format -> the file written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    net = _cpu_copy(generator.net)
    example = example_input(generator, EXPORT_BATCH)
    metadata = json.dumps(preprocessing_metadata(generator, name, epoch), indent=2)
    written = {}
    for fmt in formats:
        path = export_path(output_dir, name, epoch, fmt, network_label(generator))
        logger.info("exporting %s to %s", fmt, path)
        EXPORTERS[fmt].export(net, example, path, opset, metadata)
        written[fmt] = path
    _save_atomically(metadata_path(output_dir, name, epoch, network_label(generator)), lambda temporary: Path(temporary).write_text(metadata + "\n"))
    return written


def max_differences(generator: PhaseGenerator, exported: dict[str, Path], seed: int = 1) -> dict[str, float]:
    """Max abs difference between each exported model's output and the eager network's.

    Args:
        generator: the network that was exported.
        exported: format -> file, as :func:`export_generator` returns.
        seed: of the random ``(VERIFY_BATCH, input_nc, S, S)`` input in [-1, 1].
    """
    net = _cpu_copy(generator.net)
    batch = example_input(generator, VERIFY_BATCH, seed=seed)
    with torch.no_grad():
        expected = net(batch).numpy()
    differences = {}
    for fmt, path in exported.items():
        output = EXPORTERS[fmt].run(Path(path), batch)
        if output.shape != expected.shape:
            raise ValueError(f"{path}: output shape {output.shape} differs from the network's {expected.shape}")
        differences[fmt] = float(np.abs(output - expected).max())
    return differences


def _cpu_copy(net: torch.nn.Module) -> torch.nn.Module:
    parameter = next(net.parameters(), None)
    if parameter is not None and parameter.device.type != "cpu":
        import copy

        net = copy.deepcopy(net).cpu()
    return net.eval()


def _save_atomically(path: Path, save: Callable[[str], None]) -> None:
    with atomic_path(path) as temporary:
        save(str(temporary))


@contextmanager
def _quiet_onnx_exporter():
    """Hide the exporter's chatter (progress lines, notes about torchvision ops it skips)."""
    exporter_logger = logging.getLogger("torch.onnx")
    level = exporter_logger.level
    exporter_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        exporter_logger.setLevel(level)
