import torch

from datamodels.augment import cutout, random_flip, random_translate


def reference_translate(x, pad, offsets):
    """Loop reference: zero-pad each image and crop at its (oy, ox) offset."""
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        p = torch.nn.functional.pad(x[i], (pad, pad, pad, pad))
        oy, ox = offsets[0][i], offsets[1][i]
        out[i] = p[:, oy:oy + h, ox:ox + w]
    return out


def test_translate_matches_pad_and_crop_reference():
    x = torch.randint(0, 256, (64, 3, 9, 7), dtype=torch.uint8)
    for pad in (1, 2, 4):
        g = torch.Generator().manual_seed(pad)
        got = random_translate(x, pad, g)
        offsets = torch.randint(0, 2 * pad + 1, (2, 64), generator=torch.Generator().manual_seed(pad))
        assert torch.equal(got, reference_translate(x, pad, offsets))
        assert got.dtype == torch.uint8


def test_flip_is_on_the_width_axis():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    g = torch.Generator().manual_seed(0)
    out = random_flip(x, g, p=1.0)
    assert torch.equal(out, x.flip(-1))
    assert torch.equal(out[0, 0, 0], torch.tensor([2.0, 1.0, 0.0]))  # a row reversed
    assert torch.equal(random_flip(x, g, p=0.0), x)
    # with p=0.5 each image is either itself or its width flip
    xs = torch.rand(200, 3, 4, 5)
    got = random_flip(xs, torch.Generator().manual_seed(1))
    same = (got == xs).flatten(1).all(1)
    flipped = (got == xs.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 50 < int(flipped.sum()) < 150


def test_cutout_zeroes_one_clipped_square_per_image():
    x = torch.full((32, 1, 10, 10), 7, dtype=torch.uint8)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    cy = torch.randint(0, 10, (32,), generator=g)
    cx = torch.randint(0, 10, (32,), generator=g)
    for i in range(32):
        ref = x[i].clone()
        ref[:, max(0, cy[i] - 2):cy[i] + 2, max(0, cx[i] - 2):cx[i] + 2] = 0
        assert torch.equal(out[i], ref)
