"""Write-then-rename, so that an interrupted write never leaves a half-written file under its name."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary name beside ``path``; rename it to ``path`` when the block succeeds.

    Args:
        path: the final file.
        suffix: ending the temporary name must keep (e.g. ``".nii.gz"``, from which
            nibabel infers the compression).

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    stem = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    temporary = path.with_name(f".{stem}.partial-{os.getpid()}{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
