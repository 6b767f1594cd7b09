"""SynthRAD-style scores of whole generated volumes against their targets, in HU.

Every score is computed on canonical (X, Y, Z) volumes in Hounsfield units (what
``data.volume_io.read_volume`` returns), after clipping both volumes to the scanner range
``[-1024, 3071]`` HU (:data:`RANGE_HU`), and only over the **body**:

* body mask (:func:`body_mask`): target voxels above -500 HU, the largest 3D connected
  component of those (drops the couch and stray noise), then holes filled slice by slice in
  the axial plane (canonical axis 2), so the lungs, which are holes in the body's outline in
  every axial slice, are inside it even where they reach the top or bottom of the volume.
  The mask comes from the *target*, so the generated volume and the baseline are scored on
  the same voxels.
* ``mae_hu``: mean |generated - target| over the mask.
* ``psnr_db``: ``skimage.metrics.peak_signal_noise_ratio`` over the mask's voxels with
  ``data_range`` 4095 HU (the width of the clipping range). It is computed inside the body,
  as the SynthRAD challenge's evaluation code does (it indexes ``gt[mask == 1]`` before
  calling skimage), not over the whole volume: air outside the body would otherwise add
  millions of near-perfect voxels and inflate it. Identical volumes score ``inf``.
* ``ssim``: 3D ``skimage.metrics.structural_similarity`` with skimage's default window, a
  **7x7x7 uniform** window (sample covariance, K1 = 0.01, K2 = 0.03), ``data_range`` 4095 HU.
  As in SynthRAD, voxels outside the mask are set to -1024 HU in both volumes, values are
  shifted to [0, 4095] (SSIM's luminance term assumes non-negative intensities), and the
  SSIM map is averaged over the mask, leaving out the 3-voxel border that skimage's own mean
  leaves out. A volume thinner than 7 voxels along some axis gets the largest odd window that
  fits (at least 3).

SynthRAD 2023 clips to [-1024, 3000] HU; this module uses [-1024, 3071], the full 12-bit CT
range and the project's ``--intensity hu`` window, so its numbers are close to but not
exactly SynthRAD's.

* ``lpips`` (optional, ``evaluate_patient(..., lpips_scorer=...)``): the learned perceptual
  distance LPIPS (AlexNet, v0.1), slice by slice in the axial plane inside the body mask's
  bounding box, mean over slices; see ``evaluation/perceptual.py``.

Where the model helps and where it hurts: the MAE is also split into three regions of the
body (:func:`motion_regions`), each scored for the model and the baseline alike:

* ``mae_lungs_hu``: body voxels whose target is below -400 HU (:data:`LUNG_THRESHOLD_HU`):
  the lungs (and any air inside the body).
* ``mae_moving_hu``: body voxels where the input and the target differ by more than
  100 HU (:data:`MOVING_THRESHOLD_HU`, about 10 standard deviations of a CT's noise, so
  noise alone does not qualify), grown by 2 voxels (:data:`MOVING_DILATION_VOXELS`) so the
  edges of what moves count as moving: the tissue that breathing displaced.
* ``mae_static_hu``: the rest of the body. There the input is already right up to noise, so
  a model must pass it through; an error above the baseline's is the model's own.

A region with no voxel scores NaN (shown as nan; ``null`` in JSON).

Each metric is also computed for the identity **baseline**: the input (the average CT)
scored against the same target, so a reader can see whether the model beats doing nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from data.body import BODY_THRESHOLD_HU, body_mask  # the one definition; re-exported here

if TYPE_CHECKING:  # evaluation.perceptual imports this module
    from evaluation.perceptual import LpipsScorer

RANGE_HU = (-1024.0, 3071.0)
DATA_RANGE_HU = RANGE_HU[1] - RANGE_HU[0]  # 4095
SSIM_WIN_SIZE = 7  # skimage's default
LUNG_THRESHOLD_HU = -400.0
MOVING_THRESHOLD_HU = 100.0
MOVING_DILATION_VOXELS = 2
REGION_METRICS = ("mae_lungs_hu", "mae_moving_hu", "mae_static_hu")
METRICS = ("mae_hu", "psnr_db", "ssim", *REGION_METRICS)  # always scored
LPIPS_METRIC = "lpips"  # scored when an LpipsScorer is given (it needs weight files)
# How each metric is named for people; "higher" says which direction is better.
METRIC_LABELS = {
    "mae_hu": "MAE (HU) in body",
    "psnr_db": "PSNR (dB) in body",
    "ssim": "SSIM in body",
    "mae_lungs_hu": "MAE (HU) in lungs",
    "mae_moving_hu": "MAE (HU) where A and B differ (moving)",
    "mae_static_hu": "MAE (HU) where A and B agree (static)",
    LPIPS_METRIC: "LPIPS in body box",
}
HIGHER_IS_BETTER = {"mae_hu": False, "psnr_db": True, "ssim": True, LPIPS_METRIC: False, **dict.fromkeys(REGION_METRICS, False)}
BASELINE_PREFIX = "baseline_"


def motion_regions(input_hu: np.ndarray, target_hu: np.ndarray, body: np.ndarray) -> dict[str, np.ndarray]:
    """(X, Y, Z) bool masks inside ``body``: ``lungs``, ``moving`` and ``static`` (see the module docstring).

    ``moving`` and ``static`` split the body in two; ``lungs`` overlaps both.
    """
    input_hu, target_hu = np.asarray(input_hu, dtype=np.float32), np.asarray(target_hu, dtype=np.float32)
    differs = np.abs(np.clip(input_hu, *RANGE_HU) - np.clip(target_hu, *RANGE_HU)) > MOVING_THRESHOLD_HU
    moving = ndimage.binary_dilation(differs & body, iterations=MOVING_DILATION_VOXELS) & body
    return {"lungs": body & (target_hu < LUNG_THRESHOLD_HU), "moving": moving, "static": body & ~moving}


def region_mae(volume_hu: np.ndarray, target_hu: np.ndarray, regions: dict[str, np.ndarray]) -> dict[str, float]:
    """``mae_<region>_hu`` of a volume against its target for each mask of :func:`motion_regions`; NaN when empty."""
    error = np.abs(np.clip(np.asarray(volume_hu, dtype=np.float64), *RANGE_HU) - np.clip(target_hu, *RANGE_HU))
    return {f"mae_{name}_hu": float(error[mask].mean()) if mask.any() else float("nan") for name, mask in regions.items()}


def ssim_win_size(shape: tuple[int, ...]) -> int:
    """skimage's 7-voxel window, or the largest odd size that fits a thinner volume.

    Raises:
        ValueError: some axis is shorter than 3 voxels.
    """
    smallest = min(shape)
    if smallest < 3:
        raise ValueError(f"SSIM needs at least 3 voxels along every axis, got shape {tuple(shape)}")
    return min(SSIM_WIN_SIZE, smallest if smallest % 2 else smallest - 1)


def score_volume(generated_hu: np.ndarray, target_hu: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """MAE, PSNR and SSIM of one volume against its target, inside the body.

    Args:
        generated_hu: (X, Y, Z) volume in HU (a model's output, or the input for the baseline).
        target_hu: (X, Y, Z) target in HU, same shape.
        mask: (X, Y, Z) bool voxels to score; default ``body_mask(target_hu)``.

    Returns:
        ``{"mae_hu": float, "psnr_db": float, "ssim": float}``; ``psnr_db`` is ``inf`` for
        identical volumes.

    Raises:
        ValueError: shapes differ, a volume holds NaN or Inf, the mask is empty, or the
            volume is too thin for SSIM.
    """
    generated_hu, target_hu = np.asarray(generated_hu), np.asarray(target_hu)
    if generated_hu.shape != target_hu.shape:
        raise ValueError(f"volume shape {generated_hu.shape} differs from the target's {target_hu.shape}")
    _check_finite("volume", generated_hu)
    _check_finite("target", target_hu)
    mask = body_mask(target_hu) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != target_hu.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the target's {target_hu.shape}")
    if not mask.any():
        raise ValueError(f"empty body mask: no target voxel above {BODY_THRESHOLD_HU:g} HU")
    win_size = ssim_win_size(target_hu.shape)
    generated = np.clip(generated_hu, *RANGE_HU).astype(np.float64)
    target = np.clip(target_hu, *RANGE_HU).astype(np.float64)

    mae = float(np.abs(generated[mask] - target[mask]).mean())
    with np.errstate(divide="ignore"):  # identical volumes: MSE 0, PSNR inf
        psnr = float(peak_signal_noise_ratio(target[mask], generated[mask], data_range=DATA_RANGE_HU))

    # Outside the body both volumes become air, then everything is shifted to [0, 4095].
    lo = RANGE_HU[0]
    _, ssim_map = structural_similarity(
        np.where(mask, target, lo) - lo,
        np.where(mask, generated, lo) - lo,
        win_size=win_size,
        data_range=DATA_RANGE_HU,
        full=True,
    )
    pad = (win_size - 1) // 2
    inner = tuple(slice(pad, n - pad) for n in mask.shape)
    values = ssim_map[inner][mask[inner]]
    if values.size == 0:  # a body that lies only in the border: use it all
        values = ssim_map[mask]
    return {"mae_hu": mae, "psnr_db": psnr, "ssim": float(values.mean(dtype=np.float64))}


def evaluate_patient(
    input_hu: np.ndarray, generated_hu: np.ndarray, target_hu: np.ndarray, lpips_scorer: LpipsScorer | None = None
) -> dict[str, float]:
    """Scores of the generated volume and of the identity baseline (the input itself).

    All three are (X, Y, Z) HU volumes on one grid; both are scored inside the target's body.

    Args:
        lpips_scorer: when given, LPIPS is scored too (``evaluation.perceptual.LpipsScorer``).

    Returns:
        ``{"mae_hu", "psnr_db", "ssim", "mae_lungs_hu", "mae_moving_hu", "mae_static_hu"}`` and
        each of those prefixed ``baseline_``, plus ``"lpips"`` and ``"baseline_lpips"`` with ``lpips_scorer``.

    Raises:
        ValueError: as :func:`score_volume`, naming the input or generated volume when it is
            the one that holds NaN or Inf.
    """
    _check_finite("input", input_hu)
    _check_finite("generated volume", generated_hu)
    mask = body_mask(target_hu)
    generated = score_volume(generated_hu, target_hu, mask)
    baseline = score_volume(input_hu, target_hu, mask)
    regions = motion_regions(input_hu, target_hu, mask)
    generated.update(region_mae(generated_hu, target_hu, regions))
    baseline.update(region_mae(input_hu, target_hu, regions))
    if lpips_scorer is not None:
        # The target's features are computed once for both volumes.
        generated[LPIPS_METRIC], baseline[LPIPS_METRIC] = lpips_scorer.score([generated_hu, input_hu], target_hu, mask)
    return {**generated, **{BASELINE_PREFIX + key: value for key, value in baseline.items()}}


def _check_finite(name: str, volume: np.ndarray) -> None:
    n_bad = volume.size - int(np.count_nonzero(np.isfinite(volume)))
    if n_bad:
        raise ValueError(f"{name} holds {n_bad} NaN or Inf voxel(s)")


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per metric, ``{"mean", "std", "median", "min", "max", "n"}`` over patients.

    Args:
        rows: one dict per patient; every numeric value is summarised, other values (such
            as ``"patient"``) are ignored. ``std`` is the population standard deviation
            (``ddof=0``), so one patient gives 0. An ``inf`` PSNR gives an ``inf`` mean.

    Raises:
        ValueError: ``rows`` is empty.
    """
    if not rows:
        raise ValueError("no rows to summarise")
    keys = [key for key, value in rows[0].items() if isinstance(value, int | float) and not isinstance(value, bool)]
    summary = {}
    for key in keys:
        values = np.array([row[key] for row in rows], dtype=np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf in the std of an inf PSNR
            summary[key] = {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "median": float(np.median(values)),
                "min": float(values.min()),
                "max": float(values.max()),
                "n": len(values),
            }
    return summary
