"""The slices the network sees: how a volume becomes them, and an on-disk cache of them.

:class:`SlicePipeline` is the one preprocessing of training and inference. It turns a
volume in HU into the network's inputs and maps the network's outputs back to HU:

1. It cuts the volume along ``settings.slice_axis``: a canonical (X, Y, Z) volume becomes (N, H, W).
2. NaN and -Inf voxels become the window's low end, and +Inf voxels its high end. A slice
   that holds them is never a training sample, but it can still be a 2.5D neighbour.
3. The window maps each slice to [0, 255] (``--intensity``: ``hu`` is the fixed window,
   ``volume`` is the volume's own finite min..max).
4. Each slice is resized to (S, S), bilinear, antialiased when shrinking.
5. It is scaled to [-1, 1].

The way back undoes these steps in reverse: resize to (H, W), map [-1, 1] to [0, 255]
(clipped), invert the window to HU, and put the slices back in the (X, Y, Z) volume.
The cache below stores :meth:`SlicePipeline.network_slices` as float16, and the data set
serves each cached slice with its neighbours. Inference (inference/volume.py) feeds the
generator :meth:`SlicePipeline.network_inputs`, the same values in float32.
tests/test_slice_pipeline.py checks that the two sides match.

A volume is decoded once: its network slices go to
``<cache_dir>/<folder>_<file stem>[_frame<F>]-<key>/slices.npy`` (one entry per frame of a
4D file, e.g. each phase of a 4D-CT; float16, shape
``(N, S, S)``, a plain .npy array that ``np.load(..., mmap_mode="r")`` maps), with
``entry.json`` describing them. Training and every DataLoader worker read slices from there
(:class:`SliceReader`, a few at a time) without touching the NIfTI file again, so memory is
bounded by the batch, not the dataset.

The key hashes the file's identity (:func:`source_identity`: absolute path, size,
modification and change times, inode, and a digest of a few sampled blocks) and every
setting that changes the slices (:class:`SliceSettings`), so a changed file or setting
rebuilds only the entries it affects, even a file rewritten with its old size and
modification time restored. An entry is built in a temporary folder and renamed into place
only once complete; an entry whose description is missing, unreadable or does not match
its array is rebuilt, never read. A build that fails (a full disk, a folder that cannot be
written, Ctrl-C) leaves nothing behind; a full or read-only cache is a :class:`CacheError`
naming the cache folder. :func:`prune_stale_entries` deletes the entries that no run can
read again (their file is gone or changed).

Clearing the cache is deleting the folder (``rm -rf ./cache``); ``--no_cache`` builds the
same entries in a temporary folder removed at exit. A cache deleted while a run reads it
stops the run with a :class:`CacheError`; running again rebuilds it.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.base_dataset import CacheError
from data.intensity import HUWindow, network_to_pixels, pixels_to_network, window_for
from data.slicing import context_indices, resize_slices, slices_to_volume, volume_to_slices
from data.volume_io import VolumeError, read_volume, strip_nifti_suffix

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the layout, the key or the meaning of an entry changes
SLICES_FILE = "slices.npy"
ENTRY_FILE = "entry.json"
PARTIAL_MARK = ".partial-"  # <entry>.partial-<host>-<pid>: a build in progress (or abandoned)
BUILD_CHUNK = 16  # slices windowed and resized at a time: bounds the memory of a build
KEY_LENGTH = 20  # hex digits of the key at the end of an entry's name
# Blocks of the source file hashed into its identity: the first (the header), the last (for
# a .gz, the CRC-32 and size of the whole decompressed data) and some spread between.
IDENTITY_BLOCKS = 6
IDENTITY_BLOCK_BYTES = 4096
_HAS_PREADV = hasattr(os, "preadv")
_ENTRY_NAME = re.compile(rf".+-[0-9a-f]{{{KEY_LENGTH}}}")
_PARTIAL_NAME = re.compile(rf"(.+-[0-9a-f]{{{KEY_LENGTH}}}){re.escape(PARTIAL_MARK)}(.+)-(\d+)")
# posix_fallocate's answers for a filesystem that cannot reserve space ahead.
_NO_FALLOCATE = {errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.ENOSYS}


@dataclass(frozen=True)
class SliceSettings:
    """Every option that changes a volume's network inputs, and so its cached slices."""

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
        """The fields that change the slices, for a cache key."""
        fields = dataclasses.asdict(self)
        if self.intensity == "volume":  # the fixed window plays no part then
            fields.pop("hu_min"), fields.pop("hu_max")
        return fields


@dataclass(frozen=True, eq=False)
class SlicePipeline:
    """One volume's slices on their way into the network and back, under one :class:`SliceSettings`.

    Attributes:
        settings: slice axis, size and intensity mapping.
        window: the intensity window: the fixed one, or the volume's own min..max.
        slices: (N, H, W) view of the volume in file units (HU), cut along ``settings.slice_axis``.
    """

    settings: SliceSettings
    window: HUWindow
    slices: np.ndarray

    @classmethod
    def for_volume(cls, volume: np.ndarray, settings: SliceSettings) -> SlicePipeline:
        """The pipeline of a canonical (X, Y, Z) volume in file units (``read_volume``'s array).

        Raises:
            ValueError: ``settings.intensity == "volume"`` and the volume has no finite voxel
                or is constant.
        """
        window = window_for(volume, settings.intensity, settings.hu_min, settings.hu_max)
        return cls(settings, window, volume_to_slices(volume, settings.slice_axis))

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    @property
    def size(self) -> tuple[int, int]:
        """(S, S): the network's slice size."""
        return (self.settings.resize_to, self.settings.resize_to)

    def hu_slices(self, indices: slice | np.ndarray) -> np.ndarray:
        """Slices ``indices`` as the window sees them: (n, H, W) float32 in file units, a copy,
        with NaN and -Inf voxels set to the window's low end and +Inf voxels to its high end."""
        lo, hi = self.window.lo_hu, self.window.hi_hu
        return np.nan_to_num(self.slices[indices], nan=lo, posinf=hi, neginf=lo)

    def network_slices(self, indices: slice | np.ndarray) -> np.ndarray:
        """Slices ``indices`` as the network sees them: (n, S, S) float32 in [-1, 1].

        A slice's values do not depend on which other slices are asked for with it: each
        slice is resized on its own.
        """
        return pixels_to_network(resize_slices(self.window(self.hu_slices(indices)), self.size).numpy())

    def network_inputs(self, centres: range | np.ndarray, context_slices: int) -> torch.Tensor:
        """The generator's input for slices ``centres``: (B, 1+2K, S, S) float32 in [-1, 1].

        Channel ``K`` holds the slice itself. Channels ``K - j`` and ``K + j`` hold its ``j``-th
        neighbour below and above, with the edge slice repeated past the volume's ends.
        Each slice that is needed is computed once. Memory grows with the batch, not with
        the volume.
        """
        # (B, 1+2K): each centre's index with its K neighbours' on each side
        indices = np.stack([context_indices(k, self.n_slices, context_slices) for k in centres])
        needed, position = np.unique(indices, return_inverse=True)
        inputs = torch.from_numpy(self.network_slices(needed))  # (U, S, S)
        return inputs[torch.from_numpy(position.reshape(indices.shape))]

    def to_hu(self, fake: torch.Tensor | np.ndarray) -> np.ndarray:
        """Network output (B, S, S) in [-1, 1] -> (B, H, W) float32 in file units, on the slices' grid.

        Values outside [-1, 1] are clipped. Inside the window the inverse is exact with
        ``intensity="hu"``. With ``"volume"``, the *input's* window is inverted.
        """
        height, width = self.slices.shape[1:]
        return self.window.inverse(network_to_pixels(resize_slices(fake, (height, width)).numpy()))

    def to_volume(self, slices: np.ndarray) -> np.ndarray:
        """(N, H, W) slices, such as :meth:`to_hu`'s, -> the canonical (X, Y, Z) volume they came from."""
        return slices_to_volume(slices, self.settings.slice_axis)


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
            try:
                out[:] = entry.open_slices()[first : first + count]
            except FileNotFoundError as err:
                raise _cache_removed(entry) from err
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
        try:
            descriptor = os.open(entry.folder / SLICES_FILE, os.O_RDONLY)
        except FileNotFoundError as err:
            raise _cache_removed(entry) from err
        self._files[entry.folder] = descriptor
        return descriptor

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}  # descriptors do not travel to spawned processes

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def _close_all(files: OrderedDict[Path, int]) -> None:
    while files:
        os.close(files.popitem()[1])


def _cache_removed(entry: CachedVolume) -> CacheError:
    return CacheError(
        f"{entry.folder / SLICES_FILE}: not found: the slice cache was removed while this run was reading it; "
        "run again to rebuild it"
    )


def source_identity(path: Path) -> dict:
    """What the file at ``path`` is now, as far as a cache entry of it is concerned.

    Its absolute path, size, modification time, change time, inode, and a BLAKE2 digest of
    :data:`IDENTITY_BLOCKS` sampled blocks. A rewrite in place with the old size and
    modification time restored (``os.utime``) still changes the change time, which no user
    can set, and the sampled bytes catch it on filesystems whose times are coarse. Costs one
    ``open`` and a few 4 KiB reads (about 0.1 ms warm).

    Raises:
        OSError: the file cannot be opened.
    """
    path = Path(path).resolve()
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        size = stat.st_size
        if size <= IDENTITY_BLOCKS * IDENTITY_BLOCK_BYTES:
            digest.update(f.read())
        else:
            last = size - IDENTITY_BLOCK_BYTES
            for i in range(IDENTITY_BLOCKS):
                f.seek(last * i // (IDENTITY_BLOCKS - 1))
                digest.update(f.read(IDENTITY_BLOCK_BYTES))
    return {
        "path": str(path),
        "size": size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
        "sampled_blake2b": digest.hexdigest(),
    }


class SourceIdentities:
    """:func:`source_identity`, looked up once per file: a run's pruning and its cache
    lookups share what it read. Holds what the files were when first asked, so keep one
    for one pass over the data set, not for a whole training run."""

    def __init__(self):
        self._known: dict[Path, dict] = {}

    def __call__(self, path: Path) -> dict:
        path = Path(path).resolve()
        if path not in self._known:
            self._known[path] = source_identity(path)
        return self._known[path]


def cache_key(path: Path, settings: SliceSettings, identity: dict | None = None, frame: int | None = None) -> str:
    """The entry name's key: a hash of the file's identity, the frame and the slice settings.

    Args:
        identity: ``source_identity(path)`` if already known.
        frame: the frame of a 4D file (a phase of a 4D-CT) the entry holds; None for a 3D file,
            whose key is the one it had before frames were cached.
    """
    described = {
        "format": CACHE_FORMAT,
        "identity": source_identity(path) if identity is None else identity,
        "settings": settings.key_fields(),
    }
    if frame is not None:
        described["frame"] = int(frame)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]


def cached_volume(
    path: Path,
    settings: SliceSettings,
    cache_dir: Path,
    identity_of: Callable[[Path], dict] = source_identity,
    frame: int | None = None,
) -> tuple[CachedVolume, bool]:
    """The cache entry of ``path`` under ``settings``, built first if missing or damaged.

    Args:
        identity_of: gives a file's :func:`source_identity`; a :class:`SourceIdentities`
            shares the lookups of a pass over the data set.
        frame: for a 4D file, the frame (0-based) to cache: each frame is an entry of its
            own, ``<folder>_<file stem>_frame<F>-<key>``.

    Returns:
        ``(entry, built)``: ``built`` is True when the volume had to be decoded now.

    Raises:
        VolumeError: the file cannot be read, or has no finite or non-constant voxels.
        CacheError: the entry cannot be written (full disk, no permission, ...).
    """
    path = Path(path)
    try:
        key = cache_key(path, settings, identity_of(path), frame)
    except OSError as err:
        raise VolumeError(path, f"cannot be opened ({err.strerror or err})") from err
    frame_part = "" if frame is None else f"_frame{int(frame)}"
    folder = Path(cache_dir) / f"{path.parent.name}_{strip_nifti_suffix(path.name)}{frame_part}-{key}"
    entry = _load_entry(folder, path)
    if entry is not None:
        return entry, False
    if folder.exists():
        logger.warning("%s: cache entry %s is damaged or incomplete; rebuilding it", path, folder)
        shutil.rmtree(folder, ignore_errors=True)
    return _build_entry(path, settings, folder, key, frame), True


def _build_entry(path: Path, settings: SliceSettings, folder: Path, key: str, frame: int | None = None) -> CachedVolume:
    volume, meta = read_volume(path, frame=frame)
    try:
        pipeline = SlicePipeline.for_volume(volume, settings)
    except ValueError as err:
        raise VolumeError(path, str(err)) from err

    partial = folder.with_name(f"{folder.name}{PARTIAL_MARK}{socket.gethostname()}-{os.getpid()}")
    try:
        try:
            _remove_abandoned_builds(folder)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            finite, blank = _write_slices(partial / SLICES_FILE, pipeline)
            if not (finite & ~blank).any():
                raise VolumeError(path, "no usable slice: every slice has NaN/Inf voxels or is constant")
            description = {
                "format": CACHE_FORMAT,
                "source": str(path.resolve()),
                "key": key,
                "n_slices": pipeline.n_slices,
                "slice_size": list(pipeline.size),
                "canonical_shape": list(meta.canonical_shape),
                "canonical_affine": meta.canonical_affine.tolist(),
                "window": pipeline.window.as_dict(),
                "finite": finite.tolist(),
                "blank": blank.tolist(),
                "settings": dataclasses.asdict(settings),
            }
            if frame is not None:
                description["frame"] = int(frame)
            _write_description(partial, description)
            try:
                os.replace(partial, folder)
            except OSError:
                # Another process finished the same entry first; theirs is as good as ours.
                if _load_entry(folder, path) is None:
                    raise
        except OSError as err:
            raise _cache_write_error(folder.parent, path, err) from err
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # also on Ctrl-C: no partial entry stays
    entry = _load_entry(folder, path)
    if entry is None:
        raise RuntimeError(f"{folder}: cache entry unreadable right after it was written")
    return entry


def _write_slices(path: Path, pipeline: SlicePipeline) -> tuple[np.ndarray, np.ndarray]:
    """Write the volume's network slices (:meth:`SlicePipeline.network_slices`) to the new
    ``.npy`` file ``path``, (N, S, S) float16, :data:`BUILD_CHUNK` slices at a time.

    Written with ``write()``, never through a memory map: on a full disk a write fails with
    ENOSPC, where a store into a mapped page that has no disk block kills the process with
    SIGBUS. The file's space is reserved first (:func:`_reserve_space`).

    Returns:
        ``(finite, blank)``: (N,) bool each, slice has only finite voxels / is constant.
    """
    n_slices, size = pipeline.n_slices, pipeline.size
    finite = np.empty(n_slices, dtype=bool)
    blank = np.empty(n_slices, dtype=bool)
    with open(path, "xb") as slices:
        header = _npy_header((n_slices, *size))
        _reserve_space(slices, len(header) + n_slices * size[0] * size[1] * 2)
        slices.write(header)
        for start in range(0, n_slices, BUILD_CHUNK):
            chunk = slice(start, min(start + BUILD_CHUNK, n_slices))
            block = pipeline.slices[chunk]  # (c, H, W) view, in file units
            finite[chunk] = np.isfinite(block).all(axis=(1, 2))
            if not finite[chunk].all():
                # A slice holding NaN/Inf is never a sample, but it can be a 2.5D neighbour, and
                # then the network sees those voxels at the window's ends. Judge it as seen.
                block = pipeline.hu_slices(chunk)
            blank[chunk] = block.max(axis=(1, 2)) <= block.min(axis=(1, 2))
            network = pipeline.network_slices(chunk)  # (c, S, S) float32
            # torch's cast to float16 is vectorised, numpy's is not
            slices.write(memoryview(torch.from_numpy(network).half().numpy()).cast("B"))
    return finite, blank


def _write_description(partial: Path, description: dict) -> None:
    """``entry.json``, written last: an entry without its description is incomplete by construction."""
    (partial / ENTRY_FILE).write_text(json.dumps(description))


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The header of a C-order float16 ``.npy`` file of ``shape``: what ``np.load`` reads."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape}
    )
    return header.getvalue()


def _reserve_space(file: io.BufferedWriter, length: int) -> None:
    """Claim ``length`` bytes of disk for ``file`` now, so that a full disk fails here, at
    once, and not halfway through the build (nor later, when the page cache is written back).
    Filesystems that cannot reserve ahead are written as they are: writes then fail instead."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(file.fileno(), 0, length)
    except OSError as err:
        if err.errno not in _NO_FALLOCATE:
            raise
        logger.debug("%s: cannot reserve disk space ahead (%s); writing without", file.name, os.strerror(err.errno))


def _cache_write_error(cache_dir: Path, source: Path, err: OSError) -> CacheError:
    """One line for a cache that cannot be written: the folder, the problem, what to do."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free space or point --cache_dir elsewhere"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "make it writable or point --cache_dir elsewhere"
    else:
        advice = "point --cache_dir elsewhere"
    return CacheError(f"{cache_dir}: {reason[:1].lower()}{reason[1:]} while caching {source}; {advice}")


def _remove_abandoned_builds(folder: Path) -> None:
    """Delete partial builds of this entry left on this host by runs that were killed."""
    for partial in folder.parent.glob(f"{glob.escape(folder.name)}{PARTIAL_MARK}*"):
        if _abandoned(partial):
            shutil.rmtree(partial, ignore_errors=True)


def _abandoned(partial: Path) -> bool:
    """True for a partial build left on this host by a process that no longer runs. Builds of
    live processes, and of other hosts (a cache on a shared disk), are not ours to judge."""
    match = _PARTIAL_NAME.fullmatch(partial.name)
    return bool(match) and match[2] == socket.gethostname() and not _process_alive(int(match[3]))


def prune_stale_entries(cache_dir: Path, identity_of: Callable[[Path], dict] = source_identity) -> tuple[int, int]:
    """Delete the entries under ``cache_dir`` that no run will read again, and log what went.

    Removed: an entry whose source file (``entry.json``'s ``"source"``) no longer exists, or
    whose key no longer matches the file's current identity under the entry's own settings
    (the file changed, so its slices now live under another key); an entry of an older
    :data:`CACHE_FORMAT`; a partial build abandoned on this host by a process that no longer
    runs. Left alone: anything that is not a folder named like an entry, an entry whose
    description cannot be read (rebuilt in place when its file is next read), entries of a
    newer format, and builds in progress. Entries of every data set under ``cache_dir`` are
    judged, other settings included; nothing outside ``cache_dir`` is touched.

    Args:
        identity_of: gives a file's :func:`source_identity` (shared with the lookups that follow).

    Returns:
        ``(entries removed, bytes freed)``.
    """
    cache_dir = Path(cache_dir)
    try:
        folders = sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []
    except OSError as err:  # unreadable: a build there will say so, if one is needed
        logger.debug("slice cache %s: cannot list it to prune (%s)", cache_dir, err)
        return 0, 0
    removed = freed = 0
    for folder in folders:
        if folder.is_symlink() or not folder.is_dir() or not _is_stale(folder, identity_of):
            continue
        size = _folder_bytes(folder)
        # ignore_errors: another process (a torchrun rank) may be pruning the same folder
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed, freed = removed + 1, freed + size
    if removed:
        logger.info(
            "slice cache %s: pruned %d stale entr%s (files changed or gone), %.1f MB freed",
            cache_dir,
            removed,
            "y" if removed == 1 else "ies",
            freed / 1e6,
        )
    return removed, freed


def _folder_bytes(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    except OSError:
        return 0  # removed meanwhile


def _is_stale(folder: Path, identity_of: Callable[[Path], dict]) -> bool:
    if PARTIAL_MARK in folder.name:
        return _abandoned(folder)
    if not _ENTRY_NAME.fullmatch(folder.name):
        return False
    try:
        description = json.loads((folder / ENTRY_FILE).read_text())
        form, source = int(description["format"]), Path(description["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if form != CACHE_FORMAT:
        return form < CACHE_FORMAT
    try:
        settings = SliceSettings(**description["settings"])
        key = description["key"]
        frame = description.get("frame")
    except (KeyError, TypeError):
        return False
    try:
        identity = identity_of(source)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False  # there but unreadable now (permissions): not ours to judge
    return cache_key(source, settings, identity, frame) != key


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
