"""test.py for a model of the whole breathing cycle: every phase scored, the MIP, and a strip of pictures.

A model trained on several phases (``train.py --phases all``) makes P phases of one input
average. Each generated phase K is scored against target phase K exactly as a phase-0 model's
output is (evaluation/metrics.py: MAE in the body mask, PSNR, SSIM, the region split and the
identity baseline, the input average scored against the same target). So is the
maximum-intensity projection over the generated phases against the true MIP (the maximum
over the same target phases), the baseline being the input average against the true MIP.

Targets come from ``<phase>B/`` in any layout data/phases.py reads: a 4D file per patient
(frame K = phase K) or ``<patient>_phase<K>.nii.gz`` files. A model of one phase K tested
on such a layout is scored against phase K.

Rows (:func:`score_phases`) carry ``"phase"``: the phase number, or ``"mip"``
(:data:`MIP_PHASE`). :func:`mean_over_phases` gives the per-patient row that test.py's
overall table and summary use; :func:`summarise_by_phase` the per-phase summary of
metrics.json and the page's per-phase table. :func:`strip_rows` draws one coronal slice
through the diaphragm across all phases: a row of generated phases, a row of target phases
and a row of their differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.base_dataset import DatasetError
from data.pairing import grid_mismatch
from data.phases import PhaseSource, find_phase_sets, read_phase
from data.slicing import display_spacing_mm, slice_for_display, volume_to_slices
from data.volume_io import VolumeError, VolumeMeta, strip_nifti_suffix
from evaluation.metrics import evaluate_patient, summarise
from util.html import ImageCell
from util.image import (
    COLOUR_BAR_PNG,
    COLOUR_BAR_WIDTH,
    DIFFERENCE_ROW_LABEL,
    DisplayWindow,
    difference_to_rgb,
    save_png,
)

MIP_PHASE = "mip"  # the "phase" of the MIP's rows
STRIP_WIDTH_PX = 128  # display width of one phase's picture in the strip


def find_phase_targets(
    folder_b: Path,
    inputs: Sequence[Path],
    phases: tuple[int, ...],
    skipped: list[tuple[Path, str]] | None = None,
) -> tuple[dict[Path, tuple[PhaseSource, ...]], int]:
    """The target of each of ``phases`` for each input that has a phase set in ``folder_b``.

    Args:
        folder_b: ``<dataroot>/<phase>B``.
        inputs: the input files of ``<phase>A/``; a patient is an input's file stem.
        phases: the model's phases, in the order of its outputs.
        skipped: as :func:`data.phases.find_phase_sets` (``--skip_corrupted``).

    Returns:
        ``(targets, N)``: input -> the sources of ``phases`` (inputs without a target left out),
        and the targets' phase count.

    Raises:
        DatasetError: a set is mixed, incomplete or inconsistent (data/phases.py), or a phase
            of the model is beyond the targets' count.
    """
    patients = {strip_nifti_suffix(path.name): path for path in inputs}
    sets, num_phases = find_phase_sets(folder_b, patients, skipped)
    beyond = [k for k in phases if k >= num_phases]
    if sets and beyond:
        raise DatasetError(
            f"{folder_b}: the model makes phase {beyond[0]}, but the targets have {num_phases} "
            f"phase{'s' if num_phases != 1 else ''} (0..{num_phases - 1}); test on the data set it was trained for"
        )
    return {patients[name]: tuple(s.sources[k] for k in phases) for name, s in sets.items()}, num_phases


def read_targets(input_path: Path, volume: np.ndarray, meta: VolumeMeta, sources: Sequence[PhaseSource]) -> np.ndarray:
    """(P, X, Y, Z) float32 HU: the target phases, each checked to lie on the input's grid.

    Raises:
        VolumeError: a target cannot be read, or its grid differs from the input's.
    """
    targets = np.empty((len(sources), *volume.shape), dtype=np.float32)
    for k, source in enumerate(sources):
        target, target_meta = read_phase(source)
        problem = grid_mismatch(
            input_path, volume.shape, meta.canonical_affine, source.path, target.shape, target_meta.canonical_affine
        )
        if problem:
            raise VolumeError(source.path, problem)
        targets[k] = target
    return targets


def score_phases(
    input_hu: np.ndarray,
    generated_hu: np.ndarray,
    targets_hu: np.ndarray,
    phases: tuple[int, ...],
    lpips_scorer=None,
) -> list[dict]:
    """One row of scores per phase, then (for several phases) one for the MIP.

    Args:
        input_hu: (X, Y, Z) the input average.
        generated_hu, targets_hu: (P, X, Y, Z), phase ``phases[k]`` at index k.
        lpips_scorer: as :func:`~evaluation.metrics.evaluate_patient`.

    Returns:
        ``[{"phase": K, **evaluate_patient(...)}, ..., {"phase": "mip", ...}]``.

    Raises:
        ValueError: as :func:`~evaluation.metrics.evaluate_patient` (a volume with NaN/Inf, an empty body).
    """
    rows = [
        {"phase": int(phase), **evaluate_patient(input_hu, generated, target, lpips_scorer)}
        for phase, generated, target in zip(phases, generated_hu, targets_hu, strict=True)
    ]
    if len(phases) > 1:
        mip = evaluate_patient(input_hu, generated_hu.max(axis=0), targets_hu.max(axis=0), lpips_scorer)
        rows.append({"phase": MIP_PHASE, **mip})
    return rows


def mean_over_phases(rows: list[dict]) -> dict[str, float]:
    """Each metric's mean over a patient's phase rows (the MIP row left out): the patient's overall row."""
    phase_rows = [row for row in rows if row["phase"] != MIP_PHASE]
    keys = [key for key in phase_rows[0] if key != "phase"]
    return {key: float(np.mean([row[key] for row in phase_rows])) for key in keys}


def summarise_by_phase(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{"0": summary, "1": summary, ..., "mip": summary}``: :func:`~evaluation.metrics.summarise`
    of the rows of each phase, over patients, in the order the phases first appear."""
    by_phase: dict[str, list[dict]] = {}
    for row in rows:
        by_phase.setdefault(str(row["phase"]), []).append({k: v for k, v in row.items() if k != "phase"})
    return {phase: summarise(phase_rows) for phase, phase_rows in by_phase.items()}


def farthest_phase(input_hu: np.ndarray, targets_hu: np.ndarray) -> int:
    """The index of the target phase that differs most from the input (largest sum of |A - B|)."""
    return int(np.argmax([np.abs(np.nan_to_num(input_hu - target)).sum() for target in targets_hu]))


def strip_rows(
    generated_hu: np.ndarray,
    targets_hu: np.ndarray | None,
    phases: tuple[int, ...],
    y: int,
    spacing_mm: tuple[float, float, float],
    windows: list[DisplayWindow],
    patient: str,
    img_dir: Path,
) -> list[tuple[str, list[ImageCell]]]:
    """Write coronal slice ``y`` of every phase as PNGs; the rows of the page's strip.

    Per display window a row of generated phases and, with targets, a row of target phases;
    then a row of differences, generated - target, on the shared colour scale.

    Args:
        generated_hu, targets_hu: (P, X, Y, Z) HU; targets None without them.
        y: the coronal slice (canonical Y index).
        spacing_mm: the voxel size: pictures are drawn as tall as their voxels are.
    """
    row_mm, column_mm = display_spacing_mm(spacing_mm, "coronal")
    stretch = row_mm / column_mm

    def coronal(volume: np.ndarray) -> np.ndarray:  # (H, W) HU in display orientation
        return slice_for_display(volume_to_slices(volume, "coronal")[y], "coronal")

    kinds = {"generated": [coronal(v) for v in generated_hu]}
    if targets_hu is not None:
        kinds["target"] = [coronal(v) for v in targets_hu]
    rows = []
    for window in windows:
        for kind, images in kinds.items():
            cells = []
            for phase, image in zip(phases, images, strict=True):
                name = f"{patient}_strip{y:03d}_{kind}_phase{phase}_{window.key}.png"
                save_png(window(image), img_dir / name, height_scale=stretch)
                cells.append(ImageCell(name, f"phase {phase}", width=STRIP_WIDTH_PX))
            rows.append((f"{kind}, {window.label}", cells))
    if targets_hu is not None:
        cells = []
        for phase, generated, target in zip(phases, kinds["generated"], kinds["target"], strict=True):
            name = f"{patient}_strip{y:03d}_phase{phase}_minus_target.png"
            save_png(difference_to_rgb(generated - target), img_dir / name, height_scale=stretch)
            cells.append(ImageCell(name, f"phase {phase}: generated - target", width=STRIP_WIDTH_PX))
        cells.append(ImageCell(COLOUR_BAR_PNG, "colour key", width=COLOUR_BAR_WIDTH))
        rows.append((DIFFERENCE_ROW_LABEL, cells))
    return rows
