"""One interface for every dataset: load_splits(name, ...) -> {"train", "val", "test"} of uint8 images."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DataError(ValueError):
    """Bad or missing input data; the message names the file, row or value."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    digest: str  # content digest of the source this split was cut from
    name: str
    summary: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor, name: str | None = None) -> "Split":
        return Split(self.images[index], self.labels[index], self.classes, self.digest, name or self.name, self.summary)


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


def load_splits(dataset: str, data_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                limit: int = 0, **options) -> dict[str, Split]:
    """Train / validation (carved from train, stratified, seeded) / test splits of `dataset`."""
    from . import fer2013, fmnist

    loaders = {"fmnist": fmnist.load, "fer2013": fer2013.load}
    if dataset not in loaders:
        raise DataError(f"unknown dataset {dataset!r}; known: {sorted(loaders)}")
    full_train, test = loaders[dataset](data_dir, **options)
    keep, held = stratified_split(full_train.labels, val_fraction, seed)
    splits = {"train": full_train.subset(keep, "train"), "val": full_train.subset(held, "val"), "test": test}
    if limit:
        splits = {k: stratified_limit(s, limit if k == "train" else max(limit // 4, 1), seed) for k, s in splits.items()}
    return splits
