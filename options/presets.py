"""``train.py --preset NAME``: named training recipes, measured by ``benchmarks/quality.py``.

A preset sets the defaults of the flags it names; flags given on the command line still
win, so ``--preset phase0 --lambda_L1 500`` is the preset with another L1 weight. What a
preset chose is saved with the run like any other flag (``train_opt.json``), so ``test.py``,
``use_model.py`` and a resumed run rebuild the same network without being told the preset.
Resolution and generator depth are not part of a preset: they follow the data
(``--resize_to`` with the U-Net that fits it, see the README's *Choosing options*).
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, object]] = {
    # The recipe the README recommends for average CT -> phase 0; why each value, with the
    # figures of the lever study, is in the README's *Choosing options*.
    "phase0": {
        "residual": True,  # predict the change to the average: training starts from the identity
        "intensity": "hu",  # one fixed HU window for every volume
        "no_dropout": True,
        "lambda_L1": 1000.0,
        "norm": "instance",
        "context_slices": 1,  # 2.5D: the slices above and below show where tissue moves along z
        "gan_mode": "lsgan",
        "l1_region": "body",  # outside the body the target is air: do not spend the loss there
    },
}
