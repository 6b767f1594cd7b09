"""Generate phase 0 for every average CT volume in a folder.

    python batch_process_patients.py --input_dir ./patient_data --output_dir ./processed_results \
        --model_name ct_phase0_generator_optimized

Loads the model once and translates each ``.nii``/``.nii.gz`` file of ``--input_dir`` (in
name order) as use_model.py does; on a GPU it reads the next file and writes the previous one
while the network works on the current one. Inputs whose output already exists are skipped, so an
interrupted batch resumes where it stopped; a file that fails is reported and the batch
goes on. ``<output_dir>/summary.csv`` lists every file with its status
(ok | skipped | failed), error, slices and seconds; for a model of several phases also the
volumes written and, with ``--average``, the average of the generated phases against the input
(MAE in the body, HU). Exit code 1 if any file failed. ``--split_phases``, ``--mip`` and
``--average`` are use_model.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from data.volume_io import VolumeError
from inference.batch import (
    CYCLE_SUMMARY_COLUMNS,
    SUMMARY_COLUMNS,
    SUMMARY_FILE,
    find_inputs,
    summarise,
    translate_folder,
    write_summary,
)
from inference.volume import PhaseOutputs, describe_stages, load_generator, make_output_dir
from options.cli import add_checkpoint_arguments, add_translation_arguments, new_parser, run_cli
from util.device import add_gpu_ids_argument, select_device


def get_args_parser() -> argparse.ArgumentParser:
    parser = new_parser("batch_process_patients.py", "Generate the phase-0 CT volume for every volume in a folder.")
    parser.add_argument("--input_dir", required=True, help="folder of average CT volumes (.nii / .nii.gz)")
    parser.add_argument("--output_dir", required=True, help="where volumes, PNG slices and summary.csv are written")
    add_checkpoint_arguments(parser)
    add_gpu_ids_argument(parser)
    add_translation_arguments(parser)
    return parser


def main(opt: argparse.Namespace) -> int:
    inputs = find_inputs(opt.input_dir)
    output_dir = Path(opt.output_dir)
    if output_dir.resolve() == Path(opt.input_dir).resolve():
        raise VolumeError(
            output_dir, "is also --input_dir; outputs would be read as inputs next time, choose another folder"
        )
    generator = load_generator(opt.checkpoints_dir, opt.model_name, opt.epoch, select_device(opt.gpu_ids), opt.precision,
                               direction=opt.direction)
    print(f"model: {generator.describe()}")
    make_output_dir(output_dir)
    summary_path = output_dir / SUMMARY_FILE
    columns = CYCLE_SUMMARY_COLUMNS if len(generator.phases) > 1 else SUMMARY_COLUMNS
    rows = []
    batch = translate_folder(
        generator,
        inputs,
        output_dir,
        output_dtype=opt.output_dtype,
        frame=opt.frame,
        batch_size=opt.batch_size,
        save_slices=not opt.no_slices,
        outputs=PhaseOutputs(split_phases=opt.split_phases, mip=opt.mip, average=opt.average),
    )
    for row in tqdm(batch, total=len(inputs), desc="volumes", unit="volume"):
        rows.append(row)
        write_summary(rows, summary_path, columns)  # kept current, so an interrupted batch leaves one too
        if row.status == "failed":
            tqdm.write(f"warning: {row.error}", file=sys.stderr)
        elif opt.verbose and row.status == "ok":
            tqdm.write(f"{row.file}: {describe_stages(row.stage_seconds)}")
        if row.average_mae_hu is not None:
            tqdm.write(f"{row.file}: average of the generated phases vs the input: MAE {row.average_mae_hu:.1f} HU "
                       "in the body")
    print(f"{summarise(rows)}; summary: {summary_path}")
    return 1 if any(row.status == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
