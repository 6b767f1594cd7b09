"""Slices per second delivered to the training loop: a naive loader against the project's.

The seed-scale data set (80 pairs of 512 x 512 x 113 int16 NIfTI, about 8 minutes to make
and 1.2 GB on disk; the warm cache then takes 80 * 2 * 113 * 512 * 512 * 2 bytes = 9.5 GB):

    python datasets/make_phantom.py --size seed --num_train 80 --num_test 0 --output_dir /tmp/ct_seed80
    python benchmarks/data_throughput.py --dataroot /tmp/ct_seed80

``--num_pairs 10`` measures on the first 10 pairs only. With ``--cache_dir DIR`` the cache
is kept, and a second run measures a warm cache without the build; whether the cache's
pages are still in the OS page cache (9.5 GB for 80 pairs) then decides much of the speed:
reads that go to disk are several times slower. Each stage runs in a fresh child
process (this script with ``--stage``), so that its peak memory is its own:

* ``build``: first run, empty cache: ``robust_nifti`` decodes every volume into the slice
  cache (data/slice_cache.py).
* ``naive``: a Dataset that decodes both volumes of the pair for every slice it serves
  (``read_volume`` per item), the way a loader without a cache works; timed over
  ``--naive_batches`` batches.
* ``loader``: the project's loader (``robust_nifti`` + ``create_dataloader``) on the warm
  cache, for each combination of worker processes, persistent workers, pinned memory (only
  with CUDA) and the dtype the dataset returns; timed over ``--slices`` slices after a
  warm-up batch.

Memory is ``resource.getrusage(...).ru_maxrss``: the peak resident set of the stage's
process and of its largest child (a DataLoader worker). It counts pages of the memory-mapped
cache that the process touched, which the kernel shares and can drop at any time, so for
the cached loader it is an upper bound on the memory the loader really holds.

Batches are consumed and dropped, with no model: the figures are what the data layer can
deliver, not training speed.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `python benchmarks/data_throughput.py` puts benchmarks/, not the repository root, on sys.path.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from data import create_dataloader, create_dataset  # noqa: E402
from data.intensity import pixels_to_network, window_for  # noqa: E402
from data.robust_nifti_dataset import RobustNiftiDataset  # noqa: E402
from data.slicing import resize_slices, volume_to_slices  # noqa: E402
from data.volume_io import read_volume  # noqa: E402
from options.train_options import TrainOptions  # noqa: E402

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", type=Path, required=True, help="folder holding trainA/ and trainB/")
    parser.add_argument("--num_pairs", type=int, default=0, help="use the first N pairs (by name); 0: all")
    parser.add_argument("--resize_to", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--naive_batches", type=int, default=10, help="batches timed for the naive loader")
    parser.add_argument("--naive_workers", type=int, default=0, help="DataLoader workers of the naive loader")
    parser.add_argument("--slices", type=int, default=4000, help="slices timed per configuration of the cached loader")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to try")
    parser.add_argument("--dtypes", default="float16,float32", help="dtypes the dataset returns, to try")
    parser.add_argument("--cache_dir", type=Path, help="slice cache to fill (default: a temporary folder, removed)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage, print JSON
    parser.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    return parser


# -- the two loaders ---------------------------------------------------------------------
def dataset_options(
    dataroot: Path, cache_dir: Path, resize_to: int, batch_size: int, workers: int
) -> argparse.Namespace:
    """The options of a training run with the reference's slice flags."""
    netg = f"unet_{resize_to}" if resize_to in (128, 256, 512) else "resnet_9blocks"
    return TrainOptions().parse([
        "--dataroot", str(dataroot), "--dataset_mode", "robust_nifti", "--axial_slice",
        "--netG", netg, "--resize_to", str(resize_to), "--batch_size", str(batch_size),
        "--num_threads", str(workers), "--gpu_ids", "-1", "--cache_dir", str(cache_dir),
    ])  # fmt: skip


class NaiveSlices(torch.utils.data.Dataset):
    """The same samples as ``robust_nifti``, but both volumes decoded for every slice served."""

    def __init__(self, dataset: RobustNiftiDataset, resize_to: int):
        self.items = [
            (dataset.report.pairs[pair][0].source, dataset.report.pairs[pair][1].source, k)
            for pair, k in dataset.samples
        ]
        self.size = (resize_to, resize_to)

    def __len__(self) -> int:
        return len(self.items)

    def _slice(self, path: Path, k: int) -> torch.Tensor:
        volume, _ = read_volume(path)
        window = window_for(volume, "volume", 0.0, 0.0)
        image = volume_to_slices(volume, "axial")[k : k + 1]  # (1, H, W) in HU
        return torch.from_numpy(pixels_to_network(resize_slices(window(image), self.size).numpy()))

    def __getitem__(self, index: int) -> dict:
        path_a, path_b, k = self.items[index]
        return {"A": self._slice(path_a, k), "B": self._slice(path_b, k)}


# -- stages, each in its own process -------------------------------------------------------
def peak_rss_mib() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident set, MiB (Linux: ru_maxrss in KiB)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale,
    )


def stage_build(opt: argparse.Namespace, config: dict) -> dict:
    start = time.perf_counter()
    dataset = create_dataset(dataset_options(opt.dataroot, opt.cache_dir, opt.resize_to, opt.batch_size, 0))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "volumes": dataset.report.built, "slices": len(dataset),
        "summary": dataset.summary_lines()[0], "rss_mib": peak_rss_mib(),
    }  # fmt: skip


def time_batches(loader, max_slices: int, max_batches: int | None = None) -> float:
    """Slices per second over ``max_slices`` (or ``max_batches``), after one warm-up batch."""
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epochs, back to back
    next(iter(batches))  # warm-up: worker start, first page faults
    delivered, count, start = 0, 0, time.perf_counter()
    for batch in batches:
        delivered += len(batch["A"])
        count += 1
        if delivered >= max_slices or (max_batches is not None and count >= max_batches):
            break
    return delivered / (time.perf_counter() - start)


def stage_naive(opt: argparse.Namespace, config: dict) -> dict:
    dataset = NaiveSlices(
        create_dataset(dataset_options(opt.dataroot, opt.cache_dir, opt.resize_to, opt.batch_size, 0)), opt.resize_to
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=opt.batch_size, shuffle=True, num_workers=opt.naive_workers
    )
    rate = time_batches(loader, max_slices=10**9, max_batches=opt.naive_batches)
    return {"rate": rate, "rss_mib": peak_rss_mib()}


def stage_loader(opt: argparse.Namespace, config: dict) -> dict:
    train_opt = dataset_options(opt.dataroot, opt.cache_dir, opt.resize_to, opt.batch_size, config["workers"])
    dataset = create_dataset(train_opt)
    assert dataset.report.built == 0, "the cache should be warm"
    RobustNiftiDataset.sample_dtype = DTYPES[config["dtype"]]  # this process only
    loader = create_dataloader(
        dataset, train_opt, pin_memory=config["pin_memory"], persistent_workers=config["persistent"]
    )
    rate = time_batches(loader, max_slices=opt.slices)
    del loader  # persistent workers exit (and are counted in RUSAGE_CHILDREN) only now
    gc.collect()
    return {"rate": rate, "rss_mib": peak_rss_mib()}


STAGES = {"build": stage_build, "naive": stage_naive, "loader": stage_loader}


def run_stage(opt: argparse.Namespace, stage: str, config: dict | None = None) -> dict:
    """Run one stage in a child process; its last stdout line is the JSON result."""
    argv = [
        sys.executable, __file__, "--stage", stage, "--config", json.dumps(config or {}),
        "--dataroot", str(opt.dataroot), "--cache_dir", str(opt.cache_dir), "--resize_to", str(opt.resize_to),
        "--batch_size", str(opt.batch_size), "--naive_batches", str(opt.naive_batches),
        "--naive_workers", str(opt.naive_workers), "--slices", str(opt.slices),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} {config} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the comparison ------------------------------------------------------------------------
def subset_root(dataroot: Path, num_pairs: int, into: Path) -> Path:
    """``dataroot`` itself, or a folder of links to its first ``num_pairs`` pairs by name."""
    names = sorted(p.name for p in (dataroot / "trainA").iterdir() if (dataroot / "trainB" / p.name).exists())
    if not num_pairs or num_pairs >= len(names):
        return dataroot
    for side in "AB":
        (into / f"train{side}").mkdir(parents=True)
        for name in names[:num_pairs]:
            (into / f"train{side}" / name).symlink_to((dataroot / f"train{side}" / name).resolve())
    return into


def loader_configs(workers: list[int], dtypes: list[str]) -> list[dict]:
    configs = []
    pin_choices = (False, True) if torch.cuda.is_available() else (False,)
    for n, dtype, pin in itertools.product(workers, dtypes, pin_choices):
        for persistent in (False, True) if n > 0 else (False,):
            configs.append({"workers": n, "dtype": dtype, "pin_memory": pin, "persistent": persistent})
    return configs


def main(opt: argparse.Namespace) -> None:
    if opt.stage:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(STAGES[opt.stage](opt, json.loads(opt.config))))
        return

    scratch = Path(tempfile.mkdtemp(prefix="data_throughput-"))
    try:
        opt.dataroot = subset_root(opt.dataroot, opt.num_pairs, scratch / "data")
        if opt.cache_dir is None:
            opt.cache_dir = scratch / "cache"
        print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, CUDA: {torch.cuda.is_available()}")

        build = run_stage(opt, "build")
        print(build["summary"])
        if build["volumes"]:
            print(
                f"first run, cache build: {build['seconds']:.1f} s for {build['volumes']} volumes "
                f"({build['seconds'] / build['volumes']:.2f} s per volume), peak RSS {build['rss_mib'][0]:.0f} MiB"
            )
        else:
            print(f"--cache_dir was warm: dataset ready in {build['seconds']:.1f} s, nothing decoded")
        naive = run_stage(opt, "naive")
        rows = [("naive: read_volume per slice", opt.naive_workers, "-", "-", "float32", naive)]
        for config in loader_configs([int(w) for w in opt.workers.split(",")], opt.dtypes.split(",")):
            result = run_stage(opt, "loader", config)
            pin = "yes" if config["pin_memory"] else "no"
            persistent = ("yes" if config["persistent"] else "no") if config["workers"] else "-"
            rows.append(("robust_nifti, warm cache", config["workers"], pin, persistent, config["dtype"], result))
        print_table(rows, naive["rate"], opt)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def print_table(rows: list, naive_rate: float, opt: argparse.Namespace) -> None:
    print(f"\n{opt.resize_to}x{opt.resize_to} slices, batch {opt.batch_size}; naive: {opt.naive_batches} batches, "
          f"cached: {opt.slices} slices per row")  # fmt: skip
    header = f"{'loader':30} {'workers':>7} {'pin':>4} {'persist':>7} {'dtype':>8} {'slices/s':>10} {'vs naive':>9} {'peak RSS MiB (main/worker)':>27}"
    print(header)
    print("-" * len(header))
    best = max(rows[1:], key=lambda row: row[5]["rate"], default=None)
    for name, workers, pin, persistent, dtype, result in rows:
        rss = f"{result['rss_mib'][0]:.0f} / {result['rss_mib'][1]:.0f}"
        mark = "  <- fastest" if best is not None and result is best[5] else ""
        print(
            f"{name:30} {workers:>7} {pin:>4} {persistent:>7} {dtype:>8} {result['rate']:>10.1f} "
            f"{result['rate'] / naive_rate:>8.0f}x {rss:>27}{mark}"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
