import numpy as np
import pytest
import torch

from conftest import tiny_config
from datamodels.data import load_dataset
from datamodels.model import ResNet9, count_flops
from datamodels.train import margins, subset_mask, subset_size, train_model, training_seed


def test_resnet9_shapes_for_digits_and_cifar():
    assert ResNet9(1, 10, (16, 32, 64, 128))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert ResNet9(3, 10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_flop_count_of_one_conv_layer_by_hand():
    m = ResNet9(1, 10, (2, 2, 2, 2))
    # prep conv: 2*(9*1)*2*8*8; stage1 conv 2*(9*2)*2*8*8; res 2x 2*(18)*2*4*4; stage2 2*18*2*4*4
    # stage3 2*18*2*2*2; res3 2x 2*18*2*1*1; linear 2*2*10
    expected = (2 * 9 * 2 * 64 + 2 * 18 * 2 * 64 + 2 * (2 * 18 * 2 * 16) + 2 * 18 * 2 * 16
                + 2 * 18 * 2 * 4 + 2 * (2 * 18 * 2 * 1) + 2 * 2 * 10)
    assert count_flops(m, (1, 8, 8)) == expected


def test_mask_is_exact_size_and_a_pure_function_of_seed_and_index():
    for n, alpha in [(1000, 0.5), (7, 0.5), (10, 0.33), (3, 1.0)]:
        m = subset_mask(0, 5, n, alpha)
        assert m.dtype == bool and m.sum() == subset_size(n, alpha) == max(1, int(np.floor(alpha * n + 0.5)))
    assert np.array_equal(subset_mask(3, 7, 100, 0.5), subset_mask(3, 7, 100, 0.5))
    assert not np.array_equal(subset_mask(3, 7, 100, 0.5), subset_mask(3, 8, 100, 0.5))
    assert not np.array_equal(subset_mask(3, 7, 100, 0.5), subset_mask(4, 7, 100, 0.5))
    assert training_seed(0, 1) == training_seed(0, 1) != training_seed(0, 2)


def test_margin_is_correct_logit_minus_largest_other():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3]

    x = torch.tensor([[3, 1, 2], [0, 5, 4], [7, 7, 1]], dtype=torch.uint8).view(3, 1, 1, 3)
    y = torch.tensor([0, 2, 1])
    zero, one = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    got = margins(Fixed(), x, y, mean=zero, std=one / 255)  # undo the /255 normalisation
    assert torch.allclose(got, torch.tensor([3 - 2, 4 - 5, 0.0]))


def test_tta_flip_averages_with_the_width_flipped_image():
    class LeftColumn(torch.nn.Module):
        def forward(self, x):  # logits depend on the first WIDTH column only
            return torch.stack([x[:, 0, :, 0].sum(1), -x[:, 0, :, 0].sum(1)], 1)

    x = torch.zeros(1, 1, 2, 3, dtype=torch.uint8)
    x[0, 0, :, 0] = 1  # left column on, right column off
    y = torch.tensor([0])
    zero, one = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    plain = margins(LeftColumn(), x, y, mean=zero, std=one / 255)
    tta = margins(LeftColumn(), x, y, mean=zero, std=one / 255, tta_flip=True)
    assert plain.item() == pytest.approx(4.0) and tta.item() == pytest.approx(2.0)


def test_retraining_reproduces_margins_exactly_on_cpu():
    cfg = tiny_config()
    ds = load_dataset(cfg.data)
    a, b = train_model(ds, cfg, 3), train_model(ds, cfg, 3)
    assert np.array_equal(a.mask, subset_mask(cfg.seed, 3, ds.num_train, cfg.collect.alpha))
    assert np.array_equal(a.test_margins, b.test_margins)
    assert np.array_equal(a.train_margins, b.train_margins)
    assert a.test_margins.shape == (ds.num_test,) and a.train_margins.shape == (ds.num_train,)
    c = train_model(ds, cfg, 4)
    assert not np.array_equal(a.test_margins, c.test_margins)


def test_a_digits_model_learns():
    cfg = tiny_config("data.train_size=600", "train.epochs=8", "model.widths=[8, 16, 32, 32]", "train.lr=0.4")
    r = train_model(load_dataset(cfg.data), cfg, 0)
    assert r.test_accuracy > 0.8
    # in-sample examples fit better than out-of-sample ones
    assert r.train_margins[r.mask].mean() > r.train_margins[~r.mask].mean()
