"""Unregistered pairs: CycleGAN against pix2pix when the training targets are not where the inputs are.

Writes a phantom whose ``trainB/`` volumes are moved rigidly (``make_phantom.py --misregister
SHIFT_VOX ROTATION_DEG``: a shift in the axial plane and a rotation about the SI axis, per
patient) while ``testB/`` holds the TRUE, registered phase 0 of held-out patients. Then, as a
user would, trains through ``train.py`` on the same misregistered training data:

* ``cycle_gan``: ``--dataset_mode unaligned_nifti``, residual generators, HU window, identity loss;
* ``pix2pix``: ``--dataset_mode robust_nifti`` on the misregistered pairs, the same generator,
  residual, HU window, L1 in the body (the README's recipe without 2.5D, which CycleGAN refuses);

and scores each with ``test.py`` against the registered truth. Prints one Markdown table (MAE in
HU inside the body, of the input average, of CycleGAN and of pix2pix, and PSNR/SSIM) and the JSON.

    python benchmarks/unregistered.py                  # the README's table (15-20 min on 2 busy CPU cores)
    python benchmarks/unregistered.py --models cycle_gan --lambda_cycle 10 --lambda_identity 2   # its other rows
    python benchmarks/unregistered.py --smoke          # CI: 2 training + 1 test patient, one epoch each
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]

# What differs between the two models; everything else (generator, size, window, schedule) is shared.
MODELS: dict[str, list[str]] = {
    "cycle_gan": ["--model", "cycle_gan", "--dataset_mode", "unaligned_nifti", "--gan_mode", "lsgan",
                  "--pool_size", "50"],
    "pix2pix": ["--model", "pix2pix", "--dataset_mode", "robust_nifti", "--gan_mode", "lsgan", "--lambda_L1", "1000",
                "--l1_region", "body", "--no_dropout"],
}


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        sys.exit(f"{Path(command[1]).name} failed (exit {done.returncode}): " + " | ".join(tail))
    return done.stdout


def make_phantom(args: argparse.Namespace) -> Path:
    shift, rotation = args.misregister
    root = args.workdir / (f"phantom_{'x'.join(map(str, args.shape))}_{args.num_train}+{args.num_test}"
                           f"_seed{args.phantom_seed}_shift{shift:g}_rot{rotation:g}")
    if not (root / "testB").is_dir() or not (root / "trueB").is_dir():
        run([sys.executable, str(REPO / "datasets" / "make_phantom.py"), "--output_dir", str(root),
             "--shape", *map(str, args.shape), "--spacing_mm", *map(str, args.spacing_mm),
             "--num_train", str(args.num_train), "--num_test", str(args.num_test), "--seed", str(args.phantom_seed),
             "--misregister", str(shift), str(rotation), "--overwrite"])
    return root


def misregistration_hu(root: Path) -> float:
    """Mean |moved - registered| phase 0 of the training patients, in HU inside the body: what pix2pix's L1 sees."""
    values = []
    for moved in sorted((root / "trainB").glob("*.nii.gz")):
        a = np.asarray(nib.load(moved).dataobj, dtype=np.float32)
        b = np.asarray(nib.load(root / "trueB" / moved.name).dataobj, dtype=np.float32)
        values.append(float(np.abs(a - b)[b > -500].mean()))
    return float(np.mean(values))


def train_and_score(args: argparse.Namespace, dataroot: Path, model: str, epochs: int) -> dict:
    name = f"unregistered_{model}_seed{args.seed}"
    common = ["--dataroot", str(dataroot), "--name", name, "--checkpoints_dir", str(args.workdir / "checkpoints")]
    decay = epochs // 2
    train = [sys.executable, str(REPO / "train.py"), *common, *MODELS[model], "--overwrite",
             "--netG", args.netG, "--ngf", str(args.ngf), "--ndf", str(args.ndf), "--norm", "instance",
             "--resize_to", str(args.resize_to), "--residual", "--intensity", "hu", "--axial_slice",
             "--n_epochs", str(epochs - decay), "--n_epochs_decay", str(decay), "--batch_size", str(args.batch_size),
             "--seed", str(args.seed), "--cache_dir", str(args.workdir / "cache"), "--log_dir", str(args.workdir / "logs"),
             "--display_id", "0", "--no_html", "--val_freq", "0", "--save_epoch_freq", str(10**6),
             "--print_freq", str(10**6), "--gpu_ids", args.gpu_ids]
    if model == "cycle_gan":
        train += ["--lambda_A", str(args.lambda_cycle), "--lambda_B", str(args.lambda_cycle),
                  "--lambda_identity", str(args.lambda_identity)]
    start = time.perf_counter()
    run(train)
    train_seconds = time.perf_counter() - start
    results = args.workdir / "results"
    run([sys.executable, str(REPO / "test.py"), *common, "--results_dir", str(results), "--epoch", "latest",
         "--num_test", str(10**6), "--num_images", "1", "--gpu_ids", args.gpu_ids])  # G_A for a cycle_gan run
    summary = json.loads((results / name / "test_latest" / "metrics.json").read_text())["summary"]
    return {"model": model, "train_seconds": train_seconds, **{key: stats["mean"] for key, stats in summary.items()}}


def table(rows: list[dict]) -> str:
    """One Markdown table: the input average, then each model, scored against the registered phase 0."""
    first = rows[0]
    lines = ["| volume scored against the true phase 0 | MAE (HU, body) | vs input | moving MAE | static MAE "
             "| PSNR (dB) | SSIM | train time (s) |",
             "|---|---|---|---|---|---|---|---|",
             f"| input average | {first['baseline_mae_hu']:.1f} | - | {first['baseline_mae_moving_hu']:.1f} "
             f"| {first['baseline_mae_static_hu']:.1f} | {first['baseline_psnr_db']:.2f} | {first['baseline_ssim']:.4f} | - |"]
    for row in rows:
        change = 100.0 * (row["mae_hu"] - row["baseline_mae_hu"]) / row["baseline_mae_hu"]
        lines.append(f"| {row['model']} | {row['mae_hu']:.1f} | {change:+.1f}% | {row['mae_moving_hu']:.1f} "
                     f"| {row['mae_static_hu']:.1f} | {row['psnr_db']:.2f} | {row['ssim']:.4f} "
                     f"| {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cycle_gan,pix2pix", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--iterations", type=int, default=480, help="steps per model (rounded to whole epochs)")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 24))
    parser.add_argument("--spacing_mm", type=float, nargs=3, default=(5.4, 5.4, 8.0))
    parser.add_argument("--num_train", type=int, default=8)
    parser.add_argument("--num_test", type=int, default=3)
    parser.add_argument("--phantom_seed", type=int, default=2000)
    parser.add_argument("--misregister", type=float, nargs=2, default=(2.0, 3.0), metavar=("SHIFT_VOX", "ROTATION_DEG"))
    parser.add_argument("--netG", default="resnet_6blocks")
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--ndf", type=int, default=16)
    parser.add_argument("--resize_to", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    # In the HU window's units (4095 HU over [-1, 1]) 10 HU of L1 is 0.005: upstream's weights (10, 0.5) leave
    # the GAN term in charge, which paints texture; these make the cycle and identity terms weigh as pix2pix's L1 does.
    parser.add_argument("--lambda_cycle", type=float, default=100.0, help="CycleGAN's --lambda_A and --lambda_B")
    parser.add_argument("--lambda_identity", type=float, default=5.0, help="CycleGAN's identity weight (relative)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu_ids", default="-1")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "unregistered")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--smoke", action="store_true", help="CI form: 2 training + 1 test patient, tiny networks, one epoch")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.smoke:
        args.num_train, args.num_test, args.iterations = 2, 1, 1
        args.shape, args.ngf, args.ndf = (32, 32, 8), 4, 4
        args.resize_to, args.netG = 32, "resnet_6blocks"
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    dataroot = make_phantom(args)
    slices = sum(nib.load(p).shape[2] for p in (dataroot / "trainA").glob("*.nii.gz"))
    steps_per_epoch = math.ceil(slices / args.batch_size)
    epochs = max(1, round(args.iterations / steps_per_epoch))
    moved_hu = misregistration_hu(dataroot)
    print(f"data: {dataroot}; trainB moved by up to {args.misregister[0]:g} voxels and {args.misregister[1]:g} degrees "
          f"(mean |moved - registered| in the body {moved_hu:.1f} HU); {epochs} epoch(s) of {steps_per_epoch} steps "
          f"per model; {args.netG} ngf {args.ngf} at {args.resize_to} px", flush=True)
    rows = []
    for model in models:
        row = train_and_score(args, dataroot, model, epochs)
        rows.append(row)
        print(f"  {model}: MAE {row['mae_hu']:.1f} HU vs input {row['baseline_mae_hu']:.1f}, "
              f"{row['train_seconds']:.0f} s", flush=True)
    print()
    print(table(rows))
    document = {"settings": {**{k: str(v) for k, v in vars(args).items()}, "epochs": epochs,
                             "steps": epochs * steps_per_epoch, "misregistration_mae_hu": moved_hu},
                "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(document, indent=2))
    print("\n" + json.dumps(document))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
