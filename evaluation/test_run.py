"""The test run behind ``test.py``: generate every test volume, score it, write a results page.

For each of the first ``--num_test`` volumes of ``<dataroot>/<phase>A/`` (sorted by file
name), the trained generator (loaded once from ``<checkpoints_dir>/<name>/``) makes its
phase-0 volume, which is written next to the page. Where ``<phase>B/`` holds a volume of the
same name (the real phase 0), the generated volume and the identity baseline (the input
average itself) are scored against it (see ``evaluation/metrics.py``).

Output, in ``<results_dir>/<name>/<phase>_<epoch>/`` (``<epoch>`` is ``iter_<n>`` with
``--load_iter n``):

* ``volumes/<patient>_phase0.nii.gz``: the generated volume on the input's grid (``--output_dtype``).
* ``index.html`` and ``images/``: a metrics table at the top, then for each patient
  ``--num_images`` evenly spaced slices along the model's slice axis, input, generated and
  target side by side. Every PNG uses one fixed window, -1024..3071 HU (the range the metrics
  clip to), so images are comparable across patients, models and ``--intensity`` modes.
* ``metrics.csv`` (one row per scored patient) and ``metrics.json`` (rows and summary), only
  when at least one patient has a target. Scores are of the volume as written (rounded to
  integer HU with ``--output_dtype int16``). ``--lpips`` adds LPIPS (``lpips``,
  ``baseline_lpips``) when its weight files are in place (evaluation/perceptual.py), and is
  skipped with one log line naming the missing file otherwise.

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

from data.base_dataset import DatasetError
from data.intensity import HUWindow
from data.slicing import slice_for_display, volume_to_slices
from data.volume_io import VolumeError, VolumeMeta, is_nifti_path, read_volume, strip_nifti_suffix, write_volume
from evaluation.metrics import (
    BASELINE_PREFIX,
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
from inference.volume import PhaseGenerator, load_generator
from util import run_folder
from util.html import HTML
from util.image import save_png

logger = logging.getLogger(__name__)

DISPLAY_WINDOW = HUWindow(*RANGE_HU)
IMAGE_KINDS = ("input", "generated", "target")
METRIC_FORMATS = {"mae_hu": "{:.1f}", "psnr_db": "{:.2f}", "ssim": "{:.4f}", LPIPS_METRIC: "{:.4f}",
                  **dict.fromkeys(REGION_METRICS, "{:.1f}")}
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
# Canonical affines of a registered pair agree to far better than this (mm).
AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class PatientResult:
    """One generated volume and what was shown and scored of it."""

    patient: str
    input_path: Path
    output_path: Path
    target_path: Path | None
    metrics: dict[str, float] | None  # evaluate_patient's keys; None without a target
    images: list[tuple[int, list[str]]] = field(default_factory=list)  # (slice, PNG names in IMAGE_KINDS order)


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

    def summary_lines(self) -> list[str]:
        """What the script prints at the end: the mean scores, then where the results are."""
        lines = [f"{len(self.patients)} volume(s) generated, {len(self.skipped)} skipped"]
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

    Raises:
        DatasetError: ``<phase>A/`` is missing or holds no NIfTI file.
    """
    folder_a, folder_b = Path(dataroot) / f"{phase}A", Path(dataroot) / f"{phase}B"
    if not folder_a.is_dir():
        raise DatasetError(
            f"{folder_a}: folder not found; expected {phase}A/ (and, for metrics, {phase}B/) under --dataroot"
        )
    inputs = sorted(p for p in folder_a.iterdir() if is_nifti_path(p.name) and not p.name.startswith("."))
    if not inputs:
        raise DatasetError(f"{folder_a}: no .nii or .nii.gz files")
    if not folder_b.is_dir():
        logger.info("%s not found: volumes are generated but not scored", folder_b)
        return [(path, None) for path in inputs[:num_test]]
    targets = {p.name: p for p in folder_b.iterdir() if is_nifti_path(p.name) and not p.name.startswith(".")}
    unused = sorted(targets.keys() - {p.name for p in inputs})
    if unused:
        logger.warning(
            "%s: %d file(s) without an input of the same name, not used: %s", folder_b, len(unused), ", ".join(unused)
        )
    return [(path, targets.get(path.name)) for path in inputs[:num_test]]


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


def run_test(opt: argparse.Namespace) -> TestReport:
    """Generate, score and show the test volumes that ``opt`` names (see the module docstring).

    Raises:
        CheckpointError: the run folder or its weights are missing or do not fit.
        DatasetError: a test folder is missing or empty, a file is unusable (without
            ``--skip_corrupted``), or no volume could be used at all.
    """
    checkpoint = checkpoint_label(opt)
    generator = load_generator(opt.checkpoints_dir, opt.name, checkpoint, opt.gpu_ids)
    _warn_ignored_flags(opt, generator)
    # None (after one log line naming the missing file) when LPIPS's weights are not in place.
    lpips_scorer = LpipsScorer.from_torchvision_cache(generator.device) if getattr(opt, "lpips", False) else None
    cases = find_test_volumes(Path(opt.dataroot), opt.phase, opt.num_test)
    web_dir = results_folder(opt)
    volumes_dir = web_dir / "volumes"
    volumes_dir.mkdir(parents=True, exist_ok=True)
    page = HTML(web_dir, title=f"Experiment = {opt.name}, Phase = {opt.phase}, Epoch = {checkpoint}")
    skip_corrupted = getattr(opt, "skip_corrupted", False)

    metric_names = (*METRICS, LPIPS_METRIC) if lpips_scorer is not None else METRICS
    results, skipped = [], []
    for input_path, target_path in cases:
        start = time.time()
        patient = strip_nifti_suffix(input_path.name)
        try:
            result = _test_one(
                generator, patient, input_path, target_path, volumes_dir, page.img_dir, opt, lpips_scorer
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
    report = TestReport(
        web_dir,
        web_dir / "index.html",
        checkpoint,
        generator.settings.slice_axis,
        results,
        skipped,
        summary,
        metric_names,
    )
    _write_metrics(report, rows)
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

    axis = generator.settings.slice_axis
    stacks = [volume_to_slices(v, axis) for v in (volume, generated, target) if v is not None]  # (N, H, W) each
    images = []
    for k in display_slices(stacks[0].shape[0], opt.num_images):
        names = []
        for kind, stack in zip(IMAGE_KINDS, stacks):
            name = f"{patient}_slice{k:03d}_{kind}.png"
            pixels = np.rint(DISPLAY_WINDOW(slice_for_display(stack[k], axis))).astype(np.uint8)
            save_png(pixels, img_dir / name)
            names.append(name)
        images.append((k, names))
    return PatientResult(patient, input_path, output_path, target_path, metrics, images)


def read_pair(input_path: Path, target_path: Path | None) -> tuple[np.ndarray, VolumeMeta, np.ndarray | None]:
    """``(input, input_meta, target)``: an input volume and its target (None without a path), in HU.

    Both are canonical (X, Y, Z) float32. A target whose canonical affine differs from the
    input's (by more than 1e-3 mm) is used, with a warning that the pair may be misregistered.

    Raises:
        VolumeError: a file cannot be read, or the target's grid differs from the input's.
    """
    volume, meta = read_volume(input_path)
    if target_path is None:
        return volume, meta, None
    target, target_meta = read_volume(target_path)
    if target.shape != volume.shape:
        raise VolumeError(
            target_path,
            f"grid {target.shape} differs from {input_path.parent.name}'s {volume.shape}; register the pair first",
        )
    if not np.allclose(meta.canonical_affine, target_meta.canonical_affine, atol=AFFINE_TOLERANCE_MM):
        logger.warning(
            "%s: affine differs from %s's: the pair may be misregistered", target_path, input_path.parent.name
        )
    return volume, meta, target


def _warn_ignored_flags(opt: argparse.Namespace, generator: PhaseGenerator) -> None:
    """Say so when a flag given on the command line differs from what the run was trained with.

    The generator is rebuilt from the run folder's train_opt.json, whose values win.
    """
    settings = generator.settings
    given = {
        "--slice_axis": "axial" if getattr(opt, "axial_slice", False) else getattr(opt, "slice_axis", None),
        "--resize_to": getattr(opt, "resize_to", None),
        "--intensity": getattr(opt, "intensity", None),
        "--context_slices": getattr(opt, "context_slices", None),
    }
    trained = {
        "--slice_axis": settings.slice_axis,
        "--resize_to": settings.resize_to,
        "--intensity": settings.intensity,
        "--context_slices": generator.context_slices,
    }
    for flag, value in given.items():
        if value is not None and value != trained[flag]:
            logger.warning(
                "%s %s differs from the run's %s %s (train_opt.json); testing with the run's value",
                flag,
                value,
                flag,
                trained[flag],
            )


def _write_metrics(report: TestReport, rows: list[dict]) -> None:
    csv_path, json_path = report.web_dir / "metrics.csv", report.web_dir / "metrics.json"
    if not rows:
        # A results folder reused by a run without targets must not show stale scores.
        csv_path.unlink(missing_ok=True)
        json_path.unlink(missing_ok=True)
        return
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(report.metric_names))
        writer.writeheader()
        writer.writerows(rows)
    document = {
        "checkpoint": report.checkpoint,
        "metrics": {
            "range_hu": list(RANGE_HU),
            "mask": "target > -500 HU, largest connected component, holes filled per axial slice",
            **{metric: METRIC_DESCRIPTIONS[metric] for metric in report.metric_names},
            "baseline": "the input (average CT) scored against the same target",
        },
        "patients": rows,
        "summary": report.summary,
        "without_target": [r.patient for r in report.patients if r.metrics is None],
        "skipped": [{"path": str(path), "reason": reason} for path, reason in report.skipped],
        "non_finite": "null stands for inf (identical volumes) or nan",
    }
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
    without = [r.patient for r in report.patients if r.metrics is None]
    if without and report.summary is not None:
        page.add_text(f"No target in {opt.phase}B/, generated but not scored: {', '.join(without)}")
    for path, reason in report.skipped:
        page.add_text(f"Skipped {path}: {reason}")
    page.add_text(
        f"Images: {report.slice_axis} slices in the fixed window {RANGE_HU[0]:g}..{RANGE_HU[1]:g} HU. "
        f"Volumes: {report.web_dir / 'volumes'}"
    )
    for result in report.patients:
        page.add_header(result.patient + ("" if result.metrics is not None else " (no target)"))
        for k, names in result.images:
            captions = [f"{result.patient} slice {k}: {kind}" for kind in IMAGE_KINDS[: len(names)]]
            page.add_images(names, captions, names, width=opt.display_winsize)
    page.save()


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
