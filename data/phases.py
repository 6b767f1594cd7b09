"""The phases of a breathing cycle as targets: where each phase of a patient is stored, which
phases a run learns, and the value that tells the network which phase it is making.

A 4D-CT is N phases of one breathing cycle (usually 10), phase 0 = end-inhale. ``<phase>B/``
may hold a patient's phases in one of three layouts, all read by :func:`find_phase_sets`:

* ``<patient>.nii[.gz]``, 3D: one phase, N = 1 (the single-target layout: phase 0).
* ``<patient>.nii[.gz]``, 4D: frame K of the 4th axis is phase K (N = the number of frames).
* ``<patient>_phase<K>.nii[.gz]`` for K = 0..N-1: one 3D file per phase.

A patient's set is refused when it mixes layouts (a ``<patient>.nii.gz`` beside
``<patient>_phase<K>`` files), misses a phase, or holds a 4D per-phase file; the phase count
must be the same for every patient. ``<patient>`` is the file stem of the input in
``<phase>A/``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.base_dataset import DatasetError
from data.volume_io import VolumeError, VolumeMeta, frame_count, is_nifti_path, read_volume, strip_nifti_suffix

PHASE_FILE = re.compile(r"(?P<patient>.+)_phase(?P<phase>\d+)")  # a file stem of the per-phase layout
ALL_PHASES = "all"

# --phase_conditioning: how one generator learns several phases (with one phase, neither applies).
PHASE_CONDITIONINGS = {
    "input": "one more input channel, before the CT slices, holds phase_code(K, N); the network makes one "
    "phase per pass, and an epoch covers every (slice, phase) pair",
    "output": "one output channel per requested phase; the network makes them all in one pass, and an epoch "
    "covers every slice once",
}


@dataclass(frozen=True)
class PhaseSource:
    """Where one phase is stored: a 3D file (``frame`` None) or frame ``frame`` of a 4D file."""

    path: Path
    frame: int | None = None

    def describe(self) -> str:
        """``"trainB/p1.nii.gz[frame 3]"`` or the 3D file's path, for messages and cache names."""
        return str(self.path) if self.frame is None else f"{self.path}[frame {self.frame}]"


@dataclass(frozen=True)
class PhaseSet:
    """One patient's phases in cycle order: ``sources[K]`` is phase K."""

    patient: str
    sources: tuple[PhaseSource, ...]

    @property
    def num_phases(self) -> int:
        return len(self.sources)


def find_phase_sets(
    folder_b: Path, patients: Iterable[str], skipped: list[tuple[Path, str]] | None = None
) -> tuple[dict[str, PhaseSet], int]:
    """The phase sets of ``patients`` in ``folder_b`` and their common phase count N.

    A patient with no target file in any layout is left out of the result (the caller
    decides whether that is an error: training warns, test.py generates without scoring).
    Only file headers are read.

    Args:
        folder_b: the targets' folder (``<dataroot>/<phase>B``).
        patients: the file stems of the inputs in ``<phase>A/``.
        skipped: if given, a patient whose target file cannot be read is left out and
            ``(file, reason)`` appended here, instead of raising (``--skip_corrupted``).

    Returns:
        ``(sets, N)``: the patients' sets by name, sorted; N = 1 when no set was found.

    Raises:
        DatasetError: a set mixes layouts, misses a phase, holds a 4D per-phase file, or
            its phase count differs from the other patients'. One line naming the files.
        VolumeError: a target file is not a readable NIfTI volume (without ``skipped``).
    """
    folder_b = Path(folder_b)
    files = (
        {strip_nifti_suffix(p.name): p for p in folder_b.iterdir() if is_nifti_path(p.name) and not p.name.startswith(".")}
        if folder_b.is_dir()
        else {}
    )
    per_phase: dict[str, dict[int, Path]] = {}
    for stem, path in files.items():
        match = PHASE_FILE.fullmatch(stem)
        if match:
            per_phase.setdefault(match["patient"], {})[int(match["phase"])] = path
    sets = {}
    for patient in sorted(set(patients)):
        try:
            sources = _sources(folder_b, patient, files.get(patient), per_phase.get(patient, {}))
        except VolumeError as err:
            if skipped is None:
                raise
            skipped.append((err.path, err.problem))
            continue
        if sources:
            sets[patient] = PhaseSet(patient, sources)
    counts = Counter(s.num_phases for s in sets.values())
    if len(counts) > 1:
        common = counts.most_common(1)[0][0]
        odd = sorted(f"{p} ({s.num_phases})" for p, s in sets.items() if s.num_phases != common)
        raise DatasetError(
            f"{folder_b}: every patient must have the same number of phases; most have {common}, "
            f"but {', '.join(odd)}"
        )
    return sets, (next(iter(counts)) if counts else 1)


def _sources(folder_b: Path, patient: str, whole: Path | None, phases: dict[int, Path]) -> tuple[PhaseSource, ...]:
    """One patient's phases in order (empty without a target), checked as :func:`find_phase_sets` says."""
    if whole is not None and phases:
        raise DatasetError(
            f"{whole}: mixed layouts for patient {patient}: this file and "
            f"{len(phases)} {patient}_phase<K> file(s) beside it; keep one layout"
        )
    if whole is not None:
        n = frame_count(whole)
        return (PhaseSource(whole, None),) if n == 1 else tuple(PhaseSource(whole, k) for k in range(n))
    if not phases:
        return ()
    missing = sorted(set(range(max(phases) + 1)) - phases.keys())
    if missing:
        raise DatasetError(
            f"{folder_b}: patient {patient} has phases {_ranges(sorted(phases))} but not "
            f"{_ranges(missing)}; expected {patient}_phase0 .. {patient}_phase{max(phases)}"
        )
    for path in phases.values():
        frames = frame_count(path)
        if frames != 1:
            raise DatasetError(f"{path}: a per-phase file must be 3D, found {frames} frames")
    return tuple(PhaseSource(phases[k], None) for k in range(len(phases)))


def parse_phases(text: str, num_phases: int) -> tuple[int, ...]:
    """The phases that ``--phases`` names: ``"0"``, ``"all"`` (0..N-1) or a list ``"0,5"``.

    Returns:
        Sorted distinct phase numbers.

    Raises:
        ValueError: not a list of phase numbers, or a phase outside 0..num_phases-1.
    """
    text = str(text).strip()
    if text.lower() == ALL_PHASES:
        return tuple(range(num_phases))
    try:
        phases = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise ValueError(f"--phases {text!r}: expected 'all' or phase numbers such as 0 or 0,5") from None
    outside = [k for k in phases if not 0 <= k < num_phases]
    if outside:
        raise ValueError(
            f"--phases {text}: phase {outside[0]} is out of range; the data have "
            f"{num_phases} phase{'s' if num_phases != 1 else ''} (0..{num_phases - 1})"
        )
    return tuple(phases)


def phase_code(phase: int, num_phases: int) -> float:
    """The conditioning channel's value for phase K of N: its position in the cycle, K/N,
    mapped to the network's range [-1, 1) (phase 0 = -1).

    A single number per phase (not N one-hot channels) keeps the input one channel wider
    whatever N is, and neighbouring phases, which look alike, get neighbouring codes.
    """
    if not 0 <= phase < num_phases:
        raise ValueError(f"phase {phase} is outside 0..{num_phases - 1}")
    return 2.0 * phase / num_phases - 1.0


def conditioning_channels(num_requested: int, conditioning: str) -> tuple[int, int]:
    """``(code channels added to the input, output channels)`` of a generator that learns
    ``num_requested`` phases with ``conditioning``: (0, 1) for one phase, as before phases
    existed; (1, 1) for ``input``; (0, P) for ``output``."""
    if conditioning not in PHASE_CONDITIONINGS:
        raise ValueError(f"phase conditioning must be one of {sorted(PHASE_CONDITIONINGS)}, got {conditioning!r}")
    if num_requested <= 1:
        return 0, 1
    return (1, 1) if conditioning == "input" else (0, num_requested)


def count_phases(folder_a: Path, folder_b: Path) -> int:
    """The phase count N of the targets in ``folder_b`` of the inputs in ``folder_a``; 1 when
    either folder is missing (the data set then says what is wrong).

    Raises:
        DatasetError, VolumeError: as :func:`find_phase_sets`.
    """
    if not (Path(folder_a).is_dir() and Path(folder_b).is_dir()):
        return 1
    patients = [strip_nifti_suffix(p.name) for p in Path(folder_a).iterdir() if is_nifti_path(p.name) and not p.name.startswith(".")]
    return find_phase_sets(folder_b, patients, skipped=[])[1]  # broken files: the data set reports them


def read_phase(source: PhaseSource) -> tuple[np.ndarray, VolumeMeta]:
    """One phase as canonical (X, Y, Z) float32 HU with its meta (``read_volume``'s contract)."""
    return read_volume(source.path, frame=source.frame)


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)
