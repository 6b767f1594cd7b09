"""The results of ``test.py``: every test volume generated, scored and shown on a results page.

For each of the first ``--num_test`` volumes of ``<dataroot>/<phase>A/`` (sorted by file
name), the trained generator (loaded once from ``<checkpoints_dir>/<name>/``) makes its
phase-0 volume, which is written next to the page. Where ``<phase>B/`` holds a volume of the
same name (the real phase 0), the generated volume and the identity baseline (the input
average itself) are scored against it (see ``evaluation/metrics.py``).

Output, in ``<results_dir>/<name>/<phase>_<epoch>/`` (``<epoch>`` is ``iter_<n>`` with
``--load_iter n``):

* ``volumes/<patient>_phase0.nii.gz``: the generated volume on the input's grid (``--output_dtype``).
* ``index.html`` and ``images/``: a metrics table at the top, and the MAE split by region
  (body, lungs, moving, static; see ``evaluation/metrics.py``), generated beside input
  average; then for each patient its own region split, one coronal view (see
  :func:`coronal_index`) and ``--num_images`` evenly spaced slices along the model's slice
  axis. Each view is a grid: one row per display window (``--display_window``, by default
  lung -1350..150 HU and soft tissue -160..240 HU) holding input, generated and target, then
  a row of differences, generated - target and input - target, on one diverging colour scale
  (+-500 HU, ``util/image.py``) with its colour bar. Pictures are resampled so that a pixel is
  as tall as its voxel (in mm) is, e.g. a coronal view of 2.7 x 2.7 x 6 mm voxels is drawn
  2.2 times taller than it has slices.
* ``metrics.csv`` (one row per scored patient) and ``metrics.json`` (rows and summary), only
  when at least one patient has a target. Scores are of the volume as written (rounded to
  integer HU with ``--output_dtype int16``). ``--lpips`` adds LPIPS (``lpips``,
  ``baseline_lpips``) when its weight files are in place (evaluation/perceptual.py), and is
  skipped with one log line naming the missing file otherwise.

A model of several phases (``train.py --phases all``), or targets stored as phases (a 4D file
per patient, or ``<patient>_phase<K>.nii.gz``; data/phases.py), is tested phase by phase
(evaluation/phases.py): ``volumes/<patient>_phases.nii.gz`` (4D, frame k = the k-th phase)
and ``<patient>_mip.nii.gz``; every phase scored against its target and the MIP against the
true MIP; ``metrics.csv`` has one row per patient and phase (``phase`` column, ``mip`` for the
MIP), ``metrics.json`` adds ``phases``, ``phase_rows`` and ``phase_summary`` (its
``patients``/``summary`` hold each patient's mean over phases); the page adds a table per
phase and, per patient, one coronal slice through the diaphragm across all phases (generated,
target, difference) and the generated against the true MIP.

A file that cannot be read, a pair whose grids differ, or a volume that cannot be generated
or scored stops the run with one line naming the file, or is skipped with a warning under
``--skip_corrupted``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.base_dataset import DatasetError
from data.pairing import find_pairs, read_pair
from data.phases import PhaseSource
from data.slicing import SLICE_AXES, display_spacing_mm, slice_for_display, volume_to_slices
from data.unaligned_nifti_dataset import volume_files
from data.volume_io import VolumeError, read_volume, strip_nifti_suffix, write_volume
from evaluation.metrics import (
    BASELINE_PREFIX,
    BODY_THRESHOLD_HU,
    HIGHER_IS_BETTER,
    LPIPS_METRIC,
    LUNG_THRESHOLD_HU,
    METRIC_LABELS,
    METRICS,
    MOVING_DILATION_VOXELS,
    MOVING_THRESHOLD_HU,
    RANGE_HU,
    REGION_METRICS,
    evaluate_patient,
    summarise,
)
from evaluation.perceptual import LpipsScorer
from evaluation.phases import (
    MIP_PHASE,
    farthest_phase,
    find_phase_targets,
    mean_over_phases,
    read_targets,
    score_phases,
    strip_rows,
    summarise_by_phase,
)
from inference.volume import PhaseGenerator, load_generator
from util import run_folder
from util.html import HTML, ImageCell
from util.image import (
    COLOUR_BAR_PNG,
    COLOUR_BAR_WIDTH,
    DEFAULT_DISPLAY_WINDOWS,
    DIFFERENCE_RANGE_HU,
    DIFFERENCE_ROW_LABEL,
    DisplayWindow,
    colour_bar,
    difference_to_rgb,
    parse_display_windows,
    save_png,
)

logger = logging.getLogger(__name__)

IMAGE_KINDS = ("input", "generated", "target")
# The difference maps: each of these kinds minus the target, in HU.
DIFFERENCE_KINDS = ("generated", "input")
BODY_DEFINITION = f"target > {BODY_THRESHOLD_HU:g} HU, largest connected component, holes filled per axial slice"
# The MAE split of the page: (region, metric, which voxels), as evaluation/metrics.py defines them.
REGIONS = (
    ("body", "mae_hu", f"the body: {BODY_DEFINITION}"),
    ("lungs", "mae_lungs_hu", f"body voxels whose target is below {LUNG_THRESHOLD_HU:g} HU"),
    (
        "moving",
        "mae_moving_hu",
        f"body voxels where |input - target| > {MOVING_THRESHOLD_HU:g} HU, grown by "
        f"{MOVING_DILATION_VOXELS} voxels: what breathing moved",
    ),
    ("static", "mae_static_hu", "the rest of the body: there the input is already right up to noise"),
)
METRIC_FORMATS = {
    "mae_hu": "{:.1f}",
    "psnr_db": "{:.2f}",
    "ssim": "{:.4f}",
    LPIPS_METRIC: "{:.4f}",
    **dict.fromkeys(REGION_METRICS, "{:.1f}"),
}
METRIC_DESCRIPTIONS = {
    "mae_hu": "mean |generated - target| in the body mask",
    "psnr_db": "skimage peak_signal_noise_ratio over the body mask's voxels, data_range 4095 HU",
    "ssim": "skimage structural_similarity, 3D 7x7x7 uniform window, data_range 4095 HU, mean over the body mask",
    LPIPS_METRIC: "LPIPS v0.1 (AlexNet), axial slices of the body mask's bounding box mapped to [-1, 1], mean over slices",
    "mae_lungs_hu": f"mean |generated - target| over body voxels whose target is below {LUNG_THRESHOLD_HU:g} HU",
    "mae_moving_hu": f"mean |generated - target| where |input - target| > {MOVING_THRESHOLD_HU:g} HU, "
    f"dilated by {MOVING_DILATION_VOXELS} voxels, in the body",
    "mae_static_hu": "mean |generated - target| over the rest of the body (where the input is right up to noise)",
}


@dataclass
class SliceView:
    """The pictures of one slice, as the page shows them: one row per display window, then differences."""

    title: str  # e.g. "axial slice 6 of 12"
    rows: list[tuple[str, list[ImageCell]]]  # (row label, pictures)


@dataclass
class PatientResult:
    """One generated volume and what was shown and scored of it."""

    patient: str
    input_path: Path
    output_path: Path
    target_path: Path | None
    metrics: dict[str, float] | None  # evaluate_patient's keys; None without a target
    views: list[SliceView] = field(default_factory=list)  # the coronal view, then the slices along the model's axis
    # Tested phase by phase (evaluation/phases.py): one row per phase and the MIP's; ``metrics``
    # is then their mean over phases.
    phase_rows: list[dict] | None = None


@dataclass
class TestReport:
    """What a test run wrote; ``summary`` is None when no patient had a target."""

    web_dir: Path
    page: Path
    checkpoint: str
    slice_axis: str
    patients: list[PatientResult]
    skipped: list[tuple[Path, str]]
    summary: dict[str, dict[str, float]] | None
    metric_names: tuple[str, ...] = METRICS  # METRICS, plus "lpips" when it was scored
    phases: tuple[int, ...] = (0,)  # the model's phases
    phase_summary: dict[str, dict] | None = None  # tested phase by phase: summarise_by_phase's

    def summary_lines(self) -> list[str]:
        """What the script prints at the end: the mean scores, then where the results are."""
        lines = [f"{len(self.patients)} volume(s) generated, {len(self.skipped)} skipped"]
        if self.phase_summary is not None:
            for phase, stats in self.phase_summary.items():
                who = "MIP vs true MIP" if phase == MIP_PHASE else f"phase {phase}"
                lines.append(f"{who}: MAE (HU) in body generated {_mean_std('mae_hu', stats['mae_hu'])}, input "
                             f"average {_mean_std('mae_hu', stats[BASELINE_PREFIX + 'mae_hu'])}")
            if self.summary is not None:
                lines.append("mean over phases:")
        if self.summary is not None:
            for metric in self.metric_names:
                ours, baseline = self.summary[metric], self.summary[BASELINE_PREFIX + metric]
                lines.append(
                    f"{METRIC_LABELS[metric]}: generated {_mean_std(metric, ours)}, "
                    f"input average {_mean_std(metric, baseline)} (n = {ours['n']})"
                )
        else:
            lines.append("no targets: no metrics")
        lines.append(f"results page: {self.page}")
        return lines


def checkpoint_label(opt: argparse.Namespace) -> str:
    """The checkpoint's prefix: ``iter_<n>`` with ``--load_iter n``, else ``--epoch``."""
    return run_folder.checkpoint_label(opt.epoch, opt.load_iter)


def results_folder(opt: argparse.Namespace) -> Path:
    """``<results_dir>/<name>/<phase>_<epoch>/``."""
    return Path(opt.results_dir) / opt.name / f"{opt.phase}_{checkpoint_label(opt)}"


def find_test_volumes(dataroot: Path, phase: str, num_test: int) -> list[tuple[Path, Path | None]]:
    """The first ``num_test`` volumes of ``<phase>A/`` by name, each with its ``<phase>B/`` partner or None.

    Files pair by name as for training (data/pairing.py), but an input needs no target.

    Raises:
        DatasetError: ``<phase>A/`` is missing or holds no NIfTI file.
    """
    pairs, unused = find_pairs(dataroot, phase, targets_required=False)
    folder_a, folder_b = Path(dataroot) / f"{phase}A", Path(dataroot) / f"{phase}B"
    if len(pairs) > num_test:
        logger.info(
            "--num_test %d: testing the first %d of the %d volumes in %s (by name), %d left out; "
            "raise --num_test to test them all",
            num_test,
            num_test,
            len(pairs),
            folder_a,
            len(pairs) - num_test,
        )
    if not folder_b.is_dir():
        logger.info("%s not found: volumes are generated but not scored", folder_b)
    elif unused:
        logger.warning(
            "%s: %d file(s) without an input of the same name, not used: %s",
            folder_b,
            len(unused),
            ", ".join(p.name for p in unused),
        )
    return pairs[:num_test]


def generator_choice(opt: argparse.Namespace, saved: dict) -> dict:
    """``load_generator``'s ``direction``/``net_name`` for test.py: ``--model test --model_suffix``
    names the file's generator (upstream's TestModel); a cycle_gan run's G_A or G_B follows
    ``--direction``; a pix2pix run's one G is always used (its direction is the run's)."""
    if getattr(opt, "model", None) == "test" and getattr(opt, "model_suffix", None) is not None:
        return {"net_name": "G" + opt.model_suffix}
    if saved.get("model") == "cycle_gan":
        return {"direction": opt.direction}
    return {}


def test_cases(opt: argparse.Namespace, saved: dict) -> list[tuple[Path, Path | None]]:
    """(input, target or None) volumes to test: ``--dataset_mode single_nifti`` translates the volumes
    of ``--dataroot`` itself, unscored (upstream's single mode); a cycle_gan run tested ``--direction
    BtoA`` reads ``<phase>B/`` and scores against ``<phase>A/``; else :func:`find_test_volumes`."""
    if getattr(opt, "dataset_mode", None) == "single_nifti":
        try:
            files = volume_files(Path(opt.dataroot))
        except DatasetError as err:
            raise DatasetError(f"{err} (--dataset_mode single_nifti reads the volumes of --dataroot itself)") from None
        return [(path, None) for path in files[: opt.num_test]]
    cases = find_test_volumes(Path(opt.dataroot), opt.phase, opt.num_test)
    if saved.get("model") == "cycle_gan" and opt.direction == "BtoA":
        cases = [(target, source) for source, target in cases if target is not None]
    return cases


def csv_columns(metric_names: tuple[str, ...] = METRICS) -> tuple[str, ...]:
    """metrics.csv's columns: the patient, each metric, then each metric's baseline."""
    return ("patient", *metric_names, *(BASELINE_PREFIX + m for m in metric_names))


def display_slices(n_slices: int, num_images: int) -> list[int]:
    """``num_images`` evenly spaced slice indices: the centres of equal parts of the volume.

    One image shows the middle slice; asking for more images than slices shows them all.
    """
    if num_images >= n_slices:
        return list(range(n_slices))
    return [int((i + 0.5) * n_slices / num_images) for i in range(num_images)]


def display_windows(opt: argparse.Namespace) -> list[DisplayWindow]:
    """The CT windows the pictures are shown in: ``--display_window`` (lung and soft tissue by default)."""
    return parse_display_windows(getattr(opt, "display_window", DEFAULT_DISPLAY_WINDOWS))


def coronal_index(volume: np.ndarray, target: np.ndarray | None) -> tuple[int, str]:
    """The coronal slice (canonical Y index) that the page shows, and why, in words.

    With a target: the slice where input and target differ most (largest sum of |A - B| over
    the slice). Breathing moves the diaphragm and what lies on it up and down, so that slice
    cuts through the diaphragm where it moves most. Without one: the slice through the body's
    centre (the mean Y of the voxels above -500 HU), or the middle slice if there is none.
    """
    if target is not None:
        difference = np.abs(np.nan_to_num(volume - target)).sum(axis=(0, 2))  # (Y,)
        if difference.max() > 0:
            return int(difference.argmax()), "where input and target differ most (through the moving diaphragm)"
    body = np.flatnonzero((volume > BODY_THRESHOLD_HU).sum(axis=(0, 2)))
    if body.size == 0:
        return volume.shape[1] // 2, "the middle slice"
    weights = (volume > BODY_THRESHOLD_HU).sum(axis=(0, 2))[body]
    return int(np.rint(np.average(body, weights=weights))), "through the body's centre"


def run_test(opt: argparse.Namespace, device: torch.device) -> TestReport:
    """Generate, score and show the test volumes that ``opt`` names (see the module docstring), on ``device``.

    Raises:
        CheckpointError: the run folder or its weights are missing or do not fit.
        DatasetError: a test folder is missing or empty, a file is unusable (without
            ``--skip_corrupted``), or no volume could be used at all.
    """
    checkpoint = checkpoint_label(opt)
    saved = run_folder.load_options(Path(opt.checkpoints_dir) / opt.name) or {}
    generator = load_generator(opt.checkpoints_dir, opt.name, checkpoint, device, **generator_choice(opt, saved))
    _warn_ignored_flags(opt)
    # None (after one log line naming the missing file) when LPIPS's weights are not in place.
    lpips_scorer = LpipsScorer.from_torchvision_cache(generator.device) if getattr(opt, "lpips", False) else None
    cases = test_cases(opt, saved)
    skipped: list[tuple[Path, str]] = []
    targets = phase_targets(opt, saved, cases, generator, skipped)  # None: one 3D target per input, as always
    web_dir = results_folder(opt)
    volumes_dir = web_dir / "volumes"
    volumes_dir.mkdir(parents=True, exist_ok=True)
    page = HTML(web_dir, title=f"Experiment = {opt.name}, Phase = {opt.phase}, Epoch = {checkpoint}")
    save_png(colour_bar(), page.img_dir / COLOUR_BAR_PNG)
    skip_corrupted = getattr(opt, "skip_corrupted", False)

    metric_names = (*METRICS, LPIPS_METRIC) if lpips_scorer is not None else METRICS
    results = []
    for input_path, target_path in cases:
        start = time.time()
        patient = strip_nifti_suffix(input_path.name)
        try:
            if targets is None:
                result = _test_one(
                    generator, patient, input_path, target_path, volumes_dir, page.img_dir, opt, lpips_scorer
                )
            else:
                result = _test_phases(
                    generator, patient, input_path, targets.get(input_path), volumes_dir, page.img_dir, opt,
                    lpips_scorer,
                )
        except VolumeError as err:
            if not skip_corrupted:
                raise DatasetError(f"{err} (pass --skip_corrupted to skip such files)") from err
            logger.warning("skipping %s: %s", err.path, err.problem)
            skipped.append((err.path, err.problem))
            continue
        results.append(result)
        scores = "" if result.metrics is None else "; " + _scores_text(result.metrics, metric_names)
        logger.info("%s: %.1f s -> %s%s", patient, time.time() - start, result.output_path, scores)
    if not results:
        raise DatasetError(f"{opt.dataroot}: no usable test volume ({len(skipped)} skipped)")

    rows = [{"patient": r.patient, **r.metrics} for r in results if r.metrics is not None]
    summary = summarise(rows) if rows else None
    phase_rows = [{"patient": r.patient, **row} for r in results for row in r.phase_rows or ()]
    report = TestReport(
        web_dir,
        web_dir / "index.html",
        checkpoint,
        generator.settings.slice_axis,
        results,
        skipped,
        summary,
        metric_names,
        tuple(generator.phases),
        summarise_by_phase(phase_rows) if phase_rows else None,
    )
    _write_metrics(report, rows, phase_rows)
    _write_page(page, report, opt)
    return report


def _test_one(
    generator: PhaseGenerator,
    patient: str,
    input_path: Path,
    target_path: Path | None,
    volumes_dir: Path,
    img_dir: Path,
    opt: argparse.Namespace,
    lpips_scorer: LpipsScorer | None = None,
) -> PatientResult:
    """Generate, write, score and picture one volume. Every problem is a VolumeError."""
    volume, meta, target = read_pair(input_path, target_path)  # (X, Y, Z) HU; target None without a path
    try:
        generated, _ = generator.translate(volume)
    except ValueError as err:
        raise VolumeError(input_path, f"cannot be translated ({err})") from err
    if opt.output_dtype == "int16":
        generated = np.rint(generated)  # score and show the volume as written

    metrics = None
    if target is not None:
        try:
            metrics = evaluate_patient(volume, generated, target, lpips_scorer)
        except ValueError as err:
            raise VolumeError(target_path, f"cannot be scored ({err})") from err
    output_path = write_volume(volumes_dir / f"{patient}_phase0.nii.gz", generated, meta, dtype=opt.output_dtype)
    views = _views(volume, generated, target, meta.spacing_mm, generator.settings.slice_axis, patient, opt, img_dir)
    return PatientResult(patient, input_path, output_path, target_path, metrics, views)


def _views(
    volume: np.ndarray,
    generated: np.ndarray,
    target: np.ndarray | None,
    spacing_mm: tuple[float, float, float],
    axis: str,
    patient: str,
    opt: argparse.Namespace,
    img_dir: Path,
    label: str = "",
) -> list[SliceView]:
    """A patient's coronal view (see :func:`coronal_index`), then ``--num_images`` slices along ``axis``.

    Args:
        label: put before each title and picture name (e.g. ``"phase 3"``), for a model of several phases.
    """
    windows = display_windows(opt)
    volumes = {kind: v for kind, v in zip(IMAGE_KINDS, (volume, generated, target)) if v is not None}
    prefix, stem = (f"{label}, ", label.replace(" ", "") + "_") if label else ("", "")
    y, why = coronal_index(volume, target)
    title = f"{prefix}coronal slice {y} of {volume.shape[1]}, {why}"
    views = [picture_view(volumes, "coronal", y, title, patient, f"{stem}coronal{y:03d}", spacing_mm, windows, img_dir)]
    n_slices = volume.shape[SLICE_AXES[axis]]
    for k in display_slices(n_slices, opt.num_images):
        title = f"{prefix}{axis} slice {k} of {n_slices}"
        views.append(picture_view(volumes, axis, k, title, patient, f"{stem}slice{k:03d}", spacing_mm, windows, img_dir))
    return views


def phase_targets(
    opt: argparse.Namespace,
    saved: dict,
    cases: list[tuple[Path, Path | None]],
    generator: PhaseGenerator,
    skipped: list[tuple[Path, str]],
) -> dict[Path, tuple[PhaseSource, ...]] | None:
    """The target of each of the model's phases per input, when the test is one phase by phase:
    a model of several phases, or of one phase K, or targets stored as phases (data/phases.py).
    None for one 3D target of phase 0 per input (tested as always), for unscored single
    volumes and for a cycle_gan run tested BtoA.

    Raises:
        DatasetError: a phase set is mixed, incomplete or inconsistent, or a file in ``<phase>B/``
            cannot be read (without ``--skip_corrupted``; with it, the file is added to ``skipped``).
    """
    if getattr(opt, "dataset_mode", None) == "single_nifti" or (
        saved.get("model") == "cycle_gan" and getattr(opt, "direction", "AtoB") == "BtoA"
    ):
        return None
    folder_b = Path(opt.dataroot) / f"{opt.phase}B"
    found: list[tuple[Path, str]] = []
    try:
        targets, num_phases = find_phase_targets(
            folder_b, [input_path for input_path, _ in cases], tuple(generator.phases),
            found if getattr(opt, "skip_corrupted", False) else None,
        )
    except VolumeError as err:
        raise DatasetError(f"{err} (pass --skip_corrupted to skip such files)") from err
    if num_phases == 1 and tuple(generator.phases) == (0,):
        return None  # 3D targets: paired and read as always (files that cannot be read are found then)
    skipped.extend(found)
    return targets


def _test_phases(
    generator: PhaseGenerator,
    patient: str,
    input_path: Path,
    sources: tuple[PhaseSource, ...] | None,
    volumes_dir: Path,
    img_dir: Path,
    opt: argparse.Namespace,
    lpips_scorer: LpipsScorer | None = None,
) -> PatientResult:
    """:func:`_test_one` phase by phase (evaluation/phases.py): generate the model's phases, write
    them (4D) and their MIP, score each phase and the MIP, picture a strip across phases. Every
    problem is a VolumeError."""
    volume, meta = read_volume(input_path)
    targets = read_targets(input_path, volume, meta, sources) if sources is not None else None  # (P, X, Y, Z)
    phases = tuple(generator.phases)
    try:
        generated = generator.translate_phases(volume)[0] if len(phases) > 1 else generator.translate(volume)[0][None]
    except ValueError as err:
        raise VolumeError(input_path, f"cannot be translated ({err})") from err
    if opt.output_dtype == "int16":
        generated = np.rint(generated)  # score and show the volumes as written

    rows = metrics = None
    if targets is not None:
        try:
            rows = score_phases(volume, generated, targets, phases, lpips_scorer)
        except ValueError as err:
            raise VolumeError(sources[0].path, f"cannot be scored ({err})") from err
        metrics = mean_over_phases(rows)
    axis = generator.settings.slice_axis
    if len(phases) == 1:
        output_path = write_volume(volumes_dir / f"{patient}_phase{phases[0]}.nii.gz", generated[0], meta,
                                   dtype=opt.output_dtype)
        target = None if targets is None else targets[0]
        views = _views(volume, generated[0], target, meta.spacing_mm, axis, patient, opt, img_dir)
        return PatientResult(patient, input_path, output_path, sources and sources[0].path, metrics, views, rows)

    output_path = write_volume(volumes_dir / f"{patient}_phases.nii.gz", np.moveaxis(generated, 0, -1), meta,
                               dtype=opt.output_dtype, phases=phases, num_phases=generator.num_phases)
    mip = generated.max(axis=0)
    write_volume(volumes_dir / f"{patient}_mip.nii.gz", mip, meta, dtype=opt.output_dtype)

    # The strip through the diaphragm: the coronal slice where the input differs most from the
    # phase farthest from it; the phase pictures below are of that phase too.
    k = 0 if targets is None else farthest_phase(volume, targets)
    y, why = coronal_index(volume, None if targets is None else targets[k])
    windows = display_windows(opt)
    where = f"coronal slice {y} of {volume.shape[1]}, {why} in phase {phases[k]}"
    views = [SliceView(f"every phase, {where}",
                       strip_rows(generated, targets, phases, y, meta.spacing_mm, windows, patient, img_dir))]
    true_mip = None if targets is None else targets.max(axis=0)
    mip_volumes = {kind: v for kind, v in zip(IMAGE_KINDS, (volume, mip, true_mip)) if v is not None}
    views.append(picture_view(mip_volumes, "coronal", y, f"MIP over phases (input: the average), {where}", patient,
                              f"mip_coronal{y:03d}", meta.spacing_mm, windows, img_dir))
    target = None if targets is None else targets[k]
    views += _views(volume, generated[k], target, meta.spacing_mm, axis, patient, opt, img_dir, f"phase {phases[k]}")
    return PatientResult(patient, input_path, output_path, sources and sources[0].path, metrics, views, rows)


def picture_view(
    volumes: dict[str, np.ndarray],
    slice_axis: str,
    index: int,
    title: str,
    patient: str,
    stem: str,
    spacing_mm: tuple[float, float, float],
    windows: list[DisplayWindow],
    img_dir: Path,
) -> SliceView:
    """Write the PNGs of slice ``index`` along ``slice_axis`` and say how the page lays them out.

    Args:
        volumes: ``{"input": ..., "generated": ..., "target": ...}`` canonical (X, Y, Z) HU;
            without a target, no difference row.
        stem: the pictures' file names start ``<patient>_<stem>_``.
        spacing_mm: the voxel size along X, Y, Z: pictures are stretched to their true shape.
    """
    row_mm, column_mm = display_spacing_mm(spacing_mm, slice_axis)
    # (H, W) HU each, in display orientation
    slices = {
        kind: slice_for_display(volume_to_slices(v, slice_axis)[index], slice_axis) for kind, v in volumes.items()
    }
    where = f"{patient} {slice_axis} slice {index}"
    rows = []
    for window in windows:
        cells = []
        for kind, image in slices.items():
            name = f"{patient}_{stem}_{kind}_{window.key}.png"
            save_png(window(image), img_dir / name, height_scale=row_mm / column_mm)
            cells.append(ImageCell(name, f"{where}: {kind}"))
        rows.append((window.label, cells))
    if "target" in slices:
        cells = []
        for kind in DIFFERENCE_KINDS:
            name = f"{patient}_{stem}_{kind}_minus_target.png"
            save_png(
                difference_to_rgb(slices[kind] - slices["target"]), img_dir / name, height_scale=row_mm / column_mm
            )
            cells.append(ImageCell(name, f"{where}: {kind} - target"))
        cells.append(ImageCell(COLOUR_BAR_PNG, "colour key", width=COLOUR_BAR_WIDTH))
        rows.append((DIFFERENCE_ROW_LABEL, cells))
    return SliceView(title, rows)


def _warn_ignored_flags(opt: argparse.Namespace) -> None:
    """Say so when a model-defining flag differs from what the run was trained with.

    The generator is rebuilt from the run folder's train_opt.json, whose values win; the test
    options take them as defaults (options/test_options.py), so a difference was given on the
    command line.
    """
    saved = run_folder.load_options(Path(opt.checkpoints_dir) / opt.name) or {}
    for key in run_folder.MODEL_DEFINING_OPTIONS:
        if key == "direction" and saved.get("model") == "cycle_gan":
            continue  # a cycle_gan run translates both ways: --direction picks G_A or G_B
        if key == "model" and getattr(opt, "model", None) == "test":
            continue  # upstream's test model: one generator of the run, whatever the run's model
        if key in saved and hasattr(opt, key) and getattr(opt, key) != saved[key]:
            logger.warning(
                "--%s %s differs from the run's --%s %s (train_opt.json); testing with the run's value",
                key,
                getattr(opt, key),
                key,
                saved[key],
            )


def _write_metrics(report: TestReport, rows: list[dict], phase_rows: list[dict] | None = None) -> None:
    """metrics.csv (a row per patient; tested phase by phase, a row per patient and phase) and metrics.json."""
    csv_path, json_path = report.web_dir / "metrics.csv", report.web_dir / "metrics.json"
    if not rows:
        # A results folder reused by a run without targets must not show stale scores.
        csv_path.unlink(missing_ok=True)
        json_path.unlink(missing_ok=True)
        return
    columns = csv_columns(report.metric_names)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=(columns[0], "phase", *columns[1:]) if phase_rows else columns)
        writer.writeheader()
        writer.writerows(phase_rows or rows)
    document = {
        "checkpoint": report.checkpoint,
        "metrics": {
            "range_hu": list(RANGE_HU),
            "mask": BODY_DEFINITION,
            **{metric: METRIC_DESCRIPTIONS[metric] for metric in report.metric_names},
            "baseline": "the input (average CT) scored against the same target",
        },
        "patients": rows,
        "summary": report.summary,
        "without_target": [r.patient for r in report.patients if r.metrics is None],
        "skipped": [{"path": str(path), "reason": reason} for path, reason in report.skipped],
        "non_finite": "null stands for inf (identical volumes) or nan",
    }
    if phase_rows:
        document["phases"] = list(report.phases)
        document["metrics"]["phases"] = (
            "phase_rows: each generated phase scored against its target phase, and (phase 'mip') the maximum over "
            "the generated phases against the maximum over the target phases, the baseline being the input average "
            "against the same; phase_summary: their mean, std, ... over patients; patients and summary: each "
            "patient's mean over phases"
        )
        document["phase_rows"] = phase_rows
        document["phase_summary"] = report.phase_summary
    json_path.write_text(json.dumps(_finite_or_none(document), indent=2, allow_nan=False) + "\n")


def _write_page(page: HTML, report: TestReport, opt: argparse.Namespace) -> None:
    page.add_header(f"{opt.name}: {opt.phase} set, checkpoint {report.checkpoint}")
    if report.summary is not None:
        page.add_text(
            "Scores inside the body (target > -500 HU, holes filled), HU clipped to [-1024, 3071]. "
            "'input average' is the identity baseline: the input scored against the same target. "
            + (
                "LPIPS: axial slices of the body's bounding box, mean over slices. "
                if LPIPS_METRIC in report.metric_names
                else ""
            )
            + ", ".join(
                f"{METRIC_LABELS[m]}: {'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better"
                for m in report.metric_names
            )
            + "."
        )
        names = report.metric_names
        header = ["patient"] + [
            f"{METRIC_LABELS[m].split(' in body')[0]} {who}" for m in names for who in ("generated", "input average")
        ]
        rows = [
            [r.patient] + [_format(m, r.metrics[key]) for m in names for key in (m, BASELINE_PREFIX + m)]
            for r in report.patients
            if r.metrics is not None
        ]
        rows.append(
            ["mean ± std"] + [_mean_std(m, report.summary[key]) for m in names for key in (m, BASELINE_PREFIX + m)]
        )
        page.add_table_rows(header, rows)
    else:
        page.add_text(f"No {opt.phase}B/ targets: volumes were generated but not scored.")
    if report.phase_summary is not None:
        n = report.summary["mae_hu"]["n"]
        page.add_header(f"Each phase against its target, and the MIP against the true MIP: mean ± std over {n} patient(s)")
        page.add_text("The table above is each patient's mean over phases. 'input average' is the identity baseline: "
                      "the input scored against each phase (and against the true MIP).")
        page.add_table_rows(*_phase_table(report.phase_summary, report.metric_names, _mean_std))
    without = [r.patient for r in report.patients if r.metrics is None]
    if without and report.summary is not None:
        page.add_text(f"No target in {opt.phase}B/, generated but not scored: {', '.join(without)}")
    for path, reason in report.skipped:
        page.add_text(f"Skipped {path}: {reason}")
    if report.summary is not None:
        n = report.summary["mae_hu"]["n"]
        page.add_header(f"Where the model helps and where it hurts: MAE (HU) by region, mean ± std over {n} patient(s)")
        page.add_table_rows(*_region_table(lambda key: report.summary[key], _mean_std))
    windows = display_windows(opt)
    page.add_text(
        f"Pictures: one coronal slice per patient, then {report.slice_axis} slices, each shown in the "
        + " and the ".join(w.label for w in windows)
        + " (--display_window picks others: lung, soft_tissue, bone, full, or two numbers in HU). "
        f"Differences in HU, generated - target and input - target, on one colour scale: blue where the picture is "
        f"darker (lower HU) than the target, white where they agree, red where it is brighter; saturated beyond "
        f"±{DIFFERENCE_RANGE_HU:g} HU. Pixels are drawn as tall as their voxels are in mm. "
        f"Volumes: {report.web_dir / 'volumes'}"
    )
    for result in report.patients:
        page.add_header(result.patient + ("" if result.metrics is not None else " (no target)"))
        if result.phase_rows is not None and len(result.phase_rows) > 1:
            by_phase = {str(row["phase"]): row for row in result.phase_rows}
            page.add_table_rows(*_phase_table(by_phase, report.metric_names, _format))
        if result.metrics is not None:
            page.add_table_rows(*_region_table(lambda key, r=result: r.metrics[key], _format))
        for view in result.views:
            page.add_text(f"{result.patient}, {view.title}")
            page.add_image_grid(view.rows, width=opt.display_winsize)
    page.save()


def _phase_table(by_phase: dict[str, dict], names: tuple[str, ...], show) -> tuple[list[str], list[list[str]]]:
    """The page's "phase | MAE generated | MAE input average | change | PSNR ... " table.

    Args:
        by_phase: phase (``"0"``, ..., ``"mip"``) -> metric key -> what ``show`` formats.
        show: ``(metric, value) -> str``.
    """
    header = ["phase"] + [
        f"{METRIC_LABELS[m].split(' in body')[0]} {who}" for m in names for who in ("generated", "input average")
    ] + ["MAE generated vs input average"]
    rows = [
        ["MIP vs true MIP" if phase == MIP_PHASE else phase]
        + [show(m, values[key]) for m in names for key in (m, BASELINE_PREFIX + m)]
        + [_change(values["mae_hu"], values[BASELINE_PREFIX + "mae_hu"])]
        for phase, values in by_phase.items()
    ]
    return header, rows


def _region_table(value, show) -> tuple[list[str], list[list[str]]]:
    """The page's "region | voxels | generated | input average | change" table.

    Args:
        value: metric key -> what ``show`` formats (a patient's number, or the summary's stats).
        show: ``(metric, value) -> str``.
    """
    header = ["region", "voxels", "MAE (HU) generated", "MAE (HU) input average", "generated vs input average"]
    rows = []
    for region, metric, voxels in REGIONS:
        ours, baseline = value(metric), value(BASELINE_PREFIX + metric)
        rows.append([region, voxels, show(metric, ours), show(metric, baseline), _change(ours, baseline)])
    return header, rows


def _change(ours, baseline) -> str:
    """``"48% lower (better)"``: the generated MAE relative to the input average's."""
    ours, baseline = (v["mean"] if isinstance(v, dict) else v for v in (ours, baseline))
    if not (math.isfinite(ours) and math.isfinite(baseline)) or baseline == 0:
        return "-"
    change = (ours - baseline) / baseline * 100
    if abs(change) < 0.5:
        return "the same"
    return f"{abs(change):.0f}% {'lower (better)' if change < 0 else 'higher (worse)'}"


def _format(metric: str, value: float) -> str:
    return METRIC_FORMATS[metric].format(value) if math.isfinite(value) else str(value)


def _mean_std(metric: str, stats: dict[str, float]) -> str:
    return f"{_format(metric, stats['mean'])} ± {_format(metric, stats['std'])}"


def _scores_text(metrics: dict[str, float], metric_names: tuple[str, ...]) -> str:
    return ", ".join(
        f"{m} {_format(m, metrics[m])} (input {_format(m, metrics[BASELINE_PREFIX + m])})" for m in metric_names
    )


def _finite_or_none(value):
    """A JSON-safe copy: inf and nan become None (JSON has no such numbers)."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
