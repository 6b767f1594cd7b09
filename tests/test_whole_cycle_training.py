"""Training one generator for every phase of the breathing cycle: --phases, --phase_conditioning,
the data set and cache of 4D targets, the residual rule, translate_phases, resume and torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_SHAPE, TINY_SPACING_MM, TINY_TRAIN_FLAGS, run_script

from data.phases import find_phase_sets, read_phase
from data.robust_nifti_dataset import RobustNiftiDataset
from data.slice_cache import prune_stale_entries
from data.volume_io import read_volume
from datasets.make_phantom import write_dataset
from inference.volume import load_generator
from models.networks import define_G
from options.test_options import TestOptions
from options.train_options import TrainOptions
from util.run_folder import OPTIONS_JSON

NUM_PHASES = 3


@pytest.fixture(scope="module")
def cycles(tmp_path_factory) -> dict[str, Path]:
    """The same tiny phantom (2 train + 1 test patients, 3 phases) in both layouts of side B."""
    roots = {}
    for layout in ("4d", "files"):
        roots[layout] = tmp_path_factory.mktemp(f"cycle_{layout}")
        write_dataset(roots[layout], num_train=2, num_test=1, shape=TINY_SHAPE, spacing_mm=TINY_SPACING_MM,
                      num_phases=NUM_PHASES, seed=4, phase_layout=layout)
    return roots


def train_options(root: Path, tmp_path: Path, *flags: str):
    argv = [*TINY_TRAIN_FLAGS, "--dataroot", str(root), "--name", "cycle", "--checkpoints_dir", str(tmp_path / "checkpoints"),
            "--cache_dir", str(tmp_path / "cache"), "--val_freq", "0", *flags]
    return TrainOptions().parse(argv)


# -- options -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "input_nc", "output_nc", "phase_list"),
    [
        ([], 1, 1, [0]),  # today's model, whatever the layout of side B
        (["--phases", "all"], 1, 3, [0, 1, 2]),  # the default conditioning: one output channel per phase
        (["--phases", "2"], 1, 1, [2]),  # one phase: no conditioning
        (["--phases", "all", "--phase_conditioning", "input"], 2, 1, [0, 1, 2]),  # input: a phase-code channel before the CT slice
        (["--phases", "all", "--phase_conditioning", "input", "--context_slices", "1", "--input_nc", "1"], 4, 1, [0, 1, 2]),
        (["--phases", "0,2", "--phase_conditioning", "output"], 1, 2, [0, 2]),  # one output channel per phase
        (["--phases", "all", "--phase_conditioning", "output", "--residual", "--context_slices", "1"], 3, 3, [0, 1, 2]),
    ],
)
def test_the_phases_set_the_channels_and_are_saved_with_the_run(cycles, tmp_path, flags, input_nc, output_nc, phase_list):
    options = TrainOptions()
    opt = options.parse([*TINY_TRAIN_FLAGS, "--dataroot", str(cycles["4d"]), "--name", "cycle",
                         "--checkpoints_dir", str(tmp_path), *flags])
    assert (opt.input_nc, opt.output_nc, opt.phase_list) == (input_nc, output_nc, phase_list)
    options.save(opt, tmp_path / "cycle", "train")
    saved = json.loads((tmp_path / "cycle" / OPTIONS_JSON).read_text())
    assert saved["phase_list"] == phase_list and saved["num_phases"] == (1 if flags in ([],) else NUM_PHASES)
    # test.py rebuilds the same network from the run alone
    test_opt = TestOptions().parse(["--dataroot", str(cycles["4d"]), "--name", "cycle", "--checkpoints_dir", str(tmp_path)])
    assert (test_opt.input_nc, test_opt.output_nc, test_opt.phase_list) == (input_nc, output_nc, phase_list)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--phases", "3"], r"phase 3 is out of range; the data have 3 phases \(0..2\)"),
        (["--phases", "first"], "expected 'all' or phase numbers"),
        (["--phases", "all", "--phase_conditioning", "output", "--output_nc", "2"], "one output channel per phase, 3"),
        (["--phases", "all", "--phase_conditioning", "input", "--input_nc", "3"], "plus one phase-code channel"),
        (["--phases", "all", "--direction", "BtoA"], "not --direction BtoA"),
        (["--phases", "all", "--phase_conditioning", "input", "--netG", "resnet_6blocks"], "removes the constant phase-code channel"),
    ],
)
def test_phases_that_cannot_work_stop_with_one_line(cycles, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as raised:
        train_options(cycles["4d"], tmp_path, *flags)
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


# -- data set and cache ------------------------------------------------------------------------
def test_input_conditioning_serves_every_slice_phase_pair_with_its_code(cycles, tmp_path):
    ds = RobustNiftiDataset(train_options(cycles["4d"], tmp_path, "--phases", "all", "--phase_conditioning", "input", "--no_flip"))
    assert len(ds) == len(ds.samples) * NUM_PHASES
    batch = ds.__getitems__(list(range(2 * NUM_PHASES))).batch  # two slices, each with every phase
    assert batch["A"].shape[1] == 2 and batch["B"].shape[1] == 1
    codes = batch["A"][:, 0].float()
    assert torch.all(codes == codes[:, :1, :1])  # a constant channel...
    np.testing.assert_allclose(codes[:, 0, 0], [-1, -1 / 3, 1 / 3] * 2, atol=1e-3)  # phase K of 3: 2K/3 - 1
    assert torch.equal(batch["A"][0, 1], batch["A"][1, 1])  # ... beside the same CT slice for each phase
    assert not torch.equal(batch["B"][0], batch["B"][1])  # whose targets are the phases


def test_both_layouts_and_both_conditionings_serve_the_same_targets(cycles, tmp_path):
    per_frame = RobustNiftiDataset(train_options(cycles["4d"], tmp_path / "a", "--phases", "all", "--phase_conditioning", "input", "--no_flip"))
    per_file = RobustNiftiDataset(train_options(cycles["files"], tmp_path / "b", "--phases", "all", "--phase_conditioning", "input", "--no_flip"))
    outputs = RobustNiftiDataset(train_options(cycles["4d"], tmp_path / "a", "--phases", "all", "--no_flip",
                                               "--phase_conditioning", "output"))
    assert len(outputs) == len(per_frame.samples) == len(per_file.samples)
    first = per_frame.__getitems__(list(range(NUM_PHASES))).batch
    assert torch.equal(first["B"], per_file.__getitems__(list(range(NUM_PHASES))).batch["B"])
    together = outputs.__getitems__([0]).batch
    assert together["B"].shape == (1, NUM_PHASES, 128, 128) and together["A"].shape[1] == 1
    assert torch.equal(together["B"][0], first["B"][:, 0])  # channel K = phase K
    assert torch.equal(together["A"][0, 0], first["A"][0, 1])


def test_phase_0_of_a_4d_target_trains_as_a_3d_target_did(cycles, phantom_root, tmp_path):
    ds = RobustNiftiDataset(train_options(cycles["4d"], tmp_path, "--no_flip"))
    assert len(ds) == len(ds.samples) and ds.report.targets[0][0].source.name == "patient_1.nii.gz"
    phase0, _ = read_volume(cycles["4d"] / "trainB" / "patient_1.nii.gz", frame=0)
    cached = ds.report.pairs[0][1].open_slices()  # (N, S, S): the frame-0 entry
    assert cached.shape[0] == phase0.shape[2]


def test_each_frame_is_a_cache_entry_of_its_own_and_is_reused(cycles, tmp_path):
    first = RobustNiftiDataset(train_options(cycles["4d"], tmp_path, "--phases", "all", "--phase_conditioning", "input"))
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert sum("trainB_patient_1_frame" in n for n in names) == NUM_PHASES
    assert first.report.built == 2 * (1 + NUM_PHASES)
    assert prune_stale_entries(tmp_path / "cache") == (0, 0)
    again = RobustNiftiDataset(train_options(cycles["4d"], tmp_path, "--phases", "all", "--phase_conditioning", "input"))
    assert again.report.built == 0
    # a changed 4D file rebuilds its frames, and pruning removes the old ones
    path = cycles["4d"] / "trainB" / "patient_2.nii.gz"
    backup = tmp_path / "backup.nii.gz"
    shutil.copy2(path, backup)
    try:
        os.utime(path, (1, 1))
        assert prune_stale_entries(tmp_path / "cache")[0] == NUM_PHASES
    finally:
        shutil.copy2(backup, path)


def test_an_incomplete_phase_set_stops_training_with_one_line(cycles, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(cycles["files"], root)
    (root / "trainB" / "patient_2_phase1.nii.gz").unlink()
    with pytest.raises(Exception, match=r"patient_2 has phases 0, 2 but not 1"):
        train_options(root, tmp_path, "--phases", "all")


# -- the generator -----------------------------------------------------------------------------
def test_one_output_channel_per_phase_each_adds_the_centre_slice():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    per_phase = define_G(3, 3, 4, "resnet_6blocks", "instance", residual=True, residual_centre=True)
    same_channels = define_G(3, 3, 4, "resnet_6blocks", "instance", residual=True)
    assert per_phase.state_dict().keys() == same_channels.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(per_phase(x), x[:, 1:2].expand(-1, 3, -1, -1))  # untrained: every phase is the slice
        assert torch.equal(same_channels(x), x)  # without it, channel c adds input channel c


def test_instance_norm_after_a_resnets_first_convolution_erases_a_constant_code_channel():
    """Why options refuse --phase_conditioning input with resnet_* and instance norm."""
    torch.manual_seed(0)
    ct = torch.rand(2, 1, 128, 128) * 2 - 1
    inhale, exhale = (torch.cat([torch.full_like(ct, code), ct], dim=1) for code in (-1.0, 0.0))
    for netG, blind in (("resnet_6blocks", True), ("unet_128", False)):  # the U-Net's first conv has no norm
        net = define_G(2, 1, 8, netG, "instance").eval()
        with torch.no_grad():
            difference = float((net(inhale) - net(exhale)).abs().max())
        assert (difference < 1e-4) == blind, (netG, difference)


def write_run(checkpoints: Path, name: str, root: Path, *flags: str) -> Path:
    """A run folder with an untrained generator built as training builds it (residual: the identity)."""
    options = TrainOptions()
    opt = options.parse([*TINY_TRAIN_FLAGS, "--dataroot", str(root), "--name", name, "--checkpoints_dir", str(checkpoints),
                         "--intensity", "hu", *flags])
    options.save(opt, checkpoints / name, "train")
    torch.manual_seed(0)
    from util.run_folder import phase_outputs

    net = define_G(opt.input_nc, opt.output_nc, opt.ngf, opt.netG, opt.norm, init_type=opt.init_type,
                   init_gain=opt.init_gain, residual=opt.residual, residual_centre=phase_outputs(vars(opt)))
    torch.save(net.state_dict(), checkpoints / name / "latest_net_G.pth")
    return checkpoints / name


def test_translate_phases_gives_one_volume_per_phase_on_the_input_grid(cycles, tmp_path):
    volume, _ = read_volume(cycles["4d"] / "testA" / "patient_1.nii.gz")
    write_run(tmp_path, "one", cycles["4d"], "--residual", "--context_slices", "1")
    write_run(tmp_path, "outputs", cycles["4d"], "--residual", "--context_slices", "1", "--phases", "all",
              "--phase_conditioning", "output")
    write_run(tmp_path, "inputs", cycles["4d"], "--phases", "0,2", "--phase_conditioning", "input", "--context_slices", "1")
    one = load_generator(tmp_path, "one")
    outputs = load_generator(tmp_path, "outputs")
    inputs = load_generator(tmp_path, "inputs")
    assert (one.phases, outputs.phases, inputs.phases) == ((0,), (0, 1, 2), (0, 2))
    assert (outputs.num_phases, outputs.conditioning, inputs.input_nc) == (NUM_PHASES, "output", 4)

    reference, _ = one.translate(volume)
    single, _ = one.translate_phases(volume)
    assert single.shape == (1, *volume.shape) and np.array_equal(single[0], reference)
    every, _ = outputs.translate_phases(volume, batch_size=5)
    assert every.shape == (NUM_PHASES, *volume.shape) and every.dtype == np.float32
    for k in range(NUM_PHASES):  # untrained residual: each phase is the input through the pipeline
        np.testing.assert_allclose(every[k], reference, atol=1e-3)
    two, _ = inputs.translate_phases(volume, batch_size=5)
    assert two.shape == (2, *volume.shape) and np.isfinite(two).all()
    assert np.abs(two[0] - two[1]).max() > 1.0  # the code channel tells the network the phase
    np.testing.assert_array_equal(inputs.translate(volume, batch_size=5)[0], two[0])  # translate(): the first phase


def test_a_run_saved_before_phases_makes_phase_0(tiny_run):
    saved = json.loads((tiny_run / OPTIONS_JSON).read_text())
    assert "phases" not in saved or saved.get("phase_list") == [0]
    generator = load_generator(tiny_run.parent, tiny_run.name)
    assert (generator.phases, generator.num_phases, generator.input_nc) == ((0,), 1, 1)


# -- training, resume, torchrun ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("conditioning", ["input", "output"])
def test_an_all_phases_run_resumes_bit_for_bit(cycles, tmp_path, one_thread, conditioning):
    from test_resume import run, run_interrupted, weights

    flags = ["--phases", "all", "--phase_conditioning", conditioning, "--residual", "--context_slices", "1",
             "--input_nc", "1", "--max_dataset_size", "4", "--n_epochs", "1", "--n_epochs_decay", "1",
             "--batch_size", "2", "--name", "cycle"]
    straight = run(train_options(cycles["4d"], tmp_path / "straight", *flags))
    steps = 4 * (NUM_PHASES if conditioning == "input" else 1) // 2  # per epoch
    assert straight.total_iters == 2 * steps * 2

    resumed_dir = tmp_path / "resumed"
    run_interrupted(train_options(cycles["4d"], resumed_dir, *flags), polls=steps - 1)  # mid-epoch 1
    resumed = run(train_options(cycles["4d"], resumed_dir, "--continue_train", *flags))
    assert resumed.total_iters == straight.total_iters
    expected, got = weights(tmp_path / "straight" / "checkpoints" / "cycle"), weights(resumed_dir / "checkpoints" / "cycle")
    assert expected.keys() == got.keys()
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []


@pytest.mark.slow
def test_an_all_phases_run_under_torchrun_keeps_the_processes_equal(cycles, tmp_path):
    from test_distributed import differing_keys, torchrun

    flags = [*TINY_TRAIN_FLAGS, "--name", "cycle", "--batch_size", "2", "--max_dataset_size", "4", "--val_freq", "0",
             "--n_epochs", "1", "--n_epochs_decay", "0", "--phases", "all", "--phase_conditioning", "input", "--residual", "--context_slices", "1"]
    result = torchrun(tmp_path / "ranks", "--dataroot", str(cycles["4d"]), "--checkpoints_dir", str(tmp_path / "checkpoints"),
                      *flags, cwd=tmp_path)
    assert "12 slices per epoch" in result.stdout, result.stdout[-2000:]  # 4 slices x 3 phases
    rank0 = torch.load(tmp_path / "ranks" / "rank0.pth", weights_only=True)
    rank1 = torch.load(tmp_path / "ranks" / "rank1.pth", weights_only=True)
    for net in ("G", "D"):
        assert differing_keys(rank0[net], rank1[net]) == [], net
    generator = load_generator(tmp_path / "checkpoints", "cycle")
    assert generator.phases == (0, 1, 2) and generator.input_nc == 4


@pytest.mark.slow
def test_the_whole_cycle_benchmark_runs_its_smoke_form(tmp_path):
    result = run_script("benchmarks/whole_cycle.py", "--smoke", "--workdir", tmp_path, "--json", tmp_path / "r.json",
                        cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 0 (end-inhale) |" in result.stdout and "MIP MAE" in result.stdout
    document = json.loads((tmp_path / "r.json").read_text())
    models = document["models"]
    assert set(models) == {"all phases, input", "all phases, output", "phase 0 only"}
    assert models["phase 0 only"]["phases"] == [0] and models["all phases, output"]["phases"] == [0, 1]
    patient = models["all phases, input"]["patients"][0]
    assert set(patient["mae_hu"]) == {"0", "1"} and patient["mip_mae_hu"] > 0


def test_validation_scores_a_model_of_several_phases_on_each_phase(cycles, tmp_path):
    from evaluation.metrics import score_volume
    from evaluation.validation import find_validation_cases, validate

    write_run(tmp_path, "outputs", cycles["4d"], "--residual", "--phases", "all", "--phase_conditioning", "output")
    phase, cases = find_validation_cases(cycles["4d"], 5, (0, 1, 2))
    assert phase == "test" and [len(sources) for _, sources in cases] == [NUM_PHASES]
    metrics = validate(load_generator(tmp_path, "outputs"), cases)
    volume, _ = read_volume(cases[0][0])
    targets = [read_volume(cases[0][1][0].path, frame=k)[0] for k in range(NUM_PHASES)]
    assert metrics["n_patients"] == 1
    # the baseline is the input average against each phase, averaged over the phases
    expected = np.mean([score_volume(volume, target)["mae_hu"] for target in targets])
    assert metrics["baseline_mae_hu"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("layout", ["4d", "files"])
def test_validation_scores_a_phase_0_model_on_phase_0_of_targets_stored_as_phases(cycles, tmp_path, layout):
    from evaluation.metrics import score_volume
    from evaluation.validation import find_validation_cases, validate

    write_run(tmp_path, "phase0", cycles[layout])
    phase, cases = find_validation_cases(cycles[layout], 5)
    assert phase == "test" and len(cases) == 1
    metrics = validate(load_generator(tmp_path, "phase0"), cases)
    assert metrics["n_patients"] == 1  # scored, not skipped as "4D"
    volume, _ = read_volume(cases[0][0])
    phase0 = read_phase(find_phase_sets(cycles[layout] / "testB", ["patient_1"])[0]["patient_1"].sources[0])[0]
    assert metrics["baseline_mae_hu"] == pytest.approx(score_volume(volume, phase0)["mae_hu"], rel=1e-6)
