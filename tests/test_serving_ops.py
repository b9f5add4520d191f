"""`cnnlab serve` for operators: liveness apart from readiness, Prometheus metrics across workers, and a slot held
until its prediction ends; with a small pyfunc that sleeps as asked and reports how many predictions ran at once."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cnnlab.stack.supervisor import get_ok, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from servers import ModelServer  # noqa: E402 - benchmarks/servers.py

services = pytest.mark.services
SLEEPER = '''
import os
import threading
import time

import mlflow


class Sleeper(mlflow.pyfunc.PythonModel):
    """Sleeps `sleep` seconds per request; answers the most predictions that ran at once in this process, and its pid."""

    def load_context(self, context):
        time.sleep(float(os.environ.get("SLEEPER_LOAD_S", "0")))
        self.lock, self.running, self.most = threading.Lock(), 0, 0
        self.label = (context.model_config or {}).get("label")

    def predict(self, context, model_input, params=None):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(float(model_input["sleep"][0]))
        with self.lock:
            self.running -= 1
        answer = {"most_at_once": self.most, "pid": os.getpid()}
        return [{**answer, "label": self.label} if self.label else answer]


mlflow.models.set_model(Sleeper())
'''


@pytest.fixture(scope="module")
def sleeper(tmp_path_factory) -> Path:
    """The sleeping pyfunc, saved as a model folder (models from code)."""
    root = tmp_path_factory.mktemp("sleeper")
    (root / "sleeper.py").write_text(SLEEPER)
    mlflow.pyfunc.save_model(root / "model", python_model=str(root / "sleeper.py"))
    return root / "model"


def serve(tmp_path: Path, model: Path, workers: int = 1, **env) -> ModelServer:
    # the sleeper is not cnnlab's model file: served as a model whose code the test trusts
    return ModelServer(tmp_path / "server", str(model), f"sqlite:///{tmp_path / 'mlflow.db'}", guarded=True,
                       workers=workers, env=env, trust_model_code=True)


def sleep(server: ModelServer, seconds: float) -> requests.Response:
    return requests.post(server.url + "/invocations", json={"dataframe_records": [{"sleep": seconds}]}, timeout=60)


@services
def test_alive_before_ready(tmp_path, sleeper):
    """While the model loads, /ping says alive, /ready and /invocations say 503; then all answer."""
    server = serve(tmp_path, sleeper, SLEEPER_LOAD_S="6")
    server.healthy = lambda: get_ok(server.url + "/ping")
    try:
        server.start(timeout=120)
        ready = requests.get(server.url + "/ready", timeout=10)
        assert ready.status_code == 503 and "still loading" in ready.json()["message"]
        r = sleep(server, 0)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        wait_for(lambda: get_ok(server.url + "/ready"), "ready", 60)
        assert sleep(server, 0).json()["predictions"][0]["most_at_once"] == 1
    finally:
        server.stop()


@services
def test_slot_held_until_the_prediction_ends(tmp_path, sleeper):
    """After MLflow's 504 the prediction runs on; its slot stays taken until it ends, so MAX_ACTIVE bounds compute."""
    server = serve(tmp_path, sleeper, CNNLAB_SERVING_MAX_ACTIVE="1", CNNLAB_SERVING_TIMEOUT="1").start(timeout=120)
    try:
        started = time.monotonic()
        assert sleep(server, 5).status_code == 504  # MLflow's time-out after 1 s
        assert time.monotonic() - started < 4
        busy = sleep(server, 0)  # the 5 s prediction still runs: no slot within 1 s
        assert busy.status_code == 503 and "server busy" in busy.json()["message"]
        wait_for(lambda: time.monotonic() - started > 5.5, "the first prediction's end", 10)
        assert sleep(server, 0).json()["predictions"][0]["most_at_once"] == 1
    finally:
        server.stop()


def scrape(url: str) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@services
def test_metrics_across_workers(tmp_path, sleeper):
    """Two workers' counts summed in one scrape: answers by status, latency, in-flight and queue, the model gauge,
    ready workers (not the warm spare)."""
    server = serve(tmp_path, sleeper, workers=2, CNNLAB_SERVING_MAX_ACTIVE="1").start(timeout=120)
    try:
        before = scrape(server.url)
        with requests.Session() as a, requests.Session() as b:  # two connections: both workers answer
            answers = [s.post(server.url + "/invocations", json={"dataframe_records": [{"sleep": 0.2}]}, timeout=60)
                       for _ in range(5) for s in (a, b)]
            answers.append(a.post(server.url + "/invocations", data=b"{", timeout=60,
                                  headers={"Content-Type": "application/json"}))
            answers.append(b.post(server.url + "/invocations", data=b"{}", timeout=60))  # no Content-Type: 415
        assert [r.status_code for r in answers] == [200] * 10 + [400, 415]
        after = scrape(server.url)
        delta = lambda name, **labels: after.get((name, tuple(sorted(labels.items()))), 0) - \
            before.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
        assert delta("cnnlab_requests_total", code="200") == 10
        assert delta("cnnlab_requests_total", code="400") == 1 and delta("cnnlab_requests_total", code="415") == 1
        assert delta("cnnlab_request_seconds_count") == 12
        assert 10 * 0.2 <= delta("cnnlab_request_seconds_sum") < 60
        assert delta("cnnlab_request_seconds_bucket", le="0.1") <= 2  # the sleeping ones took over 0.2 s
        assert after[("cnnlab_in_flight_requests", ())] == 0 and after[("cnnlab_waiting_requests", ())] == 0
        model = {k: v for k, v in after.items() if k[0] == "cnnlab_model"}
        assert list(model.values()) == [1.0] and dict(next(iter(model))[1])["name"] == str(sleeper)
        wait_for(lambda: "has loaded the model and waits" in server.log.read_text(), "the warm spare loaded", 60)
        assert scrape(server.url)[("cnnlab_ready_workers", ())] == 2  # the waiting spare does not count
    finally:
        server.stop()


def registered(tmp_path: Path, label: str, alias: str) -> str:
    """A sleeper answering `label`, as a new version of the registered model `sleeper` with `alias`."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    mlflow.set_experiment("sleeper")  # not the active experiment an earlier test left: its store is gone
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="m", python_model=str(tmp_path / "sleeper.py"), model_config={"label": label})
    version = str(mlflow.register_model(info.model_uri, "sleeper").version)
    mlflow.MlflowClient().set_registered_model_alias("sleeper", alias, version)
    return version


@services
def test_follow_swaps_versions_without_dropping_a_request_and_shadow_compares(tmp_path):
    """--follow: moving `champion` changes the version that answers (the header says which) with every request
    answered meanwhile; --shadow: the challenger sees copies, its agreement and latency are counted, copies dropped
    when it is busy."""
    one, two = registered(tmp_path, "a", "champion"), registered(tmp_path, "b", "challenger")
    server = ModelServer(tmp_path / "server", "models:/sleeper@champion", mlflow.get_tracking_uri(), guarded=True,
                         trust_model_code=True)
    server.argv = lambda argv=server.argv(): argv + ["--follow", "1", "--shadow", "models:/sleeper@challenger",
                                                     "--shadow-rate", "1"]
    server.start(timeout=120)
    answers, stop = [], threading.Event()

    def client() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(server.url + "/invocations", json={"dataframe_records": [{"sleep": 0.05}]}, timeout=60)
                answers.append((r.status_code, r.headers.get("X-Cnnlab-Model-Version"),
                                r.json()["predictions"][0]["label"] if r.ok else r.text))
    clients = [threading.Thread(target=client) for _ in range(4)]
    try:
        for c in clients:
            c.start()
        wait_for(lambda: len(answers) > 40, "answers from version 1", 60)
        mlflow.MlflowClient().set_registered_model_alias("sleeper", "champion", two)
        wait_for(lambda: answers[-1][1] == two, "answers from version 2", 60)
        wait_for(lambda: sum(a[1] == two for a in answers) > 40, "more answers from version 2", 60)
        stop.set()
        for c in clients:
            c.join()
        assert {status for status, *_ in answers} == {200}
        assert {(version, label) for _, version, label in answers} == {(one, "a"), (two, "b")}
        metrics = scrape(server.url)
        assert metrics[("cnnlab_model", (("alias", "champion"), ("name", "sleeper"), ("version", two)))] == 1
        assert metrics[("cnnlab_model", (("alias", "champion"), ("name", "sleeper"), ("version", one)))] == 0
        outcomes = {dict(k[1])["outcome"]: v for k, v in metrics.items() if k[0] == "cnnlab_shadow_total"}
        assert outcomes["disagree"] > 0 and outcomes["agree"] > 0 and outcomes["dropped"] > 0, outcomes
        assert "error" not in outcomes
        assert metrics[("cnnlab_shadow_seconds_count", ())] == outcomes["agree"] + outcomes["disagree"]
    finally:
        stop.set()
        server.stop()


@services
def test_a_killed_worker_is_replaced_within_5_s(tmp_path, sleeper):
    """kill -9 of a worker under load: its connections close at once, a retry succeeds on a live worker, and a
    replacement (the warm spare) answers within 5 s."""
    server = serve(tmp_path, sleeper, workers=2).start(timeout=180)
    answers, failures, stop = [], [], threading.Event()

    def client() -> None:  # a connection per request: the kernel hands new ones to any listening worker
        while not stop.is_set():
            for _ in range(3):  # a retry after a reset connection
                try:
                    r = requests.post(server.url + "/invocations", json={"dataframe_records": [{"sleep": 0.05}]},
                                      timeout=30)
                    answers.append((time.monotonic(), r.status_code, r.json()["predictions"][0]["pid"]))
                    break
                except requests.ConnectionError:
                    failures.append(time.monotonic())
            else:
                answers.append((time.monotonic(), "failed after 3 tries", None))
    clients = [threading.Thread(target=client) for _ in range(6)]
    try:
        for c in clients:
            c.start()
        wait_for(lambda: len({pid for *_, pid in answers}) == 2, "answers from both workers", 60)
        before = {pid for *_, pid in answers}
        victim = answers[-1][2]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(t > killed and pid not in before for t, _, pid in answers), "a replacement's answer", 30)
        replaced = min(t for t, _, pid in answers if t > killed and pid not in before) - killed
        time.sleep(1)
        stop.set()
        for c in clients:
            c.join()
        assert {status for _, status, _ in answers} == {200}
        assert all(t - killed < 1 for t in failures), [t - killed for t in failures]  # no hang: reset at once
        assert replaced < 5, f"replaced after {replaced:.1f} s"
        assert victim not in {pid for t, _, pid in answers if t > killed + 0.5}
        assert "spare" in server.log.read_text()  # the supervisor says which spare replaced it
        assert requests.get(server.url + "/ready", timeout=10).status_code == 200
    finally:
        stop.set()
        server.stop()
