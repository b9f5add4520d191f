"""Serving speed and memory of fer_cnn, beside a trivial pyfunc under the same server, in one table.

    python benchmarks/bench_serving.py --quick                                   # smoke check: few requests per row
    python benchmarks/bench_serving.py                                           # a tiny fer_cnn trained first
    MLFLOW_TRACKING_URI=... python benchmarks/bench_serving.py --model-uri models:/fer_cnn@champion
    python benchmarks/bench_serving.py --crowd --requests 200                     # issue 22: 8/32/64 clients

Servers: `mlflow models serve` (1 worker) and `cnnlab serve` (1 and 2 workers, torch threads = cores / workers).
In process also the params' costs (tta flip / tencrop, explain, uncalibrated) beside the plain answer.
Targets (issue 12): one image p50 over HTTP within 1 ms of the trivial pyfunc and <= 0.5 ms in process; 8 clients x
1,000 requests with 0 errors and p99 <= 50 ms; batches of 256 >= 2,000 images/s over HTTP; peak RSS growth <= 1 GB.
--crowd (issue 22): at 64 clients batching >= 1.5x the requests/s of batching off and >= 60% of the trivial pyfunc's,
0 errors; batching adds <= 0.5 ms p50 at 1 client; metrics <= 5% and shadowing (5%) <= 10% of throughput.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import mlflow
import mlflow.pyfunc
import numpy as np

from cnnlab.core.logs import table


sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import ModelServer, status_kb  # noqa: E402 - benchmarks/servers.py

REPO = Path(__file__).resolve().parents[1]
FER_DIR = Path(os.environ.get("FER2013_DIR", REPO.parent / "shared" / "data" / "fer2013"))
HEADERS = {"Content-Type": "application/json"}


class Trivial(mlflow.pyfunc.PythonModel):
    """The baseline model: one constant record per row, no work; what the server alone costs."""

    def predict(self, context, model_input, params=None):
        return [{"label": "neutral"}] * len(model_input)


def models(root: Path, model_uri: str) -> tuple[str, str]:
    """(fer_cnn URI, trivial pyfunc URI) in the tracking store; a 1-epoch fer_cnn on 200 images unless given (speed
    does not depend on the weights)."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    if not model_uri:
        from cnnlab.tracking import registry
        from cnnlab.tracking.experiments import make_config, run

        cwd = os.getcwd()
        os.chdir(root)
        try:
            run(make_config("fer_cnn", data_dir=str(FER_DIR), limit=200, epochs=1))
            model_uri = registry.register("fer_cnn")["uri"]
        finally:
            os.chdir(cwd)
    mlflow.set_experiment("bench_serving")
    with mlflow.start_run(run_name="trivial pyfunc"):
        info = mlflow.pyfunc.log_model(name="trivial", python_model=Trivial())
    return model_uri, info.model_uri


def bodies() -> dict[str, bytes]:
    """Requests: one real FER2013 test JPEG (base64, and as a pixel tensor), 256 of them, the largest allowed request
    (four blank 4096x4096 PNGs) and an over-budget one (32 of them)."""
    files = sorted((FER_DIR / "test").glob("*/*.jpg"))[:256]
    images = [base64.b64encode(f.read_bytes()).decode() for f in files]
    blank = base64.b64encode(cv2.imencode(".png", np.zeros((4096, 4096), np.uint8))[1]).decode()

    def split(values: list[str]) -> bytes:
        return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}).encode()
    pixels = cv2.imread(str(files[0]), cv2.IMREAD_GRAYSCALE)
    return {"one": split(images[:1]), "tensor": json.dumps({"inputs": [pixels.tolist()]}).encode(),
            "batch": split(images), "largest": split([blank] * 4), "over": split([blank] * 32)}


def post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/invocations", body, HEADERS)
    response = conn.getresponse()
    response.read()
    return response.status


def connect(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=120)


def latency(url: str, body: bytes, n: int) -> np.ndarray:
    """Milliseconds per request, one client, one request at a time, after a warm-up."""
    conn, out = connect(url), []
    for i in range(n + 20):
        t = time.perf_counter()
        status = post(conn, body)
        if status != 200:
            sys.exit(f"HTTP {status} from {url}")
        if i >= 20:
            out.append((time.perf_counter() - t) * 1000)
    return np.array(out)


def clients(url: str, body: bytes, n_clients: int, n_requests: int) -> tuple[np.ndarray, int, float]:
    """`n_clients` keep-alive clients at once, `n_requests` each: (latencies ms, errors, seconds)."""
    times, statuses, seconds = crowd(url, body, n_clients, n_requests)
    return times, int(np.sum(statuses != 200)), seconds


def crowd(url: str, body: bytes, n_clients: int, n_requests: int) -> tuple[np.ndarray, np.ndarray, float]:
    """`n_clients` keep-alive clients at once, `n_requests` each: (latencies ms, statuses (0: no answer), seconds)."""
    times: list[list[float]] = [[] for _ in range(n_clients)]
    codes: list[list[int]] = [[] for _ in range(n_clients)]

    def client(k: int) -> None:
        conn = connect(url)
        for _ in range(n_requests):
            t = time.perf_counter()
            try:
                code = post(conn, body)
            except (OSError, http.client.HTTPException):
                code, conn = 0, connect(url)
            times[k].append((time.perf_counter() - t) * 1000)
            codes[k].append(code)
    pool = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return np.concatenate(times), np.concatenate(codes), time.perf_counter() - start


def peak_growth_mb(server: ModelServer, body: bytes) -> tuple[float, float, int]:
    """Peak RSS (VmHWM) of the model's process: its growth for one request and its value after; the status."""
    pid = max(server.processes(), key=lambda p: status_kb(p, "VmRSS"))
    before = status_kb(pid, "VmHWM")
    status = post(connect(server.url), body)
    after = status_kb(pid, "VmHWM")
    return (after - before) / 1024, after / 1024, status


def in_process(model_uri: str, data: dict[str, bytes], n: int) -> list[tuple]:
    """The pyfunc in this process: its predict, MLflow's parse + predict + serialize, and the network alone."""
    import mlflow.pyfunc
    import pandas as pd
    import torch
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_uri)
    schema = model.metadata.get_input_schema()
    frame = pd.DataFrame({"image": [json.loads(data["one"])["dataframe_split"]["data"][0][0]]})
    net = model.unwrap_python_model().classifier.net
    x = torch.zeros(1, 1, 48, 48, dtype=model.unwrap_python_model().dtype)

    def timed(fn, repeat: int) -> np.ndarray:
        for _ in range(10):
            fn()
        out = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
        return np.array(out)
    with torch.inference_mode():
        forward = timed(lambda: net(x), n)
        forward_batch = timed(lambda: net(x.expand(256, -1, -1, -1).contiguous()), max(3, n // 50))
    rows = [("in process", "-", "fer_cnn", "net forward alone, 1 image", forward, None, "the compute floor"),
            ("in process", "-", "fer_cnn", "net forward alone, 256 images", forward_batch,
             256_000 / np.median(forward_batch), "the compute floor"),
            ("in process", "-", "fer_cnn", "pyfunc predict, 1 image", timed(lambda: model.predict(frame), n), None,
             "p50 <= 0.5 ms"),
            *(("in process", "-", "fer_cnn", f"pyfunc predict, 1 image, params {params}",
               timed(lambda: model.predict(frame, params=params), n // 4), None, "baseline: the row above")
              for params in ({"tta": "flip"}, {"tta": "tencrop"}, {"explain": True}, {"calibrated": False})),
            ("in process", "-", "fer_cnn", "MLflow parse+predict+JSON, 1 image",
             timed(lambda: scoring_server.invocations(data["one"], "application/json", model, schema), n), None, "")]
    batch = timed(lambda: scoring_server.invocations(data["batch"], "application/json", model, schema), max(3, n // 50))
    rows.append(("in process", "-", "fer_cnn", "MLflow parse+predict+JSON, 256 images", batch,
                 256_000 / np.median(batch), ""))
    return rows


def serve_rows(name: str, uri: str, tracking_uri: str, root: Path, workers: int, guarded: bool,
               data: dict[str, bytes], args) -> list[tuple]:
    """Rows for one model under one server configuration."""
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    server = ModelServer(root / f"{name}-{'cnnlab' if guarded else 'mlflow'}-{workers}", uri, tracking_uri,
                         workers=workers, guarded=guarded, env={"OMP_NUM_THREADS": str(threads),
                                                                "CNNLAB_SERVING_THREADS": str(threads)},
                         trust_model_code=name == "trivial")
    label, config = "cnnlab serve" if guarded else "mlflow models serve", f"{workers} x {threads}"
    server.start(timeout=300)
    rows = []
    try:
        if name == "fer_cnn" and workers == 1:  # first, so the peak is this request's, not an earlier batch's
            post(connect(server.url), data["one"])
            for key, what in (("over", "32 x 4096x4096 PNG (over budget)"),
                              ("largest", "4 x 4096x4096 PNG (the largest allowed)")):
                mb, peak, status = peak_growth_mb(server, data[key])
                rows.append((label, config, name, f"{what}: HTTP {status}", None, None,
                             f"peak RSS +{mb:.0f} MB, to {peak:.0f} MB (growth <= 1024)"))
        rows.append((label, config, name, "1 image, 1 client", latency(server.url, data["one"], args.requests), None,
                     "p50 within 1 ms of trivial" if name == "fer_cnn" else "baseline"))
        if name == "fer_cnn" and guarded and workers == 1:
            rows.append((label, config, name, "1 image as pixel tensor, 1 client",
                         latency(server.url, data["tensor"], args.requests), None, ""))
        times, errors, seconds = clients(server.url, data["one"], 8, args.clients_requests)
        rows.append((label, config, name, f"8 clients x {args.clients_requests}, {errors} errors", times,
                     len(times) / seconds, "0 errors, p99 <= 50 ms" if name == "fer_cnn" else "baseline"))
        if name == "fer_cnn":
            times, errors, seconds = clients(server.url, data["batch"], 2, args.batches)
            rows.append((label, config, name, f"batches of 256, 2 clients, {errors} errors", times,
                         256 * len(times) / seconds, ">= 2000 images/s"))
    finally:
        server.stop()
    return rows


def crowd_rows(name: str, uri: str, tracking_uri: str, root: Path, data: dict[str, bytes], args,
               env: dict[str, str], flags: tuple = (), counts: tuple = (8, 32, 64)) -> list[tuple]:
    """`cnnlab serve` (1 worker, the default settings but `env`): 1 client's latency, then `counts` clients sending
    single images: requests/s, p50, p99, errors and 503s."""
    what = " ".join(f"{k.removeprefix('CNNLAB_SERVING_')}={v}" for k, v in env.items()) + " ".join(flags)
    server = ModelServer(root / f"crowd-{name}-{len(os.listdir(root))}", uri, tracking_uri, guarded=True, env=env,
                         trust_model_code=name == "trivial")  # our own pickled pyfunc: the guard refuses pickles
    server.argv = lambda argv=server.argv(): argv + list(flags)
    server.start(timeout=300)
    rows = []
    try:
        rows.append(("cnnlab serve", what or "defaults", name, "1 client", latency(server.url, data["one"],
                                                                                  args.requests), None, ""))
        for n in counts:
            times, codes, seconds = crowd(server.url, data["one"], n, max(10, args.crowd_requests // n))
            errors, busy = int(np.sum(codes != 200)), int(np.sum(codes == 503))
            rows.append(("cnnlab serve", what or "defaults", name, f"{n} clients, {len(times)} requests", times,
                         len(times) / seconds, f"{errors} errors ({busy} x 503)"))
    finally:
        server.stop()
    return rows


def metrics_cost_us() -> float:
    """Microseconds of the metrics one request updates (guard and model), in process."""
    from cnnlab.serving import metrics

    n, start = 20000, time.perf_counter()
    for _ in range(n):
        metrics.WAITING.inc(), metrics.WAITING.dec(), metrics.IN_FLIGHT.inc(), metrics.IN_FLIGHT.dec()
        metrics.IMAGES.observe(1), metrics.BATCH.observe(4), metrics.BATCH_QUEUE.inc(), metrics.BATCH_QUEUE.dec()
        metrics.REQUESTS.labels("200").inc(), metrics.LATENCY.observe(0.01)
    return (time.perf_counter() - start) / n * 1e6


def crowd_table(fer: str, trivial: str, tracking_uri: str, root: Path, data: dict[str, bytes], args) -> None:
    """Issue 22's table: batching off and on at 8/32/64 clients with the model's default runtime, torch fp32 beside
    it (off and on), the trivial pyfunc, shadowing 5% to a second copy of the model, the metrics' cost per request."""
    rows = crowd_rows("trivial", trivial, tracking_uri, root, data, args, {}, counts=(8, 64))
    batched = {"CNNLAB_SERVING_MAX_BATCH": "64"}
    rows += crowd_rows("fer_cnn", fer, tracking_uri, root, data, args, {"CNNLAB_SERVING_MAX_BATCH": "1"})
    rows += crowd_rows("fer_cnn", fer, tracking_uri, root, data, args, batched)
    torch_fp32 = {"CNNLAB_SERVING_RUNTIME": "torch", "CNNLAB_SERVING_PRECISION": "fp32"}
    rows += crowd_rows("fer_cnn", fer, tracking_uri, root, data, args, torch_fp32, counts=(8, 64))
    rows += crowd_rows("fer_cnn", fer, tracking_uri, root, data, args, {**torch_fp32, **batched}, counts=(8, 64))
    rows += crowd_rows("fer_cnn", fer, tracking_uri, root, data, args, {}, ("--shadow", fer), counts=(64,))
    print_table(rows)
    print(f"\nmetrics: {metrics_cost_us():.1f} us of metric updates per request, in process")


def print_table(rows: list[tuple]) -> None:
    cells = []
    for server, config, model, what, ms, rate, target in rows:
        p50, p99 = (f"{np.percentile(ms, 50):.2f}", f"{np.percentile(ms, 99):.2f}") if ms is not None else ("", "")
        rate = f"{rate:,.0f}" if rate is not None else (f"{1000 / np.mean(ms):,.0f}" if ms is not None else "")
        cells.append((server, config, model, what, p50, p99, rate, target))
    print(table(cells, ("server", "workers x threads", "model", "measure", "p50 ms", "p99 ms", "per s",
                        "target / result")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="", help="default: train and register a tiny fer_cnn in a temp store")
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per latency row")
    parser.add_argument("--clients-requests", type=int, default=1000, help="requests per client, 8 clients")
    parser.add_argument("--batches", type=int, default=20, help="batches of 256 per client, 2 clients")
    parser.add_argument("--quick", action="store_true", help="a smoke check: 50 requests per row, 4 batches")
    parser.add_argument("--crowd", action="store_true", help="only issue 22's table: 8/32/64 clients, batching off "
                                                              "and on, the trivial pyfunc, fp32, shadowing, metrics")
    parser.add_argument("--crowd-requests", type=int, default=1280, help="requests per crowd row, all clients")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.clients_requests, args.batches = 50, 50, 4
    root = Path(tempfile.mkdtemp(prefix="cnnlab-bench-serving-"))
    fer, trivial = models(root, args.model_uri)
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    data = bodies()
    load = [Path("/proc/loadavg").read_text().split()[:3]]
    if args.crowd:
        crowd_table(fer, trivial, tracking_uri, root, data, args)
        print(f"load average {' '.join(load[0])} before, {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
              f"after; clients and server share the cores")
        return
    rows = []
    for workers, guarded in ((1, False), (1, True), (2, True)):
        if workers == 1:
            rows += serve_rows("trivial", trivial, tracking_uri, root, workers, guarded, data, args)
        rows += serve_rows("fer_cnn", fer, tracking_uri, root, workers, guarded, data, args)
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows += in_process(fer, data, args.requests)
    load.append(Path("/proc/loadavg").read_text().split()[:3])
    from cnnlab.serving.model import serving_precision

    cpu = next((li.split(":", 1)[1].strip() for li in Path("/proc/cpuinfo").read_text().splitlines()
                if li.startswith("model name")), platform.processor())
    print(f"\nfer_cnn {fer} ({serving_precision()}) and a trivial pyfunc; {cpu}, {len(os.sched_getaffinity(0))} cores;"
          f" load average {' '.join(load[0])} before, {' '.join(load[1])} after\n")
    print_table(rows)


if __name__ == "__main__":
    main()
