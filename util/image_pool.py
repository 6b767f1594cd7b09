"""A history of generated images for the discriminator (Shrivastava et al., 2017), as CycleGAN uses it.

D learns from a mix of the generator's latest images and older ones, which damps the
oscillation of the two players. :meth:`ImagePool.query` stores up to ``pool_size`` images;
once full, each new image is, with probability 1/2, swapped for a random stored one (the
stored one is returned and the new one kept), else returned as it is. Upstream's rule.

The draws come from the pool's own ``torch.Generator`` (not the global one), and
:meth:`ImagePool.state_dict` holds the stored images and that generator's state, so a
resumed run returns exactly the images an uninterrupted run would (the model keeps the
state with the checkpoint's training state).
"""

from __future__ import annotations

import torch

__all__ = ["ImagePool"]


class ImagePool:
    """Up to ``pool_size`` past images; ``pool_size`` 0 turns the pool off (query returns its input).

    Args:
        pool_size: how many images are kept.
        seed: seeds the pool's generator (the run's ``--seed``).
    """

    def __init__(self, pool_size: int, seed: int = 0):
        self.pool_size = int(pool_size)
        self.images: list[torch.Tensor] = []  # each (C, H, W), detached
        self.generator = torch.Generator().manual_seed(int(seed))

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Images for D: (B, C, H, W) in, (B, C, H, W) out, detached from the generator's graph."""
        images = images.detach()
        if self.pool_size == 0:
            return images
        returned = []
        for image in images:
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                returned.append(image)
            elif float(torch.rand((), generator=self.generator)) < 0.5:
                index = int(torch.randint(len(self.images), (), generator=self.generator))
                returned.append(self.images[index])
                self.images[index] = image.clone()
            else:
                returned.append(image)
        return torch.stack(returned)

    def state_dict(self) -> dict:
        """The stored images (on the CPU) and the generator's state."""
        return {"images": [image.cpu() for image in self.images], "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        """Put back what :meth:`state_dict` returned; images go to ``device``.

        Raises:
            ValueError: the state holds more images than ``pool_size``.
        """
        images = list(state["images"])
        if len(images) > self.pool_size:
            raise ValueError(f"the saved pool holds {len(images)} images, more than --pool_size {self.pool_size}")
        self.images = [image.to(device) if device is not None else image for image in images]
        self.generator.set_state(state["generator"])
