"""Device, precision and threads: the one place that decides them for training, evaluation and serving."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX512-BF16), where bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: CUDA when there is a GPU, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the hardware computes it natively (fp16 on older GPUs), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def prefers_channels_last(device: torch.device, precision: str, model: torch.nn.Module | None = None) -> bool:
    """channels_last pays off on CUDA, for bf16 on CPUs (oneDNN's fast layout) and for depthwise convolutions in
    fp32 too (face_mobile trains at 382 against 310 images/s on an AVX512-BF16 Xeon); not for dense fp32 CPU convs."""
    depthwise = model is not None and any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
                                          for m in model.modules())
    return device.type == "cuda" or precision == "bf16" or depthwise


def threads_per_worker(workers: int) -> int:
    """The cores this process may use shared among `workers` processes: oversubscribed cores collapse throughput."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, workers))


def gpu_ids() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set (a list of ids or UUIDs), else every one torch
    sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())]


def place_workers(workers: int, per_worker: int = 1) -> list[list[str]] | None:
    """Disjoint GPU sets of `per_worker` GPUs for `workers` processes (never two on one GPU); None without GPUs, where
    workers share the CPU threads instead. Refused when the GPUs are too few."""
    gpus = gpu_ids()
    if not gpus:
        return None
    if workers * per_worker > len(gpus):
        raise ValueError(f"{workers} workers x {per_worker} GPU(s) each need {workers * per_worker} GPUs, this host "
                         f"has {len(gpus)} ({','.join(gpus)}): use --workers {len(gpus) // per_worker} or fewer (or "
                         f"run more workers on other hosts against the same storage)")
    return [gpus[i * per_worker: (i + 1) * per_worker] for i in range(workers)]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
