"""FER2013 benchmark: training throughput against ImageFolder + PIL + DataLoader, and tracked full runs (accuracy).

    python benchmarks/bench_fer.py --skip-accuracy   # throughput only (a few minutes)
    python benchmarks/bench_fer.py                   # plus model1, model2 (best settings), ResNet-18 at 48 px
    python benchmarks/bench_fer.py --quick           # 1 epoch on 1,000 images
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ACCURACY_HEADER, THROUGHPUT_HEADER, accuracy_rows, compare, table  # noqa: E402

from cnnlab.config import build, load_data, make_config  # noqa: E402

ROWS = [  # (name, experiment, overrides, claimed by the report)
    ("custom CNN model1 (softmax into the loss)", "fer_cnn", {"variant": "model1", "epochs": 25}, "54.22%"),
    ("custom CNN model2, best settings, 15 epochs", "fer_cnn", {"variant": "model2"}, "57.80%"),
    ("ResNet-18 from scratch, 48 px", "fer_resnet18", {"weights": "none"}, "60.48% (224 px)"),
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
        split = load_data(cfg)["train"]
        pre = build(cfg, split)[0].preprocess
        root = Path(os.environ["FER2013_DIR"])
        rows.append(compare(name, lambda: build(cfg, split)[0], split,
                            lambda: plain_loader(root, 32, pre.mean, pre.std, pre.size, pre.channels)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if not os.environ.get("FER2013_DIR"):
        parser.error("set FER2013_DIR to the FER2013 folder (train/ and test/)")
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    start = time.time()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print("\nTraining throughput (images/s; same model, same batch, same images; plain = ImageFolder + PIL + DataLoader):")
    print(table(throughput_rows(1000 if args.quick else 4000), THROUGHPUT_HEADER))
    if not args.skip_accuracy:
        print("\nTest accuracy (3,589 PublicTest images; model selection on 10% of train):")
        print(table(accuracy_rows(ROWS, {"epochs": 1, "limit": 1000} if args.quick else {}), ACCURACY_HEADER))
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
