"""Two tracked runs on the same images: McNemar's test and a paired bootstrap interval from their logged predictions."""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from cnnlab.core import stats
from cnnlab.tracking import runs
from cnnlab.core.evaluation import read_predictions


def predictions_path(split: str = "test") -> str:
    """Where a run's evaluation logs the per-image predictions of `split`."""
    return f"evaluation/{split}_predictions.csv"


def run_predictions(run_id: str, split: str = "test") -> dict:
    """A run's per-image predictions of `split` and its dataset digest; clear errors for a missing run or file."""
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"run {run_id!r} not found in {mlflow.get_tracking_uri()} ({e.message})") from None
    artifact = predictions_path(split)
    with tempfile.TemporaryDirectory(prefix="cnnlab-compare-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp)
        except (MlflowException, OSError) as e:
            raise ValueError(f"run {run_id} has no {artifact} (status {run.info.status}; runs logged before per-image "
                             f"predictions existed, or not evaluated on {split}, have none): {e}") from None
        predictions = read_predictions(Path(local))
    return {**predictions, "run_id": run_id, "dataset_digest": run.data.tags.get("dataset_digest")}


def check_same_images(a: dict, b: dict) -> None:
    """Both prediction sets cover the same images in the same order; otherwise a ValueError saying how they differ."""
    ra, rb = a["run_id"], b["run_id"]
    if a["dataset_digest"] != b["dataset_digest"]:
        raise ValueError(f"runs {ra} and {rb} used different datasets (dataset_digest {a['dataset_digest']} vs "
                         f"{b['dataset_digest']}): their predictions cannot be paired")
    if a["classes"] != b["classes"]:
        raise ValueError(f"runs {ra} and {rb} have different classes: {a['classes']} vs {b['classes']}")
    if len(a["labels"]) != len(b["labels"]):
        raise ValueError(f"runs {ra} and {rb} predicted {len(a['labels'])} and {len(b['labels'])} images "
                         f"(a different limit or split?): their predictions cannot be paired")
    if a["digests"] is not None and b["digests"] is not None:
        differ = np.flatnonzero(np.asarray(a["digests"]) != np.asarray(b["digests"]))
        what = "image digest"
    else:
        differ = np.flatnonzero(a["labels"] != b["labels"])
        what = "true label"
    if len(differ):
        raise ValueError(f"runs {ra} and {rb}: {what} differs at {len(differ)} of {len(a['labels'])} rows (first: "
                         f"row {differ[0]}): not the same images in the same order")


def compare(run_a: str, run_b: str, split: str = "test", n_resamples: int = stats.RESAMPLES,
            seed: int = stats.SEED, alpha: float = stats.ALPHA) -> dict:
    """Paired comparison of run B against run A on `split`: accuracies, B - A with its bootstrap interval, McNemar."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    runs.init_tracking()
    a, b = run_predictions(run_a, split), run_predictions(run_b, split)
    check_same_images(a, b)
    result = stats.paired_comparison(a["labels"], a["predicted"], b["predicted"], n_resamples, seed)
    return {"run_a": run_a, "run_b": run_b, "split": split, "dataset_digest": a["dataset_digest"], **result,
            "alpha": alpha, "b_significantly_better": stats.significantly_better(result, alpha),
            "summary": stats.describe(result, alpha)}


def challenger_verdict(champion_run: str, challenger_run: str, split: str = "val",
                       alpha: float = stats.ALPHA) -> tuple[bool, str]:
    """For `register`: is the challenger significantly more accurate on `split` than the champion, and why."""
    result = compare(champion_run, challenger_run, split, alpha=alpha)
    better = result["b_significantly_better"]
    return better, (f"challenger {'is' if better else 'is not'} significantly better than the champion on {split}: "
                    f"{result['summary']}")
