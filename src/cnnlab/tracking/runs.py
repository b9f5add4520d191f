"""Everything MLflow: tracking URI, experiments, runs that end FAILED on errors, params, datasets, artifacts,
models and their metrics, system metrics."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENTRY_POINT, MLFLOW_RUN_NAME

from cnnlab.core import logs
from cnnlab.core.data import Split

logs.adopt("mlflow", "alembic")  # MLflow's log records through the CLI's handlers
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # the UI's "Machine learning" experiment kind
log = logging.getLogger(__name__)


def init_tracking(experiment: str | None = None) -> str:
    """Use MLFLOW_TRACKING_URI if set, else the embedded SQLite store; select `experiment`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    if experiment and not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    return uri


def mark_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training (the layout MLflow's UI opens it in), unless it has a kind already."""
    client = MlflowClient()
    if KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, KIND_TAG, KIND)


def _generated_name(run) -> bool:
    """True for a run `mlflow run` created without --run-name: the store gave it a random adjective-noun-number."""
    from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES  # the store's own word lists

    if MLFLOW_PROJECT_ENTRY_POINT not in run.data.tags:
        return False
    match = re.fullmatch(r"([a-z]+)-([a-z]+)-\d+", run.info.run_name or "")
    return bool(match) and match[1] in _GENERATOR_PREDICATES and match[2] in _GENERATOR_NOUNS


def system_metrics() -> bool:
    """Log CPU, memory, disk, network (and GPU with nvidia-ml-py) as system/* metrics: on unless
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""
    return MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get() if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined else True


def ui_address(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in MLflow's UI (in its model-training layout) on an http(s) tracking server, else None."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/{_page(experiment_id, run_id)}"


def _page(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def run_url(run) -> str:
    """Where to see the run in MLflow's UI: its address, or how to open a local store's UI at it."""
    uri, info = mlflow.get_tracking_uri(), run.info
    return ui_address(uri, info.experiment_id, info.run_id) or \
        f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{_page(info.experiment_id, info.run_id)}"


def git_info() -> dict[str, str]:
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    if not commit:  # a copy of the tree without .git (a lent GPU machine): the commit it was copied from, if told
        return {"git_commit": os.environ.get("CNNLAB_GIT_COMMIT") or "unknown",
                "git_dirty": os.environ.get("CNNLAB_GIT_DIRTY", "false")}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def error_text(e: BaseException) -> str:
    """`Type: message` for the run's error tag; a failed upload through the tracking server names the store behind it."""
    text = f"{type(e).__name__}: {e}"
    if "/mlflow-artifacts/artifacts/" in text:  # the server's artifact proxy answered 500: its S3 store failed
        e.add_note(f"The MLflow server {mlflow.get_tracking_uri()} could not store the artifact in its artifact store "
                   f"(S3 down, unreachable or refusing): see `cnnlab stack status` and the server's log")
        text = f"{e.__notes__[-1]}. {text}"
    return text[:5000]


def access_error(text: str, tracking_uri: str | None = None) -> str | None:
    """One readable line when `text` (an error, a log) shows the tracking server refusing a request, else None."""
    uri, user = tracking_uri or mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_USERNAME")
    if re.search(r"error code 401\b|UNAUTHENTICATED", text):
        who = f"the credentials of user {user!r}" if user else "a request without credentials"
        return (f"the MLflow server {uri} refused {who} (401 Unauthorized): set MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD to an account (an admin makes one: cnnlab stack user add NAME)")
    if re.search(r"error code 403\b|PERMISSION_DENIED", text):
        return (f"the MLflow server {uri} does not let user {user!r} do this (403 Permission denied): a read-only "
                f"user cannot change the team's experiments, runs or models (an admin can add a teammate: "
                f"cnnlab stack user add NAME)")
    return None


@contextlib.contextmanager
def tracked_run(run_name: str | None = None, run_id: str | None = None, tags: dict | None = None, nested: bool = False,
                monitor: bool = False):
    """An MLflow run that ends FAILED, with the error as a tag, when the body raises (KeyboardInterrupt too).

    An exception may carry `run_status` and `run_tags` to end otherwise (a pruned Optuna trial: KILLED, pruned=true).
    `monitor`: system metrics while it runs (see system_metrics). A run that `mlflow run` created without --run-name
    gets `run_name` instead of its random one; its experiment is tagged as model training.
    """
    run_id = run_id or (None if nested else os.environ.get("MLFLOW_RUN_ID"))
    if run_id:  # resuming a run: start_run refuses it while another experiment is the active one
        mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    hidden = os.environ.pop("MLFLOW_RUN_ID", None) if nested else None  # start_run would resume it, not nest
    try:
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested, tags=tags,
                               log_system_metrics=monitor and system_metrics())
    finally:
        if hidden:
            os.environ["MLFLOW_RUN_ID"] = hidden
    try:
        mark_experiment(run.info.experiment_id)
        if run_name and _generated_name(run):
            mlflow.set_tag(MLFLOW_RUN_NAME, run_name)
        yield run
    except BaseException as e:
        with contextlib.suppress(Exception):
            mlflow.set_tags(getattr(e, "run_tags", None) or {"error": error_text(e)})
        try:
            mlflow.end_run(getattr(e, "run_status", "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"))
        except Exception as unrecorded:  # the server is down too: the run stays RUNNING, the cause is what matters
            e.add_note(f"the run could not be ended in {mlflow.get_tracking_uri()}: {type(unrecorded).__name__}")
        raise
    else:
        mlflow.end_run("FINISHED")


@contextlib.contextmanager
def run_log(run_id: str):
    """The `cnnlab` log lines of the block, kept with the run as logs/cnnlab.log (also when the block fails)."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-log-") as tmp, logs.to_file(Path(tmp) / "cnnlab.log") as path:
        try:
            yield
        finally:
            try:
                MlflowClient().log_artifact(run_id, str(path), "logs")
            except Exception as e:  # noqa: BLE001 - the run's own outcome matters more than its log
                log.warning("could not keep the log with run %s: %s", run_id, e)


def log_split(split: Split, context: str):
    """Log a split as an MLflow dataset input whose digest is the content digest of its source; returns it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local-file source twice ("", file): a path matches both
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(split.summary["source"])
    dataset = MetaDataset(source, name=f"{split.name} ({len(split)} images)", digest=split.digest)
    try:
        mlflow.log_input(dataset, context=context)
    except Exception as e:
        if "duplicate key" not in str(e) and "UNIQUE constraint" not in str(e):
            raise
        # parallel workers inserted the same dataset at once (MLflow's store races); it exists now: link it
        mlflow.log_input(dataset, context=context)
    return dataset


# MLflow's advice that does not apply to the cnnlab pyfunc, so a user could not act on it: predict takes base64 images
# or pixel arrays and checks them itself against the explicit signature; the integer output (class_index) is never
# missing.
ADVICE = ("Add type hints to the `predict` method", "Hint: Inferred schema contains integer column")


class _NoAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in ADVICE)


@contextlib.contextmanager
def _quiet_model_logging():
    """Log a model without ADVICE; other warnings still show. MLflow forces its type-hint warning through the
    filters ("once"), so warnings are recorded and shown again here, less the advice."""
    no_advice = _NoAdvice()
    logging.getLogger("mlflow.pyfunc").addFilter(no_advice)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        logging.getLogger("mlflow.pyfunc").removeFilter(no_advice)
        for w in caught:
            if not any(text in str(w.message) for text in ADVICE):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def log_bundle(data: dict, example, step: int = 0, onnx: dict[str, str] | None = None) -> str:
    """Log a model bundle (one model or an ensemble) as the cnnlab pyfunc (owns its preprocessing), with a
    signature and an input example: uint8 (N, H, W) pixels (the model takes base64 images too); `onnx`: the
    runtime's files (core.export.export) beside the bundle. Returns its id."""
    import torch

    with _quiet_model_logging(), tempfile.TemporaryDirectory(prefix="cnnlab-model-") as tmp:
        from cnnlab import serving  # defining its PythonModel draws the type-hint advice

        path = Path(tmp) / "model.pt"
        torch.save(data, path)
        output = serving.CnnlabModel.from_bundle_file(path).predict(None, example)
        info = mlflow.pyfunc.log_model(  # models-from-code: the model is a file cnnlab ships, nothing pickled
            name="model", python_model=str(serving.MODEL_CODE), artifacts={"bundle": str(path), **(onnx or {})},
            code_paths=[serving.package_copy(Path(tmp) / "code")], signature=serving.signature(output),
            input_example=example, pip_requirements=serving.pip_requirements(), step=step)
    return info.model_id


def logged_model(run):
    """The model logged by `run` (an MLflow Run), or None."""
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run.info.run_id}'")
    return found[0] if found else None


def load_bundle(ref: str) -> dict:
    """A model bundle by reference: a bundle file, a run ID (the model it logged) or a models:/ or runs:/ URI.
    A single model's bundle gets `source`, the run (or file) it came from, so ensembles can name their members."""
    from mlflow.models import get_model_info

    from cnnlab.core.models import read_bundle

    if Path(ref).is_file():
        return read_bundle(ref)
    try:
        uri = ref if ref.startswith(("models:/", "runs:/")) else _model_location(ref)
        info = get_model_info(uri)  # its MLmodel file only
        bundle = info.flavors.get("python_function", {}).get("artifacts", {}).get("bundle")
        if bundle is None:
            raise ValueError(f"{ref} is not a cnnlab model (no bundle artifact in its MLmodel)")
        with tempfile.TemporaryDirectory(prefix="cnnlab-bundle-") as tmp:
            path = mlflow.artifacts.download_artifacts(f"{uri}/{bundle['path']}", dst_path=tmp)
            return read_bundle(path, source=info.run_id or ref)
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"{ref!r} is neither a bundle file nor a model or run in {mlflow.get_tracking_uri()}: "
                         f"{e.message[:300]}") from None


def _model_location(run_id: str) -> str:
    model = logged_model(mlflow.get_run(run_id))
    if model is None:
        raise ValueError(f"run {run_id} logged no model (log_model=false?)")
    return model.artifact_location  # not models:/<id>: a path after that would read as a registered model's
