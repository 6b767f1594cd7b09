"""The training page and its curves (training/visualizer.py, util/html.py), driven in-process.

The Visualizer is given the training options it reads as a Namespace; Visdom is off (or has
no server) here: tests/test_visdom_live.py runs a real server.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
from collections import OrderedDict
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from PIL import Image
from test_test_script import CHROMIUM, broken_images_in_browser

from training.visualizer import (
    COLOUR_BAR_PNG,
    CURVES_LOG,
    CURVES_PNG,
    OFFLINE_SERVER_COMMAND,
    PALETTE,
    PANEL_HEIGHT,
    CurveHistory,
    Panel,
    Visualizer,
    loss_window,
    nice_ticks,
    thin,
)
from util.html import HTML, image_url

# A label with every character that breaks an unencoded link: the page must still show it.
ODD_LABEL = "fake B #1?%"
LOSSES = ("G_GAN", "G_L1", "D_real", "D_fake")
# What evaluation/validation.py reports: metrics, their input-average baselines, and a count.
METRICS = {"mae_hu": 30.0, "psnr_db": 33.0, "ssim": 0.95, "baseline_mae_hu": 32.0, "baseline_psnr_db": 30.4,
           "baseline_ssim": 0.91, "lpips": 0.1, "n_patients": 2}  # fmt: skip


def training_options(checkpoints_dir: Path, **overrides) -> argparse.Namespace:
    """The options the Visualizer reads, as train.py's parser gives them (Visdom off)."""
    options = dict(
        name="run", checkpoints_dir=str(checkpoints_dir), no_html=False, continue_train=False, epoch_count=1,
        display_id=0,
        display_server="http://127.0.0.1", display_port=8097, display_env="main", display_ncols=4,
        display_winsize=64, axial_slice=True, slice_axis="axial",
    )  # fmt: skip
    return argparse.Namespace(**{**options, **overrides})


def visuals(seed: int) -> OrderedDict[str, torch.Tensor]:
    """A batch's visuals, (1, 1, 32, 32) in [-1, 1], one of them with ODD_LABEL."""
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict((label, torch.rand(1, 1, 32, 32, generator=generator) * 2 - 1)
                       for label in ("real_A", ODD_LABEL, "real_B"))  # fmt: skip


def train(visualizer: Visualizer, epochs: range, points_per_epoch: int = 4) -> None:
    """What training/loop.py calls, for ``epochs``: losses, a row of images, a validation."""
    for epoch in epochs:
        for step in range(points_per_epoch):
            losses = OrderedDict((name, 1.0 / (epoch + step + k)) for k, name in enumerate(LOSSES, start=1))
            visualizer.plot_current_losses(epoch, (step + 1) / points_per_epoch, losses)
        visualizer.display_current_results(visuals(epoch), epoch, save_result=True)
        visualizer.plot_validation(epoch, {key: value + epoch for key, value in METRICS.items()})
    visualizer.flush()


class PageParser(HTMLParser):
    """``<img src>``, ``<a href>`` and ``<h3>`` texts, in page order."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.headers, self._in_h3 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        self._in_h3 = tag == "h3"

    def handle_data(self, data):
        if self._in_h3:
            self.headers.append(data)
            self._in_h3 = False


def parse_page(web_dir: Path) -> PageParser:
    parser = PageParser()
    parser.feed((web_dir / "index.html").read_text())
    return parser


@pytest.fixture
def trained(tmp_path) -> Visualizer:
    """Three epochs of training display in ``tmp_path/run``."""
    visualizer = Visualizer(training_options(tmp_path))
    train(visualizer, range(1, 4))
    return visualizer


# -- the page ------------------------------------------------------------------------------------
def test_page_shows_the_curves_on_top_then_epochs_newest_first(trained):
    page = parse_page(trained.web_dir)
    assert page.images[0] == f"images/{CURVES_PNG}"
    assert page.headers == ["curves", "epoch [3]", "epoch [2]", "epoch [1]"]
    assert len(page.images) == 1 + 3 * 3


def test_every_image_and_link_on_the_page_names_an_existing_file(trained):
    page = parse_page(trained.web_dir)
    for url in page.images + page.links:
        assert (trained.web_dir / unquote(url)).is_file(), url
    # The odd label is on the page, encoded: unencoded, "#" and "?" would cut the path short.
    assert "images/epoch003_fake%20B%20%231%3F%25.png" in page.images


def test_html_encodes_image_names_and_keeps_its_api(tmp_path):
    page = HTML(tmp_path / "web", "title")
    page.add_header("header")
    page.add_text("text")
    page.add_table_rows(["a", "b"], [["1", "2"]])
    page.add_images(["x #1?%.png"], ["caption"], ["y #2.png"], width=32)
    path = page.save()
    parsed = parse_page(path.parent)
    assert parsed.images == ["images/x%20%231%3F%25.png"] and parsed.links == ["images/y%20%232.png"]
    assert image_url("a/b c.png") == "images/a/b%20c.png"  # a sub-folder stays a sub-folder


def test_curves_image_has_the_loss_panel_then_one_panel_per_validation_metric(trained):
    picture = Image.open(trained.web_dir / "images" / CURVES_PNG).convert("RGB")
    metrics = ["mae_hu", "psnr_db", "ssim", "lpips"]  # not n_patients: a count, not a metric
    assert picture.height == PANEL_HEIGHT * (1 + len(metrics))
    colours = {rgb(hex_colour) for hex_colour in PALETTE}
    loss_panel = colours_in(picture.crop((0, 0, picture.width, PANEL_HEIGHT)))
    assert {rgb(PALETTE[k]) for k in range(len(LOSSES))} <= loss_panel
    for i, metric in enumerate(metrics, start=1):
        panel = colours_in(picture.crop((0, i * PANEL_HEIGHT, picture.width, (i + 1) * PANEL_HEIGHT)))
        # model and input-average lines, except lpips, which has no baseline here
        expected = 1 if metric == "lpips" else 2
        assert len(colours & panel) == expected, metric


def colours_in(picture: Image.Image) -> set[tuple[int, int, int]]:
    return {colour for _, colour in picture.getcolors(maxcolors=picture.width * picture.height)}


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


# -- the slices in CT windows (--intensity hu) -----------------------------------------------------
HU_OPTIONS = dict(intensity="hu", hu_min=-1024.0, hu_max=3071.0, display_window=["lung", "soft_tissue"])


def hu_to_network(hu: float) -> float:
    """The network's value of ``hu`` under HU_OPTIONS' window (-1024..3071 HU -> [-1, 1])."""
    return (hu + 1024.0) / 4095.0 * 2 - 1


def hu_visuals(real_a_hu: float, fake_b_hu: float, real_b_hu: float) -> OrderedDict[str, torch.Tensor]:
    """pix2pix's visuals, (1, 1, 8, 8) each, every pixel of a slice at one HU value."""
    return OrderedDict(
        (label, torch.full((1, 1, 8, 8), hu_to_network(hu)))
        for label, hu in (("real_A", real_a_hu), ("fake_B", fake_b_hu), ("real_B", real_b_hu))
    )


def pixel(path: Path) -> tuple:
    picture = Image.open(path)
    return picture.getpixel((0, 0))


def test_with_intensity_hu_each_slice_is_shown_in_each_window_with_its_differences(tmp_path):
    visualizer = Visualizer(training_options(tmp_path, **HU_OPTIONS))
    # lung parenchyma in the input, liver (+50 HU) generated where the target has -600 HU
    visualizer.display_current_results(hu_visuals(-850.0, 50.0, -600.0), 1, save_result=True)
    visualizer.flush()
    images = visualizer.web_dir / "images"
    # lung window -1350..150 HU: -600 HU is mid-gray; soft tissue -160..240: black
    assert pixel(images / "epoch001_real_B_lung.png") == pytest.approx(127.5, abs=1)
    assert pixel(images / "epoch001_real_B_soft_tissue.png") == 0
    assert pixel(images / "epoch001_fake_B_soft_tissue.png") == pytest.approx(134, abs=1)  # (50 + 160) / 400 * 255
    # fake_B - real_B = +650 HU: saturated red; real_A - real_B = -250 HU: half-way to blue
    red, blue = pixel(images / "epoch001_fake_B_minus_real_B.png"), pixel(images / "epoch001_real_A_minus_real_B.png")
    assert red == (103, 0, 31) and blue == (67, 147, 195)
    page = parse_page(visualizer.web_dir)
    assert page.headers == ["epoch [1]"]
    assert len(page.images) == 2 * 3 + 2 + 1  # two windows of three slices, two differences, the colour bar
    assert all((visualizer.web_dir / unquote(url)).is_file() for url in page.images + page.links)
    text = (visualizer.web_dir / "index.html").read_text()
    assert "lung window -1350..150 HU" in text and "soft-tissue window -160..240 HU" in text
    assert "--intensity hu: the network's [-1, 1] is -1024..3071 HU" in text
    assert (images / COLOUR_BAR_PNG).is_file()


def test_with_intensity_hu_a_resumed_run_keeps_each_epochs_windows(tmp_path):
    visualizer = Visualizer(training_options(tmp_path, **HU_OPTIONS))
    for epoch in (1, 2):
        visualizer.display_current_results(hu_visuals(-850.0, 50.0, -600.0), epoch, save_result=True)
    # Resumed at epoch 2 with other windows: epoch 1 keeps its own, epoch 2 is drawn again.
    resumed = Visualizer(training_options(tmp_path, continue_train=True, epoch_count=2,
                                          **{**HU_OPTIONS, "display_window": ["bone", "-600", "400"]}))  # fmt: skip
    assert resumed.history.image_windows == {1: [w.as_dict() for w in visualizer.windows]}
    resumed.display_current_results(hu_visuals(-850.0, 50.0, -600.0), 2, save_result=True)
    resumed.flush()
    page = parse_page(resumed.web_dir)
    assert "images/epoch002_fake_B_-600_400.png" in page.images and "images/epoch001_fake_B_lung.png" in page.images
    assert all((resumed.web_dir / unquote(url)).is_file() for url in page.images)
    assert CurveHistory.load(resumed.web_dir / CURVES_LOG, resume_epoch=3) == resumed.history


def test_with_intensity_volume_the_page_says_why_there_is_no_hu_window(trained):
    text = (trained.web_dir / "index.html").read_text()
    assert "--intensity volume" in text and "not in HU" in text
    assert not list((trained.web_dir / "images").glob("*_lung.png"))


# -- curves.jsonl: a resumed run keeps its history -----------------------------------------------
def loss_xs(history: CurveHistory) -> list[float]:
    return [point["x"] for point in history.losses]


def test_a_run_resumed_after_an_epoch_keeps_the_epochs_before_it(trained, tmp_path):
    resumed = Visualizer(training_options(tmp_path, continue_train=True, epoch_count=3))  # after epoch 2
    assert loss_xs(resumed.history) == [e + s / 4 for e in (0, 1, 2) for s in (1, 2, 3, 4)]  # x: epochs done
    assert [v["epoch"] for v in resumed.history.validation] == [1, 2]
    assert resumed.saved_epochs == [1, 2]
    # The file was rewritten without what this run makes again...
    assert CurveHistory.load(resumed.web_dir / CURVES_LOG, resume_epoch=4) == resumed.history
    # ...and once it has, the page holds all three epochs again, with no point twice.
    train(resumed, range(3, 4))
    assert loss_xs(resumed.history) == [e + s / 4 for e in (0, 1, 2) for s in (1, 2, 3, 4)]
    assert [v["epoch"] for v in resumed.history.validation] == [1, 2, 3]
    assert parse_page(resumed.web_dir).headers == ["curves", "epoch [3]", "epoch [2]", "epoch [1]"]
    assert CurveHistory.load(resumed.web_dir / CURVES_LOG, resume_epoch=4) == resumed.history


def test_a_run_resumed_mid_epoch_rewinds_the_points_it_logs_again(trained, tmp_path):
    resumed = Visualizer(training_options(tmp_path, continue_train=True, epoch_count=3))  # at step 2 of epoch 3
    resumed.plot_current_losses(3, 3 / 4, OrderedDict((name, 0.5) for name in LOSSES))
    assert loss_xs(resumed.history) == [e + s / 4 for e in (0, 1) for s in (1, 2, 3, 4)] + [2.25, 2.5, 2.75]
    assert resumed.history.losses[-1]["values"]["G_GAN"] == 0.5
    resumed.flush()
    assert CurveHistory.load(resumed.web_dir / CURVES_LOG, resume_epoch=4) == resumed.history


def test_a_new_run_in_an_old_run_folder_starts_afresh(trained, tmp_path):
    fresh = Visualizer(training_options(tmp_path))  # no --continue_train
    assert fresh.history == CurveHistory()
    assert (fresh.web_dir / CURVES_LOG).read_text() == ""
    fresh.display_current_results(visuals(0), 1, save_result=True)  # an image row before any loss point
    assert not (fresh.web_dir / "images" / CURVES_PNG).exists()  # the old run's curves are gone
    assert parse_page(fresh.web_dir).headers == ["epoch [1]"]


def test_a_torn_last_line_is_skipped_with_a_warning(trained, tmp_path, caplog):
    log = trained.web_dir / CURVES_LOG
    with open(log, "a") as f:
        f.write('{"loss": {"epoch": 3, "x": 3.5, "val')  # a run killed mid-write
    with caplog.at_level(logging.WARNING):
        history = CurveHistory.load(log, resume_epoch=4)
    assert history == trained.history
    assert f"{CURVES_LOG}, line {len(log.read_text().splitlines())}: unreadable entry" in caplog.text


def test_non_finite_values_are_stored_as_null_and_left_out_of_the_curves(tmp_path):
    visualizer = Visualizer(training_options(tmp_path))
    visualizer.plot_validation(1, {"psnr_db": float("inf"), "baseline_psnr_db": 30.0})
    visualizer.plot_validation(2, {"psnr_db": 35.0, "baseline_psnr_db": float("nan")})
    visualizer.flush()
    lines = [json.loads(line) for line in (visualizer.web_dir / CURVES_LOG).read_text().splitlines()]
    assert [line["validation"]["metrics"] for line in lines] == [
        {"psnr_db": None, "baseline_psnr_db": 30.0},
        {"psnr_db": 35.0, "baseline_psnr_db": None},
    ]
    assert (visualizer.web_dir / "images" / CURVES_PNG).is_file()


# -- Visdom, without a server --------------------------------------------------------------------
def closed_port() -> int:
    """A loopback port that nothing listens on (bound for a moment, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_server_visdom_is_off_with_one_warning_and_plot_validation_still_draws(tmp_path, caplog):
    port = closed_port()
    with caplog.at_level(logging.WARNING):
        visualizer = Visualizer(training_options(tmp_path, display_id=1, display_port=port))
    assert visualizer.vis is None
    warnings = [r.getMessage() for r in caplog.records if "Visdom" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert OFFLINE_SERVER_COMMAND.format(port=port) in warnings[0] or "not installed" in warnings[0]
    visualizer.plot_validation(1, METRICS)  # no error, no second warning
    assert len([r for r in caplog.records if "Visdom" in r.getMessage()]) == 1
    assert (visualizer.web_dir / "images" / CURVES_PNG).is_file()


def test_plot_validation_with_no_server_and_no_page_does_nothing(tmp_path):
    visualizer = Visualizer(training_options(tmp_path, no_html=True))
    visualizer.plot_validation(1, METRICS)
    visualizer.flush()
    assert not (tmp_path / "run" / "web").exists()


class RecordingVisdom:
    """Stands in for a Visdom client: keeps the arguments of each ``line`` call."""

    def __init__(self):
        self.lines = []

    def line(self, X, Y, win, update=None, opts=None):
        self.lines.append({"X": X.tolist(), "Y": Y.tolist(), "win": win, "update": update, "legend": opts["legend"]})


def test_loss_points_go_to_visdom_whole_once_then_one_at_a_time(tmp_path):
    visualizer = Visualizer(training_options(tmp_path))
    visualizer.vis = client = RecordingVisdom()
    visualizer.opt.display_id = 5
    losses = OrderedDict(G_GAN=0.7, G_L1=2.0)
    visualizer.plot_current_losses(1, 0.5, losses)
    visualizer.plot_current_losses(1, 1.0, OrderedDict(G_GAN=float("nan"), G_L1=1.0))  # not sent: no NaN in JSON
    visualizer.plot_current_losses(2, 0.5, OrderedDict(G_GAN=0.6, G_L1=1.5))
    assert client.lines == [
        {"X": [0.5], "Y": [[0.7, 2.0]], "win": loss_window(5), "update": None, "legend": ["G_GAN", "G_L1"]},
        {"X": [1.5], "Y": [[0.6, 1.5]], "win": loss_window(5), "update": "append", "legend": ["G_GAN", "G_L1"]},
    ]
    # A point that rewinds the curve (a resumed run) re-sends the whole window.
    visualizer.plot_current_losses(2, 0.25, OrderedDict(G_GAN=0.65, G_L1=1.7))
    assert client.lines[-1]["X"] == [0.5, 1.25] and client.lines[-1]["update"] is None
    visualizer.plot_validation(2, {"ssim": 0.9, "baseline_ssim": 0.8})
    assert client.lines[-1] == {"X": [2.0], "Y": [[0.9, 0.8]], "win": "5_validation_ssim", "update": None,
                                "legend": ["model", "input average"]}  # fmt: skip


# -- drawing helpers -----------------------------------------------------------------------------
def test_nice_ticks_are_round_and_inside_the_range():
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(23.3, 31.9) == pytest.approx([24.0, 26.0, 28.0, 30.0])


def test_thin_keeps_at_most_one_mean_point_per_column():
    panel = Panel("1", "t", "y", [float(x) for x in range(10)], {"a": [float(x) for x in range(10)], "b": [None] * 10})
    thinned = thin(panel, columns=5)
    assert thinned.x == [0.5, 2.5, 4.5, 6.5, 8.5]
    assert thinned.series == {"a": [0.5, 2.5, 4.5, 6.5, 8.5], "b": [None] * 5}
    assert thin(panel, columns=10) is panel


# -- the page in a real browser ------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Debian: apt-get install -y chromium)")
def test_the_training_page_has_no_broken_image_in_a_browser(trained, tmp_path):
    copy = tmp_path / "page"
    shutil.copytree(trained.web_dir, copy)
    check = broken_images_in_browser(copy / "index.html", tmp_path)
    assert check == {"total": 1 + 3 * 3, "broken": []}
    # The check itself notices a missing picture, here the one with the odd name.
    (copy / "images" / f"epoch002_{ODD_LABEL}.png").unlink()
    check = broken_images_in_browser(copy / "index.html", tmp_path)
    assert check["broken"] == [image_url(f"epoch002_{ODD_LABEL}.png")]


@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Debian: apt-get install -y chromium)")
def test_the_training_page_in_ct_windows_has_no_broken_image_in_a_browser(tmp_path):
    visualizer = Visualizer(training_options(tmp_path / "run", **HU_OPTIONS))
    visualizer.display_current_results(hu_visuals(-850.0, 50.0, -600.0), 1, save_result=True)
    visualizer.flush()
    check = broken_images_in_browser(visualizer.web_dir / "index.html", tmp_path)
    assert check == {"total": 2 * 3 + 2 + 1, "broken": []}
    (visualizer.web_dir / "images" / "epoch001_real_A_minus_real_B.png").unlink()
    check = broken_images_in_browser(visualizer.web_dir / "index.html", tmp_path)
    assert check["broken"] == ["images/epoch001_real_A_minus_real_B.png"]
