"""Shared fixtures: an isolated tracking store and cache per test, small real data subsets, a served model."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FER_DIR = Path(os.environ.get("FER2013_DIR", REPO.parent / "shared" / "data" / "fer2013"))
FMNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder with its own SQLite tracking store and checkpoint folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # mlflow.set_experiment exports it
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    os.environ["CNNLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch_home = tmp_path_factory.mktemp("torch_home")
    os.environ["TORCH_HOME"] = str(torch_home)


@pytest.fixture(scope="session")
def team_stack():
    """The team stack on loopback, once per session, with MLflow users alice and carol (team) and bob (read-only)."""
    import tempfile

    from cnnlab.stack import Stack

    root = Path(tempfile.mkdtemp(prefix="cnnlab-stack-"))
    root.chmod(0o755)  # the PostgreSQL OS user must reach its data (pytest's tmp folders are root-only)
    stack = Stack(root)
    try:
        stack.up()
        stack.add_user("alice")
        stack.add_user("carol")
        stack.add_user("bob", read_only=True)
        yield stack
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sign_in(team_stack, monkeypatch):
    """sign_in(user): that user's MLflow credentials in the environment, as they load their credentials file;
    sign_in(None): none."""
    from cnnlab.stack import CREDENTIAL_KEYS, read_env_file

    def to(user: str | None) -> None:
        for key in CREDENTIAL_KEYS:
            monkeypatch.delenv(key, raising=False)
        for key, value in (read_env_file(team_stack.users / f"{user}.env") if user else {}).items():
            monkeypatch.setenv(key, value)
    return to


@pytest.fixture
def on_stack(team_stack, isolated, sign_in, monkeypatch):
    """This test tracks to the team stack's mlflow server as teammate alice, with the Optuna password file."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_stack.mlflow.url)
    monkeypatch.setenv("PGPASSFILE", str(team_stack.pgpass))
    sign_in("alice")
    mlflow.set_tracking_uri(team_stack.mlflow.url)
    return team_stack


@pytest.fixture
def tiny_study(tmp_path, fmnist_dir, team_stack):
    """A search-space YAML of a few 1-2 epoch Fashion-MNIST trials, stored in the team stack's PostgreSQL."""
    import yaml

    def write(name: str, n_trials: int, epochs: int = 1) -> dict:
        from cnnlab.tracking import tuning

        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "experiment": "fmnist_cnn", "n_trials": n_trials, "heartbeat_interval": 2,
            "fixed": {"data_dir": str(fmnist_dir), "limit": 300, "epochs": epochs, "batch_size": 64},
            "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "sampler": {"type": "random", "seed": 0}}))
        return tuning.load_spec(path, storage=team_stack.postgres.url("optuna", "optuna"))
    return write


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found in {FMNIST_DIR}: run `make data` (apt-get install dataset-fashion-mnist)")
    return FMNIST_DIR


@pytest.fixture(scope="session")
def fer_subset(tmp_path_factory) -> Path:
    """A few hundred real FER2013 images in the folder layout: 40 train and 10 test per emotion."""
    if not (FER_DIR / "train").is_dir():
        pytest.fail(f"FER2013 not found in {FER_DIR}: set FER2013_DIR")
    root = tmp_path_factory.mktemp("fer_subset")
    rng = random.Random(0)
    for split, n in (("train", 40), ("test", 10)):
        for emotion_dir in sorted((FER_DIR / split).iterdir()):
            files = sorted(emotion_dir.iterdir())
            dest = root / split / emotion_dir.name
            dest.mkdir(parents=True)
            for f in rng.sample(files, min(n, len(files))):
                shutil.copy(f, dest / f.name)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(cmd: list[str], url: str, log: Path, env: dict | None = None, timeout: float = 180):
    """Run a server until the block ends (then stop its process group); up once URL answers HTTP 200."""
    import requests

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{' '.join(cmd[:4])} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url, timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                pytest.fail(f"{' '.join(cmd[:4])} not up after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def fer_champion(tmp_path_factory, fer_subset) -> str:
    """A tiny fer_cnn (1 epoch on 100 images), registered as fer_cnn@champion, behind `cnnlab serve`: its URL."""
    import mlflow
    import torch

    from cnnlab.tracking import registry
    from cnnlab.tracking.experiments import make_config, run

    root = tmp_path_factory.mktemp("fer_champion")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        run(make_config("fer_cnn", data_dir=str(fer_subset), limit=100, epochs=1))
        assert registry.register("fer_cnn")["alias"] == "champion"
    url = f"http://127.0.0.1:{free_port()}"
    # as many torch threads as this process: the same kernels as in process, so the same numbers
    threads = str(torch.get_num_threads())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": threads, "CNNLAB_SERVING_THREADS": threads}
    cmd = [sys.executable, "-m", "cnnlab", "serve", "models:/fer_cnn@champion", "--host", "127.0.0.1",
           "-p", url.rsplit(":", 1)[1]]
    with server_process(cmd, url + "/ready", root / "server.log", env):
        yield url
