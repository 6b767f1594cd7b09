"""LPIPS of CT volumes: a learned perceptual distance, slice by slice in the body's bounding box.

LPIPS (Zhang et al., CVPR 2018, version 0.1, the ``lpips`` package's default) compares two
images through a network's feature maps: each of five layers' features is unit-normalised
over channels, the squared difference is weighted per channel by a linear layer learnt from
human judgements, averaged over space, and the five layers are summed. 0 means identical,
larger means more different to a human eye (lower is better, like MAE).

How a volume is scored (:meth:`LpipsScorer.score`):

* the target's body mask (``evaluation.metrics.body_mask``) gives the box: the x, y bounding
  box of the mask over all slices, and the z range of slices that hold some of it. The same
  box is cut from every volume scored against that target;
* each axial slice ``volume[x0:x1, y0:y1, k]`` in that range is turned the way it is viewed
  (``data.slicing.slice_for_display``), clipped to [-1024, 3071] HU and mapped linearly to
  [-1, 1] (the range LPIPS takes), and its one channel is repeated to three;
* the volume's LPIPS is the mean of the slices' LPIPS.

The network is AlexNet's five convolution stages (LPIPS's default backbone), with
torchvision's ImageNet weights, and the ``lpips`` package's linear layers. Nothing is ever
downloaded: :meth:`LpipsScorer.from_torchvision_cache` reads the AlexNet file from
torchvision's model cache and the linear layers from the installed package, and returns None
with one log line naming the missing file otherwise.

Why not ``lpips.LPIPS`` itself: it builds AlexNet through torchvision, whose PyPI wheel for
torch 2.13.0 is a CUDA build that does not import beside the CPU torch (``operator
torchvision::nms does not exist``). The layers are rebuilt here instead, with torchvision's
layer indices so that torchvision's weight file loads as it is; ``tests/test_lpips.py``
checks the result against ``lpips.LPIPS`` wherever the package imports.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.slicing import slice_for_display
from evaluation.metrics import RANGE_HU, body_mask

logger = logging.getLogger(__name__)

# torchvision's ImageNet AlexNet, as torchvision names it in its cache (torch.hub.get_dir()/checkpoints/).
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
LPIPS_VERSION = "0.1"
# LPIPS v0.1 standardises its [-1, 1] input per channel to ImageNet's statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# AlexNet's three strided stages need at least 31 pixels; smaller boxes are padded with air.
ALEXNET_MIN_SIZE_PX = 32


class AlexNetFeatures(nn.Module):
    """AlexNet's convolution stages, returning the five ReLU outputs LPIPS compares.

    ``features`` has torchvision's ``AlexNet.features`` layer indices, so the ``features.*``
    entries of torchvision's state dict load into it unchanged. Input (N, 3, H, W) with
    H, W >= 31; outputs (N, 64, ., .), (N, 192, ., .), (N, 384, ., .), (N, 256, ., .) and
    (N, 256, ., .).
    """

    channels = (64, 192, 384, 256, 256)
    taps = (1, 4, 7, 9, 11)  # indices of the ReLUs whose outputs are compared

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )  # torchvision's final max-pool (index 12) feeds no tap and is left out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the ``features.*`` entries of a torchvision AlexNet state dict (the classifier is ignored).

        Raises:
            RuntimeError: an entry is missing or has the wrong shape.
        """
        self.load_state_dict({k: v for k, v in state_dict.items() if k.startswith("features.")}, strict=True)


class LpipsScorer:
    """LPIPS distance of HU volumes to a target volume (see the module docstring).

    Args:
        backbone: maps (N, 3, H, W) float32 images (LPIPS-standardised) to a sequence of L
            feature maps (N, C_l, h_l, w_l). Any module does; the real one is
            :class:`AlexNetFeatures` with ImageNet weights.
        linear_weights: L non-negative per-channel weights, each with C_l values (any shape,
            e.g. the package's (1, C_l, 1, 1)).
        device: where the backbone runs.
        batch_size: slices per forward pass (memory grows with it and with the box's size).
        min_size_px: boxes smaller than this along x or y are padded with air to it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        linear_weights: Sequence[torch.Tensor],
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        min_size_px: int = ALEXNET_MIN_SIZE_PX,
    ):
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        # (1, C_l, 1, 1) each: LPIPS's 1x1 convolution without bias.
        self.linear_weights = [
            torch.as_tensor(w, dtype=torch.float32).reshape(1, -1, 1, 1).to(self.device) for w in linear_weights
        ]
        self.batch_size = batch_size
        self.min_size_px = min_size_px
        self._shift = torch.tensor(_SHIFT, device=self.device).reshape(1, 3, 1, 1)
        self._scale = torch.tensor(_SCALE, device=self.device).reshape(1, 3, 1, 1)

    @classmethod
    def from_torchvision_cache(cls, device: torch.device | str = "cpu") -> LpipsScorer | None:
        """The real LPIPS (AlexNet, v0.1), or None, with one log line, when a weight file is missing.

        AlexNet's weights come from ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``
        (where torchvision caches them; ``$TORCH_HOME/hub/checkpoints/`` when TORCH_HOME is
        set), the linear layers from the installed ``lpips`` package
        (``lpips/weights/v0.1/alex.pth``). Nothing is downloaded.
        """
        alexnet_path = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
        if not alexnet_path.is_file():
            logger.warning(
                "LPIPS skipped: %s not found; put torchvision's ImageNet AlexNet weights (%s) there to score LPIPS",
                alexnet_path,
                ALEXNET_URL,
            )
            return None
        linear_path = lpips_package_weights()
        if linear_path is None:
            logger.warning("LPIPS skipped: the lpips package is not installed (pip install -r requirements.txt)")
            return None
        try:
            backbone = AlexNetFeatures()
            backbone.load_torchvision_state_dict(torch.load(alexnet_path, map_location="cpu", weights_only=True))
            linear = torch.load(linear_path, map_location="cpu", weights_only=True)
            linear_weights = [linear[f"lin{layer}.model.1.weight"] for layer in range(len(AlexNetFeatures.channels))]
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            logger.warning("LPIPS skipped: %s or %s cannot be loaded (%s)", alexnet_path, linear_path, err)
            return None
        return cls(backbone, linear_weights, device)

    def score(
        self, volumes: Sequence[np.ndarray], target_hu: np.ndarray, mask: np.ndarray | None = None
    ) -> list[float]:
        """Mean LPIPS over the axial slices of the body's box, of each volume against the target.

        Args:
            volumes: canonical (X, Y, Z) HU volumes, each of the target's shape (a generated
                volume, the input for the baseline, ...).
            target_hu: canonical (X, Y, Z) HU target.
            mask: (X, Y, Z) bool body mask of the target; default ``body_mask(target_hu)``.

        Returns:
            One LPIPS per volume, in order; 0 for a volume equal to the target in the box.

        Raises:
            ValueError: a shape differs from the target's, or the mask is empty.
        """
        box = body_box(body_mask(target_hu) if mask is None else mask)
        for volume in volumes:
            if np.shape(volume) != np.shape(target_hu):
                raise ValueError(f"volume shape {np.shape(volume)} differs from the target's {np.shape(target_hu)}")
        z_slices = range(box[2].start, box[2].stop)
        sums = [0.0] * len(volumes)
        with torch.no_grad():
            for start in range(0, len(z_slices), self.batch_size):
                ks = z_slices[start : start + self.batch_size]
                target_features = self._features(self._images(target_hu, box, ks))
                for i, volume in enumerate(volumes):
                    # (B,): one distance per slice, summed here and averaged at the end.
                    distances = self._distance(self._features(self._images(volume, box, ks)), target_features)
                    sums[i] += float(distances.sum(dtype=torch.float64))
        return [total / len(z_slices) for total in sums]

    def _images(self, volume: np.ndarray, box: tuple[slice, slice, slice], ks: range) -> torch.Tensor:
        """(B, 3, H, W) float32 in [-1, 1], then LPIPS-standardised: slices ``ks`` of the box, as viewed."""
        xs, ys, _ = box
        stack = np.stack([slice_for_display(np.asarray(volume[xs, ys, k]), "axial") for k in ks])  # (B, H, W) HU
        lo, hi = RANGE_HU
        images = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)).clamp_(lo, hi)
        images = (images - lo) * (2.0 / (hi - lo)) - 1.0
        pad_h, pad_w = (max(0, self.min_size_px - n) for n in images.shape[1:])
        if pad_h or pad_w:  # air around the box, as in the volume
            images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0)
        images = images[:, None].expand(-1, 3, -1, -1).to(self.device)  # one channel repeated to three
        return (images - self._shift) / self._scale

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = list(self.backbone(images))
        if len(features) != len(self.linear_weights):
            raise ValueError(f"backbone gave {len(features)} feature maps for {len(self.linear_weights)} linear layers")
        # Unit length over channels (eps as in lpips.normalize_tensor).
        return [f.float() / (f.float().pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in features]

    def _distance(self, features: list[torch.Tensor], target_features: list[torch.Tensor]) -> torch.Tensor:
        """(B,) LPIPS of each slice: weighted squared differences, averaged over space, summed over layers."""
        total = 0.0
        for f0, f1, weight in zip(features, target_features, self.linear_weights):
            total = total + F.conv2d((f0 - f1) ** 2, weight).mean(dim=(1, 2, 3))
        return total


def body_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """``(xs, ys, zs)``: the x, y bounding box of a (X, Y, Z) mask over all slices, and its z range.

    Raises:
        ValueError: the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or not mask.any():
        raise ValueError(f"LPIPS needs a non-empty (X, Y, Z) body mask, got {mask.sum()} voxel(s) of {mask.shape}")
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def lpips_package_weights(net: str = "alex") -> Path | None:
    """The installed ``lpips`` package's linear-layer file for ``net`` (v0.1), or None.

    The package is located without importing it: its import loads torchvision, which may
    not import beside this torch (see the module docstring).
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"
    return path if path.is_file() else None
