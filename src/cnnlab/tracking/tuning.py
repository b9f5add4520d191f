"""Optuna studies from tuning/*.yaml: RDB storage shared by workers, one MLflow parent run per study, one nested
run per trial, and a final retrain of the best configuration evaluated once on test."""
from __future__ import annotations

import html
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import mlflow
import optuna
import torch
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cnnlab.core import devices, logs, pipeline
from cnnlab.tracking import experiments, runs
from cnnlab.core.config import field_types, make_config, parse_value
from cnnlab.core.schema import Strict, read_yaml, validate
from cnnlab.core.training import Callback, Loop

DEFAULT_STORAGE = "sqlite:///optuna.db"
RANGE_KEYS = {"low", "high", "log", "step"}
PARAM_KEYS = {"float": RANGE_KEYS, "int": RANGE_KEYS, "categorical": {"choices"}}
SAMPLERS = {"grid": optuna.samplers.GridSampler, "tpe": optuna.samplers.TPESampler,
            "random": optuna.samplers.RandomSampler}
PRUNERS = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
           "hyperband": optuna.pruners.HyperbandPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner}
CATCH = (FloatingPointError, torch.OutOfMemoryError)  # a diverging or too-big configuration fails its trial only
PLOTS = {"optimization_history": optuna.visualization.plot_optimization_history,
         "parallel_coordinate": optuna.visualization.plot_parallel_coordinate,
         "param_importances": optuna.visualization.plot_param_importances,
         "intermediate_values": optuna.visualization.plot_intermediate_values}

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
logs.adopt("optuna")  # its per-trial lines through the CLI's handlers (with -v): cnnlab logs its own per trial
log = logging.getLogger(__name__)


class Pruned(optuna.TrialPruned):
    """Optuna's pruned signal that also ends the trial's MLflow run KILLED and tagged pruned (see tracked_run)."""
    run_status = "KILLED"

    @property
    def run_tags(self) -> dict:
        return {"pruned": "true", "pruned_reason": str(self)}


# --- the study definition --------------------------------------------------------------------------------------

class SearchParam(Strict):
    """One searched parameter: `float` or `int` with low and high (log, step), or `categorical` with choices."""
    type: Literal["float", "int", "categorical"]
    low: Any = None  # typed as the Config field by _typed (YAML reads 1e-3 as text)
    high: Any = None
    log: bool = False
    step: Any = None
    choices: list | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _keys_of_its_type(self):
        extra = sorted(self.model_fields_set - {"type"} - PARAM_KEYS[self.type])
        if extra:
            raise ValueError(f"unknown key(s) {extra} for type {self.type}")
        if self.type == "categorical" and self.choices is None:
            raise ValueError("needs `choices`, a non-empty list")
        if self.type != "categorical" and (self.low is None or self.high is None):
            raise ValueError("needs `low` and `high`")
        return self


class Strategy(BaseModel):
    """A sampler or pruner: its `type`, and keyword arguments for it (checked by building it)."""
    model_config = ConfigDict(extra="allow")
    type: str


class SearchSpace(Strict):
    """A tuning/*.yaml file: the experiment, what is fixed, what is searched, and how."""
    experiment: str
    study_name: str | None = None  # default: the file's name
    storage: str = DEFAULT_STORAGE
    n_trials: int = Field(20, ge=1, strict=True)
    budget_images: int = Field(0, ge=0, strict=True)
    heartbeat_interval: int = Field(60, ge=1, strict=True)
    fixed: dict[str, Any] = {}
    space: dict[str, SearchParam]
    enqueue: list[Annotated[dict[str, Any], Field(min_length=1)]] = []  # known-good points, evaluated first
    sampler: Strategy = Strategy(type="tpe", seed=0)
    pruner: Strategy = Strategy(type="none")

    @field_validator("fixed", "space", "enqueue", mode="before")
    @classmethod
    def _empty(cls, value, info):
        """`fixed:` with nothing under it: none."""
        return ([] if info.field_name == "enqueue" else {}) if value is None else value

    @field_validator("sampler", "pruner", mode="after")
    @classmethod
    def _known(cls, value: Strategy, info):
        known = SAMPLERS if info.field_name == "sampler" else PRUNERS
        if value.type not in known:
            raise ValueError(f"type must be one of {sorted(known)}")
        return value


def load_spec(path: str | Path, params: dict | None = None, storage: str | None = None,
              study_name: str | None = None, n_trials: int | None = None) -> dict:
    """Read and check a search-space YAML; `params` override its fixed parameters, the rest its settings."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in Path("tuning").glob("*.yaml"))
        raise FileNotFoundError(f"search space {path} not found" + (f"; in tuning/: {shipped}" if shipped else ""))
    spec = validate(SearchSpace, read_yaml(path), path).model_dump()
    try:
        _typed(spec)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    spec.update({"study_name": spec["study_name"] or path.stem, "source": str(path)})
    spec.update({k: v for k, v in (("storage", storage), ("study_name", study_name), ("n_trials", n_trials)) if v})
    refuse_password(spec["storage"])
    searched = sorted(set(params or {}) & set(spec["space"]))
    if searched:
        raise ValueError(f"{path}: {searched} searched in the space; remove from `space` to fix a value")
    spec["fixed"].update(params or {})
    first = {k: p["choices"][0] if p["type"] == "categorical" else p["low"] for k, p in spec["space"].items()}
    try:  # as a trial runs: validation only
        cfg = make_config(spec["experiment"], **spec["fixed"], **first, eval_test=False)
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    _check_strategy(spec, path, cfg.total_epochs())
    return spec


def _typed(spec: dict) -> None:
    """Every value as its Config field's type; enqueued points inside the space."""
    spec["fixed"] = {k: _value(f"fixed.{k}", k, v) for k, v in spec["fixed"].items()}
    spec["space"] = {k: _param(f"space.{k}", k, p) for k, p in spec["space"].items()}
    both = sorted(set(spec["fixed"]) & set(spec["space"]))
    if both:
        raise ValueError(f"{both} both fixed and searched; keep each in `fixed` or in `space`")
    spec["enqueue"] = [_point(f"enqueue[{i}]", point, spec["space"]) for i, point in enumerate(spec["enqueue"])]


def _value(where: str, name: str, value):
    """A YAML value as the Config field's type (YAML reads 1e-3 as text; parse_value handles that, naming the field)."""
    try:
        return parse_value(name, str(value))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _param(where: str, name: str, p: dict) -> dict:
    if p["type"] == "categorical":
        return {"type": "categorical", "choices": [_value(where, name, c) for c in p["choices"]]}
    kind = field_types().get(name)
    if kind != p["type"]:
        raise ValueError(f"{where}: type {p['type']} but {name} is {'an unknown parameter' if kind is None else kind}")
    out = {"type": kind, "low": _value(where, name, p["low"]), "high": _value(where, name, p["high"]),
           "log": p["log"], "step": _value(where, name, p["step"]) if p["step"] is not None else None}
    if not out["low"] < out["high"] or (out["log"] and out["low"] <= 0):
        raise ValueError(f"{where}: needs low < high (and low > 0 with log), got {out['low']}..{out['high']}")
    return out


def _point(where: str, point: dict, space: dict) -> dict:
    """An enqueued point: searched parameters, each typed and inside the space."""
    unknown = sorted(set(point) - set(space))
    if unknown:
        raise ValueError(f"{where}: {unknown} not searched in `space` ({sorted(space)})")
    typed = {k: _value(f"{where}.{k}", k, v) for k, v in point.items()}
    for k, v in typed.items():
        p = space[k]
        inside = v in p["choices"] if p["type"] == "categorical" else p["low"] <= v <= p["high"]
        if not inside:
            allowed = p["choices"] if p["type"] == "categorical" else f"{p['low']}..{p['high']}"
            raise ValueError(f"{where}.{k}: {v!r} is outside the space ({allowed})")
    return typed


def _check_strategy(spec: dict, path: Path, epochs: int) -> None:
    if spec["pruner"]["type"] in ("hyperband", "successive_halving"):
        least = spec["pruner"].get("min_resource")
        if not isinstance(least, int) or isinstance(least, bool) or not 1 <= least < epochs:
            raise ValueError(f"{path}: pruner: {spec['pruner']['type']} needs min_resource, the epochs of its first "
                             f"rung, an integer 1..{epochs - 1} (trials run {epochs} epochs), got {least!r}")
    if spec["sampler"]["type"] == "grid":
        continuous = sorted(k for k, p in spec["space"].items() if p["type"] != "categorical")
        if continuous:
            raise ValueError(f"{path}: the grid sampler needs categorical parameters; {continuous} are not")
        spec["n_trials"] = min(spec["n_trials"], math.prod(len(p["choices"]) for p in spec["space"].values()))
    for key, make in (("sampler", make_sampler), ("pruner", make_pruner)):
        try:
            make(spec)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {key}: {e}") from None


def make_sampler(spec: dict, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The YAML's sampler; `offset` shifts the seed so parallel or resumed workers do not replay the same draws."""
    opts = {k: v for k, v in spec["sampler"].items() if k != "type"}
    opts["seed"] = opts.get("seed", 0) + offset
    kind = spec["sampler"]["type"]
    if kind == "grid":
        return optuna.samplers.GridSampler({k: p["choices"] for k, p in spec["space"].items()}, **opts)
    if kind == "tpe":
        opts.setdefault("constant_liar", True)  # parallel workers avoid proposing what another is running
    return SAMPLERS[kind](**opts)


def make_pruner(spec: dict) -> optuna.pruners.BasePruner:
    opts = {k: v for k, v in spec["pruner"].items() if k != "type"}
    return PRUNERS[spec["pruner"]["type"]](**opts)


def suggest(trial: optuna.Trial, space: dict) -> dict:
    out = {}
    for name, p in space.items():
        if p["type"] == "categorical":
            out[name] = trial.suggest_categorical(name, p["choices"])
        elif p["type"] == "float":
            out[name] = trial.suggest_float(name, p["low"], p["high"], log=p["log"], step=p["step"])
        else:
            out[name] = trial.suggest_int(name, p["low"], p["high"], log=p["log"], step=p["step"] or 1)
    return out


def definition(spec: dict) -> dict:
    """What makes two invocations the same study: resuming with other settings would mix incomparable trials."""
    digest = make_config(spec["experiment"], **spec["fixed"]).digest()
    return json.loads(json.dumps({"experiment": spec["experiment"], "config_digest": digest, "space": spec["space"],
                                  "sampler": spec["sampler"]["type"]}))


# --- storage and the study ---------------------------------------------------------------------------------------

def redact(url: str) -> str:
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


def refuse_password(url: str) -> None:
    """A storage URL never carries its password: command lines, YAML files and `mlflow run -P` values (which
    MLflow logs as run parameters) are no place for it; libpq reads it from PGPASSFILE."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        if make_url(url).password is None:
            return
    except ArgumentError:
        return  # not a URL at all: make_storage says so
    logged = f"; `mlflow run` already logged it in run {os.environ['MLFLOW_RUN_ID']}: delete that run and rotate the " \
             f"password (cnnlab stack rotate optuna)" if os.environ.get("MLFLOW_RUN_ID") else ""
    raise ValueError(f"the Optuna storage URL {redact(url)} holds a password: drop it from the URL and put it in a "
                     f"PostgreSQL password file (export PGPASSFILE=.cnnlab/stack/pgpass, written by `cnnlab stack "
                     f"up`){logged}")


class HeartbeatStorage(optuna.storages.RDBStorage):
    """RDBStorage that also counts as stale a RUNNING trial that never beat: its worker died between taking the
    trial and its first heartbeat, a window Optuna's check skips (the trial would stay RUNNING for ever)."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        from optuna.storages._rdb import models

        stale = super()._get_stale_trial_ids(study_id)
        since = datetime.now() - timedelta(seconds=self.grace_period or 2 * self.heartbeat_interval)
        session = self.scoped_session()
        try:
            beating = {trial_id for (trial_id,) in session.query(models.TrialHeartbeatModel.trial_id)}
        finally:
            self.scoped_session.remove()
        silent = [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                  if t._trial_id not in beating and t.datetime_start and t.datetime_start < since]
        return stale + silent


def make_storage(spec: dict) -> HeartbeatStorage:
    """The RDB storage with a heartbeat: a trial whose worker died is failed after two missed beats, then retried."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        # pre-ping: a pooled connection that a PostgreSQL restart closed is replaced, not handed to a worker
        return HeartbeatStorage(spec["storage"], heartbeat_interval=spec["heartbeat_interval"],
                                heartbeat_stale_trial_callback=_stale_trial, engine_kwargs={"pool_pre_ping": True})
    except SQLAlchemyError as e:
        hint = "; set PGPASSFILE to the password file `cnnlab stack up` wrote (.cnnlab/stack/pgpass)" \
            if "no password supplied" in str(e) or "password authentication failed" in str(e) else ""
        raise RuntimeError(f"cannot open the Optuna storage {redact(spec['storage'])}: "
                           f"{str(getattr(e, 'orig', e)).strip()}{hint}") from e


def _open_trial_runs(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> set[str]:
    """The trial's MLflow runs still RUNNING: the one it recorded, and one its worker started but died before
    recording (a retry's recorded one may still be the dead trial's)."""
    client, ids = MlflowClient(), set()
    if trial.user_attrs.get("mlflow_run_id"):
        ids.add(trial.user_attrs["mlflow_run_id"])
    parent = study.user_attrs.get("mlflow_run_id")
    if parent:
        found = client.search_runs([client.get_run(parent).info.experiment_id],
                                   f"tags.study = '{study.study_name}' and tags.trial_number = '{trial.number}'")
        ids |= {r.info.run_id for r in found}
    return {i for i in ids if client.get_run(i).info.status == "RUNNING"}


def _stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died: its MLflow run ends FAILED, and its parameters are queued once more with the
    epochs it reported; the retry resumes from its checkpoint (trial_checkpoints)."""
    client = MlflowClient()
    for run_id in _open_trial_runs(study, trial):
        client.set_tag(run_id, "error", "worker died: no Optuna heartbeat; the trial is FAILED and retried")
        client.set_terminated(run_id, "FAILED")
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1, inherit_intermediate_values=True)(study, trial)


def trial_checkpoints(spec: dict, cfg, first_trial: int) -> Path:
    """A trial's checkpoint folder in this working folder, named by the study, the trial it retries (or its own
    number) and its config's digest (its parameters); the checkpoint's key adds the dataset digest. A retry that
    runs in another working folder (another host) finds none and trains from epoch 1."""
    return experiments.CHECKPOINT_ROOT / f"trial-{spec['study_name']}-{first_trial}-{cfg.digest()}"


def open_study(spec: dict, storage: optuna.storages.RDBStorage) -> optuna.Study:
    """Create the study once (or load it), and refuse to resume it with a different definition."""
    study = optuna.create_study(storage=storage, study_name=spec["study_name"], direction="maximize",
                                load_if_exists=True)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(f"study {spec['study_name']} in {redact(spec['storage'])} minimizes; cnnlab maximizes "
                         f"val_accuracy: use another --study-name")
    mine, stored = definition(spec), study.user_attrs.get("definition")
    if stored is None:
        for point in spec["enqueue"]:  # known-good points first, once, when the study is created
            study.enqueue_trial(point, user_attrs={"enqueued": True})
        study.set_user_attr("definition", mine)
    elif stored != mine:
        differs = sorted(k for k in mine if mine[k] != stored.get(k))
        raise ValueError(f"study {spec['study_name']} in {redact(spec['storage'])} was created with other settings "
                         f"({differs} differ): use another --study-name, or the same YAML and -P values")
    return study


def _unreplaced(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials except dead ones that a retry replaced (the retry inherits their reported epochs)."""
    trials = study.get_trials(deepcopy=False)
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.number not in replaced]


def counted(study: optuna.Study) -> int:
    """Trials that count toward n_trials: finished or running, except dead ones whose retry replaces them."""
    return sum(t.state != TrialState.WAITING for t in _unreplaced(study))


def epochs_spent(study: optuna.Study) -> int:
    """Training epochs of all trials so far (each reports once per epoch; a resumed trial's epochs count once)."""
    return sum(len(t.intermediate_values) for t in _unreplaced(study))


def images_spent(study: optuna.Study) -> int:
    """Training images processed by all trials so far: each epoch counts its trial's training-split size."""
    return sum(len(t.intermediate_values) * t.user_attrs.get("epoch_images", 0) for t in _unreplaced(study))


def trial_images(study: optuna.Study) -> int:
    """What one full trial costs in training images, as the latest trial recorded it (0 before any trial)."""
    costs = [t.user_attrs["trial_images"] for t in study.get_trials(deepcopy=False) if "trial_images" in t.user_attrs]
    return costs[-1] if costs else 0


def finished(study: optuna.Study, spec: dict) -> bool:
    """The study has its n_trials, or what is left of its image budget cannot pay for one more complete trial."""
    budget = spec["budget_images"]
    return counted(study) >= spec["n_trials"] or bool(budget and images_spent(study) + trial_images(study) > budget)


# --- the search ----------------------------------------------------------------------------------------------------

@dataclass
class Pruning(Callback):
    """Reports each epoch's val_accuracy to the trial; stops it when the pruner says so, or when the rest of the trial
    would pass the study's image budget (only complete trials can be the best)."""
    trial: optuna.Trial
    epochs: int
    epoch_images: int
    budget: int

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict) -> None:
        trial = self.trial
        trial.report(metrics["val_accuracy"], epoch + 1)
        if trial.should_prune():
            raise Pruned(f"trial {trial.number} pruned at epoch {epoch + 1}: val_accuracy "
                         f"{metrics['val_accuracy']:.4f} is below the pruner's bar")
        rest = (self.epochs - epoch - 1) * self.epoch_images
        if self.budget and rest and images_spent(trial.study) + rest > self.budget:
            raise Pruned(f"trial {trial.number} stopped at epoch {epoch + 1}: its remaining {rest} images would pass "
                         f"the study's budget of {self.budget} training images")


def objective(trial: optuna.Trial, spec: dict, parent_id: str) -> float:
    """One trial = one nested MLflow run of the experiment; reports val_accuracy per epoch; may be pruned."""
    params = {**spec["fixed"], **suggest(trial, spec["space"])}
    cfg = make_config(spec["experiment"], **params, log_model=False, eval_test=False,
                      run_name=f"{spec['study_name']}-trial-{trial.number}")
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    retried = frozen.system_attrs.get("failed_trial")  # set by RetryHeartbeatStaleTrialCallback
    retry = {} if retried is None else {"retry_of_trial": str(retried),
                                        "retry_of_run": frozen.user_attrs.get("mlflow_run_id", "")}
    run_id = child_run(spec, parent_id, cfg.run_name, trial_number=str(trial.number),
                       worker=f"{socket.gethostname()}:{os.getpid()}", **retry, **placed())
    ckpt_dir = trial_checkpoints(spec, cfg, trial.number if retried is None else retried)
    trial.set_user_attr("mlflow_run_id", run_id)
    budget, epochs = spec["budget_images"], cfg.total_epochs()
    epoch_images = len(pipeline.load_data(cfg)["train"])  # a subset (limit) counts its own size
    trial.set_user_attr("epoch_images", epoch_images)
    trial.set_user_attr("trial_images", epochs * epoch_images)
    try:
        return experiments.run(cfg, [Pruning(trial, epochs, epoch_images, budget)], nested=True, run_id=run_id,
                               trial_dir=ckpt_dir)["val_accuracy"]
    finally:  # complete, pruned or failed: never resumed (a dead worker never gets here: its retry resumes)
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def placed() -> dict:
    """The worker's GPUs as a run tag, when it was given some."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {} if visible is None else {"cuda_visible_devices": visible}


def child_run(spec: dict, parent_id: str, name: str, **tags) -> str:
    """A run nested under the study's parent, in the parent's experiment (wherever `mlflow run` put it), made
    explicitly so workers in other processes can add theirs."""
    client = MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    tags = {MLFLOW_PARENT_RUN_ID: parent_id, "study": spec["study_name"], **tags}
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def optimize(storage: optuna.storages.RDBStorage, spec: dict, parent_id: str, n_trials: int, index: int = 0) -> None:
    """One worker: run up to n_trials trials, stopping early once the study has its n_trials or epoch budget."""
    study = optuna.load_study(study_name=spec["study_name"], storage=storage, pruner=make_pruner(spec))
    study.sampler = make_sampler(spec, offset=1000 * index + len(study.get_trials(deepcopy=False)))

    def enough(study: optuna.Study, _trial) -> None:
        if finished(study, spec):
            study.stop()

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = f"val_accuracy {trial.value:.4f}" if trial.value is not None else trial.state.name.lower()
        log.info("study %s: trial %d %s %s", spec["study_name"], trial.number, value, trial.params)
        log_study(study, parent_id)
    study.optimize(lambda trial: objective(trial, spec, parent_id), n_trials=n_trials, catch=CATCH,
                   callbacks=[enough, progress], gc_after_trial=True)


def _die_with(driver: int) -> None:
    """A worker is killed when its `cnnlab tune` driver dies (kill -9 too): no orphan keeps training unseen; its
    trial's heartbeat stops, so a re-run fails and retries the trial."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    else:
        import threading

        def watch() -> None:
            while os.getppid() == driver:
                time.sleep(1)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != driver:  # the driver died before the signal was armed
        os._exit(1)


def _worker(spec: dict, parent_id: str, n_trials: int, index: int, threads: int, driver: int,
            log_settings: tuple | None, gpus: list[str] | None) -> None:
    """A worker process: dies with its driver; its own storage connections, its GPUs (before CUDA starts) or a
    share of the CPU threads, the parent's log settings."""
    _die_with(driver)
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if log_settings:
        logs.setup(*log_settings)
    torch.set_num_threads(threads)
    runs.init_tracking(spec["experiment"])
    storage = make_storage(spec)
    try:
        optimize(storage, spec, parent_id, n_trials, index)
    finally:
        storage.engine.dispose()


def search(storage: optuna.storages.RDBStorage, spec: dict, parent_id: str, workers: int) -> None:
    """Run the trials still missing from the study, in this process or split across `workers` processes."""
    study = optuna.load_study(study_name=spec["study_name"], storage=storage)
    if finished(study, spec):
        return
    todo = spec["n_trials"] - counted(study)
    if workers == 1:
        optimize(storage, spec, parent_id, todo)
        return
    threads = devices.threads_per_worker(workers)
    gpus = devices.place_workers(workers) or [None] * workers
    shares = [todo // workers + (i < todo % workers) for i in range(workers)]
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited DB connections or CUDA state
    procs = [spawn.Process(target=_worker, args=(spec, parent_id, n, i, threads, os.getpid(), logs.settings, gpus[i]),
                           name=f"tune-worker-{i}") for i, n in enumerate(shares) if n]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [f"{p.name}: exit code {p.exitcode}" for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(procs)} workers failed ({', '.join(failed)}); "
                           f"run the same command again to resume the study")


# --- after the search -------------------------------------------------------------------------------------------

def log_study(study: optuna.Study, parent_id: str) -> dict:
    """Log the study so far into its parent run (after every trial, and at the end): counts and the best value as
    metrics at step = the latest trial's number, best params as tags, the trials table and one page of plots."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    summary = {"n_trials": len(trials), "n_complete": states["COMPLETE"], "n_pruned": states["PRUNED"],
               "n_failed": states["FAIL"], "epochs_spent": epochs_spent(study), "images_spent": images_spent(study)}
    metrics, tags = dict(summary), {}
    if states["COMPLETE"]:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        metrics["best_val_accuracy"] = best.value
        # tags, not params: a resumed study may find a new best, and MLflow params never change
        tags = {"best_trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}}
    client = MlflowClient()
    if any(client.get_run(parent_id).data.metrics.get(k) != v for k, v in metrics.items()):  # else logged already
        step, now = max((t.number for t in trials), default=0), int(time.time() * 1000)
        client.log_batch(parent_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
    client.log_batch(parent_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    with tempfile.TemporaryDirectory(prefix="cnnlab-study-") as tmp:
        out = Path(tmp)
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
        summary["skipped_plots"] = plot_page(study, states["COMPLETE"], out / "plots.html")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        client.log_artifacts(parent_id, str(out), "study")
    return summary


def plot_page(study: optuna.Study, n_complete: int, path: Path) -> dict[str, str]:
    """Optuna's plots on one HTML page that renders offline: plotly.js (~4.6 MB) embedded once, not per plot and not
    from a CDN. Returns the plots left out and why."""
    import plotly.io

    skipped, parts = {}, []
    for name, plot in PLOTS.items():
        if name == "param_importances" and n_complete < 2:
            skipped[name] = f"needs at least 2 complete trials, the study has {n_complete}"
            continue
        try:
            figure = plot(study)
        except Exception as e:  # noqa: BLE001 - a plot that cannot be drawn must not fail the study
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        parts.append(f"<h2>{name.replace('_', ' ')}</h2>" + plotly.io.to_html(
            figure, full_html=False, include_plotlyjs=not parts))
    parts += [f"<p>{name.replace('_', ' ')}: left out ({html.escape(why)})</p>" for name, why in skipped.items()]
    title = f"study {html.escape(study.study_name)}: {len(study.get_trials(deepcopy=False))} trials"
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head>"
                    f"<body style='font-family:sans-serif'><h1>{title}</h1>{''.join(parts)}</body></html>")
    for name, why in skipped.items():
        log.debug("study %s: plot %s left out: %s", study.study_name, name, why)
    return skipped


def describe(param: dict) -> str:
    """A search-space entry as a parameter value: `[0.2, 0.5]`, `float 0.0001..0.01 log`, `int 8..64 step 8`."""
    if param["type"] == "categorical":
        return json.dumps(param["choices"])
    step = f" step {param['step']}" if param.get("step") else ""
    return f"{param['type']} {param['low']}..{param['high']}{' log' if param['log'] else ''}{step}"


def retrain_best(study: optuna.Study, spec: dict, parent_id: str) -> dict:
    """Train the best configuration again, with the model logged and test evaluated once: the study's final run."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        states = dict(Counter(t.state.name for t in study.get_trials(deepcopy=False)))
        raise RuntimeError(f"study {spec['study_name']} has no complete trial to retrain ({states}); "
                           f"see the trial runs' error and pruned_reason tags")
    best = study.best_trial
    images = best.user_attrs.get("trial_images")  # the final run trains what the best trial trained
    done = study.user_attrs.get("final_run", {})
    if done.get("best_trial") == best.number and _run_status(done["run_id"]) == "FINISHED":
        metrics = MlflowClient().get_run(done["run_id"]).data.metrics
        return {"run_id": done["run_id"], "reused": True, "images": images,
                **{k: metrics.get(k) for k in ("val_accuracy", "test_accuracy")}}
    cfg = make_config(spec["experiment"], **spec["fixed"], **best.params, run_name=f"{spec['study_name']}-final")
    run_id = child_run(spec, parent_id, cfg.run_name, final="true", best_trial=str(best.number))
    result = experiments.run(cfg, nested=True, run_id=run_id)
    study.set_user_attr("final_run", {"run_id": run_id, "best_trial": best.number})
    mlflow.set_tag("final_run_id", run_id)
    return {"run_id": run_id, "val_accuracy": result["val_accuracy"], "test_accuracy": result["test_accuracy"],
            "images": images}


def _run_status(run_id: str | None) -> str | None:
    """The run's status, or None when it is not in this tracking store (or deleted)."""
    if not run_id:
        return None
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run.info.status


def tune(spec: dict, workers: int = 1, final: bool = True) -> dict:
    """Run (or resume) the study of `spec` under one MLflow parent run; returns the summary."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and spec["storage"].startswith("sqlite"):
        raise ValueError(f"--workers {workers} needs PostgreSQL: SQLite is not safe for parallel writers; use "
                         f"--storage postgresql://USER@HOST/DB (e.g. the optuna_storage URL `cnnlab stack up` prints)")
    if workers > 1:
        devices.place_workers(workers)  # refused here, before the study's run starts, when GPUs are too few
    if workers > 1 and runs.init_tracking().startswith("sqlite"):
        log.warning("%d workers write MLflow runs into one SQLite file; under load it may answer 'database is "
                    "locked': set MLFLOW_TRACKING_URI to a server (cnnlab stack up)", workers)
    runs.init_tracking(spec["experiment"])
    storage = make_storage(spec)
    try:
        study = open_study(spec, storage)
        optuna.storages.fail_stale_trials(study)  # before counting: dead workers' trials become FAILED and retried
        stored = study.user_attrs.get("mlflow_run_id")
        parent_id = os.environ.get("MLFLOW_RUN_ID") or (stored if _run_status(stored) else None)
        tags = {"study": spec["study_name"], "experiment": spec["experiment"], "tuning": "study"}
        with runs.tracked_run(spec["study_name"], run_id=parent_id, tags=tags) as parent:
            parent_id = parent.info.run_id
            study.set_user_attr("mlflow_run_id", parent_id)
            mlflow.set_tags({"storage": redact(spec["storage"]), "sampler": spec["sampler"]["type"],
                             "pruner": spec["pruner"]["type"], "space_file": spec["source"]})
            mlflow.log_params({f"space.{k}": describe(p) for k, p in spec["space"].items()})
            mlflow.log_dict({**spec, "storage": redact(spec["storage"])}, "study/spec.json")
            search(storage, spec, parent_id, workers)
            summary = {"study": spec["study_name"], "storage": redact(spec["storage"]), "parent_run_id": parent_id,
                       **log_study(study, parent_id)}
            if final:
                summary["final"] = retrain_best(study, spec, parent_id)
        return summary
    finally:
        storage.remove_session()
        storage.engine.dispose()
