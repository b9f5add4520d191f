"""Shared by the benchmarks: tracked accuracy rows, and training throughput of cnnlab's loop against a plain DataLoader."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from cnnlab.config import make_config
from cnnlab.data import Split
from cnnlab.experiments import run
from cnnlab.training import TrainConfig, autocast, fit

ACCURACY_HEADER = ("experiment", "report", "test acc", "val acc", "train img/s", "train s", "run")


def accuracy_rows(rows: list[tuple], extra: dict) -> list[tuple]:
    """One tracked run per (name, experiment, overrides, claimed) row; `extra` overrides every row."""
    out = []
    for name, experiment, params, claimed in rows:
        result = run(make_config(experiment, **{**params, **extra}))
        out.append((name, claimed, f"{100 * result['test_accuracy']:.2f}%", f"{100 * result['val_accuracy']:.2f}%",
                    f"{result['train_images_per_s']:.0f}", f"{result['train_seconds']:.0f}", result["run_id"][:8]))
    return out


def ours(model: torch.nn.Module, split: Split, batch_size: int, precision: str) -> float:
    """Images/s of one epoch of cnnlab's training loop over `split` (validation on 2 images only)."""
    cfg = TrainConfig(epochs=1, batch_size=batch_size, precision=precision, device="cpu")
    tiny_val = split.subset(torch.arange(2))
    return fit(model, split, tiny_val, cfg)[0]["train_images_per_s"]


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


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
