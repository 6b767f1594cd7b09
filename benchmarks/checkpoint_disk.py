"""Disk used by a run's checkpoints: optimiser state with every saved epoch (the old layout) versus latest/best only.

Runs train.py twice on the same data with the same flags, once with
``--save_optimizer_every_epoch`` (what every saved epoch held before) and once without (the
default now), and prints the bytes each run folder holds, by kind of file. One step per
epoch keeps it short: the sizes depend on the networks, not on how long they trained.

    python benchmarks/checkpoint_disk.py --dataroot datasets/ct_phases_dataset            # unet_512 at 512, 20 epochs
    python benchmarks/checkpoint_disk.py --dataroot ... --netG unet_128 --resize_to 128    # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kind_of(name: str) -> str:
    if name.endswith("_net_G.pth"):
        return "generators"
    if name.endswith("_net_D.pth"):
        return "discriminators"
    if name.endswith("_train_state.pth"):
        return "training states"
    return "other"


def folder_bytes(folder: Path) -> dict[str, int]:
    sizes: dict[str, int] = defaultdict(int)
    for path in folder.rglob("*"):
        if path.is_file():
            sizes[kind_of(path.name)] += path.stat().st_size
    return dict(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--netG", default="unet_512")
    parser.add_argument("--resize_to", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--save_epoch_freq", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory(prefix="checkpoint_disk-") as workdir:
        for policy, extra in (("optimiser with every epoch (before)", ["--save_optimizer_every_epoch"]),
                              ("optimiser with latest/best only (now)", [])):
            name = "every_epoch" if extra else "latest_only"
            command = [sys.executable, str(REPO / "train.py"), "--dataroot", args.dataroot, "--name", name,
                       "--checkpoints_dir", f"{workdir}/checkpoints", "--cache_dir", f"{workdir}/cache",
                       "--log_dir", f"{workdir}/logs", "--netG", args.netG, "--resize_to", str(args.resize_to),
                       "--norm", "instance", "--batch_size", "1", "--max_dataset_size", "1", "--n_epochs",
                       str(args.epochs), "--n_epochs_decay", "0", "--save_epoch_freq", str(args.save_epoch_freq),
                       "--display_id", "0", "--val_freq", "0", "--gpu_ids", "-1", *extra]
            start = time.time()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"train.py failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            sizes = folder_bytes(Path(workdir) / "checkpoints" / name)
            rows[policy] = {"bytes": sizes, "total": sum(sizes.values()), "seconds": time.time() - start}

    print(f"{args.netG} at {args.resize_to}x{args.resize_to}, {args.epochs} epochs, --save_epoch_freq {args.save_epoch_freq}\n")
    print("| layout | generators | discriminators | training states | total |")
    print("|---|---|---|---|---|")
    for policy, row in rows.items():
        b = row["bytes"]
        cells = [f"{b.get(k, 0) / 2**20:,.0f} MiB" for k in ("generators", "discriminators", "training states")]
        print(f"| {policy} | {' | '.join(cells)} | {row['total'] / 2**20:,.0f} MiB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
