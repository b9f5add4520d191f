"""Move tracked runs between MLflow stores: export to a folder, pack into parts, import into any store.

A run travels whole: params, every metric step with its timestamp, tags, status, start and end time, dataset inputs,
artifacts, parent/child links (remapped) and its logged models with their artifacts, so that an imported model can
be loaded, registered and served. Importing is idempotent: each imported run carries `imported_from` (the source run
id) and `imported_at` once complete; a complete import is skipped, a half-done one is deleted and done again.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import socket
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import (Dataset, DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput, Metric, Param,
                             RunTag, ViewType)
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from cnnlab.tracking import runs

log = logging.getLogger(__name__)

FORMAT = "cnnlab-runs"
MANIFEST = "manifest.json"
IMPORTED_FROM, IMPORTED_AT = "imported_from", "imported_at"
WEIGHTS_DTYPES = ("fp32", "fp16", "bf16")
PART = re.compile(r"(?P<stem>.+)\.(?P<index>\d{3})-of-(?P<count>\d{3})$")


# ---- export -------------------------------------------------------------------------------------------------------

def export_runs(dest: Path, tracking_uri: str | None = None, experiments: list[str] | None = None,
                weights_dtype: str = "fp32") -> dict:
    """Write every active run of the store (or of `experiments`) with its logged models into `dest`; returns the
    manifest. An existing export in `dest` is extended, so several stores can go into one folder."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {list(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    client = MlflowClient(tracking_uri or runs.init_tracking())
    exps = _experiments(client, experiments)
    manifest = read_manifest(dest) if (dest / MANIFEST).exists() else {
        "format": FORMAT, "version": 1, "runs": {}, "models": {}}
    manifest["exported_at"] = int(time.time() * 1000)
    manifest["source"] = {"tracking_uri": client.tracking_uri, "host": socket.gethostname()}
    names = {e.experiment_id: e.name for e in exps}
    for run in _all_runs(client, list(names)):
        manifest["runs"][run.info.run_id] = _run_record(client, run, names[run.info.experiment_id])
        client.download_artifacts(run.info.run_id, "", str(_mkdir(dest / "runs" / run.info.run_id)))
    for model in _all_models(client, list(names)):
        if model.source_run_id not in manifest["runs"]:
            continue  # a model is imported with the run that logged it
        manifest["models"][model.model_id] = _model_record(client, model, names[model.experiment_id], weights_dtype)
        folder = dest / "models" / model.model_id
        shutil.rmtree(folder, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            shutil.move(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp,
                                                            tracking_uri=client.tracking_uri), folder)
        if weights_dtype != "fp32":
            cast_weights(folder, weights_dtype)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _experiments(client: MlflowClient, names: list[str] | None) -> list:
    exps = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    if names:
        missing = sorted(set(names) - {e.name for e in exps})
        if missing:
            raise ValueError(f"no experiment named {missing} in {client.tracking_uri}; it has {[e.name for e in exps]}")
        exps = [e for e in exps if e.name in names]
    return exps


def _all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list:
    found, token = [], None
    while experiment_ids:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        found += page
        token = page.token
        if not token:
            break
    return found


def _all_models(client: MlflowClient, experiment_ids: list[str]) -> list:
    models, token = [], None
    while experiment_ids:
        page = client.search_logged_models(experiment_ids, max_results=100, page_token=token)
        models += page
        token = page.token
        if not token:
            break
    return models


def _metric_record(m) -> dict:
    return {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step, "model_id": m.model_id,
            "dataset_name": m.dataset_name, "dataset_digest": m.dataset_digest}


def _run_record(client: MlflowClient, run, experiment: str) -> dict:
    info = run.info
    metrics = [_metric_record(m) for key in run.data.metrics for m in client.get_metric_history(info.run_id, key)]
    inputs = [{"name": d.dataset.name, "digest": d.dataset.digest, "source_type": d.dataset.source_type,
               "source": d.dataset.source, "schema": d.dataset.schema, "profile": d.dataset.profile,
               "tags": {t.key: t.value for t in d.tags}} for d in run.inputs.dataset_inputs]
    return {"run_id": info.run_id, "experiment": experiment, "run_name": info.run_name, "status": info.status,
            "start_time": info.start_time, "end_time": info.end_time, "params": run.data.params,
            "tags": run.data.tags, "metrics": metrics, "datasets": inputs,
            "model_inputs": [m.model_id for m in (run.inputs.model_inputs or [])],
            "model_outputs": [{"model_id": m.model_id, "step": m.step} for m in (run.outputs.model_outputs or [])]}


def _model_record(client: MlflowClient, model, experiment: str, weights_dtype: str) -> dict:
    return {"model_id": model.model_id, "experiment": experiment, "name": model.name,
            "source_run_id": model.source_run_id, "status": str(model.status), "model_type": model.model_type,
            "creation_timestamp": model.creation_timestamp, "tags": model.tags, "params": model.params,
            "weights_dtype": weights_dtype}


def cast_weights(model_dir: Path, dtype: str) -> None:
    """Store a cnnlab bundle's floating-point weights as fp16/bf16 (half the bytes); loading casts them back."""
    import torch

    for path in model_dir.rglob("model.pt"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)  # a downloaded file runs no code here
        except pickle.UnpicklingError as e:
            log.warning("%s left as it is: not a cnnlab bundle of weights only (%s)", path, str(e)[:200])
            continue
        if not isinstance(data, dict) or "state_dict" not in data:
            continue
        target = torch.float16 if dtype == "fp16" else torch.bfloat16
        data["state_dict"] = {k: v.to(target) if v.is_floating_point() else v for k, v in data["state_dict"].items()}
        torch.save(data, path)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable runs export ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def leave_out_model(folder: Path, model_id: str, reason: str) -> int:
    """Drop a model's artifacts from an export (e.g. over the size budget); its run records why. Returns bytes freed."""
    manifest = read_manifest(folder)
    record = manifest["models"].pop(model_id)
    run = manifest["runs"][record["source_run_id"]]
    run["tags"]["model_left_out"] = f"{model_id} ({record['name']}): {reason}"
    freed = folder_bytes(folder / "models" / model_id)
    shutil.rmtree(folder / "models" / model_id)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return freed


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---- pack ---------------------------------------------------------------------------------------------------------

def pack(folder: Path, out: Path, name: str = "runs.tgz", part_bytes: int = 15 * 2**20) -> list[Path]:
    """Tar and gzip an export, split into parts NAME.001-of-00N of at most `part_bytes` each."""
    read_manifest(folder)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}.*-of-*"):
        old.unlink()  # an earlier pack's parts would mix with these
    whole = out / f".{name}.tmp"
    with tarfile.open(whole, "w:gz", compresslevel=1) as tar:  # weights barely compress: favour speed
        tar.add(folder, arcname="export")
    count = max(1, -(-whole.stat().st_size // part_bytes))
    if count > 999:
        raise ValueError(f"{folder}: {whole.stat().st_size} bytes would need {count} parts of {part_bytes} bytes")
    parts = [out / f"{name}.{i:03d}-of-{count:03d}" for i in range(1, count + 1)]
    with open(whole, "rb") as f:
        for part in parts:
            part.write_bytes(f.read(part_bytes))
    whole.unlink()
    return parts


def _parts(path: Path) -> list[Path]:
    """All parts of the packed export that `path` (a part, or a folder holding one set) belongs to, in order."""
    folder = path.parent if path.is_file() else path
    found = [path] if path.is_file() else sorted(p for p in path.iterdir() if PART.match(p.name))
    if not found:
        raise ValueError(f"{path}: no {MANIFEST} and no packed parts (NAME.001-of-00N) in it")
    if not PART.match(found[0].name):
        return [path]  # a plain .tgz / .tar
    sets = {(m["stem"], m["count"]) for m in map(PART.match, (p.name for p in found))}
    if len(sets) > 1:
        raise ValueError(f"{path}: parts of several packs ({sorted(sets)}); name one part")
    [(stem, count)] = sets
    parts = [folder / f"{stem}.{i:03d}-of-{count}" for i in range(1, int(count) + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise ValueError(f"{path}: missing part(s) {missing} of {count}")
    return parts


class _Joined(io.RawIOBase):
    """The parts read one after another as one stream, without holding them in memory."""

    def __init__(self, parts: list[Path]):
        self.files = [open(p, "rb") for p in parts]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.files:
            n = self.files[0].readinto(buffer)
            if n:
                return n
            self.files.pop(0).close()
        return 0

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


def unpack(path: Path, into: Path) -> Path:
    """The export folder inside a packed export (parts or one tar), extracted under `into`."""
    try:
        with tarfile.open(fileobj=io.BufferedReader(_Joined(_parts(path))), mode="r|*") as tar:
            tar.extractall(into, filter="data")  # refuses absolute paths, links out of `into`, devices
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable packed export ({type(e).__name__}: {e})") from None
    return into / "export"


# ---- import -------------------------------------------------------------------------------------------------------

def import_runs(source: Path, experiment: str | None = None, tracking_uri: str | None = None) -> dict:
    """Import an export (folder, packed parts or tar) into the store; returns counts and the run id map."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="cnnlab-import-") as tmp:
        folder = source if (source.is_dir() and (source / MANIFEST).exists()) else unpack(source, Path(tmp))
        manifest = read_manifest(folder)
        client = MlflowClient(tracking_uri or runs.init_tracking())
        return _import(client, folder, manifest, experiment)


def _import(client: MlflowClient, folder: Path, manifest: dict, experiment: str | None) -> dict:
    done = _previous_imports(client)
    ids, counts = {}, {"imported": 0, "skipped": 0, "redone": 0, "models": 0}
    for record in _parents_first(manifest["runs"]):
        src = record["run_id"]
        previous = done.get(src)
        if previous is not None and IMPORTED_AT in previous.data.tags:
            ids[src] = previous.info.run_id
            counts["skipped"] += 1
            continue
        if previous is not None:  # an import that died half-way: do it again
            _delete_run(client, previous.info.run_id)
            counts["redone"] += 1
        models = {m: r for m, r in manifest["models"].items() if r["source_run_id"] == src}
        ids[src] = _import_run(client, folder, record, models, ids, experiment or record["experiment"])
        counts["imported"] += 1
        counts["models"] += len(models)
    return {**counts, "runs": ids, "tracking_uri": client.tracking_uri}


def _previous_imports(client: MlflowClient) -> dict:
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    return {r.data.tags[IMPORTED_FROM]: r for r in _all_runs(client, exps, f"tags.{IMPORTED_FROM} LIKE '%'")}


def _parents_first(records: dict) -> list[dict]:
    def depth(record: dict) -> int:
        parent, seen = record["tags"].get(MLFLOW_PARENT_RUN_ID), 0
        while parent in records and seen < len(records):
            parent, seen = records[parent]["tags"].get(MLFLOW_PARENT_RUN_ID), seen + 1
        return seen
    return sorted(records.values(), key=lambda r: (depth(r), r["start_time"] or 0))


def _delete_run(client: MlflowClient, run_id: str) -> None:
    run = client.get_run(run_id)
    for model in _all_models(client, [run.info.experiment_id]):
        if model.source_run_id == run_id:
            client.delete_logged_model(model.model_id)
    client.delete_run(run_id)


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def _import_run(client: MlflowClient, folder: Path, record: dict, models: dict, ids: dict, experiment: str) -> str:
    src = record["run_id"]
    exp_id = _experiment_id(client, experiment)
    tags = {k: v for k, v in record["tags"].items() if k not in (MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME)}
    parent = record["tags"].get(MLFLOW_PARENT_RUN_ID)
    if parent:  # a parent outside this export keeps its id in a tag of its own
        tags.update({MLFLOW_PARENT_RUN_ID: ids[parent]} if parent in ids else {"imported_parent_run_id": parent})
    run = client.create_run(exp_id, start_time=record["start_time"], run_name=record["run_name"],
                            tags={**tags, IMPORTED_FROM: src})
    run_id = run.info.run_id
    model_ids = {m: _import_model(client, folder, r, exp_id, run_id) for m, r in models.items()}
    client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()])
    client.log_batch(run_id, metrics=[_metric(m, model_ids) for m in record["metrics"]])
    datasets = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], d["schema"], d["profile"]),
                             [InputTag(k, v) for k, v in d["tags"].items()]) for d in record["datasets"]]
    inputs = [LoggedModelInput(model_ids[m]) for m in record["model_inputs"] if m in model_ids]
    if datasets or inputs:
        client.log_inputs(run_id, datasets=datasets, models=inputs)
    outputs = [LoggedModelOutput(model_ids[o["model_id"]], o["step"]) for o in record["model_outputs"]
               if o["model_id"] in model_ids]
    if outputs:
        client.log_outputs(run_id, outputs)
    artifacts = folder / "runs" / src
    if artifacts.is_dir() and any(artifacts.iterdir()):
        client.log_artifacts(run_id, str(artifacts))
    client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    client.log_batch(run_id, tags=[RunTag(IMPORTED_AT, str(int(time.time() * 1000)))])  # the import is complete
    return run_id


def _metric(m: dict, model_ids: dict) -> Metric:
    return Metric(m["key"], m["value"], m["timestamp"], m["step"], model_id=model_ids.get(m["model_id"]),
                  dataset_name=m["dataset_name"], dataset_digest=m["dataset_digest"])


def _import_model(client: MlflowClient, folder: Path, record: dict, exp_id: str, run_id: str) -> str:
    """A new logged model of `run_id` with the source's name, params, tags and artifacts (MLmodel ids rewritten)."""
    from mlflow.models import Model

    tags = {**record["tags"], IMPORTED_FROM: record["model_id"]}
    if record["weights_dtype"] != "fp32":
        tags["weights_dtype"] = record["weights_dtype"]
    model = client.create_logged_model(exp_id, name=record["name"], source_run_id=run_id, tags=tags,
                                       params=record["params"], model_type=record["model_type"])
    with tempfile.TemporaryDirectory(prefix="cnnlab-model-") as tmp:
        local = Path(tmp) / "artifacts"
        shutil.copytree(folder / "models" / record["model_id"], local)
        if (local / "MLmodel").exists():
            mlmodel = Model.load(str(local / "MLmodel"))
            mlmodel.model_id, mlmodel.model_uuid, mlmodel.run_id = model.model_id, model.model_id, run_id
            mlmodel.artifact_path = model.artifact_location
            mlmodel.save(str(local / "MLmodel"))
        client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, record["status"].split(".")[-1])
    return model.model_id
