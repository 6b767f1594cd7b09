"""The run folder: options format, checkpoint sets saved as one unit, the lock, run names."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from util import run_folder
from util.run_folder import (
    CheckpointError,
    RunLock,
    check_run_name,
    clear_run,
    holds_checkpoints,
    list_labels,
    load_options,
    open_checkpoint,
    save_checkpoint,
    save_options,
)


def networks(value: float) -> dict[str, dict]:
    """Two small 'networks' whose every weight is ``value``: a set is recognisable by it."""
    return {"G": {"w": torch.full((64, 64), value)}, "D": {"w": torch.full((16,), value)}}


def save_set(folder, value: float, label: str = "latest", with_state: bool = True) -> None:
    state = {"optimizers": [{"m": torch.full((64, 64), value)}]} if with_state else None
    save_checkpoint(folder, label, networks(value), state, {"epoch": int(value), "next_epoch": int(value) + 1,
                                                            "next_step": 0, "total_iters": 10 * int(value)})


def loaded_value(folder, label: str = "latest") -> float:
    """The value of the set ``label`` as a reader sees it; every file must agree."""
    checkpoint = open_checkpoint(folder, label)
    values = {float(torch.load(checkpoint.files[role], weights_only=True)["w"][0].flatten()[0])
              for role in ("net_G", "net_D")}
    if "train_state" in checkpoint.files:
        state = torch.load(checkpoint.files["train_state"], weights_only=True)
        values.add(float(state["optimizers"][0]["m"].flatten()[0]))
    values.add(float(checkpoint.counters["epoch"]))
    assert len(values) == 1, f"a mixed set: {values}"
    return values.pop()


# -- options ------------------------------------------------------------------------------
def test_options_round_trip_with_a_format_version(tmp_path):
    save_options(tmp_path, {"netG": "unet_128", "max_dataset_size": float("inf")})
    assert json.loads((tmp_path / "train_opt.json").read_text())["format_version"] == 2
    assert load_options(tmp_path) == {"netG": "unet_128", "max_dataset_size": None}


def test_options_of_format_1_are_read_and_a_newer_format_is_refused(tmp_path):
    (tmp_path / "train_opt.json").write_text(json.dumps({"netG": "unet_256"}))
    assert load_options(tmp_path) == {"netG": "unet_256"}
    (tmp_path / "train_opt.json").write_text(json.dumps({"netG": "unet_256", "format_version": 99}))
    with pytest.raises(CheckpointError, match=r"train_opt\.json: format 99 is newer"):
        load_options(tmp_path)


@pytest.mark.parametrize("name", ["..", "../elsewhere", "/tmp/abs", "a/b", "", "."])
def test_run_names_cannot_leave_the_checkpoints_folder(name):
    with pytest.raises(ValueError, match="one folder name inside --checkpoints_dir"):
        check_run_name(name)


# -- checkpoint sets ----------------------------------------------------------------------
def test_a_saved_set_opens_whole_with_its_counters(tmp_path):
    save_set(tmp_path, 3.0)
    checkpoint = open_checkpoint(tmp_path, "latest")
    assert set(checkpoint.files) == {"net_G", "net_D", "train_state"}
    assert checkpoint.files["net_G"].name == "latest_net_G.pth"  # upstream's name, a plain state dict
    assert set(torch.load(checkpoint.files["net_G"], weights_only=True)) == {"w"}
    assert checkpoint.counters["next_epoch"] == 4 and checkpoint.verified
    assert loaded_value(tmp_path) == 3.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing temporary left


def test_a_damaged_file_is_refused_naming_it(tmp_path):
    save_set(tmp_path, 1.0)
    path = tmp_path / "latest_net_D.pth"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"latest_net_D\.pth: does not match latest_checkpoint\.json"):
        open_checkpoint(tmp_path, "latest")


def test_a_damaged_manifest_is_a_one_line_error(tmp_path):
    save_set(tmp_path, 1.0)
    (tmp_path / "latest_checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"latest_checkpoint\.json: damaged checkpoint manifest"):
        open_checkpoint(tmp_path, "latest")


def test_a_set_saved_without_optimisers_drops_the_old_state_file(tmp_path):
    save_set(tmp_path, 1.0, label="5")
    save_set(tmp_path, 2.0, label="5", with_state=False)
    assert not (tmp_path / "5_train_state.pth").exists()
    assert set(open_checkpoint(tmp_path, "5").files) == {"net_G", "net_D"}


def test_sets_saved_before_manifests_are_read_unverified_with_their_counters(tmp_path):
    torch.save(networks(1.0)["G"], tmp_path / "latest_net_G.pth")
    (tmp_path / "latest_train_state.json").write_text(json.dumps({"epoch": 4, "total_iters": 40}))
    checkpoint = open_checkpoint(tmp_path, "latest")
    assert not checkpoint.verified
    assert checkpoint.counters == {"epoch": 4, "next_epoch": 5, "next_step": 0, "total_iters": 40}


def test_a_missing_generator_names_the_labels_the_run_has(tmp_path):
    save_set(tmp_path, 1.0, label="5")
    with pytest.raises(CheckpointError, match=r"10_net_G\.pth: checkpoint not found \(this run has: 5"):
        open_checkpoint(tmp_path, "10")
    assert list_labels(tmp_path) == ["5"] and holds_checkpoints(tmp_path)


def test_a_full_disk_keeps_the_previous_set_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    save_set(tmp_path, 1.0)
    calls = []

    def full_disk(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    real_save = run_folder._torch_save
    monkeypatch.setattr(run_folder, "_torch_save", full_disk)
    with pytest.raises(CheckpointError, match=r"cannot save checkpoint 'latest' .*No space left on device.*previous 'latest'.* is kept"):
        save_set(tmp_path, 2.0)
    assert loaded_value(tmp_path) == 1.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_disk_too_small_for_the_set_is_refused_before_writing(tmp_path, monkeypatch):
    save_set(tmp_path, 1.0)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"cannot save checkpoint 'latest' \(No space left on device|MiB needed"):
        save_set(tmp_path, 2.0)
    assert loaded_value(tmp_path) == 1.0


def test_non_finite_weights_never_reach_a_checkpoint_file(tmp_path):
    """The model refuses them (models/base_model.py); loading refuses files that hold them."""
    torch.save({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "bad.pth")
    from models.base_model import load_state_dict_file

    with pytest.raises(CheckpointError, match=r"bad\.pth: holds NaN/Inf weights"):
        load_state_dict_file(torch.nn.Linear(1, 2, bias=False), tmp_path / "bad.pth", torch.device("cpu"))


def _save_and_die_at(folder: str, kill_at: int, counter) -> None:
    """In a forked child: save set 2.0 over set 1.0, SIGKILLed at the ``kill_at``-th file operation."""
    operations = {"n": 0}

    def step(function):
        def wrapped(*args, **kwargs):
            operations["n"] += 1
            counter.value = operations["n"]
            if operations["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return wrapped

    run_folder._torch_save = step(run_folder._torch_save)
    run_folder.os.replace = step(os.replace)
    run_folder.os.link = step(os.link)
    run_folder.shutil.rmtree = step(run_folder.shutil.rmtree)
    save_set(folder, 2.0)
    os._exit(0)


def test_sigkill_at_each_point_of_a_save_leaves_the_old_set_or_the_new_one(tmp_path):
    context = multiprocessing.get_context("fork")
    counter = context.Value("i", 0)
    kill_at, outcomes = 1, []
    while True:
        folder = tmp_path / f"kill_{kill_at}"
        save_set(folder, 1.0)
        child = context.Process(target=_save_and_die_at, args=(str(folder), kill_at, counter))
        child.start()
        child.join(60)
        killed = child.exitcode == -signal.SIGKILL
        outcomes.append(loaded_value(folder))  # whole old (1.0) or whole new (2.0): never a mix, never an error
        save_set(folder, 3.0)  # the next save cleans up what the killed one left
        assert loaded_value(folder) == 3.0
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
        if not killed:
            break
        kill_at += 1
    assert kill_at > 8, "the save should have several points to be killed at"
    assert outcomes[0] == 1.0 and outcomes[-1] == 2.0
    assert set(outcomes) == {1.0, 2.0}


# -- the lock and a fresh start -------------------------------------------------------------
def test_a_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(run_folder.__file__.rsplit('/util/', 1)[0])!r})
            from util.run_folder import RunLock
            lock = RunLock({str(tmp_path)!r}); lock.acquire(); print("locked", flush=True); time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"in use by another training run \(process {holder.pid} on"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).check_free()  # a dead holder leaves no stale lock


def test_clear_run_removes_what_a_run_wrote_and_nothing_else(tmp_path):
    save_set(tmp_path, 1.0)
    save_options(tmp_path, {"netG": "unet_128"})
    (tmp_path / "loss_log.txt").write_text("x")
    (tmp_path / "notes.md").write_text("mine")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]
