"""fer_best: validation accuracy against training time, images/s, and the final test accuracy (plain and TTA).

    python benchmarks/bench_fer_best.py                      # one tracked fer_best run (about 2 h on a 2-core AMX CPU)
    python benchmarks/bench_fer_best.py -P epochs=2 -P limit=1000   # a smoke run
    python benchmarks/bench_fer_best.py --run-id RUN_ID      # the table of a run that is finished or still training
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

from cnnlab.config import make_config, parse_params  # noqa: E402
from cnnlab.experiments import run  # noqa: E402

CURVE_HEADER = ("epoch", "train min (cumulative)", "val acc", "train img/s", "lr")
FINAL = ("val_accuracy", "val_tta_accuracy", "test_accuracy", "test_tta_accuracy", "train_images_per_s", "train_seconds")


def curve(client: mlflow.MlflowClient, run_id: str, every: int) -> list[tuple]:
    """One row per `every` epochs (and the last): cumulative training minutes from the logged epoch_seconds."""
    history = {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
               for k in ("val_accuracy", "epoch_seconds", "train_images_per_s", "lr")}
    rows, elapsed = [], 0.0
    epochs = len(history["epoch_seconds"])
    for i in range(epochs):
        elapsed += history["epoch_seconds"][i]
        if (i + 1) % every == 0 or i + 1 == epochs:
            rows.append((i + 1, f"{elapsed / 60:.1f}", f"{100 * history['val_accuracy'][i]:.2f}%",
                         f"{history['train_images_per_s'][i]:.0f}", f"{history['lr'][i]:.4f}"))
    return rows


def report(run_id: str, every: int) -> None:
    client = mlflow.MlflowClient()
    info = client.get_run(run_id)
    wall = ((info.info.end_time or int(time.time() * 1000)) - info.info.start_time) / 60_000
    print(f"run {run_id} ({info.data.tags.get('mlflow.runName', '')}), status {info.info.status}, "
          f"wall {wall:.1f} min (data loading, training, evaluation, model logging)")
    print(table(curve(client, run_id, every), CURVE_HEADER))
    metrics = info.data.metrics
    print(table([(k, f"{metrics[k]:.4f}" if k in metrics else "-") for k in FINAL], ("final", "value")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-P", dest="params", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-id", default="")
    parser.add_argument("--every", type=int, default=5, help="print every N-th epoch")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    run_id = args.run_id
    if not run_id:
        if not os.environ.get("FER2013_DIR"):
            parser.error("set FER2013_DIR to the FER2013 folder (train/ and test/)")
        run_id = run(make_config("fer_best", **parse_params(args.params)))["run_id"]
    report(run_id, args.every)


if __name__ == "__main__":
    main()
