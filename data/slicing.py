"""Cutting canonical (X, Y, Z) volumes into 2D slices along an anatomical axis, and back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Axis of the canonical RAS+ array (see data/volume_io.py) that each slice orientation holds
# constant: an axial slice has one superior-inferior position, i.e. one index along Z.
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def volume_to_slices(volume: np.ndarray, slice_axis: str) -> np.ndarray:
    """(X, Y, Z) canonical volume -> (N, H, W) stack of slices along ``slice_axis`` (a view)."""
    return np.moveaxis(volume, SLICE_AXES[slice_axis], 0)


def slices_to_volume(slices: np.ndarray, slice_axis: str) -> np.ndarray:
    """Inverse of :func:`volume_to_slices`: (N, H, W) -> canonical (X, Y, Z)."""
    return np.moveaxis(slices, 0, SLICE_AXES[slice_axis])


def resize_slices(slices: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (N, H, W) stack to (N, *size), antialiased when shrinking.

    Returns a float32 tensor; a stack already at ``size`` is returned unchanged (no blur).
    """
    stack = torch.as_tensor(np.ascontiguousarray(slices) if isinstance(slices, np.ndarray) else slices)
    stack = stack.float()
    if tuple(stack.shape[-2:]) == tuple(size):
        return stack
    shrinking = size[0] < stack.shape[-2] or size[1] < stack.shape[-1]
    resized = F.interpolate(stack[:, None], size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return resized[:, 0]


def context_indices(index: int, n_slices: int, context_slices: int) -> np.ndarray:
    """Indices of a slice and its ``context_slices`` neighbours on each side, edges repeated.

    ``context_indices(0, 10, 2) -> [0, 0, 0, 1, 2]``: at a volume's edge the nearest existing
    slice stands in for the missing neighbours, so every input has ``1 + 2K`` channels.
    """
    offsets = np.arange(-context_slices, context_slices + 1)
    return np.clip(index + offsets, 0, n_slices - 1)


def slice_for_display(image: np.ndarray, slice_axis: str) -> np.ndarray:
    """A canonical slice turned the way radiologists view it.

    Axial: anterior at the top, the patient's right on the viewer's left. Coronal and
    sagittal: superior at the top.
    """
    # Axial (X, Y) and coronal (X, Z) slices: rows from anterior/superior down, columns right..left.
    if slice_axis in ("axial", "coronal"):
        return image.T[::-1, ::-1]
    return image.T[::-1, :]  # sagittal (Y, Z): rows superior..inferior, columns posterior..anterior


def display_spacing_mm(spacing_mm: Sequence[float], slice_axis: str) -> tuple[float, float]:
    """(row, column) spacing in mm of a slice along ``slice_axis`` once turned by :func:`slice_for_display`.

    ``slice_for_display`` transposes the slice: of the two canonical axes it keeps, the second
    runs down the rows and the first across the columns.
    """
    first, second = (axis for axis in range(3) if axis != SLICE_AXES[slice_axis])
    return float(spacing_mm[second]), float(spacing_mm[first])
