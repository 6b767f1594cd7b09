"""Slices -> pictures: CT display windows, difference maps and their colour bar, PNG files.

Two kinds of picture, both of 2D slices in HU already turned for viewing (data/slicing.py's
``slice_for_display``; this module takes arrays and knows nothing of volumes or networks):

* a **windowed** slice, as a CT viewer shows it: HU in a display window ``lo..hi`` map
  linearly onto 0..255 gray, clipped outside. :data:`DISPLAY_WINDOWS` names the usual ones;
  the result and training pages show :data:`DEFAULT_DISPLAY_WINDOWS` (lung and soft tissue)
  unless ``--display_window`` picks others (:func:`parse_display_windows`).
* a **difference** map (e.g. generated - target, in HU) on one diverging colour scale: blue
  below 0, white at 0, red above, saturated at +-:data:`DIFFERENCE_RANGE_HU`, the same for
  every picture so that colours compare; :func:`colour_bar` draws its key.

Voxels are rarely cubes (e.g. 2.7 x 2.7 x 6 mm): :func:`save_png` stretches a picture's
height by ``height_scale``, a row's spacing over a column's (data/slicing.py's
``display_spacing_mm``), so that anatomy keeps its true shape.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from util.registry import unknown_name_error

# name -> (lo, hi) HU. Lung: width 1500, level -600; soft tissue: width 400, level 40;
# bone: width 1500, level 300; full: the 12-bit CT range that the metrics clip to.
DISPLAY_WINDOWS = {
    "lung": (-1350.0, 150.0),
    "soft_tissue": (-160.0, 240.0),
    "bone": (-450.0, 1050.0),
    "full": (-1024.0, 3071.0),
}
DEFAULT_DISPLAY_WINDOWS = ("lung", "soft_tissue")
# Breathing moves lung (-850 HU) against liver and diaphragm (+50 HU): differences of several
# hundred HU are what a missed motion looks like; beyond 500 HU the colour saturates.
DIFFERENCE_RANGE_HU = 500.0
COLOUR_BAR_WIDTH = 96  # pixels
# The colour bar's file beside a page's images, and the label of a row of difference maps.
COLOUR_BAR_PNG = "difference_colour_bar.png"
DIFFERENCE_ROW_LABEL = f"difference, HU (colour scale ±{DIFFERENCE_RANGE_HU:g})"
# Diverging blue-white-red anchors (ColorBrewer RdBu) at -1, -0.5, 0, 0.5, 1 of the range.
_DIFFERENCE_ANCHORS = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
_DIFFERENCE_COLOURS = np.array(
    [[5, 48, 97], [67, 147, 195], [247, 247, 247], [214, 96, 77], [103, 0, 31]], dtype=np.float32
)


@dataclass(frozen=True)
class DisplayWindow:
    """A CT display window: ``lo_hu..hi_hu`` shown as black..white.

    ``name`` is a key of :data:`DISPLAY_WINDOWS`, or ``""`` for a window given as two numbers.
    """

    name: str
    lo_hu: float
    hi_hu: float

    @property
    def key(self) -> str:
        """The window's part of a file name: ``lung``, or ``-600_400`` for a window given as numbers."""
        return self.name or f"{self.lo_hu:g}_{self.hi_hu:g}"

    @property
    def label(self) -> str:
        """How pages name it: ``lung window -1350..150 HU``."""
        kind = f"{self.name.replace('_', '-')} window" if self.name else "window"
        return f"{kind} {self.lo_hu:g}..{self.hi_hu:g} HU"

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """HU -> uint8 gray, 0 at or below ``lo_hu``, 255 at or above ``hi_hu``, linear between."""
        gray = (np.asarray(hu, dtype=np.float32) - self.lo_hu) * (255.0 / (self.hi_hu - self.lo_hu))
        return np.rint(np.clip(gray, 0.0, 255.0)).astype(np.uint8)

    def as_dict(self) -> dict:
        return {"name": self.name, "lo_hu": float(self.lo_hu), "hi_hu": float(self.hi_hu)}

    @classmethod
    def from_dict(cls, values: dict) -> DisplayWindow:
        return cls(str(values["name"]), float(values["lo_hu"]), float(values["hi_hu"]))


def parse_display_windows(tokens: Sequence[str]) -> list[DisplayWindow]:
    """``--display_window``'s words -> windows: each a name of :data:`DISPLAY_WINDOWS` or two numbers.

    ``["lung", "-600", "400"]`` -> the lung window and a window from -600 to 400 HU.

    Raises:
        ValueError: no window, an unknown name (with the closest one), a number without its
            partner, or a low end not below the high end.
    """
    windows, numbers = [], []
    for token in tokens:
        try:
            numbers.append(float(token))
        except ValueError:
            if numbers:
                raise ValueError(
                    f"{numbers[0]:g} {token}: a window given as numbers needs two, low then high HU"
                ) from None
            if token not in DISPLAY_WINDOWS:
                raise unknown_name_error("display window", token, DISPLAY_WINDOWS) from None
            windows.append(DisplayWindow(token, *DISPLAY_WINDOWS[token]))
            continue
        if len(numbers) == 2:
            lo, hi = numbers
            numbers = []
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"window {lo:g} {hi:g}: needs finite numbers, low then high HU (e.g. -600 400)")
            windows.append(DisplayWindow("", lo, hi))
    if numbers:
        raise ValueError(f"{numbers[0]:g}: a window given as numbers needs two, low then high HU (e.g. -600 400)")
    if not windows:
        raise ValueError("no display window given")
    return windows


class DisplayWindowAction(argparse.Action):
    """Checks ``--display_window``'s words (:func:`parse_display_windows`) and keeps them as given."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            parse_display_windows(values)
        except ValueError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        setattr(namespace, self.dest, list(values))


def add_display_window_argument(group, where: str) -> None:
    """Add ``--display_window`` to an argparse group; ``where`` says which page it acts on."""
    names = ", ".join(f"{name} {lo:g}..{hi:g}" for name, (lo, hi) in DISPLAY_WINDOWS.items())
    group.add_argument(
        "--display_window",
        nargs="+",
        default=list(DEFAULT_DISPLAY_WINDOWS),
        action=DisplayWindowAction,
        metavar="WINDOW",
        help=f"CT windows of the slices on {where}: names ({names} HU) or two numbers, low then high HU, "
        "e.g. --display_window lung -600 400",
    )


def difference_to_rgb(difference_hu: np.ndarray, range_hu: float = DIFFERENCE_RANGE_HU) -> np.ndarray:
    """(H, W) HU differences -> (H, W, 3) uint8: blue < 0 < red, white at 0, saturated at +-``range_hu``."""
    position = np.clip(np.nan_to_num(np.asarray(difference_hu, dtype=np.float32)) / range_hu, -1.0, 1.0)
    channels = [np.interp(position, _DIFFERENCE_ANCHORS, _DIFFERENCE_COLOURS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def colour_bar(range_hu: float = DIFFERENCE_RANGE_HU, height: int = 256) -> np.ndarray:
    """The key of :func:`difference_to_rgb`: (height, COLOUR_BAR_WIDTH, 3) uint8, +range at the top, in HU."""
    bar_left, bar_right, top = 6, 28, 22
    bottom = top + (height - 10 - top) // 2 * 2 + 1  # an odd number of rows: the middle one is 0 HU
    image = Image.new("RGB", (COLOUR_BAR_WIDTH, height), "white")
    rows = np.linspace(range_hu, -range_hu, bottom - top)[:, None]  # top row: +range
    bar = difference_to_rgb(np.repeat(rows, bar_right - bar_left, axis=1), range_hu)
    image.paste(Image.fromarray(bar), (bar_left, top))
    draw = ImageDraw.Draw(image)
    font = label_font()
    draw.text((bar_left, 3), "HU", fill="black", font=font)
    draw.rectangle((bar_left - 1, top - 1, bar_right, bottom), outline="black")  # around the bar, not on it
    for fraction in (1.0, 0.5, 0.0, -0.5, -1.0):
        y = top + (1.0 - fraction) / 2 * (bottom - top - 1)
        draw.line([(bar_right, y), (bar_right + 4, y)], fill="black")
        draw.text((bar_right + 7, y - 7), f"{fraction * range_hu:+g}" if fraction else "0", fill="black", font=font)
    return np.asarray(image)


def label_font() -> ImageFont.ImageFont:
    """Pillow's built-in font at 13 px (its small bitmap font before Pillow 10.1)."""
    try:
        return ImageFont.load_default(size=13)
    except TypeError:
        return ImageFont.load_default()


def save_png(
    image: np.ndarray, path: Path, size: int | None = None, height_scale: float = 1.0, compress_level: int = 6
) -> None:
    """Save a (H, W) uint8 gray or (H, W, 3) uint8 colour array as PNG.

    Args:
        size: the width in pixels (default: the array's); the height follows.
        height_scale: how much taller than wide one pixel is drawn: a row's spacing over a
            column's, so that anisotropic voxels keep their shape (1: square pixels).
        compress_level: zlib level 0-9 (PIL's default 6); lower is faster and larger, the
            pixels are the same.
    """
    picture = Image.fromarray(np.ascontiguousarray(image))
    width = size or picture.width
    height = max(1, round(picture.height * height_scale * width / picture.width))
    if (width, height) != picture.size:
        picture = picture.resize((width, height), Image.BILINEAR)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, compress_level=compress_level)
