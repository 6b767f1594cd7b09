"""test.py end to end: the reference's Step 7 command on a tiny phantom and a tiny run folder."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SHAPE, TINY_SPACING_MM, run_script
from PIL import Image

from data.volume_io import new_volume_meta, read_volume, write_volume
from evaluation.results import COLOUR_BAR_PNG

pytestmark = pytest.mark.slow

# The reference's "Test Trained Model" command, as users type it; tests append overrides.
STEP7_FLAGS = """
    --dataroot ./datasets/ct_phases_dataset --name ct_phase0_generator_optimized --model pix2pix
    --dataset_mode robust_nifti --preprocess none --input_nc 1 --output_nc 1 --axial_slice --resize_to 512
    --epoch latest
""".split()
TEST_PATIENTS = ("patient_1", "patient_2")  # the phantom's testA/ (numbered from 1 in each split)
SCORES = ("mae_hu", "psnr_db", "ssim", "mae_lungs_hu", "mae_moving_hu", "mae_static_hu")
METRIC_COLUMNS = (*SCORES, *(f"baseline_{m}" for m in SCORES))
# One view (the coronal one, or one slice) of a patient with a target: input, generated and
# target in each of the two default windows, then two difference maps and the colour bar.
PICTURES_PER_VIEW = 3 * 2 + 2 + 1


def run_test_py(tmp_path: Path, dataroot: Path, tiny_run: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run the Step 7 command against ``dataroot`` and the tiny run; results in tmp_path/results."""
    with pytest.MonkeyPatch.context() as patch:
        # One thread: on the shared 2-core CI machine, two threads per process contend and run slower.
        patch.setenv("OMP_NUM_THREADS", "1")
        data = ["--dataroot", dataroot, "--results_dir", tmp_path / "results"]
        run = ["--name", tiny_run.name, "--checkpoints_dir", tiny_run.parent]
        return run_script("test.py", *STEP7_FLAGS, *data, *run, *flags, cwd=tmp_path)


def page_folder(tmp_path: Path) -> Path:
    return tmp_path / "results" / "tiny" / "test_latest"


class LinkParser(HTMLParser):
    """Collects ``<img src>`` and ``<a href>`` values, the text of the page and its table rows."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.text, self.rows = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse_page(path: Path) -> LinkParser:
    parser = LinkParser()
    parser.feed(path.read_text())
    return parser


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def step7_run(tmp_path_factory, phantom_root, tiny_run):
    """The Step 7 command with one picture per patient: (completed process, results folder)."""
    tmp_path = tmp_path_factory.mktemp("step7")
    result = run_test_py(tmp_path, phantom_root, tiny_run, "--num_images", "1")
    return result, page_folder(tmp_path)


def test_step7_command_writes_volumes_page_and_metrics(step7_run, phantom_root):
    result, folder = step7_run
    assert result.returncode == 0, result.stderr
    for patient in TEST_PATIENTS:
        generated, _ = read_volume(folder / "volumes" / f"{patient}_phase0.nii.gz")
        assert generated.shape == TINY_SHAPE and np.isfinite(generated).all()
    assert "MAE (HU) in body: generated" in result.stdout and "input average" in result.stdout
    assert "PSNR (dB) in body" in result.stdout and "SSIM in body" in result.stdout


def test_page_references_only_existing_images(step7_run):
    _, folder = step7_run
    page = parse_page(folder / "index.html")
    # --num_images 1: per patient the coronal view and one axial slice
    assert len(page.images) == 2 * PICTURES_PER_VIEW * len(TEST_PATIENTS)
    for src in page.images + page.links:
        assert (folder / src).is_file(), src
    text = " ".join(page.text)
    for patient in TEST_PATIENTS:
        for kind in ("input", "generated", "target", "generated - target", "input - target"):
            assert f"{patient} axial slice 6: {kind}" in text  # the middle of 12 slices
        assert f"{patient} coronal slice " in text
    assert "mean ± std" in text


def test_page_names_its_windows_and_shows_the_difference_scale(step7_run):
    _, folder = step7_run
    text = " ".join(parse_page(folder / "index.html").text)
    assert "lung window -1350..150 HU" in text and "soft-tissue window -160..240 HU" in text
    assert "difference, HU (colour scale ±500)" in text and "blue where the picture is darker" in text
    # The coronal view is the one where input and target differ most, and says so.
    assert "where input and target differ most" in text
    bar = Image.open(folder / "images" / COLOUR_BAR_PNG).convert("RGB")
    assert len(bar.getcolors(maxcolors=bar.width * bar.height)) > 50  # a gradient, not a blank


def test_pictures_keep_the_voxels_aspect_ratio(step7_run):
    _, folder = step7_run
    x, y, z = TINY_SHAPE
    sx, _, sz = TINY_SPACING_MM  # 5.5 x 5.5 x 10 mm: a coronal picture is drawn 10 / 5.5 times taller
    axial = Image.open(folder / "images" / "patient_1_slice006_input_lung.png")
    assert axial.size == (x, y)
    (coronal,) = (folder / "images").glob("patient_1_coronal*_input_lung.png")
    assert Image.open(coronal).size == (x, round(z * sz / sx))


def test_page_shows_the_mae_by_region_beside_the_input_average(step7_run):
    _, folder = step7_run
    page = parse_page(folder / "index.html")
    assert "Where the model helps and where it hurts" in " ".join(page.text)
    regions = [row for row in page.rows if row and row[0] in ("body", "lungs", "moving", "static")]
    # The mean over patients first, then each patient's, in the page's order.
    assert [row[0] for row in regions] == ["body", "lungs", "moving", "static"] * (1 + len(TEST_PATIENTS))
    assert "whose target is below -400 HU" in regions[1][1] and "|input - target| > 100 HU" in regions[2][1]
    assert all(" ± " in cell for row in regions[:4] for cell in row[2:4])
    metrics = ("mae_hu", "mae_lungs_hu", "mae_moving_hu", "mae_static_hu")
    for i, csv_row in enumerate(read_rows(folder), start=1):
        for row, metric in zip(regions[4 * i : 4 * i + 4], metrics):
            generated, baseline = float(csv_row[metric]), float(csv_row[f"baseline_{metric}"])
            assert row[2:4] == [f"{generated:.1f}", f"{baseline:.1f}"]
            assert ("lower (better)" in row[4]) == (generated < baseline)


def test_metrics_have_one_finite_row_per_patient_whatever_num_images(step7_run):
    _, folder = step7_run
    rows = read_rows(folder)
    assert [row["patient"] for row in rows] == list(TEST_PATIENTS)
    for row in rows:
        assert all(math.isfinite(float(row[column])) for column in METRIC_COLUMNS), row
    document = json.loads((folder / "metrics.json").read_text())
    assert set(document["summary"]) == set(METRIC_COLUMNS)
    for stats in document["summary"].values():
        assert set(stats) == {"mean", "std", "median", "min", "max", "n"} and stats["n"] == len(TEST_PATIENTS)
    assert [row["patient"] for row in document["patients"]] == list(TEST_PATIENTS)


def test_num_test_limits_patients_and_says_so(tmp_path, phantom_root, tiny_run):
    result = run_test_py(tmp_path, phantom_root, tiny_run, "--num_test", "1")
    assert result.returncode == 0, result.stderr
    folder = page_folder(tmp_path)
    assert [row["patient"] for row in read_rows(folder)] == ["patient_1"]
    assert sorted(p.name for p in (folder / "volumes").iterdir()) == ["patient_1_phase0.nii.gz"]
    # default --num_images 5, and the coronal view
    assert len(parse_page(folder / "index.html").images) == (5 + 1) * PICTURES_PER_VIEW
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("--num_test")]
    assert "the first 1 of the 2 volumes" in line and "1 left out" in line and "raise --num_test" in line


def test_display_window_picks_windows_by_name_or_numbers(tmp_path, phantom_root, tiny_run):
    result = run_test_py(
        tmp_path,
        phantom_root,
        tiny_run,
        "--num_test",
        "1",
        "--num_images",
        "1",
        "--display_window",
        "bone",
        "-600",
        "400",
    )
    assert result.returncode == 0, result.stderr
    folder = page_folder(tmp_path)
    text = " ".join(parse_page(folder / "index.html").text)
    assert "bone window -450..1050 HU" in text and "window -600..400 HU" in text and "lung window" not in text
    assert (folder / "images" / "patient_1_slice006_target_bone.png").is_file()
    assert (folder / "images" / "patient_1_slice006_target_-600_400.png").is_file()


def test_an_unknown_display_window_is_a_one_line_error(tmp_path, phantom_root, tiny_run):
    result = run_test_py(tmp_path, phantom_root, tiny_run, "--display_window", "lungs")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown display window 'lungs'" in result.stderr and "did you mean 'lung'?" in result.stderr


@pytest.fixture
def broken_root(tmp_path, phantom_root) -> Path:
    """testA: patient_1 (paired), patient_2 (no target), patient_6 (not NIfTI inside),
    patient_7 (target on another grid)."""
    root = tmp_path / "broken"
    shutil.copytree(phantom_root / "testA", root / "testA")
    shutil.copytree(phantom_root / "testB", root / "testB")
    (root / "testB" / "patient_2.nii.gz").unlink()
    (root / "testA" / "patient_6.nii.gz").write_bytes(b"not a NIfTI file")
    shutil.copy(root / "testA" / "patient_1.nii.gz", root / "testA" / "patient_7.nii.gz")
    volume, _ = read_volume(root / "testB" / "patient_1.nii.gz")
    cropped = volume[:, :, :-2]
    write_volume(root / "testB" / "patient_7.nii.gz", cropped, new_volume_meta(np.eye(4), cropped.shape))
    return root


def test_broken_files_stop_the_run_with_one_line(tmp_path, broken_root, tiny_run):
    result = run_test_py(tmp_path, broken_root, tiny_run)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("test.py: error: ")
    assert "patient_6.nii.gz" in result.stderr and "--skip_corrupted" in result.stderr


def test_skip_corrupted_skips_broken_pairs_and_notes_missing_targets(tmp_path, broken_root, tiny_run):
    result = run_test_py(tmp_path, broken_root, tiny_run, "--skip_corrupted", "--num_images", "1")
    assert result.returncode == 0, result.stderr
    folder = page_folder(tmp_path)
    assert [row["patient"] for row in read_rows(folder)] == ["patient_1"]
    assert sorted(p.name for p in (folder / "volumes").iterdir()) == [
        "patient_1_phase0.nii.gz",
        "patient_2_phase0.nii.gz",
    ]
    document = json.loads((folder / "metrics.json").read_text())
    assert document["without_target"] == ["patient_2"]
    assert [Path(s["path"]).name for s in document["skipped"]] == ["patient_6.nii.gz", "patient_7.nii.gz"]
    assert "differs" in document["skipped"][1]["reason"]
    page = parse_page(folder / "index.html")
    text = " ".join(page.text)
    assert "generated but not scored: patient_2" in text and "Skipped" in text
    assert "patient_2 axial slice 6: generated" in text and "patient_2 axial slice 6: target" not in text
    assert "patient_2 axial slice 6: generated - target" not in text  # no target, no difference
    assert all((folder / src).is_file() for src in page.images)


def test_missing_checkpoint_is_a_one_line_error(tmp_path, phantom_root, tiny_run):
    result = run_test_py(tmp_path, phantom_root, tiny_run, "--epoch", "99")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "99_net_G.pth: checkpoint not found" in result.stderr


# -- the page in a real browser ----------------------------------------------------------------
CHROMIUM = shutil.which("chromium")
# Appended to a copy of the page: once everything has loaded, list the images that did not.
IMAGE_CHECK = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0)).map((img) => img.getAttribute("src"));
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify({total: images.length, broken: broken});
  document.body.appendChild(out);
});
</script>
"""


def broken_images_in_browser(page: Path, tmp_path: Path) -> dict:
    """Open ``page`` (with the check script) in headless Chromium: ``{"total": n, "broken": [src, ...]}``."""
    checked = page.with_name("_image_check.html")
    checked.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        checked.as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    start = dom.find('<pre id="image-check">')
    assert start >= 0, f"the check script did not run; Chromium printed:\n{dom[:2000]}"
    text = dom[start + len('<pre id="image-check">') : dom.index("</pre>", start)]
    return json.loads(text.replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Debian: apt-get install -y chromium)")
def test_every_image_loads_in_a_browser(step7_run, tmp_path):
    _, folder = step7_run
    copy = tmp_path / "page"
    shutil.copytree(folder, copy)
    check = broken_images_in_browser(copy / "index.html", tmp_path)
    assert check == {"total": 2 * PICTURES_PER_VIEW * len(TEST_PATIENTS), "broken": []}
    # The check itself must notice a missing picture.
    victim = sorted((copy / "images").glob("patient_*.png"))[0]
    victim.unlink()
    check = broken_images_in_browser(copy / "index.html", tmp_path)
    assert check["broken"] == [f"images/{victim.name}"]
