"""run(config): one experiment as one MLflow run, tying data, model, training loop, evaluation and tracking."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import mlflow
import torch

from . import models, tracking
from .config import Config, PRESETS, build, coerce, freeze_schedule, load_data, make_config  # noqa: F401
from .data import Split
from .evaluation import metrics_and_artifacts, plot_curves
from .preprocess import Classifier
from .training import fit, predict

CHECKPOINT_ROOT = Path(".cnnlab") / "checkpoints"


def _checkpoint_dir(cfg: Config) -> Path:
    return CHECKPOINT_ROOT / f"{cfg.experiment}-{cfg.digest()}"


def _run_tags(cfg: Config, splits: dict[str, Split]) -> dict[str, str]:
    return {"experiment": cfg.experiment, "model": cfg.model, "dataset": cfg.dataset,
            "dataset_digest": splits["train"].digest, "config_digest": cfg.digest(), "seed": str(cfg.seed),
            **tracking.git_info()}


def evaluate_split(model: Classifier, split: Split, cfg: Config, out_dir: Path, prefix: str,
                   transform: Callable | None = None, explain: bool = False) -> dict[str, float]:
    probs = predict(model, split.images, cfg.eval_batch_size, cfg.device, cfg.precision, transform)
    return metrics_and_artifacts(probs.numpy(), split.labels.numpy(), split.classes, out_dir, prefix,
                                 images=split.images.numpy(), model=model if explain else None)


def run(cfg: Config, on_epoch_end: Callable[[int, dict], None] | None = None, nested: bool = False,
        run_id: str | None = None) -> dict:
    """Train, evaluate and log one experiment as one MLflow run; returns run id and final metrics.

    A checkpoint per epoch under .cnnlab/checkpoints: re-running the same config after a crash resumes
    the same MLflow run at the next epoch.
    """
    tracking.init_tracking(cfg.experiment)
    ckpt_dir = _checkpoint_dir(cfg)
    previous = None if nested else _interrupted_run(ckpt_dir)
    run_id = run_id or (None if nested else os.environ.get("MLFLOW_RUN_ID")) or previous
    name = cfg.run_name or cfg.label()
    with tracking.tracked_run(name, run_id=run_id, nested=nested, tags={"experiment": cfg.experiment}) as active:
        cfg.validate()
        if nested:  # a trial never resumes another trial's checkpoint
            ckpt_dir = CHECKPOINT_ROOT / f"run-{active.info.run_id}"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "run_id").write_text(active.info.run_id)
        if previous and previous != active.info.run_id:
            _carry_over(ckpt_dir / "last.pt", previous)
        # `mlflow run` has already logged its entry-point params as typed on the command line: keep those
        logged = mlflow.get_run(active.info.run_id).data.params
        mlflow.log_params({k: v for k, v in asdict(cfg).items() if k not in logged})
        mlflow.log_dict(asdict(cfg), "config.json")
        splits = load_data(cfg)
        mlflow.set_tags(_run_tags(cfg, splits))
        for context, split in splits.items():
            tracking.log_split(split, context)
        mlflow.log_dict({"sizes": {k: len(s) for k, s in splits.items()}, "classes": splits["train"].classes,
                         **splits["train"].summary}, "data_summary.json")
        if cfg.permute:
            from .data.fmnist import permutation
            mlflow.log_dict({"seed": cfg.permute_seed, "permutation": permutation(cfg.permute_seed).tolist()},
                            "permutation.json")
        model, spec = build(cfg, splits["train"])
        mlflow.log_params({"preprocess_mean": model.preprocess.mean, "preprocess_std": model.preprocess.std,
                           "model_parameters": models.count_parameters(model)})

        def log_epoch(epoch: int, metrics: dict) -> None:
            mlflow.log_metrics(metrics, step=epoch + 1)
            if on_epoch_end:
                on_epoch_end(epoch, metrics)

        from .augment import batch_augment, tta_views
        train_cfg = dataclasses.replace(cfg, epochs=cfg.total_epochs())
        history = fit(model, splits["train"], splits["val"], train_cfg, augment=batch_augment(cfg),
                      epoch_hook=freeze_schedule(cfg), on_epoch_end=log_epoch, checkpoint=ckpt_dir / "last.pt")
        results = _final_evaluation(model, cfg, splits, history, tta_views(cfg.tta))
        if cfg.log_model:
            example = splits["test"].images[:2].numpy()
            tracking.log_model(model.cpu(), spec, splits["train"].classes, example)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return {"run_id": active.info.run_id, **results}


def _interrupted_run(ckpt_dir: Path) -> str | None:
    """The run that an interrupted training of this config belongs to; a stale checkpoint is dropped."""
    path = ckpt_dir / "run_id"
    if not path.exists():
        return None
    run_id = path.read_text().strip()
    try:
        if mlflow.get_run(run_id).info.status != "FINISHED":
            return run_id
    except mlflow.exceptions.MlflowException:
        pass  # the run is gone (another tracking store): its checkpoint cannot be attributed
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return None


def _carry_over(checkpoint: Path, previous_run: str) -> None:
    """Resuming another run's checkpoint (under `mlflow run`): copy its epochs' metrics so this run is complete."""
    if not checkpoint.exists():
        return
    for epoch, metrics in enumerate(torch.load(checkpoint, weights_only=False)["history"]):
        mlflow.log_metrics(metrics, step=epoch + 1)
    mlflow.set_tag("resumed_from_run", previous_run)


def _final_evaluation(model: Classifier, cfg: Config, splits: dict[str, Split], history: list[dict],
                      tta: Callable | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cnnlab-eval-") as tmp:
        out = Path(tmp)
        results = {}
        for prefix in ("val", "test") if cfg.eval_test else ("val",):
            results.update(evaluate_split(model, splits[prefix], cfg, out, prefix, explain=prefix == "test"))
            if tta is not None:
                results.update(evaluate_split(model, splits[prefix], cfg, out, f"{prefix}_tta", tta))
        plot_curves(history, out / "curves.png")
        results["train_images_per_s"] = sum(h["train_images_per_s"] for h in history) / len(history)
        results["train_seconds"] = sum(h["epoch_seconds"] for h in history)
        mlflow.log_metrics({k: v for k, v in results.items() if k not in history[-1]}, step=len(history))
        mlflow.log_artifacts(str(out), "evaluation")
    return results
