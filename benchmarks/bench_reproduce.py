"""Benchmark: reproduce both reports and print the claimed-vs-measured table with the total time.

Full, at the reports' settings (ResNet-18 at 224 px: hours on a CPU, minutes on a GPU):
    python benchmarks/bench_reproduce.py [-P device=cuda -P precision=bf16] [--only NAME] [--out DIR]
Smoke check (small subsets, 1 epoch):
    python benchmarks/bench_reproduce.py --quick
Takes the arguments of `cnnlab reproduce`; tracks to MLFLOW_TRACKING_URI (default sqlite:///mlflow.db), so rows
already measured at the same commit are reused.
"""
from __future__ import annotations

import sys
import time

from cnnlab import cli
from cnnlab.reproduce import report_path


def main(argv: list[str]) -> int:
    args = cli.build_parser().parse_args(["reproduce", *argv])
    t0, started = time.perf_counter(), time.time()
    rc = cli.main(["reproduce", *argv])  # failed rows still write the report, with their errors
    report = report_path(args.out, args.quick)
    if report.exists() and report.stat().st_mtime >= started:  # never print an earlier call's table
        print(report.read_text())
    print(f"total: {time.perf_counter() - t0:.0f} s; reports: {report} and {report.with_suffix('.html')}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
