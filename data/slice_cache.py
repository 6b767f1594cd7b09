"""An on-disk cache of normalised, resized slices, one entry per volume file.

A volume is decoded once: its slices, already windowed, resized and in the network's
[-1, 1] range, go to ``<cache_dir>/<folder>_<file stem>-<key>/slices.npy`` (float16, shape
``(N, S, S)``, a plain .npy array that ``np.load(..., mmap_mode="r")`` maps), with
``entry.json`` describing them. Training and every DataLoader worker read slices from there
(:class:`SliceReader`, a few at a time) without touching the NIfTI file again, so memory is
bounded by the batch, not the dataset.

The key hashes the file's identity (absolute path, size, modification time) and every
setting that changes the slices (:class:`SliceSettings`), so a changed file or setting
rebuilds only the entries it affects. An entry is built in a temporary folder and renamed
into place only once complete; an entry whose description is missing, unreadable or does
not match its array is rebuilt, never read.

Clearing the cache is deleting the folder (``rm -rf ./cache``); ``--no_cache`` builds the
same entries in a temporary folder removed at exit.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.intensity import HUWindow, pixels_to_network, window_for
from data.slicing import resize_slices, volume_to_slices
from data.volume_io import VolumeError, read_volume, strip_nifti_suffix

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout or the meaning of an entry changes
SLICES_FILE = "slices.npy"
ENTRY_FILE = "entry.json"
PARTIAL_MARK = ".partial-"  # <entry>.partial-<host>-<pid>: a build in progress (or abandoned)
BUILD_CHUNK = 16  # slices windowed and resized at a time: bounds the memory of a build
_HAS_PREADV = hasattr(os, "preadv")


@dataclass(frozen=True)
class SliceSettings:
    """Every option that changes the cached slices of a volume."""

    slice_axis: str = "axial"
    resize_to: int = 512
    intensity: str = "volume"
    hu_min: float = -1024.0
    hu_max: float = 3071.0

    @classmethod
    def from_options(cls, opt) -> SliceSettings:
        """The settings that parsed options (or a run's saved ``train_opt.json``) describe."""
        return cls(
            slice_axis="axial" if opt.axial_slice else opt.slice_axis,
            resize_to=int(opt.resize_to),
            intensity=opt.intensity,
            hu_min=float(opt.hu_min),
            hu_max=float(opt.hu_max),
        )

    def key_fields(self) -> dict:
        fields = dataclasses.asdict(self)
        if self.intensity == "volume":  # the fixed window plays no part then
            fields.pop("hu_min"), fields.pop("hu_max")
        return fields


@dataclass(frozen=True)
class CachedVolume:
    """One volume's slices on disk and what is known about them.

    Attributes:
        source: the NIfTI file.
        folder: the cache entry folder.
        n_slices: number of slices N along the slice axis.
        canonical_shape: (X, Y, Z) shape of the canonical volume.
        canonical_affine: (4, 4) world affine of the canonical volume (mm).
        window: the intensity window the slices were normalised with.
        finite: (N,) bool, slice has only finite voxels.
        blank: (N,) bool, slice is constant (carries no image).
        slice_shape: (S, S) size of a cached slice.
        data_offset: byte offset of slice 0 in ``slices.npy`` (after the .npy header).
    """

    source: Path
    folder: Path
    n_slices: int
    canonical_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    window: HUWindow
    finite: np.ndarray
    blank: np.ndarray
    slice_shape: tuple[int, int]
    data_offset: int

    @property
    def usable(self) -> np.ndarray:
        """(N,) bool: slices fit to train on."""
        return self.finite & ~self.blank

    def open_slices(self) -> np.ndarray:
        """(N, S, S) float16 read-only memory map in [-1, 1]."""
        return np.load(self.folder / SLICES_FILE, mmap_mode="r")


class SliceReader:
    """Reads runs of consecutive slices from cache entries, as fresh (C, S, S) float16 arrays.

    Reads are ``pread`` calls into the returned array rather than copies out of a memory
    map: measured on the seed data set, as fast as a memory map once every page is mapped
    and faster before (a new DataLoader worker maps the cache page by page), and the
    process's resident memory stays at its batches instead of growing with every cached
    page it touched. ``pread`` has no file position, so the descriptors can be shared by
    forked DataLoader workers. At most ``max_open`` files are kept open.
    """

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._files: OrderedDict[Path, int] = OrderedDict()  # entry folder -> open descriptor
        weakref.finalize(self, _close_all, self._files)  # also at exit, while `os` still exists

    def read(self, entry: CachedVolume, first: int, count: int) -> np.ndarray:
        """Slices ``first .. first + count - 1`` of ``entry``: (count, S, S) float16."""
        out = np.empty((count, *entry.slice_shape), dtype=np.float16)
        if count == 0:
            return out
        if not _HAS_PREADV:  # Windows: read through a memory map instead
            out[:] = entry.open_slices()[first : first + count]
        else:
            self._pread(out, entry, first)
        return out

    def read_into(self, out: np.ndarray, entry: CachedVolume, indices: np.ndarray, flip: bool = False) -> None:
        """Write slices ``indices`` of ``entry`` (consecutive, or with repeated ends) into
        ``out`` (len(indices), S, S), mirrored left-right if ``flip``."""
        first, count = int(indices[0]), int(indices[-1]) - int(indices[0]) + 1
        if not flip and count == len(indices) and out.flags.c_contiguous and _HAS_PREADV:
            self._pread(out, entry, first)  # straight into place: no intermediate copy
            return
        block = self.read(entry, first, count)[indices - first]
        np.copyto(out, block[..., ::-1] if flip else block)

    def close(self) -> None:
        _close_all(self._files)

    def _pread(self, out: np.ndarray, entry: CachedVolume, first: int) -> None:
        done = os.preadv(
            self._descriptor(entry), [memoryview(out).cast("B")], entry.data_offset + first * out[0].nbytes
        )
        if done != out.nbytes:
            last = first + len(out) - 1
            raise OSError(f"{entry.folder / SLICES_FILE}: slices {first}..{last} cut short on disk")

    def _descriptor(self, entry: CachedVolume) -> int:
        if entry.folder in self._files:
            self._files.move_to_end(entry.folder)
            return self._files[entry.folder]
        if len(self._files) >= self.max_open:
            os.close(self._files.popitem(last=False)[1])
        descriptor = os.open(entry.folder / SLICES_FILE, os.O_RDONLY)
        self._files[entry.folder] = descriptor
        return descriptor

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}  # descriptors do not travel to spawned processes

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def _close_all(files: OrderedDict[Path, int]) -> None:
    while files:
        os.close(files.popitem()[1])


def cache_key(path: Path, settings: SliceSettings) -> str:
    stat = path.stat()
    identity = {
        "format": CACHE_FORMAT,
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "settings": settings.key_fields(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def cached_volume(path: Path, settings: SliceSettings, cache_dir: Path) -> tuple[CachedVolume, bool]:
    """The cache entry of ``path`` under ``settings``, built first if missing or damaged.

    Returns:
        ``(entry, built)``: ``built`` is True when the volume had to be decoded now.

    Raises:
        VolumeError: the file cannot be read, or has no finite or non-constant voxels.
    """
    path = Path(path)
    try:
        key = cache_key(path, settings)
    except OSError as err:
        raise VolumeError(path, f"cannot be accessed ({err.strerror or err})") from err
    folder = Path(cache_dir) / f"{path.parent.name}_{strip_nifti_suffix(path.name)}-{key}"
    entry = _load_entry(folder, path)
    if entry is not None:
        return entry, False
    if folder.exists():
        logger.warning("%s: cache entry %s is damaged or incomplete; rebuilding it", path, folder)
        shutil.rmtree(folder, ignore_errors=True)
    return _build_entry(path, settings, folder), True


def _build_entry(path: Path, settings: SliceSettings, folder: Path) -> CachedVolume:
    volume, meta = read_volume(path)
    try:
        window = window_for(volume, settings.intensity, settings.hu_min, settings.hu_max)
    except ValueError as err:
        raise VolumeError(path, str(err)) from err

    raw = volume_to_slices(volume, settings.slice_axis)  # (N, H, W) view, in file units
    n_slices, size = len(raw), (settings.resize_to, settings.resize_to)
    finite = np.empty(n_slices, dtype=bool)
    blank = np.empty(n_slices, dtype=bool)

    _remove_abandoned_builds(folder)
    partial = folder.with_name(f"{folder.name}{PARTIAL_MARK}{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        slices = np.lib.format.open_memmap(partial / SLICES_FILE, mode="w+", dtype=np.float16, shape=(n_slices, *size))
        for start in range(0, n_slices, BUILD_CHUNK):
            # (c, H, W), contiguous; for sagittal slices a view, so the fix-up below edits
            # our own copy of the volume, which is dropped afterwards.
            block = np.ascontiguousarray(raw[start : start + BUILD_CHUNK])
            stop = start + len(block)
            finite[start:stop] = np.isfinite(block).all(axis=(1, 2))
            if not finite[start:stop].all():
                # Non-finite voxels become the window's ends so that the slice can still serve
                # as a neighbour in 2.5D inputs; slices holding them are never training samples.
                np.nan_to_num(block, copy=False, nan=window.lo_hu, posinf=window.hi_hu, neginf=window.lo_hu)
            blank[start:stop] = block.max(axis=(1, 2)) <= block.min(axis=(1, 2))
            network = pixels_to_network(resize_slices(window(block), size).numpy())
            slices[start:stop] = torch.from_numpy(network).half().numpy()  # torch's cast is vectorised, numpy's is not
        if not (finite & ~blank).any():
            raise VolumeError(path, "no usable slice: every slice has NaN/Inf voxels or is constant")
        # No msync: the written pages are in the page cache whatever happens to this process,
        # and the rename below is what makes the entry visible.
        del slices
        description = {
            "format": CACHE_FORMAT,
            "source": str(path.resolve()),
            "n_slices": int(n_slices),
            "slice_size": list(size),
            "canonical_shape": list(meta.canonical_shape),
            "canonical_affine": meta.canonical_affine.tolist(),
            "window": window.as_dict(),
            "finite": finite.tolist(),
            "blank": blank.tolist(),
            "settings": dataclasses.asdict(settings),
        }
        # Written last: an entry without its description is incomplete by construction.
        (partial / ENTRY_FILE).write_text(json.dumps(description))
        try:
            os.replace(partial, folder)
        except OSError:
            # Another process finished the same entry first; theirs is as good as ours.
            if _load_entry(folder, path) is None:
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    entry = _load_entry(folder, path)
    if entry is None:
        raise RuntimeError(f"{folder}: cache entry unreadable right after it was written")
    return entry


def _remove_abandoned_builds(folder: Path) -> None:
    """Delete partial builds of this entry left on this host by runs that were killed."""
    host = socket.gethostname()
    for partial in folder.parent.glob(f"{glob.escape(folder.name)}{PARTIAL_MARK}*"):
        owner = partial.name[len(folder.name) + len(PARTIAL_MARK) :]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _load_entry(folder: Path, source: Path) -> CachedVolume | None:
    """The entry in ``folder`` if it is complete and consistent, else None."""
    try:
        description = json.loads((folder / ENTRY_FILE).read_text())
        if description.get("format") != CACHE_FORMAT:
            return None
        n_slices = int(description["n_slices"])
        slices = np.load(folder / SLICES_FILE, mmap_mode="r")
        expected_shape = (n_slices, *description["slice_size"])
        if slices.dtype != np.float16 or slices.shape != expected_shape:
            return None
        # A truncated array file fails np.load above; check the size as well for a file
        # that was cut exactly at the end of its header.
        if (folder / SLICES_FILE).stat().st_size < slices.offset + slices.nbytes:
            return None
        finite = np.asarray(description["finite"], dtype=bool)
        blank = np.asarray(description["blank"], dtype=bool)
        if finite.shape != (n_slices,) or blank.shape != (n_slices,):
            return None
        return CachedVolume(
            source=source,
            folder=folder,
            n_slices=n_slices,
            canonical_shape=tuple(description["canonical_shape"]),
            canonical_affine=np.asarray(description["canonical_affine"], dtype=np.float64),
            window=HUWindow(**description["window"]),
            finite=finite,
            blank=blank,
            slice_shape=tuple(slices.shape[1:]),
            data_offset=int(slices.offset),
        )
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
