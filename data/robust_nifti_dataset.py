"""``--dataset_mode robust_nifti``: paired 2D slices cut from paired NIfTI volumes.

Layout: ``<dataroot>/<phase>A/NAME.nii[.gz]`` (input, e.g. the average CT) pairs with
``<dataroot>/<phase>B/NAME.nii[.gz]`` (target, e.g. phase 0) by identical file name
(data/pairing.py, which test.py and validation use too).

For each pair, both volumes are brought to canonical RAS+ orientation (data/volume_io.py),
cut into slices along ``--slice_axis`` (``--axial_slice`` = axial), normalised to 0-255 with
the ``--intensity`` window (data/intensity.py), resized to ``--resize_to`` and served in
[-1, 1]. Each volume is decoded once per cache entry (data/slice_cache.py); opening the
data set first prunes the cache's stale entries (of files since changed or deleted). A slice
is a sample when it is finite and not constant on both sides.

Broken inputs (unreadable files, grids that differ, non-3D volumes, no usable slice) stop the
run with one line naming the file, or with ``--skip_corrupted`` are skipped with a warning
that names the file and the reason. A cache that cannot be written (full disk, read-only
folder) stops the run whatever the flags, with one line naming ``--cache_dir``.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from torch.utils.data import default_collate

from data import DATASETS
from data.base_dataset import BaseDataset, DatasetError
from data.intensity import INTENSITY_MODES
from data.pairing import find_pairs, grid_mismatch
from data.slice_cache import (
    CachedVolume,
    SliceReader,
    SliceSettings,
    SourceIdentities,
    cached_volume,
    prune_stale_entries,
    source_identity,
)
from data.slicing import SLICE_AXES, context_indices
from data.volume_io import VolumeError, strip_nifti_suffix

logger = logging.getLogger(__name__)


@dataclass
class PairingReport:
    """What was found on disk and what was kept."""

    pairs: list[tuple[CachedVolume, CachedVolume]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    unpaired: list[Path] = field(default_factory=list)
    skipped_slices: int = 0
    built: int = 0


def add_slice_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> argparse.ArgumentParser | argparse._ArgumentGroup:
    """Flags that say how volumes become slices (shared by training and inference), added to
    ``parser`` or to one of its argument groups."""
    parser.add_argument("--resize_to", type=int, default=512, help="slices are resized to this square size (pixels)")
    parser.add_argument(
        "--slice_axis",
        default="axial",
        choices=sorted(SLICE_AXES),
        help="anatomical axis held constant in each slice, whatever the file's storage order",
    )
    parser.add_argument("--axial_slice", action="store_true", help="cut axial slices (same as --slice_axis axial)")
    parser.add_argument(
        "--context_slices",
        type=int,
        default=0,
        help="K neighbours on each side of a slice given as extra input channels (2.5D); input_nc becomes 1+2K",
    )
    parser.add_argument(
        "--intensity",
        default="volume",
        choices=INTENSITY_MODES,
        help="0-255 normalisation window: 'volume' = each volume's own min..max (the reference's); "
        "'hu' = the fixed window --hu_min..--hu_max, exactly invertible (recommended for HU metrics)",
    )
    parser.add_argument("--hu_min", type=float, default=-1024.0, help="lower end of the 'hu' window (HU)")
    parser.add_argument("--hu_max", type=float, default=3071.0, help="upper end of the 'hu' window (HU)")
    return parser


def load_pairs(
    pairs: list[tuple[Path, Path]],
    settings: SliceSettings,
    cache_dir: Path,
    skip_corrupted: bool,
    identity_of=source_identity,
) -> PairingReport:
    """Cache every pair's slices and check that each pair shares one grid.

    Args:
        identity_of: gives a file's identity for its cache key (see ``cached_volume``).

    Raises:
        DatasetError: a broken file or pair without ``skip_corrupted``.
        CacheError: the cache cannot be written, whatever ``skip_corrupted`` says.
    """
    report = PairingReport()

    def skip(path: Path, reason: str) -> None:
        if not skip_corrupted:
            raise DatasetError(f"{path}: {reason} (pass --skip_corrupted to skip such files)")
        logger.warning("skipping %s: %s", path, reason)
        report.skipped.append((path, reason))

    for path_a, path_b in pairs:
        entries = []
        for path in (path_a, path_b):
            try:
                entry, built = cached_volume(path, settings, cache_dir, identity_of)
            except VolumeError as err:
                skip(path, err.problem)
                break
            report.built += built
            entries.append(entry)
        if len(entries) < 2:
            continue
        entry_a, entry_b = entries
        problem = grid_mismatch(path_a, entry_a.canonical_shape, entry_a.canonical_affine,
                                path_b, entry_b.canonical_shape, entry_b.canonical_affine)
        if problem:
            skip(path_b, problem)
            continue
        usable = entry_a.usable & entry_b.usable
        if not usable.any():
            skip(path_a, "no slice is finite and non-constant in both volumes of the pair")
            continue
        report.skipped_slices += int((~usable).sum())
        report.pairs.append((entry_a, entry_b))
    return report


@DATASETS.register("robust_nifti")
class RobustNiftiDataset(BaseDataset):
    """Paired slices; item ``i`` is ``{"A": (C_in, S, S), "B": (C_out, S, S), ...}`` in [-1, 1].

    ``A`` and ``B`` are float16, the cache's own precision (about 0.06 of the 0-255 range,
    half a HU in the default ``hu`` window): served as stored, a slice is one read from the
    cache and half the bytes of float32 between worker processes and to the GPU
    (benchmarks/data_throughput.py measured float16 faster in every loader configuration).
    The model casts them with ``.float()``.
    """

    # What __getitem__ returns; benchmarks/data_throughput.py compares float32.
    sample_dtype = torch.float16

    @staticmethod
    def modify_commandline_options(parser: argparse.ArgumentParser, is_train: bool) -> argparse.ArgumentParser:
        add_slice_options(parser.add_argument_group("slices and intensities (--dataset_mode robust_nifti)"))
        files = parser.add_argument_group("files and slice cache (--dataset_mode robust_nifti)")
        files.add_argument(
            "--skip_corrupted",
            action="store_true",
            help="skip unreadable files and unusable pairs with a warning instead of stopping",
        )
        files.add_argument("--cache_dir", default="./cache/slices", help="where decoded slices are kept between runs")
        files.add_argument(
            "--no_cache", action="store_true", help="keep decoded slices in a temporary folder removed at exit"
        )
        return parser

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.settings = SliceSettings.from_options(opt)
        self.context_slices = opt.context_slices
        self.flip = opt.isTrain and not opt.no_flip
        cache_dir = Path(opt.cache_dir)
        if opt.no_cache:
            cache_dir = Path(tempfile.mkdtemp(prefix="ct_slices-"))
            atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)

        files, unpaired = find_pairs(Path(opt.dataroot), opt.phase)
        if unpaired:
            logger.warning(
                "%d file(s) without a partner of the same name, not used: %s",
                len(unpaired),
                ", ".join(str(p) for p in unpaired),
            )
        # Each file's identity is read once, for the pruning and for its cache key.
        identities = SourceIdentities()
        if not opt.no_cache:
            prune_stale_entries(cache_dir, identities)  # first: frees the space the rebuilds need
        self.report = load_pairs(files, self.settings, cache_dir, opt.skip_corrupted, identities)
        self.report.unpaired = unpaired
        if not self.report.pairs:
            raise DatasetError(f"{opt.dataroot}: no usable volume pair ({len(self.report.skipped)} skipped)")

        # (pair index, slice index) of every sample, in volume order.
        self.samples = [
            (pair_index, int(k))
            for pair_index, (a, b) in enumerate(self.report.pairs)
            for k in np.flatnonzero(a.usable & b.usable)
        ]
        if opt.max_dataset_size < len(self.samples):
            kept = self.samples[: int(opt.max_dataset_size)]
            logger.info(
                "--max_dataset_size %d: using the first %d of %d valid slices, from %d of the %d volume pairs; "
                "raise it or leave it out to use them all",
                len(kept),
                len(kept),
                len(self.samples),
                kept[-1][0] + 1,
                len(self.report.pairs),
            )
            self.samples = kept
        self._reader = SliceReader()

    def summary_lines(self) -> list[str]:
        r = self.report
        lines = [
            f"{len(r.pairs)} volume pairs, {len(self.samples)} valid slices, "
            f"{len(r.skipped)} skipped files, {r.skipped_slices} skipped slices (NaN/Inf or blank), "
            f"{r.built} volumes decoded into the cache"
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in r.skipped]
        if r.unpaired:
            lines.append(f"  unpaired (not used): {', '.join(p.name for p in r.unpaired)}")
        return lines

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> AssembledBatch:
        """The samples ``indices``, each slice read straight into its place in one batch.

        The DataLoader calls this instead of ``__getitem__`` once per batch, which spares
        every slice a copy (and a fresh buffer) on its way from the cache to the trainer;
        :meth:`collate_fn` then hands on the batch as it is.

        Returns:
            The samples (as ``__getitem__`` gives them, views into the batch), with
            ``.batch`` = ``{"A": (B, 1+2K, S, S), "B": (B, 1, S, S), "A_paths": [B paths],
            "B_paths": [...], "slice_index": (B,) int64, "patient": [B names]}``; images
            float16 in [-1, 1].
        """
        # An item is a sample index, or ``(index, flip)`` from data.sampling.EpochSampler,
        # which decides flips so that a resumed run repeats them exactly.
        items = [item if isinstance(item, tuple) else (item, None) for item in indices]
        located = [self._locate(index) for index, _ in items]
        size = located[0][0].slice_shape
        a = torch.empty((len(indices), 1 + 2 * self.context_slices, *size), dtype=torch.float16)
        b = torch.empty((len(indices), 1, *size), dtype=torch.float16)
        if torch.utils.data.get_worker_info() is not None:
            # As default_collate does in a worker: the batch travels to the trainer without a copy.
            a.share_memory_(), b.share_memory_()
        a_pixels, b_pixels = a.numpy(), b.numpy()
        for i, (entry_a, entry_b, k) in enumerate(located):
            chosen = items[i][1]
            flip = self.flip and (random.random() < 0.5 if chosen is None else bool(chosen))
            # (1+2K, S, S): the slice and its K neighbours on each side
            self._reader.read_into(
                a_pixels[i], entry_a, context_indices(k, entry_a.n_slices, self.context_slices), flip
            )
            self._reader.read_into(b_pixels[i], entry_b, np.array([k]), flip)
        a, b = a.to(self.sample_dtype), b.to(self.sample_dtype)
        samples = [
            {
                "A": a[i],
                "B": b[i],
                "A_paths": str(entry_a.source),
                "B_paths": str(entry_b.source),
                "slice_index": k,
                "patient": strip_nifti_suffix(entry_a.source.name),
            }
            for i, (entry_a, entry_b, k) in enumerate(located)
        ]
        labels = default_collate([{key: value for key, value in x.items() if key not in ("A", "B")} for x in samples])
        batch = {"A": a, "B": b, **labels}
        return AssembledBatch(samples, batch)

    def _locate(self, index: int) -> tuple[CachedVolume, CachedVolume, int]:
        """(input entry, target entry, slice index) of sample ``index``."""
        pair_index, k = self.samples[index]
        entry_a, entry_b = self.report.pairs[pair_index]
        return (entry_b, entry_a, k) if self.opt.direction == "BtoA" else (entry_a, entry_b, k)

    @staticmethod
    def collate_fn(samples: list[dict]) -> dict:
        """The batch ``__getitems__`` made; other lists of samples are joined by ``default_collate``."""
        return samples.batch if isinstance(samples, AssembledBatch) else default_collate(samples)


class AssembledBatch(list):
    """A list of samples that are views into one ready batch, ``.batch``.

    A DataLoader built without :meth:`RobustNiftiDataset.collate_fn` still works: torch's
    ``default_collate`` stacks the samples as usual (one copy more).
    """

    def __init__(self, samples: list[dict], batch: dict):
        super().__init__(samples)
        self.batch = batch
