"""Best run -> a new version of the experiment's registered model; `champion` moves only on a significant
improvement (McNemar's test on both runs' validation predictions), else the new version is the `challenger`."""
from __future__ import annotations

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cnnlab.tracking import compare, runs

METRIC = "val_accuracy"
CHAMPION, CHALLENGER = "champion", "challenger"


def candidate_filter(experiment: str | None, study: str | None) -> str:
    """FINISHED runs with the metric, of one experiment (its tag: `mlflow run` may file runs under any MLflow
    experiment); for a study only its final run (tags set by tuning)."""
    where = f"attributes.status = 'FINISHED' and metrics.{METRIC} >= 0"
    where += f" and tags.experiment = '{experiment}'" if experiment else ""
    return where + (f" and tags.study = '{study}' and tags.final = 'true'" if study else "")


def best_run(experiment: str | None = None, study: str | None = None):
    """The FINISHED run with the highest validation accuracy that has a logged model, and that model."""
    if not experiment and not study:
        raise ValueError("give an experiment, a study, or both")
    candidates = mlflow.search_runs(search_all_experiments=True, filter_string=candidate_filter(experiment, study),
                              order_by=[f"metrics.{METRIC} DESC", "attributes.start_time ASC"], output_format="list")
    for run in candidates:
        logged = runs.logged_model(run)
        if logged:
            return run, logged
    what = " and ".join(f"{k} {v!r}" for k, v in (("experiment", experiment), ("study", study)) if v)
    raise ValueError(f"no FINISHED run with {METRIC} and a logged model for {what} in {mlflow.get_tracking_uri()}")


def version_tags(run, logged) -> dict[str, str]:
    """What a person scans on a version: accuracy and macro F1 (the logged model's, measured on its datasets, else
    the run's), dataset digest, source run and git commit. Every other metric stays on the logged model."""
    metrics = {**run.data.metrics, **{m.key: m.value for m in logged.metrics or [] if m.dataset_name}}
    tags = {k: str(metrics[k]) for k in (METRIC, "test_accuracy", "test_macro_f1") if k in metrics}
    tags.update({k: run.data.tags[k] for k in ("dataset_digest", "git_commit", "study") if k in run.data.tags})
    return {**tags, "source_run": run.info.run_id}


def champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def choose_alias(tags: dict[str, str], current, run_id: str, force: bool = False) -> tuple[str, str, str | None]:
    """(alias, why, McNemar's verdict): `champion` only when significantly more accurate than the current champion on
    the same validation images (selecting on test is what the project avoids), or with `force`; else `challenger`."""
    if current is None:
        return CHAMPION, "no champion yet", None
    better, significance = verdict(current, run_id)
    why = significance
    if current.tags.get("dataset_digest") != tags.get("dataset_digest"):
        better, why = False, (f"champion v{current.version} was trained on dataset "
                              f"{current.tags.get('dataset_digest')}, this run on {tags.get('dataset_digest')}: "
                              f"not comparable")
    if force:
        return CHAMPION, f"forced (--force) over champion v{current.version}; {why}", significance
    return (CHAMPION if better else CHALLENGER), why, significance


def register(experiment: str | None = None, study: str | None = None, name: str | None = None,
             force: bool = False) -> dict:
    """Register the best run as a new version of `name` (default: the run's experiment tag) and set its alias;
    `force` makes it the champion whatever the comparison says."""
    runs.init_tracking()
    run, logged = best_run(experiment, study)
    name = name or run.data.tags.get("experiment") or experiment
    client = MlflowClient()
    summary = {"name": name, "run_id": run.info.run_id, METRIC: run.data.metrics[METRIC]}
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if existing:
        v = client.get_model_version(name, existing[0].version)  # search results carry no aliases
        aliases = ",".join(v.aliases) or "none"
        return {**summary, "version": v.version, "alias": aliases, "registered": False,
                "reason": f"run {run.info.run_id} is already registered as {name} v{v.version} (aliases: {aliases})"}
    tags = version_tags(run, logged)
    current = champion(client, name)
    alias, reason, significance = choose_alias(tags, current, run.info.run_id, force)
    if significance is not None:
        summary["significance"] = tags["significance"] = significance
    version = mlflow.register_model(f"models:/{logged.model_id}", name, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return {**summary, "version": version.version, "alias": alias, "registered": True, "reason": reason,
            "uri": f"models:/{name}@{alias}"}


def verdict(current, run_id: str) -> tuple[bool, str]:
    """McNemar's test of this run against the champion on the same validation images: better beyond noise, and why."""
    try:
        return compare.challenger_verdict(current.run_id, run_id, "val")
    except (ValueError, MlflowException) as e:  # no predictions logged (older runs, no val split), other val images
        return False, f"not compared with champion v{current.version}: {e}"
