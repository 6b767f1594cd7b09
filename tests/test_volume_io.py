"""data/volume_io.py: canonical (X, Y, Z) arrays in, the source grid back out, VolumeError for anything else."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import tracemalloc
import zlib
from datetime import timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data import volume_io
from data.volume_io import VolumeError, new_volume_meta, read_volume, write_volume

REPO = Path(__file__).resolve().parents[1]
SHAPE = (6, 5, 4)  # canonical (X, Y, Z); all different, so a swapped axis shows

# Storage affines (voxel -> RAS mm). Each stores the same canonical volume differently.
STORAGE_AFFINES = {
    "RAS": np.diag([2.0, 3.0, 4.0, 1.0]),
    "LPS (DICOM-like)": np.diag([-2.0, -3.0, 4.0, 1.0]),
    "SRA (sagittal stack)": np.array([[0, 0, 2.0, 0], [0, 3.0, 0, 0], [4.0, 0, 0, 0], [0, 0, 0, 1]]),
    "ILP": np.array([[0, -2.0, 0, 0], [0, 0, -3.0, 0], [-4.0, 0, 0, 0], [0, 0, 0, 1]]),
}


def coordinate_volume(shape=SHAPE) -> np.ndarray:
    """value = 100 x + 10 y + z at canonical voxel (x, y, z): any misplaced voxel shows."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (100 * x + 10 * y + z).astype(np.float32)


def storage_meta(affine: np.ndarray, canonical_shape=SHAPE):
    """A meta whose canonical shape is ``canonical_shape`` under ``affine``."""
    probe = new_volume_meta(affine, (1, 2, 3))
    axes = probe._to_canonical[:, 0].astype(int)  # canonical axis of each storage axis
    return new_volume_meta(affine, tuple(canonical_shape[a] for a in axes))


def nifti_bytes(data: np.ndarray, affine=None) -> bytes:
    """A single-file NIfTI-1 image as bytes."""
    return nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine).to_bytes()


# -- the contract --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STORAGE_AFFINES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_any_storage_order_reads_as_canonical_ras(tmp_path, name, suffix):
    volume = coordinate_volume()
    meta = storage_meta(STORAGE_AFFINES[name])
    path = write_volume(tmp_path / f"v{suffix}", volume, meta)

    read, read_meta = read_volume(path)

    assert read.dtype == np.float32 and read.shape == SHAPE
    np.testing.assert_array_equal(read, volume)
    # The canonical affine maps canonical indices to the same world points as the storage one.
    assert read_meta.canonical_shape == SHAPE
    assert read_meta.spacing_mm == pytest.approx((2.0, 3.0, 4.0))
    # Canonical axis i runs along world axis i, in the + direction (R, A, S).
    directions = read_meta.canonical_affine[:3, :3]
    assert np.all(np.argmax(np.abs(directions), axis=0) == [0, 1, 2]) and np.all(np.diag(directions) > 0)
    # Canonical voxel (1, 2, 3) is the stored voxel at the same world point.
    world = read_meta.canonical_affine @ [1, 2, 3, 1]
    storage_index = np.rint(np.linalg.solve(read_meta.affine, world)[:3]).astype(int)
    assert np.asarray(nib.load(path).dataobj)[tuple(storage_index)] == volume[1, 2, 3]


@pytest.mark.parametrize("name", sorted(STORAGE_AFFINES))
def test_round_trip_keeps_the_source_grid(tmp_path, name):
    source = write_volume(tmp_path / "in.nii.gz", coordinate_volume(), storage_meta(STORAGE_AFFINES[name]))
    volume, meta = read_volume(source)

    out = write_volume(tmp_path / "out.nii.gz", volume + 1, meta)

    before, after = nib.load(source), nib.load(out)
    assert after.shape == before.shape
    np.testing.assert_array_equal(after.affine, before.affine)
    np.testing.assert_array_equal(np.asarray(after.dataobj), np.asarray(before.dataobj) + 1)
    assert int(after.header["qform_code"]) == int(before.header["qform_code"])
    assert int(after.header["sform_code"]) == int(before.header["sform_code"])
    again, _ = read_volume(out)
    np.testing.assert_array_equal(again, volume + 1)


def test_axial_slices_are_contiguous_blocks(tmp_path):
    path = write_volume(tmp_path / "v.nii", coordinate_volume(), storage_meta(STORAGE_AFFINES["LPS (DICOM-like)"]))
    volume, _ = read_volume(path)
    assert all(s > 0 for s in volume.strides)
    assert volume[:, :, 2].flags.f_contiguous  # one block per axial slice, as NIfTI stores it


def test_scaling_is_applied(tmp_path):
    image = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4) + 10, np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii")
    volume, _ = read_volume(tmp_path / "scaled.nii")
    assert volume.min() == 10 * 2 - 1024 and volume.max() == 33 * 2 - 1024


def test_int16_output_rounds_and_clips(tmp_path):
    meta = new_volume_meta(np.eye(4), (2, 2, 2))
    values = np.array([1.4, 1.6, -1e6, 1e6, 0, 0, 0, 0], dtype=np.float32).reshape(2, 2, 2)
    volume, _ = read_volume(write_volume(tmp_path / "v.nii", values, meta, dtype="int16"))
    assert volume.ravel()[:4].tolist() == [1, 2, -32768, 32767]


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz"])
def test_write_is_atomic(name, tmp_path, monkeypatch):
    meta = new_volume_meta(np.eye(4), SHAPE)

    def write_half_then_fail(image, file_map=None, dtype=None):
        with (file_map or image.file_map)["image"].get_prepare_fileobj(mode="wb") as file:
            file.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_volume(tmp_path / name, coordinate_volume(), meta)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_gz_output_is_the_nii_nibabel_writes_in_one_plain_gzip_stream(tmp_path, dtype):
    """What every NIfTI reader decodes: one gzip member whose content is, byte for byte, the
    .nii nibabel writes (header and voxels as before the faster compressor), without a file
    name and with a zero time in the gzip header, so the same volume always gives the same file."""
    source = tmp_path / "source.nii"
    image = nib.Nifti2Image(coordinate_volume().astype(np.int16), STORAGE_AFFINES["LPS (DICOM-like)"])
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=4)
    nib.save(image, source)
    volume, meta = read_volume(source)
    volume += 0.4  # rounded away again in int16

    compressed = write_volume(tmp_path / "out.nii.gz", volume, meta, dtype=dtype).read_bytes()
    plain = write_volume(tmp_path / "out.nii", volume, meta, dtype=dtype).read_bytes()  # nib.save's bytes

    stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # a gzip stream, as zlib-based readers take it
    assert stream.decompress(compressed) == plain
    assert stream.eof and stream.unused_data == b""  # one member, nothing after it
    flags, mtime = compressed[3], compressed[4:8]
    assert flags == 0 and mtime == b"\0\0\0\0"  # no name, no time
    assert write_volume(tmp_path / "again.nii.gz", volume, meta, dtype=dtype).read_bytes() == compressed
    loaded = nib.load(tmp_path / "out.nii.gz")
    assert loaded.header.binaryblock == nib.load(tmp_path / "out.nii").header.binaryblock
    expected = np.rint(volume) if dtype == "int16" else volume
    np.testing.assert_array_equal(read_volume(tmp_path / "out.nii.gz")[0], expected)


def test_writer_refuses_a_volume_of_another_shape(tmp_path):
    with pytest.raises(ValueError, match="differs from the grid"):
        write_volume(tmp_path / "v.nii", np.zeros((2, 2, 2)), new_volume_meta(np.eye(4), SHAPE))


def test_4d_single_frame_reads_as_3d_and_frames_are_chosen(tmp_path):
    nib.save(nib.Nifti1Image(coordinate_volume()[..., None], np.eye(4)), tmp_path / "one.nii")
    assert read_volume(tmp_path / "one.nii")[0].shape == SHAPE

    frames = np.stack([coordinate_volume() + 1000 * t for t in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(frames, np.eye(4)), tmp_path / "three.nii")
    with pytest.raises(VolumeError, match="4D with 3 frames"):
        read_volume(tmp_path / "three.nii")
    np.testing.assert_array_equal(read_volume(tmp_path / "three.nii", frame=2)[0], coordinate_volume() + 2000)
    with pytest.raises(VolumeError, match="out of range"):
        read_volume(tmp_path / "three.nii", frame=3)


# -- failures are VolumeError, naming the file --------------------------------------------
def test_multi_member_gzip_is_not_mistaken_for_a_truncated_file(tmp_path):
    # Some tools (bgzip, parallel compressors) write several gzip members; the trailer's
    # size field then describes the last member only.
    raw = nifti_bytes(coordinate_volume())
    cut = len(raw) // 2
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
    np.testing.assert_array_equal(read_volume(tmp_path / "multi.nii.gz")[0], coordinate_volume())


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_claiming_more_voxels_than_the_file_holds(tmp_path, suffix):
    raw = bytearray(nifti_bytes(coordinate_volume()))
    struct.pack_into("<h", raw, 46, 400)  # dim[3]: 4 -> 400 slices
    path = tmp_path / f"big{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    with pytest.raises(VolumeError, match="claims") as caught:
        read_volume(path)
    assert str(caught.value).startswith(str(path))


def test_nearly_parallel_axes_are_refused(tmp_path):
    # Not singular (det 10), but axes 0 and 1 both point along x: no orientation for axis 1.
    affine = np.array([[1e6, 1e6, 0, 0], [0, 1e-11, 0, 0], [0, 0, 1e6, 0], [0, 0, 0, 1]])
    (tmp_path / "skew.nii").write_bytes(nifti_bytes(coordinate_volume(), affine))
    with pytest.raises(VolumeError, match="orientation"):
        read_volume(tmp_path / "skew.nii")


def test_nibabel_header_fixes_do_not_reach_stderr(tmp_path):
    # nibabel prints its header fixes to stderr from a handler of its own; a script's stderr
    # must carry only its errors (train.py: one line per fatal error).
    raw = bytearray(nifti_bytes(coordinate_volume()))
    struct.pack_into("<h", raw, 254, 123)  # sform_code 123: nibabel resets it and says so
    (tmp_path / "odd.nii").write_bytes(bytes(raw))
    code = "import sys; from data.volume_io import read_volume; read_volume(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "odd.nii")], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0 and done.stderr == ""


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty"),
        (b"hello, not an image\n" * 40, "cannot be read as NIfTI"),
        (gzip.compress(b"\x00" * 500), "cannot be read as NIfTI"),
    ],
)
def test_unreadable_content(tmp_path, content, problem):
    path = tmp_path / "bad.nii"
    path.write_bytes(content)
    with pytest.raises(VolumeError, match=problem):
        read_volume(path)


@pytest.mark.parametrize(
    ("name", "problem"),
    [("missing.nii", "not found"), ("volume.mha", "does not end in"), ("folder.nii", "not a regular")],
)
def test_wrong_paths(tmp_path, name, problem):
    (tmp_path / "volume.mha").write_bytes(b"x")
    (tmp_path / "folder.nii").mkdir()
    with pytest.raises(VolumeError, match=problem):
        read_volume(tmp_path / name)


# -- property: any bytes either load or raise VolumeError ---------------------------------
BASE = nifti_bytes(coordinate_volume().astype(np.int16))
# (offset, struct format) of the NIfTI-1 header fields that decide how the data is read.
HEADER_FIELDS = {
    "sizeof_hdr": (0, "<i"), "dim0": (40, "<h"), "dim1": (42, "<h"), "dim2": (44, "<h"), "dim3": (46, "<h"),
    "dim4": (48, "<h"), "dim5": (50, "<h"), "datatype": (70, "<h"), "bitpix": (72, "<h"),
    "pixdim1": (80, "<f"), "pixdim3": (88, "<f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"), "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern_b": (256, "<f"),
    "srow_x0": (280, "<f"), "srow_z2": (320, "<f"),
}  # fmt: skip
INTERESTING_INTS = st.sampled_from([-32768, -1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 64, 128, 256, 512, 768, 1024, 2048, 32767])
INTERESTING_FLOATS = st.sampled_from(
    [0.0, -1.0, 1e-30, 1.0, 352.0, 353.0, 1e6, 3.4e38, float("nan"), float("inf"), float("-inf")]
)


@st.composite
def damaged_nifti(draw) -> tuple[bytes, str]:
    raw = bytearray(BASE)
    for field in draw(st.lists(st.sampled_from(sorted(HEADER_FIELDS)), max_size=4)):
        offset, fmt = HEADER_FIELDS[field]
        value = draw(INTERESTING_FLOATS if fmt == "<f" else INTERESTING_INTS)
        struct.pack_into(fmt, raw, offset, value)
    for offset, value in draw(st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), max_size=6)):
        raw[offset] = value
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    suffix = draw(st.sampled_from([".nii", ".nii.gz"]))
    return (gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw)), suffix


@settings(
    max_examples=200, deadline=timedelta(seconds=5), derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(case=st.one_of(damaged_nifti(), st.tuples(st.binary(max_size=1200), st.sampled_from([".nii", ".nii.gz"]))))
def test_damaged_files_load_or_raise_volume_error(tmp_path, case):
    content, suffix = case
    path = tmp_path / f"case{suffix}"
    path.write_bytes(content)
    try:
        volume, meta = read_volume(path)
    except VolumeError as err:
        assert str(err).startswith(str(path))
    else:
        assert volume.ndim == 3 and volume.dtype == np.float32
        assert volume.shape == meta.canonical_shape


# -- memory: a header's claims are checked before anything is allocated for them -----------
def claiming_header(shape: tuple[int, int, int], dtype=np.int16) -> bytes:
    """A NIfTI-1 header (and 4 voxels) whose dim fields claim ``shape``."""
    raw = bytearray(nifti_bytes(np.zeros((2, 2, 1), dtype)))
    struct.pack_into("<hhhh", raw, 40, 3, *shape)
    return bytes(raw)


def traced_peak(function) -> int:
    """Peak bytes Python and numpy allocated while ``function`` ran."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_small_gz_claiming_2_to_the_31_voxels_is_refused_without_allocating(tmp_path):
    # 1.3 KB that claims 4 GiB of int16: before, nibabel allocated the 4 GiB, then failed.
    path = tmp_path / "huge_claim.nii.gz"
    path.write_bytes(gzip.compress(claiming_header((2048, 2048, 512)) + np.random.default_rng(0).bytes(1200)))

    def read():
        with pytest.raises(VolumeError, match=r"claims 4,294,967,296 \(shape \(2048, 2048, 512\)\)") as caught:
            read_volume(path)
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)

    assert traced_peak(read) < 4 << 20


def test_a_gz_claim_beyond_4_gib_is_counted_in_bounded_memory(tmp_path, monkeypatch):
    # 5 MB of incompressible bytes could, as far as the compressed size tells, hold 4 GiB; the
    # trailer's 32-bit size cannot tell either: the stream is decompressed and counted.
    monkeypatch.setattr(volume_io, "AVAILABLE_MEMORY_BYTES", 2**40)  # so the memory check lets it through
    path = tmp_path / "huge_claim.nii.gz"
    path.write_bytes(gzip.compress(claiming_header((2048, 2048, 512)) + np.random.default_rng(0).bytes(5 << 20), 1))

    def read():
        with pytest.raises(VolumeError, match=r"holds 5,243,\d+ bytes once decompressed but its header claims"):
            read_volume(path)

    assert traced_peak(read) < 8 << 20


def test_counting_stops_once_the_claim_is_met(tmp_path):
    path = tmp_path / "zeros.gz"
    path.write_bytes(gzip.compress(b"\x00" * (8 << 20)))
    assert volume_io._decompressed_size(path, stop_at=1 << 20) == 1 << 20  # a MiB at a time: stops at the first
    assert volume_io._decompressed_size(path, stop_at=1 << 40) == 8 << 20


def test_a_whole_gz_is_proven_by_its_trailer_without_decompressing(tmp_path, monkeypatch):
    path = write_volume(tmp_path / "v.nii.gz", coordinate_volume(), storage_meta(STORAGE_AFFINES["RAS"]))

    def no_counting(*args, **kwargs):
        raise AssertionError("decompressed only to count its bytes")

    monkeypatch.setattr(volume_io, "_decompressed_size", no_counting)
    np.testing.assert_array_equal(read_volume(path)[0], coordinate_volume())


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_decode_larger_than_free_memory_is_refused_before_allocating(tmp_path, monkeypatch, suffix):
    volume = np.random.default_rng(0).integers(-1000, 1000, size=(64, 64, 32)).astype(np.float32)
    path = write_volume(tmp_path / f"v{suffix}", volume, storage_meta(STORAGE_AFFINES["RAS"], volume.shape))
    needed = volume_io.decode_peak_bytes((64, 64, 32), np.dtype(np.int16), scaled=False)
    assert needed == 64 * 64 * 32 * (2 + 4)  # int16 as stored + float32 out
    monkeypatch.setattr(volume_io, "AVAILABLE_MEMORY_BYTES", needed - 1)

    def read():
        with pytest.raises(VolumeError) as caught:
            read_volume(path)
        assert str(caught.value) == (
            f"{path}: header claims shape (64, 64, 32) of int16 voxels: decoding needs {needed:,} bytes (0.0 GiB) "
            f"of memory but {needed - 1:,} bytes (0.0 GiB) are available; a damaged header, or a volume too large "
            "for this machine (free memory or crop it)"
        )

    assert traced_peak(read) < needed // 4
    monkeypatch.setattr(volume_io, "AVAILABLE_MEMORY_BYTES", needed)
    np.testing.assert_array_equal(read_volume(path)[0], volume)


def test_available_memory_comes_from_the_system_unless_overridden(monkeypatch):
    available = volume_io.available_memory_bytes()
    assert available is None or available > 0
    monkeypatch.setattr(volume_io, "AVAILABLE_MEMORY_BYTES", 12345)
    assert volume_io.available_memory_bytes() == 12345


def scaled_file(path: Path, data: np.ndarray, slope: float, inter: float) -> Path:
    image = nib.Nifti1Image(data, np.diag([-2.0, -3.0, 4.0, 1.0]), dtype=data.dtype)
    image.header.set_slope_inter(slope, inter)
    nib.save(image, path)
    assert (nib.load(path).dataobj.slope, nib.load(path).dataobj.inter) == (np.float32(slope), np.float32(inter))
    return path


@pytest.mark.parametrize(
    ("dtype", "slope", "inter"),
    [("uint8", 5.0, -1000.0), ("int16", 1.0, -1024.0), ("uint16", 0.5, -1024.0), ("int32", 0.37, 12.5),
     ("float32", 2.0, 0.0), ("int16", 1.0, 0.0)],
)  # fmt: skip
def test_scaled_values_are_nibabels_in_float32_a_slab_at_a_time(tmp_path, monkeypatch, dtype, slope, inter):
    monkeypatch.setattr(volume_io, "SCALING_SLAB_VOXELS", 7 * 5 * 2)  # slabs of 2 planes, the last one short
    info = np.iinfo(dtype) if dtype != "float32" else None
    rng = np.random.default_rng(1)
    data = (
        rng.integers(info.min, info.max, size=(7, 5, 9), endpoint=True, dtype=dtype)
        if info
        else rng.normal(0, 1000, size=(7, 5, 9)).astype(dtype)
    )
    path = scaled_file(tmp_path / "scaled.nii.gz", data, slope, inter)
    volume, meta = read_volume(path)
    # nibabel scales the whole volume in float64; the float32 result is the same to the bit.
    np.testing.assert_array_equal(volume, meta.to_canonical(nib.load(path).get_fdata()).astype(np.float32))
    assert volume[:, :, 0].flags.f_contiguous


def test_scaling_needs_no_float64_copy_of_the_volume(tmp_path, monkeypatch):
    monkeypatch.setattr(volume_io, "SCALING_SLAB_VOXELS", 128 * 128 * 4)
    data = np.random.default_rng(0).integers(0, 4096, size=(128, 128, 64)).astype(np.uint16)
    path = scaled_file(tmp_path / "scaled.nii.gz", data, 1.0, -1024.0)
    estimate = volume_io.decode_peak_bytes(data.shape, data.dtype, scaled=True)
    assert estimate == data.size * (2 + 4) + 2 * 8 * 128 * 128 * 4
    peak = traced_peak(lambda: read_volume(path))
    # nibabel's own scaled read held a float64 copy of the volume beside the float32 one (12.6 MB)
    assert peak < data.size * 8 and abs(peak - estimate) < 0.1 * estimate
