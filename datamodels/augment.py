"""Batched image augmentation in torch, on whatever device the images live on.

All functions take uint8 or float (B, C, H, W) batches and an explicit ``torch.Generator``
(on the batch's device) so that a model's augmentations derive from its own seed, and they
work the same on CPU and CUDA. Random translation is a random crop of the zero-padded image,
which is what "random crop with padding" means in the CIFAR-10 recipes.
"""

from __future__ import annotations

import torch

__all__ = ["random_translate", "random_flip", "cutout", "augment_batch"]


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by (dy, dx) drawn uniformly from [-pad, pad]^2, filling with zeros.

    Equivalent to zero-padding by ``pad`` and cropping back at a random offset.
    """
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = off[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = off[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image along the WIDTH axis (the last one) with probability p."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square per image, centred uniformly at random (clipped at the border)."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=generator, device=x.device)
    cx = torch.randint(0, w, (b,), generator=generator, device=x.device)
    y0, x0 = cy - size // 2, cx - size // 2
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < (y0 + size)[:, None])  # (B, H)
    in_x = (xs >= x0[:, None]) & (xs < (x0 + size)[:, None])  # (B, W)
    hole = in_y[:, :, None] & in_x[:, None, :]
    return x.masked_fill(hole[:, None], 0)


def augment_batch(x: torch.Tensor, generator: torch.Generator, *, translate: int = 0,
                  flip: bool = False, cutout_size: int = 0) -> torch.Tensor:
    """Translate, then flip, then cutout: the order used by the CIFAR-10 recipes."""
    x = random_translate(x, translate, generator)
    if flip:
        x = random_flip(x, generator)
    return cutout(x, cutout_size, generator)
