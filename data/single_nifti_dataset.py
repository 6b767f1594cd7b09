"""``--dataset_mode single_nifti``: the slices of the volumes in one folder, in one direction, no targets.

Upstream's ``single`` mode for ``--model test``: ``--dataroot`` itself is the folder of
inputs (``.nii``/``.nii.gz``), loaded, cached and checked as ``robust_nifti`` does (its
``load_volumes``; the same flags). test.py with this mode translates each volume of the folder
without scoring it (evaluation/results.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data import DATASETS
from data.base_dataset import BaseDataset, DatasetError
from data.robust_nifti_dataset import (
    AssembledBatch,
    RobustNiftiDataset,
    assemble,
    empty_batch,
    load_volumes,
    open_slice_cache,
)
from data.slice_cache import SliceReader, SliceSettings
from data.slicing import context_indices
from data.unaligned_nifti_dataset import usable_slices, volume_files
from data.volume_io import strip_nifti_suffix


@DATASETS.register("single_nifti")
class SingleNiftiDataset(BaseDataset):
    """Item ``i`` is ``{"A": (1+2K, S, S) float16 in [-1, 1], "A_paths", "slice_index", "patient"}``."""

    sample_dtype = torch.float16

    @staticmethod
    def modify_commandline_options(parser: argparse.ArgumentParser, is_train: bool) -> argparse.ArgumentParser:
        return RobustNiftiDataset.modify_commandline_options(parser, is_train)

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.context_slices = opt.context_slices
        cache_dir, identities = open_slice_cache(opt)
        self.report = load_volumes(volume_files(Path(opt.dataroot)), SliceSettings.from_options(opt), cache_dir,
                                   opt.skip_corrupted, identities)
        if not self.report.volumes:
            raise DatasetError(f"{opt.dataroot}: no usable volume ({len(self.report.skipped)} skipped)")
        self.samples = usable_slices(self.report)[: int(min(opt.max_dataset_size, 2**62))]
        self._reader = SliceReader()

    def summary_lines(self) -> list[str]:
        r = self.report
        lines = [f"{len(r.volumes)} volumes, {len(self.samples)} valid slices, {len(r.skipped)} skipped files"]
        return lines + [f"  skipped {path}: {reason}" for path, reason in r.skipped]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list) -> AssembledBatch:
        """The slices ``indices`` (ints, or ``(index, flip)``; never flipped) as one batch."""
        located = [self.samples[item[0] if isinstance(item, tuple) else item] for item in indices]
        entries = [(self.report.volumes[v], k) for v, k in located]
        a = empty_batch(len(entries), 1 + 2 * self.context_slices, entries[0][0].slice_shape)
        pixels = a.numpy()
        for i, (entry, k) in enumerate(entries):
            self._reader.read_into(pixels[i], entry, context_indices(k, entry.n_slices, self.context_slices), False)
        samples = [{"A": a[i], "A_paths": str(entry.source), "slice_index": k,
                    "patient": strip_nifti_suffix(entry.source.name)} for i, (entry, k) in enumerate(entries)]
        return assemble(samples, {"A": a})

    collate_fn = staticmethod(RobustNiftiDataset.collate_fn)
