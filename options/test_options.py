"""test.py's flags. The flags that define the model are one group, taken from the trained run.

The file keeps upstream pix2pix's name, ``options/test_options.py`` (beside
``train_options.py`` and ``base_options.py``), because users of the fork know where upstream
keeps test.py's flags; it holds options for testing, not tests.

test.py rebuilds the network, its slice size and its intensity window from the run folder's
``train_opt.json`` (inference/volume.py's ``load_generator``). Upstream's model-defining flags
(``--netG``, ``--norm``, ``--input_nc``, ``--resize_to``, ...; util/run_folder.py's
``MODEL_DEFINING_OPTIONS``) are still accepted, so that upstream's and the reference's test
commands run as written. They are gathered in one group of ``--help``, their defaults are
the run's values, and a value given that differs from the run's is ignored with a warning
(evaluation/results.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from options.base_options import BaseOptions, OptionsError, load_saved_options, saved_model_defaults
from options.cli import add_output_dtype_argument
from util.image import add_display_window_argument
from util.run_folder import MODEL_DEFINING_OPTIONS

TRAINED_MODEL_GROUP = "the trained model (taken from <checkpoints_dir>/<name>/train_opt.json)"
TRAINED_MODEL_HELP = (
    "test.py rebuilds the network, its slice size and its intensity window from the run folder's "
    "train_opt.json. These flags are accepted so that pix2pix's and the reference's test commands run as "
    "written; their defaults are the run's values, and a value that differs from the run's is ignored with a warning."
)


class TestOptions(BaseOptions):
    is_train = False

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = super().initialize(parser)
        g = parser.add_argument_group("testing")
        g.add_argument("--results_dir", default="./results/", help="pages and metrics go to <results_dir>/<name>/<phase>_<epoch>/")
        g.add_argument("--aspect_ratio", type=float, default=1.0, help="aspect ratio of result images")
        g.add_argument("--phase", default="test", help="data subfolders <phase>A/ (and <phase>B/ for metrics)")
        g.add_argument("--eval", action="store_true", help="kept for pix2pix compatibility: networks always run in eval mode here")
        g.add_argument("--num_test", type=int, default=50, help="how many patients (volumes) to test")
        g.add_argument("--num_images", type=int, default=5, help="slices per patient shown on the HTML page (metrics use all)")
        add_display_window_argument(g, "the results page")
        add_output_dtype_argument(g)
        g.add_argument("--lpips", action="store_true",
                       help="also score LPIPS (slow on a CPU); needs torchvision's AlexNet weights in "
                            "<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth, and is skipped with one line without them")
        # Test-time behaviour that is fixed, not chosen: no flips, slices in order.
        parser.set_defaults(no_flip=True, serial_batches=True)
        return parser

    def build_parser(self, argv: list[str]) -> argparse.ArgumentParser:
        parser = super().build_parser(argv)
        gather_model_flags(parser)
        return parser

    def set_saved_defaults(self, parser: argparse.ArgumentParser, known: argparse.Namespace) -> None:
        saved = load_saved_options(Path(known.checkpoints_dir) / known.name)
        if saved is not None:
            parser.set_defaults(**saved_model_defaults(parser, saved))

    def validate(self, opt: argparse.Namespace, argv: list[str]) -> None:
        super().validate(opt, argv)
        if not opt.dataroot:
            raise OptionsError("--dataroot is required: the folder that holds testA/ (and testB/)")
        if opt.num_test < 1 or opt.num_images < 0:
            raise OptionsError("--num_test must be at least 1 and --num_images 0 or more")


def gather_model_flags(parser: argparse.ArgumentParser) -> None:
    """Move the model-defining flags, wherever the base options and the plug-ins added them, into
    one documented group of ``--help`` (a group left empty is not shown)."""
    group = parser.add_argument_group(TRAINED_MODEL_GROUP, TRAINED_MODEL_HELP)
    # argparse has no public way to move a flag to another group; groups only shape --help.
    for other in parser._action_groups:
        if other is group:
            continue
        for action in [a for a in other._group_actions if a.dest in MODEL_DEFINING_OPTIONS]:
            other._group_actions.remove(action)
            group._group_actions.append(action)
