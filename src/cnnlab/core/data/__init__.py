"""Every dataset by name: each module registers its loader, typed options and native image shape here;
load_splits(name, ...) -> {"train", "val", "test"} of uint8 images."""
from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Callable

import torch


class DataError(ValueError):
    """Bad or missing input data; the message names the file, row or value."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, H, W) grayscale or (N, C, H, W) color
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    digest: str  # content digest of the source this split was cut from
    name: str
    summary: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1] if self.images.dim() == 4 else 1

    def subset(self, index: torch.Tensor, name: str | None = None) -> "Split":
        return Split(self.images[index], self.labels[index], self.classes, self.digest, name or self.name, self.summary)


@dataclass(frozen=True)
class Option:
    """One setting of a dataset's loader; it becomes a Config field (and an `-P` parameter) of the same name."""
    name: str
    type: type
    default: object
    allowed: tuple = ()

    def check(self, value) -> None:
        if self.allowed and value not in self.allowed:
            raise DataError(f"{self.name} must be {' or '.join(map(repr, self.allowed))}, got {value!r}")


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: load(data_dir, **options) -> (train, test) Splits, and images of size x size x channels."""
    name: str
    title: str
    load: Callable[..., tuple[Split, Split]]
    options: tuple[Option, ...]
    size: int
    channels: int
    records: Callable[..., dict] | None = None  # options -> {file name: JSON} that a tracked run logs beside the data

    def check(self, options: dict) -> dict:
        """The options with defaults filled in; an unknown name or a value outside its allowed set is a DataError."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise DataError(f"unknown {self.title} option(s): {unknown}; known: {sorted(known)}")
        full = {name: options.get(name, o.default) for name, o in known.items()}
        for name, value in full.items():
            known[name].check(value)
        return full

    def options_from(self, source) -> dict:
        """This dataset's options read from an object with them as attributes (a Config)."""
        missing = [o.name for o in self.options if not hasattr(source, o.name)]
        if missing:  # Config's option fields are those registered when cnnlab.config was imported
            raise DataError(f"dataset {self.name}: option(s) {missing} are no fields of {type(source).__name__}; "
                            f"a dataset with options is registered on import of cnnlab.data: a module there")
        return {o.name: getattr(source, o.name) for o in self.options}


_DATASETS: dict[str, Dataset] = {}


def register_dataset(name: str, *, title: str, size: int, channels: int, options: tuple[Option, ...] = (),
                     records: Callable[..., dict] | None = None):
    """Decorate a loader fn(data_dir, **options) -> (train, test); the decorated loader checks its options first."""
    def wrap(load: Callable[..., tuple[Split, Split]]):
        @functools.wraps(load)
        def checked(data_dir: str | None = None, **opts) -> tuple[Split, Split]:
            return load(data_dir, **_DATASETS[name].check(opts))
        _DATASETS[name] = Dataset(name, title, checked, tuple(options), size, channels, records)
        return checked
    return wrap


def get(name: str) -> Dataset:
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {names()}")
    return _DATASETS[name]


def names() -> list[str]:
    return sorted(_DATASETS)


def option_fields() -> type:
    """A dataclass whose fields are every registered dataset's options (typed, with defaults): part of Config."""
    seen: dict[str, Option] = {}
    for dataset in _DATASETS.values():
        for o in dataset.options:
            if seen.setdefault(o.name, o) != o:
                raise TypeError(f"dataset {dataset.name} declares option {o.name} unlike another dataset does")
    return make_dataclass("DataOptions", [(o.name, o.type, field(default=o.default)) for o in seen.values()])


def cache_dir() -> Path:
    path = Path(os.environ.get("CNNLAB_CACHE", Path.home() / ".cache" / "cnnlab"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, held_out): `fraction` of each class held out, chosen by a seeded shuffle."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = int(round(len(idx) * fraction))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


def stratified_limit(split: Split, limit: int, seed: int) -> Split:
    """A class-balanced-in-proportion subset of at most `limit` images, for quick runs."""
    if not limit or limit >= len(split):
        return split
    _, held = stratified_split(split.labels, limit / len(split), seed)
    return split.subset(held)


def _check_shape(dataset: Dataset, split: Split) -> None:
    want = (dataset.size, dataset.size) if dataset.channels == 1 else (dataset.channels, dataset.size, dataset.size)
    if tuple(split.images.shape[1:]) != want or split.images.dtype != torch.uint8:
        raise DataError(f"dataset {dataset.name}: its loader gave {split.name} images {split.images.dtype} "
                        f"{tuple(split.images.shape)}, registered as uint8 (N, {', '.join(map(str, want))})")


def load_splits(dataset: str, data_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                limit: int = 0, **options) -> dict[str, Split]:
    """Train / validation (carved from train, stratified, seeded; none when val_fraction is 0) / test splits."""
    spec = get(dataset)
    full_train, test = spec.load(data_dir, **options)
    for split in (full_train, test):
        _check_shape(spec, split)
    keep, held = stratified_split(full_train.labels, val_fraction, seed)
    splits = {"train": full_train.subset(keep, "train"), "val": full_train.subset(held, "val"), "test": test}
    if not val_fraction:
        del splits["val"]
    if limit:
        splits = {k: stratified_limit(s, limit if k == "train" else max(limit // 4, 1), seed) for k, s in splits.items()}
    return splits


# every module of this package registers its dataset on import: adding a dataset is adding its module
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
