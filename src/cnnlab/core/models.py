"""Every network variant by name: create(name, **cfg); each factory's keyword defaults are the model's own defaults."""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
FREEZE_STAGES = ["none", "conv1", "layer1", "layer2", "layer3", "layer4"]
HEADS = ("gap", "fc")
VARIANTS = ("model1", "model2")  # fer_cnn: model1 feeds a softmax into the loss (the report's bug), model2 logits
DATA_ARGS = ("num_classes", "image_size")  # factory arguments that the data decides, not hyperparameters


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def create(name: str, **cfg) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**cfg)


def names() -> list[str]:
    return sorted(_REGISTRY)


def defaults(name: str) -> dict:
    """Model `name`'s arguments and their defaults, as its factory declares them (the one place they are written)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_REGISTRY)}")
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def hyperparameters(name: str) -> dict:
    """Model `name`'s hyperparameters with their defaults: its arguments less those the data decides."""
    return {k: v for k, v in defaults(name).items() if k not in DATA_ARGS}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register
def fmnist_cnn(num_classes: int = 3, in_chans: int = 1, dropout: float = 0.5) -> nn.Module:
    """The Fashion-MNIST report's CNN (28x28 input)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, 32, 5, padding=2), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(512, num_classes),
    )


@register
def mlp(num_classes: int = 3, in_chans: int = 1, image_size: int = 28, hidden: int = 512, dropout: float = 0.2) -> nn.Module:
    """Permutation-invariant control: two hidden layers on flattened pixels."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_chans * image_size * image_size, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


class FerCNN(nn.Sequential):
    """The FER report's custom CNN; model1 ends in a softmax that is (wrongly) fed to CrossEntropyLoss."""

    def __init__(self, num_classes: int, in_chans: int, dropout: float, variant: str):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        layers = [
            nn.Conv2d(in_chans, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 12 * 12, 128), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        ]
        if variant == "model1":
            layers.append(nn.Softmax(dim=-1))
        super().__init__(*layers)
        self.outputs_probabilities = variant == "model1"


@register
def fer_cnn(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.3, variant: str = "model2") -> nn.Module:
    return FerCNN(num_classes, in_chans, dropout, variant)


def imagenet_state_dict() -> dict:
    """torchvision's IMAGENET1K_V1 ResNet-18 weights from its cache; offline without the file, a clear error."""
    from torchvision.models import ResNet18_Weights
    from torch.hub import get_dir

    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = Path(get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:
        raise RuntimeError(f"ImageNet weights for ResNet-18 are not available: not in torchvision's cache at "
                           f"{cached} and the download from {weights.url} failed ({type(e).__name__}: {e}). "
                           f"Copy the file to that path (or set TORCH_HOME) or use weights=none or weights=PATH") from e


def _load_weights(weights: str) -> dict:
    if weights == "imagenet":
        return imagenet_state_dict()
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"weights must be 'none', 'imagenet' or a checkpoint file; {weights!r} is none of these")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and dicts: loading runs no code
    state = state.get("model", state) if isinstance(state, dict) else state
    # a checkpoint saved by this platform wraps the net as Classifier.net
    return {k.removeprefix("net."): v for k, v in state.items() if not k.startswith("preprocess.")}


@register
def resnet18(num_classes: int = 7, in_chans: int = 3, weights: str = "none", small_input: bool = False) -> nn.Module:
    """torchvision's ResNet-18 with a new head; in_chans=1 sums the pretrained conv1 filters over RGB."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=1000)
    if weights and weights != "none":
        state = _load_weights(weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        if state.get("conv1.weight") is not None and state["conv1.weight"].shape[1] != 3:
            state["conv1.weight"] = state["conv1.weight"].expand(-1, 3, -1, -1) / 3  # 1-channel checkpoint
        net.load_state_dict(state, strict=False)
    if in_chans == 1:
        w = net.conv1.weight.detach().sum(dim=1, keepdim=True)
        net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        net.conv1.weight.data.copy_(w)
    if small_input:  # CIFAR-style stem for 48 px: 3x3 conv, no max-pool
        net.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def freeze_resnet(net: nn.Module, stage: str) -> None:
    """Freeze everything up to and including `stage` (weights and BatchNorm statistics); 'none' unfreezes all."""
    if stage not in FREEZE_STAGES:
        raise ValueError(f"freeze must be one of {FREEZE_STAGES}, got {stage!r}")
    order = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    frozen = set() if stage == "none" else set(order[: order.index(stage) + (2 if stage == "conv1" else 1)])
    for name, module in net.named_children():
        trainable = name not in frozen
        for p in module.parameters():
            p.requires_grad_(trainable)
        if not trainable:
            module.eval()  # BatchNorm running stats stay as they were


@register
def vgg_bn(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.4, width: int = 64,
           head: str = "gap") -> nn.Module:
    """VGG-style net with BatchNorm for 48x48 faces (after Khaireddin and Chen 2021); head gap, or fc on a 3x3 grid."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)]
    if head not in HEADS:
        raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
    w = width
    features = [*block(in_chans, w), *block(w, 2 * w), *block(2 * w, 4 * w), *block(4 * w, 8 * w)]
    if head == "gap":
        return nn.Sequential(*features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                             nn.Linear(8 * w, num_classes))
    # faces are aligned, so where a feature fires matters: keep a 3x3 grid (any input size) and two FC layers
    hidden = 16 * w
    return nn.Sequential(*features, nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(8 * w * 9, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Dropout(dropout), nn.Linear(hidden, num_classes))


# (channels as a multiple of `width`, stride of the first block, blocks) per stage: 48 -> 24 -> 24 -> 12 -> 6 -> 3 px
FACE_STAGES = ((1, 2, 1), (2, 1, 2), (4, 2, 3), (8, 2, 3), (12, 2, 2))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (skipped at expand=1: depthwise-separable), 3x3 depthwise, optional
    squeeze-excitation, 1x1 linear projection; a residual where the shape allows."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, se: bool):
        super().__init__()
        from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

        hidden = c_in * expand
        layers = [Conv2dNormActivation(c_in, hidden, 1)] if expand > 1 else []
        layers.append(Conv2dNormActivation(hidden, hidden, 3, stride, groups=hidden))
        if se:
            layers.append(SqueezeExcitation(hidden, max(8, hidden // 4)))
        layers.append(Conv2dNormActivation(hidden, c_out, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


@register
def face_mobile(num_classes: int = 7, in_chans: int = 1, dropout: float = 0.2, width: int = 16, expand: int = 4,
                se: bool = False) -> nn.Module:
    """Inverted-residual net for 48x48 faces on CPUs: a stride-1 stem keeps 48 px detail, then FACE_STAGES; `width`
    scales every layer, expand=1 makes the blocks depthwise-separable (width 32: 0.48 M parameters)."""
    from torchvision.ops import Conv2dNormActivation

    if width < 4 or expand < 1:
        raise ValueError(f"face_mobile needs width >= 4 and expand >= 1, got width={width}, expand={expand}")
    layers, c_in = [Conv2dNormActivation(in_chans, width, 3)], width
    for mult, stride, blocks in FACE_STAGES:
        for i in range(blocks):
            layers.append(InvertedResidual(c_in, mult * width, stride if i == 0 else 1, expand, se))
            c_in = mult * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(c_in, num_classes))


class MemberAverage(nn.Module):
    """An ensemble's net: float 0-1 pixels -> the log of the members' mean class probabilities (so that softmax, as
    for any net's logits, gives that mean back); each member keeps its own preprocessing."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        probs = [member.probabilities(member(pixels)) for member in self.members]
        return torch.stack(probs).mean(0).log()


def bundle(classifier: nn.Module, spec: dict, classes: list[str]) -> dict:
    """Everything needed to rebuild a trained Classifier without training code: net spec, preprocessing, weights."""
    return {"spec": spec, "preprocess": classifier.preprocess.config(), "classes": list(classes),
            "state_dict": {k: v.detach().cpu() for k, v in classifier.state_dict().items()}}


def members_of(data: dict) -> list[dict]:
    """A bundle's single-model bundles: itself, or an ensemble's members (nested ensembles flattened)."""
    return [m for member in data["members"] for m in members_of(member)] if "members" in data else [data]


def ensemble_bundle(bundles: list[dict]) -> dict:
    """One bundle of several models (ensembles among them are flattened) whose probabilities are averaged. Members
    must agree on classes and image channels; each keeps its own preprocessing. Only tensors, numbers and text:
    loadable with torch.load(weights_only=True)."""
    members = [m for b in bundles for m in members_of(b)]
    if not members:
        raise ValueError("an ensemble needs at least one member")
    classes = members[0]["classes"]
    channels = {m["preprocess"].get("image_channels", 1) for m in members}
    for m in members:
        if m["classes"] != classes:
            raise ValueError(f"ensemble members disagree on classes: {classes} vs {m['classes']} "
                             f"(member {m.get('source', '?')})")
    if len(channels) > 1:
        raise ValueError(f"ensemble members take images of different channels: {sorted(channels)}")
    (c,) = channels
    from cnnlab.core.preprocess import Preprocess

    return {"spec": {"name": "ensemble", "members": len(members)}, "members": members, "classes": list(classes),
            "preprocess": Preprocess(0.0, 1.0, 0, c, c).config()}


def bundle_digest(data: dict) -> str:
    """Content digest of a bundle's weights and preprocessing (each member's, in order, for an ensemble)."""
    h = hashlib.sha256()
    for m in members_of(data):
        h.update(json.dumps([m["spec"], m["preprocess"], m["classes"]], sort_keys=True).encode())
        for key in sorted(m["state_dict"]):
            h.update(key.encode())
            h.update(m["state_dict"][key].cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def read_bundle(path: str | Path, source: str = "") -> dict:
    """A bundle file (torch.save of bundle() or ensemble_bundle()); weights_only: loading runs no code. A single
    model's bundle gets `source` (default: the file) so that ensembles and teachers can name their members."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data if "members" in data else {**data, "source": source or str(path)}


def from_bundle(data: dict) -> nn.Module:
    from cnnlab.core.preprocess import Classifier, Preprocess

    if "members" in data:
        members = MemberAverage([from_bundle(m) for m in data["members"]])
        return Classifier(Preprocess(**data["preprocess"]), members).eval()
    spec = dict(data["spec"])
    name = spec.pop("name")
    spec.pop("weights", None)  # the trained weights follow; never fetch pretrained ones again
    classifier = Classifier(Preprocess(**data["preprocess"]), create(name, **spec))
    classifier.load_state_dict(data["state_dict"])
    return classifier.eval()
