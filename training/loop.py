"""The pix2pix epoch loop: data, model, schedule, logging and checkpoints."""

from __future__ import annotations

import argparse
import logging
import time
from collections import OrderedDict, defaultdict

import torch.utils.data
from tqdm import tqdm

from data import create_dataloader, create_dataset
from models import create_model
from models.base_model import read_train_state
from util.runtime import Runtime, barrier
from util.visualizer import Visualizer

logger = logging.getLogger(__name__)


def crossed(before: int, after: int, every: int) -> bool:
    """True when a counter moving from ``before`` to ``after`` passed a multiple of ``every``."""
    return after // every > before // every


def train(opt: argparse.Namespace, runtime: Runtime) -> dict[int, dict[str, float]]:
    """Train ``opt.model`` from ``opt.epoch_count`` to ``n_epochs + n_epochs_decay``.

    Returns:
        Each epoch's mean losses, ``{epoch: {"G_GAN": ..., "G_L1": ..., ...}}``.
    """
    # Under torchrun, rank 0 fills the slice cache first; the others then read it.
    if not runtime.is_main:
        barrier(runtime)
    dataset = create_dataset(opt)
    if runtime.is_main:
        barrier(runtime)
    for line in dataset.summary_lines():
        logger.info(line)

    sampler = None
    if runtime.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=not opt.serial_batches, seed=opt.seed)
    loader = create_dataloader(dataset, opt, sampler)

    model = create_model(opt, runtime.device)
    model.setup(opt)
    model.train()
    visualizer = Visualizer(opt) if runtime.is_main else None

    state = read_train_state(model.save_dir, opt.epoch) if opt.continue_train else None
    total_iters = int(state["total_iters"]) if state else 0
    last_epoch = opt.n_epochs + opt.n_epochs_decay
    samples_per_step = opt.batch_size * runtime.world_size
    history: dict[int, dict[str, float]] = {}
    logger.info("training epochs %d..%d on %s, %d slices per epoch", opt.epoch_count, last_epoch, runtime.device, len(dataset))

    epoch = opt.epoch_count
    try:
        for epoch in range(opt.epoch_count, last_epoch + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)
            history[epoch] = run_epoch(opt, model, loader, visualizer, epoch, total_iters, samples_per_step, runtime)
            total_iters += len(loader) * samples_per_step
            lr = model.update_learning_rate()
            if runtime.is_main:
                model.save_networks("latest")
                model.save_train_state("latest", epoch, total_iters)
                if epoch % opt.save_epoch_freq == 0:
                    logger.info("saving the model at the end of epoch %d, iters %d", epoch, total_iters)
                    model.save_networks(epoch)
                    model.save_train_state(epoch, epoch, total_iters)
            means = " ".join(f"{k}: {v:.4f}" for k, v in history[epoch].items())
            logger.info("end of epoch %d / %d, mean losses %s, learning rate %.7f", epoch, last_epoch, means, lr)
    except KeyboardInterrupt:
        if runtime.is_main:
            # Keep the weights as they are now; resuming repeats the unfinished epoch.
            model.save_networks("latest")
            model.save_train_state("latest", epoch - 1, total_iters)
        raise
    return history


def run_epoch(opt, model, loader, visualizer, epoch, total_iters, samples_per_step, runtime) -> dict[str, float]:
    """One pass over the data; returns the epoch's mean of each loss."""
    epoch_start = time.time()
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    data_start = time.time()
    progress = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not runtime.is_main)
    for step, batch in enumerate(progress):
        data_time = time.time() - data_start
        before = total_iters + step * samples_per_step
        after = before + samples_per_step
        compute_start = time.time()
        model.set_input(batch)
        model.optimize_parameters()
        losses = model.get_current_losses()
        for name, value in losses.items():
            sums[name] += value
        steps += 1
        progress.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})

        if visualizer is not None:
            if crossed(before, after, opt.display_freq):
                visualizer.display_current_results(model.get_current_visuals(), epoch, crossed(before, after, opt.update_html_freq) or step == 0)
            if crossed(before, after, opt.print_freq):
                compute_time = (time.time() - compute_start) / opt.batch_size
                visualizer.print_current_losses(epoch, (step + 1) * samples_per_step, losses, compute_time, data_time)
                visualizer.plot_current_losses(epoch, (step + 1) / len(loader), losses)
            if crossed(before, after, opt.save_latest_freq):
                logger.info("saving the latest model (epoch %d, total_iters %d)", epoch, after)
                label = f"iter_{after}" if opt.save_by_iter else "latest"
                model.save_networks(label)
                model.save_train_state(label, epoch - 1, after)
        data_start = time.time()

    if visualizer is not None and steps and visualizer.use_html and epoch not in visualizer.saved_epochs:
        # Every epoch gets a row on the page, however small the dataset.
        visualizer.display_current_results(model.get_current_visuals(), epoch, True)
    logger.info("epoch %d took %.1f s (%d iterations)", epoch, time.time() - epoch_start, steps)
    return OrderedDict((name, total / max(steps, 1)) for name, total in sums.items())
