"""benchmarks/train_speed.py: its CPU form runs every part end to end and reports figures that make sense."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_script

pytestmark = pytest.mark.slow  # starts train.py, batch_process_patients.py and make_phantom.py


def test_the_smoke_form_prints_both_paths_and_writes_sane_figures(tmp_path, one_thread):
    out = tmp_path / "speed.json"
    # ngf/ndf 8: the figures' size does not matter here, only that every part runs and adds up.
    result = run_script(
        "benchmarks/train_speed.py",
        "--smoke",
        "--ngf",
        "8",
        "--ndf",
        "8",
        "--gpu_ids",
        "-1",
        "--fast_flags",
        "--precision bf16 --fused_adam",
        "--json",
        out,
        "--workdir",
        tmp_path / "work",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())

    steps = figures["steps"]
    assert [(row["netG"], row["batch_size"], row["path"]) for row in steps] == [
        ("unet_128", 2, "upstream"),
        ("unet_128", 2, "project"),
    ]
    for row in steps:
        assert row["slices_per_s"] > 0 and row["ms_per_step"] > 0, row
        assert row["slices_per_s"] == pytest.approx(2 / (row["ms_per_step"] / 1e3))
        assert row["tflop_per_step"] > 0 and row["achieved_tflop_per_s"] > 0, row
        assert row["peak_gpu_memory_gib"] is None  # CUDA's figure only
    assert steps[0]["tflop_per_step"] == steps[1]["tflop_per_step"], "the same step, counted once"
    assert "bf16 autocast" in steps[1]["settings"] and "TF32 off" in steps[0]["settings"]

    train = figures["train_py"]
    assert [epoch["slices"] for epoch in train["epochs"]] == [16]  # 2 phantom pairs of 8 slices, one epoch
    assert train["wall_seconds"] > train["epoch_seconds"] > 0 and train["steady_slices_per_s"] > 0
    assert train["speed_line"].startswith("bf16 autocast"), "train.py ran the path asked for"

    batch = figures["batch_process"]
    assert set(batch["wall_seconds"]) == {"1", "2"} and all(v > 0 for v in batch["wall_seconds"].values())
    assert math.isfinite(batch["marginal_seconds_per_volume"]) and len(batch["summary_seconds"]) == 2

    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert any("| upstream-style fp32 |" in line for line in table)
    assert any("| this project (--precision bf16 --fused_adam) |" in line for line in table)
    assert any(line.startswith("| train.py, 16 slices") for line in table)
    assert any(line.startswith("| batch_process_patients.py") for line in table)
