"""The FFCV batch source (train.loader=ffcv): exact pixels, exactly the mask, labels by index,
the same order as MemoryBatches, and the same store rows as the in-memory default."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_config
from datamodels.collect import collect
from datamodels.data import Dataset, load_dataset
from datamodels.errors import ConfigError, DataError
from datamodels.ffcv_backend import INSTALL_COMMAND, clear_loader_cache, ffcv_batches, write_beton
from datamodels.store import RunStore
from datamodels.train import MemoryBatches, subset_mask, train_model


def _need_ffcv():
    pytest.importorskip("ffcv", reason="FFCV not installed: " + INSTALL_COMMAND)


def indexed_dataset(n: int = 150, t: int = 20) -> Dataset:
    """CIFAR-shaped random images whose first two pixels spell the example's index."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n) % 256
    x[:, 0, 0, 1] = torch.arange(n) // 256
    y = torch.randint(0, 10, (n,), generator=g)
    tx = torch.randint(0, 256, (t, 3, 32, 32), generator=g, dtype=torch.uint8)
    ty = torch.randint(0, 10, (t,), generator=g)
    return Dataset("indexed", x, y, tx, ty, tuple(str(i) for i in range(10)), (0.5,) * 3, (0.25,) * 3,
                   flippable=True)


def index_of(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()


def test_missing_ffcv_fails_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` raise ImportError
    cfg = tiny_config("train.loader=ffcv", f"data.beton={tmp_path / 'd.beton'}")
    ds = indexed_dataset(10, 2)
    with pytest.raises(ImportError) as e:
        ffcv_batches(ds, torch.arange(5), cfg, ds.train_y, torch.device("cpu"))
    assert INSTALL_COMMAND in str(e.value)
    with pytest.raises(ImportError, match="pip install"):
        write_beton(ds, tmp_path / "d.beton")


def test_beton_holds_exact_pixels_and_every_example_once(tmp_path):
    _need_ffcv()
    ds = indexed_dataset()
    path = write_beton(ds, tmp_path / "d.beton")
    meta = json.loads((tmp_path / "d.beton.json").read_text())
    assert meta["num_train"] == 150 and meta["image_shape"] == [3, 32, 32]
    cfg = tiny_config("train.loader=ffcv", f"data.beton={path}", "train.batch_size=64")
    batches = ffcv_batches(ds, torch.arange(150), cfg, ds.train_y, torch.device("cpu"))
    seen = []
    for images, labels in batches.epoch(torch.Generator().manual_seed(0)):
        idx = index_of(images)
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
        assert torch.equal(images, ds.train_x[idx])  # raw storage: pixels are exact
        assert labels.dtype == torch.int64 and torch.equal(labels, ds.train_y[idx])
        seen.append(idx.clone())
    assert sorted(torch.cat(seen).tolist()) == list(range(150))


@pytest.mark.parametrize("batch_size", [16, 19])  # 75 % 19 == 18, 75 % 16 == 11; 74 % 73 == 1 below
def test_epoch_is_exactly_the_mask_with_labels_by_index_in_memory_order(tmp_path, batch_size):
    _need_ffcv()
    ds = indexed_dataset()
    mask = subset_mask(0, 3, ds.num_train, 0.5)
    train_idx = torch.from_numpy(np.flatnonzero(mask))
    flipped = (ds.train_y + 1 + torch.arange(150) % 3) % 10  # labels that differ from the beton's
    cfg = tiny_config("train.loader=ffcv", f"data.beton={tmp_path / 'd.beton'}",
                      f"train.batch_size={batch_size}")  # beton written on first use
    ffcv = ffcv_batches(ds, train_idx, cfg, flipped, torch.device("cpu"))
    mem = MemoryBatches(ds.train_x, flipped, train_idx, batch_size)
    assert len(ffcv) == len(mem)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):  # two epochs: the generator stays in step with MemoryBatches'
        got = [(x.clone(), y.clone()) for x, y in ffcv.epoch(g1)]
        ref = list(mem.epoch(g2))
        assert len(got) == len(ref) == len(mem)
        for (x, y), (rx, ry) in zip(got, ref):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        idx = torch.cat([index_of(x) for x, _ in got])
        assert sorted(idx.tolist()) == train_idx.tolist()  # exactly the mask, each once
        assert torch.equal(torch.cat([y for _, y in got]), flipped[idx])
    assert torch.equal(g1.get_state(), g2.get_state())


def test_a_last_batch_of_one_is_dropped_like_memory_batches(tmp_path):
    _need_ffcv()
    ds = indexed_dataset()
    train_idx = torch.arange(74)  # 74 = 73 + 1
    cfg = tiny_config("train.loader=ffcv", f"data.beton={tmp_path / 'd.beton'}", "train.batch_size=73")
    ffcv = ffcv_batches(ds, train_idx, cfg, ds.train_y, torch.device("cpu"))
    mem = MemoryBatches(ds.train_x, ds.train_y, train_idx, 73)
    got = [index_of(x).clone() for x, _ in ffcv.epoch(torch.Generator().manual_seed(1))]
    ref = [index_of(x) for x, _ in mem.epoch(torch.Generator().manual_seed(1))]
    assert [len(b) for b in got] == [len(b) for b in ref] == [73]
    assert torch.equal(got[0], ref[0])


def test_store_rows_are_identical_whichever_backend_loaded_the_data(tmp_path):
    _need_ffcv()
    beton = tmp_path / "digits.beton"
    mem_cfg = tiny_config("collect.models=3", "collect.block_size=3", "train.translate=1",
                          "resources.executor=local")
    ffcv_cfg = tiny_config("collect.models=3", "collect.block_size=3", "train.translate=1",
                           "train.loader=ffcv", f"data.beton={beton}", "resources.executor=local")
    ds = load_dataset(mem_cfg.data)
    rows = {}
    for name, cfg in (("memory", mem_cfg), ("ffcv", ffcv_cfg)):
        collect(cfg, tmp_path / name, progress=False)
        store = RunStore.open(tmp_path / name)
        assert store.complete_mask().all()
        rows[name] = {k: store.read(k) for k in ("masks", "test_margins", "train_margins")}
    assert beton.is_file()
    assert np.array_equal(rows["memory"]["masks"], rows["ffcv"]["masks"])
    for k in ("test_margins", "train_margins"):  # same data, labels, order and draws: bit for bit on CPU
        np.testing.assert_allclose(rows["ffcv"][k], rows["memory"][k], rtol=0, atol=1e-6)
    # train.loader and data.beton are not part of the training identity: one store, either backend
    RunStore.prepare(tmp_path / "memory", ffcv_cfg, ds)


def test_flipped_labels_reach_training_through_ffcv(tmp_path):
    _need_ffcv()
    from datamodels.train import train_on

    cfg = tiny_config("train.loader=ffcv", f"data.beton={tmp_path / 'd.beton'}")
    ds = load_dataset(cfg.data)
    idx = torch.arange(60)
    flipped = (ds.train_y + 1) % 10
    kw = dict(labels=flipped, device=torch.device("cpu"))
    a = train_on(ds, idx, cfg, 5, **kw)
    b = train_on(ds, idx, tiny_config(), 5, **kw)
    c = train_on(ds, idx, cfg, 5, device=torch.device("cpu"))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_a_stale_or_foreign_beton_is_refused(tmp_path):
    _need_ffcv()
    ds = indexed_dataset()
    path = write_beton(ds, tmp_path / "d.beton")
    other = indexed_dataset()
    other.train_x[5, 1, 3, 3] ^= 1  # one pixel differs
    cfg = tiny_config("train.loader=ffcv", f"data.beton={path}")
    clear_loader_cache()
    with pytest.raises(DataError, match="images_sha256"):
        ffcv_batches(other, torch.arange(10), cfg, other.train_y, torch.device("cpu"))
    (tmp_path / "d.beton.json").unlink()
    clear_loader_cache()
    with pytest.raises(DataError, match="sidecar"):
        ffcv_batches(ds, torch.arange(10), cfg, ds.train_y, torch.device("cpu"))


def test_loader_ffcv_needs_a_beton_path():
    _need_ffcv()
    ds = indexed_dataset(10, 2)
    with pytest.raises(ConfigError, match="data.beton"):
        ffcv_batches(ds, torch.arange(5), tiny_config("train.loader=ffcv"), ds.train_y, torch.device("cpu"))


def test_the_loader_is_reused_across_models(tmp_path):
    _need_ffcv()
    ds = indexed_dataset()
    cfg = tiny_config("train.loader=ffcv", f"data.beton={tmp_path / 'd.beton'}")
    a = ffcv_batches(ds, torch.arange(0, 50), cfg, ds.train_y, torch.device("cpu"))
    b = ffcv_batches(ds, torch.arange(50, 150), cfg, ds.train_y, torch.device("cpu"))
    assert a.loader is b.loader
    got = [index_of(x).clone() for x, _ in b.epoch(torch.Generator().manual_seed(0))]
    assert sorted(torch.cat(got).tolist()) == list(range(50, 150))


def test_training_keeps_its_torch_thread_count(tmp_path):
    _need_ffcv()
    ds = indexed_dataset()
    cfg = tiny_config("train.loader=ffcv", f"data.beton={tmp_path / 'd.beton'}")
    before = torch.get_num_threads()
    batches = ffcv_batches(ds, torch.arange(40), cfg, ds.train_y, torch.device("cpu"))
    for _ in batches.epoch(torch.Generator().manual_seed(0)):
        pass
    assert torch.get_num_threads() == before


@pytest.mark.gpu
def test_ffcv_on_cuda_matches_memory_on_cuda(tmp_path):
    _need_ffcv()
    dev = torch.device("cuda")
    ds = indexed_dataset()
    train_idx = torch.from_numpy(np.flatnonzero(subset_mask(0, 1, ds.num_train, 0.5)))
    cfg = tiny_config("train.loader=ffcv", f"data.beton={tmp_path / 'd.beton'}", "train.batch_size=16")
    ffcv = ffcv_batches(ds, train_idx, cfg, ds.train_y, dev)
    mem = MemoryBatches(ds.train_x.to(dev), ds.train_y.to(dev), train_idx.to(dev), 16)
    g1 = torch.Generator(device=dev).manual_seed(3)
    g2 = torch.Generator(device=dev).manual_seed(3)
    got = [(x.clone(), y.clone()) for x, y in ffcv.epoch(g1)]
    for (x, y), (rx, ry) in zip(got, mem.epoch(g2), strict=True):
        assert x.device.type == "cuda" and y.device.type == "cuda"
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # a tiny model trained through either backend on CUDA: same mask, close margins
    mcfg = tiny_config("train.device=cuda", "train.precision=bf16")
    fcfg = tiny_config("train.device=cuda", "train.precision=bf16", "train.loader=ffcv",
                       f"data.beton={tmp_path / 'digits.beton'}")
    dds = load_dataset(mcfg.data)
    a, b = train_model(dds, mcfg, 0), train_model(dds, fcfg, 0)
    assert np.array_equal(a.mask, b.mask)
    # cuDNN autotuning may pick other kernels per run, so CUDA results are close, not identical
    assert np.corrcoef(a.test_margins, b.test_margins)[0, 1] > 0.9
