"""Batch augmentation and test-time views: shapes, determinism, label mixing."""
from __future__ import annotations

import pytest
import torch

from cnnlab.core.augment import batch_augment, cutmix, mixup, random_affine, random_erasing, tta_views
from cnnlab.core.config import make_config


def batch(n=16):
    return torch.randint(0, 256, (n, 48, 48), dtype=torch.uint8), torch.arange(n) % 7


def test_standard_augmentation_is_seeded_and_keeps_shapes():
    x, y = batch()
    augment = batch_augment(make_config("fer_best"), num_classes=7)
    a, ta = augment(x, y, torch.Generator().manual_seed(1))
    b, tb = augment(x, y, torch.Generator().manual_seed(1))
    c, _ = augment(x, y, torch.Generator().manual_seed(2))
    assert a.shape == (16, 1, 48, 48) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and torch.equal(ta, y) and not torch.equal(a, c)


def test_identity_affine_reproduces_the_image():
    x, _ = batch(4)
    out = random_affine(x, torch.Generator().manual_seed(0), flip=False, max_shift=0, max_deg=0, scale=(1, 1))
    assert torch.allclose(out[:, 0], x.float() / 255, atol=1e-5)


def test_random_erasing_zeroes_a_box_in_some_images():
    x = torch.ones(64, 1, 48, 48)
    out = random_erasing(x, torch.Generator().manual_seed(0), p=0.5)
    erased = (out == 0).flatten(1).any(1)
    assert 10 < erased.sum() < 54 and (out[~erased] == 1).all()


@pytest.mark.parametrize("mix", [mixup, cutmix])
def test_mixed_targets_are_distributions(mix):
    x, y = batch()
    out, target = mix(x.unsqueeze(1).float() / 255, y, 7, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 48, 48) and target.shape == (16, 7)
    assert torch.allclose(target.sum(1), torch.ones(16))


def test_tta_views():
    x, _ = batch(2)
    assert tta_views("none") is None
    flip = tta_views("flip")(x)
    assert len(flip) == 2 and torch.equal(flip[1], x.flip(-1))
    crops = tta_views("tencrop")(x)
    assert len(crops) == 10 and all(c.shape == (2, 43, 43) for c in crops)
    assert torch.equal(crops[5], crops[0].flip(-1))
