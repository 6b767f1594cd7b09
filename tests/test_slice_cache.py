"""data/slice_cache.py: decoded once, reused while file and settings are unchanged, never read half-built."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data.slice_cache as slice_cache
from data.slice_cache import ENTRY_FILE, SLICES_FILE, SliceReader, SliceSettings, cached_volume
from data.volume_io import VolumeError, new_volume_meta, write_volume

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 6)
SETTINGS = SliceSettings(resize_to=16)


def write(path: Path, seed: int, shape=SHAPE) -> Path:
    volume = np.random.default_rng(seed).uniform(-1000, 1000, size=shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_volume(path, volume, new_volume_meta(np.diag([-2.0, -2.0, 3.0, 1.0]), shape))


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Names of the files decoded, in order."""
    names = []
    original = slice_cache.read_volume

    def counting(path, *args, **kwargs):
        names.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(slice_cache, "read_volume", counting)
    return names


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def test_entry_is_a_float16_memory_map_with_its_description(tmp_path):
    source = write(tmp_path / "trainA" / "p.nii.gz", 0)
    entry, built = cached_volume(source, SETTINGS, tmp_path / "cache")
    assert built
    slices = entry.open_slices()
    assert isinstance(slices, np.memmap) and slices.dtype == np.float16 and slices.shape == (6, 16, 16)
    assert -1 <= slices.min() and slices.max() <= 1
    assert entry.folder.name.startswith("trainA_p-")
    description = json.loads((entry.folder / ENTRY_FILE).read_text())
    assert description["source"] == str(source.resolve()) and description["n_slices"] == 6


def test_reader_reads_runs_of_slices_with_few_open_files(tmp_path):
    entries_ = [cached_volume(write(tmp_path / f"p{i}.nii.gz", i), SETTINGS, tmp_path / "cache")[0] for i in range(3)]
    reader = SliceReader(max_open=2)
    for entry in entries_ * 2:
        np.testing.assert_array_equal(reader.read(entry, 2, 3), entry.open_slices()[2:5])
        assert len(reader._files) <= 2
    block = reader.read(entries_[0], 5, 1)
    assert block.shape == (1, 16, 16) and block.flags.writeable  # a fresh array, not a view of the file
    with pytest.raises(OSError, match="cut short"):
        reader.read(entries_[0], 5, 2)  # past the last slice
    reader.close()
    assert reader._files == {}


def test_later_runs_reuse_the_entry(tmp_path, reads):
    source = write(tmp_path / "p.nii.gz", 0)
    first, built_first = cached_volume(source, SETTINGS, tmp_path / "cache")
    second, built_second = cached_volume(source, SETTINGS, tmp_path / "cache")
    assert (built_first, built_second) == (True, False) and reads == ["p.nii.gz"]
    assert second.folder == first.folder


def test_a_changed_file_rebuilds_only_its_entry(tmp_path, reads):
    sources = [write(tmp_path / f"p{i}.nii.gz", i) for i in range(3)]
    before = {s.name: cached_volume(s, SETTINGS, tmp_path / "cache")[0] for s in sources}
    reads.clear()
    write(sources[1], seed=99)  # new content: new size and mtime
    os.utime(sources[1], ns=(time.time_ns(), time.time_ns() + 10**9))  # make sure, on coarse clocks

    after = {s.name: cached_volume(s, SETTINGS, tmp_path / "cache")[0] for s in sources}
    assert reads == ["p1.nii.gz"]
    assert after["p0.nii.gz"].folder == before["p0.nii.gz"].folder
    assert after["p1.nii.gz"].folder != before["p1.nii.gz"].folder
    assert not np.array_equal(after["p1.nii.gz"].open_slices(), before["p1.nii.gz"].open_slices())


@pytest.mark.parametrize(
    ("change", "rebuilds"),
    [
        ({"resize_to": 32}, True),
        ({"slice_axis": "coronal"}, True),
        ({"intensity": "hu"}, True),
        ({"hu_min": -500.0}, False),  # the fixed window plays no part with --intensity volume
    ],
)
def test_settings_that_change_slices_rebuild(tmp_path, reads, change, rebuilds):
    source = write(tmp_path / "p.nii.gz", 0)
    cached_volume(source, SETTINGS, tmp_path / "cache")
    _, built = cached_volume(source, SliceSettings(**{**SETTINGS.__dict__, **change}), tmp_path / "cache")
    assert built == rebuilds and len(reads) == 1 + rebuilds


def test_hu_window_is_part_of_the_key_under_intensity_hu(tmp_path):
    source = write(tmp_path / "p.nii.gz", 0)
    hu = SliceSettings(resize_to=16, intensity="hu")
    cached_volume(source, hu, tmp_path / "cache")
    assert cached_volume(source, SliceSettings(resize_to=16, intensity="hu", hu_max=2000.0), tmp_path / "cache")[1]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "entry.json missing (killed before the description)": lambda e: (e / ENTRY_FILE).unlink(),
    "entry.json not JSON": lambda e: (e / ENTRY_FILE).write_text('{"format": 1, "n_sli'),
    "entry.json of another format": lambda e: (e / ENTRY_FILE).write_text(
        json.dumps({**json.loads((e / ENTRY_FILE).read_text()), "format": 0})
    ),
    "entry.json flags of the wrong length": lambda e: (e / ENTRY_FILE).write_text(
        json.dumps({**json.loads((e / ENTRY_FILE).read_text()), "finite": [True]})
    ),
    "slices.npy missing": lambda e: (e / SLICES_FILE).unlink(),
    "slices.npy truncated": lambda e: _truncate(e / SLICES_FILE),
    "slices.npy cut after its header": lambda e: (e / SLICES_FILE).write_bytes((e / SLICES_FILE).read_bytes()[:128]),
    "slices.npy header garbage": lambda e: (e / SLICES_FILE).write_bytes(b"\x00" * 4096),
    "slices.npy of another shape": lambda e: np.save(e / SLICES_FILE, np.zeros((6, 8, 8), np.float16)),
    "slices.npy of another dtype": lambda e: np.save(e / SLICES_FILE, np.zeros((6, 16, 16), np.float32)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_entry_is_rebuilt_never_read(tmp_path, reads, caplog, damage):
    source = write(tmp_path / "p.nii.gz", 0)
    entry, _ = cached_volume(source, SETTINGS, tmp_path / "cache")
    good = np.array(entry.open_slices())
    DAMAGE[damage](entry.folder)

    with caplog.at_level(logging.WARNING):
        rebuilt, built = cached_volume(source, SETTINGS, tmp_path / "cache")
    assert built and reads == ["p.nii.gz", "p.nii.gz"]
    assert "damaged or incomplete" in caplog.text and "p.nii.gz" in caplog.text
    np.testing.assert_array_equal(rebuilt.open_slices(), good)


def test_an_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    source = write(tmp_path / "p.nii.gz", 0)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = slice_cache.resize_slices
    monkeypatch.setattr(slice_cache, "BUILD_CHUNK", 2)
    monkeypatch.setattr(slice_cache, "resize_slices", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached_volume(source, SETTINGS, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(slice_cache, "resize_slices", original)
    assert cached_volume(source, SETTINGS, tmp_path / "cache")[1]


KILLED_BUILD = """
import sys, time
import data.slice_cache as sc
from pathlib import Path
original = sc.resize_slices
def slow(*args, **kwargs):
    print("building", flush=True)
    time.sleep(60)
sc.resize_slices = slow
sc.cached_volume(Path(sys.argv[1]), sc.SliceSettings(resize_to=16), Path(sys.argv[2]))
"""


def test_a_build_killed_by_a_signal_is_cleaned_up_and_redone(tmp_path, reads):
    source = write(tmp_path / "p.nii.gz", 0)
    cache = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(source), str(cache)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "building"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (partial,) = cache.iterdir()  # what the killed run left: a partial folder, no entry
    assert slice_cache.PARTIAL_MARK in partial.name

    entry, built = cached_volume(source, SETTINGS, cache)
    assert built and reads == ["p.nii.gz"]
    assert entries(cache) == [entry.folder]  # the abandoned partial build is gone


def test_a_partial_build_of_a_live_process_is_left_alone(tmp_path):
    source = write(tmp_path / "p.nii.gz", 0)
    entry, _ = cached_volume(source, SETTINGS, tmp_path / "cache")
    live = entry.folder.with_name(f"{entry.folder.name}{slice_cache.PARTIAL_MARK}{socket.gethostname()}-{os.getppid()}")
    live.mkdir()
    for file in (entry.folder / ENTRY_FILE, entry.folder / SLICES_FILE):
        file.unlink()  # force a rebuild of the entry
    cached_volume(source, SETTINGS, tmp_path / "cache")
    assert live.is_dir()


def test_a_failed_build_leaves_no_entry(tmp_path):
    source = tmp_path / "constant.nii.gz"
    write_volume(source, np.full(SHAPE, 7.0, np.float32), new_volume_meta(np.eye(4), SHAPE))
    with pytest.raises(VolumeError, match="constant"):
        cached_volume(source, SETTINGS, tmp_path / "cache")
    hu = SliceSettings(resize_to=16, intensity="hu")
    with pytest.raises(VolumeError, match="no usable slice"):
        cached_volume(source, hu, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
