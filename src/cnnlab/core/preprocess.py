"""The one preprocessing step that training and the served model share: pixels -> normalized float input."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Preprocess(nn.Module):
    """uint8 0-255 or float 0-1 pixels, (N, H, W) or (N, C, H, W) -> (N, channels, size, size), normalized.

    mean and std are one number for grayscale images, one per channel for color (image_channels > 1); size 0 keeps
    the pixels' size (an ensemble's outer step: each member resizes and normalizes for itself).
    """

    def __init__(self, mean: float | list[float], std: float | list[float], size: int, channels: int = 1,
                 image_channels: int = 1):
        super().__init__()
        self.mean, self.std = _numbers(mean), _numbers(std)
        self.size, self.channels, self.image_channels = int(size), int(channels), int(image_channels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.size and x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - _per_channel(self.mean, x)) / _per_channel(self.std, x)
        return x.expand(-1, self.channels, -1, -1) if self.channels > x.shape[1] else x

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, size={self.size}, channels={self.channels}, " \
               f"image_channels={self.image_channels}"

    def config(self) -> dict:
        """What rebuilds it (a model bundle's `preprocess`); a bundle without image_channels has gray images."""
        return {"mean": self.mean, "std": self.std, "size": self.size, "channels": self.channels,
                "image_channels": self.image_channels}


def _numbers(value: float | list[float]) -> float | list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def _per_channel(value: float | list[float], x: torch.Tensor) -> torch.Tensor | float:
    return torch.tensor(value, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) if isinstance(value, list) else value


def pixel_stats(images: torch.Tensor) -> tuple[float, float] | tuple[list[float], list[float]]:
    """Mean and std of uint8 images on the 0-1 scale (the training split's, to normalize); per channel for color."""
    x = images.double() / 255.0
    if x.dim() == 3:
        return x.mean().item(), x.std().item()
    per_channel = x.transpose(0, 1).flatten(1)
    return per_channel.mean(1).tolist(), per_channel.std(1).tolist()


class Classifier(nn.Module):
    """Preprocess followed by a network: the unit that is trained, saved and served."""

    def __init__(self, preprocess: Preprocess, net: nn.Module):
        super().__init__()
        self.preprocess, self.net = preprocess, net
        self.channels_last = False  # set by the training loop where the layout pays off

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(pixels).to(next(self.net.parameters()).dtype)  # a net cast to bf16 (served) takes bf16
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs -> class probabilities (model1 already emits softmax)."""
        return outputs.float() if getattr(self.net, "outputs_probabilities", False) else outputs.float().softmax(-1)
