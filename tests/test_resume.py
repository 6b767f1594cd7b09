"""Resuming is exact: the same learning rates, the same data order and the same weights as a run never stopped.

These tests train tiny models in-process (one thread) and stop them the way a signal does:
the loop sees a stop request, saves ``latest`` at the step it reached and raises
``Interrupted``; ``--continue_train`` then goes on from that step.
"""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from conftest import TINY_TRAIN_FLAGS

from options.train_options import TrainOptions
from training.loop import train
from training.signals import Interrupted, StopRequests
from util.run_folder import open_checkpoint
from util.runtime import setup_runtime


class StopAfterPolls(StopRequests):
    """A stop request that arrives after the loop has polled ``polls`` times (once per step, once per epoch end)."""

    def __init__(self, polls: int):
        super().__init__()
        self.polls_left = polls

    @property
    def requested(self) -> bool:
        if self.signum is None and self.armed:
            self.polls_left -= 1
            if self.polls_left < 0:
                self.signum = signal.SIGTERM
        return self.signum is not None


def options(tmp_path, phantom_root, *flags: str):
    argv = [*TINY_TRAIN_FLAGS, "--dataroot", str(phantom_root), "--checkpoints_dir", str(tmp_path / "checkpoints"),
            "--cache_dir", str(tmp_path.parent / "cache"), "--max_dataset_size", "8", "--val_freq", "0", *flags]
    return TrainOptions().parse(argv)


def run(opt, stop: StopRequests | None = None):
    return train(opt, setup_runtime(opt), stop)


def run_interrupted(opt, polls: int) -> None:
    with pytest.raises(Interrupted) as raised:
        run(opt, StopAfterPolls(polls))
    assert raised.value.saved and raised.value.exit_code == 143


def weights(run_folder, label="latest") -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(run_folder, label)
    loaded = {}
    for role in ("net_G", "net_D"):
        loaded.update({f"{role}.{k}": v for k, v in torch.load(checkpoint.files[role], weights_only=True).items()})
    state = torch.load(checkpoint.files["train_state"], weights_only=True)
    for i, optimizer in enumerate(state["optimizers"]):
        for index, moments in optimizer["state"].items():
            loaded.update({f"optimizer{i}.{index}.{k}": v for k, v in moments.items()})
    return loaded


POLICIES = {
    "linear": ["--n_epochs", "2", "--n_epochs_decay", "3"],
    "step": ["--n_epochs", "5", "--n_epochs_decay", "0", "--lr_decay_iters", "2"],
    "cosine": ["--n_epochs", "5", "--n_epochs_decay", "0"],
    "plateau": ["--n_epochs", "5", "--n_epochs_decay", "0"],
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_learning_rate_after_resume_equals_the_uninterrupted_runs(tmp_path, phantom_root, one_thread, policy):
    flags = ["--lr_policy", policy, *POLICIES[policy], "--batch_size", "8"]  # one step per epoch
    straight = run(options(tmp_path / "straight", phantom_root, "--name", "lr", *flags))

    resumed_dir = tmp_path / "resumed"
    run_interrupted(options(resumed_dir, phantom_root, "--name", "lr", *flags), polls=3)  # stop at the end of epoch 2
    resumed = run(options(resumed_dir, phantom_root, "--name", "lr", "--continue_train", *flags))

    assert sorted(resumed.learning_rates) == [2, 3, 4, 5]
    for epoch in (2, 3, 4, 5):
        assert resumed.learning_rates[epoch] == straight.learning_rates[epoch], (policy, epoch)
    assert all(lr >= 0 for lr in straight.learning_rates.values())
    if policy == "linear":  # the curve the reference expects: 2 epochs at lr, then 3 down towards 0
        assert [straight.learning_rates[e] / 1e-4 for e in range(1, 6)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def test_two_epochs_straight_equal_one_and_a_half_then_resume_bit_for_bit(tmp_path, phantom_root, one_thread):
    """Shuffling, flips and dropout all on (the reference's defaults): only saved states make this equal."""
    flags = ["--name", "exact", "--n_epochs", "1", "--n_epochs_decay", "1", "--batch_size", "2"]  # 4 steps per epoch
    opt = options(tmp_path / "straight", phantom_root, *flags)
    assert not opt.no_dropout and not opt.no_flip and not opt.serial_batches
    straight = run(opt)
    assert straight.total_iters == 16

    resumed_dir = tmp_path / "resumed"
    run_interrupted(options(resumed_dir, phantom_root, *flags), polls=2)  # after step 3 of epoch 1
    counters = open_checkpoint(resumed_dir / "checkpoints" / "exact", "latest").counters
    assert (counters["next_epoch"], counters["next_step"], counters["total_iters"]) == (1, 3, 6)
    resumed = run(options(resumed_dir, phantom_root, "--continue_train", *flags))
    assert resumed.total_iters == 16

    expected = weights(tmp_path / "straight" / "checkpoints" / "exact")
    got = weights(resumed_dir / "checkpoints" / "exact")
    assert expected.keys() == got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert different == []


def test_continue_train_with_load_iter_takes_weights_and_counters_from_that_label(tmp_path, phantom_root, one_thread,
                                                                                  caplog):
    flags = ["--name", "iters", "--n_epochs", "2", "--n_epochs_decay", "0", "--batch_size", "2",
             "--save_by_iter", "--save_latest_freq", "6"]
    run(options(tmp_path, phantom_root, *flags))
    folder = tmp_path / "checkpoints" / "iters"
    assert {p.name for p in folder.glob("iter_*_net_G.pth")} == {"iter_6_net_G.pth", "iter_12_net_G.pth"}
    assert open_checkpoint(folder, "iter_6").counters["next_step"] == 3  # epoch 1, after step 3 of 4

    caplog.set_level(logging.INFO)
    resumed = run(options(tmp_path, phantom_root, *flags, "--continue_train", "--load_iter", "6"))
    assert "training epochs 1..2" in caplog.text and "resuming at step 4" in caplog.text
    assert resumed.total_iters == 16


def test_a_stop_before_training_started_says_nothing_was_saved():
    stop = StopRequests().install()
    try:
        with pytest.raises(Interrupted, match=r"before training started .* nothing was saved") as raised:
            signal.raise_signal(signal.SIGTERM)
        assert not raised.value.saved and raised.value.exit_code == 143
        stop.arm()
        signal.raise_signal(signal.SIGINT)  # the first signal of a training run asks for a save
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(Interrupted, match=r"second signal .* without saving") as raised:
            signal.raise_signal(signal.SIGINT)
        assert not raised.value.saved and raised.value.exit_code == 130
    finally:
        stop.uninstall()


def test_a_second_signal_during_the_save_abandons_it_whole(tmp_path, phantom_root, one_thread, monkeypatch):
    """Ctrl-C twice: the first asks for a save, the second, arriving mid-save, stops at once and claims nothing."""
    from util import run_folder

    flags = ["--name", "twice", "--n_epochs", "1", "--n_epochs_decay", "0", "--batch_size", "2", "--save_latest_freq", "4"]
    opt = options(tmp_path, phantom_root, *flags)
    real_save, calls = run_folder._torch_save, []

    def save_interrupted_by_a_second_signal(obj, path):
        calls.append(path.name)
        if len(calls) == 5:  # the 2nd file of the 2nd save: the one the first signal asked for
            signal.raise_signal(signal.SIGINT)
        real_save(obj, path)

    monkeypatch.setattr(run_folder, "_torch_save", save_interrupted_by_a_second_signal)
    stop = StopAfterPolls(2).install()  # the save at step 2 (iteration 4) completes; the stop comes after step 3
    try:
        with pytest.raises(Interrupted, match="second signal") as raised:
            run(opt, stop)
    finally:
        stop.uninstall()
    assert not raised.value.saved
    folder = tmp_path / "checkpoints" / "twice"
    assert open_checkpoint(folder, "latest").counters["total_iters"] == 4  # the last whole save, untouched
    assert [p.name for p in folder.iterdir() if ".partial-" in p.name] == []
