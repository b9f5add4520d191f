"""The one training loop: seeded, resumable from per-epoch checkpoints, AMP on CUDA and bf16 on CPUs with AMX."""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import Split
from .preprocess import cpu_has_bf16

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("none", "cosine", "plateau")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "none"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    precision: str = "auto"
    channels_last: bool = True  # on CUDA, and on CPUs in bf16 (oneDNN's fast layout); never for fp32 on CPU
    device: str = "auto"
    seed: int = 0
    eval_batch_size: int = 1024

    def validate(self) -> None:
        for name, value, allowed in [("optimizer", self.optimizer, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES),
                                     ("precision", self.precision, PRECISIONS)]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step LR multiplier (linear warm-up, then constant or cosine); plateau is stepped per epoch."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=3)
    total, warm = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024, device: str | torch.device = "auto",
            precision: str = "auto", transform: Callable | None = None) -> torch.Tensor:
    """Class probabilities (N, C) for uint8 images; `transform` maps a batch to several views whose outputs are averaged."""
    device = resolve_device(device) if isinstance(device, str) else device
    precision = resolve_precision(precision, device)
    model.eval().to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(device, non_blocking=True)
        views = transform(x) if transform else [x]
        with autocast(device, precision):
            probs = sum(model.probabilities(model(v)) for v in views) / len(views)
        out.append(probs.float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


def evaluate_loss_acc(model, split: Split, cfg: TrainConfig, device, precision) -> tuple[float, float]:
    probs = predict(model, split.images, cfg.eval_batch_size, device, precision)
    labels = split.labels
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint that looks complete


def fit(model: torch.nn.Module, train: Split, val: Split, cfg: TrainConfig, *,
        augment: Callable | None = None, epoch_hook: Callable | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None, checkpoint: Path | None = None) -> list[dict]:
    """Train `model` on uint8 `train` images; returns per-epoch metrics. Resumes from `checkpoint` if it exists.

    augment(x_uint8, y, generator) -> (x, target) runs on whole batches on the device; target may be soft labels.
    epoch_hook(epoch, model) runs after model.train() each epoch (freezing schedules).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.channels_last and (device.type == "cuda" or precision == "bf16"):
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    images, labels = train.images.to(device), train.labels.to(device)
    steps_per_epoch = max(1, len(train) // cfg.batch_size + (len(train) % cfg.batch_size > 1))
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")
    history, start = [], 0
    check_every = 1 if device.type == "cpu" else 50  # a finite-loss check syncs a GPU: check every 50 steps there
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, start = state["history"], state["epoch"] + 1
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout/augmentation RNG depends only on (seed, epoch)
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(train), generator=gen, device=device)
        model.train()
        if epoch_hook:
            epoch_hook(epoch, model)
        t0, seen, loss_sum, correct = time.perf_counter(), 0, torch.zeros((), device=device), torch.zeros((), device=device)
        bar = tqdm(range(0, len(train), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None)
        for i in bar:
            idx = order[i: i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            x, y = images[idx], labels[idx]
            x, target = augment(x, y, gen) if augment else (x, y)
            with autocast(device, precision):
                out = model(x)
            loss = F.cross_entropy(out.float(), target, label_smoothing=cfg.label_smoothing)
            step = i // cfg.batch_size
            if (step % check_every == 0 or i + cfg.batch_size >= len(train)) and not torch.isfinite(loss_sum + loss):
                raise FloatingPointError(f"loss became {(loss_sum + loss).item()} by epoch {epoch + 1}, step {step}; "
                                         f"lower lr (now {cfg.lr}) or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (out.argmax(1) == y).sum()
            seen += len(idx)
        train_time = time.perf_counter() - t0
        val_loss, val_acc = evaluate_loss_acc(model, val, cfg, device, precision)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_acc)
        metrics = {"train_loss": (loss_sum / max(seen, 1)).item(), "train_accuracy": (correct / max(seen, 1)).item(),
                   "val_loss": val_loss, "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"],
                   "epoch_seconds": train_time, "train_images_per_s": seen / max(train_time, 1e-9)}
        history.append(metrics)
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                         "epoch": epoch, "history": history, "config": asdict(cfg)})
        if on_epoch_end:
            on_epoch_end(epoch, metrics)
    return history
