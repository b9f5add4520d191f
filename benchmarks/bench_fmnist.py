"""Fashion-MNIST benchmark: full tracked runs (accuracy) and training throughput against the plain pipeline.

    python benchmarks/bench_fmnist.py            # 10-epoch runs on the real data (about 25 min on 2 cores)
    python benchmarks/bench_fmnist.py --quick    # 1 epoch on 3,000 images
"""
from __future__ import annotations

import gzip
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, throughput_and_accuracy  # noqa: E402

from cnnlab.core import pipeline  # noqa: E402
from cnnlab.core.config import make_config  # noqa: E402

ROWS = [  # (row of src/cnnlab/claims.yaml, changes to it)
    ("fmnist_cnn", {}),
    ("fmnist_cnn", {"schedule": "cosine"}),
    ("fmnist_cnn_permuted", {}),
    ("fmnist_mlp_permuted", {}),
    ("fmnist_mlp", {}),
    ("fmnist_cnn", {"classes": 10}),
]


def plain_loader(batch_size: int):
    """torchvision's FashionMNIST dataset + ToTensor/Normalize + DataLoader, reading the same IDX files."""
    from torchvision import datasets, transforms

    from cnnlab.core.data.fmnist import FILES, RELABEL_3, find_dir

    root = Path(tempfile.mkdtemp()) / "FashionMNIST" / "raw"
    root.mkdir(parents=True)
    for name in (f for pair in FILES.values() for f in pair):  # torchvision reads the unzipped files
        (root / name.removesuffix(".gz")).write_bytes(gzip.decompress((find_dir() / name).read_bytes()))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.286,), (0.353,))])
    ds = datasets.FashionMNIST(str(root.parent.parent), train=True, transform=tf, download=False,
                               target_transform=lambda y: int(RELABEL_3[y]))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)


def throughput_rows(images: int, batch_size: int = 32) -> list[tuple]:
    cfg = make_config("fmnist_cnn", limit=images)
    split = pipeline.load_data(cfg)["train"]
    return [compare("fmnist_cnn", lambda: pipeline.build(cfg, split)[0], split, lambda: plain_loader(batch_size),
                    batch_size)]


def main() -> None:
    throughput_and_accuracy(__doc__, lambda quick: throughput_rows(2000 if quick else 12000), "torchvision's dataset",
                            ROWS, quick_limit=3000, test_images="10,000")


if __name__ == "__main__":
    main()
