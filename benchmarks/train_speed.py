"""Training speed side by side: the upstream-style fp32 step against this project's default path; then train.py
and batch_process_patients.py end to end.

On one H100 (or H200); sized to fit 8 minutes on an H100 by issue 9's figures of the earlier code (it has not
run on a GPU yet). Prints Markdown tables; writes the JSON after each part, so a run cut short keeps what it measured:

    python benchmarks/train_speed.py --json train_speed_h100.json

On a CPU, or anywhere with --smoke, the small form (unet_128 at 128 x 128, batch 2, a few steps, a
small phantom) that CI runs; --fast_flags forces the fast path where the CPU's default is fp32:

    python benchmarks/train_speed.py --smoke --json train_speed_cpu.json
    python benchmarks/train_speed.py --smoke --fast_flags "--precision bf16 --fused_adam"

One process, one device (the end-to-end parts as child processes, as a user runs them):

1. **Steps**, for each generator of ``--netGs`` at ``--size`` x ``--size`` and each batch of
   ``--batch_sizes``, both paths built from this project's networks (``define_G``/``define_D``
   with instance norm, ``GANLoss``, L1; the reference's Step 4 settings):

   - *upstream*: pix2pix's ``optimize_parameters`` as upstream writes it, in float32 with TF32
     off and cuDNN autotuning off (PyTorch's defaults; upstream sets neither), torch's default Adam;
   - *this project*: ``Pix2PixModel`` as train.py builds it, with train.py's defaults on this
     device (util/fast_path.py) plus ``--fast_flags``, the backend flags of ``setup_runtime``,
     and the losses read as the training loop reads them.

   ``--warmup_steps`` untimed steps (cuDNN's autotuning), then ``--steps`` timed between two
   device synchronisations, on a batch already on the device: slices/s, ms per step, peak GPU
   memory (``torch.cuda.max_memory_allocated``; CUDA only) and achieved TFLOP/s: the FLOPs of
   one step (``torch.utils.flop_counter.FlopCounterMode``, counted on the meta device: the
   convolutions and matmuls of G's and D's forward and backward passes, the same for both
   paths) over the time of a step.
2. **train.py**: a seed-size phantom (``datasets/make_phantom.py --size seed``, 512 x 512 x 113,
   ``--train_pairs`` pairs made by parallel processes), then the reference's Step 4 command
   (unet_512, batch 4, ``--display_freq 100``) with ``--fast_flags``, Visdom and validation off,
   for ``--epochs`` epochs: 8 epochs of 10 pairs are 9,040 slices, the slices of one epoch of
   the 80-pair seed set. Reported: the process's wall time (start-up, slice-cache build,
   logging and checkpoints included), each epoch's time from the log, and slices/s over the
   epochs after the first (the first includes cuDNN's autotuning).
3. **batch_process_patients.py** with that run's model, on 1 and on ``--volumes`` of the
   phantom's average CTs (PNG slices on): the wall time of each process, and the marginal
   seconds per volume inside a batch, (wall(N) - wall(1)) / (N - 1), start-up excluded.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `python benchmarks/train_speed.py` puts benchmarks/, not the repository root, on sys.path.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models import create_model  # noqa: E402
from models.networks import GANLoss, define_D, define_G  # noqa: E402
from models.pix2pix_model import set_requires_grad  # noqa: E402
from options.train_options import TrainOptions  # noqa: E402
from training.step_losses import PendingSteps  # noqa: E402
from util.device import add_gpu_ids_argument, select_device  # noqa: E402
from util.runtime import setup_runtime  # noqa: E402

# The reference's Step 4 command (its dataroot, name and epochs are added per run).
REFERENCE_FLAGS = [
    "--model", "pix2pix", "--dataset_mode", "robust_nifti", "--skip_corrupted", "--preprocess", "none",
    "--input_nc", "1", "--output_nc", "1", "--axial_slice", "--norm", "instance", "--lambda_L1", "50",
    "--lr", "0.0001", "--display_freq", "100", "--save_epoch_freq", "5",
]  # fmt: skip
EPOCH_LINE = re.compile(r"epoch (\d+) took ([\d.]+) s \((\d+) steps, (\d+) slices\)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the small form (the default without CUDA)")
    parser.add_argument("--netGs", help="generators of the step table (default: unet_256,unet_512; smoke: unet_128)")
    parser.add_argument("--size", type=int, help="slice size (default 512; smoke 128)")
    parser.add_argument("--batch_sizes", help="batches of the step table (default 4,16; smoke 2)")
    parser.add_argument("--warmup_steps", type=int, help="untimed steps per row (default 5; smoke 1)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default 20; smoke 3)")
    parser.add_argument("--ngf", type=int, default=64, help="generator filters (the reference's 64)")
    parser.add_argument("--ndf", type=int, default=64, help="discriminator filters (the reference's 64)")
    parser.add_argument(
        "--fast_flags",
        default="",
        help="train.py flags added to this project's path, e.g. "
        "'--precision bf16 --fused_adam' (default: none, train.py's defaults on this device)",
    )
    parser.add_argument("--train_pairs", type=int, help="phantom pairs for train.py (default 10; smoke 2)")
    parser.add_argument("--epochs", type=int, help="train.py epochs (default 8: 9,040 slices; smoke 1)")
    parser.add_argument("--volumes", type=int, help="volumes for batch_process_patients.py (default 5; smoke 2)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: steps, train, batch")
    parser.add_argument("--json", type=Path, help="write the figures here (rewritten after each part)")
    parser.add_argument("--workdir", type=Path, help="phantom, run folder and outputs (default: a temporary folder)")
    add_gpu_ids_argument(parser, "GPU to measure on")
    return parser


def sizes(opt: argparse.Namespace) -> dict:
    """The sizes of this run: the H100 form on CUDA, the smoke form on the CPU or with --smoke."""
    smoke = opt.smoke or not opt.gpu_ids
    defaults = (
        {"netGs": "unet_128", "size": 128, "batch_sizes": "2", "warmup_steps": 1, "steps": 3, "train_pairs": 2,
         "epochs": 1, "volumes": 2}
        if smoke else
        {"netGs": "unet_256,unet_512", "size": 512, "batch_sizes": "4,16", "warmup_steps": 5, "steps": 20,
         "train_pairs": 10, "epochs": 8, "volumes": 5}
    )  # fmt: skip
    chosen = {key: getattr(opt, key) if getattr(opt, key) is not None else value for key, value in defaults.items()}
    chosen["netGs"] = chosen["netGs"].split(",")
    chosen["batch_sizes"] = [int(b) for b in str(chosen["batch_sizes"]).split(",")]
    chosen["smoke"] = smoke
    return chosen


# -- 1. steps ------------------------------------------------------------------------------------
class UpstreamPix2Pix:
    """pix2pix's training step as upstream writes it, on this project's networks: float32, no checks, no reads."""

    def __init__(self, netG: str, ngf: int, ndf: int, lambda_L1: float, device: torch.device):
        self.netG = define_G(1, 1, ngf, netG, norm="instance", use_dropout=True, device=device)
        self.netD = define_D(2, ndf, "basic", norm="instance", device=device)  # sees cat(A, B)
        self.criterionGAN = GANLoss("vanilla").to(device)
        self.criterionL1 = torch.nn.L1Loss()
        self.lambda_L1 = lambda_L1
        if device.type != "meta":
            self.optimizer_G = torch.optim.Adam(self.netG.parameters(), lr=1e-4, betas=(0.5, 0.999))
            self.optimizer_D = torch.optim.Adam(self.netD.parameters(), lr=1e-4, betas=(0.5, 0.999))

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor, apply: bool = True) -> None:
        """One step; ``apply=False`` runs the passes without optimisers (to count FLOPs)."""
        fake_B = self.netG(real_A)
        set_requires_grad([self.netD], True)
        if apply:
            self.optimizer_D.zero_grad()
        fake_AB = torch.cat((real_A, fake_B), 1)
        loss_D_fake = self.criterionGAN(self.netD(fake_AB.detach()), False)
        loss_D_real = self.criterionGAN(self.netD(torch.cat((real_A, real_B), 1)), True)
        ((loss_D_fake + loss_D_real) * 0.5).backward()
        if apply:
            self.optimizer_D.step()
        set_requires_grad([self.netD], False)
        if apply:
            self.optimizer_G.zero_grad()
        loss_G = self.criterionGAN(self.netD(fake_AB), True) + self.criterionL1(fake_B, real_B) * self.lambda_L1
        loss_G.backward()
        if apply:
            self.optimizer_G.step()


def step_flops(netG: str, ngf: int, ndf: int, batch: int, size: int) -> int:
    """FLOPs of one pix2pix step (G and D, forward and backward), counted on the meta device: no memory, no time."""
    meta = torch.device("meta")
    model = UpstreamPix2Pix(netG, ngf, ndf, 50.0, meta)
    real_A, real_B = (torch.empty(batch, 1, size, size, device=meta) for _ in range(2))
    with FlopCounterMode(display=False) as counter:
        model.step(real_A, real_B, apply=False)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def project_options(workdir: Path, netG: str, size: int, batch: int, opt: argparse.Namespace) -> argparse.Namespace:
    gpu = ",".join(map(str, opt.gpu_ids)) or "-1"
    return TrainOptions().parse([
        *REFERENCE_FLAGS, "--dataroot", str(workdir), "--checkpoints_dir", str(workdir / "checkpoints"),
        "--name", "step", "--netG", netG, "--resize_to", str(size), "--batch_size", str(batch),
        "--ngf", str(opt.ngf), "--ndf", str(opt.ndf), "--gpu_ids", gpu, *shlex.split(opt.fast_flags),
    ])  # fmt: skip


def time_path(path: str, netG: str, size: int, batch: int, run: dict, opt: argparse.Namespace, workdir: Path) -> dict:
    """Build one path's step, warm it up, time it; returns the row's figures."""
    device = select_device(opt.gpu_ids)
    if path == "upstream":
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.manual_seed(0)
        model = UpstreamPix2Pix(netG, opt.ngf, opt.ndf, 50.0, device)
        describe = "fp32, TF32 off, cuDNN autotuning off, Adam (torch's default), no reads"
    else:
        train_opt = project_options(workdir, netG, size, batch, opt)
        setup_runtime(train_opt)  # the backend flags train.py sets
        model = create_model(train_opt, device)
        model.setup(train_opt)
        model.train()
        describe = model.fast_path.describe()
    generator = torch.Generator().manual_seed(0)
    real_A, real_B = (torch.rand(batch, 1, size, size, generator=generator).mul(2).sub(1).to(device) for _ in range(2))

    pending = PendingSteps(getattr(model, "loss_names", []))

    def one_step() -> None:
        if path == "upstream":
            model.step(real_A, real_B)
            return
        model.set_input({"A": real_A, "B": real_B, "A_paths": [""] * batch})
        model.optimize_parameters()
        pending.add(0, 0, model.loss_vector(), model.step_nonfinite)  # as the training loop keeps them
        if model.fast_path.reads_losses_every_step:
            pending.read()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(run["warmup_steps"]):
        one_step()
    pending.read()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(run["steps"]):
        one_step()
    pending.read()  # the loop reads what it kept at its next print
    synchronize(device)
    seconds = (time.perf_counter() - start) / run["steps"]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "path": path,
        "settings": describe,
        "slices_per_s": batch / seconds,
        "ms_per_step": seconds * 1e3,
        "peak_gpu_memory_gib": peak,
    }


def measure_steps(run: dict, opt: argparse.Namespace, workdir: Path, figures: dict) -> None:
    figures["steps"] = []
    for netG in run["netGs"]:
        for batch in run["batch_sizes"]:
            flops = step_flops(netG, opt.ngf, opt.ndf, batch, run["size"])
            for path in ("upstream", "project"):
                row = time_path(path, netG, run["size"], batch, run, opt, workdir)
                gc.collect()  # the row's networks and optimisers, before the next row's peak memory
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                row.update(
                    netG=netG,
                    size=run["size"],
                    batch_size=batch,
                    tflop_per_step=flops / 1e12,
                    achieved_tflop_per_s=flops / 1e12 / (row["ms_per_step"] / 1e3),
                )
                figures["steps"].append(row)
                print(f"  {netG} batch {batch} {path}: {row['slices_per_s']:.3g} slices/s", flush=True)
                save(figures, opt)


# -- 2. train.py and 3. batch_process_patients.py ----------------------------------------------
def make_phantom(root: Path, pairs: int, smoke: bool) -> Path:
    """``root/data`` with ``pairs`` train pairs: one make_phantom.py process per patient, all at once."""
    size_flags = ["--size", "small", "--shape", "128", "128", "8"] if smoke else ["--size", "seed"]
    processes = [
        subprocess.Popen([sys.executable, str(REPO / "datasets" / "make_phantom.py"), "--output_dir",
                          str(root / f"patient_{k}"), "--num_train", "1", "--num_test", "0", "--seed", str(k),
                          *size_flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        for k in range(1, pairs + 1)
    ]  # fmt: skip
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError(f"make_phantom.py failed: {process.stderr.read()}")
    data = root / "data"
    for side in ("A", "B"):
        (data / f"train{side}").mkdir(parents=True)
        for k in range(1, pairs + 1):
            (data / f"train{side}" / f"patient_{k}.nii.gz").symlink_to(
                root / f"patient_{k}" / f"train{side}" / "patient_1.nii.gz"
            )
    return data


def run_timed(command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed:\n{done.stderr[-3000:]}")
    return seconds, done


def measure_train_py(run: dict, opt: argparse.Namespace, workdir: Path, figures: dict) -> None:
    start = time.perf_counter()
    data = make_phantom(workdir / "phantom", run["train_pairs"], run["smoke"])
    phantom_seconds = time.perf_counter() - start
    netG = "unet_128" if run["smoke"] else "unet_512"
    resize = "128" if run["smoke"] else "512"
    command = [
        sys.executable, str(REPO / "train.py"), "--dataroot", str(data), "--name", "speed", *REFERENCE_FLAGS,
        "--netG", netG, "--resize_to", resize, "--batch_size", "2" if run["smoke"] else "4",
        "--ngf", str(opt.ngf), "--ndf", str(opt.ndf), "--n_epochs", str(run["epochs"]), "--n_epochs_decay", "0",
        "--display_id", "0", "--val_freq", "0", "--gpu_ids", ",".join(map(str, opt.gpu_ids)) or "-1",
        "--checkpoints_dir", str(workdir / "checkpoints"), "--cache_dir", str(workdir / "cache"),
        "--log_dir", str(workdir / "logs"), *shlex.split(opt.fast_flags),
    ]  # fmt: skip
    seconds, done = run_timed(command, workdir)
    epochs = [
        {"epoch": int(e), "seconds": float(s), "steps": int(n), "slices": int(m)}
        for e, s, n, m in EPOCH_LINE.findall(done.stdout)
    ]
    steady = epochs[1:] or epochs
    speed_line = next((line for line in done.stdout.splitlines() if line.startswith("speed: ")), "")
    figures["train_py"] = {
        "command": " ".join(command[1:]), "phantom_seconds": phantom_seconds, "wall_seconds": seconds,
        "epochs": epochs, "slices": sum(e["slices"] for e in epochs), "epoch_seconds": sum(e["seconds"] for e in epochs),
        "steady_slices_per_s": sum(e["slices"] for e in steady) / sum(e["seconds"] for e in steady),
        "speed_line": speed_line.removeprefix("speed: "),
    }  # fmt: skip
    save(figures, opt)


def measure_batch_process(run: dict, opt: argparse.Namespace, workdir: Path, figures: dict) -> None:
    volumes = sorted((workdir / "phantom" / "data" / "trainA").iterdir())[: run["volumes"]]
    walls = {}
    for count in sorted({1, len(volumes)}):
        inputs = workdir / f"batch_in_{count}"
        inputs.mkdir()
        for volume in volumes[:count]:
            (inputs / volume.name).symlink_to(volume.resolve())
        command = [
            sys.executable, str(REPO / "batch_process_patients.py"), "--input_dir", str(inputs), "--output_dir",
            str(workdir / f"batch_out_{count}"), "--model_name", "speed", "--checkpoints_dir",
            str(workdir / "checkpoints"), "--gpu_ids", ",".join(map(str, opt.gpu_ids)) or "-1",
        ]  # fmt: skip
        walls[count], _ = run_timed(command, workdir)
    with open(workdir / f"batch_out_{len(volumes)}" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(row["status"] == "ok" for row in rows), rows
    count = len(volumes)
    figures["batch_process"] = {
        "volumes": count, "shape": "128 x 128 x 8" if run["smoke"] else "512 x 512 x 113",
        "wall_seconds": {str(k): v for k, v in walls.items()},
        "marginal_seconds_per_volume": (walls[count] - walls[1]) / (count - 1) if count > 1 else None,
        "summary_seconds": [float(row["seconds"]) for row in rows],
    }  # fmt: skip
    save(figures, opt)


# -- report --------------------------------------------------------------------------------------
def save(figures: dict, opt: argparse.Namespace) -> None:
    if opt.json:
        opt.json.parent.mkdir(parents=True, exist_ok=True)
        opt.json.write_text(json.dumps(figures, indent=2) + "\n")


def markdown(figures: dict) -> str:
    lines = [f"{figures['device']}; torch {figures['torch']}; `{figures['command']}`", ""]
    if figures.get("steps"):
        lines += [
            "| generator | slices | batch | path | slices/s | ms/step | peak GPU memory | TFLOP/step | "
            "TFLOP/s | vs upstream |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        upstream = {}
        project = f"this project ({figures['fast_flags'] or 'defaults'})"
        for row in figures["steps"]:
            key = (row["netG"], row["batch_size"])
            if row["path"] == "upstream":
                upstream[key] = row["slices_per_s"]
            memory = f"{row['peak_gpu_memory_gib']:.1f} GiB" if row["peak_gpu_memory_gib"] is not None else "-"
            ratio = row["slices_per_s"] / upstream[key] if key in upstream else float("nan")
            label = "upstream-style fp32" if row["path"] == "upstream" else project
            lines.append(
                f"| {row['netG']} | {row['size']}x{row['size']} | {row['batch_size']} | {label} | "
                f"{row['slices_per_s']:.3g} | {row['ms_per_step']:.1f} | {memory} | "
                f"{row['tflop_per_step']:.3g} | {row['achieved_tflop_per_s']:.3g} | {ratio:.2f}x |"
            )
        lines += [
            "",
            *(
                f"- {path}: {settings}"
                for path, settings in {row["path"]: row["settings"] for row in figures["steps"]}.items()
            ),
            "",
        ]
    end_to_end = []
    if "train_py" in figures:
        t = figures["train_py"]
        epochs = ", ".join(f"{e['seconds']:.1f}" for e in t["epochs"])
        end_to_end += [
            f"| train.py, {t['slices']} slices ({len(t['epochs'])} epoch(s)), whole process | {t['wall_seconds']:.1f} s |",
            f"| of which the epochs (each: {epochs} s) | {t['epoch_seconds']:.1f} s |",
            f"| train.py, epochs after the first | {t['steady_slices_per_s']:.3g} slices/s |",
        ]
    if "batch_process" in figures:
        b = figures["batch_process"]
        walls = ", ".join(f"{k} volume(s): {v:.1f} s" for k, v in b["wall_seconds"].items())
        end_to_end.append(f"| batch_process_patients.py, {b['shape']} volumes, whole process | {walls} |")
        if b["marginal_seconds_per_volume"] is not None:
            end_to_end.append(
                f"| batch_process_patients.py, each volume after the first | {b['marginal_seconds_per_volume']:.2f} s |"
            )
    if end_to_end:
        lines += ["| end to end | figure |", "|---|---|", *end_to_end]
    return "\n".join(lines)


def main(opt: argparse.Namespace) -> None:
    run = sizes(opt)
    device = select_device(opt.gpu_ids)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    )
    figures = {
        "device": name,
        "torch": torch.__version__,
        "command": shlex.join(["python", *sys.argv]),
        "sizes": run,
        "fast_flags": opt.fast_flags,
    }
    skip = set(filter(None, opt.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="train_speed-") as scratch:
        workdir = opt.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"{name}: {'smoke' if run['smoke'] else 'full'} sizes, work folder {workdir}", flush=True)
        if "steps" not in skip:
            measure_steps(run, opt, workdir, figures)
        if "train" not in skip:
            measure_train_py(run, opt, workdir, figures)
            if "batch" not in skip:
                measure_batch_process(run, opt, workdir, figures)
    print()
    print(markdown(figures))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
