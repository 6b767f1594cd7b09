"""The pix2pix epoch loop: data, model, schedule, validation, logging and checkpoints.

Every checkpoint says where training continues (``next_epoch``, ``next_step``,
``total_iters``) and holds the random generators' states; the order of samples and their
flips is a function of (seed, epoch) alone (data/sampling.py). So a run resumed from any
checkpoint, including one saved in the middle of an epoch on a signal, takes the same
steps with the same data and the same dropout as a run that was never stopped.

A run never goes on silently from a broken state: a NaN/Inf loss never reaches the weights
(the model skips that optimiser step, on the device where it can), and the run stops when the
step is read (or, with ``--skip_nonfinite N``, skips up to N such batches); weights with
NaN/Inf are never saved, and a checkpoint that cannot be written stops it with one line.
Losses are read after every step, or, on the fast path, at prints, saves and epoch ends
(util/fast_path.py).

Words of the log: a **step** is one batch (one optimiser step); **slices** count samples, the
unit of ``--print_freq``, ``--display_freq``, ``--save_latest_freq`` and of the checkpoint
counter ``total_iters`` (upstream's name). The progress bar is drawn only when stderr is a
terminal; in a file, the loss line every ``--print_freq`` slices (with its step of the epoch)
is the progress, and no carriage return is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import create_dataloader, create_dataset
from data.sampling import EpochSampler
from models import create_model
from models.base_model import BaseModel, NonFiniteError
from training.signals import Interrupted, StopRequests
from training.step_losses import PendingSteps, StepResult
from training.validation import Validator
from training.visualizer import Visualizer
from util.run_folder import BEST, LATEST, save_checkpoint
from util.runtime import Runtime, barrier, gather_rng, restore_rng

logger = logging.getLogger(__name__)


def crossed(before: int, after: int, every: int) -> bool:
    """True when a counter moving from ``before`` to ``after`` passed a multiple of ``every``."""
    return after // every > before // every


@dataclass
class Progress:
    """Where training is: what a checkpoint's counters record."""

    epoch: int  # the epoch running (or about to run)
    step: int = 0  # steps of ``epoch`` done
    total_iters: int = 0  # samples seen, summed over processes (upstream's total_iters)
    best_val_mae_hu: float = math.inf
    nonfinite_skipped: int = 0
    # Loss sums over the steps of ``epoch`` so far, kept with a mid-epoch save so that a
    # resumed epoch's means (and the plateau schedule that follows them) cover the whole epoch.
    loss_sums: dict[str, float] = field(default_factory=dict)
    loss_steps: int = 0
    history: dict[int, dict[str, float]] = field(default_factory=dict)  # epoch -> mean losses
    learning_rates: dict[int, float] = field(default_factory=dict)  # epoch -> lr set at its end

    def counters(self, epoch_complete: bool) -> dict:
        done = self.epoch if epoch_complete else self.epoch - 1
        return {
            "epoch": done,
            "next_epoch": done + 1,
            "next_step": 0 if epoch_complete else self.step,
            "total_iters": self.total_iters,
            "best_val_mae_hu": None if math.isinf(self.best_val_mae_hu) else self.best_val_mae_hu,
            "nonfinite_skipped": self.nonfinite_skipped,
            "epoch_loss_sums": {} if epoch_complete else dict(self.loss_sums),
            "epoch_loss_steps": 0 if epoch_complete else self.loss_steps,
        }


def train(opt: argparse.Namespace, runtime: Runtime, stop: StopRequests | None = None) -> Progress:
    """Train ``opt.model`` from ``opt.epoch_count`` (and, on resume, the saved step) to the last epoch.

    Args:
        opt: the training options.
        runtime: device and process group (util/runtime.py).
        stop: signal requests; the loop arms it once the data is ready.

    Returns:
        Where training ended, with each epoch's mean losses (``history``) and the learning
        rate set at each epoch's end (``learning_rates``).

    Raises:
        Interrupted: stopped on a signal (``saved`` says whether ``latest`` holds this step).
        NonFiniteError: a loss became NaN/Inf (more than ``--skip_nonfinite`` times).
        CheckpointError: a checkpoint could not be read or written.
    """
    stop = stop or StopRequests()
    # Under torchrun, rank 0 fills the slice cache first; the others then read it.
    if not runtime.is_main:
        barrier(runtime)
    dataset = create_dataset(opt)
    if runtime.is_main:
        barrier(runtime)
    for line in dataset.summary_lines():
        logger.info(line)

    sampler = EpochSampler(len(dataset), opt.seed, shuffle=not opt.serial_batches, flip=not opt.no_flip,
                           rank=runtime.rank, world_size=runtime.world_size)
    loader_seed = torch.Generator()
    loader = create_dataloader(dataset, opt, sampler, pin_memory=runtime.device.type == "cuda", generator=loader_seed)

    model = create_model(opt, runtime.device)
    checkpoint = model.setup(opt)
    model.train()
    visualizer = Visualizer(opt) if runtime.is_main else None
    validator = Validator.from_options(opt, runtime) if runtime.is_main else None

    progress = Progress(epoch=opt.epoch_count)
    if checkpoint is not None:
        counters = checkpoint.counters
        progress.total_iters = int(counters.get("total_iters", 0))
        progress.best_val_mae_hu = counters.get("best_val_mae_hu") or math.inf
        progress.nonfinite_skipped = int(counters.get("nonfinite_skipped", 0))
        if counters.get("next_epoch") == opt.epoch_count:
            progress.step = int(counters.get("next_step", 0))
            progress.loss_sums = {k: float(v) for k, v in counters.get("epoch_loss_sums", {}).items()}
            progress.loss_steps = int(counters.get("epoch_loss_steps", 0))
        _restore_rng(checkpoint.train_state.get("rng"), runtime)

    last_epoch = opt.n_epochs + opt.n_epochs_decay
    logger.info("training epochs %d..%d on %s, %d slices per epoch in %d steps of %d slices%s", opt.epoch_count,
                last_epoch, runtime.device, len(dataset), len(loader), opt.batch_size * runtime.world_size,
                f" (resuming at step {progress.step + 1})" if progress.step else "")
    logger.info("speed: %s", model.fast_path.describe())

    def save(label: str, epoch_complete: bool, with_optimizers: bool) -> None:
        rng = gather_rng(runtime)  # collective: every rank takes part
        if runtime.is_main:
            train_state = {**model.training_state(with_optimizers), "rng": rng}
            save_checkpoint(model.save_dir, label, model.network_states(), train_state,
                            progress.counters(epoch_complete))

    stop.arm()
    try:
        _train_epochs(opt, model, loader, sampler, loader_seed, visualizer, validator, progress, runtime, stop, save)
    finally:
        if visualizer is not None:
            visualizer.flush()  # the curves image holds every point, however the run ended
    return progress


def _train_epochs(opt, model, loader, sampler, loader_seed, visualizer, validator, progress: Progress,
                  runtime: Runtime, stop: StopRequests, save) -> None:
    """Epochs ``opt.epoch_count`` .. the last: steps, validation, schedule, checkpoints."""
    last_epoch = opt.n_epochs + opt.n_epochs_decay
    samples_per_step = opt.batch_size * runtime.world_size
    for epoch in range(opt.epoch_count, last_epoch + 1):
        if epoch != progress.epoch:
            progress.epoch, progress.step, progress.loss_sums, progress.loss_steps = epoch, 0, {}, 0
        sampler.set_epoch(epoch)
        sampler.start_at(progress.step * opt.batch_size)
        loader_seed.manual_seed(opt.seed * 1_000_003 + epoch)
        progress.history[epoch] = run_epoch(opt, model, loader, visualizer, progress, samples_per_step, runtime, stop,
                                            save)
        if stop.requested:
            save(LATEST, epoch_complete=False, with_optimizers=True)
            raise Interrupted(
                f"stopped by {stop.name} at epoch {epoch}, step {progress.step} ({progress.total_iters} slices in all); "
                "'latest' saved; resume with --continue_train", stop.signum, saved=True,
            )

        improved = False
        model.metric = progress.history[epoch].get("G_L1", 0.0)
        if validator is not None and validator.due(epoch):
            metrics = validator.run(model, epoch)
            if "mae_hu" in metrics:  # else no patient could be scored (each was named in a warning)
                if visualizer is not None:
                    visualizer.plot_validation(epoch, metrics)
                model.metric = metrics["mae_hu"]
                improved = metrics["mae_hu"] < progress.best_val_mae_hu
                if improved:
                    progress.best_val_mae_hu = metrics["mae_hu"]
        barrier(runtime)
        if opt.lr_policy == "plateau" and runtime.distributed:
            model.metric = _broadcast_float(model.metric, runtime)
        lr = model.update_learning_rate()

        save(LATEST, epoch_complete=True, with_optimizers=True)
        if epoch % opt.save_epoch_freq == 0:
            logger.info("saving the model at the end of epoch %d (%d slices trained on in all)", epoch,
                        progress.total_iters)
            save(str(epoch), epoch_complete=True, with_optimizers=opt.save_optimizer_every_epoch)
        if _broadcast_flag(improved, runtime):
            logger.info("best validation MAE so far (%.2f HU): saved as '%s'", progress.best_val_mae_hu, BEST)
            save(BEST, epoch_complete=True, with_optimizers=True)
        means = " ".join(f"{k}: {v:.4f}" for k, v in progress.history[epoch].items())
        logger.info("end of epoch %d / %d, mean losses %s, learning rate %.7f", epoch, last_epoch, means, lr)
        progress.learning_rates[epoch] = lr


def run_epoch(opt, model: BaseModel, loader, visualizer, progress: Progress, samples_per_step: int,
              runtime: Runtime, stop: StopRequests, save) -> dict[str, float]:
    """The rest of epoch ``progress.epoch`` from step ``progress.step``; returns its mean losses.

    Returns early, after a whole step, when a stop was requested. Each step's losses stay on the
    device (training/step_losses.py) until numbers are needed: at a print, display, save or stop,
    at the end of the epoch, and after every step where the model cannot skip a NaN/Inf step
    on the device (util/fast_path.py). A NaN/Inf step is skipped or stops the run when it is read.
    """
    epoch = progress.epoch
    epoch_start = time.time()
    sums: dict[str, float] = defaultdict(float, progress.loss_sums)
    progress.loss_sums = sums
    steps = 0  # steps of this call that were applied
    pending = PendingSteps(model.loss_names)
    read_every_step = model.fast_path.reads_losses_every_step
    # Host seconds since the last printed line; measured after a read, they include the device's work.
    window = {"compute": 0.0, "data": 0.0, "steps": 0}
    first_step = progress.step
    data_start = time.time()
    steps_in_epoch = first_step + len(loader)
    # A bar redrawn with carriage returns only on a terminal: in a log file it would be noise.
    progress_bar = tqdm(loader, desc=f"epoch {epoch}", unit="step", leave=False,
                        disable=not (runtime.is_main and sys.stderr.isatty()), total=steps_in_epoch,
                        initial=first_step)

    def read_pending() -> StepResult | None:
        """Read the pending steps: add the applied ones to the epoch's sums, skip or stop at a NaN/Inf one."""
        nonlocal steps
        results = pending.read()
        for result in results:
            if result.nonfinite:
                _skip_or_stop(opt, progress, result)
                continue
            for name, value in result.losses.items():
                sums[name] += value
            steps += 1
            progress.loss_steps += 1
        return results[-1] if results else None

    batches = iter(progress_bar)
    try:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeError:
                if stop.requested:  # DataLoader workers that the same Ctrl-C ended
                    break
                raise
            data_time = time.time() - data_start
            before = progress.total_iters
            after = before + samples_per_step
            compute_start = time.time()
            model.set_input(batch)
            model.optimize_parameters()
            progress.step += 1
            progress.total_iters = after
            pending.add(progress.step, after, model.loss_vector(), model.step_nonfinite)

            show = visualizer is not None and crossed(before, after, opt.display_freq)
            report = visualizer is not None and crossed(before, after, opt.print_freq)
            checkpoint = crossed(before, after, opt.save_latest_freq)
            read_now = read_every_step or show or report or checkpoint
            # Under torchrun the processes agree on a stop by an all-reduce, which waits for the device:
            # where steps are not read one by one, they agree only when they read anyway.
            stopping = _broadcast_flag(stop.requested, runtime) if read_now or not runtime.distributed else False
            current = read_pending() if read_now or stopping else None
            window["compute"] += time.time() - compute_start
            window["data"] += data_time
            window["steps"] += 1

            if current is not None and not current.nonfinite:  # a skipped step is neither shown nor printed
                progress_bar.set_postfix({k: f"{v:.3f}" for k, v in current.losses.items()})
                if show:
                    visualizer.display_current_results(model.get_current_visuals(), epoch,
                                                       crossed(before, after, opt.update_html_freq) or steps == 1)
                if report:
                    compute_time = window["compute"] / (window["steps"] * opt.batch_size)  # per slice
                    data_time = window["data"] / window["steps"]  # per step
                    visualizer.print_current_losses(epoch, progress.step, steps_in_epoch, progress.step * samples_per_step,
                                                    current.losses, compute_time, data_time)
                    visualizer.plot_current_losses(epoch, progress.step / max(steps_in_epoch, 1), current.losses)
                    window = {"compute": 0.0, "data": 0.0, "steps": 0}
            if checkpoint:
                label = f"iter_{after}" if opt.save_by_iter else LATEST
                logger.info("saving the latest model (epoch %d, step %d, %d slices trained on in all) as '%s'", epoch,
                            progress.step, after, label)
                save(label, epoch_complete=False, with_optimizers=True)
            if stopping:
                if stop.signum is None:  # another rank was signalled; stop at the same step
                    stop.signum = signal.SIGTERM
                break
            data_start = time.time()
    finally:
        progress_bar.close()  # an error line then starts on a line of its own
    read_pending()
    if runtime.distributed and _broadcast_flag(stop.requested, runtime) and stop.signum is None:
        stop.signum = signal.SIGTERM  # another rank was signalled since the last agreement: all stop here

    if visualizer is not None and steps and visualizer.use_html and epoch not in visualizer.saved_epochs:
        # Every epoch gets a row on the page, however small the dataset.
        visualizer.display_current_results(model.get_current_visuals(), epoch, True)
    logger.info("epoch %d took %.1f s (%d steps, %d slices)", epoch, time.time() - epoch_start, steps,
                steps * samples_per_step)
    return OrderedDict((name, total / max(progress.loss_steps, 1)) for name, total in sums.items())


def _skip_or_stop(opt, progress: Progress, result: StepResult) -> None:
    """A NaN/Inf step, read: skip it while ``--skip_nonfinite`` allows, else stop with one line.

    The model has already left the weights as they were (BaseModel.step); this decides whether the run goes on.
    """
    where = f"epoch {progress.epoch}, step {result.step} ({result.slices} slices in all)"
    problem = f"non-finite loss: {result.describe_nonfinite()}"
    progress.nonfinite_skipped += 1
    if progress.nonfinite_skipped <= opt.skip_nonfinite:
        logger.warning("%s: %s; batch skipped (%d of at most %d)", where, problem, progress.nonfinite_skipped,
                       opt.skip_nonfinite)
        return
    allowed = f" after {opt.skip_nonfinite} skipped batch(es)" if opt.skip_nonfinite else ""
    raise NonFiniteError(
        f"{where}: {problem}{allowed}; this step was not applied and nothing from it was saved. "
        "Lower --lr or --lambda_L1, or pass --skip_nonfinite N to skip up to N such batches",
        result.losses,
    )


def _restore_rng(states: list | None, runtime: Runtime) -> None:
    if not states:
        logger.warning("the checkpoint holds no random-generator state: shuffles, flips and dropout will differ "
                       "from an uninterrupted run")
        return
    if len(states) != runtime.world_size:
        logger.warning("the checkpoint was saved by %d process(es), this run has %d: random generators start from "
                       "the seed, so dropout will differ from an uninterrupted run", len(states), runtime.world_size)
        return
    restore_rng(states[runtime.rank])


def _broadcast_flag(flag: bool, runtime: Runtime) -> bool:
    """True on every rank if ``flag`` is true on any (always ``flag`` outside torchrun)."""
    if not runtime.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _broadcast_float(value: float, runtime: Runtime) -> float:
    tensor = torch.tensor([value], device=runtime.device, dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())
