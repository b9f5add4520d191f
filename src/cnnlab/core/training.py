"""The one training loop: seeded, AMP on CUDA and bf16 on CPUs with AMX. Callbacks plug into it (Lightning's
pattern): per-epoch checkpoints to resume from, an exponential moving average of the weights, distillation from a
teacher here; freezing schedules, logging and pruning where they belong."""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnlab.core import logs
from cnnlab.core.augment import view_probabilities
from cnnlab.core.data import Split
from cnnlab.core.devices import PRECISIONS, autocast, prefers_channels_last, resolve_device, resolve_precision

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("none", "cosine", "plateau")
CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS}  # TrainConfig's closed sets
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
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    channels_last: bool = True  # where it pays (devices.prefers_channels_last): CUDA, bf16 CPUs, depthwise nets
    device: str = "auto"
    seed: int = 0
    eval_batch_size: int = 1024

    def choices(self) -> dict[str, tuple]:
        """Every field with a closed set of values, and the set (a subclass adds its own)."""
        return CHOICES

    def validate(self) -> None:
        for name, allowed in self.choices().items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
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
            probs = view_probabilities(lambda v: model.probabilities(model(v)), transform(x) if transform else [x])
        out.append(probs.float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


def evaluate_loss_acc(model, split: Split, cfg: TrainConfig, device, precision) -> tuple[float, float]:
    probs = predict(model, split.images, cfg.eval_batch_size, device, precision)
    labels = split.labels
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


class Callback:
    """A hook into fit's loop: override the hooks you need; callbacks run in list order. One with a `state_key` is
    saved in checkpoints under that key (it has state_dict and load_state_dict)."""
    state_key = ""

    def on_fit_start(self, loop: Loop) -> None:
        """Before the first epoch: place modules, resume."""

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        """After model.train(), before the epoch's first batch."""

    def on_order(self, loop: Loop, order: torch.Tensor) -> torch.Tensor:
        """The epoch's order of training images, which it may cut (a rank's shard)."""
        return order

    def on_loss(self, loop: Loop, x: torch.Tensor, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """The loss to optimize, from the (augmented) batch, the model's fp32 outputs and the loss so far."""
        return loss

    def on_step_end(self, loop: Loop) -> None:
        """After each optimizer step."""

    def on_validation_end(self, loop: Loop, metrics: dict) -> None:
        """After the trained weights' val_loss and val_accuracy, which it may change or add to."""

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict) -> None:
        """After the epoch's metrics are complete and appended to loop.history."""


@dataclass
class Loop:
    """The loop's state as callbacks see it: the model and its optimizer, where it runs, the epochs done so far."""
    model: torch.nn.Module
    cfg: TrainConfig
    val: Split | None
    callbacks: list[Callback]
    device: torch.device
    precision: str
    channels_last: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    history: list[dict] = field(default_factory=list)
    start: int = 0  # the first epoch to train: 0, or the one after a resumed checkpoint's

    def place(self, module: torch.nn.Module) -> None:
        _place(module, self.device, self.channels_last)

    def stateful(self) -> dict:
        """Everything a checkpoint saves and restores, by name."""
        own = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}
        return {**own, **{cb.state_key: cb for cb in self.callbacks if cb.state_key}}

    def evaluate(self, module: torch.nn.Module) -> tuple[float, float]:
        """Loss and accuracy of `module` on the validation split."""
        return evaluate_loss_acc(module, self.val, self.cfg, self.device, self.precision)


@dataclass
class Checkpoint(Callback):
    """Where the loop saves its state each epoch (and resumes from), and what the state must belong to for a run to
    resume from it."""
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

    def on_fit_start(self, loop: Loop) -> None:
        loop.history, loop.start = _resume(self, loop.device, loop.stateful())

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict) -> None:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return  # data-parallel ranks hold the same state: rank 0 saves it
        self.save({**{name: obj.state_dict() for name, obj in loop.stateful().items()},
                   "epoch": epoch, "history": loop.history, "config": asdict(loop.cfg)})


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


class EMA(Callback):
    """Exponential moving average of a model's weights and floating buffers (BatchNorm statistics), in fp32 on the
    model's device. After n updates the decay is min(decay, (1 + n) / (10 + n)): the first weights fade fast.
    In fit: updated after every step and checkpointed; val_* are then its weights' metrics, val_*_raw the model's."""
    state_key = "ema"

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

    def on_fit_start(self, loop: Loop) -> None:
        loop.place(self.module)

    def on_step_end(self, loop: Loop) -> None:
        self.update(loop.model)

    def on_validation_end(self, loop: Loop, metrics: dict) -> None:
        loss, acc = loop.evaluate(self.module)
        metrics.update({"val_loss": loss, "val_accuracy": acc, "val_loss_raw": metrics["val_loss"],
                        "val_accuracy_raw": metrics["val_accuracy"]})


def _place(module: torch.nn.Module, device: torch.device, channels_last: bool) -> None:
    """On the device, in channels_last where it pays (a Classifier, or the ones in an ensemble, lays out its input)."""
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
        for m in module.modules():
            if hasattr(m, "channels_last"):
                m.channels_last = True


class Distillation(Callback):
    """A frozen teacher (one model or an ensemble; eval mode, no grad, autocast) run on the same augmented batch: its
    outputs are soft targets. loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy
    (Hinton et al. 2015), with cfg's distill_alpha and distill_temperature."""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher = teacher

    def on_fit_start(self, loop: Loop) -> None:
        loop.place(self.teacher)
        self.teacher.eval().requires_grad_(False)

    def on_loss(self, loop: Loop, x: torch.Tensor, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(loop.device, loop.precision):
            teacher_out = self.teacher(x).float()
        t, alpha = loop.cfg.distill_temperature, loop.cfg.distill_alpha
        kl = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(teacher_out / t, 1), reduction="batchmean",
                      log_target=True)
        return alpha * t * t * kl + (1 - alpha) * loss


def _start(model: torch.nn.Module, train: Split, val: Split | None, cfg: TrainConfig,
           callbacks: list[Callback]) -> Loop:
    """Check the settings; the model placed, its optimizer, scheduler and scaler; then the callbacks' on_fit_start."""
    cfg.validate()
    if val is None and cfg.schedule == "plateau":
        raise ValueError("schedule=plateau steps on validation accuracy: it needs a validation split")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = cfg.channels_last and prefers_channels_last(device, precision, model)
    _place(model, device, channels_last)
    steps_per_epoch = max(1, len(train) // cfg.batch_size + (len(train) % cfg.batch_size > 1))
    optimizer = make_optimizer(param_groups(model, cfg), cfg)
    loop = Loop(model, cfg, val, callbacks, device, precision, channels_last, optimizer,
                make_scheduler(optimizer, cfg, steps_per_epoch),
                torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda"))
    for cb in callbacks:
        cb.on_fit_start(loop)
    return loop


def _plateau(loop: Loop) -> bool:
    return isinstance(loop.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _forward(loop: Loop, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's fp32 outputs and the loss: cross-entropy (label-smoothed), then what callbacks make of it."""
    with autocast(loop.device, loop.precision):
        out = loop.model(x).float()
    loss = F.cross_entropy(out, target, label_smoothing=loop.cfg.label_smoothing)
    for cb in loop.callbacks:
        loss = cb.on_loss(loop, x, out, loss)
    return out, loss


def _optimize(loop: Loop, loss: torch.Tensor) -> None:
    """One optimizer step (scaled in fp16), then the callbacks' on_step_end and the per-step LR schedule."""
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scaler.scale(loss).backward()
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    for cb in loop.callbacks:
        cb.on_step_end(loop)
    if not _plateau(loop):
        loop.scheduler.step()


def _train_epoch(loop: Loop, epoch: int, images: torch.Tensor, labels: torch.Tensor,
                 augment: Callable | None) -> dict[str, float]:
    """One pass over the training images in an order drawn from (seed, epoch): train loss, accuracy, throughput."""
    cfg, device, n = loop.cfg, loop.device, len(images)
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout/augmentation RNG depends only on (seed, epoch)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen, device=device)
    loop.model.train()
    for cb in loop.callbacks:
        cb.on_epoch_start(loop, epoch)
        order = cb.on_order(loop, order)
    n = len(order)
    check_every = 1 if device.type == "cpu" else 50  # a finite-loss check syncs a GPU: check every 50 steps there
    t0, seen, loss_sum, correct = time.perf_counter(), 0, torch.zeros((), device=device), torch.zeros((), device=device)
    for i in tqdm(range(0, n, cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                  disable=not logs.bars()):
        idx = order[i: i + cfg.batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a single image
            continue
        y = labels[idx]
        x, target = augment(images[idx], y, gen) if augment else (images[idx], y)
        out, loss = _forward(loop, x, target)
        step = i // cfg.batch_size
        if (step % check_every == 0 or i + cfg.batch_size >= n) and not torch.isfinite(loss_sum + loss):
            raise FloatingPointError(f"loss became {(loss_sum + loss).item()} by epoch {epoch + 1}, step {step}; "
                                     f"lower lr (now {cfg.lr}) or check the data")
        _optimize(loop, loss)
        loss_sum += loss.detach() * len(idx)
        correct += (out.argmax(1) == y).sum()
        seen += len(idx)
    seconds = time.perf_counter() - t0
    return {"train_loss": (loss_sum / max(seen, 1)).item(), "train_accuracy": (correct / max(seen, 1)).item(),
            "epoch_seconds": seconds, "train_images_per_s": seen / max(seconds, 1e-9)}


def _validate(loop: Loop) -> dict[str, float]:
    """val_loss and val_accuracy of the trained weights, as the callbacks amend them (EMA: the averaged ones')."""
    loss, acc = loop.evaluate(loop.model)
    metrics = {"val_loss": loss, "val_accuracy": acc}
    for cb in loop.callbacks:
        cb.on_validation_end(loop, metrics)
    return metrics


def fit(model: torch.nn.Module, train: Split, val: Split | None, cfg: TrainConfig, *,
        augment: Callable | None = None, callbacks: Sequence[Callback] = ()) -> list[dict]:
    """Train `model` on uint8 `train` images; returns per-epoch metrics (a resumed run's earlier epochs included).

    Without `val` there is no per-epoch validation (and no val_* metrics).
    augment(x_uint8, y, generator) -> (x, target) runs on whole batches on the device; target may be soft labels.
    callbacks, in order: e.g. EMA, Distillation, a freeze schedule, Checkpoint, then logging and pruning.
    """
    loop = _start(model, train, val, cfg, list(callbacks))
    images, labels = train.images.to(loop.device), train.labels.to(loop.device)
    t_start = time.perf_counter()
    for epoch in range(loop.start, cfg.epochs):
        metrics = _train_epoch(loop, epoch, images, labels, augment)
        if val is not None:
            metrics.update(_validate(loop))
        if _plateau(loop):  # on the trained weights' accuracy: the averaged ones lag behind the schedule
            loop.scheduler.step(metrics.get("val_accuracy_raw", metrics["val_accuracy"]))
        metrics["lr"] = loop.optimizer.param_groups[0]["lr"]
        loop.history.append(metrics)
        log.info(epoch_line(epoch, cfg.epochs, metrics, time.perf_counter() - t_start, epoch + 1 - loop.start))
        for cb in loop.callbacks:
            cb.on_epoch_end(loop, epoch, metrics)
    return loop.history
