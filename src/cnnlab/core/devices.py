"""Device, precision and threads: the one place that decides them for training, evaluation and serving."""
from __future__ import annotations

import contextlib
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


def prefers_channels_last(device: torch.device, precision: str) -> bool:
    """channels_last pays off on CUDA and for bf16 on CPUs (oneDNN's fast layout); never for fp32 on a CPU."""
    return device.type == "cuda" or precision == "bf16"


def threads_per_worker(workers: int) -> int:
    """This process's threads shared among `workers` processes: oversubscribed cores collapse bf16 throughput."""
    return max(1, torch.get_num_threads() // max(1, workers))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
