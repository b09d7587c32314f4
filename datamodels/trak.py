"""TRAK on our own models: per-example margin gradients, count-sketched, and a ridge kernel.

For each featurised model m (trained on a random alpha-subset like a collect model, through the
spec path: table ``trak/p<P>``, key (m,)) we record

    Phi_m  (N, P)  train_grads: d margin(x_i) / d theta, projected to P dims
    Psi_m  (T, P)  test_grads:  the same for the targets

with per-example gradients from ``torch.func`` (``vmap(grad(margin))``, the model in eval mode)
and a count sketch as the projection: every parameter j goes to one bucket h(j) < P with a sign
s(j) (from the model's seed), so projecting a gradient costs one pass over it (``index_add_``)
instead of a dense (d, P) matmul -- the dense projection was ~60x a model's training on CPU.
Inner products are preserved in expectation, as for a Gaussian projection.

The score of training example i for target t is, averaged over models (TRAK's eq. with the
Gauss-Newton kernel, without the (1 - p) reweighting):

    tau[i, t] = mean_m  Phi_m[i] (Phi_m^T Phi_m + lam_m I)^-1 Psi_m[t]^T,
    lam_m = trak_ridge * trace(Phi_m^T Phi_m) / P

The ridge term keeps the kernel invertible when P >= N (the released implementation's kernel
is singular there). tau is in arbitrary units per target; :mod:`datamodels.estimators`
calibrates it to margins on masks (one scale per target) so it is a datamodel like the others.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from datamodels.domains import TRAK_DOMAIN
from datamodels.train import _normalise, training_seed

__all__ = ["projected_grads", "trak_spec", "trak_table_path", "trak_scores", "TRAK_DOMAIN", "TRAK_OUTPUTS"]

TRAK_OUTPUTS = ("test_margins", "test_grads", "train_grads")


def projected_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, dim: int, seed: int, mean, std,
                    batch_size: int = 64) -> torch.Tensor:
    """(B, dim) float32: count sketch of d margin / d parameters for each uint8 image of ``x``
    (B, C, H, W) with true label ``y`` (B,). The sketch (bucket and sign per parameter) is a
    pure function of ``seed``, so every example of one model is projected the same way."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    sketch = {}
    for k, v in params.items():
        n = v.numel()
        h = torch.randint(0, dim, (n,), generator=gen)
        s = torch.randint(0, 2, (n,), generator=gen).float().mul_(2).sub_(1)
        sketch[k] = (h.to(v.device), s.to(v.device))

    def margin(p, xb, onehot):
        out = functional_call(model, (p, buffers), (xb[None],))[0]
        correct = (out * onehot).sum()
        others = torch.where(onehot, torch.full_like(out, -float("inf")), out)
        return correct - others.max()

    per_example = vmap(grad(margin), in_dims=(None, 0, 0))
    k_classes = None
    out = []
    for a in range(0, x.shape[0], batch_size):
        xb = _normalise(x[a : a + batch_size], mean, std)
        yb = y[a : a + batch_size]
        if k_classes is None:
            with torch.no_grad():
                k_classes = model(xb[:1]).shape[1]
        onehot = torch.nn.functional.one_hot(yb, k_classes).bool()
        grads = per_example(params, xb, onehot)
        proj = torch.zeros(xb.shape[0], dim, device=xb.device, dtype=torch.float32)
        for k, g in grads.items():
            h, s = sketch[k]
            proj.index_add_(1, h, g.reshape(g.shape[0], -1).float() * s)
        out.append(proj)
    return torch.cat(out)


def trak_table_path(dim: int) -> str:
    """Table of the featurised models for projection dimension P (one table per P)."""
    return f"trak/p{int(dim)}"


def trak_spec(cfg, m: int):
    """Spec of TRAK model m: a random alpha-subset (like a collect model, its own domain) that
    records its test margins and projected train/test gradients."""
    from datamodels.specs import ModelSpec, Subset

    return ModelSpec(key=(m,), seed=training_seed(cfg.seed, m, domain=(TRAK_DOMAIN,)),
                     subset=Subset.random((cfg.seed, TRAK_DOMAIN, m), cfg.collect.alpha),
                     outputs=TRAK_OUTPUTS, options=(("fit.trak_dim", int(cfg.fit.trak_dim)),))


def trak_scores(train_feats, test_feats, *, ridge: float, device: str = "cpu") -> np.ndarray:
    """tau (N, T') float64: the mean over models of Phi (Phi^T Phi + lam I)^-1 Psi^T.

    ``train_feats``: iterable of (N, P) arrays, ``test_feats``: matching (T', P) arrays.
    """
    tau = None
    count = 0
    for phi, psi in zip(train_feats, test_feats):
        phi = torch.as_tensor(np.asarray(phi), dtype=torch.float64, device=device)
        psi = torch.as_tensor(np.asarray(psi), dtype=torch.float64, device=device)
        gram = phi.T @ phi
        lam = ridge * torch.trace(gram) / gram.shape[0]
        gram.diagonal().add_(lam)
        part = phi @ torch.linalg.solve(gram, psi.T)
        tau = part if tau is None else tau + part
        count += 1
    if tau is None:
        raise ValueError("trak_scores: no featurised models")
    return (tau / count).cpu().numpy()
