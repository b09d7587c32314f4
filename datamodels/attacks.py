"""Adversarial accuracy: L-infinity PGD (Madry et al. 2018) in PIXEL space.

Images are attacked as floats in [0, 1] (uint8 / 255), before the dataset's normalisation,
so an epsilon reads as a share of the pixel range: eps = 8/255 allows each pixel to move by
8 grey levels. What :func:`pgd_linf` promises, per example:

- the perturbation stays in the L-inf ball, ``|x_adv - x| <= eps``, and in the image box [0, 1];
- the loss never falls below the clean loss: the attack keeps, per example, the iterate of
  highest cross-entropy seen (the clean input counts as one), so an attack can only lower
  accuracy.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pgd_linf", "adversarial_accuracy"]


def _loss(model, x01: torch.Tensor, y: torch.Tensor, mean, std) -> torch.Tensor:
    return F.cross_entropy(model((x01 - mean) / std).float(), y, reduction="none")


def pgd_linf(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, mean, std,
             steps: int = 10, step_size: float | None = None, random_start: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial images (B, C, H, W) in [0, 1] for float images ``x`` in [0, 1], labels ``y`` (B,).

    ``model`` takes normalised images ((x - mean) / std) and is left in eval mode; ``steps``
    signed-gradient ascent steps of ``step_size`` (default 2.5 eps / steps) on the
    cross-entropy, each projected onto the eps-ball and the box. Returns, per example, the
    iterate of highest loss (the clean image when none is higher).
    """
    if eps < 0 or steps < 1:
        raise ValueError(f"pgd: expected eps >= 0 and steps >= 1, got eps={eps}, steps={steps}")
    model.eval()
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    best = x.clone()
    with torch.no_grad():
        best_loss = _loss(model, x, y, mean, std)
    if eps == 0:
        return best
    adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1
        adv = torch.max(torch.min(x + eps * noise, hi), lo)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = _loss(model, adv, y, mean, std)
        (grad,) = torch.autograd.grad(loss.sum(), adv)
        with torch.no_grad():
            better = loss.detach() > best_loss
            best[better] = adv.detach()[better]
            best_loss = torch.where(better, loss.detach(), best_loss)
            adv = torch.max(torch.min(adv.detach() + step_size * grad.sign(), hi), lo)
    with torch.no_grad():  # the last step's result is a candidate too
        loss = _loss(model, adv, y, mean, std)
        better = loss > best_loss
        best[better] = adv[better]
    return best


def adversarial_accuracy(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor,
                         epsilons: Sequence[float], *, mean, std, steps: int = 10,
                         batch_size: int = 512) -> dict[float, float]:
    """{eps: accuracy under :func:`pgd_linf`} on uint8 images (B, C, H, W); eps 0 is clean accuracy."""
    out = {}
    for eps in epsilons:
        correct = 0
        for a in range(0, x_uint8.shape[0], batch_size):
            xb = x_uint8[a : a + batch_size].float() / 255.0
            yb = y[a : a + batch_size]
            adv = pgd_linf(model, xb, yb, eps=float(eps), mean=mean, std=std, steps=steps)
            with torch.no_grad():
                correct += int((model((adv - mean) / std).argmax(1) == yb).sum())
        out[float(eps)] = correct / max(1, x_uint8.shape[0])
    return out
