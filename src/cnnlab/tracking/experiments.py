"""run(config): one experiment as one MLflow run: the pipeline, with tracking around it; ensemble(runs): several
runs' models as one tracked, registrable model."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Sequence

import mlflow

from cnnlab.core import data, distributed, export, models, pipeline
from cnnlab.tracking import runs
from cnnlab.core.config import Config, make_config  # noqa: F401 - make_config: the usual companion of run
from cnnlab.core.training import Callback, Checkpoint, Loop

CHECKPOINT_ROOT = Path(".cnnlab") / "checkpoints"
# per evaluated split, on the logged model (with the split as its dataset): what the Models view lists and ranks by
MODEL_METRICS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1", "macro_auc", "ece")
log = logging.getLogger(__name__)


def checkpoint_dir(key: Config | str) -> Path:
    """A run's checkpoint folder: per config (a re-run of the same config resumes it), or per run for a nested run's
    id (a trial never resumes another trial's)."""
    return CHECKPOINT_ROOT / (f"{key.experiment}-{key.digest()}" if isinstance(key, Config) else f"run-{key}")


class LogMetrics(Callback):
    """Each epoch's metrics into the active run, at step = the epoch's number (from 1)."""

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict) -> None:
        mlflow.log_metrics(metrics, step=epoch + 1)


def run(cfg: Config, callbacks: Sequence[Callback] = (), nested: bool = False, run_id: str | None = None,
        trial_dir: Path | None = None) -> dict:
    """Train, evaluate and log one experiment as one MLflow run; returns run id and final metrics. `callbacks` run
    after each epoch's metrics are logged (e.g. pruning).

    A checkpoint per epoch under .cnnlab/checkpoints: re-running the same config on the same data after a crash
    resumes the same MLflow run at the next epoch. A nested run resumes only from `trial_dir` (a retried trial's).
    """
    if not distributed.is_main():
        return _follow(cfg)
    runs.init_tracking(cfg.experiment)
    ckpt_dir = checkpoint_dir(cfg)
    previous = None if nested else _interrupted_run(ckpt_dir, cfg)
    run_id = run_id or (None if nested else os.environ.get("MLFLOW_RUN_ID")) or previous
    name = cfg.run_name or cfg.label()
    if distributed.world_size() > 1:  # rank 0's system metrics, named by its host
        mlflow.set_system_metrics_node_id(socket.gethostname())
    with runs.tracked_run(name, run_id=run_id, nested=nested, tags={"experiment": cfg.experiment},
                              monitor=True) as active, runs.run_log(active.info.run_id):
        log.info("run %s (%s) in experiment %s", active.info.run_id, name, active.info.experiment_id)
        cfg.validate()
        if nested:  # a trial never resumes another trial's checkpoint
            ckpt_dir = trial_dir or checkpoint_dir(active.info.run_id)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "run_id").write_text(active.info.run_id)
        _log_config(cfg, active.info.run_id)
        if distributed.world_size() > 1:
            mlflow.log_params(distributed.params(cfg.batch_size))
        trained = pipeline.prepare(cfg, load_bundle=runs.load_bundle)
        datasets = _log_data(trained)
        _carry_over(pipeline.checkpoint(cfg, trained.splits, ckpt_dir / "last.pt"), active.info.run_id, previous)
        pipeline.train(trained, [LogMetrics(), *callbacks], checkpoint_path=ckpt_dir / "last.pt")
        results = _evaluate_and_log(trained, datasets)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        log.info("%s; see %s", ", ".join(f"{k} {results[k]:.4f}" for k in ("val_accuracy", "test_accuracy")
                                         if k in results), runs.run_url(active))
        return {"run_id": active.info.run_id, **results}


def _follow(cfg: Config) -> dict:
    """A torchrun rank other than 0: trains its shard from rank 0's checkpoint (after rank 0 has set it up: DDP
    waits for every rank), logs nothing, evaluates nothing."""
    trained = pipeline.prepare(cfg, load_bundle=runs.load_bundle)
    pipeline.train(trained, checkpoint_path=checkpoint_dir(cfg) / "last.pt")
    return {"rank": distributed.rank()}


def _log_config(cfg: Config, run_id: str) -> None:
    # `mlflow run` has already logged its entry-point params as typed on the command line: keep those
    logged = mlflow.get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in asdict(cfg).items() if k not in logged})
    mlflow.log_dict(asdict(cfg), "config.json")


def _log_data(trained: pipeline.Trained) -> dict:
    """Tags, the splits as MLflow datasets, their summary, the dataset's own records, and the preprocessing;
    returns the MLflow datasets by split."""
    cfg, splits, model = trained.cfg, trained.splits, trained.model
    mlflow.set_tags({"experiment": cfg.experiment, "model": cfg.model, "dataset": cfg.dataset,
                     "dataset_digest": splits["train"].digest, "config_digest": cfg.digest(), "seed": str(cfg.seed),
                     **runs.git_info(), **trained.tags})
    datasets = {context: runs.log_split(split, context) for context, split in splits.items()}
    mlflow.log_dict({"sizes": {k: len(s) for k, s in splits.items()}, "classes": trained.classes,
                     **splits["train"].summary}, "data_summary.json")
    for file_name, record in pipeline.data_records(cfg).items():
        mlflow.log_dict(record, file_name)
    mlflow.log_param("model_parameters", models.count_parameters(model))
    # the factory's arguments that no config field holds (or holds otherwise, e.g. image_size 0): every value logged
    mlflow.log_params({f"model.{k}": v for k, v in trained.spec.items() if k != "name" and getattr(cfg, k, None) != v})
    if not trained.members:  # an ensemble's members normalize each for itself
        mlflow.log_params({"preprocess_mean": model.preprocess.mean, "preprocess_std": model.preprocess.std})
    return datasets


def _interrupted_run(ckpt_dir: Path, cfg: Config) -> str | None:
    """The run that an interrupted training of this config on this data belongs to; a stale checkpoint is dropped."""
    path = ckpt_dir / "run_id"
    if not path.exists():
        return None
    run_id = path.read_text().strip()
    try:
        if mlflow.get_run(run_id).info.status != "FINISHED" and _checkpoint_fits(ckpt_dir / "last.pt", cfg):
            return run_id
    except mlflow.exceptions.MlflowException:
        pass  # the run is gone (another tracking store): its checkpoint cannot be attributed
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return None


def _checkpoint_fits(path: Path, cfg: Config) -> bool:
    """False for a checkpoint that can never resume this run (corrupt, or of other data): it is discarded."""
    if not path.exists():
        return True  # interrupted before its first epoch ended: the run goes on from the start
    try:
        splits = pipeline.load_data(cfg)
    except ValueError:
        return True  # the resumed run will fail on the same error and record it
    return pipeline.checkpoint(cfg, splits, path).load() is not None


def _carry_over(checkpoint: Checkpoint, run_id: str, previous_run: str | None) -> None:
    """Resuming: log the checkpointed epochs' metrics that the run lacks (killed between a checkpoint and its
    metrics; another run's checkpoint under `mlflow run`), so the run is complete and has each epoch once."""
    state = checkpoint.load()
    if state is None:
        return
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")}
    for epoch, metrics in enumerate(state["history"]):
        if epoch + 1 not in logged:
            mlflow.log_metrics(metrics, step=epoch + 1)
    mlflow.set_tag("resumed_from_epoch", len(state["history"]))  # the epochs carried over, not trained again
    if previous_run and previous_run != run_id:
        mlflow.set_tag("resumed_from_run", previous_run)


def _evaluate_and_log(trained: pipeline.Trained, datasets: dict) -> dict[str, float]:
    """Evaluate; log the artifacts, the model (with each split's headline metrics on it) and the other metrics."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-eval-") as tmp:
        results = pipeline.evaluate(trained, Path(tmp))
        mlflow.log_artifacts(tmp, "evaluation")
    step = len(trained.history)  # an ensemble trains nothing: its metrics at step 0
    rest = {k: v for k, v in results.items() if k not in (trained.history[-1] if trained.history else {})}
    if trained.cfg.log_model:
        example = trained.splits["test"].images[:2].numpy()
        with tempfile.TemporaryDirectory(prefix="cnnlab-onnx-") as tmp:
            model_id = runs.log_bundle(trained.bundle(), example, step=step, onnx=_export(trained, Path(tmp)))
        for view in trained.probabilities:  # val, test, and their TTA views: on the split's dataset
            headline = {f"{view}_{m}": results[f"{view}_{m}"] for m in MODEL_METRICS if f"{view}_{m}" in results}
            mlflow.log_metrics(headline, step=step, model_id=model_id, dataset=datasets[view.removesuffix("_tta")])
            rest = {k: v for k, v in rest.items() if k not in headline}
    mlflow.log_metrics(rest, step=step)
    return results


def _export(trained: pipeline.Trained, out_dir: Path) -> dict[str, str] | None:
    """The model's ONNX files (fp32, int8 calibrated on train, checked on val) unless export=none or an ensemble."""
    if trained.cfg.export == "none" or trained.members:
        return None
    val = trained.splits.get("val")
    try:
        return export.export(trained.model, out_dir, trained.splits["train"].images,
                             (val.images, val.labels) if val is not None else None)
    except Exception as e:  # noqa: BLE001 - the trained weights matter more: logged without, torch serves them
        log.warning("ONNX export failed, the model is logged without it (served by torch): %s: %s",
                    type(e).__name__, str(e)[:300])
        return None


DATA_FIELDS = ("dataset", "val_fraction", "limit")  # with the split seed and the dataset's options: the same images


def member_configs(bundles: list[dict]) -> tuple[list[Config], set[str]]:
    """The training configs and dataset digests of every member's source run (their config.json and tags)."""
    configs, digests = [], set()
    for member in (m for b in bundles for m in models.members_of(b)):
        source = member.get("source", "")
        try:
            run = mlflow.get_run(source)
            logged = mlflow.artifacts.load_dict(f"runs:/{source}/config.json")
        except mlflow.exceptions.MlflowException:
            raise ValueError(f"ensemble member {source!r} is no tracked run with a config.json: give run IDs or "
                             f"models:/ URIs of runs of this tracking store") from None
        known = {f.name for f in fields(Config)}
        configs.append(Config(**{k: v for k, v in logged.items() if k in known}))
        digests.add(run.data.tags.get("dataset_digest", "?"))
    return configs, digests


def _split_of(cfg: Config) -> dict:
    """What decides which images a run trained on and held out."""
    return {**{k: getattr(cfg, k) for k in DATA_FIELDS}, "split seed": cfg.data_seed(),
            **data.get(cfg.dataset).options_from(cfg)}


def _same_split(configs: list[Config], sources: list[str]) -> None:
    """Members evaluated together must have held out the same validation images (else val accuracy is not clean)."""
    first = _split_of(configs[0])
    for cfg, source in zip(configs[1:], sources[1:]):
        split = _split_of(cfg)
        differ = {k: (v, split.get(k)) for k, v in first.items() if split.get(k) != v}
        if differ:
            raise ValueError(f"ensemble members were trained on different splits: run {source} differs from run "
                             f"{sources[0]} in {differ}; train members with one split_seed (e.g. -P seed=1 "
                             f"-P split_seed=0)")


def ensemble(refs: list[str], name: str = "", overrides: dict | None = None) -> dict:
    """Several runs' models (run IDs or models:/ URIs) as one tracked run: their probabilities averaged, evaluated on
    val and test like any run (overrides: tta, device, data_dir, ...), logged as one model: `cnnlab register NAME`."""
    if not refs:
        raise ValueError("an ensemble needs at least one run")
    runs.init_tracking()
    bundles = [runs.load_bundle(ref) for ref in refs]
    configs, digests = member_configs(bundles)
    sources = [m["source"] for b in bundles for m in models.members_of(b)]
    _same_split(configs, sources)
    cfg = dataclasses.replace(configs[0], **(overrides or {}))
    name = name or f"{cfg.experiment}_ensemble"
    runs.init_tracking(name)
    with runs.tracked_run(f"{name} of {len(sources)}", tags={"experiment": name}) as active:
        trained = pipeline.ensemble(bundles, cfg)
        if digests != {trained.splits["train"].digest}:
            raise ValueError(f"the data here (digest {trained.splits['train'].digest}) is not what the members were "
                             f"trained on ({sorted(digests)}): set data_dir")
        member_digests = ",".join(c.digest() for c in configs)
        trained.tags.update({"experiment": name, "model": "ensemble", "ensemble_of": ",".join(refs),
                             "config_digest": hashlib.sha256(member_digests.encode()).hexdigest()[:16]})
        datasets = _log_data(trained)
        mlflow.log_params({"members": len(sources), "tta": cfg.tta, "eval_batch_size": cfg.eval_batch_size,
                           "precision": cfg.precision, "device": cfg.device})
        mlflow.log_dict({s: asdict(c) for s, c in zip(sources, configs)}, "members.json")
        results = _evaluate_and_log(trained, datasets)
        return {"run_id": active.info.run_id, "name": name, "members": sources, **results}
