"""What a logged cnnlab model costs in the GPU machine's 64 MiB return, and what fp16/bf16 weights change.

    python benchmarks/bench_transfer.py --run-id RUN_ID                 # a run in MLFLOW_TRACKING_URI that logged a model
    python benchmarks/bench_transfer.py -P epochs=3 -P limit=6000       # train a fer_best run first (tracked)

The run's model is saved with its weights as fp32 (the baseline), fp16 and bf16 (`cnnlab runs export
--weights-dtype`), loaded back as the pyfunc, and scored on the run's test split, under fp32 and bf16 serving.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnnlab.core.logs import table  # noqa: E402

from cnnlab.tracking import transfer  # noqa: E402
from cnnlab.core.config import Config, make_config, parse_params  # noqa: E402
from cnnlab.tracking.experiments import run  # noqa: E402
from cnnlab.core.pipeline import load_data  # noqa: E402

HEADER = ("weights", "model.pt MiB", "model folder MiB", "serving", "test acc", "vs fp32 weights (points)",
          "same label", "max |dp|", "models in 60 MiB")
BUDGET = 60 * 2**20  # what the GPU machine's 64 MiB return leaves for models next to logs and run artifacts


def probabilities(model_dir: Path, images: np.ndarray, serving: str) -> np.ndarray:
    os.environ["CNNLAB_SERVING_PRECISION"] = serving
    frame = mlflow.pyfunc.load_model(str(model_dir)).predict(images)
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()


def rows_for(run_id: str) -> list[tuple]:
    client = mlflow.MlflowClient()
    [model] = [m for m in client.search_logged_models([client.get_run(run_id).info.experiment_id])
               if m.source_run_id == run_id]
    cfg = Config(**mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json"))
    test = load_data(cfg)["test"]
    images, labels = test.images.numpy(), test.labels.numpy()
    rows, base = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp))
        for dtype in transfer.WEIGHTS_DTYPES:
            folder = Path(tmp) / dtype
            shutil.copytree(fp32, folder)
            if dtype != "fp32":
                transfer.cast_weights(folder, dtype)
            size = transfer.folder_bytes(folder)
            weights = sum(p.stat().st_size for p in folder.rglob("model.pt"))
            for serving in ("fp32", "bf16"):
                probs = probabilities(folder, images, serving)
                base.setdefault(serving, probs)
                acc = (probs.argmax(1) == labels).mean()
                delta = 100 * (acc - (base[serving].argmax(1) == labels).mean())
                rows.append((dtype, f"{weights / 2**20:.2f}", f"{size / 2**20:.2f}", serving, f"{100 * acc:.2f}%",
                             f"{delta:+.2f}", f"{100 * (probs.argmax(1) == base[serving].argmax(1)).mean():.2f}%",
                             f"{np.abs(probs - base[serving]).max():.2e}", BUDGET // size))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", default="")
    parser.add_argument("--experiment", default="fer_best", help="what to train when no --run-id is given")
    parser.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    run_id = args.run_id
    if not run_id:
        run_id = run(make_config(args.experiment, **parse_params(args.param)))["run_id"]
    print(f"run {run_id}: its logged model with fp32 weights is the baseline")
    print(table(rows_for(run_id), HEADER))


if __name__ == "__main__":
    main()
