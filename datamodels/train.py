"""Training one model: a plain function of (dataset, config, model index).

Determinism contract: the mask of model i is a pure function of (run seed, i) -- exactly
round(alpha * N) examples drawn without replacement by numpy's Generator -- and so is the
training seed. On CPU with one thread, retraining model i reproduces its margins bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from datamodels.augment import augment_batch
from datamodels.config import RunConfig, TrainConfig
from datamodels.data import Dataset
from datamodels.domains import CORRUPTION_DOMAIN
from datamodels.model import build_model

__all__ = [
    "ModelResult",
    "subset_size",
    "subset_mask",
    "training_seed",
    "train_model",
    "train_on",
    "margins",
    "margin_from_logits",
    "eval_options",
    "resolve_device",
    "corrupt_labels",
    "teacher_logits",
]


@dataclass(frozen=True)
class ModelResult:
    """What one trained model contributes to the store (row ``index``)."""

    index: int
    mask: np.ndarray  # (N,) bool
    test_margins: np.ndarray  # (T,) float32
    train_margins: np.ndarray  # (N,) float32; out-of-sample where mask is False
    seconds: float

    @property
    def test_accuracy(self) -> float:
        return float((self.test_margins > 0).mean())


def _seeds(seed: int, *key: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Mask and training seed sequences of the model keyed by (seed, *key).

    Training models use key (i,); other stages (evaluation, full-set, verification models)
    put a distinct domain number first, so their randomness never collides with training's.
    """
    mask_ss, train_ss = np.random.SeedSequence([seed, *key]).spawn(2)
    return mask_ss, train_ss


def subset_size(n: int, alpha: float) -> int:
    """round(alpha * N), halves rounded up, at least 1."""
    return max(1, min(n, int(math.floor(alpha * n + 0.5))))


def subset_mask(seed: int, index: int, n: int, alpha: float, *, domain: tuple[int, ...] = ()) -> np.ndarray:
    """(N,) bool mask of model ``index``: exactly subset_size(N, alpha) ones.

    ``domain`` (e.g. ``(EVAL_DOMAIN,)``) separates other stages' masks from training's.
    """
    rng = np.random.default_rng(_seeds(seed, *domain, index)[0])
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=subset_size(n, alpha), replace=False)] = True
    return mask


def training_seed(seed: int, index: int, *, domain: tuple[int, ...] = ()) -> int:
    """The torch seed of model ``index`` (init, batch order, augmentation)."""
    return int(_seeds(seed, *domain, index)[1].generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device here")
    return torch.device(name)


def _normalise(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float().div_(255.0) - mean) / std


def _autocast(device: torch.device, precision: str):
    if precision == "float32" or device.type != "cuda":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def margin_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) correct-class logit minus the largest other logit, for logits (B, K), labels (B,)."""
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return correct - others.max(dim=1).values


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, *, mean, std, tta_flip: bool = False,
            batch_size: int = 1024, precision: str = "float32",
            features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, K) float32 of uint8 images ``x`` (B, C, H, W), and with ``features`` the
    penultimate activations (B, D) of the unflipped images.

    With ``tta_flip`` the logits of each image and its WIDTH-flipped copy (``x.flip(-1)``) are
    averaged.
    """
    model.eval()
    logits, feats = [], []
    for a in range(0, x.shape[0], batch_size):
        xb = _normalise(x[a : a + batch_size], mean, std)
        with _autocast(xb.device, precision):
            if features:  # ResNet9: body, then the linear head (scaled)
                f = model.net[:-1](xb)
                lg = (model.net[-1](f) * model.scale_out).float()
                feats.append(f.float())
            else:
                lg = model(xb).float()
            if tta_flip:
                lg = 0.5 * (lg + model(xb.flip(-1)).float())
        logits.append(lg)
    return torch.cat(logits), (torch.cat(feats) if features else None)


def margins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, mean, std,
            tta_flip: bool = False, batch_size: int = 1024, precision: str = "float32") -> torch.Tensor:
    """Margins (B,): logit of the correct class minus the largest other logit (see :func:`predict`)."""
    logits, _ = predict(model, x, mean=mean, std=std, tta_flip=tta_flip, batch_size=batch_size,
                        precision=precision)
    return margin_from_logits(logits, y)


def eval_options(dataset: Dataset, cfg: RunConfig, device: torch.device) -> dict:
    """Keyword arguments of :func:`margins` for a run: the dataset's normalisation on
    ``device``, test-time flips where the run and the dataset allow them, the precision."""
    return dict(
        mean=torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1),
        std=torch.tensor(dataset.std, device=device).view(1, -1, 1, 1),
        tta_flip=cfg.train.tta_flip and dataset.flippable,
        precision=cfg.train.precision,
    )


def corrupt_labels(y: torch.Tensor, fraction: float, *, num_classes: int, seed: int) -> torch.Tensor:
    """(N,) labels with exactly round(fraction N) entries replaced by another class.

    The corrupted examples are drawn without replacement and each new label uniformly from the
    K - 1 classes that are not its true one, all from numpy's Generator seeded by
    (``seed``, CORRUPTION_DOMAIN): every model of a run sees the same corrupted training set.
    The draw is :func:`datamodels.label_noise.draw_label_flips`, also behind ``data.label_noise``
    (which changes the dataset's given labels instead of a recipe's).
    """
    from datamodels.label_noise import draw_label_flips

    out = y.clone()
    idx, new = draw_label_flips(y.cpu().numpy(), fraction, num_classes=num_classes,
                                entropy=[int(seed), CORRUPTION_DOMAIN])
    if len(idx):
        out[torch.from_numpy(idx)] = torch.from_numpy(new).to(y.dtype)
    return out


def teacher_logits(teacher: torch.nn.Module, xb: torch.Tensor, gen: torch.Generator, dropout: float) -> torch.Tensor:
    """Logits (B, K) of ``teacher`` (in eval mode: batch norm uses its running statistics) on
    normalised ``xb``, with dropout at rate ``dropout`` on its penultimate features drawn from
    ``gen`` (the student's generator: a fickle teacher is still reproducible)."""
    with torch.no_grad():
        f = teacher.net[:-1](xb)
        if dropout > 0:
            keep = torch.rand(f.shape, generator=gen, device=f.device) >= dropout
            f = f * keep / (1.0 - dropout)
        return (teacher.net[-1](f) * teacher.scale_out).float()


def _lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Triangular schedule: 0 -> peak at ``warmup`` of training -> 0 at the end."""
    t = step / max(1, total)
    if warmup > 0 and t < warmup:
        return peak * t / warmup
    return peak * max(0.0, (1.0 - t) / max(1e-12, 1.0 - warmup))


class SubsetBatches:
    """What every batch source shares: batches per epoch of the subset ``idx`` and the epoch's
    order, a permutation drawn from the model's generator (a last batch of one example is
    dropped: batch norm needs two). Sources differ only in how they fetch the images."""

    def __init__(self, idx: torch.Tensor, batch_size: int):
        self.idx, self.batch_size = idx, batch_size

    def __len__(self) -> int:
        n = self.idx.numel()
        return max(1, n // self.batch_size + (1 if n % self.batch_size >= 2 else 0))

    def epoch_order(self, gen: torch.Generator) -> torch.Tensor:
        return self.idx[torch.randperm(self.idx.numel(), generator=gen, device=self.idx.device)]


class MemoryBatches(SubsetBatches):
    """The default batch source: the whole training set lives on the device as uint8 and each
    epoch's order is cut into batches by indexing. Faster than any loader when the data fits
    on the device.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, batch_size: int):
        super().__init__(idx, batch_size)
        self.x, self.y = x, y

    def epoch(self, gen: torch.Generator):
        order = self.epoch_order(gen)
        for a in range(0, order.numel(), self.batch_size):
            b = order[a : a + self.batch_size]
            if b.numel() >= 2:
                yield self.x[b], self.y[b]


def make_batches(dataset: Dataset, train_idx: torch.Tensor, cfg: RunConfig, labels: torch.Tensor,
                 device: torch.device):
    """The batch source ``cfg.train.loader`` names; yields uint8 (B, C, H, W) and labels (B,)."""
    if cfg.train.loader == "ffcv":
        from datamodels.ffcv_backend import ffcv_batches

        return ffcv_batches(dataset, train_idx, cfg, labels, device)
    return MemoryBatches(dataset.train_x.to(device), labels.to(device), train_idx.to(device),
                         cfg.train.batch_size)


def train_on(dataset: Dataset, train_idx: torch.Tensor, cfg: RunConfig, seed: int, *,
             labels: torch.Tensor | None = None, device: torch.device | None = None,
             teacher: torch.nn.Module | None = None) -> torch.nn.Module:
    """Train a fresh model on ``dataset.train_x[train_idx]`` and return it (in eval mode).

    ``labels`` (N,) replaces the training labels (label-flip experiments). With a ``teacher``
    (a trained model of the same architecture, in eval mode) the loss is
    (1 - w) CE(student, labels) + w tau^2 KL(softmax(teacher / tau) || softmax(student / tau)),
    w = ``train.distill_weight``, tau = ``train.distill_temperature`` (Hinton et al. 2015);
    the teacher sees the clean (augmented) batch, the student that batch plus
    ``train.input_noise``. Width flips (``train.flip``) only where ``dataset.flippable``.
    Everything random (init, batch order, augmentation, input noise,
    teacher dropout) derives from ``seed``.
    """
    tc: TrainConfig = cfg.train
    device = device or resolve_device(tc.device)
    labels = dataset.train_y if labels is None else labels
    norm = eval_options(dataset, cfg, device)
    mean, std = norm["mean"], norm["std"]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # scoped: parameter init only
        model = build_model(cfg.model, dataset.train_x.shape[1], dataset.num_classes)
    model = model.to(device)
    scaler = None
    if device.type == "cuda":
        # Fixed shapes every step (only a model's last batch differs): let cuDNN pick the
        # fastest kernels once. Convolutions in NHWC run on tensor cores without transposes.
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
        if tc.precision == "fp16":  # fp16 gradients underflow without loss scaling (bf16 ones do not)
            scaler = torch.amp.GradScaler("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)

    batches = make_batches(dataset, train_idx, cfg, labels, device)
    total = tc.epochs * len(batches)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.0, momentum=tc.momentum, nesterov=tc.momentum > 0,
    )
    step = 0
    model.train()
    for _ in range(tc.epochs):
        for xb, yb in batches.epoch(gen):
            xb = augment_batch(xb, gen, translate=tc.translate, flip=tc.flip and dataset.flippable,
                               cutout_size=tc.cutout)
            xb = _normalise(xb, mean, std)
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            soft = None if teacher is None else teacher_logits(teacher, xb, gen, tc.teacher_dropout)
            if tc.input_noise > 0:  # drawn only when asked: the default run's random stream is unchanged
                xb = xb + tc.input_noise * torch.randn(xb.shape, generator=gen, device=xb.device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, tc.lr, tc.warmup)
            with _autocast(device, tc.precision):
                out = model(xb)
                loss = F.cross_entropy(out, yb, label_smoothing=tc.label_smoothing)
                if soft is not None:
                    tau, w = tc.distill_temperature, tc.distill_weight
                    kd = F.kl_div(F.log_softmax(out.float() / tau, dim=1), F.log_softmax(soft / tau, dim=1),
                                  reduction="batchmean", log_target=True) * tau**2
                    loss = (1.0 - w) * loss + w * kd
            opt.zero_grad(set_to_none=True)
            if scaler is None:  # no host syncs per step: lr is a Python float, nothing is .item()'d
                loss.backward()
                opt.step()
            else:  # the scaler's inf check syncs once per step; bf16 avoids it
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            step += 1
    model.eval()
    return model


def train_model(dataset: Dataset, cfg: RunConfig, index: int, *,
                device: torch.device | None = None) -> ModelResult:
    """Train model ``index`` of a run on its mask; return its mask and margins.

    The same path as the collect stage (:func:`datamodels.collect.collect_spec` through
    :func:`datamodels.specs.train_spec`). Margins are on all T targets (test set) and all N
    training examples (out-of-sample for those outside the mask).
    """
    from datamodels.collect import collect_spec
    from datamodels.specs import train_spec

    r = train_spec(dataset, cfg, collect_spec(cfg, index), device=device)
    return ModelResult(index=index, mask=r["mask"], test_margins=r["test_margins"],
                       train_margins=r["train_margins"], seconds=r["seconds"])
