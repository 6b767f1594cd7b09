"""Test flags. The model-defining flags default to what the run was trained with."""

from __future__ import annotations

import argparse
from pathlib import Path

from options.base_options import BaseOptions, OptionsError, load_saved_options, saved_model_defaults
from util.image import add_display_window_argument


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
        g.add_argument("--output_dtype", default="int16", choices=("int16", "float32"), help="data type of the written volumes")
        g.add_argument("--lpips", action="store_true",
                       help="also score LPIPS (slow on a CPU); needs torchvision's AlexNet weights in "
                            "<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth, and is skipped with one line without them")
        # Test-time behaviour that is fixed, not chosen: no flips, slices in order.
        parser.set_defaults(no_flip=True, serial_batches=True)
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
