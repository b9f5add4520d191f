"""The one training loop: seeded, resumable from per-epoch checkpoints, AMP on CUDA and bf16 on CPUs with AMX; an
exponential moving average of the weights and distillation from a teacher when asked."""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnlab.core import logs
from cnnlab.core.augment import view_probabilities
from cnnlab.core.data import Split
from cnnlab.core.devices import PRECISIONS, autocast, prefers_channels_last, resolve_device, resolve_precision

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("none", "cosine", "plateau")
log = logging.getLogger(__name__)


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
    wd_norm_bias: bool = True  # false: no weight decay on biases and normalization weights (1-d parameters)
    distill_alpha: float = 0.5  # with a teacher: weight of the KL term against the teacher's softened predictions
    distill_temperature: float = 4.0
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
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ValueError(f"distill_temperature must be a positive number, got {self.distill_temperature}")


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """All parameters in one group, or (wd_norm_bias false) biases and norm weights apart with no weight decay."""
    params = list(model.parameters())
    if cfg.wd_norm_bias:
        return [{"params": params}]
    return [{"params": [p for p in params if p.dim() > 1]},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`params`: parameters or parameter groups (a group's own weight_decay wins over cfg's)."""
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
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    model.eval().to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(device, non_blocking=True)
        with autocast(device, precision):
            probs = view_probabilities(model, transform(x) if transform else [x])
        out.append(probs.float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


def evaluate_loss_acc(model, split: Split, cfg: TrainConfig, device, precision) -> tuple[float, float]:
    probs = predict(model, split.images, cfg.eval_batch_size, device, precision)
    labels = split.labels
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


@dataclass
class Checkpoint:
    """Where the loop saves its state each epoch, and what the state must belong to for a run to resume from it."""
    path: Path
    key: dict  # e.g. config and dataset digests: a checkpoint of other settings or other data never resumes

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, self.path)  # atomic: a crash never leaves a half-written checkpoint that looks complete

    def load(self, device: torch.device | str = "cpu") -> dict | None:
        """The saved state, or None when there is none or it cannot resume this run (then it is discarded)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)  # tensors, numbers, strings: no code
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or written by an incompatible version
            self.discard(f"unreadable ({type(e).__name__}: {e})")
            return None
        found = state.get("key") if isinstance(state, dict) else None
        if found != self.key:
            self.discard(f"it belongs to {found}, this run is {self.key}")
            return None
        return state

    def discard(self, reason: str) -> None:
        log.warning("discarding checkpoint %s and training from the start: %s", self.path, reason)
        self.path.unlink(missing_ok=True)


def _resume(checkpoint: Checkpoint, device: torch.device, stateful: dict) -> tuple[list[dict], int]:
    """Load model, optimizer, scheduler, scaler (and EMA) from the checkpoint; (history, first epoch) to continue from."""
    state = checkpoint.load(device)
    if state is None:
        return [], 0
    fresh = {name: copy.deepcopy(obj.state_dict()) for name, obj in stateful.items()}  # to undo a half-failed load
    try:
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
    except (KeyError, RuntimeError, ValueError) as e:
        for name, obj in stateful.items():
            obj.load_state_dict(fresh[name])
        checkpoint.discard(f"its state does not fit this model ({type(e).__name__}: {str(e)[:300]})")
        return [], 0
    return state["history"], state["epoch"] + 1


def epoch_line(epoch: int, epochs: int, metrics: dict, elapsed: float, done: int) -> str:
    """The line that stays after each epoch: losses, accuracies, lr, throughput, elapsed time and ETA."""
    val = (f" | val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.4f}"
           if "val_accuracy" in metrics else "")
    eta = elapsed / done * (epochs - epoch - 1)
    return (f"epoch {epoch + 1}/{epochs} | train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.4f}"
            f"{val} | lr {metrics['lr']:.2e} | {metrics['train_images_per_s']:,.0f} img/s"
            f" | {logs.duration(elapsed)} elapsed, ETA {logs.duration(eta)}")


class EMA:
    """Exponential moving average of a model's weights and floating buffers (BatchNorm statistics), in fp32 on the
    model's device. After n updates the decay is min(decay, (1 + n) / (10 + n)): the first weights fade fast."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs: tuple[list, list, list, list] | None = None

    def _match(self, model: torch.nn.Module) -> tuple[list, list, list, list]:
        """(averaged, trained) floating tensors and (averaged, trained) integer buffers, in the same order."""
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if [t.shape for t in ours] != [t.shape for t in theirs]:
            raise ValueError("EMA: the model's parameters and buffers no longer match the averaged copy")
        floating = [(a, b) for a, b in zip(ours, theirs) if a.is_floating_point()]
        integer = [(a, b) for a, b in zip(ours, theirs) if not a.is_floating_point()]
        return ([a for a, _ in floating], [b for _, b in floating], [a for a, _ in integer], [b for _, b in integer])

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step toward the model's current weights: a few fused kernels, no host-device sync. The model must not be
        moved to another device after the first update (its buffers would be new tensors)."""
        if self._pairs is None:
            self._pairs = self._match(model)
        averaged, trained, averaged_int, trained_int = self._pairs
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(averaged, trained, 1.0 - decay)
        if averaged_int:
            torch._foreach_copy_(averaged_int, trained_int)  # BatchNorm's num_batches_tracked
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def _place(module: torch.nn.Module, device: torch.device, channels_last: bool) -> None:
    """On the device, in channels_last where it pays (a Classifier, or the ones in an ensemble, lays out its input)."""
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
        for m in module.modules():
            if hasattr(m, "channels_last"):
                m.channels_last = True


def loss_fn(out: torch.Tensor, target: torch.Tensor, cfg: TrainConfig, teacher_out: torch.Tensor | None = None):
    """Cross-entropy (label-smoothed); with a teacher's outputs, alpha * T^2 * KL(teacher_T || student_T) +
    (1 - alpha) * cross-entropy (Hinton et al. 2015)."""
    ce = F.cross_entropy(out, target, label_smoothing=cfg.label_smoothing)
    if teacher_out is None:
        return ce
    t = cfg.distill_temperature
    kl = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(teacher_out / t, 1), reduction="batchmean",
                  log_target=True)
    return cfg.distill_alpha * t * t * kl + (1 - cfg.distill_alpha) * ce


def _validate(model, ema: EMA | None, val: Split, cfg: TrainConfig, device, precision) -> dict[str, float]:
    """val_loss and val_accuracy of the weights the run produces (the averaged ones with EMA, then *_raw: trained)."""
    loss, acc = evaluate_loss_acc(model, val, cfg, device, precision)
    if ema is None:
        return {"val_loss": loss, "val_accuracy": acc}
    ema_loss, ema_acc = evaluate_loss_acc(ema.module, val, cfg, device, precision)
    return {"val_loss": ema_loss, "val_accuracy": ema_acc, "val_loss_raw": loss, "val_accuracy_raw": acc}


def fit(model: torch.nn.Module, train: Split, val: Split | None, cfg: TrainConfig, *,
        augment: Callable | None = None, epoch_hook: Callable | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None, checkpoint: Checkpoint | None = None,
        ema: EMA | None = None, teacher: torch.nn.Module | None = None) -> list[dict]:
    """Train `model` on uint8 `train` images; returns per-epoch metrics. Resumes from `checkpoint` if it can.

    Without `val` there is no per-epoch validation (and no val_* metrics).
    augment(x_uint8, y, generator) -> (x, target) runs on whole batches on the device; target may be soft labels.
    epoch_hook(epoch, model) runs after model.train() each epoch (freezing schedules).
    ema: updated after every step and checkpointed; val_* are then its weights' metrics, val_*_raw the model's.
    teacher: a frozen model (eval mode, no grad, autocast) run on the same augmented batch; its outputs are soft
    targets (distill_alpha, distill_temperature).
    """
    cfg.validate()
    if val is None and cfg.schedule == "plateau":
        raise ValueError("schedule=plateau steps on validation accuracy: it needs a validation split")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = cfg.channels_last and prefers_channels_last(device, precision)
    for module in (model, ema and ema.module, teacher):
        if module is not None:
            _place(module, device, channels_last)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    images, labels = train.images.to(device), train.labels.to(device)
    steps_per_epoch = max(1, len(train) // cfg.batch_size + (len(train) % cfg.batch_size > 1))
    optimizer = make_optimizer(param_groups(model, cfg), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    if ema is not None:
        stateful["ema"] = ema
    history, start = _resume(checkpoint, device, stateful) if checkpoint else ([], 0)
    check_every = 1 if device.type == "cpu" else 50  # a finite-loss check syncs a GPU: check every 50 steps there
    t_start = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout/augmentation RNG depends only on (seed, epoch)
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(train), generator=gen, device=device)
        model.train()
        if epoch_hook:
            epoch_hook(epoch, model)
        t0, seen, loss_sum, correct = time.perf_counter(), 0, torch.zeros((), device=device), torch.zeros((), device=device)
        bar = tqdm(range(0, len(train), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not logs.bars())
        for i in bar:
            idx = order[i: i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            x, y = images[idx], labels[idx]
            x, target = augment(x, y, gen) if augment else (x, y)
            teacher_out = None
            if teacher is not None:
                with torch.no_grad(), autocast(device, precision):
                    teacher_out = teacher(x).float()
            with autocast(device, precision):
                out = model(x)
            loss = loss_fn(out.float(), target, cfg, teacher_out)
            step = i // cfg.batch_size
            if (step % check_every == 0 or i + cfg.batch_size >= len(train)) and not torch.isfinite(loss_sum + loss):
                raise FloatingPointError(f"loss became {(loss_sum + loss).item()} by epoch {epoch + 1}, step {step}; "
                                         f"lower lr (now {cfg.lr}) or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            if not plateau:
                scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (out.argmax(1) == y).sum()
            seen += len(idx)
        train_time = time.perf_counter() - t0
        metrics = {"train_loss": (loss_sum / max(seen, 1)).item(), "train_accuracy": (correct / max(seen, 1)).item()}
        if val is not None:
            metrics.update(_validate(model, ema, val, cfg, device, precision))
        if plateau:  # on the trained weights' accuracy: the averaged ones lag behind the schedule
            scheduler.step(metrics.get("val_accuracy_raw", metrics["val_accuracy"]))
        metrics.update({"lr": optimizer.param_groups[0]["lr"], "epoch_seconds": train_time,
                        "train_images_per_s": seen / max(train_time, 1e-9)})
        history.append(metrics)
        log.info(epoch_line(epoch, cfg.epochs, metrics, time.perf_counter() - t_start, epoch + 1 - start))
        if checkpoint is not None:
            checkpoint.save({**{name: obj.state_dict() for name, obj in stateful.items()},
                             "epoch": epoch, "history": history, "config": asdict(cfg)})
        if on_epoch_end:
            on_epoch_end(epoch, metrics)
    return history
