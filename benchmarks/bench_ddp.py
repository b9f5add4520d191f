"""Data-parallel training throughput: fmnist_cnn under torchrun with 1 and 2 processes (gloo on CPUs, nccl on GPUs),
the same per-rank batch, and the N-GPU scaling that the gradient's all-reduce allows at a stated bandwidth.

    python benchmarks/bench_ddp.py                    # 2 epochs on 6,000 images per run (a few minutes on 2 cores)
    python benchmarks/bench_ddp.py --limit 60000 --bandwidth 450   # on a GPU host: NVLink 4 (H100 SXM)

torchrun sets OMP_NUM_THREADS=1 in every process unless it is set: the rows say each run's threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnnlab.core.logs import table  # noqa: E402

HEADER = ("processes", "threads each", "device", "images/s", "vs 1 process", "efficiency")


def worker(limit: int, epochs: int, batch_size: int) -> None:
    """One torchrun rank: train without tracking; rank 0 prints the last epoch's images/s (summed over ranks)."""
    from cnnlab.core import distributed, models, pipeline
    from cnnlab.core.config import make_config

    distributed.setup()
    cfg = make_config("fmnist_cnn", limit=limit, epochs=epochs, batch_size=batch_size)
    trained = pipeline.prepare(cfg)
    history = pipeline.train(trained)
    if distributed.is_main():
        import torch
        print(json.dumps({"images_per_s": history[-1]["train_images_per_s"], "threads": torch.get_num_threads(),
                          "device": "cuda" if torch.cuda.is_available() else "cpu",
                          "gradient_bytes": 4 * models.count_parameters(trained.model)}))
    distributed.teardown()


def launch(nproc: int, args, threads: int | None = None) -> dict:
    """A torchrun of this script's worker; its rank 0's JSON line."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--limit", str(args.limit), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"torchrun --nproc_per_node={nproc} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimate(step_seconds: float, gradient_bytes: int, gpus: int, bandwidth: float) -> float:
    """Scaling efficiency of `gpus` ranks: a ring all-reduce sends 2 (N - 1) / N of the gradient per rank per step,
    at `bandwidth` GB/s, counted as if it never overlapped the backward pass (DDP overlaps it: a lower bound)."""
    seconds = 2 * (gpus - 1) / gpus * gradient_bytes / (bandwidth * 1e9)
    return step_seconds / (step_seconds + seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)  # the last epoch is timed: the first warms up
    parser.add_argument("--batch-size", type=int, default=64, help="per process; the global batch is N times it")
    parser.add_argument("--bandwidth", type=float, nargs="+", default=[450.0, 25.0],
                        help="GB/s per GPU for the estimate (450: NVLink 4 on H100 SXM; 25: PCIe 4 x16, effective)")
    parser.add_argument("--gpu-step-ms", type=float, default=2.0,
                        help="one GPU's step time for the estimate where no GPU ran here (an assumption: measure it)")
    parser.add_argument("--quick", action="store_true", help="600 images: a smoke check")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.limit = 600 if args.quick else args.limit
    if args.worker:
        return worker(args.limit, args.epochs, args.batch_size)
    one, wide, two = launch(1, args, threads=1), launch(1, args, threads=2), launch(2, args)
    base = one["images_per_s"]
    rows = [(n, r["threads"], r["device"], f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / base:.2f}x",
             f"{r['images_per_s'] / base / n:.0%}") for n, r in ((1, one), (1, wide), (2, two))]
    print(f"fmnist_cnn, {args.limit} images, per-process batch {args.batch_size}, last of {args.epochs} epochs:")
    print(table(rows, HEADER))
    step = args.batch_size / base
    measured = one["device"] == "cuda"
    gpu_step = step if measured else args.gpu_step_ms / 1000
    print(f"\ngradient per step: {one['gradient_bytes'] / 1e6:.1f} MB (fp32); one process's step here: "
          f"{1000 * step:.1f} ms; one GPU's step: {1000 * gpu_step:.1f} ms ({'measured' if measured else 'assumed'})")
    print("estimated N-GPU efficiency (ring all-reduce, no overlap with the backward pass: a lower bound):")
    print(table([(n, *(f"{estimate(gpu_step, one['gradient_bytes'], n, bw):.1%}" for bw in args.bandwidth))
                 for n in (2, 4, 8)], ("GPUs", *(f"at {bw:g} GB/s" for bw in args.bandwidth))))


if __name__ == "__main__":
    main()
