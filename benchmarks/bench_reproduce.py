"""Benchmark: reproduce both reports and print the claimed-vs-measured table (95% intervals, run IDs), or plan it.

Full, at the reports' settings (ResNet-18 at 224 px: hours on a CPU, minutes on a GPU):
    python benchmarks/bench_reproduce.py [--only NAME] [--out DIR]
Smoke check (small subsets, 1 epoch):
    python benchmarks/bench_reproduce.py --quick
The plan: time a few training steps of every row at its full settings on this machine, extrapolate to its epochs and
training-split size, and give this CPU the cheapest entries that fit in --cpu-hours (untracked, nothing trained to
the end):
    python benchmarks/bench_reproduce.py --plan [--cpu-hours 2] [--cores 2] [--steps 6]
Otherwise takes the arguments of `cnnlab reproduce`; tracks to MLFLOW_TRACKING_URI (default sqlite:///mlflow.db), so
rows already measured at the same commit (imported GPU runs too) are reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnnlab.core.logs import duration, table  # noqa: E402

from cnnlab import cli  # noqa: E402
from cnnlab.core import data, pipeline
from cnnlab.tracking.reproduce import imagenet_error, load_claims, report_path, row_config  # noqa: E402
from cnnlab.core.training import fit  # noqa: E402

PLAN_HEADER = ("row", "protocol", "model", "px", "batch", "train images", "epochs", "img per core-s", "per epoch",
               "whole row", "where")
PARALLEL_EFFICIENCY = 0.85  # assumed, not measured (the machine was shared): 2 threads ~1.7x one
EVAL_SHARE = 1.15  # an epoch's evaluation passes (validation, then test once) add ~15% to its training pass


def images_per_core_s(cfg, steps: int) -> float:
    """Training images per CPU-second of one thread for the row's model at its batch and image size: `steps` steps of
    cnnlab's loop after as many warm-up steps, in CPU time, so other processes on a shared machine do not count."""
    train = pipeline.load_data(cfg)["train"]
    probe = dataclasses.replace(cfg, weights="none", epochs=1, schedule="none")  # ImageNet weights cost nothing more
    sample = train.subset(torch.arange(min(len(train), steps * cfg.batch_size)))
    model, _ = pipeline.build(probe, sample)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(model, sample, None, probe)  # warm-up: first-call allocations and kernel choices
        t0 = time.process_time()
        fit(model, sample, None, probe)
        return len(sample) / (time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)


def estimate(cfg, per_core: float, cores: int) -> tuple[int, float]:
    """The row's training-split size and seconds per epoch on `cores` quiet cores, evaluation included."""
    n = len(pipeline.load_data(cfg)["train"])
    return n, n / (per_core * cores * PARALLEL_EFFICIENCY) * EVAL_SHARE


def plan(args) -> int:
    """Time every row's model, estimate each row and entry, and give the CPU the cheapest entries that fit."""
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {args.steps} "
          f"timed steps per row in CPU time of one thread; estimates for {args.cores} quiet cores", flush=True)
    speeds, rows = {}, []
    for entry in load_claims():
        for row in entry.rows:
            cfg = row_config(row, quick=False, overrides={})
            cost = (cfg.dataset, cfg.model, cfg.variant, cfg.width, cfg.head, cfg.image_size, cfg.in_chans,
                    cfg.batch_size)
            if cost not in speeds:  # rows that differ only in hyperparameters cost the same per image
                speeds[cost] = images_per_core_s(cfg, args.steps)
                print(f"  {row.name}: {speeds[cost]:.0f} img per core-s", flush=True)
            n, epoch = estimate(cfg, speeds[cost], args.cores)
            rows.append((entry, row, cfg, speeds[cost], n, epoch, epoch * cfg.total_epochs()))
    entries = {}
    for entry, *_, whole in rows:
        entries[entry.name] = entries.get(entry.name, 0.0) + whole
    cpu, spent = set(), 0.0
    for name, whole in sorted(entries.items(), key=lambda item: item[1]):  # cheapest first, whole entries
        if spent + whole <= args.cpu_hours * 3600:
            cpu.add(name)
            spent += whole
    lines = []
    for entry, row, cfg, per_core, n, epoch, whole in rows:
        where = "CPU" if entry.name in cpu else "GPU"
        if cfg.weights == "imagenet" and imagenet_error():
            where += " (ImageNet weights not available here)"
        px = cfg.image_size or data.get(cfg.dataset).size
        lines.append((row.name, entry.protocol, cfg.model, px, cfg.batch_size, f"{n:,}",
                      cfg.total_epochs(), f"{per_core:.0f}", duration(epoch), duration(whole), where))
    print(table(lines, PLAN_HEADER))
    print(f"\nall rows one after another here: {duration(sum(entries.values()))}; the CPU takes the cheapest entries "
          f"within {args.cpu_hours:g} h: {duration(spent)}")
    for where, names in (("CPU", [n for n in entries if n in cpu]), ("GPU", [n for n in entries if n not in cpu])):
        print(f"{where} rows: cnnlab reproduce --only {','.join(names)}" if names else f"{where} rows: none")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--cpu-hours", type=float, default=2.0, help="--plan: CPU time to fill, in hours")
    parser.add_argument("--steps", type=int, default=6, help="--plan: timed training steps per row")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="--plan: cores of the machine to plan for")
    ours, rest = parser.parse_known_args(argv)
    if ours.plan:
        return plan(ours)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
    args = cli.build_parser().parse_args(["reproduce", *rest])
    t0, started = time.perf_counter(), time.time()
    rc = cli.main(["reproduce", *rest])  # failed rows still write the report, with their errors
    report = report_path(args.out, args.quick)
    if report.exists() and report.stat().st_mtime >= started:  # never print an earlier call's table
        print(report.read_text())
    print(f"total: {time.perf_counter() - t0:.0f} s; reports: {report} and {report.with_suffix('.html')}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
