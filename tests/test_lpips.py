"""evaluation.perceptual: LPIPS of HU volumes, slice by slice in the body's bounding box, never downloading."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO, run_script
from torch import nn

from evaluation.metrics import body_mask
from evaluation.perceptual import ALEXNET_FILE, AlexNetFeatures, LpipsScorer, body_box, lpips_package_weights


class TinyBackbone(nn.Module):
    """Two small random convolution stages, standing in for AlexNet (no weights needed)."""

    channels = (4, 6)

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.inputs: list[tuple[int, ...]] = []  # shape of every batch it saw

    def forward(self, x):
        self.inputs.append(tuple(x.shape))
        first = torch.relu(self.conv1(x))
        return [first, torch.relu(self.conv2(first))]


def tiny_scorer(**kwargs) -> LpipsScorer:
    return LpipsScorer(TinyBackbone(), [torch.ones(c) for c in TinyBackbone.channels], **kwargs)


def body(shape=(40, 36, 10), box=((6, 30), (8, 28), (2, 8))) -> np.ndarray:
    """(X, Y, Z) HU: air with a soft-tissue block over ``box`` and some structure in it."""
    volume = np.full(shape, -1000.0, dtype=np.float32)
    (x0, x1), (y0, y1), (z0, z1) = box
    volume[x0:x1, y0:y1, z0:z1] = 40.0
    volume[x0 + 4 : x0 + 9, y0 + 3 : y0 + 8, z0:z1] = -850.0  # a "lung"
    volume[x0 + 12 : x0 + 15, y0 + 10 : y0 + 14, z0:z1] = 700.0  # a "bone"
    return volume


@pytest.fixture
def no_torch_hub(tmp_path, monkeypatch):
    """torch's hub folder points at an empty tmp folder: no cached weights, as on CI."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_identical_volumes_score_zero_and_a_perturbed_one_more():
    target = body()
    noisy = target + np.random.default_rng(0).normal(0, 80, target.shape).astype(np.float32)
    same, perturbed = tiny_scorer().score([target.copy(), noisy], target, body_mask(target))
    assert abs(same) < 1e-6
    assert perturbed > 1e-3


def test_slices_of_the_bounding_box_are_scored_as_viewed_in_batches():
    target = body(box=((6, 30), (8, 28), (2, 8)))  # 24 x 20 voxels over slices 2..7
    scorer = tiny_scorer(batch_size=4, min_size_px=1)
    scorer.score([target], target)
    # Per batch: the target, then the volume. Display orientation: rows along Y, columns along X.
    assert scorer.backbone.inputs == [(4, 3, 20, 24)] * 2 + [(2, 3, 20, 24)] * 2


def test_differences_outside_the_box_or_outside_the_range_are_not_seen():
    target = body(box=((6, 30), (8, 28), (2, 8)))
    generated = target.copy()
    generated[:, :, 0:2] = 500.0  # slices without body
    generated[0:6] = 500.0  # beside the box
    generated[generated == -1000.0] = -1024.0  # air is -1024 HU after clipping anyway
    target[target == -1000.0] = -3000.0
    assert tiny_scorer(min_size_px=1).score([generated], target)[0] == pytest.approx(0.0, abs=1e-6)


def test_intensities_are_clipped_to_the_metric_range_and_mapped_to_minus_one_one():
    target = body()
    scorer = tiny_scorer(min_size_px=1)
    box = body_box(body_mask(target))
    images = scorer._images(np.full(target.shape, 5000.0, dtype=np.float32), box, range(3, 4))
    raw = images * scorer._scale + scorer._shift  # undo LPIPS's own standardisation
    assert torch.allclose(raw, torch.ones_like(raw))
    images = scorer._images(np.full(target.shape, -1024.0, dtype=np.float32), box, range(3, 4))
    assert torch.allclose(images * scorer._scale + scorer._shift, -torch.ones_like(raw))


def test_small_boxes_are_padded_with_air_to_the_backbones_minimum():
    target = body(box=((6, 16), (8, 20), (2, 8)))  # 10 x 12 voxels
    scorer = tiny_scorer(min_size_px=32)
    assert scorer.score([target], target)[0] == pytest.approx(0.0, abs=1e-6)
    assert scorer.backbone.inputs[0][2:] == (32, 32)


def test_body_box_and_its_errors():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[2:5, 3:9, 4] = True
    mask[7, 3, 6] = True
    assert body_box(mask) == (slice(2, 8), slice(3, 9), slice(4, 7))
    with pytest.raises(ValueError, match="non-empty"):
        body_box(np.zeros((4, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="differs from the target"):
        tiny_scorer().score([body()[:, :, :5]], body())


def test_a_missing_alexnet_file_skips_lpips_with_one_line_naming_the_full_path(no_torch_hub, caplog):
    with caplog.at_level(logging.INFO):
        assert LpipsScorer.from_torchvision_cache("cpu") is None
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "LPIPS skipped" in message and str(no_torch_hub / "checkpoints" / ALEXNET_FILE) in message
    assert not no_torch_hub.exists()  # nothing was downloaded, or even started


def test_alexnet_weights_in_torchvisions_cache_are_loaded(no_torch_hub):
    """torchvision's file holds the classifier too; only ``features.*`` is used."""
    torch.manual_seed(1)
    reference = AlexNetFeatures()
    state = {**reference.state_dict(), "classifier.6.weight": torch.zeros(10, 4), "classifier.6.bias": torch.zeros(10)}
    (no_torch_hub / "checkpoints").mkdir(parents=True)
    torch.save(state, no_torch_hub / "checkpoints" / ALEXNET_FILE)
    scorer = LpipsScorer.from_torchvision_cache("cpu")
    assert scorer is not None
    for name, value in reference.state_dict().items():
        assert torch.equal(scorer.backbone.state_dict()[name], value)
    assert [w.shape[1] for w in scorer.linear_weights] == list(AlexNetFeatures.channels)
    target = body(shape=(64, 64, 6), box=((4, 60), (8, 56), (1, 5)))
    noisy = target + np.random.default_rng(0).normal(0, 80, target.shape).astype(np.float32)
    same, perturbed = scorer.score([target.copy(), noisy], target)
    assert abs(same) < 1e-6 and perturbed > 1e-3


def test_alexnet_features_have_torchvisions_layer_indices():
    keys = list(AlexNetFeatures().state_dict())
    assert keys == [f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")]
    outputs = AlexNetFeatures()(torch.zeros(1, 3, 32, 32))
    assert [o.shape[1] for o in outputs] == list(AlexNetFeatures.channels)


# The lpips package builds AlexNet through torchvision; the CUDA torchvision wheel does not
# import beside a CPU torch until its fake-kernel registrations are skipped, which only
# affects meta tensors and not this comparison. Run apart, so the test process stays clean.
MATCHES_LPIPS_PACKAGE = textwrap.dedent(
    """
    import sys
    import torch, torch.library
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda function: function)
    import torchvision
    torch.library.register_fake = register_fake
    import lpips
    sys.path.insert(0, {repo!r})
    from evaluation.perceptual import AlexNetFeatures, LpipsScorer, lpips_package_weights

    torch.manual_seed(0)
    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # random trunk: no download
    trunk = {{"features." + name.split(".", 1)[1]: p for name, p in reference.net.named_parameters()}}
    backbone = AlexNetFeatures()
    backbone.load_torchvision_state_dict(trunk)
    linear = torch.load(lpips_package_weights(), map_location="cpu")
    scorer = LpipsScorer(backbone, [linear[f"lin{{i}}.model.1.weight"] for i in range(5)])
    x0 = torch.rand(3, 1, 70, 90) * 2 - 1
    x1 = (x0 + 0.3 * torch.randn_like(x0)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(x0.repeat(1, 3, 1, 1), x1.repeat(1, 3, 1, 1)).flatten()
        standardise = lambda x: (x.repeat(1, 3, 1, 1) - scorer._shift) / scorer._scale
        ours = scorer._distance(scorer._features(standardise(x0)), scorer._features(standardise(x1)))
    assert expected.min() > 1e-4, expected
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-7), (ours, expected)
    print("match", ours.tolist())
    """
)


@pytest.mark.skipif(
    importlib.util.find_spec("lpips") is None or importlib.util.find_spec("torchvision") is None,
    reason="the lpips package (and torchvision) are not installed",
)
@pytest.mark.slow
def test_distances_match_the_lpips_package():
    result = subprocess.run(
        [sys.executable, "-c", MATCHES_LPIPS_PACKAGE.format(repo=str(REPO))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "match" in result.stdout, result.stderr[-3000:]


def test_the_lpips_package_ships_the_linear_layers():
    path = lpips_package_weights()
    assert path is not None, "pip install -r requirements.txt (lpips==0.1.4)"
    weights = torch.load(path, map_location="cpu", weights_only=True)
    assert [weights[f"lin{i}.model.1.weight"].shape[1] for i in range(5)] == list(AlexNetFeatures.channels)


@pytest.mark.slow
def test_test_py_with_lpips_adds_it_to_the_csv_json_printout_and_page(tmp_path, phantom_root, tiny_run, monkeypatch):
    """End to end with a random AlexNet in a tmp torch cache (the scores mean nothing; the plumbing does)."""
    torch.manual_seed(0)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(AlexNetFeatures().state_dict(), checkpoints / ALEXNET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = ["--name", tiny_run.name, "--checkpoints_dir", tiny_run.parent]
    data = ["--dataroot", phantom_root, "--results_dir", tmp_path / "results"]
    flags = [*run, *data, "--gpu_ids", "-1", "--num_images", "1"]
    result = run_script("test.py", *flags, "--lpips", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LPIPS in body box: generated" in result.stdout
    folder = tmp_path / "results" / "tiny" / "test_latest"
    with open(folder / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(0 < float(r["lpips"]) and 0 <= float(r["baseline_lpips"]) for r in rows)
    document = json.loads((folder / "metrics.json").read_text())
    assert "lpips" in document["metrics"] and "baseline_lpips" in document["summary"]
    assert "LPIPS generated" in (folder / "index.html").read_text()

    # Without the weights: the same run, LPIPS skipped with one line, nothing else changes.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    result = run_script("test.py", *flags, "--lpips", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert (
        output.count("LPIPS skipped") == 1 and str(tmp_path / "empty" / "hub" / "checkpoints" / ALEXNET_FILE) in output
    )
    with open(folder / "metrics.csv") as f:
        assert "lpips" not in next(csv.reader(f))
