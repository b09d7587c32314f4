import numpy as np
import pytest
import torch

from datamodels.config import DataConfig
from datamodels.data import load_dataset, write_cifar10_batches
from datamodels.errors import DataError


def test_digits_split_is_seeded_disjoint_and_recorded():
    a = load_dataset(DataConfig(train_size=1000, split_seed=0))
    b = load_dataset(DataConfig(train_size=1000, split_seed=0))
    c = load_dataset(DataConfig(train_size=1000, split_seed=1))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    tr, te = a.split["train_indices"], a.split["test_indices"]
    assert len(tr) == 1000 and len(te) == 797 and not set(tr) & set(te)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape == (1000, 1, 8, 8)
    assert int(a.train_x.max()) == 255 and a.num_classes == 10 and not a.flippable
    from sklearn.datasets import load_digits

    raw = load_digits()
    # the recorded indices reproduce the stored images and labels
    assert np.array_equal(raw.target[tr], a.train_y.numpy())
    assert np.array_equal(np.round(raw.images[te] * 255 / 16).astype(np.uint8), a.test_x.numpy()[:, 0])


def test_cifar10_reads_the_python_batches(tmp_path):
    g = np.random.default_rng(0)
    tx = g.integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)
    ty = g.integers(0, 10, 50)
    sx = g.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    sy = g.integers(0, 10, 20)
    write_cifar10_batches(tmp_path / "cifar-10-batches-py", tx, ty, sx, sy)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = load_dataset(DataConfig(dataset="cifar10", root=str(root), train_size=None))
        assert np.array_equal(ds.train_x.numpy(), tx) and np.array_equal(ds.train_y.numpy(), ty)
        assert np.array_equal(ds.test_x.numpy(), sx) and np.array_equal(ds.test_y.numpy(), sy)
        assert ds.classes[0] == "airplane" and ds.flippable


def test_cifar10_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 python batches in .*data_batch_1..5"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="got null"):
        load_dataset(DataConfig(dataset="cifar10"))


def test_synthetic_is_cifar_shaped_and_seeded():
    ds = load_dataset(DataConfig(dataset="synthetic", synthetic_train=64, synthetic_test=16))
    assert ds.train_x.shape == (64, 3, 32, 32) and ds.test_x.shape == (16, 3, 32, 32)
    assert ds.fingerprint() == load_dataset(DataConfig(dataset="synthetic", synthetic_train=64,
                                                       synthetic_test=16)).fingerprint()
