"""Network tensors -> 8-bit images, turned for viewing, and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.intensity import network_to_pixels
from data.slicing import slice_for_display


def tensor_to_image(tensor: torch.Tensor, slice_axis: str = "axial") -> np.ndarray:
    """A (C, H, W) slice in [-1, 1] -> (H', W') uint8 in display orientation.

    With several channels (a 2.5D input) the centre channel, the slice itself, is shown.
    """
    channels = tensor.detach().float().cpu().numpy()
    image = channels[channels.shape[0] // 2]
    return np.rint(network_to_pixels(slice_for_display(image, slice_axis))).astype(np.uint8)


def save_png(image: np.ndarray, path: Path, size: int | None = None) -> None:
    """Save a 2D uint8 array as PNG, optionally scaled to ``size`` pixels wide."""
    picture = Image.fromarray(np.ascontiguousarray(image))
    if size is not None and picture.width != size:
        picture = picture.resize((size, max(1, round(picture.height * size / picture.width))), Image.BILINEAR)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
