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

Exports are made from the CPU copy of the network, so they load on any machine, and are
written atomically. :func:`max_differences` runs each export (ONNX through onnxruntime) on a
random batch of another size than the one exported with, and compares it with the eager
network.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.volume import PhaseGenerator
from util.atomic import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # what the torch.export-based exporter writes natively (older ones are converted)
DEFAULT_TOLERANCE = 1e-4  # max abs difference, in the network's [-1, 1] output range
INPUT_NAME, OUTPUT_NAME = "real_A", "fake_B"
# The batch sizes used to export and to verify differ, so verifying also proves the
# batch axis dynamic. Neither is 1: torch.export specialises size-1 dimensions.
EXPORT_BATCH, VERIFY_BATCH = 2, 3


@dataclass(frozen=True)
class Exporter:
    """How one format is written and run.

    Attributes:
        suffix: file-name ending, e.g. ``".onnx"``.
        export: ``export(net, example_input, path, opset)`` writes the file.
        run: ``run(path, batch)`` -> the exported model's output as a numpy array.
    """

    suffix: str
    export: Callable[[torch.nn.Module, torch.Tensor, Path, int], None]
    run: Callable[[Path, torch.Tensor], np.ndarray]


def _export_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    # TorchScript is deprecated upstream in favour of torch.export but still the format that
    # C++/libtorch deployments load; silence the warning that says so. The tracer also warns
    # that instance norm's checks of channel count and slice size become constants: both are
    # fixed by the model, and only the batch size varies (checked by max_differences).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example)
        _save_atomically(path, traced.save)


def _run_torchscript(path: Path, batch: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(batch).numpy()


def _export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
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
    # One self-contained file (an unet_512 is ~220 MB, far below protobuf's 2 GB limit).
    _save_atomically(path, lambda temporary: program.save(temporary, external_data=False))


def _run_onnx(path: Path, batch: torch.Tensor) -> np.ndarray:
    import onnxruntime  # only export needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]


EXPORTERS = {
    "torchscript": Exporter(".pt", _export_torchscript, _run_torchscript),
    "onnx": Exporter(".onnx", _export_onnx, _run_onnx),
}


def export_path(output_dir: str | Path, name: str, epoch: str, fmt: str) -> Path:
    """``<output_dir>/<name>_<epoch>_G<suffix>``, e.g. ``exports/ct_latest_G.onnx``."""
    return Path(output_dir) / f"{name}_{epoch}_G{EXPORTERS[fmt].suffix}"


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
    """Write ``generator`` in each of ``formats`` (keys of :data:`EXPORTERS`).

    Returns:
        format -> the file written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    net = _cpu_copy(generator.net)
    example = example_input(generator, EXPORT_BATCH)
    written = {}
    for fmt in formats:
        path = export_path(output_dir, name, epoch, fmt)
        logger.info("exporting %s to %s", fmt, path)
        EXPORTERS[fmt].export(net, example, path, opset)
        written[fmt] = path
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
