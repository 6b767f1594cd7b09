"""data/slice_cache.py: decoded once, reused while file and settings are unchanged, never read half-built."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data.slice_cache as slice_cache
from data.base_dataset import CacheError, DatasetError
from data.slice_cache import (
    ENTRY_FILE,
    SLICES_FILE,
    SliceReader,
    SliceSettings,
    SourceIdentities,
    cached_volume,
    prune_stale_entries,
    source_identity,
)
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


# -- a cache that cannot be written: one line naming it, nothing left behind ----------------
def disk_full(*args) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def cannot_reserve(*args) -> None:
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


class FillingFile:
    """A file being written on a disk with ``room`` bytes left."""

    def __init__(self, file, room: int):
        self._file, self._room = file, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def disk_with_room(monkeypatch, room: int) -> None:
    """Writes of slices.npy fail once ``room`` bytes are written (space cannot be reserved ahead)."""
    monkeypatch.setattr(os, "posix_fallocate", cannot_reserve, raising=False)

    def opening(file, mode="r", *args, **kwargs):
        opened = builtins.open(file, mode, *args, **kwargs)
        return FillingFile(opened, room) if Path(file).name == SLICES_FILE else opened

    monkeypatch.setattr(slice_cache, "open", opening, raising=False)


def assert_nothing_left(cache: Path) -> None:
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_a_full_disk_is_found_when_space_is_reserved(tmp_path, monkeypatch):
    source = write(tmp_path / "p.nii.gz", 0)
    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    with pytest.raises(CacheError) as caught:
        cached_volume(source, SETTINGS, tmp_path / "cache")
    assert str(caught.value) == (
        f"{tmp_path / 'cache'}: no space left on device while caching {source.resolve()}; "
        "free space or point --cache_dir elsewhere"
    )
    assert isinstance(caught.value, DatasetError)  # what the scripts report in one line
    assert_nothing_left(tmp_path / "cache")


def test_a_full_disk_while_writing_is_an_error_not_a_crash(tmp_path, monkeypatch):
    # Where space cannot be reserved, the disk fills halfway: before, slices went through a
    # memory map into a sparse file, and the process died of SIGBUS.
    source = write(tmp_path / "p.nii.gz", 0)
    disk_with_room(monkeypatch, room=3000)  # the header and one chunk of 2 slices
    monkeypatch.setattr(slice_cache, "BUILD_CHUNK", 2)
    with pytest.raises(CacheError, match="no space left on device while caching"):
        cached_volume(source, SETTINGS, tmp_path / "cache")
    assert_nothing_left(tmp_path / "cache")


def test_a_filesystem_that_cannot_reserve_space_is_written_all_the_same(tmp_path, monkeypatch):
    source = write(tmp_path / "p.nii.gz", 0)
    reference = np.array(cached_volume(source, SETTINGS, tmp_path / "reference")[0].open_slices())
    monkeypatch.setattr(os, "posix_fallocate", cannot_reserve, raising=False)
    entry, built = cached_volume(source, SETTINGS, tmp_path / "cache")
    assert built
    np.testing.assert_array_equal(entry.open_slices(), reference)


def test_a_cache_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch):
    """A read-only --cache_dir. Root writes anywhere, so there the denial is simulated."""
    source = write(tmp_path / "p.nii.gz", 0)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions are not enforced
            original = os.mkdir

            def denying_mkdir(path, *args, **kwargs):
                if Path(path).is_relative_to(locked):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return original(path, *args, **kwargs)

            monkeypatch.setattr(os, "mkdir", denying_mkdir)
        with pytest.raises(CacheError) as caught:
            cached_volume(source, SETTINGS, locked / "cache")
    finally:
        locked.chmod(0o755)
    assert str(caught.value) == (
        f"{locked / 'cache'}: permission denied while caching {source.resolve()}; "
        "make it writable or point --cache_dir elsewhere"
    )
    assert_nothing_left(locked / "cache")


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


INTERRUPTED_WHILE = {
    "reserving space": lambda patch: patch.setattr(os, "posix_fallocate", interrupt, raising=False),
    "writing slices": lambda patch: patch.setattr(slice_cache, "pixels_to_network", interrupt),
    "writing the description": lambda patch: patch.setattr(slice_cache, "_write_description", interrupt),
}


@pytest.mark.parametrize("stage", sorted(INTERRUPTED_WHILE))
def test_ctrl_c_at_any_stage_of_a_build_leaves_nothing_behind(tmp_path, monkeypatch, stage):
    source = write(tmp_path / "p.nii.gz", 0)
    with monkeypatch.context() as patch:
        INTERRUPTED_WHILE[stage](patch)
        with pytest.raises(KeyboardInterrupt):
            cached_volume(source, SETTINGS, tmp_path / "cache")
    assert_nothing_left(tmp_path / "cache")
    assert cached_volume(source, SETTINGS, tmp_path / "cache")[1]


def test_a_cache_removed_while_a_run_reads_it_is_one_clear_error(tmp_path):
    entry, _ = cached_volume(write(tmp_path / "p.nii.gz", 0), SETTINGS, tmp_path / "cache")
    reader = SliceReader()
    shutil.rmtree(tmp_path / "cache")  # rm -rf ./cache in another terminal
    with pytest.raises(CacheError) as caught:
        reader.read(entry, 0, 2)
    assert str(caught.value) == (
        f"{entry.folder / SLICES_FILE}: not found: the slice cache was removed while this run was reading it; "
        "run again to rebuild it"
    )


# -- the key: a file rewritten in place is never served from its old entry ------------------
def rewrite_keeping_size_and_mtime(path: Path, seed: int) -> None:
    before = path.stat()
    write(path, seed)  # .nii: same shape and dtype, same size; new content
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_rewrite_with_the_old_size_and_mtime_is_rebuilt(tmp_path, reads):
    source = write(tmp_path / "p.nii", 0)
    old, _ = cached_volume(source, SETTINGS, tmp_path / "cache")
    old_slices = np.array(old.open_slices())
    rewrite_keeping_size_and_mtime(source, seed=1)

    new, built = cached_volume(source, SETTINGS, tmp_path / "cache")
    assert built and reads == ["p.nii", "p.nii"] and new.folder != old.folder
    assert not np.array_equal(new.open_slices(), old_slices)


def test_the_sampled_blocks_tell_apart_files_that_stat_cannot(tmp_path):
    # On filesystems with coarse times the change time may not move: the content still does.
    source = write(tmp_path / "p.nii", 0)
    before = source_identity(source)
    rewrite_keeping_size_and_mtime(source, seed=1)
    after = source_identity(source)
    assert {k: after[k] for k in ("path", "size", "mtime_ns")} == {k: before[k] for k in ("path", "size", "mtime_ns")}
    assert after["sampled_blake2b"] != before["sampled_blake2b"]


def test_identities_are_read_once_per_file(tmp_path, monkeypatch):
    source = write(tmp_path / "p.nii.gz", 0)
    looked_up = []
    monkeypatch.setattr(slice_cache, "source_identity", lambda path: looked_up.append(path) or {"path": str(path)})
    identities = SourceIdentities()
    identities(source), identities(tmp_path / "." / "p.nii.gz")
    assert looked_up == [source.resolve()]


# -- pruning: entries no run will read again are deleted, nothing else ----------------------
def test_entries_of_deleted_or_changed_files_are_pruned(tmp_path, caplog):
    cache = tmp_path / "cache"
    kept, deleted, changed = (
        write(tmp_path / f"{name}.nii", i) for i, name in enumerate(("kept", "deleted", "changed"))
    )
    kept_entries = [cached_volume(kept, settings, cache)[0] for settings in (SETTINGS, SliceSettings(resize_to=8))]
    stale = [cached_volume(path, SETTINGS, cache)[0] for path in (deleted, changed)]
    stale_bytes = sum(f.stat().st_size for entry in stale for f in entry.folder.iterdir())
    deleted.unlink()
    rewrite_keeping_size_and_mtime(changed, seed=7)
    fresh, _ = cached_volume(changed, SETTINGS, cache)

    with caplog.at_level(logging.INFO, logger="data.slice_cache"):
        assert prune_stale_entries(cache) == (2, stale_bytes)
    assert entries(cache) == sorted([*(e.folder for e in kept_entries), fresh.folder])  # other settings stay
    assert f"slice cache {cache}: pruned 2 stale entries" in caplog.text
    assert f"{stale_bytes / 1e6:.1f} MB freed" in caplog.text
    assert prune_stale_entries(cache) == (0, 0)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_pruning_leaves_builds_in_progress_and_foreign_folders_alone(tmp_path):
    cache = tmp_path / "cache"
    entry, _ = cached_volume(write(tmp_path / "p.nii.gz", 0), SETTINGS, cache)
    host, name = socket.gethostname(), entry.folder.name
    description = json.loads((entry.folder / ENTRY_FILE).read_text())

    def folder(folder_name: str, **changes) -> Path:
        made = cache / folder_name
        made.mkdir()
        (made / ENTRY_FILE).write_text(json.dumps({**description, **changes}))
        return made

    left = [
        entry.folder,
        cache / f"{name}{slice_cache.PARTIAL_MARK}{host}-{os.getpid()}",  # a live build (ours)
        cache / f"{name}{slice_cache.PARTIAL_MARK}another-host-{dead_pid()}",  # not ours to judge
        cache / "holiday_photos",
        cache / f"other_p-{'0' * 20}.partial-{host}-{dead_pid()}-x",  # not a partial build's name
        folder(f"newer-{'1' * 20}", format=slice_cache.CACHE_FORMAT + 1, source=str(tmp_path / "gone.nii")),
        folder("not_an_entry_name", source=str(tmp_path / "gone.nii")),
    ]
    for made in left[1:5]:
        made.mkdir(exist_ok=True)
    (cache / "notes.txt").write_text("mine")
    gone = [
        cache / f"{name}{slice_cache.PARTIAL_MARK}{host}-{dead_pid()}",  # abandoned by a killed run
        folder(f"older-{'2' * 20}", format=1),  # a layout no run reads any more
        folder(f"moved-{'3' * 20}", source=str(tmp_path / "gone.nii")),
    ]
    gone[0].mkdir()

    assert prune_stale_entries(cache)[0] == 3
    assert all(path.exists() for path in left) and (cache / "notes.txt").exists()
    assert not any(path.exists() for path in gone)
