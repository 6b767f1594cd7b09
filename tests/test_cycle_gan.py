"""--model cycle_gan: upstream's options, files and pool; its generators behind use_model.py, test.py and --model test.

Each test states one contract. The end-to-end run on an unregistered phantom (trainB moved by a
few voxels and degrees) is marked slow: it trains through train.py and scores with test.py
against the registered phase 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import use_model
from data.volume_io import read_volume
from datasets.make_phantom import TRUE_TARGET_DIR, misregister, misregister_train_targets, write_dataset
from evaluation.results import run_test
from inference.volume import load_generator
from models import create_model
from models.networks import define_G
from options.cli import run_cli
from options.test_options import TestOptions
from options.train_options import TrainOptions
from tests.conftest import TINY_SHAPE, TINY_SPACING_MM, run_script
from util.image_pool import ImagePool
from util.run_folder import CheckpointError, list_labels, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CYCLE = ["--model", "cycle_gan", "--netG", "resnet_6blocks", "--ngf", "4", "--ndf", "4", "--resize_to", "32",
              "--batch_size", "2", "--num_threads", "0", "--gpu_ids", "-1", "--display_id", "0", "--intensity", "hu",
              "--residual", "--pool_size", "3"]


def cycle_run(phantom_root: Path, checkpoints: Path, name: str = "cycle", extra: tuple[str, ...] = ()):
    """A cycle_gan run folder as training leaves it (options + 'latest' of untrained networks), and its model."""
    options = TrainOptions()
    opt = options.parse([*TINY_CYCLE, "--dataroot", str(phantom_root), "--checkpoints_dir", str(checkpoints),
                         "--name", name, *extra])
    options.save(opt, checkpoints / name, "train")
    torch.manual_seed(0)
    model = create_model(opt, torch.device("cpu"))
    model.setup(opt)
    return opt, model


def save_latest(model) -> None:
    save_checkpoint(model.save_dir, "latest", model.network_states(), model.training_state(with_optimizers=True),
                    {"epoch": 1, "next_epoch": 2, "next_step": 0, "total_iters": 2})


def test_defaults_are_upstream_cyclegans(phantom_root, tmp_path):
    opt = TrainOptions().parse(["--model", "cycle_gan", "--dataroot", str(phantom_root),
                                "--checkpoints_dir", str(tmp_path), "--gpu_ids", "-1"])
    assert (opt.netG, opt.netD, opt.gan_mode, opt.norm, opt.no_dropout) == ("resnet_9blocks", "basic", "lsgan",
                                                                            "instance", True)
    assert (opt.pool_size, opt.lambda_A, opt.lambda_B, opt.lambda_identity) == (50, 10.0, 10.0, 0.5)
    assert (opt.lr, opt.beta1, opt.dataset_mode) == (0.0002, 0.5, "unaligned_nifti")


@pytest.mark.parametrize("flags, words", [
    (["--context_slices", "1"], "--context_slices"),
    (["--output_nc", "2", "--residual", "False"], "--lambda_identity"),
    (["--gan_mode", "wgangp"], "wgangp"),
    (["--phases", "all"], "--phases"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(phantom_root, tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        TrainOptions().parse([*TINY_CYCLE, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_checkpoints_use_upstream_names_and_keys(phantom_root, tmp_path):
    _, model = cycle_run(phantom_root, tmp_path)
    save_latest(model)
    names = {p.name for p in (tmp_path / "cycle").iterdir()}
    assert {f"latest_net_{n}.pth" for n in ("G_A", "G_B", "D_A", "D_B")} <= names
    assert list_labels(tmp_path / "cycle") == ["latest"]
    upstream = define_G(input_nc=1, output_nc=1, ngf=4, netG="resnet_6blocks", norm="instance", use_dropout=False,
                        residual=True)
    saved = torch.load(tmp_path / "cycle" / "latest_net_G_A.pth", weights_only=True)
    assert list(saved) == list(upstream.state_dict())  # a plain state dict, no "module." prefix
    assert "image_pools" in torch.load(tmp_path / "cycle" / "latest_train_state.pth", weights_only=False)


def test_image_pool_fills_then_swaps_and_resumes_exactly():
    images = [torch.full((1, 1, 2, 2), float(i)) for i in range(40)]
    pool = ImagePool(4, seed=3)
    assert [float(pool.query(images[i])[0, 0, 0, 0]) for i in range(4)] == [0, 1, 2, 3]  # filling: as given
    out = [float(pool.query(images[i])[0, 0, 0, 0]) for i in range(4, 20)]
    assert any(v < i for v, i in zip(out, range(4, 20))), "a full pool returns some older images"
    state = pool.state_dict()
    resumed = ImagePool(4, seed=99)
    resumed.load_state_dict(state)
    go_on = [float(pool.query(x)[0, 0, 0, 0]) for x in images[20:]]
    assert [float(resumed.query(x)[0, 0, 0, 0]) for x in images[20:]] == go_on
    assert torch.equal(ImagePool(0).query(images[5]), images[5])


def test_a_resumed_run_gets_the_image_pools_back(phantom_root, tmp_path):
    _, model = cycle_run(phantom_root, tmp_path)
    model.set_input({"A": torch.rand(2, 1, 32, 32) * 2 - 1, "B": torch.rand(2, 1, 32, 32) * 2 - 1, "A_paths": ["a"] * 2})
    model.optimize_parameters()
    save_latest(model)
    opt = TrainOptions().parse([*TINY_CYCLE, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path),
                                "--name", "cycle", "--continue_train"])
    resumed = create_model(opt, torch.device("cpu"))
    assert resumed.setup(opt).label == "latest"
    for pool in ("fake_A_pool", "fake_B_pool"):
        mine, theirs = getattr(model, pool), getattr(resumed, pool)
        assert len(theirs.images) == 2 and all(torch.equal(a, b) for a, b in zip(mine.images, theirs.images))
        assert torch.equal(mine.generator.get_state(), theirs.generator.get_state())


def test_direction_picks_g_a_or_g_b_and_a_pix2pix_run_refuses_the_other_way(phantom_root, tmp_path, tiny_run):
    _, model = cycle_run(phantom_root, tmp_path)
    save_latest(model)
    assert load_generator(tmp_path, "cycle").weights.name == "latest_net_G_A.pth"
    assert load_generator(tmp_path, "cycle", direction="AtoB").weights.name == "latest_net_G_A.pth"
    g_b = load_generator(tmp_path, "cycle", direction="BtoA")
    assert g_b.weights.name == "latest_net_G_B.pth"
    for got, wanted in zip(g_b.net.state_dict().values(), model.netG_B.state_dict().values()):
        assert torch.equal(got, wanted)
    with pytest.raises(CheckpointError, match="only a cycle_gan run translates both ways"):
        load_generator(tiny_run.parent, tiny_run.name, direction="BtoA")


def test_use_model_translates_with_g_b_on_the_input_grid(phantom_root, tmp_path, capsys):
    _, model = cycle_run(phantom_root, tmp_path / "checkpoints")
    save_latest(model)
    source = phantom_root / "testB" / "patient_1.nii.gz"
    code = run_cli(use_model.main, use_model.get_args_parser(), [
        "--input_nifti", str(source), "--model_name", "cycle", "--checkpoints_dir", str(tmp_path / "checkpoints"),
        "--output_dir", str(tmp_path / "out"), "--direction", "BtoA", "--no_slices", "--gpu_ids", "-1"])
    assert code == 0
    assert "latest_net_G_B.pth" in capsys.readouterr().out
    volume, meta = read_volume(tmp_path / "out" / "patient_1_phase0.nii.gz")
    source_volume, source_meta = read_volume(source)
    assert volume.shape == source_volume.shape and np.allclose(meta.affine, source_meta.affine)
    assert meta.storage_shape == source_meta.storage_shape


def test_test_model_translates_a_folder_one_way_without_scoring(phantom_root, tmp_path):
    _, model = cycle_run(phantom_root, tmp_path / "checkpoints")
    save_latest(model)
    opt = TestOptions().parse(["--dataroot", str(phantom_root / "testA"), "--name", "cycle", "--model", "test",
                               "--model_suffix", "_B", "--checkpoints_dir", str(tmp_path / "checkpoints"),
                               "--results_dir", str(tmp_path / "results"), "--gpu_ids", "-1", "--num_images", "1"])
    assert opt.dataset_mode == "single_nifti"
    report = run_test(opt, torch.device("cpu"))
    assert report.summary is None  # nothing to score against
    assert sorted(r.patient for r in report.patients) == ["patient_1", "patient_2"]
    assert all(r.output_path.is_file() for r in report.patients)


def test_misregistered_phantom_keeps_the_truth(tmp_path):
    write_dataset(tmp_path, num_train=2, num_test=1, shape=TINY_SHAPE, spacing_mm=TINY_SPACING_MM, num_phases=4,
                  seed=5)
    test_before = read_volume(tmp_path / "testB" / "patient_1.nii.gz")[0]
    original = read_volume(tmp_path / "trainB" / "patient_1.nii.gz")[0]
    moved = misregister_train_targets(tmp_path, shift_vox=2, rotation_deg=3, seed=0)
    assert [p.name for p in moved] == ["patient_1.nii.gz", "patient_2.nii.gz"]
    assert np.array_equal(read_volume(tmp_path / TRUE_TARGET_DIR / "patient_1.nii.gz")[0], original)
    assert np.array_equal(read_volume(tmp_path / "testB" / "patient_1.nii.gz")[0], test_before)
    shifted = read_volume(tmp_path / "trainB" / "patient_1.nii.gz")[0]
    assert np.abs(shifted - original).mean() > 5  # moved, not the same volume
    # Without rotation, a shift of whole voxels moves the anatomy exactly, air coming in at the edge.
    _, (dx, dy, angle) = misregister(original, np.random.default_rng(0), shift_vox=2, rotation_deg=0)
    assert angle == 0 and abs(dx) <= 2 and abs(dy) <= 2
    whole, _ = misregister(original, _WholeVoxelShift(), shift_vox=2, rotation_deg=0)
    assert np.array_equal(whole[2:, 1:], original[:-2, :-1])


class _WholeVoxelShift:
    """A generator stand-in that draws angle 0 and the shift (+2, +1) voxels."""

    def uniform(self, low, high, size=None):
        return 0.0 if size is None else np.array([2.0, 1.0])


@pytest.mark.slow
def test_cyclegan_on_an_unregistered_phantom_stays_at_the_input_where_pix2pix_would_learn_the_shift(tmp_path):
    """train.py then test.py on a phantom whose trainB is moved 2 voxels / 3 degrees, scored against the
    registered phase 0. What CycleGAN achieves here (README, *CycleGAN for unregistered pairs*): with the
    benchmark's strong cycle and identity weights it stays within 1% of the input average's MAE; it does not
    beat it (the issue asked for that; no weighting we measured did, see the README's table)."""
    result = run_script("benchmarks/unregistered.py", "--models", "cycle_gan", "--iterations", "120",
                        "--num_train", "4", "--num_test", "2", "--shape", "48", "48", "16", "--resize_to", "48",
                        "--ngf", "8", "--ndf", "8", "--workdir", tmp_path, "--json", tmp_path / "u.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads((tmp_path / "u.json").read_text())["runs"][0]
    assert row["mae_hu"] <= 1.01 * row["baseline_mae_hu"], row
    volumes = list((tmp_path / "results" / "unregistered_cycle_gan_seed0" / "test_latest" / "volumes").glob("*.nii.gz"))
    assert len(volumes) == 2


@pytest.mark.slow
def test_benchmark_smoke_prints_one_table_with_both_models(tmp_path):
    result = run_script("benchmarks/unregistered.py", "--smoke", "--workdir", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["input average", "cycle_gan", "pix2pix"]


def test_the_training_page_says_real_b_is_unpaired_and_draws_cyclegans_differences(tmp_path):
    from tests.test_visualizer import parse_page, training_options
    from training.visualizer import Visualizer

    visualizer = Visualizer(training_options(tmp_path, model="cycle_gan", intensity="hu", hu_min=-1024.0, hu_max=3071.0))
    names = ("real_A", "fake_B", "rec_A", "idt_B", "real_B", "fake_A", "rec_B", "idt_A")
    images = {name: torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1
              for i, name in enumerate(names)}
    visualizer.display_current_results(images, epoch=1, save_result=True)
    text = (visualizer.web_dir / "index.html").read_text()
    assert "real_B an unpaired B-side slice" in text and "real_B the target" not in text
    assert "fake_B - real_A" in text and "rec_A - real_A" in text and "fake_B - real_B" not in text
    assert "images/epoch001_fake_B_minus_real_A.png" in parse_page(visualizer.web_dir).images
