"""Runs exported from one SQLite store, packed into parts and imported into another: nothing lost, nothing twice."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from cnnlab import cli
from cnnlab.tracking import experiments, runs as tracking, transfer
from cnnlab.core.data import load_splits
from payload import Payload

PARAMS = {"epochs": 1, "limit": 300, "eval_batch_size": 256}


@pytest.fixture(scope="module")
def source(tmp_path_factory, fmnist_dir):
    """A real store: a parent run with a nested 1-epoch Fashion-MNIST run that logged its model, and a FAILED run."""
    root = tmp_path_factory.mktemp("source")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.init_tracking("fmnist_cnn")
        with tracking.tracked_run("study", tags={"tuning": "study"}):
            mlflow.log_metric("best_val_accuracy", 0.5, step=3)
            cfg = experiments.make_config("fmnist_cnn", data_dir=str(fmnist_dir), **PARAMS)
            child = experiments.run(cfg, nested=True)["run_id"]
        with pytest.raises(ValueError):
            experiments.run(experiments.make_config("fmnist_cnn", data_dir=str(fmnist_dir), optimizer="nope"))
        mlflow.set_tracking_uri(None)
    return {"uri": uri, "root": root, "child": child}


def snapshot(uri: str, experiment: str | None = None) -> dict:
    """Everything a run holds, keyed by source run id (imported runs by their `imported_from` tag)."""
    client = MlflowClient(uri)
    exps = {e.experiment_id: e.name for e in client.search_experiments() if experiment in (None, e.name)}
    runs = client.search_runs(list(exps))
    key = {r.info.run_id: r.data.tags.get(transfer.IMPORTED_FROM, r.info.run_id) for r in runs}
    out = {}
    for r in runs:
        tags = {k: v for k, v in r.data.tags.items() if k not in (transfer.IMPORTED_FROM, transfer.IMPORTED_AT)}
        if MLFLOW_PARENT_RUN_ID in tags:
            tags[MLFLOW_PARENT_RUN_ID] = key[tags[MLFLOW_PARENT_RUN_ID]]
        history = {k: [(m.step, m.timestamp, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                   for k in r.data.metrics}
        local = Path(client.download_artifacts(r.info.run_id, "", tempfile.mkdtemp()))
        files = {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in local.rglob("*") if p.is_file()}
        out[key[r.info.run_id]] = {
            "experiment": exps[r.info.experiment_id], "name": r.info.run_name, "status": r.info.status,
            "times": (r.info.start_time, r.info.end_time), "params": r.data.params, "tags": tags, "metrics": history,
            "datasets": sorted((d.dataset.name, d.dataset.digest, d.dataset.source, tuple((t.key, t.value) for t in d.tags))
                               for d in r.inputs.dataset_inputs),
            "artifacts": files, "outputs": len(r.outputs.model_outputs)}
    return out


def logged_model(uri: str, run_id: str):
    client = MlflowClient(uri)
    [model] = [m for m in client.search_logged_models([e.experiment_id for e in client.search_experiments()])
               if m.source_run_id == run_id]
    return model


def predictions(uri: str, model_id: str, images: np.ndarray) -> np.ndarray:
    """Class probabilities of a logged model, loaded through its models:/ URI from the store at `uri`."""
    here = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        records = mlflow.pyfunc.load_model(f"models:/{model_id}").predict(images)
    finally:
        mlflow.set_tracking_uri(here)
    return np.array([[v for k, v in r.items() if k.startswith("prob_")] for r in records])


def test_import_brings_every_run_whole_and_only_once(source, tmp_path, fmnist_dir, capsys):
    transfer.export_runs(tmp_path / "export", source["uri"])
    parts = transfer.pack(tmp_path / "export", tmp_path / "out", part_bytes=2**20)
    assert len(parts) > 2 and all(p.stat().st_size <= 2**20 for p in parts)  # the model alone is ~7 MB
    dest = mlflow.get_tracking_uri()  # this test's own store, where the CLI imports by default

    assert cli.main(["runs", "import", str(parts[1])]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["imported"], first["models"], first["skipped"]) == (3, 1, 0)
    before, after = snapshot(source["uri"]), snapshot(dest)
    assert after == before
    assert {r["status"] for r in after.values()} == {"FINISHED", "FAILED"}
    assert after[source["child"]]["tags"][MLFLOW_PARENT_RUN_ID] in after  # the link points at the imported parent
    assert {m[0] for m in after[source["child"]]["metrics"]["val_accuracy"]} == {1}  # one epoch (and its model's point)
    assert after[source["child"]]["outputs"] == 1

    original, imported = logged_model(source["uri"], source["child"]), logged_model(dest, first["runs"][source["child"]])
    assert imported.params == original.params and imported.name == original.name
    assert imported.tags[transfer.IMPORTED_FROM] == original.model_id
    images = load_splits("fmnist", str(fmnist_dir), limit=300)["test"].images.numpy()
    np.testing.assert_array_equal(predictions(dest, imported.model_id, images),
                                  predictions(source["uri"], original.model_id, images))
    version = mlflow.register_model(f"models:/{imported.model_id}", "fmnist_imported")
    assert MlflowClient(dest).get_model_version("fmnist_imported", version.version).run_id == imported.source_run_id

    again = transfer.import_runs(tmp_path / "out", tracking_uri=dest)  # the folder of parts this time
    assert (again["imported"], again["skipped"]) == (0, 3) and again["runs"] == first["runs"]
    assert snapshot(dest) == before


def test_import_cut_short_is_done_again_not_twice(source, tmp_path):
    """A real fault: the model's files are missing from the export, so the import dies inside the run that logged it."""
    transfer.export_runs(tmp_path / "export", source["uri"])
    models = tmp_path / "export" / "models"
    shutil.move(models, tmp_path / "aside")
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    with pytest.raises(FileNotFoundError):
        transfer.import_runs(tmp_path / "export", tracking_uri=dest)
    half_done = MlflowClient(dest).search_runs(["1"], f"tags.{transfer.IMPORTED_FROM} = '{source['child']}'")
    assert len(half_done) == 1 and transfer.IMPORTED_AT not in half_done[0].data.tags

    shutil.move(tmp_path / "aside", models)
    result = transfer.import_runs(tmp_path / "export", tracking_uri=dest)
    assert (result["redone"], result["imported"], result["skipped"]) == (1, 1, 2)
    assert snapshot(dest) == snapshot(source["uri"])


def test_half_precision_weights_predict_nearly_the_same(source, tmp_path, fmnist_dir):
    full = transfer.export_runs(tmp_path / "fp32", source["uri"])
    transfer.export_runs(tmp_path / "fp16", source["uri"], weights_dtype="fp16")
    [model_id] = full["models"]
    sizes = {d: (tmp_path / d / "models" / model_id / "artifacts" / "model.pt").stat().st_size for d in ("fp32", "fp16")}
    assert sizes["fp16"] < 0.55 * sizes["fp32"]
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    result = transfer.import_runs(tmp_path / "fp16", experiment="from_gpu", tracking_uri=dest)
    imported = logged_model(dest, result["runs"][source["child"]])
    assert imported.tags["weights_dtype"] == "fp16"
    assert {MlflowClient(dest).get_experiment(r.info.experiment_id).name
            for r in MlflowClient(dest).search_runs(["1"])} == {"from_gpu"}
    images = load_splits("fmnist", str(fmnist_dir), limit=300)["test"].images.numpy()
    half = predictions(dest, imported.model_id, images)
    exact = predictions(source["uri"], model_id, images)
    assert np.abs(half - exact).max() < 5e-3 and (half.argmax(1) == exact.argmax(1)).mean() >= 0.98


def test_a_model_file_that_needs_code_to_load_is_left_unrun(tmp_path, caplog):
    """Casting weights reads each downloaded model.pt as weights only: one holding a pickled object is left as it is,
    with a warning, and the object never runs."""
    marker = tmp_path / "ran"
    path = tmp_path / "model" / "artifacts" / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload(marker)}, path)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="cnnlab.tracking.transfer"):
        transfer.cast_weights(tmp_path / "model", "fp16")
    assert path.read_bytes() == before and not marker.exists()
    assert f"{path} left as it is: not a cnnlab bundle of weights only" in caplog.text


def test_bad_sources_are_named(tmp_path, source):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        transfer.import_runs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json and no packed parts"):
        transfer.import_runs(tmp_path / "empty")
    transfer.export_runs(tmp_path / "export", source["uri"])
    parts = transfer.pack(tmp_path / "export", tmp_path / "out", part_bytes=2**20)
    parts[1].write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=f"{parts[0].name}: not a readable packed export"):
        transfer.import_runs(parts[0])
    parts[1].unlink()
    with pytest.raises(ValueError, match=f"missing part.*{parts[1].name}"):
        transfer.import_runs(parts[0])
    with pytest.raises(ValueError, match="no experiment named \\['nope'\\]"):
        transfer.export_runs(tmp_path / "x", source["uri"], experiments=["nope"])
    assert cli.main(["runs", "import", str(tmp_path / "empty")]) == 2


@pytest.mark.services
def test_import_into_the_team_server(source, tmp_path, on_stack, fmnist_dir):
    """The team stack's mlflow server (PostgreSQL, artifacts in SeaweedFS through the server) as the destination."""
    transfer.export_runs(tmp_path / "export", source["uri"])
    parts = transfer.pack(tmp_path / "export", tmp_path / "out")
    server = on_stack.mlflow.url
    first = transfer.import_runs(parts[0], experiment=f"from_gpu_{tmp_path.name}")
    assert first["tracking_uri"] == server and first["imported"] == 3
    assert snapshot(server, f"from_gpu_{tmp_path.name}") == {
        k: {**v, "experiment": f"from_gpu_{tmp_path.name}"} for k, v in snapshot(source["uri"]).items()}
    imported = logged_model(server, first["runs"][source["child"]])
    images = load_splits("fmnist", str(fmnist_dir), limit=300)["test"].images.numpy()
    np.testing.assert_array_equal(predictions(server, imported.model_id, images),
                                  predictions(source["uri"], logged_model(source["uri"], source["child"]).model_id, images))
    assert transfer.import_runs(tmp_path / "out")["skipped"] == 3
