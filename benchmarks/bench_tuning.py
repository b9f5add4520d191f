"""Benchmark: the report's 9-point grid (tuning/fer_cnn_grid.yaml: dropout x lr, 10 epochs each, 90 epochs) against
seeded TPE with successive-halving pruning on the full space (tuning/fer_cnn.yaml) within a third of the grid's epochs.
Prints, for each study: trials, epochs spent searching, best validation accuracy, and the test accuracy of the best
configuration retrained (the study's final run, the only one evaluated on test).

Full, at the report's settings (FER2013; minutes on a GPU, hours on a CPU):
    python benchmarks/bench_tuning.py [-P device=cuda -P precision=bf16] [--out DIR]
Smoke check (300 images, 2 epochs per trial, the budget scaled the same way):
    python benchmarks/bench_tuning.py --quick
Both studies live in DIR/optuna.db (default reports/bench_tuning[_quick]): re-running resumes them, so an interrupted
benchmark continues where it stopped (then the wall times cover the last call only). Runs go to MLFLOW_TRACKING_URI.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cnnlab import tuning
from cnnlab.config import parse_params
from cnnlab.reproduce import load_claims

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"limit": 300, "epochs": 2}


def run_study(name: str, space: str, params: dict, out: Path, budget: int | None = None) -> dict:
    spec = tuning.load_spec(ROOT / "tuning" / space, params, storage=f"sqlite:///{out / 'optuna.db'}",
                            study_name=f"bench_{name}")
    if budget is not None:
        spec["budget_epochs"] = budget
    t0 = time.perf_counter()
    summary = tuning.tune(spec)
    return {**summary, "budget_epochs": spec["budget_epochs"], "wall_s": time.perf_counter() - t0}


def table(rows: dict[str, dict]) -> str:
    header = ("| study | trials (complete / pruned / failed) | epochs spent | best val acc | best params | "
              "test acc, best retrained | wall s |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["best_params"].items())
        lines.append(f"| {name} | {s['n_trials']} ({s['n_complete']} / {s['n_pruned']} / {s['n_failed']}) | "
                     f"{s['epochs_spent']} | {s['best_value']:.4f} | {params} | {s['final']['test_accuracy']:.4f} | "
                     f"{s['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 images, 2 epochs per trial: a smoke check")
    parser.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="fixed in both studies, e.g. -P device=cuda -P precision=bf16")
    parser.add_argument("--out", default="", help="folder for optuna.db and bench_tuning.json")
    args = parser.parse_args(argv)
    params = {**(QUICK if args.quick else {}), **parse_params(args.param)}
    out = Path(args.out or f"reports/bench_tuning{'_quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)

    grid = run_study("fer_cnn_grid", "fer_cnn_grid.yaml", params, out)
    budget = grid["epochs_spent"] // 3  # the target: a third of what the grid spent (90 -> 30 at full settings)
    tpe = run_study("fer_cnn_tpe", "fer_cnn.yaml", params, out, budget)
    rows = {"grid 3x3 (report)": grid, "TPE + successive halving": tpe}
    (out / "bench_tuning.json").write_text(json.dumps(rows, indent=2, default=str))

    print(table(rows))
    beats, within = tpe["best_value"] > grid["best_value"], tpe["epochs_spent"] <= budget
    print(f"\ntarget: TPE beats the grid's best val accuracy ({tpe['best_value']:.4f} vs {grid['best_value']:.4f}: "
          f"{'yes' if beats else 'no'}) within {budget} epochs ({tpe['epochs_spent']}: {'yes' if within else 'no'})")
    grid_claim = next(e for e in load_claims() if e.name == "fer_grid")  # the report's grid, by hand
    print(f"report: {grid_claim.stated}" + (" (not comparable to --quick numbers)" if args.quick else ""))
    print(f"studies: {out / 'optuna.db'}; summaries: {out / 'bench_tuning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
