"""Training display: losses to ``loss_log.txt`` and the log, images to ``web/index.html``, Visdom if up.

Visdom is optional: when the package is missing or no server answers, one warning says so
and training goes on; the log file and the HTML page carry the same information.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from util.html import HTML
from util.image import save_png, tensor_to_image

logger = logging.getLogger(__name__)


def connect_visdom(server: str, port: int, env: str):
    """A Visdom client, or None (with the reason logged once) when none can be used."""
    try:
        import visdom
    except ImportError:
        logger.warning("Visdom is not installed (pip install visdom); live plots are off, losses still go to the log and HTML page")
        return None
    try:
        client = visdom.Visdom(server=server, port=port, env=env, raise_exceptions=True)
        if client.check_connection(timeout_seconds=2):
            return client
    except Exception as err:  # noqa: BLE001 - any failure to connect only means "no live plots"
        logger.debug("Visdom connection failed: %s", err)
    logger.warning(
        "no Visdom server at %s:%d (start one with `python -m visdom.server`, or pass --display_id 0); "
        "live plots are off, losses still go to the log and HTML page", server, port,
    )
    return None


class Visualizer:
    """Loss printing and logging, the training HTML page, and optional Visdom plots."""

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.slice_axis = "axial" if getattr(opt, "axial_slice", False) else getattr(opt, "slice_axis", "axial")
        self.run_dir = Path(opt.checkpoints_dir) / opt.name
        self.web_dir = self.run_dir / "web"
        self.use_html = not opt.no_html
        self.vis = connect_visdom(opt.display_server, opt.display_port, opt.display_env) if opt.display_id > 0 else None
        self.loss_log = self.run_dir / "loss_log.txt"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.loss_log, "a") as f:
            f.write(f"================ Training Loss ({time.strftime('%c')}) ================\n")
        self.plot_data: dict[str, list] = {"X": [], "Y": [], "legend": []}
        self.saved_epochs: list[int] = []

    def display_current_results(self, visuals: OrderedDict[str, torch.Tensor], epoch: int, save_result: bool) -> None:
        """Show the first sample of the batch in Visdom, and on the HTML page when asked."""
        images = {label: tensor_to_image(tensor[0], self.slice_axis) for label, tensor in visuals.items()}
        if self.vis is not None:
            try:
                self.vis.images([img[None] for img in images.values()], nrow=self.opt.display_ncols,
                                win=str(self.opt.display_id + 1), opts={"title": f"{self.opt.name} images"})
            except Exception as err:  # noqa: BLE001 - a server that went away turns display off, never training
                self._drop_visdom(err)
        if self.use_html and save_result:
            for label, image in images.items():
                save_png(image, self.web_dir / "images" / f"epoch{epoch:03d}_{label}.png")
            if epoch not in self.saved_epochs:
                self.saved_epochs.append(epoch)
            self.write_page(list(images))

    def write_page(self, labels: list[str]) -> None:
        page = HTML(self.web_dir, f"Experiment name = {self.opt.name}", refresh=60)
        for epoch in sorted(self.saved_epochs, reverse=True):
            page.add_header(f"epoch [{epoch}]")
            names = [f"epoch{epoch:03d}_{label}.png" for label in labels]
            page.add_images(names, labels, names, width=self.opt.display_winsize)
        page.save()

    def plot_current_losses(self, epoch: int, counter_ratio: float, losses: OrderedDict[str, float]) -> None:
        if self.vis is None:
            return
        if not self.plot_data["legend"]:
            self.plot_data["legend"] = list(losses)
        self.plot_data["X"].append(epoch + counter_ratio)
        self.plot_data["Y"].append([losses[k] for k in self.plot_data["legend"]])
        try:
            x = np.stack([np.array(self.plot_data["X"])] * len(self.plot_data["legend"]), 1)
            self.vis.line(X=x, Y=np.array(self.plot_data["Y"]), win=str(self.opt.display_id),
                          opts={"title": f"{self.opt.name} loss over time", "legend": self.plot_data["legend"],
                                "xlabel": "epoch", "ylabel": "loss"})
        except Exception as err:  # noqa: BLE001 - as above
            self._drop_visdom(err)

    def print_current_losses(self, epoch: int, iters: int, losses: OrderedDict[str, float], t_comp: float, t_data: float) -> None:
        """Log ``(epoch: E, iters: I, time: T, data: D) G_GAN: ... G_L1: ...`` and append it to loss_log.txt."""
        message = f"(epoch: {epoch}, iters: {iters}, time: {t_comp:.3f}, data: {t_data:.3f}) "
        message += " ".join(f"{k}: {v:.3f}" for k, v in losses.items())
        logger.info(message)
        with open(self.loss_log, "a") as f:
            f.write(message + "\n")

    def _drop_visdom(self, err: Exception) -> None:
        logger.warning("Visdom stopped answering (%s); live plots are off from now on", err)
        self.vis = None
