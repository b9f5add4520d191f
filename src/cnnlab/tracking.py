"""Everything MLflow: tracking URI, runs that end FAILED on errors, params, datasets, artifacts, models."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import mlflow

from .data import Split

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def init_tracking(experiment: str | None = None) -> str:
    """Use MLFLOW_TRACKING_URI if set, else the embedded SQLite store; select `experiment`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    if experiment and not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    return uri


def git_info() -> dict[str, str]:
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else False
    return {"git_commit": commit or "unknown", "git_dirty": str(dirty).lower()}


def error_text(e: BaseException) -> str:
    """`Type: message` for the run's error tag; a failed upload through the tracking server names the store behind it."""
    text = f"{type(e).__name__}: {e}"
    if "/mlflow-artifacts/artifacts/" in text:  # the server's artifact proxy answered 500: its S3 store failed
        e.add_note(f"The MLflow server {mlflow.get_tracking_uri()} could not store the artifact in its artifact store "
                   f"(S3 down, unreachable or refusing): see `cnnlab stack status` and the server's log")
        text = f"{e.__notes__[-1]}. {text}"
    return text[:5000]


@contextlib.contextmanager
def tracked_run(run_name: str | None = None, run_id: str | None = None, tags: dict | None = None, nested: bool = False):
    """An MLflow run that ends FAILED, with the error as a tag, when the body raises (KeyboardInterrupt too).

    An exception may carry `run_status` and `run_tags` to end otherwise (a pruned Optuna trial: KILLED, pruned=true).
    """
    run_id = run_id or (None if nested else os.environ.get("MLFLOW_RUN_ID"))
    hidden = os.environ.pop("MLFLOW_RUN_ID", None) if nested else None  # start_run would resume it, not nest
    try:
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested, tags=tags)
    finally:
        if hidden:
            os.environ["MLFLOW_RUN_ID"] = hidden
    try:
        yield run
    except BaseException as e:
        with contextlib.suppress(Exception):
            mlflow.set_tags(getattr(e, "run_tags", None) or {"error": error_text(e)})
        mlflow.end_run(getattr(e, "run_status", "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"))
        raise
    else:
        mlflow.end_run("FINISHED")


def log_split(split: Split, context: str) -> None:
    """Log a split as an MLflow dataset input whose digest is the content digest of its source."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source = resolve_dataset_source(split.summary["source"])
    dataset = MetaDataset(source, name=f"{split.name} ({len(split)} images)", digest=split.digest)
    try:
        mlflow.log_input(dataset, context=context)
    except Exception as e:
        if "duplicate key" not in str(e) and "UNIQUE constraint" not in str(e):
            raise
        # parallel workers inserted the same dataset at once (MLflow's store races); it exists now: link it
        mlflow.log_input(dataset, context=context)


def log_model(classifier, spec: dict, classes: list[str], example) -> None:
    """Log the classifier as the cnnlab pyfunc (owns its preprocessing), with a signature and an input example.

    `example` is uint8 (N, H, W) pixels, logged as the numpy input example; the model takes base64 images too.
    """
    from .models import bundle

    log_bundle(bundle(classifier, spec, classes), example)


def log_bundle(data: dict, example) -> None:
    """Log a model bundle (one model or an ensemble) as the cnnlab pyfunc, with a signature and an input example."""
    import tempfile

    import torch

    from . import serving

    with tempfile.TemporaryDirectory(prefix="cnnlab-model-") as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(data, path)
        output = serving.CnnlabModel.from_bundle_file(path).predict(None, example)
        mlflow.pyfunc.log_model(
            name="model", python_model=serving.CnnlabModel(), artifacts={"bundle": str(path)},
            code_paths=[str(Path(__file__).resolve().parent)], signature=serving.signature(output),
            input_example=example, pip_requirements=serving.pip_requirements())


def logged_model(run):
    """The model logged by `run` (an MLflow Run), or None."""
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run.info.run_id}'")
    return found[0] if found else None


def load_bundle(ref: str) -> dict:
    """A model bundle by reference: a bundle file, a run ID (the model it logged) or a models:/ or runs:/ URI.
    A single model's bundle gets `source`, the run (or file) it came from, so ensembles can name their members."""
    import tempfile

    from mlflow.models import get_model_info

    from .models import read_bundle

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
