"""Validation while training: every ``--val_freq`` epochs, score the generator on held-out patients.

The held-out split is ``valA/``+``valB/`` or, without one, ``testA/``+``testB/`` (split by
patient: other files than training's). Scores are test.py's (MAE in the body, PSNR, SSIM,
optionally LPIPS), each beside the input-average baseline, so the log says plainly whether
the model beats the average CT yet. The training loop keeps the best generator by
validation MAE as ``best``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

from data.base_dataset import DatasetError
from data.slice_cache import SliceSettings
from evaluation.validation import describe_validation, find_validation_cases, validate
from inference.volume import PhaseGenerator, generator_phases
from util.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass
class Validator:
    """Scores the in-training generator on ``cases`` every ``every`` epochs.

    Attributes:
        every: epochs between validations (0: never).
        phase: the split's name (``val`` or ``test``).
        cases: (input, target) volume pairs.
        settings, context_slices: how the model was trained to see slices.
        runtime: the device the generator runs on.
        lpips_scorer: an LPIPS scorer, or None.
        phases: the generator's ``phases``, ``num_phases`` and ``conditioning`` (``--phases``).
    """

    every: int
    phase: str
    cases: list[tuple[Path, Path]]
    settings: SliceSettings
    context_slices: int
    runtime: Runtime
    lpips_scorer: object | None = None
    phases: dict = field(default_factory=dict)

    @classmethod
    def from_options(cls, opt: argparse.Namespace, runtime: Runtime) -> Validator | None:
        """The validator ``--val_freq``/``--num_val``/``--lpips`` ask for, or None (with the reason logged)."""
        if opt.val_freq == 0:
            return None
        try:
            phase, cases = find_validation_cases(Path(opt.dataroot), opt.num_val, tuple(opt.phase_list))
        except DatasetError as err:
            if opt.val_freq > 0:  # asked for: a split that cannot be used stops the run
                raise
            logger.warning("validation is off: %s", err)
            return None
        if not cases:
            message = "no held-out split (valA/ + valB/, or testA/ + testB/) in %s: validation is off"
            (logger.warning if opt.val_freq > 0 else logger.info)(message, opt.dataroot)
            return None
        every = opt.val_freq if opt.val_freq > 0 else 1
        scorer = None
        if opt.lpips:
            from evaluation.perceptual import LpipsScorer

            scorer = LpipsScorer.from_torchvision_cache(runtime.device)
        logger.info("validation every %d epoch(s) on %d patient(s) of %sA/ + %sB/", every, len(cases), phase, phase)
        return cls(every, phase, cases, SliceSettings.from_options(opt), opt.context_slices, runtime, scorer,
                   generator_phases(vars(opt)))

    def due(self, epoch: int) -> bool:
        return self.every > 0 and epoch % self.every == 0

    def run(self, model, epoch: int) -> dict[str, float]:
        """Score ``model.netG`` now; logs one line and returns the mean metrics (``mae_hu``, ``baseline_mae_hu``, ...)."""
        generator = PhaseGenerator(net=model.netG, settings=self.settings, context_slices=self.context_slices,
                                   device=self.runtime.device, netG=getattr(model.opt, "netG", ""), **self.phases)
        metrics = validate(generator, self.cases, self.lpips_scorer)
        logger.info("epoch %d %s", epoch, describe_validation(metrics))
        return metrics
