"""Translating every volume of a folder: resumable, one failure does not stop the rest.

:func:`translate_folder` yields one :class:`BatchRow` per input as it is done, in input
order, so the caller can show progress and keep ``summary.csv`` current after each file. An
input whose output volume already exists is skipped: :func:`~inference.volume.write_outputs`
writes the volume last and atomically, so an existing output is a complete one and an
interrupted batch resumes where it stopped.

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
    PhaseGenerator,
    generate,
    output_name,
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


@dataclass(frozen=True)
class BatchRow:
    """One line of ``summary.csv``.

    Attributes:
        file: the input's file name.
        status: ``ok``, ``skipped`` (its output already exists) or ``failed``.
        error: why it failed; empty otherwise.
        slices: slices translated; None when skipped or failed.
        seconds: time spent on it: its stages' times added up (they overlap other files' stages).
        stage_seconds: seconds of each stage that ran (see ``TranslationResult``); not in the CSV.
    """

    file: str
    status: str
    error: str = ""
    slices: int | None = None
    seconds: float = 0.0
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
    overlap: bool | None = None,
) -> Iterator[BatchRow]:
    """Translate each input into ``output_dir``, yielding its :class:`BatchRow` once its outputs are written.

    Args:
        generator: from :func:`~inference.volume.load_generator`, loaded once for all inputs.
        inputs: NIfTI files (see :func:`find_inputs`).
        output_dir: where outputs go, as :func:`~inference.volume.write_outputs` names them.
        output_dtype, frame, batch_size, save_slices: as for :func:`~inference.volume.translate_file`.
        overlap: read the next input and write the previous one in two threads while this
            thread runs the network (at most three volumes in memory at once). False runs the
            stages one after another in this thread; the files written are the same, byte for
            byte. None (default): overlap where the network runs on a GPU. On the CPU the
            network already keeps every core busy, and threads beside it slow it down: five
            512 x 512 x 113 volumes on 2 cores took 78-82 s overlapped against 59-63 s in turn.
    """
    if overlap is None:
        overlap = generator.device.type == "cuda"
    output_dir = Path(output_dir)
    plan = _plan(inputs, output_dir)
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
            del volume  # only the generated volume is written; let the input go
            write = writer.submit(
                write_outputs, generator, input_path, output_dir, generated, window, meta, output_dtype, save_slices
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


def _plan(inputs: Iterable[Path], output_dir: Path) -> list[tuple[Path, BatchRow | None]]:
    """Each input with its row when it is decided before any work (skipped, or failed for a
    clash of output names), else None: it is to be translated."""
    plan: list[tuple[Path, BatchRow | None]] = []
    claimed: dict[str, Path] = {}  # output name -> the input that produces it
    for input_path in inputs:
        name = output_name(input_path)
        if name in claimed:
            # patient_1.nii and patient_1.nii.gz would overwrite each other's output.
            message = f"{input_path}: same output name {name} as {claimed[name].name}; rename one"
            plan.append((input_path, BatchRow(input_path.name, "failed", message)))
            continue
        claimed[name] = input_path
        plan.append((input_path, BatchRow(input_path.name, "skipped") if (output_dir / name).exists() else None))
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
    yield BatchRow(
        pending.input_path.name,
        "ok",
        slices=result.n_slices,
        seconds=round(total_seconds(seconds), 2),
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


def write_summary(rows: Iterable[BatchRow], path: str | Path) -> Path:
    """Write ``rows`` as CSV (columns ``file,status,error,slices,seconds``), atomically."""
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {column: "" if getattr(row, column) is None else getattr(row, column) for column in SUMMARY_COLUMNS}
            )
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
