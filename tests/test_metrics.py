"""evaluation.metrics: body mask, MAE/PSNR/SSIM in HU, the identity baseline and summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datasets.make_phantom import HU, make_patient
from evaluation.metrics import (
    DATA_RANGE_HU,
    HIGHER_IS_BETTER,
    LPIPS_METRIC,
    METRIC_LABELS,
    body_mask,
    evaluate_patient,
    motion_regions,
    score_volume,
    ssim_win_size,
    summarise,
)


def thorax(shape=(32, 32, 10)) -> np.ndarray:
    """(X, Y, Z) HU: an elliptical soft-tissue body with two lungs, in air."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    volume = np.full(shape, -1000.0, dtype=np.float32)
    volume[(x / 0.8) ** 2 + (y / 0.6) ** 2 < 1] = 40.0
    for centre in (-0.35, 0.35):
        volume[((x - centre) / 0.25) ** 2 + (y / 0.35) ** 2 < 1] = -850.0
    volume[..., ::3] += 300.0  # some structure along Z as well
    return volume


def test_identical_volumes_score_perfectly():
    target = thorax()
    scores = score_volume(target, target)
    assert scores["mae_hu"] == 0.0
    assert scores["psnr_db"] == math.inf
    assert scores["ssim"] == pytest.approx(1.0)


def test_offset_of_10_hu_inside_the_body_gives_mae_10():
    target = thorax()
    mask = body_mask(target)
    generated = target + 10.0 * mask
    scores = score_volume(generated, target)
    assert scores["mae_hu"] == pytest.approx(10.0)
    # PSNR is taken over the body's voxels only: MSE there is exactly 10^2.
    assert scores["psnr_db"] == pytest.approx(20 * math.log10(DATA_RANGE_HU / 10.0))
    assert 0.0 < scores["ssim"] < 1.0


def test_error_outside_the_body_is_not_scored():
    target = thorax()
    generated = np.where(body_mask(target), target, target + 200.0)
    scores = score_volume(generated, target)
    assert scores["mae_hu"] == 0.0 and scores["psnr_db"] == math.inf
    assert scores["ssim"] == pytest.approx(1.0)


def test_values_are_clipped_to_the_scanner_range():
    target = thorax()
    generated = target.copy()
    target[10:14, 10:14, :] = 3071.0  # dense bone at the top of the range...
    generated[10:14, 10:14, :] = 5000.0  # ...overshot: the same after clipping
    generated[target == -850.0] = -3000.0  # below the range: becomes -1024 ...
    target[target == -850.0] = -1100.0  # ... as does this
    scores = score_volume(generated, target, mask=np.ones(target.shape, dtype=bool))
    assert scores["mae_hu"] == 0.0
    assert scores["ssim"] == pytest.approx(1.0)


def test_body_mask_of_a_phantom_includes_the_lungs_and_excludes_the_air():
    _, phase0 = make_patient(np.random.default_rng(3), (48, 48, 10), (8.0, 8.0, 12.0), num_phases=4, noise_sd_hu=0)
    mask = body_mask(phase0)
    lungs = phase0 == HU["lung"]
    assert lungs.sum() > 100
    assert mask[lungs].all()
    assert not mask[phase0 == HU["air"]].any()


def test_body_mask_keeps_the_largest_component_and_fills_holes_per_axial_slice():
    volume = thorax()
    volume[:2, :, :] = 500.0  # a "couch" along one side, not touching the body
    mask = body_mask(volume)
    assert not mask[:2].any()
    lungs = volume == -850.0
    lungs[..., ::3] = False  # the +300 slices hold no -850 voxels
    assert mask[lungs].all()  # the lungs reach both ends of Z and are still filled
    assert not mask[2, 0, 0]


def test_empty_body_is_an_error():
    air = np.full((8, 8, 8), -1000.0)
    assert not body_mask(air).any()
    with pytest.raises(ValueError, match="empty body mask"):
        score_volume(air, air)


@pytest.mark.parametrize(("shape", "win"), [((32, 32, 10), 7), ((32, 32, 6), 5), ((32, 32, 5), 5), ((32, 32, 3), 3)])
def test_ssim_window_shrinks_to_fit_thin_volumes(shape, win):
    assert ssim_win_size(shape) == win
    target = thorax(shape)
    assert score_volume(target, target)["ssim"] == pytest.approx(1.0)


def test_ssim_refuses_a_volume_thinner_than_3_voxels():
    with pytest.raises(ValueError, match="at least 3 voxels"):
        score_volume(thorax((32, 32, 2)), thorax((32, 32, 2)))


def test_nan_voxels_are_an_error_that_names_the_volume():
    target = thorax()
    holed = target.copy()
    holed[5, 5, 5] = np.nan
    with pytest.raises(ValueError, match="target holds 1 NaN"):
        score_volume(target, holed)
    with pytest.raises(ValueError, match="input holds 1 NaN"):
        evaluate_patient(holed, target, target)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs from the target"):
        score_volume(thorax((32, 32, 10)), thorax((32, 32, 9)))


def test_evaluate_patient_scores_the_model_and_the_identity_baseline():
    target = thorax()
    average = target + 30.0 * body_mask(target)
    generated = target + 10.0 * body_mask(target)
    row = evaluate_patient(average, generated, target)
    scored = {"mae_hu", "psnr_db", "ssim", "mae_lungs_hu", "mae_moving_hu", "mae_static_hu"}
    assert set(row) == scored | {"baseline_" + key for key in scored}
    assert row["mae_hu"] == pytest.approx(10.0) and row["baseline_mae_hu"] == pytest.approx(30.0)
    assert row["psnr_db"] > row["baseline_psnr_db"]
    assert row["ssim"] > row["baseline_ssim"]


def test_region_mae_splits_the_body_into_what_moved_and_what_did_not():
    """A 'lesion' present only in the target moves; the model fixes it but adds 6 HU where nothing moved."""
    target = thorax((40, 40, 12))
    body = body_mask(target)
    average = target.copy()
    lesion = np.zeros_like(body)
    lesion[8:12, 18:22, 4:8] = True  # inside the left lung
    target[lesion] = 30.0  # 880 HU above the lung around it: far above the 100 HU threshold
    generated = target + 6.0 * (body & ~lesion)
    row = evaluate_patient(average, generated, target)
    regions = motion_regions(average, target, body)
    # The moving region is the lesion grown by the dilation, inside the body; static is the rest.
    assert regions["moving"][lesion].all() and regions["moving"].sum() > lesion.sum()
    assert not (regions["moving"] & regions["static"]).any()
    assert (regions["moving"] | regions["static"])[body].all()
    assert row["baseline_mae_moving_hu"] > 100.0 and row["mae_moving_hu"] < row["baseline_mae_moving_hu"]
    # Where nothing moved the input was exact: the model's own 6 HU show up there, and only there.
    assert row["baseline_mae_static_hu"] == 0.0 and row["mae_static_hu"] == pytest.approx(6.0)
    # The lungs are the target's air-filled tissue: the lesion is not in them, the added 6 HU are.
    assert row["mae_lungs_hu"] == pytest.approx(6.0) and row["baseline_mae_lungs_hu"] == 0.0


def test_an_empty_region_scores_nan():
    target = thorax()
    row = evaluate_patient(target, target, target)  # nothing differs: nothing moves
    assert math.isnan(row["mae_moving_hu"]) and row["mae_static_hu"] == 0.0


class RecordingLpips:
    """Stands in for evaluation.perceptual.LpipsScorer: records what it is asked to score."""

    def __init__(self):
        self.calls = []

    def score(self, volumes, target_hu, mask):
        self.calls.append((volumes, target_hu, mask))
        return [0.25, 0.5]


def test_evaluate_patient_adds_lpips_of_both_volumes_with_a_scorer():
    target = thorax()
    average, generated = target + 30.0 * body_mask(target), target + 10.0 * body_mask(target)
    scorer = RecordingLpips()
    row = evaluate_patient(average, generated, target, lpips_scorer=scorer)
    assert row[LPIPS_METRIC] == 0.25 and row["baseline_" + LPIPS_METRIC] == 0.5
    [(volumes, scored_target, mask)] = scorer.calls  # one call: the target's features are made once
    assert volumes[0] is generated and volumes[1] is average and scored_target is target
    assert np.array_equal(mask, body_mask(target))
    assert "lpips" not in evaluate_patient(average, generated, target)
    assert not HIGHER_IS_BETTER[LPIPS_METRIC] and "LPIPS" in METRIC_LABELS[LPIPS_METRIC]


def test_summarise_gives_mean_std_median_min_max_per_metric():
    rows = [{"patient": "p1", "mae_hu": 10.0}, {"patient": "p2", "mae_hu": 20.0}, {"patient": "p3", "mae_hu": 60.0}]
    summary = summarise(rows)
    assert set(summary) == {"mae_hu"}
    assert summary["mae_hu"] == pytest.approx(
        {"mean": 30.0, "std": float(np.std([10, 20, 60])), "median": 20.0, "min": 10.0, "max": 60.0, "n": 3}
    )
    assert summarise(rows[:1])["mae_hu"]["std"] == 0.0
    with pytest.raises(ValueError):
        summarise([])
