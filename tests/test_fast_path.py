"""The fast training path (util/fast_path.py) computes what the fp32 path computes, skips what it skips, and resumes.

On the CPU the default is the fp32 path; these tests force the fast one (``--precision
bf16 --fused_adam``, or fp16 with its gradient scaler), which is what CUDA runs by default.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import TINY_TRAIN_FLAGS, make_run_folder
from test_resume import run_interrupted, weights

from models import create_model
from models.base_model import NonFiniteError
from options.train_options import TrainOptions
from training.loop import train
from training.step_losses import PendingSteps
from util.fast_path import FastPath, load_optimizer_state, resolve_precision
from util.run_folder import open_checkpoint
from util.runtime import setup_runtime

CPU = torch.device("cpu")
FAST = {
    "fp32": ["--precision", "fp32", "--fused_adam", "False"],  # the CPU's default: every step read on the host
    "bf16": ["--precision", "bf16", "--fused_adam"],  # CUDA's default: skipped on the device, read later
    "fp16": ["--precision", "fp16", "--fused_adam"],  # GPUs without bf16: a gradient scaler
    "fp16_unfused": ["--precision", "fp16", "--fused_adam", "False"],  # the scaler skips after reading its check
}
# bf16 keeps 8 significant bits: each rounding is off by at most 2^-9 of the value. A loss is a
# float32 mean over ~10^4 pixels or patches of the last layer's output, so it inherits about
# two such roundings (the last layer's input and its output); the deeper ones are renormalised
# by each instance norm and average out over the pixels. Over a few steps at lr 1e-4 the
# weights of the two paths move apart by far less. Hence 2^-8 relative. fp16 rounds finer
# (2^-11) and is held to the same bound.
LOSS_TOLERANCE = 2.0**-8


def model_options(tmp_path, *flags: str):
    return TrainOptions().parse(
        [
            *TINY_TRAIN_FLAGS,
            "--dataroot",
            str(tmp_path),
            "--checkpoints_dir",
            str(tmp_path / "checkpoints"),
            "--batch_size",
            "2",
            *flags,
        ]
    )


def batches(count: int, size: int = 128):
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        yield {
            "A": torch.rand(2, 1, size, size, generator=generator) * 2 - 1,
            "B": torch.rand(2, 1, size, size, generator=generator) * 2 - 1,
            "A_paths": ["a", "b"],
        }


def losses_over_steps(opt, steps: int) -> torch.Tensor:
    """(steps, losses) of a model seeded alike, on the same batches."""
    torch.manual_seed(0)
    model = create_model(opt, CPU)
    model.setup(opt)
    rows = []
    for batch in batches(steps):
        model.set_input(batch)
        model.optimize_parameters()
        rows.append(model.loss_vector())
    return torch.stack(rows)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_fast_paths_losses_track_the_fp32_paths_over_a_few_steps(tmp_path, one_thread, precision):
    reference = losses_over_steps(model_options(tmp_path), steps=6)
    fast = losses_over_steps(model_options(tmp_path, *FAST[precision]), steps=6)
    deviation = ((fast - reference).abs() / reference.abs()).max().item()
    assert deviation <= LOSS_TOLERANCE, f"{precision}: max relative deviation {deviation:.2e}"
    assert not torch.equal(fast, reference), "the fast path must really run in another precision"


@pytest.mark.parametrize("path", sorted(FAST))
def test_a_step_with_a_nan_loss_leaves_weights_and_adam_untouched(tmp_path, one_thread, path):
    opt = model_options(tmp_path, *FAST[path])
    model = create_model(opt, CPU)
    model.setup(opt)
    first, second = batches(2)
    model.set_input(first)
    model.optimize_parameters()  # Adam has moments and a step count now
    weights = {name: [p.detach().clone() for p in net.parameters()] for name, net in model.networks().items()}
    moments = [{k: v.clone() for k, v in state.items()} for o in model.optimizers for state in o.state.values()]

    second["B"][0, 0, 0, 0] = math.nan  # the target: D_real and G_L1 become NaN
    model.set_input(second)
    model.optimize_parameters()

    assert float(model.step_nonfinite) == 1.0
    for name, net in model.networks().items():
        assert all(torch.equal(a, b) for a, b in zip(weights[name], net.parameters(), strict=True)), name
    after = [state for o in model.optimizers for state in o.state.values()]
    for saved, state in zip(moments, after, strict=True):
        assert all(torch.equal(saved[k], state[k]) for k in saved), "moments and step counts stay as they were"

    model.set_input(first)  # and a finite step is applied again
    model.optimize_parameters()
    assert float(model.step_nonfinite) == 0.0
    assert not torch.equal(weights["G"][0], next(model.netG.parameters()))


def test_auto_is_fp32_on_the_cpu_and_the_log_line_names_each_part(tmp_path):
    assert resolve_precision("auto", CPU) == "fp32"
    plain = FastPath.from_options(model_options(tmp_path), CPU)
    assert (plain.precision, plain.fused_adam, plain.memory_format, plain.reads_losses_every_step) == (
        "fp32",
        torch.cuda.is_available(),
        "contiguous",
        not torch.cuda.is_available(),
    )
    fast = FastPath.from_options(model_options(tmp_path, *FAST["bf16"]), CPU)
    line = fast.describe()
    for part in (
        "bf16 autocast",
        "--precision fp32",
        "fused Adam",
        "--fused_adam False",
        "contiguous memory format",
        "--sync_every_step",
        "torch.compile and CUDA graphs off",
    ):
        assert part in line, part
    assert not fast.reads_losses_every_step
    synced = FastPath.from_options(model_options(tmp_path, *FAST["bf16"], "--sync_every_step"), CPU)
    assert synced.reads_losses_every_step and "after every step" in synced.describe()


def test_continue_train_takes_the_speed_flags_of_the_machine_that_resumes(tmp_path, phantom_root):
    make_run_folder(
        tmp_path, "fast", phantom_root, [*FAST["bf16"], "--memory_format", "channels_last", "--lambda_GAN", "0.5"]
    )
    resumed = TrainOptions().parse(
        [
            *TINY_TRAIN_FLAGS,
            "--dataroot",
            str(phantom_root),
            "--checkpoints_dir",
            str(tmp_path),
            "--name",
            "fast",
            "--continue_train",
        ]
    )
    assert (resumed.precision, resumed.fused_adam, resumed.memory_format) == (
        "auto",
        torch.cuda.is_available(),
        "contiguous",
    )
    assert resumed.lambda_GAN == 0.5  # while the other training flags still come from the saved run


def test_an_adam_state_loads_across_fused_and_unfused_keeping_the_new_kind():
    weight = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.Adam([weight], lr=0.1, fused=True)
    weight.grad = torch.ones(3)
    fused.step()
    unfused = torch.optim.Adam([weight], lr=0.1)
    load_optimizer_state(unfused, fused.state_dict())
    assert not unfused.param_groups[0]["fused"]
    assert unfused.state[weight]["step"].item() == 1.0 and torch.equal(
        unfused.state[weight]["exp_avg"], fused.state[weight]["exp_avg"]
    )
    unfused.step()  # an unfused Adam refuses found_inf: it must not have become fused
    again = torch.optim.Adam([weight], lr=0.1, fused=True)
    load_optimizer_state(again, unfused.state_dict())
    assert again.param_groups[0]["fused"] and again.state[weight]["step"].item() == 2.0


def test_pending_steps_are_read_in_order_in_one_go():
    pending = PendingSteps(["G_L1", "D_real"])
    pending.add(1, 4, torch.tensor([2.0, 0.5]), torch.tensor(0.0))
    pending.add(2, 8, torch.tensor([math.nan, 0.5]), torch.tensor(1.0))
    first, second = pending.read()
    assert (first.step, first.slices, first.losses, first.nonfinite) == (1, 4, {"G_L1": 2.0, "D_real": 0.5}, False)
    assert second.nonfinite and second.describe_nonfinite() == "G_L1 = nan"
    assert len(pending) == 0 and pending.read() == []


# -- through the training loop ----------------------------------------------------------------
def loop_options(tmp_path, phantom_root, *flags: str):
    argv = [
        *TINY_TRAIN_FLAGS,
        "--dataroot",
        str(phantom_root),
        "--checkpoints_dir",
        str(tmp_path / "checkpoints"),
        "--cache_dir",
        str(tmp_path.parent / "cache"),
        "--max_dataset_size",
        "8",
        "--val_freq",
        "0",
        "--batch_size",
        "2",
        *flags,
    ]  # 4 steps per epoch
    return TrainOptions().parse(argv)


def run(opt):
    return train(opt, setup_runtime(opt))


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("bf16", "fp32"), ("fp32", "fp16")])
def test_a_run_saved_under_one_precision_resumes_under_another(tmp_path, phantom_root, one_thread, first, then):
    flags = ["--name", "mixed", "--n_epochs", "2", "--n_epochs_decay", "0"]
    straight = run(loop_options(tmp_path / "straight", phantom_root, *flags))
    run(loop_options(tmp_path / "mixed", phantom_root, *flags, "--n_epochs", "1", *FAST[first]))
    resumed = run(loop_options(tmp_path / "mixed", phantom_root, *flags, "--continue_train", *FAST[then]))

    assert sorted(resumed.history) == [2] and resumed.total_iters == 16
    folder = tmp_path / "mixed" / "checkpoints" / "mixed"
    state = torch.load(open_checkpoint(folder, "latest").files["train_state"], weights_only=True)
    assert ("grad_scaler" in state) == (then == "fp16")
    for role in ("net_G", "net_D"):
        weights = torch.load(open_checkpoint(folder, "latest").files[role], weights_only=True)
        assert all(w.dtype == torch.float32 and bool(torch.isfinite(w).all()) for w in weights.values())
    for name, value in straight.history[2].items():
        # One epoch in another precision moves the weights a little more than rounding alone.
        assert value == pytest.approx(resumed.history[2][name], rel=2 * LOSS_TOLERANCE), name


def test_fp16_resumes_exactly_with_its_gradient_scaler(tmp_path, phantom_root, one_thread):
    flags = ["--name", "fp16", "--n_epochs", "1", "--n_epochs_decay", "1", *FAST["fp16"]]
    run(loop_options(tmp_path / "straight", phantom_root, *flags))
    run_interrupted(loop_options(tmp_path / "resumed", phantom_root, *flags), polls=2)  # after step 3 of epoch 1
    run(loop_options(tmp_path / "resumed", phantom_root, "--continue_train", *flags))

    scaler_states = []
    for folder in (tmp_path / "straight", tmp_path / "resumed"):
        checkpoint = open_checkpoint(folder / "checkpoints" / "fp16", "latest")
        scaler_states.append(torch.load(checkpoint.files["train_state"], weights_only=True)["grad_scaler"])
    # The scale fell from its start (65536) at the first steps' overflows: a resume that lost it would
    # start there again and skip other steps.
    assert scaler_states[0] == scaler_states[1] and scaler_states[0]["scale"] < 65536.0
    expected = weights(tmp_path / "straight" / "checkpoints" / "fp16")
    got = weights(tmp_path / "resumed" / "checkpoints" / "fp16")
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []


@pytest.mark.parametrize("path", ["fp32", "bf16"])
def test_a_nan_step_read_late_stops_at_the_same_step_and_saves_nothing(
    tmp_path, phantom_root, one_thread, path, caplog
):
    """--lr 1e30: D's first update throws its weights to ~1e30, so G's loss through D is NaN from step 1 on.
    The fp32 path reads each step at once; the bf16 path at the end of the epoch, but names the same steps."""
    opt = loop_options(
        tmp_path, phantom_root, "--name", "nan", "--lr", "1e30", "--n_epochs", "1", "--n_epochs_decay", "0", *FAST[path]
    )
    with pytest.raises(NonFiniteError, match=r"^epoch 1, step 1 \(2 slices in all\): non-finite loss: G_GAN = nan"):
        run(opt)
    assert not list((tmp_path / "checkpoints" / "nan").glob("*.pth"))

    caplog.set_level(logging.WARNING)
    opt = loop_options(
        tmp_path,
        phantom_root,
        "--name",
        "nan2",
        "--lr",
        "1e30",
        "--n_epochs",
        "1",
        "--n_epochs_decay",
        "0",
        "--skip_nonfinite",
        "2",
        *FAST[path],
    )
    with pytest.raises(NonFiniteError, match=r"^epoch 1, step 3 .* after 2 skipped batch\(es\)"):
        run(opt)
    assert caplog.text.count("batch skipped") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_defaults_are_the_fast_path_and_a_nan_step_is_skipped_without_a_read(tmp_path):
    cuda = torch.device("cuda", 0)
    opt = model_options(tmp_path, "--gpu_ids", "0")
    model = create_model(opt, cuda)
    model.setup(opt)
    path = model.fast_path
    assert path.precision in ("bf16", "fp16") and path.fused_adam and not path.reads_losses_every_step
    batch = next(batches(1))
    batch["B"][0, 0, 0, 0] = math.nan
    before = [p.detach().clone() for p in model.netG.parameters()]
    model.set_input(batch)
    model.optimize_parameters()
    assert float(model.step_nonfinite) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.netG.parameters(), strict=True))
