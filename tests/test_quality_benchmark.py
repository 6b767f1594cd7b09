"""benchmarks/quality.py: recipes are what they say, and the CI form runs end to end."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.conftest import REPO, run_script

sys.path.insert(0, str(REPO / "benchmarks"))
import quality


def test_each_lever_changes_one_thing_of_its_base():
    for name, recipe in quality.RECIPES.items():
        if "base" not in recipe:
            continue
        base, lever = quality.recipe_flags(recipe["base"]), quality.recipe_flags(name)
        changes = len(recipe.get("drop", [])) + len(recipe.get("set", {})) + len(recipe.get("add", [])) // 2
        changes += recipe.get("schedule") is not None
        assert changes == 1, name
        if recipe.get("schedule"):
            assert lever == base and quality.schedule_flags(name, 6) != quality.schedule_flags(recipe["base"], 6)
        else:
            assert lever != base, name


def test_the_reference_recipe_is_the_reference_step_4_loss_and_rate():
    flags = quality.recipe_flags("reference")
    assert flags[flags.index("--lambda_L1") + 1] == "50" and flags[flags.index("--lr") + 1] == "0.0001"
    assert "--residual" not in flags and "--preset" not in flags


@pytest.mark.slow
def test_smoke_run_scores_both_recipes_beside_the_input(tmp_path, phantom_root):
    out = tmp_path / "quality.json"
    result = run_script("benchmarks/quality.py", "--smoke", "--dataroot", phantom_root, "--ngf", "4", "--ndf", "4",
                        "--workdir", tmp_path / "work", "--json", out, "--gpu_ids", "-1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| reference", "| recommended"]
    runs = json.loads(out.read_text())["runs"]
    assert [run["recipe"] for run in runs] == ["reference", "recommended"]
    for run in runs:
        for key in ("mae_hu", "baseline_mae_hu", "mae_moving_hu", "mae_static_hu", "psnr_db", "ssim"):
            assert math.isfinite(run[key]), (run["recipe"], key)
    # Both are scored against the same targets; the recommended recipe starts from the identity
    # (a residual generator) while the reference's must first learn to draw a CT at all.
    reference, recommended = runs
    assert reference["baseline_mae_hu"] == recommended["baseline_mae_hu"]
    assert recommended["mae_hu"] < reference["mae_hu"]
