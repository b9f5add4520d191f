"""Where the model looks: Grad-CAM heat maps (pytorch-grad-cam) at the resolution of the pixels it was given."""
from __future__ import annotations

import contextlib
import weakref

import numpy as np
import torch
from torch import nn

BATCH = 64
HEAD_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # net -> (feature layer or None, classes)


class ExplainUnavailable(ValueError):
    """The network has no spatial feature map to explain (e.g. the MLP)."""


def feature_layer(net: nn.Module, example: torch.Tensor) -> tuple[nn.Module | None, int]:
    """The last module, called once, whose output is a feature map (N, C, h, w) with h*w > 1 and that is not the
    head's adaptive pooling (layer4 of ResNet-18, the last pooled block of the CNNs; None if there is none), and the
    number of outputs. `example` is one preprocessed input; the preprocessing fixes the size, so this is per net."""
    order, calls = [], {}

    def record(module, inputs, output):
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1 \
                and not isinstance(module, HEAD_POOLS):
            order.append(module)
    handles = [m.register_forward_hook(record) for _, m in net.named_modules() if m is not net]
    try:
        with torch.no_grad():
            outputs = net(example)
    finally:
        for h in handles:
            h.remove()
    once = [m for m in order if calls[m] == 1]
    return (once[-1] if once else None), outputs.shape[-1]


class _PixelsToOutputs(nn.Module):
    """Float pixels (N, 1, H, W) -> net outputs through the classifier's own preprocessing.

    The input requires grad, so the feature map does even when every weight is frozen."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier.net(self.classifier.preprocess(pixels.detach().requires_grad_(True)))


@contextlib.contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode and no weight gradients for the duration (restored after): Grad-CAM needs only feature gradients."""
    training, flags = model.training, [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _float_pixels(pixels) -> torch.Tensor:
    """uint8 0-255 or float 0-1, (N, H, W) or (N, 1, H, W), numpy or torch -> float32 (N, 1, H, W) in 0-1."""
    x = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"pixels must have shape (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def explain(model: nn.Module, pixels, targets=None) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W), float32 in 0..1, at the pixels' resolution, for `targets` (class index per image;
    default: the predicted class). `model` is a Classifier (preprocess + net); ExplainUnavailable without conv maps."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = _float_pixels(pixels)
    if len(x) == 0:
        raise ValueError("no images to explain")
    weights = next(p for p in model.net.parameters() if p.is_floating_point())
    if weights.dtype != torch.float32:  # pytorch-grad-cam hands activations to NumPy, which has no bf16
        raise ValueError(f"explain needs float32 weights, the net has {weights.dtype}: explain with an fp32 copy")
    device, wrapped = weights.device, _PixelsToOutputs(model)
    if model.net not in _FOUND:
        with _frozen_eval(model):
            _FOUND[model.net] = feature_layer(model.net, model.preprocess(x[:1].to(device)))
    layer, n_classes = _FOUND[model.net]
    if layer is None:
        raise ExplainUnavailable(f"{type(model.net).__name__} has no convolutional feature map (no module outputs "
                                 f"(N, C, h, w)): Grad-CAM is not available for this model")
    if targets is not None:
        targets = np.asarray(targets, dtype=np.int64).ravel()
        if len(targets) != len(x):
            raise ValueError(f"{len(targets)} targets for {len(x)} images")
        if targets.min() < 0 or targets.max() >= n_classes:
            raise ValueError(f"targets must be class indices 0..{n_classes - 1}, got {targets.min()}..{targets.max()}")
    maps = []
    with _frozen_eval(model), torch.enable_grad():
        for i in range(0, len(x), BATCH):
            cam = GradCAM(model=wrapped, target_layers=[layer])
            # a class's output: its logit, or for nets that emit softmax its probability (the map of its log);
            # None: the predicted class
            chosen = None if targets is None else [ClassifierOutputTarget(c) for c in targets[i: i + BATCH].tolist()]
            try:  # not `with`: its __exit__ swallows IndexError
                maps.append(cam(x[i: i + BATCH].to(device), targets=chosen))
            finally:
                cam.activations_and_grads.release()
    return np.concatenate(maps).astype(np.float32)
