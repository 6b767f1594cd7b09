"""Translating every volume of a folder: resumable, one failure does not stop the rest.

:func:`translate_folder` yields one :class:`BatchRow` per input as it is done, in input
order, so the caller can show progress and keep ``summary.csv`` current after each file. An
input whose output volumes all exist (for a model of several phases, every file that
``--split_phases``/``--mip``/``--average`` ask for) is skipped:
:func:`~inference.volume.write_outputs` renames its volumes into place only once all are
complete, so an existing output is a complete one and an interrupted batch resumes where it stopped.

On a GPU the stages of inference/volume.py overlap on a pipeline of three threads: a reader
reads (decompresses and decodes) the next input while this thread runs the network on the
current one, and a writer compresses and writes the previous one's outputs, so the GPU waits
for neither the disk nor the compressor. On the CPU, where the network itself uses every
core, they run in turn.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from data.volume_io import VolumeError, is_nifti_path
from inference.volume import (
    DEFAULT_OUTPUTS,
    PhaseGenerator,
    PhaseOutputs,
    generate,
    output_names,
    read_input,
    timed,
    total_seconds,
    write_outputs,
)
from util.atomic import atomic_path

logger = logging.getLogger(__name__)

STATUSES = ("ok", "skipped", "failed")
SUMMARY_FILE = "summary.csv"
# Errors that concern one file; the batch records them and goes on. RuntimeError covers
# CUDA running out of memory on one large volume, OSError a file that cannot be written.
PER_FILE_ERRORS = (VolumeError, OSError, RuntimeError, MemoryError)
SUMMARY_COLUMNS = ("file", "status", "error", "slices", "seconds")
# A model of several phases writes several files per input: summary.csv says which, and the
# average's consistency check (--average).
CYCLE_SUMMARY_COLUMNS = (*SUMMARY_COLUMNS, "outputs", "average_mae_hu")


@dataclass(frozen=True)
class BatchRow:
    """One line of ``summary.csv``.

    Attributes:
        file: the input's file name.
        status: ``ok``, ``skipped`` (its output already exists) or ``failed``.
        error: why it failed; empty otherwise.
        slices: slices translated; None when skipped or failed.
        seconds: time spent on it: its stages' times added up (they overlap other files' stages).
        outputs: the volumes written (or found, when skipped), file names separated by spaces.
        average_mae_hu: with ``--average``: the generated phases' average against the input, MAE in
            the body (HU; ``TranslationResult.average_mae_hu``); None otherwise.
        stage_seconds: seconds of each stage that ran (see ``TranslationResult``); not in the CSV.
    """

    file: str
    status: str
    error: str = ""
    slices: int | None = None
    seconds: float = 0.0
    outputs: str = ""
    average_mae_hu: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict, compare=False)


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
    *,
    output_dtype: str = "int16",
    frame: int | None = None,
    batch_size: int = 8,
    save_slices: bool = True,
    outputs: PhaseOutputs = DEFAULT_OUTPUTS,
    overlap: bool | None = None,
) -> Iterator[BatchRow]:
    """Translate each input into ``output_dir``, yielding its :class:`BatchRow` once its outputs are written.

    Args:
        generator: from :func:`~inference.volume.load_generator`, loaded once for all inputs.
        inputs: NIfTI files (see :func:`find_inputs`).
        output_dir: where outputs go, as :func:`~inference.volume.write_outputs` names them.
        output_dtype, frame, batch_size, save_slices, outputs: as for :func:`~inference.volume.translate_file`.
        overlap: read the next input and write the previous one in two threads while this
            thread runs the network (at most three volumes in memory at once). False runs the
            stages one after another in this thread; the files written are the same, byte for
            byte. None (default): overlap where the network runs on a GPU. On the CPU the
            network already keeps every core busy, and threads beside it slow it down: five
            512 x 512 x 113 volumes on 2 cores took 78-82 s overlapped against 59-63 s in turn.
    """
    outputs.check(generator)
    if overlap is None:
        overlap = generator.device.type == "cuda"
    output_dir = Path(output_dir)
    plan = _plan(inputs, output_dir, tuple(generator.phases), outputs)
    to_read = iter([input_path for input_path, row in plan if row is None])
    with ExitStack() as stack:
        reader = stack.enter_context(_executor(overlap, "volume-reader"))
        writer = stack.enter_context(_executor(overlap, "volume-writer"))
        reads: deque[tuple[dict[str, float], Future]] = deque()  # started, in input order

        def read_next() -> None:
            input_path = next(to_read, None)
            if input_path is not None:
                seconds: dict[str, float] = {}
                reads.append((seconds, reader.submit(timed, seconds, "read", read_input, input_path, frame)))

        pending = None  # the previous input's write, reported once it is done: rows stay in input order
        for input_path, row in plan:
            if row is not None:
                yield from _report(pending)
                pending = None
                yield row
                continue
            if not reads:
                read_next()
            seconds, read = reads.popleft()
            if overlap:
                read_next()  # the next input is read while this one goes through the network
            try:
                volume, meta = read.result()
                generated, window = timed(seconds, "network", generate, generator, input_path, volume, batch_size)
            except PER_FILE_ERRORS as err:
                yield from _report(pending)
                pending = None
                yield _failed_row(input_path, err, seconds)
                continue
            input_volume = volume if outputs.average else None  # the average is checked against it
            del volume  # otherwise only the generated volume is written; let the input go
            write = writer.submit(
                write_outputs, generator, input_path, output_dir, generated, window, meta, output_dtype, save_slices,
                outputs, input_volume,
            )
            yield from _report(pending)
            pending = _PendingWrite(input_path, write, seconds)
            if write.done():  # written already (overlap off): report it now
                yield from _report(pending)
                pending = None
        yield from _report(pending)


@dataclass
class _PendingWrite:
    input_path: Path
    write: Future
    seconds: dict[str, float]


def _plan(
    inputs: Iterable[Path], output_dir: Path, phases: tuple[int, ...], outputs: PhaseOutputs
) -> list[tuple[Path, BatchRow | None]]:
    """Each input with its row when it is decided before any work (skipped: all its outputs
    exist; or failed for a clash of output names), else None: it is to be translated."""
    plan: list[tuple[Path, BatchRow | None]] = []
    claimed: dict[str, Path] = {}  # output name -> the input that produces it
    for input_path in inputs:
        names = list(output_names(input_path, phases, outputs).values())
        clash = next((name for name in names if name in claimed), None)
        if clash is not None:
            # patient_1.nii and patient_1.nii.gz would overwrite each other's output.
            message = f"{input_path}: same output name {clash} as {claimed[clash].name}; rename one"
            plan.append((input_path, BatchRow(input_path.name, "failed", message)))
            continue
        claimed.update(dict.fromkeys(names, input_path))
        done = all((output_dir / name).exists() for name in names)
        plan.append((input_path, BatchRow(input_path.name, "skipped", outputs=" ".join(names)) if done else None))
    return plan


def _report(pending: _PendingWrite | None) -> Iterator[BatchRow]:
    """The row of a pending write, once it is done (nothing when there is none)."""
    if pending is None:
        return
    try:
        result = pending.write.result()
    except PER_FILE_ERRORS as err:
        yield _failed_row(pending.input_path, err, pending.seconds)
        return
    seconds = {**pending.seconds, **result.stage_seconds}
    average = result.average_mae_hu
    yield BatchRow(
        pending.input_path.name,
        "ok",
        slices=result.n_slices,
        seconds=round(total_seconds(seconds), 2),
        outputs=" ".join(path.name for path in result.output_paths),
        average_mae_hu=None if average is None else round(average, 2),
        stage_seconds=seconds,
    )


def _failed_row(input_path: Path, err: BaseException, seconds: dict[str, float]) -> BatchRow:
    message = str(err) if isinstance(err, VolumeError) else f"{input_path}: {type(err).__name__}: {err}"
    logger.debug("failed: %s", message, exc_info=err)
    return BatchRow(input_path.name, "failed", message, seconds=round(total_seconds(seconds), 2), stage_seconds=seconds)


def _executor(overlap: bool, name: str) -> Executor:
    """One worker thread for a stage, or (overlap off) an executor that runs each task at once."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if overlap else _RunNow()


class _RunNow(Executor):
    """Runs each task in the calling thread when it is submitted: the stages in sequence."""

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 (kept for .result(), as a worker thread keeps it)
            future.set_exception(err)
        return future


def write_summary(rows: Iterable[BatchRow], path: str | Path, columns: tuple[str, ...] = SUMMARY_COLUMNS) -> Path:
    """Write ``rows`` as CSV, atomically.

    Args:
        columns: :data:`SUMMARY_COLUMNS` (``file,status,error,slices,seconds``), or for a model of
            several phases :data:`CYCLE_SUMMARY_COLUMNS` (adds ``outputs,average_mae_hu``).
    """
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: "" if getattr(row, column) is None else getattr(row, column) for column in columns})
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
