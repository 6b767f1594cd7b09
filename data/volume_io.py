"""The one seam between the project and NIfTI files: the only module that imports nibabel.

Contract
--------
``read_volume(path)`` returns ``(volume, meta)``:

* ``volume``: a ``float32`` array of shape ``(X, Y, Z)`` in **canonical RAS+ axis order**:
  axis 0 runs left -> right, axis 1 posterior -> anterior, axis 2 inferior -> superior,
  whatever the order in which the file stores its voxels. An *axial* slice is therefore
  ``volume[:, :, k]``, a coronal one ``volume[:, k, :]``, a sagittal one ``volume[k, :, :]``.
  The array is a fresh copy that keeps the file's memory layout (for NIfTI, Fortran order:
  x fastest), so axial slices are contiguous blocks.
  Values are in the file's units after ``scl_slope``/``scl_inter`` scaling (Hounsfield
  units for CT). Reorientation only permutes and flips axes; voxels are never resampled.
* ``meta``: a :class:`VolumeMeta` holding the file's own header, affine and storage order.

``write_volume(path, volume, meta)`` takes a canonical array and the ``meta`` that
``read_volume`` returned and writes it back in the source file's exact grid: same storage
order, shape, affine, qform/sform (with their codes), voxel sizes, units, NIfTI version and
byte order. Writing is atomic (temporary file, then rename), so a failed or interrupted
write never leaves a half-written output under the final name. A ``.nii.gz`` holds the bytes
nibabel writes for the ``.nii`` as one standard gzip stream (compressed by ISA-L, see
:data:`GZIP_LEVEL`), which every NIfTI reader decodes.

Every problem with a file surfaces as :class:`VolumeError`, whose message starts with the
file's path and says what is wrong. That includes a header whose claims cannot be met, found
before any memory is allocated for the voxels: more voxel data than the file holds (for
``.nii.gz``, counted in bounded memory when the gzip trailer cannot prove it), or a decode
that needs more memory than the machine has free (:func:`decode_peak_bytes`).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip
from nibabel.arrayproxy import ArrayProxy
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from nibabel.volumeutils import apply_read_scaling

from util.atomic import atomic_path
from util.errors import UserError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
OUTPUT_DTYPES = ("int16", "float32")
# A header that claims more voxels than this is refused before any memory is allocated:
# 2**31 float32 voxels are 8 GiB, far above any CT volume (512 x 512 x 2000 is 0.5e9).
MAX_VOXELS = 2**31
# scl_slope/scl_inter are applied a slab of this many voxels at a time: nibabel scales in
# float64, and a whole 512 x 512 x 1024 volume in float64 is 2 GiB (4 GiB at the peak).
SCALING_SLAB_VOXELS = 1 << 22
# Deflate expands at most 1032-fold, so a .gz of N bytes holds at most 1032 N bytes.
MAX_DEFLATE_RATIO = 1032
# Bytes of free memory a decode may use; None: what the operating system reports
# (:func:`available_memory_bytes`). Tests set it.
AVAILABLE_MEMORY_BYTES: int | None = None
# .nii.gz outputs are compressed by ISA-L (python-isal) at its highest level, 3: as small as
# nibabel's zlib level 1 and 3x faster (a 512 x 512 x 113 int16 volume on a CPU core: 0.24 s
# against 0.79 s, 30.1 against 29.9 MB; benchmarks/nifti_write.py prints the table). A second
# thread (isal's igzip_threaded) gained nothing on 2 cores.
# The file stays one standard gzip stream, which every NIfTI reader decodes.
GZIP_LEVEL = 3
_CANONICAL = axcodes2ornt("RAS")
_INT16_RANGE = (np.iinfo(np.int16).min, np.iinfo(np.int16).max)

logger = logging.getLogger(__name__)


class VolumeError(UserError, ValueError):
    """A file that cannot be used as a volume. ``str(err)`` is ``"<path>: <problem>[; <hint>]"``.

    ``hint`` is advice for the command-line scripts that read one volume (``--frame``);
    the dataset, which has no such flag, reports ``problem`` alone.
    """

    def __init__(self, path: str | os.PathLike, problem: str, hint: str | None = None):
        self.path = Path(path)
        self.problem = problem
        self.hint = hint
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True for names ending in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``"patient_1.nii.gz"`` -> ``"patient_1"``."""
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class VolumeMeta:
    """Geometry and header of a volume, enough to write an array back onto its grid.

    Attributes:
        affine: (4, 4) storage affine: storage voxel indices -> world millimetres (RAS).
        storage_shape: shape of the 3D array as stored in the file.
        header: a copy of the source file's header, or None for a volume made in memory.
        image_class: ``nib.Nifti1Image`` or ``nib.Nifti2Image``.
        source: the file that was read, if any.
    """

    affine: np.ndarray
    storage_shape: tuple[int, int, int]
    header: nib.nifti1.Nifti1Header | None = None
    image_class: type = nib.Nifti1Image
    source: Path | None = None

    @property
    def _to_canonical(self) -> np.ndarray:
        return ornt_transform(io_orientation(self.affine), _CANONICAL)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """Shape of the array ``read_volume`` returns: (X, Y, Z) in RAS+ order."""
        axes = self._to_canonical[:, 0].astype(int)
        shape = [0, 0, 0]
        for storage_axis, canonical_axis in enumerate(axes):
            shape[canonical_axis] = self.storage_shape[storage_axis]
        return tuple(shape)

    @property
    def canonical_affine(self) -> np.ndarray:
        """(4, 4) affine of the canonical array: canonical voxel indices -> world mm."""
        return self.affine @ inv_ornt_aff(self._to_canonical, self.storage_shape)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in millimetres along the canonical (X, Y, Z) axes."""
        return tuple(float(s) for s in np.linalg.norm(self.canonical_affine[:3, :3], axis=0))

    def to_canonical(self, storage_array: np.ndarray) -> np.ndarray:
        """Storage-order array -> canonical RAS+ array (axes permuted/flipped, no copy)."""
        return apply_orientation(storage_array, self._to_canonical)

    def to_storage(self, canonical_array: np.ndarray) -> np.ndarray:
        """Canonical RAS+ array -> the file's storage order (inverse of ``to_canonical``)."""
        back = ornt_transform(_CANONICAL, io_orientation(self.affine))
        return apply_orientation(canonical_array, back)


def new_volume_meta(affine: np.ndarray, shape: tuple[int, int, int]) -> VolumeMeta:
    """A :class:`VolumeMeta` for a volume made in memory (e.g. a phantom).

    Args:
        affine: (4, 4) storage affine in mm; it also fixes the storage order of the file.
        shape: storage shape (3 ints).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 dimensions, got {shape}")
    return VolumeMeta(affine=affine, storage_shape=tuple(int(s) for s in shape))


def read_volume(path: str | os.PathLike, frame: int | None = None) -> tuple[np.ndarray, VolumeMeta]:
    """Read a NIfTI-1/2 volume as canonical (X, Y, Z) float32 in the file's units (HU for CT).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        frame: for a 4D file with several frames, which frame (0-based) to take. A 4D file
            with a single frame is read as 3D without it.

    Returns:
        ``(volume, meta)``; see the module docstring for the axis order.

    Raises:
        VolumeError: the file is missing, unreadable, not NIfTI, corrupt, truncated, not 3D,
            or of a data type that is not a real number.
    """
    path = Path(path)
    image = _load_nifti(path)
    header = image.header
    shape = tuple(int(s) for s in image.shape)
    _check_dtype(path, header)
    needed = _check_claimed_size(path, header, shape)
    spatial_shape, frame_index = _select_frame(path, shape, frame)
    _check_memory(path, header, spatial_shape, scaled=(image.dataobj.slope, image.dataobj.inter) != (1.0, 0.0))
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, "has a degenerate or non-finite affine; cannot tell its orientation")
    if np.isnan(io_orientation(affine)).any():
        # Voxel axes so close to parallel that no anatomical direction can be given to one.
        raise VolumeError(
            path, f"affine {affine[:3, :3].tolist()} has nearly parallel axes; cannot tell its orientation"
        )
    if _is_gzip_name(path):
        _check_gzip_holds(path, needed, shape)  # may decompress: after the cheap checks

    meta = VolumeMeta(
        affine=affine,
        storage_shape=spatial_shape,
        header=header.copy(),
        image_class=type(image),
        source=path,
    )
    try:
        volume = _decode(image.dataobj, meta, frame_index)
    except Exception as err:
        raise VolumeError(path, f"voxel data cannot be decoded ({_describe(err)})") from err
    return volume, meta


def frame_count(path: str | os.PathLike) -> int:
    """How many frames ``path`` holds, from its header alone: 1 for a 3D volume (or a 4D file
    with one frame), else the length of the 4th axis (e.g. the phases of a 4D-CT).

    Raises:
        VolumeError: the file is missing, not NIfTI, or neither 3D nor 4D.
    """
    path = Path(path)
    shape = tuple(int(s) for s in _load_nifti(path).shape)
    _, frame_index = _select_frame(path, shape, 0)
    return 1 if frame_index is None else shape[3]


def _load_nifti(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """``nib.load(path)`` (header now, voxels on demand), refusing what is not a NIfTI-1/2 file.

    Raises:
        VolumeError: the file is missing, unreadable or not NIfTI.
    """
    _check_file(path)
    try:
        # nibabel raises many types on corrupt input (ImageFileError, EOFError, zlib.error,
        # struct.error, ValueError, OSError, ...): at this boundary they all mean the same.
        with _nibabel_messages_to_debug(path):
            image = nib.load(path)
    except Exception as err:
        raise VolumeError(path, f"cannot be read as NIfTI ({_describe(err)})") from err
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise VolumeError(path, f"is a {type(image).__name__}, not a NIfTI-1/2 image")
    return image


def _decode(proxy: ArrayProxy, meta: VolumeMeta, frame_index: int | None) -> np.ndarray:
    """The canonical float32 volume: the stored voxels (one frame of a 4D file), scaled.

    Peak memory is the stored voxels (for ``.nii.gz``; a ``.nii`` is memory-mapped) plus the
    float32 result plus one slab of scaling scratch, never a float64 copy of the volume.
    """
    # The same file, read without scl_slope/scl_inter: the scaling is ours, a slab at a time.
    with _voxel_source(proxy.file_like) as source:
        unscaled = ArrayProxy(source, (proxy.shape, proxy.dtype, proxy.offset))
        raw = unscaled[(slice(None),) * 3 + (frame_index,)] if frame_index is not None else unscaled.get_unscaled()
        raw = np.asarray(raw).reshape(meta.storage_shape)  # storage order, the file's dtype
    # The result keeps the file's memory layout (x fastest in NIfTI), so an axial slice stays
    # one contiguous block: C order would transpose the volume here and again when it is cut
    # into slices. `target` is the same memory seen in storage order.
    volume = np.empty_like(meta.to_canonical(raw), dtype=np.float32)
    target = meta.to_storage(volume)
    slab = max(1, SCALING_SLAB_VOXELS // max(1, raw.shape[0] * raw.shape[1]))  # storage z-planes per slab
    with np.errstate(over="ignore"):  # values beyond float32 become +-Inf, non-finite like NaN
        for start in range(0, raw.shape[2], slab):
            block = raw[:, :, start : start + slab]
            # nibabel's own arithmetic (float64 for integer storage), so values are as its
            # scaled reads give them; an identity scaling returns the block itself.
            scaled = apply_read_scaling(block, proxy.slope, proxy.inter)
            np.copyto(target[:, :, start : start + slab], scaled, casting="unsafe")
    return volume


@contextmanager
def _voxel_source(file_like):
    """What nibabel should read the voxels from: a ``.nii.gz`` opened through ISA-L, which
    decompresses about twice as fast as zlib (nibabel's own choice), else the file itself."""
    if isinstance(file_like, str | os.PathLike) and _is_gzip_name(Path(file_like)):
        with igzip.open(file_like, "rb") as stream:
            yield stream
    else:
        yield file_like


def write_volume(
    path: str | os.PathLike,
    volume: np.ndarray,
    meta: VolumeMeta,
    dtype: str = "int16",
    phases: Sequence[int] | None = None,
    num_phases: int | None = None,
) -> Path:
    """Write a canonical (X, Y, Z) array onto the grid described by ``meta``, atomically.

    Args:
        path: output file; ``.nii.gz`` is compressed, ``.nii`` is not.
        volume: canonical RAS+ array of shape ``meta.canonical_shape``, in the file's units;
            or (X, Y, Z, T): T frames on that grid (e.g. the phases of a 4D-CT), written as
            one 4D file whose frame K ``read_volume(path, frame=K)`` reads back.
        meta: what ``read_volume`` (or ``new_volume_meta``) returned.
        dtype: ``"int16"`` (values rounded and clipped to the int16 range, no scaling) or
            ``"float32"``.
        phases, num_phases: for a 4D volume whose frames are breathing phases: the phase
            number of each frame and N, the phases of the whole cycle (default: frames
            0..T-1 of T). The 4th axis is labelled with them (:func:`label_phase_axis`).

    Returns:
        The path written.
    """
    path = Path(path)
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    if not is_nifti_path(path):
        raise ValueError(f"{path}: output name must end in .nii or .nii.gz")
    volume = np.asarray(volume)
    if volume.shape[:3] != meta.canonical_shape or volume.ndim not in (3, 4):
        raise ValueError(f"{path}: volume shape {volume.shape} differs from the grid's {meta.canonical_shape}")

    # NIfTI stores x fastest (Fortran order): in that layout nibabel writes the voxels without
    # another transposing copy. The element-wise steps below keep the layout.
    data = np.empty(meta.storage_shape + volume.shape[3:], dtype=dtype, order="F")
    for frame in range(data.shape[3] if data.ndim == 4 else 1):  # a frame at a time: one frame of scratch
        where = (..., frame) if data.ndim == 4 else ...
        stored = meta.to_storage(volume[where])
        if dtype == "int16":
            stored = np.rint(stored)  # a new array, so the caller's volume is left alone
            np.clip(stored, *_INT16_RANGE, out=stored)
        np.copyto(data[where], stored, casting="unsafe")

    image = _build_image(data, meta)
    if data.ndim == 4:
        frames = range(data.shape[3]) if phases is None else phases
        label_phase_axis(image.header, tuple(frames), data.shape[3] if num_phases is None else num_phases)
    compressed = path.name.lower().endswith(".nii.gz")
    with atomic_path(path, suffix=".nii.gz" if compressed else ".nii") as temporary:
        if compressed:
            _write_gzipped(image, temporary)
        else:
            nib.save(image, temporary)
    return path


def label_phase_axis(header, phases: tuple[int, ...], num_phases: int) -> None:
    """Label the 4th axis of a 4D header as breathing phases, frame k being phase ``phases[k]``.

    A phase is a position in a breathing cycle whose period in seconds nobody measured, so the
    time unit (``xyzt_units``) is left unknown rather than given as seconds:

    * ``descrip``: ``"breathing phases 0-9 of 10, frame k = k-th listed"``.
    * ``intent_name``: ``"breathing phase"``.
    * ``toffset`` and ``pixdim[4]``: the first phase number and the step between frames, so the
      4th coordinate of frame k is its phase number (phases not equally spaced: 0 and 1, the
      frame index, and ``descrip`` lists them).
    """
    steps = {b - a for a, b in pairwise(phases)}
    if len(steps) > 1:  # not equally spaced: the coordinate is the frame index
        first, step = 0, 1
    else:
        first, step = phases[0], steps.pop() if steps else 1
    header["toffset"] = first
    header["pixdim"][4] = step
    header.set_xyzt_units(xyz=header.get_xyzt_units()[0], t="unknown")
    header["descrip"] = describe_phases(phases, num_phases).encode()
    header["intent_name"] = b"breathing phase"


def describe_phases(phases: Sequence[int], num_phases: int) -> str:
    """``(0, 1, ..., 9), 10`` -> ``"breathing phases 0-9 of 10, frame k = k-th listed"`` (80 characters at most)."""
    runs: list[list[int]] = []
    for n in phases:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    listed = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    text = f"breathing phases {listed} of {num_phases}, frame k = k-th listed"
    return text if len(text) <= 80 else f"{len(phases)} of {num_phases} breathing phases, {phases[0]} to {phases[-1]}"


def _write_gzipped(image: nib.Nifti1Image, path: Path) -> None:
    """The bytes nibabel writes for a ``.nii`` (header, extensions, voxels) as one standard gzip
    stream, compressed by ISA-L at :data:`GZIP_LEVEL`. Like nibabel's own writer, the gzip
    header holds no file name and a zero time, so the same volume always gives the same file."""
    with (
        open(path, "wb") as file,
        igzip.IGzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=file, mtime=0) as stream,
    ):
        image.to_stream(stream)


def _build_image(data: np.ndarray, meta: VolumeMeta) -> nib.Nifti1Image:
    if meta.header is None:
        image = nib.Nifti1Image(data, meta.affine)
        image.set_qform(meta.affine, code="scanner")
        image.set_sform(meta.affine, code="scanner")
        image.header.set_xyzt_units(xyz="mm")
    else:
        header = meta.header.copy()
        # With affine=None nibabel keeps the header's qform/sform (and their codes) verbatim,
        # so the output overlays the input exactly; only shape and data type are updated.
        image = meta.image_class(data, None, header=header)
    image.header.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"] = 0
    image.header["cal_max"] = 0
    return image


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VolumeError(path, "file not found")
    if not path.is_file():
        raise VolumeError(path, "is not a regular file")
    if not is_nifti_path(path):
        raise VolumeError(path, "name does not end in .nii or .nii.gz")
    if path.stat().st_size == 0:
        raise VolumeError(path, "is empty (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise VolumeError(path, f"cannot be opened ({err.strerror or err})") from err


def _check_dtype(path: Path, header) -> None:
    dtype = header.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise VolumeError(path, f"stores {dtype} voxels; expected integer or floating-point intensities")


def _check_claimed_size(path: Path, header, shape: tuple[int, ...]) -> int:
    """Refuse a header that claims more voxel data than the file can hold, before allocating.

    Only checks that cost no decompression; :func:`_check_gzip_holds` does the rest.

    Returns:
        Bytes the file must hold (decompressed): the header's data offset plus the voxels.
    """
    n_voxels = int(np.prod(shape, dtype=np.float64))
    if n_voxels > MAX_VOXELS:
        raise VolumeError(path, f"header claims {n_voxels:,} voxels (shape {shape}), above the limit of {MAX_VOXELS:,}")
    offset = int(header.get_data_offset())
    needed = offset + n_voxels * header.get_data_dtype().itemsize
    size = path.stat().st_size
    if _is_gzip_name(path):
        if size * MAX_DEFLATE_RATIO < needed:
            raise VolumeError(
                path,
                f"is {size:,} bytes compressed, which holds at most {size * MAX_DEFLATE_RATIO:,} once decompressed, "
                f"but its header claims {needed:,} (shape {shape}): truncated, or a header that claims more voxels "
                "than the file holds",
            )
    elif size < needed:
        raise VolumeError(
            path,
            f"is {size:,} bytes but its header claims {needed:,} (shape {shape}): "
            "truncated, or a header that claims more voxels than the file holds",
        )
    return needed


def _check_gzip_holds(path: Path, needed: int, shape: tuple[int, ...]) -> None:
    """Refuse a ``.gz`` whose decompressed stream holds fewer than ``needed`` bytes.

    The gzip trailer proves the size at once for a whole, single-member file below 4 GiB
    (nibabel writes those). Otherwise (a claim of 4 GiB or more, which the trailer's 32-bit
    size cannot express; several members; a trailer that is not one, as in a truncated
    file) the stream is decompressed in bounded memory and counted, stopping at ``needed``.
    """
    if _gzip_trailer_proves(path, needed):
        return
    stored = _decompressed_size(path, stop_at=needed)
    if stored < needed:
        raise VolumeError(
            path,
            f"holds {stored:,} bytes once decompressed but its header claims {needed:,} "
            f"(shape {shape}): truncated, or a header that claims more voxels than the file holds",
        )


def _gzip_trailer_proves(path: Path, needed: int) -> bool:
    """True when the last 4 bytes, the last member's size modulo 2**32, show ``needed``
    bytes: a claim below 4 GiB, a size at least that, and one that the compressed size
    can hold (a truncated file ends in compressed data, not in a trailer)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b" or (size := f.seek(0, os.SEEK_END)) < 4:
            return False
        f.seek(-4, os.SEEK_END)
        trailer = struct.unpack("<I", f.read(4))[0]
    return needed < 2**32 and needed <= trailer <= size * MAX_DEFLATE_RATIO


def _decompressed_size(path: Path, stop_at: int) -> int:
    """Bytes the gzip file decompresses to, counted a MiB at a time; stops once ``stop_at``
    is reached. A damaged stream counts what was decoded before the damage."""
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while total < stop_at and (chunk := stream.read(1 << 20)):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass
    return total


def _is_gzip_name(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def decode_peak_bytes(shape: tuple[int, ...], dtype: np.dtype, scaled: bool) -> int:
    """Memory ``read_volume`` needs to decode voxels of ``shape`` stored as ``dtype``.

    The stored voxels (a ``.nii`` is memory-mapped, but counting them keeps the estimate
    safe for frames of 4D files and for filesystems that cannot be mapped), the float32
    result and, when ``scl_slope``/``scl_inter`` apply, two float64 slabs of scaling scratch.
    Measured peaks sit within 2% of it above the interpreter's own memory.
    """
    n_voxels = int(np.prod(shape, dtype=np.float64))
    scratch = 2 * 8 * min(n_voxels, SCALING_SLAB_VOXELS) if scaled else 0
    return n_voxels * (np.dtype(dtype).itemsize + 4) + scratch


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now without swapping, or None if unknown.

    ``MemAvailable`` from /proc/meminfo (Linux), else free physical pages
    (``os.sysconf``); :data:`AVAILABLE_MEMORY_BYTES` overrides both. A container's memory
    limit (cgroup) is not read: there the check is looser, never wrongly stricter.
    """
    if AVAILABLE_MEMORY_BYTES is not None:
        return AVAILABLE_MEMORY_BYTES
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(path: Path, header, spatial_shape: tuple[int, int, int], scaled: bool) -> None:
    """Refuse a volume whose decode would need more memory than is free, before allocating."""
    needed = decode_peak_bytes(spatial_shape, header.get_data_dtype(), scaled)
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise VolumeError(
            path,
            f"header claims shape {spatial_shape} of {header.get_data_dtype()} voxels: decoding needs "
            f"{needed:,} bytes ({needed / 2**30:.1f} GiB) of memory but {available:,} bytes "
            f"({available / 2**30:.1f} GiB) are available; a damaged header, or a volume too large for this "
            "machine (free memory or crop it)",
        )


def _select_frame(path: Path, shape: tuple[int, ...], frame: int | None) -> tuple[tuple[int, int, int], int | None]:
    """Spatial shape of the volume to read and, for 4D files, the frame index to take."""
    # Trailing singleton dimensions (a 4D file with one frame, a 5D file with one component)
    # describe a 3D volume.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise VolumeError(path, f"is a 2D image (shape {shape}); expected a 3D volume")
    if len(shape) > 4:
        raise VolumeError(path, f"has {len(shape)} dimensions (shape {shape}); expected a 3D volume")
    if len(shape) == 3:
        if frame not in (None, 0):
            raise VolumeError(path, f"is 3D (shape {shape}) and has no frame {frame}")
        return shape, None
    n_frames = shape[3]
    if frame is None:
        raise VolumeError(
            path,
            f"is 4D with {n_frames} frames (shape {shape}); expected a 3D volume",
            hint=f"choose one with --frame K (0..{n_frames - 1})",
        )
    if not 0 <= frame < n_frames:
        raise VolumeError(path, f"has frames 0..{n_frames - 1}; --frame {frame} is out of range")
    return shape[:3], frame


@contextmanager
def _nibabel_messages_to_debug(path: Path):
    """Route nibabel's header auto-fix notes ("sform_code 120 not valid; setting to 0"),
    which it prints straight to stderr, to this module's debug log instead."""
    nibabel_logger = logging.getLogger("nibabel.global")
    saved = nibabel_logger.handlers[:]
    forward = _ForwardHandler(path)
    for handler in saved:
        nibabel_logger.removeHandler(handler)
    nibabel_logger.addHandler(forward)
    try:
        yield
    finally:
        nibabel_logger.removeHandler(forward)
        for handler in saved:
            nibabel_logger.addHandler(handler)


class _ForwardHandler(logging.Handler):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        logger.debug("%s: nibabel: %s", self.path, record.getMessage())


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    name = type(err).__name__
    if isinstance(err, gzip.BadGzipFile | EOFError) and not text:
        text = "truncated or corrupt gzip stream"
    return f"{name}: {text}" if text else name
