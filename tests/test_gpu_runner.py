"""benchmarks/gpu/runner.py for real: jobs in parallel processes, each tracked; one that fails, one cut at its time
limit and one that ignores SIGINT lose nothing of the others; the packed runs import here with their statuses; a bad
job file is refused with the file, the job and the value. Jobs that run after others: tests/test_ensemble.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from cnnlab import cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
import runner  # noqa: E402 - benchmarks/gpu/runner.py
# a job that starts a tracked run, logs a tiny model and waits; with `deaf`, it ignores SIGINT: only SIGKILL ends it
HANG = textwrap.dedent("""
    import signal, sys, time
    import numpy as np
    from cnnlab.core import models
    from cnnlab.tracking import runs as tracking
    from cnnlab.core.preprocess import Classifier, Preprocess
    if sys.argv[1] == "deaf":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    tracking.init_tracking("hang")
    with tracking.tracked_run(sys.argv[1]):
        spec = {"name": "mlp", "num_classes": 3, "image_size": 28, "hidden": 8}
        net = Classifier(Preprocess(0.3, 0.3, 28), models.create(**spec))
        tracking.log_bundle(models.bundle(net, spec, ["a", "b", "c"]), np.zeros((2, 28, 28), np.uint8))
        print("model logged", flush=True)
        time.sleep(600)
""")

# a job naming another ({cut}): that job's model run, imported into this job's own store
NAMED = textwrap.dedent("""
    import sys
    import mlflow
    run = mlflow.get_run(sys.argv[1])
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert "imported_from" in run.data.tags and run.info.status == "KILLED" and len(models) == 1, run
""")


@pytest.mark.slow
def test_jobs_run_tracked_and_come_back_whole(tmp_path, fmnist_dir, capsys):
    (tmp_path / "hang.py").write_text(HANG)
    (tmp_path / "named.py").write_text(NAMED)
    jobs = {"parallel": 4, "threads": 1, "timeout": 300, "jobs": {  # in order of whose models matter most
        "cut": {"command": f"python {tmp_path / 'hang.py'} polite", "timeout": 40},
        "train": f"cnnlab train fmnist_cnn -P data_dir={fmnist_dir} -P limit=300 -P epochs=1 -P eval_batch_size=256",
        "bad_value": f"cnnlab train fmnist_cnn -P data_dir={fmnist_dir} -P optimizer=nope",
        "deaf": {"command": f"python {tmp_path / 'hang.py'} deaf", "timeout": 40},
        "after_cut": f"python {tmp_path / 'named.py'} {{cut}}",  # runs after cut, on its model
        "after_bad": "cnnlab ensemble {bad_value}"}}  # bad_value leaves no model: never starts
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("FER2013_DIR", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu/runner.py"), str(tmp_path / "jobs.yaml"),
                           "--out", str(out), "--root", str(tmp_path / "run"), "--grace", "3", "--part-mb", "0.1",
                           "--return-mb", "3"],  # room for the runs and the two tiny models, not train's 7 MB one
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr  # jobs failed on purpose
    assert "optimizer must be one of" in done.stdout  # a failed job's last log lines are shown
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| job")}
    assert rows == {"train": "ok", "bad_value": "failed (exit 2)", "cut": "timeout (40 s)", "deaf": "timeout (40 s)",
                    "after_cut": "ok", "after_bad": "skipped: job bad_value failed (exit 2) without a model"}
    assert "left out the model of job train" in done.stdout
    parts = sorted(out.glob("runs.tgz.*"))
    assert len(parts) > 1 and {p.name for p in out.iterdir()} == {*(p.name for p in parts), "jobs.tgz", "results.md"}

    assert cli.main(["runs", "import", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] == 4  # not the copy of cut's run that after_cut read
    client = MlflowClient()
    runs = {r.data.tags["gpu_job"]: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert {job: r.info.status for job, r in runs.items()} == {
        "train": "FINISHED", "bad_value": "FAILED", "cut": "KILLED", "deaf": "KILLED"}
    assert "timeout (40 s) while this run was running" in runs["deaf"].data.tags["error"]  # SIGKILL: settled after
    assert runs["cut"].data.tags["error"].startswith("KeyboardInterrupt")  # SIGINT: the run ended itself
    assert runs["train"].data.tags["gpu_job_status"] == "ok" and runs["train"].data.metrics["test_accuracy"] > 0
    assert "MiB return budget" in runs["train"].data.tags["model_left_out"]
    models = client.search_logged_models([e.experiment_id for e in client.search_experiments()])
    assert sorted(m.source_run_id for m in models) == sorted(runs[job].info.run_id for job in ("cut", "deaf"))
    (record,) = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}").predict(np.zeros((1, 28, 28), np.uint8))
    assert record["label"] in ("a", "b", "c")


@pytest.mark.parametrize("text, message", [
    ("jobs: {a: ls -l}", r"jobs.a.command: start with one of \['cnnlab', 'python', 'python3'\], got 'ls -l'"),
    ("jobs: {a: {command: cnnlab train fer_cnn, threads: 0}}", r"jobs.a.threads: .*greater than or equal to 1, got 0"),
    ("jobs: {a: {command: cnnlab train fer_cnn, timout: 9}}", r"jobs.a.timout: unknown key"),
    ("jobs: {a: {threads: 2}}", r"jobs.a.command: missing"),
    ("parallel: two\njobs: {a: cnnlab train fer_cnn}", r"parallel: .*valid integer.*, got 'two'"),
    ("jobs: {'a b': cnnlab train fer_cnn}", r"jobs.a b: .*pattern.*, got 'a b'"),
    ("jobs:\n  a: cnnlab ensemble {b}", r"job a names \['b'\] in braces: no such job"),
    ("jobs:\n  a: cnnlab ensemble {b}\n  b: cnnlab ensemble {a}", r"jobs a -> b -> a name each other in a circle"),
    ("jobs: [cnnlab train fer_cnn]", r"jobs: .*valid dictionary"),
    ("jobs: {a: 'cnnlab train fer_cnn", r"not valid YAML"),
])
def test_a_bad_job_file_is_refused_naming_the_file_the_job_and_the_value(tmp_path, text, message):
    (tmp_path / "jobs.yaml").write_text(text)
    with pytest.raises(SystemExit, match=f"^{tmp_path / 'jobs.yaml'}: {message}"):
        runner.load_jobs(tmp_path / "jobs.yaml", tmp_path / "run")


def test_only_must_take_the_jobs_that_a_job_names(tmp_path):
    path = REPO / "benchmarks" / "gpu_fer_best_long.yaml"
    with pytest.raises(SystemExit, match=r"job distilled needs job\(s\) \['ensemble3'\]: run them too"):
        runner.load_jobs(path, tmp_path, ["distilled"])
    _, jobs = runner.load_jobs(path, tmp_path, ["ema_s0", "ema_s1", "ema_s2", "ensemble3"])
    assert [j.needs for j in jobs] == [[], [], [], ["ema_s0", "ema_s1", "ema_s2"]]
