"""Shared by the benchmarks: tracked accuracy rows (claims.yaml's experiments, its figures beside them), and training
throughput of cnnlab's loop against a plain DataLoader."""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from cnnlab.core.config import make_config, quick_overrides
from cnnlab.core.data import Split
from cnnlab.core.devices import autocast
from cnnlab.core.logs import table
from cnnlab.tracking.experiments import run
from cnnlab.tracking.reproduce import load_claims
from cnnlab.core.training import TrainConfig, fit

ACCURACY_HEADER = ("experiment", "report", "test acc", "val acc", "train img/s", "train s", "run")


def claimed(name: str, changes: dict) -> tuple[str, str, str, dict]:
    """claims.yaml's row `name` with `changes`: (label, the report's figure, experiment, its config overrides).

    Where `changes` alter a setting the report states, the figure says which setting it was claimed at."""
    (row,) = [r for e in load_claims() for r in e.rows if r.name == name]
    figure = f"{row.claimed:.2f}%" if row.claimed is not None else "-"
    stated = {k: v for k, v in row.params.items() if k in changes and changes[k] != v}
    if stated and row.claimed is not None:
        figure += " (" + ", ".join(f"{k}={v}" for k, v in stated.items()) + ")"
    label = " ".join([name, *(f"{k}={v}" for k, v in changes.items())])
    return label, figure, row.experiment, {**row.params, **changes}


def accuracy_rows(rows: list[tuple[str, dict]], quick_limit: int = 0) -> list[tuple]:
    """One tracked run per (claims.yaml row, changes) pair; with quick_limit, each shrunk to a smoke check."""
    out = []
    for name, changes in rows:
        label, figure, experiment, params = claimed(name, changes)
        cfg = make_config(experiment, **params)
        if quick_limit:
            cfg = make_config(experiment, **{**params, **quick_overrides(cfg, quick_limit)})
        result = run(cfg)
        val = f"{100 * result['val_accuracy']:.2f}%" if "val_accuracy" in result else "-"  # none on all of train
        out.append((label, figure, f"{100 * result['test_accuracy']:.2f}%", val,
                    f"{result['train_images_per_s']:.0f}", f"{result['train_seconds']:.0f}", result["run_id"][:8]))
    return out


def ours(model: torch.nn.Module, split: Split, batch_size: int, precision: str) -> float:
    """Images/s of one epoch of cnnlab's training loop over `split` (no validation)."""
    cfg = TrainConfig(epochs=1, batch_size=batch_size, precision=precision, device="cpu")
    return fit(model, split, None, cfg)[0]["train_images_per_s"]


def plain(model: torch.nn.Module, loader, steps: int, precision: str) -> float:
    """Images/s of the textbook loop: DataLoader of per-image PIL transforms, Adam, cross-entropy."""
    device = torch.device("cpu")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, start = 0, time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        with autocast(device, precision):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


THROUGHPUT_HEADER = ("model", "batch", "plain pipeline fp32 (baseline)", "plain pipeline bf16", "cnnlab loop fp32",
                     "cnnlab loop bf16 (default here)", "speed-up vs baseline")


def compare(name: str, make_model, split: Split, make_loader, batch_size: int = 32) -> tuple:
    """Images/s of the plain pipeline and of cnnlab's loop, each in fp32 and bf16, fresh model each time."""
    speeds = {}
    for precision in ("fp32", "bf16"):
        speeds["plain", precision] = plain(make_model().net, make_loader(), len(split) // batch_size, precision)
        speeds["ours", precision] = ours(make_model(), split, batch_size, precision)
    best = speeds["ours", "bf16"]
    return (name, batch_size, *(f"{speeds[k]:.0f}" for k in (("plain", "fp32"), ("plain", "bf16"), ("ours", "fp32"),
                                                              ("ours", "bf16"))),
            f"{best / speeds['plain', 'fp32']:.2f}x")


def throughput_and_accuracy(doc: str, throughput: Callable[[bool], list[tuple]], plain: str, rows: list[tuple],
                            quick_limit: int, test_images: str, required_env: str = "") -> None:
    """The main of a dataset benchmark: training throughput against `plain`, then the tracked accuracy rows."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if required_env and not os.environ.get(required_env):
        parser.error(f"set {required_env} to the dataset folder")
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    start = time.time()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"\nTraining throughput (images/s; same model, same batch, same images; plain = {plain}):")
    print(table(throughput(args.quick), THROUGHPUT_HEADER))
    if not args.skip_accuracy:
        print(f"\nTest accuracy ({test_images} test images; each row's protocol from claims.yaml):")
        print(table(accuracy_rows(rows, quick_limit if args.quick else 0), ACCURACY_HEADER))
    print(f"\ntotal {time.time() - start:.0f} s")
