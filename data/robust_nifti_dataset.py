"""``--dataset_mode robust_nifti``: paired 2D slices cut from paired NIfTI volumes.

Layout: ``<dataroot>/<phase>A/NAME.nii[.gz]`` (input, e.g. the average CT) pairs with
``<dataroot>/<phase>B/NAME.nii[.gz]`` (target, e.g. phase 0) by identical file name
(data/pairing.py, which test.py and validation use too).

Several phases (``--phases``, data/phases.py): ``<phase>B/`` may hold each patient's whole
breathing cycle, as one 4D file of the input's name or as ``NAME_phase<K>`` files; each frame
is a cache entry of its own. ``--phases 0`` (the default) serves phase 0 of any layout, as a
3D target was served. With ``--phase_conditioning input`` sample ``i`` is slice ``i // P``
with phase ``i % P`` (P requested phases): ``A`` gains a first channel holding the phase's
code, ``B`` is that phase. With ``output`` a sample is a slice and ``B`` holds the P phases.

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
from data.pairing import find_phase_pairs, grid_mismatch
from data.phases import PhaseSource, conditioning_channels, phase_code
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
    # Per pair, the entries of every requested phase (targets[i][0] is pairs[i][1]).
    targets: list[tuple[CachedVolume, ...]] = field(default_factory=list)
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
    pairs: list[tuple[Path, Path | tuple[PhaseSource, ...]]],
    settings: SliceSettings,
    cache_dir: Path,
    skip_corrupted: bool,
    identity_of=source_identity,
) -> PairingReport:
    """Cache every pair's slices and check that each pair shares one grid.

    Args:
        pairs: ``(input, target)``: the target a 3D file, or the phases to serve (a frame of a
            4D file is cached as a volume of its own).
        identity_of: gives a file's identity for its cache key (see ``cached_volume``).

    Raises:
        DatasetError: a broken file or pair without ``skip_corrupted``.
        CacheError: the cache cannot be written, whatever ``skip_corrupted`` says.
    """
    report = PairingReport()

    def skip(path: Path, reason: str) -> None:
        skip_or_stop(report.skipped, path, reason, skip_corrupted)

    for path_a, target in pairs:
        sources = (PhaseSource(target, None),) if isinstance(target, Path) else tuple(target)
        entries = []
        for path, frame in ((path_a, None), *((s.path, s.frame) for s in sources)):
            try:
                entry, built = cached_volume(path, settings, cache_dir, identity_of, frame)
            except VolumeError as err:
                skip(path, err.problem)
                break
            report.built += built
            entries.append(entry)
        if len(entries) < 1 + len(sources):
            continue
        entry_a, entries_b = entries[0], tuple(entries[1:])
        problem = next(
            (
                (entry_b.source, p)
                for entry_b in entries_b
                if (p := grid_mismatch(path_a, entry_a.canonical_shape, entry_a.canonical_affine,
                                       entry_b.source, entry_b.canonical_shape, entry_b.canonical_affine))
            ),
            None,
        )
        if problem:
            skip(*problem)
            continue
        usable = np.logical_and.reduce([entry_a.usable, *(entry_b.usable for entry_b in entries_b)])
        if not usable.any():
            skip(path_a, "no slice is finite and non-constant in both volumes of the pair")
            continue
        report.skipped_slices += int((~usable).sum())
        report.pairs.append((entry_a, entries_b[0]))
        report.targets.append(entries_b)
    return report


def skip_or_stop(skipped: list[tuple[Path, str]], path: Path, reason: str, skip_corrupted: bool) -> None:
    """A broken file: stop with one line, or with ``skip_corrupted`` warn and note it in ``skipped``.

    Raises:
        DatasetError: without ``skip_corrupted``.
    """
    if not skip_corrupted:
        raise DatasetError(f"{path}: {reason} (pass --skip_corrupted to skip such files)")
    logger.warning("skipping %s: %s", path, reason)
    skipped.append((path, reason))


@dataclass
class VolumesReport:
    """Single volumes (not pairs) found on disk and kept: what ``unaligned_nifti`` and ``single_nifti`` read."""

    volumes: list[CachedVolume] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    skipped_slices: int = 0
    built: int = 0


def load_volumes(
    paths: list[Path],
    settings: SliceSettings,
    cache_dir: Path,
    skip_corrupted: bool,
    identity_of=source_identity,
) -> VolumesReport:
    """Cache every volume's slices, as :func:`load_pairs` does for each side of a pair.

    Raises:
        DatasetError: a broken file (unreadable, not 3D, no usable slice) without ``skip_corrupted``.
        CacheError: the cache cannot be written, whatever ``skip_corrupted`` says.
    """
    report = VolumesReport()
    for path in paths:
        try:
            entry, built = cached_volume(path, settings, cache_dir, identity_of)
        except VolumeError as err:
            skip_or_stop(report.skipped, path, err.problem, skip_corrupted)
            continue
        report.built += built
        if not entry.usable.any():
            skip_or_stop(report.skipped, path, "no slice is finite and non-constant", skip_corrupted)
            continue
        report.skipped_slices += int((~entry.usable).sum())
        report.volumes.append(entry)
    return report


def open_slice_cache(opt: argparse.Namespace) -> tuple[Path, SourceIdentities]:
    """The slice cache ``--cache_dir``/``--no_cache`` name, its stale entries pruned, and the file
    identities read on the way (each file's identity is read once, for the pruning and its cache key)."""
    cache_dir = Path(opt.cache_dir)
    if opt.no_cache:
        cache_dir = Path(tempfile.mkdtemp(prefix="ct_slices-"))
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    identities = SourceIdentities()
    if not opt.no_cache:
        prune_stale_entries(cache_dir, identities)  # first: frees the space the rebuilds need
    return cache_dir, identities


def empty_batch(n: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(n, channels, H, W) float16 for slices to be read into; in shared memory inside a DataLoader
    worker, as ``default_collate`` does, so the batch travels to the trainer without a copy."""
    batch = torch.empty((n, channels, *size), dtype=torch.float16)
    if torch.utils.data.get_worker_info() is not None:
        batch.share_memory_()
    return batch


def assemble(samples: list[dict], images: dict[str, torch.Tensor]) -> AssembledBatch:
    """``samples``, whose ``images`` keys are views into the batch tensors ``images``, as an
    :class:`AssembledBatch`: the batch is ``images`` plus the other keys joined by ``default_collate``."""
    labels = default_collate([{key: value for key, value in x.items() if key not in images} for x in samples])
    return AssembledBatch(samples, {**images, **labels})


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
        cache_dir, identities = open_slice_cache(opt)
        # --phases (options resolved them: phase_list, num_phases): the targets served, in order.
        self.phase_list = tuple(getattr(opt, "phase_list", (0,)))
        code_nc, _ = conditioning_channels(len(self.phase_list), getattr(opt, "phase_conditioning", "output"))
        self.phase_codes = (
            [phase_code(k, opt.num_phases) for k in self.phase_list] if code_nc else None
        )  # input conditioning: each (slice, phase) is a sample, with the phase's code as channel 0 of A
        unreadable: list[tuple[Path, str]] = []
        files, unpaired, num_phases = find_phase_pairs(Path(opt.dataroot), opt.phase, self.phase_list, unreadable)
        if len(self.phase_list) > 1 and num_phases != opt.num_phases:
            raise DatasetError(
                f"{Path(opt.dataroot) / (opt.phase + 'B')}: the targets have {num_phases} phases, but this run "
                f"was set up for {opt.num_phases} (--num_phases, saved with the run)"
            )
        for path, reason in unreadable:
            skip_or_stop([], path, reason, opt.skip_corrupted)
        if unpaired:
            logger.warning(
                "%d file(s) without a partner of the same name, not used: %s",
                len(unpaired),
                ", ".join(str(p) for p in unpaired),
            )
        self.report = load_pairs(files, self.settings, cache_dir, opt.skip_corrupted, identities)
        self.report.skipped[:0] = unreadable
        self.report.unpaired = unpaired
        if not self.report.pairs:
            raise DatasetError(f"{opt.dataroot}: no usable volume pair ({len(self.report.skipped)} skipped)")

        # (pair index, slice index) of every slice, in volume order. With input conditioning,
        # sample i is slice i // P with phase i % P: an epoch covers every (slice, phase) pair,
        # and data.sampling.EpochSampler's permutation of the indices keeps resume exact.
        self.samples = [
            (pair_index, int(k))
            for pair_index, (a, targets) in enumerate(zip((a for a, _ in self.report.pairs), self.report.targets))
            for k in np.flatnonzero(np.logical_and.reduce([a.usable, *(b.usable for b in targets)]))
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
        return len(self.samples) * self.phases_per_slice

    @property
    def phases_per_slice(self) -> int:
        """Samples per slice: P with input conditioning (one per phase), else 1."""
        return len(self.phase_codes) if self.phase_codes else 1

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> AssembledBatch:
        """The samples ``indices``, each slice read straight into its place in one batch.

        The DataLoader calls this instead of ``__getitem__`` once per batch, which spares
        every slice a copy (and a fresh buffer) on its way from the cache to the trainer;
        :meth:`collate_fn` then hands on the batch as it is.

        Returns:
            The samples (as ``__getitem__`` gives them, views into the batch), with
            ``.batch`` = ``{"A": (B, [1 code +] 1+2K, S, S), "B": (B, 1 or P, S, S), "A_paths": [B paths],
            "B_paths": [...], "slice_index": (B,) int64, "patient": [B names]}``; images
            float16 in [-1, 1].
        """
        # An item is a sample index, or ``(index, flip)`` from data.sampling.EpochSampler,
        # which decides flips so that a resumed run repeats them exactly.
        items = [item if isinstance(item, tuple) else (item, None) for item in indices]
        located = [self._locate(index) for index, _ in items]
        size = located[0][0].slice_shape
        code_nc = 1 if self.phase_codes else 0
        a = empty_batch(len(indices), code_nc + 1 + 2 * self.context_slices, size)
        b = empty_batch(len(indices), len(located[0][1]), size)
        a_pixels, b_pixels = a.numpy(), b.numpy()
        for i, (entry_a, entries_b, k) in enumerate(located):
            chosen = items[i][1]
            flip = self.flip and (random.random() < 0.5 if chosen is None else bool(chosen))
            if code_nc:
                # channel 0: the phase code, before the CT channels, so that the centre channel
                # (C // 2, which --residual adds back) stays the slice itself
                a_pixels[i, 0] = self.phase_codes[index_phase(items[i][0], self.phases_per_slice)]
            # (1+2K, S, S): the slice and its K neighbours on each side
            self._reader.read_into(
                a_pixels[i, code_nc:], entry_a, context_indices(k, entry_a.n_slices, self.context_slices), flip
            )
            for j, entry_b in enumerate(entries_b):  # (P, S, S) with output conditioning, else (1, S, S)
                self._reader.read_into(b_pixels[i, j : j + 1], entry_b, np.array([k]), flip)
        a, b = a.to(self.sample_dtype), b.to(self.sample_dtype)
        samples = [
            {
                "A": a[i],
                "B": b[i],
                "A_paths": str(entry_a.source),
                "B_paths": str(entries_b[0].source),
                "slice_index": k,
                "patient": strip_nifti_suffix(entry_a.source.name),
            }
            for i, (entry_a, entries_b, k) in enumerate(located)
        ]
        return assemble(samples, {"A": a, "B": b})

    def _locate(self, index: int) -> tuple[CachedVolume, tuple[CachedVolume, ...], int]:
        """(input entry, target entries (one per output channel), slice index) of sample ``index``."""
        per_slice = self.phases_per_slice
        pair_index, k = self.samples[index // per_slice]
        entry_a, targets = self.report.pairs[pair_index][0], self.report.targets[pair_index]
        if per_slice > 1:
            targets = (targets[index_phase(index, per_slice)],)
        if self.opt.direction == "BtoA":  # one phase: options refuse BtoA with several
            return targets[0], (entry_a,), k
        return entry_a, targets, k

    @staticmethod
    def collate_fn(samples: list[dict]) -> dict:
        """The batch ``__getitems__`` made; other lists of samples are joined by ``default_collate``."""
        return samples.batch if isinstance(samples, AssembledBatch) else default_collate(samples)


def index_phase(index: int, phases_per_slice: int) -> int:
    """Which of the requested phases sample ``index`` serves (input conditioning)."""
    return index % phases_per_slice


class AssembledBatch(list):
    """A list of samples that are views into one ready batch, ``.batch``.

    A DataLoader built without :meth:`RobustNiftiDataset.collate_fn` still works: torch's
    ``default_collate`` stacks the samples as usual (one copy more).
    """

    def __init__(self, samples: list[dict], batch: dict):
        super().__init__(samples)
        self.batch = batch
