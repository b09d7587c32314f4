"""ResNet-9: the residual 9-layer network of the fast CIFAR-10 recipes, with a width setting.

Layout (widths w0..w3): prep conv(w0) -> stage 1: conv(w1), 2x2 max-pool, residual block ->
stage 2: conv(w2), pool -> stage 3: conv(w3), pool, residual block -> global max-pool ->
linear(K) * scale_out. Each conv is 3x3, no bias, followed by batch norm and ReLU.
(64, 128, 256, 512) is the full CIFAR-10 network; (16, 32, 64, 128) serves 8x8 digits
(8 -> 4 -> 2 -> 1 after the three pools).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["ResNet9", "build_model", "count_flops", "state_size", "flat_state", "load_flat_state"]


class ConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, pool: bool = False):
        layers = [
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(ConvBN(c, c), ConvBN(c, c))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """Input (B, C, H, W) float; output (B, K) logits."""

    def __init__(self, in_channels: int, num_classes: int, widths=(64, 128, 256, 512),
                 scale_out: float = 0.125):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.net = nn.Sequential(
            ConvBN(in_channels, w0),
            ConvBN(w0, w1, pool=True),
            Residual(w1),
            ConvBN(w1, w2, pool=True),
            ConvBN(w2, w3, pool=True),
            Residual(w3),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(w3, num_classes, bias=False),
        )
        self.scale_out = scale_out

    def forward(self, x):
        return self.net(x) * self.scale_out


def build_model(model_cfg, in_channels: int, num_classes: int) -> ResNet9:
    return ResNet9(in_channels, num_classes, tuple(model_cfg.widths), model_cfg.scale_out)


def state_size(widths, in_channels: int, num_classes: int) -> int:
    """P: length of :func:`flat_state` of a ResNet-9 with these widths (no model is built).

    Each ConvBN holds 9 c_in c_out conv weights and 4 c_out batch-norm values (weight, bias,
    running mean, running variance); the head holds w3 K weights.
    """
    w0, w1, w2, w3 = (int(w) for w in widths)
    convs = [(in_channels, w0), (w0, w1), (w1, w1), (w1, w1), (w1, w2), (w2, w3), (w3, w3), (w3, w3)]
    return sum(9 * a * b + 4 * b for a, b in convs) + w3 * int(num_classes)


def _state_items(model: nn.Module):
    """The float entries of the state dict (parameters and batch-norm statistics), in order;
    the integer batch counters carry nothing a forward pass uses."""
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]


def flat_state(model: nn.Module) -> np.ndarray:
    """(P,) float32: everything a trained model needs to predict again (see :func:`load_flat_state`)."""
    return torch.cat([v.detach().reshape(-1).float().cpu() for _, v in _state_items(model)]).numpy()


def load_flat_state(model: nn.Module, flat) -> nn.Module:
    """Load a :func:`flat_state` vector into ``model`` (same architecture) in place; return it."""
    flat = torch.as_tensor(np.asarray(flat, dtype=np.float32))
    items = _state_items(model)
    total = sum(v.numel() for _, v in items)
    if flat.numel() != total:
        raise ValueError(f"model state: expected {total} values for this architecture, got {flat.numel()}")
    state, a = {}, 0
    for k, v in items:
        state[k] = flat[a : a + v.numel()].view_as(v).to(v.dtype)
        a += v.numel()
    model.load_state_dict(state, strict=False)
    return model


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs (2 x multiply-accumulates of convs and linears) for one example.

    Batch norm, ReLU and pooling are ignored (a few percent). Training costs ~3x forward.
    """
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += 2 * k * out.numel() // out.shape[0]

    def lin_hook(m, inp, out):
        nonlocal total
        total += 2 * m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return int(total)
