"""Experiments as data: the Config schema, each experiment's preset (its one definition), and the -P value parser."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from cnnlab.core import data, models
from cnnlab.core.augment import AUGMENTS, ERASE_MIN_AREA, TTA
from cnnlab.core.training import CHOICES, TrainConfig

DataOptions = data.option_fields()  # classes, permute, on_bad, ...: each dataset module declares its own


def foreign_options(dataset: str) -> set[str]:
    """The Config fields that only other datasets read: they never affect a run on `dataset`."""
    own = {o.name for o in data.get(dataset).options}
    return {o.name for name in data.names() for o in data.get(name).options} - own


@dataclass
class Config(DataOptions, TrainConfig):
    experiment: str = "fmnist_cnn"
    dataset: str = "fmnist"
    data_dir: str = ""
    model: str = "fmnist_cnn"
    # model hyperparameters: make_config takes the config's model's own defaults; these are for a bare Config()
    variant: str = models.defaults("fer_cnn")["variant"]
    dropout: float = models.defaults("fmnist_cnn")["dropout"]
    weights: str = models.defaults("resnet18")["weights"]
    in_chans: int = models.defaults("fmnist_cnn")["in_chans"]
    small_input: bool = models.defaults("resnet18")["small_input"]
    width: int = models.defaults("vgg_bn")["width"]
    head: str = models.defaults("vgg_bn")["head"]  # vgg_bn: global average pool, or fc on a 3x3 grid
    expand: int = models.defaults("face_mobile")["expand"]  # face_mobile: 1 makes its blocks depthwise-separable
    se: bool = models.defaults("face_mobile")["se"]  # face_mobile: squeeze-excitation in every block
    image_size: int = 0  # 0: the dataset's own size
    freeze: str = "none"
    unfreeze_epochs: int = 0
    augment: str = "none"
    erase_prob: float = 0.5  # augment=standard: random erasing's probability per image
    erase_area: float = 0.2  # ... and its largest box, as a fraction of the image
    mixup: float = 0.0
    cutmix: float = 0.0
    tta: str = "none"
    ema: float = 0.0  # decay of the weights' moving average (e.g. 0.999): evaluated, logged and served; 0: off
    teacher: str = ""  # distill from: run IDs, a models:/ URI or bundle files, comma-separated (an ensemble if several)
    val_fraction: float = 0.1  # 0: no validation split, train on all of train
    split_seed: int = -1  # seed of the train/val split and of `limit`; -1: `seed` (ensemble members share one split)
    limit: int = 0
    log_model: bool = True
    export: str = "onnx"  # the logged model also as ONNX (fp32, int8) for ONNX Runtime; none: torch weights only
    eval_test: bool = True  # False for tuning trials: the test split is evaluated once, on the study's final run
    run_name: str = ""

    def choices(self) -> dict[str, tuple]:
        return allowed_values(datasets=False)

    def validate(self) -> None:
        super().validate()  # the closed sets of choices() and the training fields' ranges
        self._validate_data()
        if self.freeze != "none" and self.model != "resnet18":
            raise ValueError(f"freeze={self.freeze!r} applies to resnet18 only, not {self.model!r}")
        if self.mixup > 0 and self.cutmix > 0:
            raise ValueError("choose mixup or cutmix, not both")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size and not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be 0 (native) or 16..512, got {self.image_size}")
        self._validate_regularization()

    def _validate_regularization(self) -> None:
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1) (0: off; e.g. 0.999), got {self.ema}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"erase_prob must be in [0, 1], got {self.erase_prob}")
        if not ERASE_MIN_AREA < self.erase_area <= 1:
            raise ValueError(f"erase_area must be in ({ERASE_MIN_AREA}, 1], got {self.erase_area}")
        for name in ("mixup", "cutmix"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.teacher and self.distill_alpha == 0:
            raise ValueError("distill_alpha=0 ignores the teacher: give distill_alpha > 0 or no teacher")
        if self.split_seed < -1:
            raise ValueError(f"split_seed must be -1 (the run's seed) or >= 0, got {self.split_seed}")

    def _validate_data(self) -> None:
        dataset = data.get(self.dataset)
        dataset.check(dataset.options_from(self))
        if dataset.channels > 1 and self.in_chans != dataset.channels:
            raise ValueError(f"dataset {self.dataset} has {dataset.channels}-channel images: in_chans must be "
                             f"{dataset.channels}, got {self.in_chans}")
        needs_val = {"schedule=plateau": self.schedule == "plateau", "eval_test=false": not self.eval_test}
        for setting, used in needs_val.items():
            if used and self.val_fraction == 0:
                raise ValueError(f"{setting} relies on validation accuracy: it needs val_fraction > 0")

    def data_seed(self) -> int:
        """The seed that draws the validation split and `limit`'s subset."""
        return self.seed if self.split_seed < 0 else self.split_seed

    def teachers(self) -> list[str]:
        return [t.strip() for t in self.teacher.split(",") if t.strip()]

    def total_epochs(self) -> int:
        return self.epochs + (self.unfreeze_epochs if self.freeze != "none" else 0)

    def label(self) -> str:
        """A run name that says how this config differs from its experiment's preset, e.g. `fer_cnn variant=model1`."""
        preset = make_config(self.experiment)
        changed = [f"{k}={v}" for k, v in asdict(self).items()
                   if k not in ("data_dir", "run_name", "log_model", "eval_test", "export") and v != getattr(preset, k)]
        return " ".join([self.experiment, *changed])

    def digest(self) -> str:
        """Hash of every setting that changes the result: not the run name or where the data lives, nor other datasets'
        options (adding one leaves this run's identity, and so its checkpoints, alone)."""
        # sync_bn: how a run is spread over ranks, like the world size (both key its checkpoint: pipeline.checkpoint)
        skip = {"run_name", "data_dir", "log_model", "eval_test", "device", "sync_bn", "export", *foreign_options(self.dataset)}
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Preset:
    """One experiment: what it is (for --help), its settings over its model's and Config's defaults, and its
    MLproject parameters."""
    summary: str
    settings: dict
    params: tuple[str, ...]  # the entry point's parameters besides RUN_PARAMS, in command-line order


RUN_PARAMS = ("seed", "limit", "precision", "data_dir")  # every experiment entry point ends with these
# long schedules: weight averaging, regularization, and distillation from a teacher (run IDs or a models:/ URI)
LONG_PARAMS = ("ema", "weight_decay", "erase_prob", "erase_area", "split_seed", "teacher", "distill_alpha",
               "distill_temperature")
FMNIST_PARAMS = ("classes", "permute", "permute_seed", "epochs", "batch_size", "lr", "dropout")

PRESETS: dict[str, Preset] = {
    "fmnist_cnn": Preset(
        "the Fashion-MNIST report's CNN: 3 classes (or 10), plain or permuted pixels",
        dict(dataset="fmnist", model="fmnist_cnn", epochs=10, batch_size=64, lr=1e-3), FMNIST_PARAMS),
    "fmnist_mlp": Preset(
        "permutation-invariant MLP control on the same inputs",
        dict(dataset="fmnist", model="mlp", epochs=10, batch_size=64, lr=1e-3), FMNIST_PARAMS),
    "fer_cnn": Preset(
        "the FER2013 report's custom CNN: variant=model1 feeds a softmax into the loss, model2 logits",
        dict(dataset="fer2013", model="fer_cnn", lr=1e-3, batch_size=32,
             optimizer="adam", epochs=15),
        ("variant", "dropout", "lr", "batch_size", "optimizer", "weight_decay", "epochs", "on_bad")),
    "fer_resnet18": Preset(
        "torchvision's ResNet-18 on FER2013, from scratch or fine-tuned with layer freezing",
        dict(dataset="fer2013", model="resnet18", image_size=48, dropout=0.0, lr=1e-3,
             batch_size=64, optimizer="adam", epochs=20),
        ("weights", "in_chans", "image_size", "freeze", "unfreeze_epochs", "lr", "batch_size", "optimizer",
         "weight_decay", "epochs")),
    "fer_best": Preset(
        "VGG-style net with BatchNorm on FER2013: batch augmentation, label smoothing, SGD+Nesterov, cosine, "
        "ten-crop TTA",
        dict(dataset="fer2013", model="vgg_bn", lr=0.05, batch_size=128, optimizer="sgd",
             nesterov=True, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
             label_smoothing=0.1, augment="standard", tta="tencrop", epochs=60),
        ("model", "width", "head", "epochs", "batch_size", "lr", "dropout", "mixup", "cutmix", "tta") + LONG_PARAMS),
    "fer_resnet18_small": Preset(
        "ResNet-18 from scratch on FER2013 at 48 px with the small-input stem (3x3 conv, no max-pool): SGD+Nesterov, "
        "cosine, weight EMA, ten-crop TTA; 300 epochs (a GPU recipe)",
        dict(dataset="fer2013", model="resnet18", in_chans=1, small_input=True, dropout=0.0, lr=0.1,
             batch_size=128, optimizer="sgd", nesterov=True, momentum=0.9, weight_decay=5e-4, wd_norm_bias=False,
             schedule="cosine", warmup_epochs=5.0, label_smoothing=0.1, augment="standard", tta="tencrop",
             ema=0.999, epochs=300),
        ("epochs", "batch_size", "lr", "mixup", "cutmix", "tta") + LONG_PARAMS),
    "fer_mobile": Preset(
        "face_mobile (depthwise-separable blocks for 48x48 faces, 0.48 M parameters) with fer_best's recipe and "
        "weight EMA at a CPU budget; served by ONNX Runtime",
        # fp32: depthwise convolutions train slower in bf16 on an AVX512-BF16 CPU (275 against 382 images/s)
        dict(dataset="fer2013", model="face_mobile", width=32, expand=1, lr=0.05, precision="fp32",
             batch_size=128, optimizer="sgd", nesterov=True, momentum=0.9, weight_decay=5e-4, wd_norm_bias=False,
             schedule="cosine", warmup_epochs=1.0, label_smoothing=0.1, augment="standard", tta="tencrop",
             ema=0.998, epochs=30),
        ("width", "expand", "se", "epochs", "batch_size", "lr", "dropout", "tta") + LONG_PARAMS),
}


def make_config(experiment: str, **overrides) -> Config:
    """The experiment's config: its model's own defaults, the preset's settings over them, then `overrides`."""
    if experiment not in PRESETS:
        raise ValueError(f"unknown experiment {experiment!r}; known: {sorted(PRESETS)}")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {experiment}; known: {sorted(known)}")
    settings = {**PRESETS[experiment].settings, **overrides, "experiment": experiment}
    model = settings.get("model", Config.model)
    owned = models.hyperparameters(model) if model in models.names() else {}  # an unknown one: validate() says so
    return Config(**{**{k: v for k, v in owned.items() if k in known}, **settings})


QUICK_LIMIT = 400  # quick mode: a smoke check that the whole pipeline runs, never a measurement
QUICK_IMAGE_SIZE = 48


def quick_overrides(cfg: Config, limit: int = QUICK_LIMIT) -> dict:
    """The overrides that shrink `cfg` to a smoke check: 1 epoch (and at most 1 unfreezing one), at most `limit`
    training images, at most QUICK_IMAGE_SIZE px."""
    out = {"epochs": 1, "unfreeze_epochs": min(cfg.unfreeze_epochs, 1), "limit": limit}
    return {**out, "image_size": QUICK_IMAGE_SIZE} if cfg.image_size > QUICK_IMAGE_SIZE else out


def allowed_values(datasets: bool = True) -> dict[str, tuple]:
    """Every Config field with a closed set of values, and the set; with `datasets`, the dataset options' too."""
    allowed = {"experiment": tuple(PRESETS), "dataset": tuple(data.names()), "model": tuple(models.names()), **CHOICES,
               "freeze": tuple(models.FREEZE_STAGES), "augment": AUGMENTS, "tta": TTA, "head": models.HEADS,
               "variant": models.VARIANTS, "in_chans": (1, 3), "export": ("onnx", "none")}
    options = {o.name: o.allowed for name in data.names() for o in data.get(name).options if o.allowed}
    return {**allowed, **options} if datasets else allowed


def field_types() -> dict[str, str]:
    """Config field -> its type's name: bool, int, float or str."""
    return {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(Config)}


def parse_text(kind: str, text: str):
    """Text as a bool, int, float or str; ints may arrive as "3.0" (MLproject passes numbers as floats)."""
    if kind == "bool" and text.lower() in ("true", "false", "1", "0", "yes", "no"):
        return text.lower() in ("true", "1", "yes")
    try:
        if kind == "int" and float(text).is_integer():
            return int(float(text))
        if kind in ("float", "str"):
            return float(text) if kind == "float" else text
    except ValueError:
        pass
    raise ValueError(f"{text!r} is not a valid {kind}")


def parse_value(name: str, text: str):
    """A command-line value as the type of Config field `name`; errors name the field and value."""
    types = field_types()
    if name not in types:
        raise ValueError(f"unknown parameter {name!r}; known: {sorted(types)}")
    try:
        return parse_text(types[name], text)
    except ValueError:
        raise ValueError(f"parameter {name}={text!r} is not a valid {types[name]}") from None


def parse_params(pairs: list[str]) -> dict:
    """KEY=VALUE texts (`-P` options) -> typed Config overrides."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"parameter {pair!r} must be KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key] = parse_value(key, value)
    return out
