"""The one preprocessing step that training and the served model share: pixels -> normalized float input."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX512-BF16), where bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class Preprocess(nn.Module):
    """uint8 0-255 or float 0-1 pixels, (N, H, W) or (N, 1, H, W) -> (N, channels, size, size), normalized."""

    def __init__(self, mean: float, std: float, size: int, channels: int = 1):
        super().__init__()
        self.mean, self.std, self.size, self.channels = float(mean), float(std), int(size), int(channels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return x.expand(-1, self.channels, -1, -1) if self.channels > 1 else x

    def extra_repr(self) -> str:
        return f"mean={self.mean:.4f}, std={self.std:.4f}, size={self.size}, channels={self.channels}"

    def config(self) -> dict:
        return {"mean": self.mean, "std": self.std, "size": self.size, "channels": self.channels}


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of uint8 images on the 0-1 scale (the training split's, for normalization)."""
    x = images.double() / 255.0
    return x.mean().item(), x.std().item()


class Classifier(nn.Module):
    """Preprocess followed by a network: the unit that is trained, saved and served."""

    def __init__(self, preprocess: Preprocess, net: nn.Module):
        super().__init__()
        self.preprocess, self.net = preprocess, net
        self.channels_last = False  # set by the training loop where the layout pays off

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(pixels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs -> class probabilities (model1 already emits softmax)."""
        return outputs.float() if getattr(self.net, "outputs_probabilities", False) else outputs.float().softmax(-1)
