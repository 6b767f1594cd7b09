"""Intensity mappings between file units (HU for CT), the 0-255 range and the network's range.

The network sees values in [-1, 1] (pix2pix's convention, matching its Tanh output); images
and the reference's "normalise to [0, 255]" live in between. A window maps
``[lo, hi]`` (file units) linearly onto ``[0, 255]`` and clips outside it; ``.inverse``
maps 0-255 values back to file units.

Two ways to choose the window (``--intensity``):

* ``volume`` (the reference's behaviour, default): each volume's own finite min and max.
  Every volume fills the full range, whatever its scanner offset, but the mapping depends
  on the volume, so going back to HU at inference uses the *input's* window: an
  approximation wherever the target's min/max differ from the input's.
* ``hu``: one fixed window for every volume (``--hu_min -1024 --hu_max 3071`` by default,
  the range SynthRAD scores in). Identical HU give identical network inputs across
  patients and the inverse is exact inside the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INTENSITY_MODES = ("volume", "hu")
PIXEL_MAX = 255.0


@dataclass(frozen=True)
class HUWindow:
    """Maps ``[lo_hu, hi_hu]`` onto ``[0, 255]`` (clipped); ``.inverse`` maps back."""

    lo_hu: float
    hi_hu: float

    def __post_init__(self):
        if not (np.isfinite(self.lo_hu) and np.isfinite(self.hi_hu)) or self.hi_hu <= self.lo_hu:
            raise ValueError(f"window needs finite lo_hu < hi_hu, got [{self.lo_hu}, {self.hi_hu}]")

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(hu, dtype=np.float32) - self.lo_hu) * (PIXEL_MAX / (self.hi_hu - self.lo_hu))
        return np.clip(scaled, 0.0, PIXEL_MAX)

    @property
    def inverse(self) -> InverseWindow:
        return InverseWindow(self)

    def as_dict(self) -> dict[str, float]:
        return {"lo_hu": float(self.lo_hu), "hi_hu": float(self.hi_hu)}


@dataclass(frozen=True)
class InverseWindow:
    """0-255 values -> file units, the inverse of an :class:`HUWindow`."""

    window: HUWindow

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, dtype=np.float32)
        return pixels * ((self.window.hi_hu - self.window.lo_hu) / PIXEL_MAX) + self.window.lo_hu


def window_for(volume: np.ndarray, mode: str, hu_min: float, hu_max: float) -> HUWindow:
    """The window a volume is normalised with under ``--intensity mode``.

    Raises:
        ValueError: ``mode == "volume"`` and the volume has no finite voxels or is constant.
    """
    if mode == "hu":
        return HUWindow(hu_min, hu_max)
    if mode != "volume":
        raise ValueError(f"unknown intensity mode {mode!r}: choose one of {', '.join(INTENSITY_MODES)}")
    lo, hi = float(np.min(volume)), float(np.max(volume))
    if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN or Inf somewhere: look at the rest
        finite = volume[np.isfinite(volume)]
        if finite.size == 0:
            raise ValueError("no finite voxels: every voxel is NaN or Inf")
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        raise ValueError(f"constant volume (every voxel is {lo:g})")
    return HUWindow(lo, hi)


def pixels_to_network(pixels: np.ndarray) -> np.ndarray:
    """[0, 255] -> [-1, 1]."""
    return np.asarray(pixels, dtype=np.float32) / (PIXEL_MAX / 2) - 1.0


def network_to_pixels(values: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 255] (clipped, as the Tanh output can only approach the bounds)."""
    return np.clip((np.asarray(values, dtype=np.float32) + 1.0) * (PIXEL_MAX / 2), 0.0, PIXEL_MAX)
