"""Experiments as configuration: one Config, presets per entry point, and building a model from them."""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from . import models
from .data import Split, load_splits
from .preprocess import Classifier, Preprocess, pixel_stats
from .training import TrainConfig

@dataclass
class Config(TrainConfig):
    experiment: str = "fmnist_cnn"
    dataset: str = "fmnist"
    data_dir: str = ""
    model: str = "fmnist_cnn"
    classes: int = 3
    permute: bool = False
    permute_seed: int = 0
    variant: str = "model2"
    dropout: float = 0.5
    weights: str = "none"
    in_chans: int = 1
    small_input: bool = False
    width: int = 64
    head: str = "gap"  # vgg_bn: global average pool, or fc on a 3x3 grid
    image_size: int = 0  # 0: the dataset's own size
    freeze: str = "none"
    unfreeze_epochs: int = 0
    augment: str = "none"
    mixup: float = 0.0
    cutmix: float = 0.0
    tta: str = "none"
    val_fraction: float = 0.1
    limit: int = 0
    on_bad: str = "error"
    test_split: str = "public"
    log_model: bool = True
    eval_test: bool = True  # False for tuning trials: the test split is evaluated once, on the study's final run
    run_name: str = ""

    def validate(self) -> None:
        super().validate()
        from .augment import AUGMENTS, TTA

        checks = [("experiment", self.experiment, PRESETS), ("model", self.model, models.names()),
                  ("freeze", self.freeze, models.FREEZE_STAGES), ("augment", self.augment, AUGMENTS),
                  ("tta", self.tta, TTA), ("head", self.head, models.HEADS), ("in_chans", self.in_chans, (1, 3)),
                  ("on_bad", self.on_bad, ("error", "skip"))]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if self.freeze != "none" and self.model != "resnet18":
            raise ValueError(f"freeze={self.freeze!r} applies to resnet18 only, not {self.model!r}")
        if self.mixup > 0 and self.cutmix > 0:
            raise ValueError("choose mixup or cutmix, not both")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size and not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be 0 (native) or 16..512, got {self.image_size}")

    def total_epochs(self) -> int:
        return self.epochs + (self.unfreeze_epochs if self.freeze != "none" else 0)

    def label(self) -> str:
        """A run name that says how this config differs from its experiment's preset, e.g. `fer_cnn variant=model1`."""
        preset = make_config(self.experiment)
        changed = [f"{k}={v}" for k, v in asdict(self).items()
                   if k not in ("data_dir", "run_name", "log_model", "eval_test") and v != getattr(preset, k)]
        return " ".join([self.experiment, *changed])

    def digest(self) -> str:
        """Hash of every setting that changes the result (not the run name or where the data lives)."""
        skip = ("run_name", "data_dir", "log_model", "eval_test", "device")
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, dict] = {
    "fmnist_cnn": dict(dataset="fmnist", model="fmnist_cnn", epochs=10, batch_size=64, lr=1e-3, dropout=0.5),
    "fmnist_mlp": dict(dataset="fmnist", model="mlp", epochs=10, batch_size=64, lr=1e-3, dropout=0.2),
    "fer_cnn": dict(dataset="fer2013", model="fer_cnn", classes=7, variant="model2", dropout=0.3, lr=1e-3,
                    batch_size=32, optimizer="adam", epochs=15),
    "fer_resnet18": dict(dataset="fer2013", model="resnet18", classes=7, in_chans=3, image_size=48, weights="none",
                         dropout=0.0, lr=1e-3, batch_size=64, optimizer="adam", epochs=20),
    "fer_best": dict(dataset="fer2013", model="vgg_bn", classes=7, dropout=0.4, width=64, lr=0.05, batch_size=128,
                     optimizer="sgd", nesterov=True, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                     warmup_epochs=1.0, label_smoothing=0.1, augment="standard", tta="tencrop", epochs=60),
}


def make_config(experiment: str, **overrides) -> Config:
    if experiment not in PRESETS:
        raise ValueError(f"unknown experiment {experiment!r}; known: {sorted(PRESETS)}")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {experiment}; known: {sorted(known)}")
    return Config(**{**PRESETS[experiment], **overrides, "experiment": experiment})


def coerce(name: str, text: str):
    """Parse a command-line value to the type of Config field `name`; errors name the field and value."""
    types = {f.name: f.type for f in fields(Config)}
    if name not in types:
        raise ValueError(f"unknown parameter {name!r}; known: {sorted(types)}")
    kind = types[name]
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind == "int":
            value = float(text)  # MLproject float params arrive as "3.0"
            if not value.is_integer():
                raise ValueError
            return int(value)
        return {"float": float, "str": str}[kind](text)
    except ValueError:
        raise ValueError(f"parameter {name}={text!r} is not a valid {kind}") from None


def model_spec(cfg: Config, num_classes: int, image_size: int) -> dict:
    """The model factory's arguments, taken from the config by the factory's own parameter names."""
    params = inspect.signature(models._REGISTRY[cfg.model]).parameters
    values = {**asdict(cfg), "num_classes": num_classes, "image_size": image_size}
    return {"name": cfg.model, **{k: values[k] for k in params if k in values}}


def build(cfg: Config, train: Split) -> tuple[Classifier, dict]:
    torch.manual_seed(cfg.seed)  # initial weights depend on the seed alone
    image_size = cfg.image_size or train.images.shape[-1]
    mean, std = pixel_stats(train.images)
    spec = model_spec(cfg, len(train.classes), image_size)
    net = models.create(**spec)
    return Classifier(Preprocess(mean, std, image_size, cfg.in_chans), net), spec


def freeze_schedule(cfg: Config) -> Callable | None:
    if cfg.freeze == "none":
        return None

    def hook(epoch: int, model: Classifier) -> None:
        models.freeze_resnet(model.net, cfg.freeze if epoch < cfg.epochs else "none")
    return hook


def load_data(cfg: Config) -> dict[str, Split]:
    """The config's train / val / test splits; decoding is cached, so a second call is cheap."""
    return load_splits(cfg.dataset, cfg.data_dir or None, cfg.val_fraction, cfg.seed, cfg.limit, **_data_options(cfg))


def _data_options(cfg: Config) -> dict:
    if cfg.dataset == "fmnist":
        return {"classes": cfg.classes, "permute": cfg.permute, "permute_seed": cfg.permute_seed}
    return {"on_bad": cfg.on_bad, "test_split": cfg.test_split}
