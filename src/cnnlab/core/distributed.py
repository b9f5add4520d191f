"""Data-parallel training under torchrun: the rank from its environment, each rank's shard of an epoch, the
model in DistributedDataParallel, metrics reduced across ranks. Without torchrun (WORLD_SIZE unset) all of it is off."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cnnlab.core.training import Callback, Loop


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0: the process that logs, checkpoints, evaluates and registers."""
    return rank() == 0


def setup() -> None:
    """Join torchrun's process group (nccl with GPUs, one per local rank; gloo on CPUs); nothing without torchrun."""
    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(order: torch.Tensor, batch_size: int, index: int, ranks: int) -> torch.Tensor:
    """Rank `index`'s images of an epoch's `order`: step s of every rank together is the single-process batch s of
    batch_size * ranks images, cut in equal slices; the last (short) step is cut evenly and up to ranks - 1 images
    are dropped, so every rank takes the same number of steps."""
    order = order[: len(order) - len(order) % ranks]
    full = len(order) // (batch_size * ranks) * batch_size * ranks
    steps = order[:full].view(-1, ranks, batch_size)[:, index].reshape(-1)
    return torch.cat([steps, order[full:].view(ranks, -1)[index]])


class DataParallel(DistributedDataParallel):
    """DDP whose state and attributes are the plain model's (checkpoints stay the single-process ones; validation
    calls the Classifier's methods), and that evaluates without collectives: in eval mode it is the model itself."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs) if self.training else self.module(*args, **kwargs)


class Ranks(Callback):
    """fit across torchrun's ranks: the model in DDP (BatchNorm synchronised with sync_bn), each rank its shard of
    every epoch's seeded order, train metrics reduced across ranks before the callbacks after it see them."""

    def __init__(self, sync_bn: bool = False):
        self.sync_bn = sync_bn

    def on_fit_start(self, loop: Loop) -> None:
        model = loop.model
        if self.sync_bn:
            if loop.device.type != "cuda":
                raise ValueError("sync_bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPUs (gloo); "
                                 "drop -P sync_bn=true")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [loop.device.index] if loop.device.type == "cuda" else None
        loop.model = DataParallel(model, device_ids=ids)  # broadcasts rank 0's weights: every rank starts equal

    def on_order(self, loop: Loop, order: torch.Tensor) -> torch.Tensor:
        return shard(order, loop.cfg.batch_size, rank(), world_size())

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict) -> None:
        """Means over equal shards: the mean of the ranks' means; throughput: their sum; time: the slowest."""
        keys = ("train_loss", "train_accuracy", "train_images_per_s", "epoch_seconds")
        values = torch.tensor([[metrics[k] for k in keys]], dtype=torch.float64, device=loop.device)  # nccl: on GPU
        gathered = [torch.zeros_like(values) for _ in range(world_size())]
        dist.all_gather(gathered, values)
        table = torch.cat(gathered)
        metrics.update({"train_loss": table[:, 0].mean().item(), "train_accuracy": table[:, 1].mean().item(),
                        "train_images_per_s": table[:, 2].sum().item(), "epoch_seconds": table[:, 3].max().item()})


def params(batch_size: int) -> dict:
    """What a distributed run logs about itself."""
    return {"world_size": world_size(), "global_batch_size": batch_size * world_size(),
            "backend": dist.get_backend() if dist.is_initialized() else "none"}
