"""Input and target volumes that belong together: paired by file name, checked to share one grid.

``<dataroot>/<phase>A/NAME.nii[.gz]`` (the input, e.g. the average CT) pairs with
``<dataroot>/<phase>B/NAME.nii[.gz]`` (the target, e.g. phase 0). Training, validation and
test.py all pair files with :func:`find_pairs` and refuse a pair whose canonical grids differ
with :func:`grid_mismatch`, so the three cannot disagree about which files belong together.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data.base_dataset import DatasetError
from data.phases import PHASE_FILE, PhaseSource, find_phase_sets
from data.volume_io import VolumeError, VolumeMeta, is_nifti_path, read_volume, strip_nifti_suffix

logger = logging.getLogger(__name__)

# Canonical affines of a registered pair agree to far better than this (mm).
AFFINE_TOLERANCE_MM = 1e-3


def nifti_files(folder: Path) -> dict[str, Path]:
    """The ``.nii``/``.nii.gz`` files of ``folder`` by name, hidden files left out."""
    return {p.name: p for p in folder.iterdir() if is_nifti_path(p.name) and not p.name.startswith(".")}


def find_pairs(
    dataroot: Path, phase: str, *, targets_required: bool = True
) -> tuple[list[tuple[Path, Path | None]], list[Path]]:
    """Pair the files of ``<phase>A/`` and ``<phase>B/`` by name.

    Args:
        targets_required: training and validation (True): both folders must hold NIfTI
            files, and a pair is a name found in both. test.py (False): every input of
            ``<phase>A/`` is kept, with its target or None (``<phase>B/`` may be missing: the
            volumes are then generated but not scored).

    Returns:
        ``(pairs, unpaired)``: ``(input, target)`` paths sorted by name, and the files that
        have no partner (with ``targets_required=False``, only targets without an input).

    Raises:
        DatasetError: ``<phase>A/`` (or, with ``targets_required``, ``<phase>B/``) is missing or
            holds no NIfTI file, or no name is in both folders.
    """
    folder_a, folder_b = Path(dataroot) / f"{phase}A", Path(dataroot) / f"{phase}B"
    expected = f"{phase}A/ and {phase}B/" if targets_required else f"{phase}A/ (and, for metrics, {phase}B/)"
    listings = []
    for folder in (folder_a, folder_b) if targets_required else (folder_a,):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder not found; expected {expected} under --dataroot")
        files = nifti_files(folder)
        if not files:
            raise DatasetError(f"{folder}: no .nii or .nii.gz files")
        listings.append(files)
    inputs = listings[0]
    if not targets_required:
        targets = nifti_files(folder_b) if folder_b.is_dir() else {}
        unpaired = sorted(targets[name] for name in targets.keys() - inputs.keys())
        return [(inputs[name], targets.get(name)) for name in sorted(inputs)], unpaired
    targets = listings[1]
    pairs = [(inputs[name], targets[name]) for name in sorted(inputs.keys() & targets.keys())]
    unpaired = sorted([inputs[n] for n in inputs.keys() - targets.keys()] + [targets[n] for n in targets.keys() - inputs.keys()])
    if not pairs:
        raise DatasetError(f"{folder_a} and {folder_b}: no file name appears in both folders")
    return pairs, unpaired


def find_phase_pairs(
    dataroot: Path, phase: str, phases: tuple[int, ...] | list[int], skipped: list[tuple[Path, str]] | None = None
) -> tuple[list[tuple[Path, tuple[PhaseSource, ...]]], list[Path], int]:
    """Pair each input of ``<phase>A/`` with the requested phases of its target in ``<phase>B/``.

    The target may be a 3D file of the input's name (one phase), a 4D file of that name (one
    phase per frame) or one file per phase, ``NAME_phase<K>`` (data/phases.py). For 3D targets
    of the same names this pairs exactly as :func:`find_pairs` does.

    Args:
        phases: the phase numbers to serve, in order (``opt.phase_list``).
        skipped: as :func:`data.phases.find_phase_sets` (``--skip_corrupted``).

    Returns:
        ``(pairs, unpaired, N)``: ``(input, sources of the requested phases)`` sorted by the
        input's file name, the files without a partner, and the targets' phase count.

    Raises:
        DatasetError: as :func:`find_pairs`; a phase set is mixed, incomplete or of another
            count than the others'; a requested phase is beyond the targets' count.
    """
    folder_a, folder_b = Path(dataroot) / f"{phase}A", Path(dataroot) / f"{phase}B"
    for folder in (folder_a, folder_b):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder not found; expected {phase}A/ and {phase}B/ under --dataroot")
        if not nifti_files(folder):
            raise DatasetError(f"{folder}: no .nii or .nii.gz files")
    inputs = {strip_nifti_suffix(name): path for name, path in nifti_files(folder_a).items()}
    sets, num_phases = find_phase_sets(folder_b, inputs, skipped)
    # A whole-cycle or 3D target pairs by its full file name, as find_pairs does (x.nii is not x.nii.gz's).
    sets = {name: s for name, s in sets.items()
            if strip_nifti_suffix(s.sources[0].path.name) != name or s.sources[0].path.name == inputs[name].name}
    beyond = [k for k in phases if k >= num_phases]
    if sets and beyond:
        raise DatasetError(
            f"{folder_b}: --phases asks for phase {beyond[0]}, but the targets have {num_phases} "
            f"phase{'s' if num_phases != 1 else ''} (0..{num_phases - 1})"
        )
    pairs = sorted(
        ((inputs[name], tuple(sets[name].sources[k] for k in phases)) for name in sets), key=lambda pair: pair[0].name
    )
    used = {source.path for phase_set in sets.values() for source in phase_set.sources}
    broken = {path for path, _ in skipped or ()}
    broken_patients = {_patient_of(path) for path in broken}
    unpaired = sorted(
        [path for name, path in inputs.items() if name not in sets and name not in broken_patients]
        + [path for path in nifti_files(folder_b).values() if path not in used and path not in broken]
    )
    if not pairs and not broken:
        raise DatasetError(f"{folder_a} and {folder_b}: no file name appears in both folders")
    return pairs, unpaired, num_phases


def _patient_of(target: Path) -> str:
    """The patient a target file belongs to: ``p1.nii.gz`` and ``p1_phase3.nii.gz`` -> ``p1``."""
    stem = strip_nifti_suffix(target.name)
    match = PHASE_FILE.fullmatch(stem)
    return match["patient"] if match else stem


def grid_mismatch(
    input_path: Path,
    input_shape: tuple[int, ...],
    input_affine: np.ndarray,
    target_path: Path,
    target_shape: tuple[int, ...],
    target_affine: np.ndarray,
) -> str | None:
    """Why an input and its target cannot be compared voxel by voxel, or None if they can.

    The canonical (X, Y, Z) shapes must be equal. Canonical affines that differ by more than
    :data:`AFFINE_TOLERANCE_MM` are allowed, with a warning that the pair may be misregistered.
    """
    if tuple(target_shape) != tuple(input_shape):
        return f"grid {tuple(target_shape)} differs from {input_path.parent.name}'s {tuple(input_shape)}; register the pair first"
    if not np.allclose(input_affine, target_affine, atol=AFFINE_TOLERANCE_MM):
        logger.warning(
            "%s: affine differs from %s's (max difference %.3g mm): the pair may be misregistered",
            target_path,
            input_path.parent.name,
            np.abs(np.asarray(input_affine) - np.asarray(target_affine)).max(),
        )
    return None


def read_pair(input_path: Path, target_path: Path | None) -> tuple[np.ndarray, VolumeMeta, np.ndarray | None]:
    """``(input, input_meta, target)``: an input volume and its target (None without a path), in HU.

    Both are canonical (X, Y, Z) float32, checked with :func:`grid_mismatch`.

    Raises:
        VolumeError: a file cannot be read, or the target's grid differs from the input's.
    """
    volume, meta = read_volume(input_path)
    if target_path is None:
        return volume, meta, None
    target, target_meta = read_volume(target_path)
    problem = grid_mismatch(
        input_path, volume.shape, meta.canonical_affine, target_path, target.shape, target_meta.canonical_affine
    )
    if problem:
        raise VolumeError(target_path, problem)
    return volume, meta, target
