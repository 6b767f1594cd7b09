"""Translating every volume of a folder: resumable, one failure does not stop the rest.

:func:`translate_folder` yields one :class:`BatchRow` per input as it is done, so the
caller can show progress and keep ``summary.csv`` current after each file. An input whose
output volume already exists is skipped: :func:`~inference.volume.translate_file` writes
the volume last and atomically, so an existing output is a complete one and an
interrupted batch resumes where it stopped.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from data.volume_io import VolumeError, is_nifti_path
from inference.volume import PhaseGenerator, output_name, translate_file
from util.atomic import atomic_path

logger = logging.getLogger(__name__)

STATUSES = ("ok", "skipped", "failed")
SUMMARY_FILE = "summary.csv"
# Errors that concern one file; the batch records them and goes on. RuntimeError covers
# CUDA running out of memory on one large volume, OSError a file that cannot be written.
PER_FILE_ERRORS = (VolumeError, OSError, RuntimeError, MemoryError)


@dataclass(frozen=True)
class BatchRow:
    """One line of ``summary.csv``.

    Attributes:
        file: the input's file name.
        status: ``ok``, ``skipped`` (its output already exists) or ``failed``.
        error: why it failed; empty otherwise.
        slices: slices translated; None when skipped or failed.
        seconds: time spent on it.
    """

    file: str
    status: str
    error: str = ""
    slices: int | None = None
    seconds: float = 0.0


def find_inputs(input_dir: str | Path) -> list[Path]:
    """The ``.nii``/``.nii.gz`` files directly in ``input_dir``, sorted by name (hidden files skipped).

    Raises:
        VolumeError: ``input_dir`` is not a folder or holds no NIfTI file.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise VolumeError(input_dir, "input folder not found" if not input_dir.exists() else "is not a folder")
    inputs = sorted(p for p in input_dir.iterdir() if is_nifti_path(p) and not p.name.startswith(".") and p.is_file())
    if not inputs:
        raise VolumeError(input_dir, "holds no .nii or .nii.gz file")
    return inputs


def translate_folder(
    generator: PhaseGenerator,
    inputs: Iterable[Path],
    output_dir: str | Path,
    **translate_options,
) -> Iterator[BatchRow]:
    """Translate each input into ``output_dir``, yielding its :class:`BatchRow` when done.

    Args:
        generator: from :func:`~inference.volume.load_generator`, loaded once for all inputs.
        inputs: NIfTI files (see :func:`find_inputs`).
        output_dir: where outputs go, as :func:`~inference.volume.translate_file` names them.
        translate_options: passed on to :func:`~inference.volume.translate_file`
            (``output_dtype``, ``frame``, ``batch_size``, ``save_slices``).
    """
    output_dir = Path(output_dir)
    claimed: dict[str, Path] = {}  # output name -> the input that produces it
    for input_path in inputs:
        name = output_name(input_path)
        if name in claimed:
            # patient_1.nii and patient_1.nii.gz would overwrite each other's output.
            yield BatchRow(
                input_path.name, "failed", f"{input_path}: same output name {name} as {claimed[name].name}; rename one"
            )
            continue
        claimed[name] = input_path
        if (output_dir / name).exists():
            yield BatchRow(input_path.name, "skipped")
            continue
        start = time.time()
        try:
            result = translate_file(generator, input_path, output_dir, **translate_options)
        except PER_FILE_ERRORS as err:
            message = str(err) if isinstance(err, VolumeError) else f"{input_path}: {type(err).__name__}: {err}"
            logger.debug("failed: %s", message, exc_info=True)
            yield BatchRow(input_path.name, "failed", message, seconds=round(time.time() - start, 2))
            continue
        yield BatchRow(input_path.name, "ok", slices=result.n_slices, seconds=round(result.seconds, 2))


def write_summary(rows: Iterable[BatchRow], path: str | Path) -> Path:
    """Write ``rows`` as CSV (columns ``file,status,error,slices,seconds``), atomically."""
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(BatchRow)])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return path


def read_summary(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``summary.csv`` as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summarise(rows: Iterable[BatchRow]) -> str:
    """``"4 files: 2 ok, 1 skipped (exists), 1 failed"``."""
    rows = list(rows)
    counts = Counter(row.status for row in rows)
    labels = {"ok": "ok", "skipped": "skipped (exists)", "failed": "failed"}
    return f"{len(rows)} files: " + ", ".join(f"{counts[s]} {labels[s]}" for s in STATUSES)
