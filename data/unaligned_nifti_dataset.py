"""``--dataset_mode unaligned_nifti``: slices of ``<phase>A/`` and of ``<phase>B/`` drawn independently.

For CycleGAN (``--model cycle_gan``): the two folders need not hold the same patients, the
same number of volumes, or volumes on the same grid; nothing is paired by name. Each side's
volumes are loaded, normalised, cached and checked exactly as ``robust_nifti`` does (its
``load_volumes``, ``open_slice_cache`` and batch assembly; the same flags, ``--skip_corrupted``
included), so a volume that robust_nifti would skip is skipped here for the same reason.

The data set is as long as the larger side (upstream's rule). Item ``i`` is A's slice
``i mod |A|`` with B's slice ``order_B[i mod |B|]``, where ``order_B`` is a permutation of
B's slices drawn once from ``--seed`` (``--serial_batches``: B's slices in order). The
EpochSampler shuffles the items anew each epoch, so each batch mixes other slices of both
sides, and an item's B slice is a function of the seed alone: a resumed run draws exactly
what an uninterrupted one would. (Upstream draws B's slice at random for every item; here the
A-B couples are fixed for a run, which does not matter to CycleGAN, whose losses never
compare an A slice with its B slice.) ``--direction BtoA`` swaps the folders.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np
import torch

from data import DATASETS
from data.base_dataset import BaseDataset, DatasetError
from data.pairing import nifti_files
from data.robust_nifti_dataset import (
    AssembledBatch,
    RobustNiftiDataset,
    VolumesReport,
    assemble,
    empty_batch,
    load_volumes,
    open_slice_cache,
)
from data.slice_cache import SliceReader, SliceSettings
from data.volume_io import strip_nifti_suffix

logger = logging.getLogger(__name__)


def volume_files(folder: Path) -> list[Path]:
    """The ``.nii``/``.nii.gz`` files of ``folder``, by name.

    Raises:
        DatasetError: ``folder`` is missing or holds no NIfTI file.
    """
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files = [path for _, path in sorted(nifti_files(folder).items())]
    if not files:
        raise DatasetError(f"{folder}: holds no .nii or .nii.gz file")
    return files


def usable_slices(report: VolumesReport) -> list[tuple[int, int]]:
    """(volume index, slice index) of every usable slice, in volume order."""
    return [(v, int(k)) for v, entry in enumerate(report.volumes) for k in np.flatnonzero(entry.usable)]


@DATASETS.register("unaligned_nifti")
class UnalignedNiftiDataset(BaseDataset):
    """Unpaired slices; item ``i`` is ``{"A": (1, S, S), "B": (1, S, S), ...}`` float16 in [-1, 1].

    Batches are ``{"A", "B", "A_paths", "B_paths", "slice_index" (A's), "B_slice_index", "patient" (A's)}``.
    """

    sample_dtype = torch.float16

    @staticmethod
    def modify_commandline_options(parser: argparse.ArgumentParser, is_train: bool) -> argparse.ArgumentParser:
        return RobustNiftiDataset.modify_commandline_options(parser, is_train)  # the same slices, cache and faults

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.settings = SliceSettings.from_options(opt)
        self.flip = opt.isTrain and not opt.no_flip
        if opt.context_slices:
            raise DatasetError("--dataset_mode unaligned_nifti serves single slices: use --context_slices 0")
        cache_dir, identities = open_slice_cache(opt)
        sides = {}
        for side in ("A", "B"):
            folder = Path(opt.dataroot) / f"{opt.phase}{side}"
            report = load_volumes(volume_files(folder), self.settings, cache_dir, opt.skip_corrupted, identities)
            if not report.volumes:
                raise DatasetError(f"{folder}: no usable volume ({len(report.skipped)} skipped)")
            sides[side] = report
        if opt.direction == "BtoA":
            sides = {"A": sides["B"], "B": sides["A"]}
        self.reports = sides
        self.samples = {side: usable_slices(report) for side, report in sides.items()}
        if opt.max_dataset_size < float("inf"):
            self.samples = {side: samples[: int(opt.max_dataset_size)] for side, samples in self.samples.items()}
        n_b = len(self.samples["B"])
        self.order_b = (list(range(n_b)) if opt.serial_batches
                        else torch.randperm(n_b, generator=torch.Generator().manual_seed(opt.seed)).tolist())
        self._reader = SliceReader()

    def summary_lines(self) -> list[str]:
        lines = []
        for side, report in self.reports.items():
            lines.append(f"side {side}: {len(report.volumes)} volumes, {len(self.samples[side])} valid slices, "
                         f"{len(report.skipped)} skipped files, {report.skipped_slices} skipped slices (NaN/Inf or "
                         f"blank), {report.built} volumes decoded into the cache")
            lines += [f"  skipped {path}: {reason}" for path, reason in report.skipped]
        return lines

    def __len__(self) -> int:
        return max(len(self.samples["A"]), len(self.samples["B"]))

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list) -> AssembledBatch:
        """The items ``indices`` (ints, or ``(index, flip)`` from data.sampling.EpochSampler) as one batch."""
        items = [item if isinstance(item, tuple) else (item, None) for item in indices]
        located = [self._locate(index) for index, _ in items]
        a = empty_batch(len(items), 1, located[0][0].slice_shape)
        b = empty_batch(len(items), 1, located[0][2].slice_shape)
        a_pixels, b_pixels = a.numpy(), b.numpy()
        for i, (entry_a, k_a, entry_b, k_b) in enumerate(located):
            chosen = items[i][1]
            flip = self.flip and (random.random() < 0.5 if chosen is None else bool(chosen))
            self._reader.read_into(a_pixels[i], entry_a, np.array([k_a]), flip)
            self._reader.read_into(b_pixels[i], entry_b, np.array([k_b]), flip)
        samples = [
            {"A": a[i], "B": b[i], "A_paths": str(entry_a.source), "B_paths": str(entry_b.source),
             "slice_index": k_a, "B_slice_index": k_b, "patient": strip_nifti_suffix(entry_a.source.name)}
            for i, (entry_a, k_a, entry_b, k_b) in enumerate(located)
        ]
        return assemble(samples, {"A": a, "B": b})

    def _locate(self, index: int):
        """(A entry, A slice, B entry, B slice) of item ``index``."""
        volume_a, k_a = self.samples["A"][index % len(self.samples["A"])]
        volume_b, k_b = self.samples["B"][self.order_b[index % len(self.order_b)]]
        return self.reports["A"].volumes[volume_a], k_a, self.reports["B"].volumes[volume_b], k_b

    collate_fn = staticmethod(RobustNiftiDataset.collate_fn)
