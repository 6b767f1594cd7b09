"""Writing a .nii.gz: time and size of each gzip writer and level, beside the project's writer, in one run.

Every candidate writes the same int16 volume (a 512 x 512 x 113 phase-0 volume of the
seed-size phantom unless ``--volume`` names another) as one standard gzip stream, which every
NIfTI reader decodes; each file is read back with nibabel and must hold the same voxels.
Optional drop-ins (python-isal's ``isal``, ``zlib-ng``) are measured where installed.

    python benchmarks/nifti_write.py                      # makes the phantom volume in a temporary folder
    python benchmarks/nifti_write.py --volume datasets/ct_phases_dataset/testB/patient_1.nii.gz
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib  # the benchmark times nibabel's own writer beside the project's
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.volume_io import GZIP_LEVEL, read_volume, write_volume  # noqa: E402
from datasets.make_phantom import write_dataset  # noqa: E402


def gzip_stream(level: int) -> Callable[[Path], object]:
    """The standard library's gzip at ``level``, as nibabel writes it (no name, mtime 0)."""
    return lambda path: gzip.GzipFile(path, "wb", compresslevel=level, mtime=0)


def isal_stream(level: int, threads: int = 0) -> Callable[[Path], object]:
    from isal import igzip, igzip_threaded

    if threads:
        return lambda path: igzip_threaded.open(path, "wb", compresslevel=level, threads=threads)
    return lambda path: igzip.IGzipFile(path, "wb", compresslevel=level, mtime=0)


def zlib_ng_stream(level: int, threads: int = 0) -> Callable[[Path], object]:
    from zlib_ng import gzip_ng, gzip_ng_threaded

    if threads:
        return lambda path: gzip_ng_threaded.open(path, "wb", compresslevel=level, threads=threads)
    return lambda path: gzip_ng.GzipNGFile(path, "wb", compresslevel=level, mtime=0)


def candidates() -> dict[str, Callable[[Path, nib.Nifti1Image], None]]:
    """Name -> a function that writes the image as .nii.gz at the path."""

    def through(stream_of: Callable[[Path], object]) -> Callable[[Path, nib.Nifti1Image], None]:
        def write(path: Path, image: nib.Nifti1Image) -> None:
            with stream_of(path) as stream:
                stream.write(image.to_bytes())  # header, extension and voxels: the .nii's bytes

        return write

    writers: dict[str, Callable[[Path, nib.Nifti1Image], None]] = {
        "nib.save: zlib level 1 (the writer before)": lambda path, image: nib.save(image, path),
    }
    for level in (1, 6, 9):
        writers[f"gzip (zlib) level {level}"] = through(gzip_stream(level))
    if importlib.util.find_spec("isal"):
        for level in (0, 1, 2, 3):
            writers[f"isal igzip level {level}"] = through(isal_stream(level))
        writers["isal igzip_threaded level 3, 2 threads"] = through(isal_stream(3, threads=2))
    if importlib.util.find_spec("zlib_ng"):
        for level in (1, 6):
            writers[f"zlib-ng level {level}"] = through(zlib_ng_stream(level))
        writers["zlib-ng level 1, 2 threads"] = through(zlib_ng_stream(1, threads=2))
    return writers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", type=Path, help="an int16 .nii.gz to write (default: a seed-size phantom phase 0)")
    parser.add_argument("--repeats", type=int, default=5, help="writes per candidate; the median is shown")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="nifti_write-") as workdir:
        workdir = Path(workdir)
        source = args.volume
        if source is None:
            write_dataset(
                workdir / "phantom",
                num_train=1,
                num_test=0,
                shape=(512, 512, 113),
                spacing_mm=(0.68, 0.68, 2.5),
                num_phases=10,
                seed=0,
            )
            source = workdir / "phantom" / "trainB" / "patient_1.nii.gz"
        volume, meta = read_volume(source)
        stored = nib.load(source)
        data = np.asarray(stored.dataobj).astype(np.int16)
        image = type(stored)(data, None, header=stored.header.copy())
        image.header.set_data_dtype(np.int16)
        raw_mb = data.nbytes / 1e6

        writers = candidates()
        # The project's writer as the scripts call it: float32 canonical volume in, int16 file out.
        writers[f"write_volume (isal level {GZIP_LEVEL}; float32 -> int16 included)"] = lambda path, image: (
            write_volume(path, volume, meta)
        )
        rows = {}
        for name, write in writers.items():
            seconds = []
            for _ in range(args.repeats):
                path = workdir / "out.nii.gz"
                start = time.perf_counter()
                write(path, image)
                seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            readback = np.asarray(nib.load(path).dataobj)
            read_seconds = time.perf_counter() - start
            if not np.array_equal(readback, data):
                sys.exit(f"{name}: the file read back differs from the volume written")
            rows[name] = {
                "seconds": statistics.median(seconds),
                "min_seconds": min(seconds),
                "mb": path.stat().st_size / 1e6,
                "read_seconds": read_seconds,
            }
            os.unlink(path)

    print(
        f"{data.shape} int16 ({raw_mb:.1f} MB raw) from {source.name}; median of {args.repeats} writes, "
        f"one process, {os.cpu_count()} CPU(s)\n"
    )
    print("| writer | write s (median) | write s (min) | MB | ratio | nibabel read s |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['seconds']:.2f} | {row['min_seconds']:.2f} | {row['mb']:.1f} | "
            f"{raw_mb / row['mb']:.2f} | {row['read_seconds']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
