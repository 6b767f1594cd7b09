"""Validation while training: score the generator on held-out patients, as test.py scores it.

The training loop calls, every ``--val_freq`` epochs::

    phase, cases = find_validation_cases(Path(opt.dataroot), opt.num_val)   # once, at the start
    generator = PhaseGenerator(net=netG, settings=SliceSettings.from_options(opt),
                               context_slices=opt.context_slices, device=device)
    metrics = validate(generator, cases, lpips_scorer)
    logger.info(describe_validation(metrics))

Each held-out input volume is translated whole (``PhaseGenerator.translate``, the inference
path of use_model.py and test.py) and scored against its target with
``evaluation.metrics.evaluate_patient``: MAE in the body mask, PSNR, SSIM and optionally
LPIPS, each with its ``baseline_`` twin (the input average scored as if it were the
prediction). Unlike test.py, the volume is not rounded to integer HU first.

Validation leaves training exactly as it found it: the network's train/eval mode of every
submodule, and the Python, NumPy, torch (and CUDA) random states, so a run with validation
draws the same batches, flips and dropout masks as one without.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from data.pairing import find_pairs, find_phase_pairs, grid_mismatch, nifti_files, read_pair
from data.phases import PhaseSource, read_phase
from data.volume_io import VolumeError, frame_count, read_volume
from evaluation.metrics import BASELINE_PREFIX, LPIPS_METRIC, evaluate_patient
from evaluation.perceptual import LpipsScorer
from inference.volume import PhaseGenerator
from util.runtime import capture_rng, restore_rng

logger = logging.getLogger(__name__)

# Held-out splits, in order of preference: a validation split, else the test split.
VALIDATION_PHASES = ("val", "test")
N_PATIENTS = "n_patients"


def find_validation_cases(
    dataroot: Path, max_patients: int, phases: tuple[int, ...] = (0,)
) -> tuple[str, list[tuple[Path, Path | tuple[PhaseSource, ...]]]]:
    """The held-out pairs to validate on: ``valA/`` + ``valB/`` if both exist, else ``testA/`` + ``testB/``.

    Inputs and targets pair by identical file name (as for training); the first
    ``max_patients`` pairs by name are used. The split is by patient: its files are other
    patients than training's (file names may repeat across splits, as in the demo phantom,
    where each split numbers its patients from 1).

    A model of other phases than phase 0 alone (``phases``, the run's ``--phases``) pairs each
    input with those phases of its target, in any layout of data/phases.py.

    Returns:
        ``(phase, pairs)``: ``"val"`` or ``"test"`` and the ``(input, target)`` paths (for
        ``phases`` other than ``(0,)``, ``(input, the phases' sources)``); ``("", [])`` when
        neither split exists.

    Raises:
        ValueError: ``max_patients`` is below 1.
        DatasetError: the chosen split's folders hold no NIfTI file, or no name in both.
    """
    if max_patients < 1:
        raise ValueError(f"max_patients must be at least 1, got {max_patients}")
    dataroot = Path(dataroot)
    for phase in VALIDATION_PHASES:
        folders = [dataroot / f"{phase}{side}" for side in "AB"]
        present = [folder.is_dir() for folder in folders]
        if not all(present):
            if any(present):
                logger.warning("%s has only %s/: not used for validation", dataroot, folders[present.index(True)].name)
            continue
        if tuple(phases) == (0,) and _plain_targets(dataroot / f"{phase}B"):
            pairs, unpaired = find_pairs(dataroot, phase)
        else:  # several phases, or phase 0 of targets stored as phases (4D or NAME_phase<K> files)
            unreadable: list[tuple[Path, str]] = []
            pairs, unpaired, _ = find_phase_pairs(dataroot, phase, phases, unreadable)
            for path, reason in unreadable:
                logger.warning("validation skips %s: %s", path, reason)
        if unpaired:
            logger.warning(
                "%s: %d file(s) without a partner of the same name, not validated: %s",
                dataroot,
                len(unpaired),
                ", ".join(f"{p.parent.name}/{p.name}" for p in unpaired),
            )
        return phase, pairs[:max_patients]
    return "", []


def _plain_targets(folder_b: Path) -> bool:
    """Whether every target is one 3D volume (today's layout), from file names and headers alone."""
    try:
        return all("_phase" not in path.name and frame_count(path) == 1 for path in nifti_files(folder_b).values())
    except VolumeError:
        return True  # an unreadable file: the pair is skipped with a warning when it is scored


def validate(
    generator: PhaseGenerator,
    cases: list[tuple[Path, Path | tuple[PhaseSource, ...]]],
    lpips_scorer: LpipsScorer | None = None,
) -> dict[str, float]:
    """Translate and score each case; the mean of each metric over the patients scored.

    Args:
        generator: the network (in any mode) with the slice settings it is trained with.
        cases: ``(input, target)`` NIfTI paths, as :func:`find_validation_cases` returns.
        lpips_scorer: also score LPIPS (slow on a CPU).

    Returns:
        ``{"mae_hu", "psnr_db", "ssim", "baseline_mae_hu", "baseline_psnr_db",
        "baseline_ssim"}`` (plus ``"lpips"``, ``"baseline_lpips"`` with a scorer), each the
        mean over patients (for a model of several phases, a patient's score is the mean over
        its phases), and ``"n_patients"``. Only ``{"n_patients": 0}`` when no case
        could be scored. ``psnr_db`` is ``inf`` if some volume equals its target.

    A pair that cannot be read, whose grids differ, or that cannot be translated or scored
    is skipped with a warning naming the file.
    """
    net = generator.net
    modes = {module: module.training for module in net.modules()}
    rng = capture_rng()
    net.eval()  # dropout off, norms on running statistics: as inference sees the network
    try:
        rows = [row for row in (_score_case(generator, a, b, lpips_scorer) for a, b in cases) if row is not None]
    finally:
        for module, training in modes.items():
            module.train(training)
        restore_rng(rng)
    if not rows:
        return {N_PATIENTS: 0}
    means = {key: float(np.mean([row[key] for row in rows], dtype=np.float64)) for key in rows[0]}
    return {**means, N_PATIENTS: len(rows)}


def describe_validation(metrics: dict[str, float]) -> str:
    """One line for the log that says whether the model beats the input average (by MAE) yet.

    ``validation (2 patients): MAE 24.7 HU vs input average 32.0 HU: beats the input average
    by 22.8%; PSNR 34.55 vs 30.44 dB; SSIM 0.957 vs 0.910; moving MAE 246.0 vs 559.0 HU; static
    MAE 15.2 vs 8.2 HU`` (``; LPIPS 0.081 vs 0.112`` with
    LPIPS), or ``...: does NOT beat the input average yet (MAE 40.1 vs 32.0 HU, 25.3% worse);
    ...``.
    """
    n = int(metrics.get(N_PATIENTS, 0))
    if n == 0:
        return "validation: no patient could be scored"
    head = f"validation ({n} patient{'s' if n != 1 else ''}): "
    mae, baseline = metrics["mae_hu"], metrics[BASELINE_PREFIX + "mae_hu"]
    change = (baseline - mae) / baseline * 100 if baseline > 0 else math.nan
    if mae < baseline:
        verdict = f"MAE {mae:.1f} HU vs input average {baseline:.1f} HU: beats the input average by {change:.1f}%"
    elif mae == baseline:
        verdict = f"does NOT beat the input average yet (MAE {mae:.1f} HU, the same)"
    else:
        worse = f", {-change:.1f}% worse" if math.isfinite(change) else ""
        verdict = f"does NOT beat the input average yet (MAE {mae:.1f} vs {baseline:.1f} HU{worse})"
    others = [
        f"PSNR {metrics['psnr_db']:.2f} vs {metrics[BASELINE_PREFIX + 'psnr_db']:.2f} dB",
        f"SSIM {metrics['ssim']:.3f} vs {metrics[BASELINE_PREFIX + 'ssim']:.3f}",
    ]
    for region in ("moving", "static"):
        key = f"mae_{region}_hu"
        if key in metrics:
            others.append(f"{region} MAE {metrics[key]:.1f} vs {metrics[BASELINE_PREFIX + key]:.1f} HU")
    if LPIPS_METRIC in metrics:
        others.append(f"LPIPS {metrics[LPIPS_METRIC]:.3f} vs {metrics[BASELINE_PREFIX + LPIPS_METRIC]:.3f}")
    return head + "; ".join([verdict, *others])


def _score_case(
    generator: PhaseGenerator,
    input_path: Path,
    target_path: Path | tuple[PhaseSource, ...],
    lpips_scorer: LpipsScorer | None,
) -> dict[str, float] | None:
    """evaluate_patient's scores of one pair, or None (with a warning) when it cannot be used."""
    if not isinstance(target_path, Path):
        return _score_phases(generator, input_path, target_path, lpips_scorer)
    try:
        volume, _, target = read_pair(input_path, target_path)  # (X, Y, Z) HU each
        try:
            generated, _ = generator.translate(volume)
        except ValueError as err:
            raise VolumeError(input_path, f"cannot be translated ({err})") from err
        try:
            return evaluate_patient(volume, generated, target, lpips_scorer)
        except ValueError as err:
            raise VolumeError(target_path, f"cannot be scored ({err})") from err
    except VolumeError as err:
        logger.warning("validation skips %s: %s", err.path, err.problem)
        return None


def _score_phases(
    generator: PhaseGenerator, input_path: Path, sources: tuple[PhaseSource, ...], lpips_scorer: LpipsScorer | None
) -> dict[str, float] | None:
    """The mean over the generator's phases of evaluate_patient's scores, or None (with a warning)."""
    try:
        volume, meta = read_volume(input_path)
        targets = []
        for source in sources:
            target, target_meta = read_phase(source)
            problem = grid_mismatch(input_path, meta.canonical_shape, meta.canonical_affine,
                                    source.path, target_meta.canonical_shape, target_meta.canonical_affine)
            if problem:
                raise VolumeError(source.path, problem)
            targets.append(target)
        try:
            generated, _ = generator.translate_phases(volume)  # (P, X, Y, Z) HU
        except ValueError as err:
            raise VolumeError(input_path, f"cannot be translated ({err})") from err
        try:
            rows = [evaluate_patient(volume, generated[j], target, lpips_scorer) for j, target in enumerate(targets)]
        except ValueError as err:
            raise VolumeError(sources[0].path, f"cannot be scored ({err})") from err
    except VolumeError as err:
        logger.warning("validation skips %s: %s", err.path, err.problem)
        return None
    return {key: float(np.mean([row[key] for row in rows], dtype=np.float64)) for key in rows[0]}
