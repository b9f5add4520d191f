"""FER2013 benchmark: training throughput against ImageFolder + PIL + DataLoader, and tracked full runs (accuracy).

    python benchmarks/bench_fer.py --skip-accuracy   # throughput only (a few minutes)
    python benchmarks/bench_fer.py                   # plus model1, model2 (best settings), ResNet-18 at 48 px
    python benchmarks/bench_fer.py --quick           # 1 epoch on 1,000 images
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, throughput_and_accuracy  # noqa: E402

from cnnlab.core import pipeline  # noqa: E402
from cnnlab.core.config import make_config  # noqa: E402

ROWS = [  # (row of src/cnnlab/claims.yaml, changes to it)
    ("fer_model1", {}),
    ("fer_model2_best", {}),
    ("fer_resnet18_scratch", {"image_size": 48}),
]
MODELS = [("fer_cnn model2", "fer_cnn", {}), ("ResNet-18, 48 px", "fer_resnet18", {})]


def plain_loader(root: Path, batch_size: int, mean: float, std: float, size: int, channels: int):
    """torchvision's ImageFolder over the same JPEGs: PIL decode, Grayscale, ToTensor, Normalize per image."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Grayscale(channels), transforms.Resize(size), transforms.ToTensor(),
                             transforms.Normalize((mean,) * channels, (std,) * channels)])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)


def throughput_rows(images: int) -> list[tuple]:
    rows = []
    for name, experiment, params in MODELS:
        cfg = make_config(experiment, **{"limit": images, "batch_size": 32, **params})
        split = pipeline.load_data(cfg)["train"]
        pre = pipeline.build(cfg, split)[0].preprocess
        root = Path(os.environ["FER2013_DIR"])
        rows.append(compare(name, lambda: pipeline.build(cfg, split)[0], split,
                            lambda: plain_loader(root, 32, pre.mean, pre.std, pre.size, pre.channels)))
    return rows


def main() -> None:
    throughput_and_accuracy(__doc__, lambda quick: throughput_rows(1000 if quick else 4000),
                            "ImageFolder + PIL + DataLoader", ROWS, quick_limit=1000, test_images="3,589 PublicTest",
                            required_env="FER2013_DIR")


if __name__ == "__main__":
    main()
