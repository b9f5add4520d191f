"""REST serving speed of fer_cnn under `mlflow models serve`: latency and images/s, 1 and 2 workers, beside in-process.

    python benchmarks/bench_serving.py --quick                                   # a tiny model, seconds per row
    MLFLOW_TRACKING_URI=... python benchmarks/bench_serving.py --model-uri models:/fer_cnn@champion

Targets: p50 <= 10 ms for one 48x48 image; >= 2000 images/s with batches of 256.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
FER_DIR = Path(os.environ.get("FER2013_DIR", REPO.parent / "shared" / "data" / "fer2013"))
HEADERS = {"Content-Type": "application/json"}


def tiny_model(root: Path) -> str:
    """Train and register a 1-epoch fer_cnn on 200 images (speed does not depend on the weights)."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)
    from cnnlab import registry
    from cnnlab.experiments import make_config, run

    run(make_config("fer_cnn", data_dir=str(FER_DIR), limit=200, epochs=1))
    return registry.register("fer_cnn")["uri"]


def payloads(batch: int) -> dict[str, bytes]:
    """Request bodies of `batch` real FER2013 test images: base64 JPEGs, and the same as a uint8 pixel tensor."""
    import cv2

    files = sorted((FER_DIR / "test").glob("*/*.jpg"))[: max(batch, 1)]
    files = (files * batch)[:batch]
    images = [base64.b64encode(f.read_bytes()).decode() for f in files]
    pixels = np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files])
    return {"b64": json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in images]}}).encode(),
            "tensor": json.dumps({"inputs": pixels.tolist()}).encode()}


def start_server(uri: str, workers: int, threads: int, root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(root / f"server-{workers}.log", "w") as log:
        proc = subprocess.Popen(["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                                 "-p", str(port), "--workers", str(workers)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {(root / f'server-{workers}.log').read_text()[-2000:]}")
        try:
            if requests.get(url + "/ping", timeout=2).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.5)
    sys.exit("server not up after 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def latency(url: str, body: bytes, n: int) -> np.ndarray:
    """Milliseconds per request, one request at a time, after a warm-up."""
    session, out = requests.Session(), []
    for i in range(n + 5):
        t = time.perf_counter()
        r = session.post(url + "/invocations", data=body, headers=HEADERS)
        if r.status_code != 200:
            sys.exit(f"HTTP {r.status_code}: {r.text[:500]}")
        if i >= 5:
            out.append((time.perf_counter() - t) * 1000)
    return np.array(out)


def throughput(url: str, body: bytes, batch: int, clients: int, seconds: float) -> float:
    """Images/s with `clients` concurrent keep-alive clients for `seconds`."""
    latency(url, body, 1)
    done, stop = [0] * clients, time.perf_counter() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        while time.perf_counter() < stop:
            if session.post(url + "/invocations", data=body, headers=HEADERS).status_code == 200:
                done[k] += batch
    start = time.perf_counter()
    pool = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def in_process(uri: str, body: bytes, batch: int, threads: int, seconds: float) -> float:
    """Baseline: the same request through MLflow's parsing and the pyfunc, in this process, no HTTP."""
    import mlflow
    import torch
    from mlflow.pyfunc import scoring_server

    torch.set_num_threads(threads)
    model = mlflow.pyfunc.load_model(uri)
    schema, n = model.metadata.get_input_schema(), 0
    scoring_server.invocations(body, "application/json", model, schema)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        scoring_server.invocations(body, "application/json", model, schema)
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="", help="default: train and register a tiny fer_cnn in a temp store")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--inputs", nargs="+", default=["b64", "tensor"], choices=["b64", "tensor"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput row")
    parser.add_argument("--requests", type=int, default=500, help="for the latency percentiles")
    parser.add_argument("--quick", action="store_true", help="1 worker, b64, 1 s rows, 40 requests: a smoke check")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.inputs, args.seconds, args.requests = [1], ["b64"], 1.0, 40
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="cnnlab-bench-serving-"))
    uri = args.model_uri or tiny_model(root)
    bodies = {b: payloads(b) for b in args.batches}
    rows = []
    for workers in args.workers:
        threads = args.threads or max(1, cores // workers)
        proc, url = start_server(uri, workers, threads, root)
        try:
            for kind in args.inputs:
                lat = latency(url, bodies[1][kind], args.requests)
                rows.append((workers, threads, kind, 1, "latency", np.percentile(lat, 50), np.percentile(lat, 99),
                             1000 / lat.mean(), "p50 <= 10 ms"))
                for batch in args.batches:
                    ips = throughput(url, bodies[batch][kind], batch, 2 * workers, args.seconds)
                    rows.append((workers, threads, kind, batch, f"{2 * workers} clients", None, None, ips,
                                 ">= 2000/s" if batch == 256 else ""))
        finally:
            stop_server(proc)
    for batch in args.batches:
        rows.append((0, args.threads or cores, "b64", batch, "in-process", None, None,
                     in_process(uri, bodies[batch]["b64"], batch, args.threads or cores, args.seconds),
                     "baseline: no HTTP"))
    print(f"\nfer_cnn over HTTP, mlflow models serve, {cores} CPU cores, model {uri}")
    print(f"{'workers':>7} {'threads':>7} {'input':>6} {'batch':>5} {'mode':>12} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'images/s':>9}  target")
    for w, t, kind, batch, mode, p50, p99, ips, target in rows:
        fmt = lambda v: f"{v:7.2f}" if v is not None else f"{'':7}"
        print(f"{w or '-':>7} {t:>7} {kind:>6} {batch:>5} {mode:>12} {fmt(p50)} {fmt(p99)} {ips:9.0f}  {target}")


if __name__ == "__main__":
    main()
