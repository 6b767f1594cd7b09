"""Does a training recipe beat the input average? Train named recipes, score held-out patients.

Each recipe is a set of train.py flags. For every recipe and seed this script runs the
project's own commands, as a user would: ``train.py`` for a fixed number of iterations on a
phantom's ``trainA/``/``trainB/``, then ``test.py`` on its held-out ``testA/``/``testB/``
patients (other patients than those trained on). It reads ``metrics.json`` and prints one
Markdown table, recipe by recipe: iterations, wall time, MAE (HU, body), PSNR, SSIM, the MAE
reduction versus the identity baseline (the input average scored against the same target),
and the MAE where tissue moves and where it does not, each beside the input's. With several
seeds a cell reads ``mean ± sd`` over seeds. ``--json`` writes every figure.

    python benchmarks/quality.py                                  # the lever study on a CPU budget
    python benchmarks/quality.py --recipes reference,recommended --seeds 0,1,2
    python benchmarks/quality.py --smoke                          # CI: two recipes, a few iterations
    # at the users' resolution, on a GPU:
    python benchmarks/quality.py --size seed --resize_to 512 --netG unet_512 --ngf 64 --ndf 64 \\
        --num_train 10 --num_test 3 --iterations 3000 --recipes reference,recommended

The phantom is written once per settings (``datasets/make_phantom.py``, ``--phantom_seed``
1000 by default, so its patients are not the README demo's) under ``--workdir`` and reused.
The budget is counted in generator steps of ``--batch_size`` slices; it is rounded to whole
epochs, and the table gives the steps really taken.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib

REPO = Path(__file__).resolve().parents[1]

# Each lever "<base>/<change>" changes one thing of its base recipe (comments say what).
RECIPES: dict[str, dict] = {
    # The reference document's Step-4 flags (its resolution and generator come from this
    # script's --resize_to/--netG, as for every recipe).
    "reference": {"flags": ["--lambda_L1", "50", "--lr", "0.0001"]},
    # The README demo's flags before this study.
    "demo": {"flags": ["--residual", "--lambda_L1", "1000", "--no_dropout", "--intensity", "hu"]},
    "demo/no-residual": {"base": "demo", "drop": ["--residual"]},
    "demo/L1x100": {"base": "demo", "set": {"--lambda_L1": "100"}},
    "demo/no-GAN": {"base": "demo", "add": ["--lambda_GAN", "0"]},
    "demo/GANx0.1": {"base": "demo", "add": ["--lambda_GAN", "0.1"]},
    "demo/lsgan": {"base": "demo", "add": ["--gan_mode", "lsgan"]},
    "demo/dropout": {"base": "demo", "drop": ["--no_dropout"]},
    "demo/per-volume": {"base": "demo", "set": {"--intensity": "volume"}},
    "demo/2.5D": {"base": "demo", "add": ["--context_slices", "1"]},
    "demo/L1-body": {"base": "demo", "add": ["--l1_region", "body"]},
    "demo/constant-LR": {"base": "demo", "schedule": "constant"},
    "demo/LRx5": {"base": "demo", "add": ["--lr", "0.001"]},
    # The recipe the README recommends: train.py --preset phase0 (options/presets.py), the
    # winning levers above together; each "recommended/<change>" takes one of them back.
    "recommended": {"flags": ["--preset", "phase0"]},
    "recommended/no-2.5D": {"base": "recommended", "add": ["--context_slices", "0"]},
    "recommended/vanilla-GAN": {"base": "recommended", "add": ["--gan_mode", "vanilla"]},
    "recommended/L1-image": {"base": "recommended", "add": ["--l1_region", "image"]},
    "recommended/5-slices": {"base": "recommended", "add": ["--context_slices", "2"]},
    "recommended/dropout": {"base": "recommended", "add": ["--no_dropout", "False"]},
}
STUDY = list(RECIPES)
SMOKE = ["reference", "recommended"]


def recipe_flags(name: str) -> list[str]:
    """train.py flags of a recipe, its base's changed as it says."""
    recipe = RECIPES[name]
    if "base" not in recipe:
        return list(recipe["flags"])
    flags = recipe_flags(recipe["base"])
    for flag in recipe.get("drop", []):
        flags.remove(flag)
    for flag, value in recipe.get("set", {}).items():
        flags[flags.index(flag) + 1] = value
    return flags + list(recipe.get("add", []))


def schedule_flags(name: str, epochs: int) -> list[str]:
    """Half the epochs at the initial rate, half decaying linearly to 0 (upstream's shape), or all constant."""
    if RECIPES[name].get("schedule") == "constant":
        return ["--n_epochs", str(epochs), "--n_epochs_decay", "0"]
    decay = epochs // 2
    return ["--n_epochs", str(epochs - decay), "--n_epochs_decay", str(decay)]


def make_phantom(args: argparse.Namespace) -> Path:
    root = args.workdir / f"phantom_{args.size}_{args.num_train}+{args.num_test}_seed{args.phantom_seed}"
    if not (root / "testB").is_dir():
        run([sys.executable, str(REPO / "datasets" / "make_phantom.py"), "--output_dir", str(root),
             "--size", args.size, "--num_train", str(args.num_train), "--num_test", str(args.num_test),
             "--seed", str(args.phantom_seed), "--overwrite"])
    return root


def count_slices(folder: Path) -> int:
    """Axial slices in a folder of canonical-orientation phantom volumes (their last axis)."""
    return sum(nib.load(path).shape[2] for path in sorted(folder.glob("*.nii*")))


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        sys.exit(f"{Path(command[1]).name} failed (exit {done.returncode}): " + " | ".join(tail))


def train_and_score(args: argparse.Namespace, dataroot: Path, name: str, seed: int, epochs: int) -> dict:
    run_name = "q_" + "".join(c if c.isalnum() else "_" for c in name) + f"_seed{seed}"
    common = ["--dataroot", str(dataroot), "--name", run_name, "--checkpoints_dir", str(args.workdir / "checkpoints"),
              "--model", "pix2pix", "--dataset_mode", "robust_nifti", "--axial_slice", "--preprocess", "none"]
    # --input_nc is left to train.py: 1+2K with --context_slices K, from a recipe or a preset
    train = [sys.executable, str(REPO / "train.py"), *common, "--overwrite", *recipe_flags(name),
             *schedule_flags(name, epochs), "--norm", "instance", "--netG", args.netG, "--ngf", str(args.ngf), "--ndf", str(args.ndf),
             "--resize_to", str(args.resize_to), "--batch_size", str(args.batch_size), "--seed", str(seed),
             "--cache_dir", str(args.workdir / "cache"), "--log_dir", str(args.workdir / "logs"),
             "--display_id", "0", "--no_html", "--val_freq", "0", "--save_epoch_freq", str(10**6),
             "--print_freq", str(10**6)]
    if args.gpu_ids is not None:
        train += ["--gpu_ids", args.gpu_ids]
    start = time.perf_counter()
    run(train)
    train_seconds = time.perf_counter() - start
    results = args.workdir / "results"
    test = [sys.executable, str(REPO / "test.py"), *common, "--results_dir", str(results), "--epoch", "latest",
            "--num_test", str(10**6), "--num_images", "1"]
    if args.gpu_ids is not None:
        test += ["--gpu_ids", args.gpu_ids]
    run(test)
    summary = json.loads((results / run_name / "test_latest" / "metrics.json").read_text())["summary"]
    scores = {key: stats["mean"] for key, stats in summary.items()}
    shutil.rmtree(args.workdir / "checkpoints" / run_name, ignore_errors=True)  # GBs at 512 with unet_512
    return {"recipe": name, "seed": seed, "train_seconds": train_seconds, **scores}


def reduction(row: dict) -> float:
    """Per cent of the input average's MAE that the model removes (negative: worse than the input)."""
    return 100.0 * (row["baseline_mae_hu"] - row["mae_hu"]) / row["baseline_mae_hu"]


def cell(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(rows: list[dict], iterations: int) -> str:
    lines = [
        "| recipe | seeds | steps | train time (s) | MAE (HU) | input MAE | reduction | PSNR (dB) | SSIM "
        "| moving MAE (input) | static MAE (input) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(row["recipe"] for row in rows):
        group = [row for row in rows if row["recipe"] == name]

        def col(key: str, group: list[dict] = group) -> list[float]:
            return [row.get(key) for row in group]

        lines.append(" | ".join([
            f"| {name}", str(len(group)), str(iterations), cell(col("train_seconds"), "{:.0f}"),
            cell(col("mae_hu"), "{:.1f}"), cell(col("baseline_mae_hu"), "{:.1f}"),
            cell([reduction(row) for row in group], "{:+.1f}%"), cell(col("psnr_db"), "{:.2f}"),
            cell(col("ssim"), "{:.4f}"),
            f"{cell(col('mae_moving_hu'), '{:.1f}')} ({cell(col('baseline_mae_moving_hu'), '{:.1f}')})",
            f"{cell(col('mae_static_hu'), '{:.1f}')} ({cell(col('baseline_mae_static_hu'), '{:.1f}')}) |",
        ]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", help=f"comma-separated names (default: all): {', '.join(RECIPES)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; several give a spread")
    parser.add_argument("--iterations", type=int, default=384, help="generator steps per run (rounded to epochs)")
    parser.add_argument("--size", default="small", choices=("small", "seed"), help="phantom size (make_phantom.py)")
    parser.add_argument("--num_train", type=int, default=8)
    parser.add_argument("--num_test", type=int, default=3)
    parser.add_argument("--phantom_seed", type=int, default=1000)
    parser.add_argument("--dataroot", type=Path, help="use this data set instead of making a phantom")
    parser.add_argument("--netG", default="unet_128")
    parser.add_argument("--ngf", type=int, default=32)
    parser.add_argument("--ndf", type=int, default=32)
    parser.add_argument("--resize_to", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--gpu_ids", help="passed to train.py and test.py (default: theirs, GPU 0 when there is one)")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "quality")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--smoke", action="store_true",
                        help="CI form: reference and recommended, 2 training + 1 test patients, one epoch each")
    args = parser.parse_args()
    if args.smoke:
        args.recipes = args.recipes or ",".join(SMOKE)
        args.num_train, args.num_test, args.iterations = 2, 1, 1
    names = args.recipes.split(",") if args.recipes else STUDY
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)

    dataroot = args.dataroot or make_phantom(args)
    steps_per_epoch = math.ceil(count_slices(dataroot / "trainA") / args.batch_size)
    epochs = max(1, round(args.iterations / steps_per_epoch))
    iterations = epochs * steps_per_epoch
    print(f"data: {dataroot} ({steps_per_epoch} steps of {args.batch_size} slices per epoch); "
          f"{epochs} epoch(s) = {iterations} steps per run; {args.netG} ngf {args.ngf} at {args.resize_to} px",
          flush=True)

    rows = []
    for name in names:
        for seed in seeds:
            row = train_and_score(args, dataroot, name, seed, epochs)
            rows.append(row)
            print(f"  {name} (seed {seed}): MAE {row['mae_hu']:.1f} HU vs input {row['baseline_mae_hu']:.1f} "
                  f"({reduction(row):+.1f}%), {row['train_seconds']:.0f} s", flush=True)
    print()
    print(table(rows, iterations))
    document = {"settings": {**{k: str(v) for k, v in vars(args).items()}, "iterations_run": iterations,
                             "epochs": epochs, "flags": {name: recipe_flags(name) for name in names}},
                "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(document, indent=2))
    print("\n" + json.dumps(document["runs"]))


if __name__ == "__main__":
    main()
