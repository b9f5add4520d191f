"""Benchmark: the report's 9-point grid (tuning/fer_cnn_grid.yaml: dropout x lr, 10 epochs each) against the search
over dropout, lr, batch size, optimizer and weight decay (tuning/fer_cnn.yaml: seeded multivariate TPE, successive
halving from one epoch, the report's published setting enqueued first) on at most a third of the grid's training
compute. Compute is counted in training images processed (each epoch counts its training split's size; a `limit`
subset counts its own), not in trials. Prints, per study: trials, training images of the search (and as a fraction
of the grid's), best validation accuracy, the retrained best's validation and test accuracy, wall time; then the
three target lines and McNemar's test of the two retrained models on the same test images.

Full, at the report's settings (FER2013; the grid is 9 x 10 epochs x 25,838 images = 2.33M training images):
    python benchmarks/bench_tuning.py [-P device=cuda] [--out DIR]
Reduced (a stratified subset: `limit` training images, a quarter as many validation and test images):
    python benchmarks/bench_tuning.py -P limit=3000
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

from cnnlab.tracking import compare, tuning
from cnnlab.core.config import parse_params
from cnnlab.core.logs import table
from cnnlab.tracking.reproduce import load_claims

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"limit": 300, "epochs": 2}
SHARE = 3  # the search may spend at most 1/SHARE of the grid's training images


def run_study(name: str, space: str, params: dict, out: Path, budget: int | None = None) -> dict:
    spec = tuning.load_spec(ROOT / "tuning" / space, params, storage=f"sqlite:///{out / 'optuna.db'}",
                            study_name=f"bench_{name}")
    if budget is not None:
        spec["budget_images"] = budget
    t0 = time.perf_counter()
    summary = tuning.tune(spec)
    return {**summary, "budget_images": spec["budget_images"], "wall_s": time.perf_counter() - t0}


def _params(best: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items())


def study_table(rows: dict[str, dict], grid_images: int) -> str:
    cells = [(name, f"{s['n_trials']} ({s['n_complete']} / {s['n_pruned']} / {s['n_failed']})", f"{s['images_spent']:,}",
              f"{s['images_spent'] / grid_images:.1%}", f"{s['final']['images']:,}", f"{s['best_value']:.4f}",
              f"{s['final']['val_accuracy']:.4f} / {s['final']['test_accuracy']:.4f}", _params(s["best_params"]),
              f"{s['wall_s']:.0f}") for name, s in rows.items()]
    return table(cells, ("study", "trials (complete / pruned / failed)", "training images, search", "of the grid's",
                         "+ final retrain", "best val acc", "retrained best: val / test acc", "best params", "wall s"))


def targets(grid: dict, search: dict) -> list[str]:
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    val, test = (search["best_value"], grid["best_value"]), (search["final"]["test_accuracy"],
                                                             grid["final"]["test_accuracy"])
    cap = grid["images_spent"] // SHARE
    return [f"target: search beats the grid's best val accuracy ({val[0]:.4f} vs {val[1]:.4f}): {yes(val[0] > val[1])}",
            f"target: its retrained best beats the grid's on test ({test[0]:.4f} vs {test[1]:.4f}): "
            f"{yes(test[0] > test[1])}",
            f"target: within a third of the grid's training images ({search['images_spent']:,} <= {cap:,}): "
            f"{yes(search['images_spent'] <= cap)}"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 images, 2 epochs per trial: a smoke check")
    parser.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="fixed in both studies, e.g. -P device=cuda -P limit=3000")
    parser.add_argument("--out", default="", help="folder for optuna.db and bench_tuning.json")
    args = parser.parse_args(argv)
    params = {**(QUICK if args.quick else {}), **parse_params(args.param)}
    out = Path(args.out or f"reports/bench_tuning{'_quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)

    grid = run_study("fer_cnn_grid", "fer_cnn_grid.yaml", params, out)
    search = run_study("fer_cnn_tpe", "fer_cnn.yaml", params, out, grid["images_spent"] // SHARE)
    rows = {"grid 3x3 (report)": grid, "TPE + successive halving": search}
    (out / "bench_tuning.json").write_text(json.dumps(rows, indent=2, default=str))

    print(study_table(rows, grid["images_spent"]))
    print("\n" + "\n".join(targets(grid, search)))
    paired = compare.compare(grid["final"]["run_id"], search["final"]["run_id"])
    print(f"test, grid (A) vs search (B): {paired['summary']}")
    grid_claim = next(e for e in load_claims() if e.name == "fer_grid")  # the report's grid, by hand
    print(f"report: {grid_claim.stated}" + (" (not comparable to reduced numbers)" if params.get("limit") else ""))
    print(f"studies: {out / 'optuna.db'}; summaries: {out / 'bench_tuning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
