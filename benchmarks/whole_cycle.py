"""The whole breathing cycle from one average CT: does one generator make every phase, and which
conditioning tells it the phase best?

On a phantom whose side B holds all phases (``make_phantom.py --write_all_phases``), this
script trains three models with the project's own ``train.py``, the same recipe
(``--preset phase0``) and the same number of generator steps of ``--batch_size`` slices:

* ``all phases, input``: ``--phases all --phase_conditioning input --norm batch`` (a phase-code
  channel; one sample per (slice, phase), so an epoch is N times longer; batch norm, because
  instance norm after a ResNet's first convolution erases a constant channel);
* ``all phases, output``: ``--phases all --phase_conditioning output`` (one output channel per
  phase: each step's slices carry every phase's target);
* ``phase 0 only``: ``--phases 0``, today's model.

The learning rate is constant (no decay), so a run's epochs only count the data. Held-out
patients (other patients than those trained on) are then generated with
:meth:`inference.volume.PhaseGenerator.translate_phases` and scored with evaluation/metrics.py's
``score_volume`` (MAE in the target's body mask): per phase against the true phase, beside the
input average's MAE against the same phase (the identity baseline); the MIP over the generated
phases against the true MIP, beside the input's (the input is its own "MIP": one volume); and
the phase-0 model on phase 0. It prints Markdown tables and writes every figure as JSON.

    python benchmarks/whole_cycle.py --json whole_cycle.json      # ~2.5 min on 2 CPU cores (OMP_NUM_THREADS=1)
    python benchmarks/whole_cycle.py --smoke                      # CI: tiny phantom, one epoch each
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.phases import find_phase_sets, read_phase  # noqa: E402
from data.volume_io import read_volume, strip_nifti_suffix  # noqa: E402
from evaluation.metrics import score_volume  # noqa: E402
from inference.volume import load_generator  # noqa: E402

# The compared models, by label: train.py flags beside the common recipe.
MODELS: dict[str, list[str]] = {
    # Batch norm: the preset's instance norm, right after a ResNet's first convolution, removes
    # the constant phase-code channel (options refuse that combination).
    "all phases, input": ["--phases", "all", "--phase_conditioning", "input", "--norm", "batch"],
    "all phases, output": ["--phases", "all", "--phase_conditioning", "output"],
    "phase 0 only": ["--phases", "0"],
}
MODEL_IDS = dict(zip(("input", "output", "phase0"), MODELS, strict=True))  # --models names them so


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        sys.exit(f"{Path(command[1]).name} failed (exit {done.returncode}): " + " | ".join(tail))


def make_phantom(args: argparse.Namespace) -> Path:
    grid = "x".join(map(str, args.shape)) + "@" + "x".join(f"{s:g}" for s in args.spacing_mm)
    root = args.workdir / f"phantom_{grid}_{args.num_phases}phases_{args.num_train}+{args.num_test}_seed{args.phantom_seed}"
    if not (root / "testB").is_dir() or not any((root / "testB").iterdir()):
        command = [sys.executable, str(REPO / "datasets" / "make_phantom.py"), "--output_dir", str(root),
                   "--shape", *map(str, args.shape), "--spacing_mm", *map(str, args.spacing_mm), "--num_train", str(args.num_train), "--num_test", str(args.num_test),
                   "--num_phases", str(args.num_phases), "--seed", str(args.phantom_seed), "--overwrite",
                   "--write_all_phases", "--phase_layout", "4d"]
        run(command)
    return root


def count_slices(folder: Path) -> int:
    """Axial slices of the inputs (the phantom's canonical last axis)."""
    return sum(read_volume(path)[0].shape[2] for path in sorted(folder.glob("*.nii*")))


def train(args: argparse.Namespace, dataroot: Path, name: str, epochs: int) -> tuple[str, float]:
    run_name = "wc_" + "".join(c if c.isalnum() else "_" for c in name)
    command = [sys.executable, str(REPO / "train.py"), "--dataroot", str(dataroot), "--name", run_name,
               "--checkpoints_dir", str(args.workdir / "checkpoints"), "--overwrite", "--preset", "phase0",
               *MODELS[name], "--n_epochs", str(epochs), "--n_epochs_decay", "0", "--netG", args.netG,
               "--ngf", str(args.ngf), "--ndf", str(args.ndf), "--resize_to", str(args.resize_to),
               "--batch_size", str(args.batch_size), "--seed", str(args.seed), "--num_phases", str(args.num_phases),
               "--cache_dir", str(args.workdir / "cache"), "--log_dir", str(args.workdir / "logs"),
               "--display_id", "0", "--no_html", "--val_freq", "0", "--save_epoch_freq", str(10**6),
               "--print_freq", str(10**6), "--gpu_ids", args.gpu_ids]
    start = time.perf_counter()
    run(command)
    return run_name, time.perf_counter() - start


def held_out(dataroot: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(patient, input average, true phases (N, X, Y, Z))`` of every test patient, in HU."""
    inputs = {strip_nifti_suffix(p.name): p for p in sorted((dataroot / "testA").glob("*.nii*"))}
    sets, _ = find_phase_sets(dataroot / "testB", inputs)
    return [
        (patient, read_volume(inputs[patient])[0], np.stack([read_phase(s)[0] for s in sets[patient].sources]))
        for patient in sorted(sets)
    ]


def score(args: argparse.Namespace, run_name: str, patients: list) -> dict:
    """Per-phase MAE (HU, body) of the model's phases and of the input, and the MIP's, per patient."""
    generator = load_generator(args.workdir / "checkpoints", run_name)
    rows = []
    for patient, average, phases in patients:
        generated, _ = generator.translate_phases(average, batch_size=16)  # (P, X, Y, Z)
        row = {"patient": patient, "phases": list(generator.phases), "mae_hu": {}, "input_mae_hu": {}}
        for j, k in enumerate(generator.phases):
            row["mae_hu"][k] = score_volume(generated[j], phases[k])["mae_hu"]
            row["input_mae_hu"][k] = score_volume(average, phases[k])["mae_hu"]
        if len(generator.phases) == len(phases):
            true_mip = phases.max(axis=0)
            row["mip_mae_hu"] = score_volume(generated.max(axis=0), true_mip)["mae_hu"]
            row["input_mip_mae_hu"] = score_volume(average, true_mip)["mae_hu"]
            row["average_vs_input_mae_hu"] = score_volume(generated.mean(axis=0), average)["mae_hu"]
        rows.append(row)
    return {"phases": list(generator.phases), "patients": rows}


def mean_over(rows: list[dict], key: str, phase: int | None = None) -> float:
    """Mean of ``row[key]`` (of ``row[key][phase]``) over the rows that hold it; NaN if none does."""
    values = [row[key] if phase is None else row[key][phase] for row in rows
              if key in row and (phase is None or phase in row[key])]
    return float(np.mean(values)) if values else math.nan


def farthest_phase(patients: list) -> int:
    """The phase that differs most from phase 0 (mean |phase K - phase 0| in the body)."""
    differences = np.mean([[score_volume(phases[k], phases[0])["mae_hu"] if k else 0.0 for k in range(len(phases))]
                           for _, _, phases in patients], axis=0)
    return int(np.argmax(differences))


def tables(results: dict, num_phases: int, farthest: int) -> str:
    names = list(results)
    first = max(results.values(), key=lambda result: len(result["phases"]))["patients"]  # the input's baselines
    head = "| phase | input average | " + " | ".join(names) + " |"
    rule = "|---" * (2 + len(names)) + "|"
    lines = ["Per-phase MAE (HU, in the body) on held-out patients; lower is better.", "", head, rule]
    for k in range(num_phases):
        label = f"{k}" + (" (end-inhale)" if k == 0 else " (farthest from 0)" if k == farthest else "")
        cells = [f"{mean_over(results[n]['patients'], 'mae_hu', k):.1f}" if k in results[n]["phases"] else "–"
                 for n in names]
        lines.append(f"| {label} | {mean_over(first, 'input_mae_hu', k):.1f} | " + " | ".join(cells) + " |")
    mean_cells = [f"{np.mean([mean_over(results[n]['patients'], 'mae_hu', k) for k in results[n]['phases']]):.1f}"
                  for n in names]
    mean_input = np.mean([mean_over(first, "input_mae_hu", k) for k in range(num_phases)])
    lines.append(f"| mean over the model's phases | {mean_input:.1f} | " + " | ".join(mean_cells) + " |")
    multi = [n for n in names if len(results[n]["phases"]) == num_phases]
    if multi:
        lines += ["", "MIP over the phases: MAE (HU, body) against the true MIP; the input is its own MIP. "
                  "Last column: the generated phases' mean against the input average.", "",
                  "| model | MIP MAE | input's MIP MAE | mean of phases vs input |", "|---|---|---|---|"]
        for n in multi:
            rows = results[n]["patients"]
            lines.append(f"| {n} | {mean_over(rows, 'mip_mae_hu'):.1f} | {mean_over(rows, 'input_mip_mae_hu'):.1f} "
                         f"| {mean_over(rows, 'average_vs_input_mae_hu'):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=480,
                        help="generator steps per model (rounded to whole epochs of the phase-0 model; "
                        "the input-conditioned model's epoch is N times longer)")
    # The demo's 350 mm field of view and 190 mm thorax on a grid that trains on a shared 2-core CPU.
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 24], help="phantom grid (voxels)")
    parser.add_argument("--spacing_mm", type=float, nargs=3, default=[5.5, 5.5, 8.0], help="phantom voxel size")
    parser.add_argument("--num_phases", type=int, default=10)
    parser.add_argument("--num_train", type=int, default=8)
    parser.add_argument("--num_test", type=int, default=3)
    parser.add_argument("--phantom_seed", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--netG", default="resnet_6blocks")
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--ndf", type=int, default=16)
    parser.add_argument("--resize_to", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--models", help=f"comma-separated (default: all): {', '.join(MODEL_IDS)}")
    parser.add_argument("--gpu_ids", default="-1", help="passed to train.py (default: the CPU)")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "whole_cycle")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--smoke", action="store_true",
                        help="CI form: 32x32x8 phantom (11 mm voxels) of 2 phases, 1 training + 1 test patient, resnet_6blocks at 32 px")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.spacing_mm, args.num_phases, args.num_train, args.num_test = [32, 32, 8], [11, 11, 24], 2, 1, 1
        args.netG, args.ngf, args.ndf, args.resize_to, args.iterations = "resnet_6blocks", 4, 4, 32, 1
    ids = [n.strip() for n in args.models.split(",")] if args.models else list(MODEL_IDS)
    unknown = [n for n in ids if n not in MODEL_IDS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODEL_IDS)}")
    names = [MODEL_IDS[n] for n in ids]
    args.workdir.mkdir(parents=True, exist_ok=True)

    dataroot = make_phantom(args)
    steps_per_epoch = math.ceil(count_slices(dataroot / "trainA") / args.batch_size)
    epochs = max(1, round(args.iterations / steps_per_epoch))
    # Same steps for every model: the input-conditioned epoch holds every (slice, phase) pair.
    epochs_of = {n: max(1, round(epochs / args.num_phases)) if "input" in n else epochs for n in names}
    steps_of = {n: (math.ceil(count_slices(dataroot / "trainA") * args.num_phases / args.batch_size) if "input" in n
                    else steps_per_epoch) * epochs_of[n] for n in names}
    print(f"data: {dataroot}; {args.netG} ngf {args.ngf} at {args.resize_to} px, batch {args.batch_size}; steps: "
          + ", ".join(f"{n} {steps_of[n]} ({epochs_of[n]} epochs)" for n in names), flush=True)
    patients = held_out(dataroot)
    farthest = farthest_phase(patients)

    results = {}
    for name in names:
        run_name, seconds = train(args, dataroot, name, epochs_of[name])
        results[name] = {**score(args, run_name, patients), "train_seconds": seconds, "steps": steps_of[name],
                         "epochs": epochs_of[name], "flags": MODELS[name]}
        rows = results[name]["patients"]
        print(f"  {name}: phase 0 MAE {mean_over(rows, 'mae_hu', 0):.1f} HU (input {mean_over(rows, 'input_mae_hu', 0):.1f}), "
              f"{steps_of[name]} steps in {seconds:.0f} s", flush=True)
    text = tables(results, args.num_phases, farthest)
    text += (f"\n\n{len(patients)} held-out patients; {args.num_train} training patients; {args.num_phases} phases; "
             f"--preset phase0, {args.netG} ngf {args.ngf}, {args.resize_to} px, batch {args.batch_size}, constant "
             f"learning rate; steps per model: " + ", ".join(f"{n} {steps_of[n]}" for n in names) + ".")
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        document = {"settings": {k: (v if isinstance(v, int | float | list) or v is None else str(v))
                                 for k, v in vars(args).items()},
                    "farthest_phase": farthest, "models": results}
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
