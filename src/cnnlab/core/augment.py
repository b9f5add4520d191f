"""Augmentation on whole uint8 batches on the device (no per-image work), and test-time augmentation views."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "flip", "standard")
TTA = ("none", "flip", "tencrop")
ERASE_MIN_AREA = 0.02  # random erasing's smallest box, as a fraction of the image


def random_affine(x: torch.Tensor, gen: torch.Generator, flip: bool, max_shift: float, max_deg: float,
                  scale: tuple[float, float]) -> torch.Tensor:
    """Per-image random flip, translation, rotation and scale in one grid_sample; uint8 -> float 0-1 (N, C, H, W)."""
    n, dev = len(x), x.device
    rand = torch.rand((n, 5), generator=gen, device=dev)
    angle = (rand[:, 0] * 2 - 1) * math.radians(max_deg)
    s = scale[0] + rand[:, 1] * (scale[1] - scale[0])
    sign = torch.where(rand[:, 2] < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=dev)
    shift = (rand[:, 3:5] * 2 - 1) * max_shift * 2  # affine_grid works on a [-1, 1] canvas
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1)
    img = to_float(x)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) grayscale or (N, C, H, W) color -> float 0-1 (N, C, H, W)."""
    return (x.unsqueeze(1) if x.dim() == 3 else x).float() / 255.0


def random_erasing(x: torch.Tensor, gen: torch.Generator, p: float = 0.5, area: tuple[float, float] = (0.02, 0.2)) -> torch.Tensor:
    """Zero one random rectangle per image with probability p (Zhong et al. 2017)."""
    n, _, h, w = x.shape
    rand = torch.rand((n, 5), generator=gen, device=x.device)
    frac = area[0] + rand[:, 0] * (area[1] - area[0])
    aspect = torch.exp((rand[:, 1] * 2 - 1) * math.log(3))
    eh = (torch.sqrt(frac * aspect) * h).clamp(1, h)
    ew = (torch.sqrt(frac / aspect) * w).clamp(1, w)
    top, left = rand[:, 2] * (h - eh), rand[:, 3] * (w - ew)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1)) &
           (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)) & (rand[:, 4] < p).view(-1, 1, 1))
    return x.masked_fill(box.unsqueeze(1), 0.0)


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, gen: torch.Generator):
    """Blend each image and its one-hot label with a random partner's (Zhang et al. 2018)."""
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    perm = torch.randperm(len(x), generator=gen, device=x.device)
    target = F.one_hot(y, num_classes).float()
    return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]


def cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, gen: torch.Generator):
    """Paste a random box from a partner image; labels mix by the box's area (Yun et al. 2019)."""
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    perm = torch.randperm(len(x), generator=gen, device=x.device)
    h, w = x.shape[-2:]
    bh, bw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    top = int(torch.randint(0, h - bh + 1, (1,), generator=gen, device=x.device))
    left = int(torch.randint(0, w - bw + 1, (1,), generator=gen, device=x.device))
    x = x.clone()
    x[..., top: top + bh, left: left + bw] = x[perm][..., top: top + bh, left: left + bw]
    area = bh * bw / (h * w)
    target = F.one_hot(y, num_classes).float()
    return x, (1 - area) * target + area * target[perm]


def batch_augment(cfg, num_classes: int) -> Callable | None:
    """The training-time augmentation that `cfg.augment` (standard: with cfg.erase_prob, cfg.erase_area), `cfg.mixup`
    and `cfg.cutmix` name, as
    fn(x_uint8, y, gen) -> (x, target); mixed targets are distributions over the data's `num_classes`."""
    if cfg.augment == "none" and cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None

    def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        if cfg.augment == "flip":
            x = random_affine(x, gen, flip=True, max_shift=0.0, max_deg=0.0, scale=(1.0, 1.0))
        elif cfg.augment == "standard":
            x = random_affine(x, gen, flip=True, max_shift=0.1, max_deg=10.0, scale=(0.9, 1.1))
            x = random_erasing(x, gen, cfg.erase_prob, (ERASE_MIN_AREA, cfg.erase_area)) if cfg.erase_prob else x
        else:
            x = to_float(x)
        if cfg.mixup > 0:
            return mixup(x, y, num_classes, cfg.mixup, gen)
        if cfg.cutmix > 0:
            return cutmix(x, y, num_classes, cfg.cutmix, gen)
        return x, y
    return augment


def tta_views(name: str) -> Callable | None:
    """Test-time views of a uint8 batch whose predictions are averaged: flip (2) or ten-crop (10)."""
    if name == "none":
        return None
    if name == "flip":
        return lambda x: [x, x.flip(-1)]

    def tencrop(x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        ch, cw = int(round(h * 0.9)), int(round(w * 0.9))
        corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
        crops = [x[..., t: t + ch, l: l + cw] for t, l in corners]
        return crops + [c.flip(-1) for c in crops]
    return tencrop


def view_probabilities(probabilities: Callable[[torch.Tensor], torch.Tensor],
                       views: list[torch.Tensor]) -> torch.Tensor:
    """Class probabilities averaged over views of the same images; `probabilities` maps a batch to (N, C)."""
    return sum(probabilities(v) for v in views) / len(views)


