"""Generate phase 0 (end-inhale) of a 4D CT from one time-averaged CT volume.

    python use_model.py --input_nifti ./datasets/ct_phases_dataset/testA/patient_1.nii.gz \
        --model_name ct_phase0_generator_optimized --epoch latest --output_dir ./results

Writes ``<output_dir>/<name>_phase0.nii.gz`` on exactly the input's grid (shape, affine,
storage order, voxel sizes, NIfTI version, byte order) and the generated slices as PNG
files in ``<output_dir>/<name>_slices/``. The network, its slice size and its intensity
window are read from the run folder's ``train_opt.json``; inputs of any in-plane size are
resized to the model's size and back. The last line printed is the output path. A file
that cannot be used gives one line on stderr and exit code 1, and leaves nothing behind.

A model trained on several phases (``train.py --phases all``) writes them as one 4D
``<name>_phases.nii.gz`` (frame k = the k-th phase it was trained on; the PNG slices go to
``<name>_slices/phase<K>/``), or with ``--split_phases`` as ``<name>_phase<K>.nii.gz`` each;
``--mip`` adds ``<name>_mip.nii.gz`` (maximum over the phases) and ``--average``
``<name>_average.nii.gz`` (their mean), printing its MAE against the input in the body.
"""

from __future__ import annotations

import argparse
import sys
import time

from inference.volume import PhaseOutputs, describe_stages, load_generator, translate_file
from options.cli import add_checkpoint_arguments, add_translation_arguments, new_parser, run_cli
from util.device import add_gpu_ids_argument, select_device


def get_args_parser() -> argparse.ArgumentParser:
    parser = new_parser("use_model.py", "Generate the phase-0 CT volume for one average CT volume.")
    parser.add_argument(
        "--input_nifti", required=True, help="the average CT volume (.nii or .nii.gz, 3D or 4D with --frame)"
    )
    parser.add_argument("--output_dir", default="./results", help="where the volume and its PNG slices are written")
    add_checkpoint_arguments(parser)
    add_gpu_ids_argument(parser)
    add_translation_arguments(parser)
    return parser


def main(opt: argparse.Namespace) -> None:
    start = time.perf_counter()
    device = select_device(opt.gpu_ids)
    generator = load_generator(opt.checkpoints_dir, opt.model_name, opt.epoch, device, opt.precision,
                               direction=opt.direction)
    load_seconds = time.perf_counter() - start
    print(f"model: {generator.describe()}")
    result = translate_file(
        generator,
        opt.input_nifti,
        opt.output_dir,
        output_dtype=opt.output_dtype,
        frame=opt.frame,
        batch_size=opt.batch_size,
        save_slices=not opt.no_slices,
        outputs=PhaseOutputs(split_phases=opt.split_phases, mip=opt.mip, average=opt.average),
    )
    print(f"{opt.input_nifti}: {result.n_slices} {generator.settings.slice_axis} slices in {result.seconds:.1f} s")
    if result.average_mae_hu is not None:
        whole = len(generator.phases) == generator.num_phases
        print(f"average of the generated phases vs the input: MAE {result.average_mae_hu:.1f} HU in the body "
              + ("(0 for a model whose phases average to its input)" if whole else
                 f"(the input averages all {generator.num_phases} phases, these are {len(generator.phases)} of them)"))
    if opt.verbose:
        print(f"times: load model {load_seconds:.2f} s, {describe_stages(result.stage_seconds)}")
    if result.slices_dir is not None:
        print(f"slices: {result.slices_dir}")
    for path in result.output_paths:  # the last one written last
        print(path)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
