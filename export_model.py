"""Export a trained generator to TorchScript and ONNX, and check the exports.

    python export_model.py --model_name ct_phase0_generator_optimized --epoch latest --output_dir ./exports

Writes ``<output_dir>/<name>_<epoch>_G.pt`` (TorchScript) and ``<output_dir>/<name>_<epoch>_G.onnx``
(``--format`` picks one or both), then runs each on a random batch at the model's size and
compares its output with the PyTorch network's: exit code 1 if any differs by more than
``--tolerance`` (max abs, in the network's [-1, 1] range). The exported models take and
return slices in [-1, 1] at the training size; see ``inference/export.py``. How a volume
becomes those slices and the output goes back to HU (window, slice axis, size, context
slices, residual) is stored in each file and beside them in ``<name>_<epoch>_G.json``;
``examples/run_onnx_export.py`` runs the ONNX file on a NIfTI volume from it alone.
"""

from __future__ import annotations

import argparse
import sys

from inference.export import (
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    EXPORTERS,
    export_generator,
    max_differences,
    metadata_path,
    network_label,
)
from inference.volume import load_generator
from options.cli import add_checkpoint_arguments, new_parser, run_cli
from util.device import CPU

PROG = "export_model.py"


def get_args_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, "Export a trained generator to TorchScript and ONNX.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--output_dir", default="./exports", help="where the exported files are written")
    parser.add_argument(
        "--format", nargs="+", default=list(EXPORTERS), choices=sorted(EXPORTERS), help="formats to write"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX operator set version")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest accepted max abs difference between an export's output and PyTorch's",
    )
    return parser


def main(opt: argparse.Namespace) -> int:
    # Built and checked on the CPU: the exported files do not depend on where they were made.
    generator = load_generator(opt.checkpoints_dir, opt.model_name, opt.epoch, CPU, direction=opt.direction)
    print(f"model: {generator.describe()}")
    exported = export_generator(generator, opt.output_dir, opt.model_name, opt.epoch, opt.format, opset=opt.opset)
    differences = max_differences(generator, exported)
    for fmt, path in exported.items():
        verdict = "ok" if differences[fmt] <= opt.tolerance else f"above --tolerance {opt.tolerance:g}"
        print(f"{fmt}: {path}  max |difference| vs PyTorch = {differences[fmt]:.3g}  {verdict}")
    print(f"preprocessing (also inside each file): {metadata_path(opt.output_dir, opt.model_name, opt.epoch, network_label(generator))}")
    failed = [path for fmt, path in exported.items() if differences[fmt] > opt.tolerance]
    for path in failed:
        print(
            f"{PROG}: error: {path}: output differs from the PyTorch model's by more than --tolerance "
            f"{opt.tolerance:g}; do not deploy it",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
