"""benchmarks/nifti_write.py: every writer it times writes the volume nibabel reads back, beside the project's."""

from __future__ import annotations

import json

from tests.conftest import run_script


def test_every_writer_is_timed_and_read_back(tmp_path, phantom_root):
    volume = sorted((phantom_root / "trainB").glob("*.nii.gz"))[0]
    out = tmp_path / "writers.json"
    result = run_script(
        "benchmarks/nifti_write.py", "--volume", volume, "--repeats", "1", "--json", out, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr  # a writer whose file reads back differently exits 1
    rows = json.loads(out.read_text())
    names = list(rows)
    assert names[0].startswith("nib.save") and names[-1].startswith("write_volume (isal level 3")
    assert any(name.startswith("isal igzip level 3") for name in names)
    assert all(row["seconds"] > 0 and row["mb"] > 0 for row in rows.values())
    assert "| writer | write s (median) |" in result.stdout
