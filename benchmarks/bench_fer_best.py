"""fer_best: validation accuracy against training time, images/s, and the final test accuracy (plain and TTA); the
ablation table of several runs (trained vs averaged weights, ensembles, distilled students); the training cost of
EMA and distillation.

    python benchmarks/bench_fer_best.py                      # one tracked fer_best run (about 2 h on a 2-core AMX CPU)
    python benchmarks/bench_fer_best.py -P epochs=2 -P limit=1000   # a smoke run
    python benchmarks/bench_fer_best.py --run-id RUN_ID      # the table of a run that is finished or still training
    python benchmarks/bench_fer_best.py --ablation RUN_ID [RUN_ID ...]   # one row per run (ensembles: their members)
    python benchmarks/bench_fer_best.py --costs -P limit=6400   # training images/s: plain vs EMA vs distillation
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnnlab.core.logs import table  # noqa: E402

from cnnlab.core import pipeline  # noqa: E402
from cnnlab.core.config import make_config, parse_params  # noqa: E402
from cnnlab.core.devices import device_name, resolve_device, resolve_precision  # noqa: E402
from cnnlab.tracking.experiments import run  # noqa: E402

CURVE_HEADER = ("epoch", "train min (cumulative)", "val acc", "val acc, trained weights (EMA runs)", "train img/s",
                "lr")
FINAL = ("val_accuracy", "val_tta_accuracy", "test_accuracy", "test_tta_accuracy", "val_accuracy_raw",
         "test_accuracy_raw", "test_tta_accuracy_raw", "train_images_per_s", "train_seconds")
ABLATION_HEADER = ("run", "name", "weights", "epochs", "val trained", "val EMA", "val TTA", "test", "test TTA",
                   "test trained", "test TTA trained", "train img/s", "from")
COST_HEADER = ("training", "train img/s (best of rounds)", "relative to plain")


def curve(client: mlflow.MlflowClient, run_id: str, every: int) -> list[tuple]:
    """One row per `every` epochs (and the last): cumulative training minutes from the logged epoch_seconds."""
    history = {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
               for k in ("val_accuracy", "val_accuracy_raw", "epoch_seconds", "train_images_per_s", "lr")}
    rows, elapsed = [], 0.0
    epochs = len(history["epoch_seconds"])
    for i in range(epochs):
        elapsed += history["epoch_seconds"][i]
        if (i + 1) % every == 0 or i + 1 == epochs:
            raw = f"{100 * history['val_accuracy_raw'][i]:.2f}%" if history["val_accuracy_raw"] else "-"
            rows.append((i + 1, f"{elapsed / 60:.1f}", f"{100 * history['val_accuracy'][i]:.2f}%", raw,
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


def percent(metrics: dict, key: str) -> str:
    return f"{100 * metrics[key]:.2f}%" if key in metrics else "-"


def ablation_row(client: mlflow.MlflowClient, run_id: str, indent: str = "") -> tuple:
    """One run: the trained weights' and (with EMA) the averaged weights' accuracies, and where the model came from."""
    run = client.get_run(run_id)
    m, tags = run.data.metrics, run.data.tags
    averaged = tags.get("final_weights", "trained").startswith("ema")
    epochs = len(client.get_metric_history(run_id, "epoch_seconds"))
    trained = "_raw" if averaged else ""
    source = (f"ensemble of {len(tags['members'].split(','))}" if tags.get("model") == "ensemble" else
              f"distilled from {tags['teacher_members']} (alpha {run.data.params.get('distill_alpha')}, "
              f"T {run.data.params.get('distill_temperature')})" if "teacher_runs" in tags else "-")
    return (indent + run_id[:8], tags.get("mlflow.runName", "")[:40], tags.get("final_weights", "-"), epochs or "-",
            percent(m, f"val_accuracy{trained}"), percent(m, "val_accuracy") if averaged else "-",
            percent(m, "val_tta_accuracy"), percent(m, "test_accuracy"), percent(m, "test_tta_accuracy"),
            percent(m, f"test_accuracy{trained}"), percent(m, f"test_tta_accuracy{trained}"),
            f"{m['train_images_per_s']:.0f}" if "train_images_per_s" in m else "-", source)


def ablation(run_ids: list[str]) -> None:
    """One row per run; an ensemble's members and a distilled run's teacher runs follow it, indented."""
    client = mlflow.MlflowClient()
    rows = []
    for run_id in run_ids:
        rows.append(ablation_row(client, run_id))
        tags = client.get_run(run_id).data.tags
        related = tags.get("members") or tags.get("teacher_runs") or ""
        rows += [ablation_row(client, r, "  ") for r in related.split(",") if r and r != "?" and not Path(r).exists()]
    print(table(rows, ABLATION_HEADER))
    print("val/test: the weights the run serves (the EMA of the weights where `weights` says ema); 'trained': the "
          "weights as trained; TTA: the run's tta views")


def costs(overrides: dict, members: int, rounds: int) -> None:
    """Training images/s of the preset against EMA, distillation from an ensemble of `members` fer_best nets, and
    both: same data, same batches, one process; the best of `rounds` (a shared machine is noisy)."""
    base = make_config("fer_best", **{"epochs": 1, "tta": "none", **overrides})
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        teachers = []
        for seed in range(members):  # untrained nets: the teacher's cost does not depend on its weights
            path = Path(tmp) / f"member{seed}.pt"
            torch.save(pipeline.prepare(dataclasses.replace(base, seed=seed)).bundle(), path)
            teachers.append(str(path))
        variants = {"plain (baseline)": {}, "ema 0.999": {"ema": 0.999},
                    f"distillation, {members}-member teacher": {"teacher": ",".join(teachers)},
                    f"distillation, {members}-member teacher, ema 0.999": {"teacher": ",".join(teachers), "ema": 0.999}}
        best = {name: 0.0 for name in variants}
        for _ in range(rounds):
            for name, changes in variants.items():
                trained = pipeline.prepare(dataclasses.replace(base, **changes))
                history = pipeline.train(trained)
                best[name] = max(best[name], sum(h["train_images_per_s"] for h in history) / len(history))
    baseline = best["plain (baseline)"]
    steps = -(-len(pipeline.load_data(base)["train"]) // base.batch_size)
    device = resolve_device(base.device)
    print(f"fer_best (vgg_bn width {base.width}), {steps} steps of {base.batch_size} per epoch, {device_name(device)}, "
          f"{resolve_precision(base.precision, device)}, {torch.get_num_threads()} threads, best of {rounds} rounds")
    print(table([(name, f"{v:.0f}", f"{v / baseline:.2f}x") for name, v in best.items()], COST_HEADER))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-P", dest="params", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-id", default="")
    parser.add_argument("--every", type=int, default=5, help="print every N-th epoch")
    parser.add_argument("--ablation", nargs="+", metavar="RUN_ID", help="the ablation table of these runs")
    parser.add_argument("--costs", action="store_true", help="training images/s of plain, EMA and distillation")
    parser.add_argument("--members", type=int, default=3, help="--costs: teacher ensemble size")
    parser.add_argument("--rounds", type=int, default=2, help="--costs: measurements per variant (the best counts)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    if args.ablation:
        ablation(args.ablation)
        return
    if not args.run_id and not os.environ.get("FER2013_DIR"):
        parser.error("set FER2013_DIR to the FER2013 folder (train/ and test/)")
    if args.costs:
        costs(parse_params(args.params), args.members, args.rounds)
        return
    run_id = args.run_id or run(make_config("fer_best", **parse_params(args.params)))["run_id"]
    report(run_id, args.every)


if __name__ == "__main__":
    main()
