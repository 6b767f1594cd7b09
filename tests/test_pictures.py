"""Pictures of CT slices (util/image.py): display windows, difference colours, aspect ratio, the coronal view."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from data.slicing import display_spacing_mm
from evaluation.results import coronal_index
from util.image import (
    DIFFERENCE_RANGE_HU,
    DISPLAY_WINDOWS,
    DisplayWindow,
    add_display_window_argument,
    colour_bar,
    difference_to_rgb,
    parse_display_windows,
    save_png,
)

WHITE, DARK_RED, DARK_BLUE = (247, 247, 247), (103, 0, 31), (5, 48, 97)


def test_windows_are_named_or_given_as_pairs_of_numbers():
    lung, custom, bone = parse_display_windows(["lung", "-600", "400", "bone"])
    assert (lung.lo_hu, lung.hi_hu, lung.label) == (-1350, 150, "lung window -1350..150 HU")
    assert (custom.lo_hu, custom.hi_hu, custom.key, custom.label) == (-600, 400, "-600_400", "window -600..400 HU")
    assert bone.label == "bone window -450..1050 HU"
    assert parse_display_windows(["soft_tissue"])[0].label == "soft-tissue window -160..240 HU"
    assert DisplayWindow.from_dict(custom.as_dict()) == custom


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (
            ["lungs"],
            "unknown display window 'lungs': choose one of bone, full, lung, soft_tissue; did you mean 'lung'?",
        ),
        (["-600"], "-600: a window given as numbers needs two"),
        (["-600", "lung"], "-600 lung: a window given as numbers needs two"),
        (["400", "-600"], "window 400 -600: needs finite numbers, low then high HU"),
        ([], "no display window given"),
    ],
)
def test_a_window_that_cannot_be_shown_is_refused_with_what_to_type(tokens, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_display_windows(tokens)


def test_the_flag_takes_negative_numbers_and_refuses_in_one_line(capsys):
    parser = argparse.ArgumentParser(prog="test.py")
    add_display_window_argument(parser, "the results page")
    assert parser.parse_args([]).display_window == ["lung", "soft_tissue"]
    assert parser.parse_args(["--display_window", "-1000", "200"]).display_window == ["-1000", "200"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--display_window", "liver"])
    assert "argument --display_window: unknown display window 'liver'" in capsys.readouterr().err


def test_a_window_maps_its_range_onto_black_to_white():
    lung = DisplayWindow("lung", *DISPLAY_WINDOWS["lung"])
    assert lung(np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])).tolist() == [0, 0, 128, 255, 255]


def test_differences_are_white_at_zero_red_above_blue_below_and_saturate():
    hu = np.array([[0.0, DIFFERENCE_RANGE_HU, -DIFFERENCE_RANGE_HU, 5000.0, -5000.0, np.nan]])
    colours = [tuple(c) for c in difference_to_rgb(hu)[0]]
    assert colours == [WHITE, DARK_RED, DARK_BLUE, DARK_RED, DARK_BLUE, WHITE]
    assert difference_to_rgb(np.zeros((3, 4))).shape == (3, 4, 3)


def test_the_colour_bar_runs_from_red_at_the_top_through_white_to_blue_at_the_bottom():
    column = [tuple(c) for c in colour_bar(height=256)[:, 17]]  # down the middle of the bar
    assert column.index(DARK_RED) < column.index(WHITE) < column.index(DARK_BLUE)


@pytest.mark.parametrize(
    ("axis", "expected"), [("axial", (2.0, 1.0)), ("coronal", (6.0, 1.0)), ("sagittal", (6.0, 2.0))]
)
def test_a_slices_row_and_column_spacing_follow_its_display_orientation(axis, expected):
    assert display_spacing_mm((1.0, 2.0, 6.0), axis) == expected


def test_save_png_draws_anisotropic_pixels_at_their_true_height(tmp_path):
    save_png(np.zeros((12, 64), dtype=np.uint8), tmp_path / "coronal.png", height_scale=6.0 / 2.7)
    assert Image.open(tmp_path / "coronal.png").size == (64, 27)  # 12 slices of 6 mm = 72 mm = 27 pixels of 2.7 mm
    save_png(np.zeros((12, 64, 3), dtype=np.uint8), tmp_path / "wide.png", size=128, height_scale=2.0)
    assert Image.open(tmp_path / "wide.png").size == (128, 48)


def test_the_coronal_view_goes_where_input_and_target_differ_most_else_through_the_body():
    volume = np.full((8, 20, 6), -1000.0, dtype=np.float32)
    volume[2:6, 4:15, :] = 40.0  # a body from y = 4 to 14
    target = volume.copy()
    target[3:5, 11, 2:4] = -800.0  # what moved
    assert coronal_index(volume, target) == (11, "where input and target differ most (through the moving diaphragm)")
    assert coronal_index(volume, volume.copy())[1] == "through the body's centre"
    assert coronal_index(volume, None) == (9, "through the body's centre")
    assert coronal_index(np.full((4, 6, 3), -1000.0), None) == (3, "the middle slice")
