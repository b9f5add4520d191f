"""What a user sees: one line per epoch in a pipe and in the log files, -q, no warnings they cannot act on, the run in
MLflow with its log, system metrics, the model's metrics per dataset, the experiment's kind; the config listing."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from cnnlab import cli
from cnnlab.core import config
from cnnlab.tracking import runs as tracking
from cnnlab.core.data import fer2013

EPOCH = re.compile(r"INFO cnnlab\.core\.training: epoch (\d+)/(\d+) \| train loss [\d.]+ acc [\d.]+ \| val loss [\d.]+ "
                   r"acc [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ img/s \| \d+:\d\d elapsed, ETA \d+:\d\d$")


def cnnlab(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m cnnlab ...` with stdout and stderr pipes (no terminal), as `make run` or a CI job runs it."""
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def epochs_in(text: str) -> list[tuple[str, str]]:
    return [m.groups() for line in text.splitlines() if (m := EPOCH.search(line))]


def test_train_in_a_pipe_prints_a_line_per_epoch_and_logs_the_run_fully(fmnist_dir, tmp_path):
    log_file = tmp_path / "logs" / "train.log"
    proc = cnnlab("train", "fmnist_cnn", "-P", "epochs=2", "-P", "limit=300", "-P", f"data_dir={fmnist_dir}",
                  "--log-file", str(log_file), MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout is the result alone
    assert epochs_in(proc.stderr) == [("1", "2"), ("2", "2")]
    assert epochs_in(log_file.read_text()) == [("1", "2"), ("2", "2")]
    assert "Warning" not in proc.stderr and "WARNING" not in proc.stderr and "\r" not in proc.stderr, proc.stderr
    assert "mlflow ui --backend-store-uri" in proc.stderr and "workflowType=machine_learning" in proc.stderr

    run = mlflow.get_run(result["run_id"])
    assert run.info.run_name == "fmnist_cnn epochs=2 limit=300"
    kept = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="logs/cnnlab.log"))
    assert epochs_in(kept.read_text()) == [("1", "2"), ("2", "2")]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.name == "fmnist_cnn" and experiment.tags[tracking.KIND_TAG] == "custom_model_development"

    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                           filter_string="metrics.test_accuracy > 0")
    on_data = {(m.key, m.dataset_name): m.value for m in model.metrics if m.dataset_name}
    assert on_data[("val_accuracy", "val (75 images)")] == pytest.approx(result["val_accuracy"])
    assert on_data[("test_accuracy", "test (75 images)")] == pytest.approx(result["test_accuracy"])
    assert on_data[("test_macro_f1", "test (75 images)")] == pytest.approx(result["test_macro_f1"])
    assert {m.dataset_digest for m in model.metrics if m.dataset_name} == {run.data.tags["dataset_digest"]}


def test_quiet_prints_warnings_only_and_system_metrics_switch_off(fmnist_dir):
    proc = cnnlab("train", "fmnist_cnn", "-q", "-P", "epochs=1", "-P", "limit=100", "-P", f"data_dir={fmnist_dir}",
                  MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    run = mlflow.get_run(json.loads(proc.stdout)["run_id"])
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    kept = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="logs/cnnlab.log"))
    assert epochs_in(kept.read_text()) == [("1", "1")]  # the run's own log keeps its lines whatever -q hides


def test_first_fer2013_decode_reports_progress_then_the_cache_is_quiet(fer_subset, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    caplog.set_level("INFO", logger="cnnlab")
    fer2013.load(str(fer_subset), on_bad="error", test_split="public")
    lines = [r.getMessage() for r in caplog.records if r.name == "cnnlab.core.logs" and "decoding train/" in r.getMessage()]
    assert len(lines) == 10 and lines[-1].startswith("FER2013: decoding train/: 100% (280/280) in ")  # every 10%
    caplog.clear()
    fer2013.load(str(fer_subset), on_bad="error", test_split="public")
    assert not [r for r in caplog.records if "decoding" in r.getMessage()]


def test_show_config_lists_fields_defaults_and_allowed_values(capsys):
    assert cli.main(["train", "fer_cnn", "-P", "lr=1e-4", "--show-config"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert set(rows) == set(config.field_types())
    assert rows["lr"][:3] == ["0.0001", "*", "float"] and rows["epochs"] == ["15", "int"]
    assert rows["optimizer"] == ["adam", "str", "adam|adamw|sgd|rmsprop"] and rows["on_bad"][-1] == "error|skip"
    assert not list(Path(".").glob("mlflow.db"))  # listed, not trained

    assert cli.main(["experiments"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name:14} {preset.summary}" in out for name, preset in config.PRESETS.items())
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("variant ", "classes "))}
    assert table["variant"][-1] == "model1|model2" and table["classes"][-1] == "3|10"


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_explains_itself_with_an_example(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert f"\n  cnnlab {command}" in out and "-q, --quiet" in out and "--log-file PATH" in out
