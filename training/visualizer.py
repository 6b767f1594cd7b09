"""Training display: losses to ``loss_log.txt`` and the log, curves and images to ``web/``, Visdom if up.

Upstream keeps its visualizer in ``util/``; here it sits beside the training loop, its only
caller, because it turns the network's slices into HU pictures (data/) and labels the
validation metrics (evaluation/), and ``util/`` imports none of the packages above it.

The run's web folder, ``<checkpoints_dir>/<name>/web/`` (not written with ``--no_html``)::

    index.html                  the curves on top, then the images of each epoch, newest first
    images/curves.png           the training losses, and each validation metric next to its baseline
    images/epochNNN_<label>.png the first sample of a batch: input, generated, target, in the
                                network's [-1, 1] shown as black..white (with --intensity volume)
    images/epochNNN_<label>_<window>.png
                                with --intensity hu: the same in HU (the network's [-1, 1] is
                                --hu_min..--hu_max), in each --display_window (lung, soft tissue)
    images/epochNNN_<a>_minus_<b>.png
                                with --intensity hu: fake_B - real_B and real_A - real_B in HU,
                                on the colour scale of images/difference_colour_bar.png
    curves.jsonl                every point of curves.png and every row of images, one JSON object
                                a line, appended as they come (see CurveHistory); a run resumed
                                with --continue_train keeps what came before its resume point
                                (see Visualizer), a new run in the same folder starts afresh

Visdom (``--display_id N`` > 0; server ``--display_server:--display_port``, env ``--display_env``)
shows the same in windows whose ids depend only on N, so that scripts can read them back::

    loss_window(N) = "N"                     one line per loss; x = epochs done (see below)
    images_window(N) = "N+1"                 the latest input / generated / target slices
    validation_window(N, m) = "N_validation_m"   metric m: lines "model" and "input average"; x = epoch

In both, x counts epochs done: epoch E's loss points lie in (E - 1, E] (x = E - 1 + the fraction
of the epoch done) and its validation sits at x = E, where the epoch ends.

Visdom is optional: when the package is missing or no server answers, one warning says how
to start a server, and training goes on; a server that stops answering turns it off the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.intensity import HUWindow, network_to_pixels
from data.slicing import slice_for_display
from evaluation.metrics import BASELINE_PREFIX, METRIC_LABELS
from models import find_model_using_name
from util.atomic import atomic_path
from util.html import HTML, ImageCell
from util.image import (
    COLOUR_BAR_PNG,
    COLOUR_BAR_WIDTH,
    DEFAULT_DISPLAY_WINDOWS,
    DIFFERENCE_RANGE_HU,
    DIFFERENCE_ROW_LABEL,
    DisplayWindow,
    colour_bar,
    difference_to_rgb,
    label_font,
    parse_display_windows,
    save_png,
)

logger = logging.getLogger(__name__)

CURVES_LOG = "curves.jsonl"
CURVES_PNG = "curves.png"
X_LABEL = "epochs done"
# What the slices of a paired model's page are; a model class may name its own (``visuals_description``).
VISUALS_DESCRIPTION = "real_A the input, fake_B generated, real_B the target"
# (picture, target) visuals drawn as a difference map, picture - target in HU (--intensity hu).
DIFFERENCE_PAIRS = (("fake_B", "real_B"), ("real_A", "real_B"))
# Starts a Visdom server without the download of browser scripts that `python -m visdom.server`
# tries first (and that fails offline); README, Monitoring, says the same.
OFFLINE_SERVER_COMMAND = 'python -c "from visdom.server.run_server import main; main()" -port {port}'


def loss_window(display_id: int) -> str:
    """Visdom window of the loss curves (upstream pix2pix's id)."""
    return str(display_id)


def images_window(display_id: int) -> str:
    """Visdom window of the current input / generated / target slices (upstream pix2pix's id)."""
    return str(display_id + 1)


def validation_window(display_id: int, metric: str) -> str:
    """Visdom window of one validation metric, e.g. ``"1_validation_mae_hu"``."""
    return f"{display_id}_validation_{metric}"


def connect_visdom(server: str, port: int, env: str):
    """A Visdom client, or None (with the reason logged once) when none can be used."""
    try:
        import visdom
    except ImportError:
        logger.warning(
            "Visdom is not installed (requirements.txt installs it; see the README, Monitoring); "
            "live plots are off, losses still go to the log and the HTML page"
        )
        return None
    # The client logs a warning for every session it opens and for running without the
    # incoming socket; neither helps a training log.
    logging.getLogger("visdom").setLevel(logging.ERROR)
    try:
        # No incoming socket: it only carries browser events, which training does not use,
        # and its thread keeps reconnecting after the server has gone.
        client = visdom.Visdom(server=server, port=port, env=env, raise_exceptions=True, use_incoming_socket=False)
        # Another kind of HTTP server on the port answers too, but not as Visdom does.
        if client.check_connection(timeout_seconds=0):
            return client
    except Exception as err:  # noqa: BLE001 - any failure to connect only means "no live plots"
        logger.debug("Visdom connection failed: %s", err)
    logger.warning(
        "no Visdom server at %s:%d (start one offline with `%s`, or pass --display_id 0); "
        "live plots are off, losses still go to the log and the HTML page",
        server,
        port,
        OFFLINE_SERVER_COMMAND.format(port=port),
    )
    return None


@dataclass
class CurveHistory:
    """The points of the curves and the rows of images, as ``web/curves.jsonl`` holds them.

    Each line of the file is one entry, applied in order by :meth:`add`::

        {"loss": {"epoch": 3, "x": 2.25, "values": {"G_GAN": 0.69, "G_L1": 8.1, ...}}}
        {"validation": {"epoch": 3, "metrics": {"mae_hu": 24.7, "baseline_mae_hu": 32.0, ...}}}
        {"images": {"epoch": 3, "labels": ["real_A", "fake_B", "real_B"]}}
        {"images": {"epoch": 3, "labels": [...], "windows": [{"name": "lung", "lo_hu": -1350.0, "hi_hu": 150.0}, ...]}}

    (an images entry with ``windows``: that epoch's slices were drawn in HU, in those windows).

    ``x`` is the number of epochs done. A loss point at or before the last one rewinds the
    curve: the points from its x on are dropped, as a run resumed from a checkpoint logs them
    again. A later validation of the same epoch replaces the earlier one. Values that are not
    finite are stored as null (JSON has no inf or nan) and left out of the plots. The file is
    appended to, one line per entry, so that a point costs the same however long the run;
    :meth:`rewrite` replaces it whole.
    """

    losses: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)  # sorted by epoch
    image_epochs: list[int] = field(default_factory=list)
    image_labels: list[str] = field(default_factory=list)
    image_windows: dict[int, list[dict]] = field(default_factory=dict)  # epoch -> its display windows, if in HU

    @classmethod
    def load(cls, path: Path, resume_epoch: int) -> CurveHistory:
        """What ``path`` holds from before epoch ``resume_epoch``, where a resumed run goes on.

        That is every entry of an earlier epoch, and the loss points of ``resume_epoch`` itself,
        which a run resumed in the middle of an epoch does not log again (those that it does log
        again, it rewinds as it goes). Empty when there is no file.
        """
        history = cls()
        if not path.is_file():
            return history
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                entry = json.loads(line)
                if entry_epoch(entry) < resume_epoch or (entry_epoch(entry) == resume_epoch and "loss" in entry):
                    history.add(entry)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                # Appends are not atomic: a run killed while writing leaves a torn last line.
                logger.warning("%s, line %d: unreadable entry (%s), skipped", path, number, err)
        return history

    def add(self, entry: dict) -> None:
        """Apply one entry (one line of the file); raises KeyError for an unknown kind."""
        ((kind, value),) = entry.items()
        if kind == "loss":
            if self.losses and self.losses[-1]["x"] >= value["x"]:
                self.losses = [p for p in self.losses if p["x"] < value["x"]]
            self.losses.append(value)
        elif kind == "validation":
            self.validation = [v for v in self.validation if v["epoch"] != value["epoch"]] + [value]
            self.validation.sort(key=lambda v: v["epoch"])
        elif kind == "images":
            if value["epoch"] not in self.image_epochs:
                self.image_epochs.append(value["epoch"])
            self.image_labels = value["labels"]
            if "windows" in value:
                self.image_windows[value["epoch"]] = value["windows"]
            else:
                self.image_windows.pop(value["epoch"], None)
        else:
            raise KeyError(f"unknown entry {kind!r}")

    def entries(self) -> list[dict]:
        """Entries that :meth:`add` turns back into this history."""
        return (
            [{"images": self._images_entry(epoch)} for epoch in self.image_epochs]
            + [{"validation": v} for v in self.validation]
            + [{"loss": p} for p in self.losses]
        )

    def _images_entry(self, epoch: int) -> dict:
        windows = {"windows": self.image_windows[epoch]} if epoch in self.image_windows else {}
        return {"epoch": epoch, "labels": self.image_labels, **windows}

    def rewrite(self, path: Path) -> None:
        """Replace ``path`` with this history's entries (whole or not at all)."""
        with atomic_path(path) as partial:
            partial.write_text("".join(entry_line(entry) for entry in self.entries()))


def entry_epoch(entry: dict) -> int:
    ((_, value),) = entry.items()
    return value["epoch"]


def entry_line(entry: dict) -> str:
    return json.dumps(entry, allow_nan=False) + "\n"


def finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class Panel(NamedTuple):
    """One plot: a panel of ``curves.png`` and a Visdom window."""

    window: str  # Visdom window id
    title: str
    ylabel: str
    x: list[float]
    series: dict[str, list[float | None]]  # name -> one y per x (None: no value)


class Visualizer:
    """Loss printing and logging, the training page with its curves, and optional Visdom plots.

    The training loop calls :meth:`print_current_losses` and :meth:`plot_current_losses` when
    ``--print_freq`` more slices have been trained on, :meth:`display_current_results` every
    ``--display_freq`` slices, :meth:`plot_validation` after each validation, and :meth:`flush`
    when training ends.

    Reads the training options ``name``, ``checkpoints_dir``, ``no_html``, ``continue_train``,
    ``epoch_count``, ``display_id``, ``display_server``, ``display_port``, ``display_env``,
    ``display_ncols``, ``display_winsize``, ``axial_slice``/``slice_axis`` (the images'
    orientation) and, where present, ``intensity``, ``hu_min``, ``hu_max`` and
    ``display_window``: with ``--intensity hu`` the slices are drawn in HU, in CT windows;
    otherwise (``--intensity volume``, each volume scaled by its own min..max, so no HU) as the
    network sees them.

    With ``--continue_train`` the curves and image rows of the run folder are kept up to where the
    run resumes (``--epoch_count``, see :meth:`CurveHistory.load`); without it this is a new run,
    and the folder's earlier curves and rows are dropped.
    """

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.slice_axis = "axial" if getattr(opt, "axial_slice", False) else getattr(opt, "slice_axis", "axial")
        # A model whose A and B are not paired (cycle_gan) names its own differences: B - A would mean nothing.
        model = find_model_using_name(getattr(opt, "model", "pix2pix"))
        self.difference_pairs = getattr(model, "difference_pairs", DIFFERENCE_PAIRS)
        self.visuals_description = getattr(model, "visuals_description", VISUALS_DESCRIPTION)
        # The network's [-1, 1] is hu_min..hu_max HU only with --intensity hu.
        self.hu_window = HUWindow(opt.hu_min, opt.hu_max) if getattr(opt, "intensity", "volume") == "hu" else None
        self.windows = (
            parse_display_windows(getattr(opt, "display_window", DEFAULT_DISPLAY_WINDOWS)) if self.hu_window else []
        )
        self.run_dir = Path(opt.checkpoints_dir) / opt.name
        self.web_dir = self.run_dir / "web"
        self.use_html = not opt.no_html
        self.curves_log = self.web_dir / CURVES_LOG
        self.history = CurveHistory.load(self.curves_log, opt.epoch_count) if opt.continue_train else CurveHistory()
        if self.use_html and self.curves_log.is_file():
            # Without the entries that this run makes again (all of them for a new run).
            self.history.rewrite(self.curves_log)
        self._posted: set[str] = set()  # Visdom windows that hold all their points: later ones are appended
        self._next_draw = 0.0  # time.monotonic() from which a loss point redraws curves.png
        self._drawn = True  # curves.png and the page show every entry
        self.vis = connect_visdom(opt.display_server, opt.display_port, opt.display_env) if opt.display_id > 0 else None
        self.loss_log = self.run_dir / "loss_log.txt"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.loss_log, "a") as f:
            f.write(f"================ Training Loss ({time.strftime('%c')}) ================\n")
        # A resumed run shows its earlier points in Visdom at once, not at its first log line.
        self._post(self._loss_panels() + self._validation_panels())

    @property
    def saved_epochs(self) -> list[int]:
        """The epochs that have a row of images on the page."""
        return self.history.image_epochs

    def display_current_results(self, visuals: OrderedDict[str, torch.Tensor], epoch: int, save_result: bool) -> None:
        """Show the first sample of the batch in Visdom, and on the HTML page when asked.

        With ``--intensity hu`` the slices are drawn in each display window and the differences
        of :data:`DIFFERENCE_PAIRS` as colour maps (Visdom shows the first window); otherwise the
        network's [-1, 1] as black..white.
        """
        slices = {label: tensor_to_slice(tensor[0], self.slice_axis) for label, tensor in visuals.items()}  # (H, W)
        pictures, differences = {}, {}  # file name -> (H, W) uint8 gray / (H, W, 3) uint8 colour
        if self.hu_window is None:
            shown = {label: np.rint(network_to_pixels(image)).astype(np.uint8) for label, image in slices.items()}
            pictures = {image_name(epoch, label): image for label, image in shown.items()}
        else:
            hu = {label: self.hu_window.inverse(network_to_pixels(image)) for label, image in slices.items()}
            shown = {label: self.windows[0](image) for label, image in hu.items()}
            for window in self.windows:
                pictures.update({image_name(epoch, label, window.key): window(image) for label, image in hu.items()})
            for picture, target in self.difference_pairs:
                if picture in hu and target in hu:
                    differences[image_name(epoch, difference_label(picture, target))] = difference_to_rgb(
                        hu[picture] - hu[target]
                    )
        if self.vis is not None:
            try:
                self.vis.images(
                    [img[None] for img in shown.values()],
                    nrow=self.opt.display_ncols,
                    win=images_window(self.opt.display_id),
                    opts={"title": f"{self.opt.name}: {' | '.join(shown)}"},
                )
            except Exception as err:  # noqa: BLE001 - a server that went away turns display off, never training
                self._drop_visdom(err)
        if self.use_html and save_result:
            for name, image in {**pictures, **differences}.items():
                save_png(image, self.web_dir / "images" / name)
            if differences and not (self.web_dir / "images" / COLOUR_BAR_PNG).is_file():
                save_png(colour_bar(), self.web_dir / "images" / COLOUR_BAR_PNG)
            windows = {"windows": [window.as_dict() for window in self.windows]} if self.windows else {}
            self._record({"images": {"epoch": epoch, "labels": list(slices), **windows}})

    def plot_current_losses(self, epoch: int, counter_ratio: float, losses: OrderedDict[str, float]) -> None:
        """Add one point per loss to the page's curves and to Visdom.

        Args:
            epoch: the epoch running (from 1).
            counter_ratio: the fraction of it done, in (0, 1]; the point's x is ``epoch - 1 + counter_ratio``.
            losses: ``{"G_GAN": 0.69, "G_L1": 8.1, ...}``, the same names at every call.
        """
        values = {name: finite_or_none(value) for name, value in losses.items()}
        rewinds = bool(self.history.losses) and self.history.losses[-1]["x"] >= epoch - 1 + counter_ratio
        self._record({"loss": {"epoch": epoch, "x": epoch - 1 + counter_ratio, "values": values}})
        if loss_window(self.opt.display_id) in self._posted and not rewinds:
            # Re-sending a long run's every point at each log line would cost more than a training step.
            self._post(self._loss_panels(self.history.losses[-1:]), update="append")
        else:
            self._post(self._loss_panels())

    def plot_validation(self, epoch: int, metrics: dict[str, float]) -> None:
        """Add one point per validation metric, at x = ``epoch``, to the page's curves and to Visdom.

        Args:
            epoch: the epoch just validated; a second call for the same epoch replaces the first.
            metrics: e.g. ``{"mae_hu": 24.7, "psnr_db": 34.6, "ssim": 0.957, "lpips": 0.08,
                "baseline_mae_hu": 32.0, ..., "n_patients": 2}``. Each metric with a label in
                ``evaluation.metrics.METRIC_LABELS`` or a ``baseline_<metric>`` (the input
                average scored the same way) is drawn, next to that baseline when given; other
                keys (a count of patients) are only kept in curves.jsonl.

        Without a Visdom server only the page is updated (and with ``--no_html``, nothing).
        """
        values = {key: finite_or_none(value) for key, value in metrics.items()}
        self._record({"validation": {"epoch": epoch, "metrics": values}})
        self._post(self._validation_panels())

    def print_current_losses(
        self,
        epoch: int,
        step: int,
        steps: int,
        slices: int,
        losses: OrderedDict[str, float],
        t_comp: float,
        t_data: float,
    ) -> None:
        """Log one loss line and append it to loss_log.txt::

            (epoch: 2, step: 30/120, slices: 120, compute: 0.012 s/slice, data: 0.003 s/step) G_GAN: 0.693 G_L1: 8.100

        Args:
            epoch: the epoch running (from 1).
            step: steps (batches) of the epoch done; ``steps``: steps in the epoch.
            slices: slices of the epoch trained on so far (all processes together).
            t_comp: seconds of computation per slice of this process, and ``t_data``: seconds spent waiting
                for a batch per step, both averaged over the steps since the last line (the device's work
                included: the loop reads the losses, and so waits for the device, before it prints).
        """
        message = (
            f"(epoch: {epoch}, step: {step}/{steps}, slices: {slices}, compute: {t_comp:.3f} s/slice, "
            f"data: {t_data:.3f} s/step) "
        )
        message += " ".join(f"{k}: {v:.3f}" for k, v in losses.items())
        logger.info(message)
        with open(self.loss_log, "a") as f:
            f.write(message + "\n")

    def write_page(self) -> None:
        """``web/index.html``: the curves image, then the images of each epoch, newest first."""
        page = HTML(self.web_dir, f"Experiment name = {self.opt.name}", refresh=60)
        if (self.web_dir / "images" / CURVES_PNG).is_file():
            page.add_header("curves")
            caption = (
                f"losses logged every --print_freq slices (where denser than the pixels, their means); "
                f"validation metrics of each epoch validated. The numbers: {CURVES_LOG}"
            )
            page.add_images([CURVES_PNG], [caption], [CURVES_PNG], width=CHART_WIDTH)
        labels = self.history.image_labels
        if self.history.image_epochs:
            page.add_text(self._images_note())
        for epoch in sorted(self.history.image_epochs, reverse=True):
            page.add_header(f"epoch [{epoch}]")
            windows = [DisplayWindow.from_dict(w) for w in self.history.image_windows.get(epoch, [])]
            if not windows:  # the network's scale
                names = [image_name(epoch, label) for label in labels]
                page.add_images(names, labels, names, width=self.opt.display_winsize)
                continue
            rows = [
                (window.label, [ImageCell(image_name(epoch, label, window.key), label) for label in labels])
                for window in windows
            ]
            pairs = [
                (picture, target) for picture, target in self.difference_pairs if picture in labels and target in labels
            ]
            if pairs:
                cells = [
                    ImageCell(image_name(epoch, difference_label(picture, target)), f"{picture} - {target}")
                    for picture, target in pairs
                ]
                cells.append(ImageCell(COLOUR_BAR_PNG, "colour key", width=COLOUR_BAR_WIDTH))
                rows.append((DIFFERENCE_ROW_LABEL, cells))
            page.add_image_grid(rows, width=self.opt.display_winsize)
        page.save()

    def _images_note(self) -> str:
        """What the page's slices show, in words."""
        where = f"Each epoch: the first slice of a batch ({self.visuals_description})"
        if self.hu_window is None:
            return (
                f"{where}, in the network's [-1, 1] scale shown black..white. This run uses --intensity volume "
                "(each volume scaled by its own min..max), so the slices are not in HU and CT windows do not "
                "apply; train with --intensity hu to see them in lung and soft-tissue windows."
            )
        return (
            f"{where}, in HU (--intensity hu: the network's [-1, 1] is {self.hu_window.lo_hu:g}.."
            f"{self.hu_window.hi_hu:g} HU), in the "
            + " and the ".join(w.label for w in self.windows)
            + " (--display_window). Differences in HU: blue where the picture is darker (lower HU) than "
            f"real_B, red where it is brighter, saturated beyond ±{DIFFERENCE_RANGE_HU:g} HU."
        )

    def flush(self) -> None:
        """Redraw curves.png and the page if an entry is not on them yet; call it when training ends."""
        if self.use_html and not self._drawn:
            panels = self._loss_panels() + self._validation_panels()
            if panels:
                draw_curves(panels, self.web_dir / "images" / CURVES_PNG)
            else:  # a new run in an old run's folder: its curves are not this run's
                (self.web_dir / "images" / CURVES_PNG).unlink(missing_ok=True)
            self.write_page()
            self._drawn = True
            self._next_draw = time.monotonic() + REDRAW_SECONDS

    def _record(self, entry: dict) -> None:
        """Add ``entry`` to the history and to curves.jsonl, and redraw curves.png and the page.

        A redraw takes time in proportion to the points (0.15 s at 20,000), so loss points
        redraw at most every REDRAW_SECONDS; validation and image entries redraw at once.
        """
        self.history.add(entry)
        if not self.use_html:
            return
        self.web_dir.mkdir(parents=True, exist_ok=True)
        with open(self.curves_log, "a") as f:
            f.write(entry_line(entry))
        self._drawn = False
        if "loss" not in entry or time.monotonic() >= self._next_draw:
            self.flush()

    def _loss_panels(self, points: list[dict] | None = None) -> list[Panel]:
        """The panel of the loss ``points`` (default: all), with the loss names of the run's first point."""
        points = self.history.losses if points is None else points
        if not points:
            return []
        names = list(self.history.losses[0]["values"])
        series = {name: [p["values"].get(name) for p in points] for name in names}
        return [Panel(loss_window(self.opt.display_id), "training losses", "loss", [p["x"] for p in points], series)]

    def _validation_panels(self) -> list[Panel]:
        points = self.history.validation
        keys = dict.fromkeys(key for v in points for key in v["metrics"])
        metrics = [key for key in keys if key in METRIC_LABELS or BASELINE_PREFIX + key in keys]
        epochs = [v["epoch"] for v in points]
        panels = []
        for metric in metrics:
            series = {"model": [v["metrics"].get(metric) for v in points]}
            baseline = [v["metrics"].get(BASELINE_PREFIX + metric) for v in points]
            if any(value is not None for value in baseline):
                series["input average"] = baseline
            label = METRIC_LABELS.get(metric, metric)
            window = validation_window(self.opt.display_id, metric)
            panels.append(Panel(window, f"validation: {label}", label, epochs, series))
        return panels

    def _post(self, panels: list[Panel], update: str | None = None) -> None:
        """Plot ``panels`` in Visdom, replacing their windows, or with ``update="append"`` adding to them."""
        for panel in panels:
            if self.vis is None:
                return
            # Visdom passes its data on to the browser as JSON, which has no NaN: only whole rows go.
            rows = [(x, ys) for x, *ys in zip(panel.x, *panel.series.values()) if None not in ys]
            if not rows:
                continue
            try:
                self.vis.line(
                    X=np.array([x for x, _ in rows], dtype=float),
                    Y=np.array([ys for _, ys in rows], dtype=float),
                    win=panel.window,
                    update=update,
                    opts={
                        "title": f"{self.opt.name}: {panel.title}",
                        "legend": list(panel.series),
                        "xlabel": X_LABEL,
                        "ylabel": panel.ylabel,
                        "markers": len(rows) <= MARKERS_UP_TO,
                    },
                )
                self._posted.add(panel.window)
            except Exception as err:  # noqa: BLE001 - as above
                self._drop_visdom(err)

    def _drop_visdom(self, err: Exception) -> None:
        logger.warning("Visdom stopped answering (%s); live plots are off from now on", err)
        self.vis = None


def tensor_to_slice(tensor: torch.Tensor, slice_axis: str = "axial") -> np.ndarray:
    """A (C, H, W) slice in [-1, 1] -> (H', W') float32 in [-1, 1], in display orientation.

    With several channels (a 2.5D input) the centre channel, the slice itself, is taken.
    """
    channels = tensor.detach().float().cpu().numpy()
    return np.ascontiguousarray(slice_for_display(channels[channels.shape[0] // 2], slice_axis))


def image_name(epoch: int, label: str, window: str | None = None) -> str:
    """``epoch003_fake_B.png``, or with a display window's key ``epoch003_fake_B_lung.png``."""
    return f"epoch{epoch:03d}_{label}{'' if window is None else '_' + window}.png"


def difference_label(picture: str, target: str) -> str:
    """The file-name label of the difference map ``picture - target``: ``fake_B_minus_real_B``."""
    return f"{picture}_minus_{target}"


# -- curves.png ----------------------------------------------------------------------------------
CHART_WIDTH, PANEL_HEIGHT = 900, 260
LEFT, RIGHT, TOP, BOTTOM = 70, 16, 30, 40  # margins of each panel's plot area, in pixels
PLOT_WIDTH = CHART_WIDTH - LEFT - RIGHT
REDRAW_SECONDS = 10.0  # the page itself reloads every 60 s
MARKERS_UP_TO = 40  # points per line; above that, dots only hide the line
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def draw_curves(panels: list[Panel], path: Path) -> None:
    """Draw ``panels`` one below the other into a PNG at ``path`` (written whole or not at all).

    All panels share one x range, so that an epoch is at the same place in each.
    """
    image = Image.new("RGB", (CHART_WIDTH, PANEL_HEIGHT * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    font = label_font()
    x_range = _span([x for panel in panels for x in panel.x], pad=0.0, min_span=1.0)
    for i, panel in enumerate(panels):
        _draw_panel(draw, font, thin(panel, PLOT_WIDTH), x_range, top=i * PANEL_HEIGHT)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as partial:
        image.save(partial, compress_level=1)  # redrawn at every log line: speed over size


def thin(panel: Panel, columns: int) -> Panel:
    """At most ``columns`` points per line: the means of the points in ``columns`` equal spans of x."""
    if len(panel.x) <= columns:
        return panel
    x = np.asarray(panel.x, dtype=float)
    span = np.ptp(x) or 1.0
    bins = np.minimum(((x - x.min()) / span * columns).astype(int), columns - 1)
    used = np.unique(bins)

    def means(values: list[float | None]) -> list[float | None]:
        values = np.array([np.nan if v is None else v for v in values], dtype=float)
        finite = np.isfinite(values)
        sums = np.bincount(bins[finite], weights=values[finite], minlength=columns)[used]
        counts = np.bincount(bins[finite], minlength=columns)[used]
        return [float(total / n) if n else None for total, n in zip(sums, counts)]

    return panel._replace(x=means(panel.x), series={name: means(ys) for name, ys in panel.series.items()})


def _draw_panel(draw: ImageDraw.ImageDraw, font, panel: Panel, x_range: tuple[float, float], top: int) -> None:
    x0, x1, y0, y1 = LEFT, CHART_WIDTH - RIGHT, top + TOP, top + PANEL_HEIGHT - BOTTOM
    draw.text((x0, top + 8), panel.title, fill="black", font=font)
    points = [(x, y) for ys in panel.series.values() for x, y in zip(panel.x, ys) if y is not None]
    if not points:
        draw.text((x0 + 8, y0 + 8), "no finite values yet", fill="gray", font=font)
        return
    x_lo, x_hi = x_range
    y_lo, y_hi = _span([y for _, y in points], pad=0.06, min_span=abs(max(y for _, y in points)) * 0.1 or 1.0)

    def to_pixels(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - x_lo) / (x_hi - x_lo) * (x1 - x0), y1 - (y - y_lo) / (y_hi - y_lo) * (y1 - y0)

    for tick in nice_ticks(y_lo, y_hi):
        _, y = to_pixels(x_lo, tick)
        draw.line([(x0, y), (x1, y)], fill="#e4e4e4")
        label = f"{tick:g}"
        draw.text((x0 - 6 - draw.textlength(label, font=font), y - 7), label, fill="black", font=font)
    for tick in nice_ticks(x_lo, x_hi):
        x, _ = to_pixels(tick, y_lo)
        draw.line([(x, y0), (x, y1)], fill="#e4e4e4")
        label = f"{tick:g}"
        draw.text((x - draw.textlength(label, font=font) / 2, y1 + 4), label, fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    draw.text(((x0 + x1 - draw.textlength(X_LABEL, font=font)) / 2, y1 + 20), X_LABEL, fill="black", font=font)

    legend_x = x1
    for k, (name, ys) in reversed(list(enumerate(panel.series.items()))):
        color = PALETTE[k % len(PALETTE)]
        line = [to_pixels(x, y) for x, y in zip(panel.x, ys) if y is not None]
        if len(line) > 1:
            draw.line(line, fill=color, width=2, joint="curve")
        if len(line) <= MARKERS_UP_TO:
            for x, y in line:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        # The legend sits right-aligned on the title's line: a colour swatch, then the name.
        legend_x -= draw.textlength(name, font=font)
        draw.text((legend_x, top + 8), name, fill="black", font=font)
        legend_x -= 22
        draw.line([(legend_x, top + 15), (legend_x + 16, top + 15)], fill=color, width=3)
        legend_x -= 14


def _span(values: list[float], pad: float, min_span: float) -> tuple[float, float]:
    """The range of ``values``, widened by ``pad`` of itself on each side and to at least ``min_span``."""
    lo, hi = min(values), max(values)
    margin = max((hi - lo) * pad, (min_span - (hi - lo)) / 2)
    return lo - margin, hi + margin


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round values in [lo, hi], 1, 2 or 5 times a power of ten apart."""
    rough = (hi - lo) / count
    power = 10 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
