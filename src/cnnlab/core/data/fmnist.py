"""Fashion-MNIST from the four official IDX .gz files, 10 classes or relabeled into 3."""
from __future__ import annotations

import gzip
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from cnnlab.core.data import DataError, Option, Split, cache_dir, register_dataset

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES_10 = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CLASSES_3 = ["clothes", "shoes", "others"]
# original label -> 3-class label (clothes / shoes / others)
RELABEL_3 = torch.tensor([0, 2, 0, 0, 0, 1, 0, 1, 2, 1])
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
HOW_TO_GET = ("install the Debian package (apt-get install dataset-fashion-mnist), set FASHION_MNIST_DIR "
              "to a folder with the four IDX .gz files, or pass data_dir")


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzip or raw); errors name the file and what is wrong."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: truncated or corrupt IDX data: header says {shape} = {expected} bytes, "
                        f"file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _has_files(folder: str) -> bool:
    return all((Path(folder) / f).exists() for pair in FILES.values() for f in pair)


def find_dir(data_dir: str | None = None) -> Path:
    """The first folder holding the four files: argument, FASHION_MNIST_DIR, Debian, cache, then download."""
    if data_dir:
        if not _has_files(data_dir):
            raise DataError(f"Fashion-MNIST IDX files not found in {data_dir} (data_dir). To get them: {HOW_TO_GET}")
        return Path(data_dir)
    download_dir = cache_dir() / "FashionMNIST" / "raw"
    candidates = [os.environ.get("FASHION_MNIST_DIR"), DEBIAN_DIR, str(download_dir)]
    for folder in filter(None, candidates):
        if _has_files(folder):
            return Path(folder)
    try:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(str(cache_dir()), download=True)
        return download_dir
    except Exception as e:  # offline: fall through to the one clear error
        reason = f"{type(e).__name__}: {e}"
    raise DataError("Fashion-MNIST not found; looked in " + ", ".join(filter(None, candidates))
                    + f" and tried torchvision's download ({reason}). To get it: {HOW_TO_GET}")


def _files_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for pair in FILES.values():
        for name in pair:
            h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=4)
def _decoded(folder: Path) -> tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    out = {}
    for split, (img_name, lbl_name) in FILES.items():
        images, labels = read_idx(folder / img_name), read_idx(folder / lbl_name)
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{folder / img_name}: expected images (N, 28, 28) and labels (N,), got "
                            f"{images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{folder / img_name} has {len(images)} images but {folder / lbl_name} has "
                            f"{len(labels)} labels")
        if labels.max() > 9:
            raise DataError(f"{folder / lbl_name}: label {labels.max()} is outside 0..9")
        out[split] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return _files_digest(folder), out


def permutation(seed: int, size: int = 28 * 28) -> torch.Tensor:
    """The fixed pixel permutation for `seed`, the same for every split."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


def records(classes: int, permute: bool, permute_seed: int) -> dict:
    """The pixel permutation of a permuted run, so that it can be re-applied to new images."""
    if not permute:
        return {}
    return {"permutation.json": {"seed": permute_seed, "permutation": permutation(permute_seed).tolist()}}


@register_dataset("fmnist", title="Fashion-MNIST", size=28, channels=1, records=records, options=(
    Option("classes", int, 3, (3, 10)),  # 10 original classes, or relabeled clothes / shoes / others
    Option("permute", bool, False),
    Option("permute_seed", int, 0)))
def load(data_dir: str | None, classes: int, permute: bool, permute_seed: int) -> tuple[Split, Split]:
    folder = find_dir(data_dir)
    digest, decoded = _decoded(folder)
    perm = permutation(permute_seed) if permute else None
    splits = []
    for split in ("train", "test"):
        images, labels = decoded[split]
        if perm is not None:
            images = images.reshape(len(images), -1)[:, perm].reshape(images.shape)
        if classes == 3:
            labels = RELABEL_3[labels]
        tag = f"{digest}-c{classes}" + (f"-p{permute_seed}" if permute else "")
        splits.append(Split(images, labels, CLASSES_3 if classes == 3 else CLASSES_10, tag, split,
                            {"source": str(folder), "classes_mode": classes, "permuted": permute}))
    return splits[0], splits[1]
