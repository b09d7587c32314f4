"""The GPU training path, checked on CPU: augmentations on CIFAR-shaped uint8 batches against a
loop reference, determinism given the generator, the width flip, the benchmark's recipes and its
CPU smoke run; and (marked gpu) the same augmentations and a tiny training on CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from datamodels.augment import augment_batch, random_flip
from datamodels.config import load_config
from datamodels.data import load_dataset
from datamodels.train import margins, train_model

ROOT = Path(__file__).resolve().parent.parent


def cifar_batch(b: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def reference_augment(x, *, pad, flip, size, draws):
    """Loop reference of translate -> flip -> cutout, given the random draws."""
    off, coin, cy, cx = draws
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        img = torch.nn.functional.pad(x[i], (pad, pad, pad, pad))[:, off[0][i]:off[0][i] + h, off[1][i]:off[1][i] + w]
        if flip and coin[i] < 0.5:
            img = img.flip(-1)  # width
        img = img.clone()
        if size:
            img[:, max(0, cy[i] - size // 2):max(0, cy[i] - size // 2 + size),
                max(0, cx[i] - size // 2):max(0, cx[i] - size // 2 + size)] = 0
        out[i] = img
    return out


def replay_draws(b, h, w, *, pad, flip, size, generator):
    """The draws augment_batch makes, in its order, from a generator seeded alike."""
    dev = generator.device
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=dev)
    coin = torch.rand(b, generator=generator, device=dev) if flip else None
    cy = torch.randint(0, h, (b,), generator=generator, device=dev)
    cx = torch.randint(0, w, (b,), generator=generator, device=dev)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return cpu(off), cpu(coin), cpu(cy), cpu(cx)


@pytest.mark.parametrize("pad,flip,size", [(2, True, 8), (4, True, 4), (1, False, 0), (2, True, 0)])
def test_cifar_augmentation_matches_the_loop_reference_and_stays_uint8(pad, flip, size):
    x = cifar_batch()
    got = augment_batch(x, torch.Generator().manual_seed(11), translate=pad, flip=flip, cutout_size=size)
    assert got.dtype == torch.uint8 and got.shape == x.shape and got.is_contiguous()
    draws = replay_draws(64, 32, 32, pad=pad, flip=flip, size=size, generator=torch.Generator().manual_seed(11))
    if not size:
        draws = (draws[0], draws[1], None, None)
    assert torch.equal(got, reference_augment(x, pad=pad, flip=flip, size=size, draws=draws))


def test_augmentation_is_a_function_of_the_generator():
    x = cifar_batch()
    kw = dict(translate=2, flip=True, cutout_size=8)
    a = augment_batch(x, torch.Generator().manual_seed(3), **kw)
    b = augment_batch(x, torch.Generator().manual_seed(3), **kw)
    c = augment_batch(x, torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(3)  # consecutive batches draw fresh randomness
    assert not torch.equal(augment_batch(x, g, **kw), augment_batch(x, g, **kw))
    assert torch.equal(x, cifar_batch())  # the input is never modified in place


def test_flip_reverses_columns_of_a_cifar_image_not_rows_or_channels():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[0, 0, 5, 0] = 200  # red, row 5, left column
    out = random_flip(x, torch.Generator().manual_seed(0), p=1.0)
    assert out[0, 0, 5, 31] == 200 and int(out.sum()) == 200  # same row and channel, right column


def test_tta_margins_average_the_width_flip_on_cifar_shapes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10))
    x, y = cifar_batch(8), torch.arange(8) % 10
    kw = dict(mean=torch.zeros(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1))
    with torch.no_grad():
        logits = 0.5 * (model(x.float() / 255) + model(x.flip(-1).float() / 255))
    ref = logits.gather(1, y[:, None]).squeeze(1) - logits.scatter(1, y[:, None], float("-inf")).max(1).values
    torch.testing.assert_close(margins(model, x, y, tta_flip=True, **kw), ref)
    assert not torch.allclose(margins(model, x, y, tta_flip=False, **kw), ref)


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("gpu_throughput", ROOT / "benchmarks" / "gpu_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_ffcv_recipe_is_ffcvs_cifar_example():
    bench = _benchmark_module()
    cfg = bench.recipe_config("ffcv", data="synthetic", root=None, loader="memory", beton=None, smoke=False)
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay, t.label_smoothing) == (24, 512, 0.5, 0.9, 5e-4, 0.1)
    assert t.warmup == pytest.approx(5 / 24) and (t.flip, t.translate, t.cutout, t.tta_flip) == (True, 2, 4, True)
    assert tuple(cfg.model.widths) == (64, 128, 256, 512) and cfg.model.scale_out == 0.2
    ours = bench.recipe_config("ours", data="synthetic", root=None, loader="memory", beton=None, smoke=False)
    assert ours.train == load_config(ROOT / "pipelines" / "cifar10.yaml").train


def test_benchmark_cpu_smoke_runs_both_recipes(capsys):
    bench = _benchmark_module()
    assert bench.main(["--cpu-smoke", "--models", "2", "--concurrent", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "CPU SMOKE RUN" in out and "Not a GPU measurement" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("ours ", "ffcv "))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("ours", "memory", "1"), ("ours", "memory", "2"),
                                                  ("ffcv", "memory", "1"), ("ffcv", "memory", "2")]
    assert all(float(r[6]) > 0 for r in rows)  # models/hour


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_benchmark_without_a_gpu_says_so_and_exits_0(capsys):
    assert _benchmark_module().main([]) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU here: nothing measured" in out and "TFLOP/s" not in out


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("pad,flip,size", [(2, True, 8), (4, True, 4)])
def test_cuda_augmentation_matches_the_cpu_reference(pad, flip, size):
    dev = torch.device("cuda")
    x = cifar_batch(256)
    got = augment_batch(x.to(dev), torch.Generator(device=dev).manual_seed(5), translate=pad, flip=flip,
                        cutout_size=size)
    assert got.device.type == "cuda" and got.dtype == torch.uint8
    draws = replay_draws(256, 32, 32, pad=pad, flip=flip, size=size,
                         generator=torch.Generator(device=dev).manual_seed(5))
    # CUDA and CPU generators make different streams: replay the CUDA draws through the CPU reference
    assert torch.equal(got.cpu(), reference_augment(x, pad=pad, flip=flip, size=size, draws=draws))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16", "float32"])
def test_a_tiny_model_trains_on_cuda(precision):
    recipe = ["data.train_size=600", "model.widths=[16, 32, 64, 128]", "train.epochs=8", "train.cutout=2"]
    cfg = tiny_config(*recipe, "train.device=cuda", f"train.precision={precision}")
    ds = load_dataset(cfg.data)
    r = train_model(ds, cfg, 0)
    assert np.array_equal(r.mask, train_model(ds, tiny_config(*recipe, "train.epochs=1"), 0).mask)  # device-free
    assert np.isfinite(r.test_margins).all() and np.isfinite(r.train_margins).all()
    assert r.test_accuracy > 0.7  # on CPU this recipe reaches ~0.9 (models 0 and 1: 0.899, 0.932)
