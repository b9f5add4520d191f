"""`cnnlab serve`: MLflow's own scoring app (mlflow.pyfunc.scoring_server) behind a small ASGI guard.

MLflow's server reads and parses a request body before the model sees it, with no limit on its size, nesting or
arrival time: a body nested 5,000 deep or an integer of 5,000 digits gets HTTP 500, a missing Content-Type too, and a
gigabyte body is read into memory. The guard answers these with a 4xx before MLflow reads the body, bounds the
requests in progress (503 with Retry-After beyond) until their predictions end, and strips stack traces from error
answers; everything else is MLflow's app, unchanged (`mlflow models serve` keeps working as is, without these
protections). The guard also answers /ping (alive), /ready (the model is loaded) and /metrics (Prometheus).
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import os
import queue
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from prometheus_client import CONTENT_TYPE_LATEST
from uvicorn.protocols.http.h11_impl import H11Protocol

from cnnlab.core.devices import threads_per_worker
from cnnlab.serving import metrics
from cnnlab.serving.model import settings_from_env
from cnnlab.serving.verify import verify_model
from cnnlab.serving.workers import Supervisor, wait_until_in_service

MODEL_ENV = "CNNLAB_SERVE_MODEL"  # the downloaded model each worker loads
FOLLOW_ENV = "CNNLAB_SERVE_FOLLOW"  # seconds between resolutions of the alias; 0: never
SHADOW_ENV = "CNNLAB_SERVE_SHADOW"  # JSON: the downloaded challenger's folder and the fraction of requests it gets
SHADOW_QUEUE = 8  # copies waiting for the challenger; more are dropped
LABELS_ENV = "CNNLAB_SERVE_LABELS"  # JSON: the served model's name, version and alias, for metrics and answers
WORKERS_ENV = "CNNLAB_SERVE_WORKERS"
TRUST_ENV = "CNNLAB_SERVE_TRUST_MODEL_CODE"  # "1": serve models without verify_model's check (--trust-model-code)
VERSION_HEADER = b"x-cnnlab-model-version"
TICKET = contextvars.ContextVar("cnnlab_ticket")  # the request's Ticket, seen by predict in MLflow's thread
log = logging.getLogger(__name__)
MEDIA_TYPES = ("application/json", "text/csv")  # not Parquet: a small compressed body can expand without bound
STRING = re.compile(rb'"[^"]*"')  # a JSON string once escaped backslashes and quotes are gone
NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
DIGITS = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
LONG_NUMBER = 4300  # digits Python's int() refuses (sys.get_int_max_str_digits): json raises ValueError, not a 400
STEP = np.zeros(256, np.int8)  # nesting change per byte
STEP[list(b"[{")] = 1
STEP[list(b"]}")] = -1
MAX_MESSAGE = 2000  # characters of an error message: MLflow's can quote the whole body


@dataclass(frozen=True)
class Limits:
    """The guard's limits per worker; each field can be set by the environment variable CNNLAB_SERVING_<FIELD>."""
    max_body_bytes: int = 16 * 2**20  # one 10 MB image as base64 (13.4 MB) fits
    max_depth: int = 32  # JSON nesting; the deepest valid request needs 5
    max_active: int = 16  # requests read, parsed and predicted at once; also the most a batch can hold
    max_queue: int = 64  # requests waiting for one of those slots; beyond, 503 with Retry-After
    timeout: int = 60  # seconds: for a body to arrive (else 408), for a slot (503), for the answer (MLflow's, 504)


def json_problem(body: bytes, max_depth: int) -> str | None:
    """Why Python's json would fail on `body` with something other than a JSONDecodeError (MLflow answers those with
    HTTP 500): nesting deeper than `max_depth`, or an integer longer than Python converts. None if neither."""
    if len(body) < LONG_NUMBER and body.count(b"[") + body.count(b"{") <= max_depth:
        return None
    text = STRING.sub(b'""', body.replace(b"\\\\", b"").replace(b'\\"', b""))  # outside strings
    digits = text.translate(DIGITS)  # digits as "0", the rest as " ": one fast substring search finds a long run
    at = digits.find(b"0" * LONG_NUMBER)
    if at >= 0:
        run = len(digits) - at - len(digits[at:].lstrip(b"0"))
        return f"a number of {run:,} digits; numbers must have fewer than {LONG_NUMBER:,}"
    brackets = text.translate(None, NOT_BRACKETS)
    depth = int(np.cumsum(STEP[np.frombuffer(brackets, np.uint8)], dtype=np.int32).max(initial=0))
    if depth > max_depth:
        return f"JSON nested {depth:,} levels deep; the limit is {max_depth} (CNNLAB_SERVING_MAX_DEPTH)"
    return None


def shorten(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else f"{text[:500]} ... {text[-(MAX_MESSAGE - 505):]}"


def scrub(body: bytes) -> bytes:
    """An error answer without a stack trace and with a message of bounded length."""
    try:
        doc = json.loads(body)
    except ValueError:
        return shorten(body.decode("utf-8", "replace")).encode()
    if not isinstance(doc, dict):
        return body
    doc.pop("stack_trace", None)
    if isinstance(doc.get("message"), str):
        doc["message"] = shorten(doc["message"])
    return json.dumps(doc).encode()


def error_body(code: str, message: str) -> bytes:
    """An error answer's JSON, in the shape of MLflow's own."""
    return json.dumps({"error_code": code, "message": message}).encode()


async def answer(send, status: int, code: str, message: str, headers: tuple = ()) -> None:
    body = error_body(code, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class TooLarge(Exception):
    pass


class Ticket:
    """A request's prediction as the guard sees it: its slot is held until the prediction ends, even after MLflow's
    own time-out has answered 504 (the thread it runs in cannot be stopped)."""

    def __init__(self):
        self.loop, self.ended = asyncio.get_running_loop(), asyncio.Event()
        self.lock = threading.Lock()
        self.state = "waiting"  # then "running" and "ended"; or "abandoned": answered before predict began

    def begin(self) -> None:
        with self.lock:
            if self.state == "abandoned":  # its answer is gone and its slot free: do not compute it
                raise MlflowException("request abandoned before its prediction began (CNNLAB_SERVING_TIMEOUT)")
            self.state = "running"

    def end(self) -> None:
        with self.lock:
            self.state = "ended"
        self.loop.call_soon_threadsafe(self.ended.set)

    async def settle(self) -> None:
        """Returns once no prediction of this request runs or can start."""
        with self.lock:
            if self.state == "waiting":
                self.state = "abandoned"
            running = self.state == "running"
        if running:
            await self.ended.wait()


def ticketed(predict):
    """A pyfunc's predict that marks the calling request's Ticket while it runs."""
    @functools.wraps(predict)
    def run(*args, **kwargs):
        ticket = TICKET.get(None)
        if ticket is None:
            return predict(*args, **kwargs)
        ticket.begin()
        try:
            return predict(*args, **kwargs)
        finally:
            ticket.end()
    return run


@dataclass(frozen=True)
class Served:
    """MLflow's app for one model version, and its labels (name, version, alias)."""
    app: object
    labels: dict

    @property
    def version(self) -> bytes:
        return str(self.labels["version"]).encode()


class Guard:
    """ASGI app: /ping, /ready and /metrics itself; for POST /invocations a slot, then Content-Type, body size and
    arrival time, JSON shape; then MLflow's app, loaded in the background so the worker is alive meanwhile. With
    `follow` the alias is re-resolved every `follow` seconds; with `shadow` a sample of traffic goes to it as well."""

    def __init__(self, load, limits: Limits, labels: dict, follow: int = 0, shadow: "Shadow | None" = None):
        self.served: Served | None = None
        self.problem, self.limits, self.shadow = None, limits, shadow
        self.slots = asyncio.Semaphore(limits.max_active)
        self.waiting = 0
        self.executor = None
        self.workers = int(os.environ.get(WORKERS_ENV, "1"))  # /ready: all of them loaded
        threading.Thread(target=self.load, args=(load, labels, follow), name="cnnlab-load", daemon=True).start()

    def load(self, load, labels: dict, follow: int) -> None:
        try:
            app = load()
        except Exception as e:  # alive no more: /ping says so, the log says why
            log.exception("cannot load the model")
            self.problem = f"the model failed to load: {type(e).__name__}: {e}"
            return
        self.swap(app, labels)
        wait_until_in_service()
        metrics.READY.set(1)
        while follow:
            time.sleep(follow)
            self.follow()

    def swap(self, app, labels: dict) -> None:
        """Serve `app` from the next request on; requests in progress end on the one they began with."""
        if self.served is not None:
            metrics.MODEL.labels(**self.served.labels).set(0)
        metrics.MODEL.labels(**labels).set(1)
        self.served = Served(app, labels)

    def follow(self) -> None:
        """The alias resolved again; a new version is downloaded, loaded through the same checks, and swapped in."""
        labels = self.served.labels
        uri = f"models:/{labels['name']}@{labels['alias']}"
        try:
            fixed, now = resolve(uri)
            if now["version"] != labels["version"]:
                local, _ = download(fixed, Path(os.environ[MODEL_ENV]).parent / f"v{now['version']}-{os.getpid()}")
                self.swap(mlflow_app(local), now)
                log.warning("--follow: %s is now version %s", uri, now["version"])
        except Exception:  # the registry away, a broken version: keep serving the one loaded
            log.exception("--follow: cannot load %s; still serving version %s", uri, labels["version"])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        path = scope["path"]
        if scope["type"] == "http" and path in ("/ping", "/health", "/ready", "/metrics"):
            return await self.probe(path, send)
        served = self.served
        if served is None:
            return await self.not_ready(send)
        if scope["type"] != "http" or path != "/invocations" or scope["method"] != "POST":
            return await served.app(scope, receive, send)
        await self.invocation(scope, receive, send, served)

    async def probe(self, path: str, send) -> None:
        if path == "/metrics":
            body = metrics.latest()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                    (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        if self.problem or (path == "/ready" and self.served is None):
            return await self.not_ready(send)
        if path == "/ready" and metrics.total("cnnlab_ready_workers") < self.workers:
            return await answer(send, 503, "TEMPORARILY_UNAVAILABLE", f"{metrics.total('cnnlab_ready_workers'):.0f} "
                                f"of {self.workers} workers have loaded the model", ((b"retry-after", b"1"),))
        await answer(send, 200, "OK", "ready" if path == "/ready" else "alive")

    async def not_ready(self, send) -> None:
        await answer(send, 503, "TEMPORARILY_UNAVAILABLE", self.problem or "the model is still loading; retry "
                     "after 1 s (GET /ready answers 200 once it is loaded)", ((b"retry-after", b"1"),))

    async def invocation(self, scope, receive, send, served: Served) -> None:
        """The guarded request, counted: its status code, time and the served version (a header of the answer)."""
        started, status = time.perf_counter(), ["none"]  # none: the client left before an answer

        async def observed(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
                message = {**message, "headers": [*message.get("headers", []), (VERSION_HEADER, served.version)]}
            await send(message)
        try:
            await self.slotted(scope, receive, observed, served.app)
        finally:
            metrics.REQUESTS.labels(status[0]).inc()
            metrics.LATENCY.observe(time.perf_counter() - started)

    async def slotted(self, scope, receive, send, app) -> None:
        if self.executor is None:  # MLflow predicts in the default pool: as many threads as slots
            self.executor = ThreadPoolExecutor(self.limits.max_active, thread_name_prefix="cnnlab-predict")
            asyncio.get_running_loop().set_default_executor(self.executor)
        if self.waiting >= self.limits.max_queue:
            return await self.busy(send)
        self.waiting += 1
        metrics.WAITING.inc()
        try:
            async with asyncio.timeout(self.limits.timeout):
                await self.slots.acquire()
        except TimeoutError:
            return await self.busy(send)
        finally:
            self.waiting -= 1
            metrics.WAITING.dec()
        metrics.IN_FLIGHT.inc()
        try:
            await self.guarded(scope, receive, send, app)
        finally:
            self.slots.release()
            metrics.IN_FLIGHT.dec()

    async def busy(self, send) -> None:
        await answer(send, 503, "TEMPORARILY_UNAVAILABLE",
                     f"server busy: {self.limits.max_active} requests in progress and {self.waiting} waiting "
                     f"(CNNLAB_SERVING_MAX_ACTIVE, CNNLAB_SERVING_MAX_QUEUE); retry after 1 s",
                     ((b"retry-after", b"1"),))

    async def guarded(self, scope, receive, send, app) -> None:
        limit = self.limits.max_body_bytes
        headers = dict(scope["headers"])
        media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if media not in MEDIA_TYPES:
            return await answer(send, 415, "BAD_REQUEST", f"Content-Type must be {' or '.join(MEDIA_TYPES)}, "
                                                          f"got {media or 'none'!r:.100}")
        length = headers.get(b"content-length", b"0")
        if int(length) > limit:  # the server already refused a malformed Content-Length
            return await answer(send, 413, "REQUEST_LIMIT_EXCEEDED", f"body of {int(length):,} bytes; the limit is "
                                                                     f"{limit:,} (CNNLAB_SERVING_MAX_BODY_BYTES)")
        try:
            async with asyncio.timeout(self.limits.timeout):
                body = await read_body(receive, limit)
        except TimeoutError:
            return await answer(send, 408, "BAD_REQUEST", f"body not received within {self.limits.timeout} s "
                                                          f"(CNNLAB_SERVING_TIMEOUT)")
        except TooLarge:
            return await answer(send, 413, "REQUEST_LIMIT_EXCEEDED", f"body over {limit:,} bytes "
                                                                     f"(CNNLAB_SERVING_MAX_BODY_BYTES)")
        if body is None:  # the client left
            return
        problem = None
        if media == "application/json":  # a large body is checked off the event loop: other requests go on
            check = asyncio.to_thread if len(body) > 2**20 else run_here
            problem = await check(json_problem, body, self.limits.max_depth)
        if problem:
            return await answer(send, 400, "BAD_REQUEST", problem)
        if self.shadow is not None:
            send = self.shadow.tap(body, media, send)
        ticket = Ticket()
        token = TICKET.set(ticket)  # MLflow's thread gets a copy of this context
        try:
            await app(scope, replay(body, receive), scrubbed(send))
        finally:
            TICKET.reset(token)
            await ticket.settle()


class Shadow:
    """A challenger on a sample of live traffic, off the request path: a sampled request and the served model's 200
    answer are queued for one thread that runs the challenger and counts agreement of their labels and its latency;
    a copy that finds the queue full is dropped."""

    def __init__(self, local: str, rate: float):
        self.rate, self.model = rate, None
        self.copies = queue.Queue(maxsize=SHADOW_QUEUE)
        threading.Thread(target=self.run, args=(local,), name="cnnlab-shadow", daemon=True).start()

    def tap(self, body: bytes, media: str, send):
        """`send` that also hands the request and its 200 answer to the challenger, for a `rate` sample of requests."""
        if self.model is None or random.random() >= self.rate:
            return send
        status, chunks = [0], []

        async def tapped(message) -> None:
            await send(message)
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif status[0] == 200:
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.offer(body, media, b"".join(chunks))
        return tapped

    def offer(self, body: bytes, media: str, answer: bytes) -> None:
        try:
            self.copies.put_nowait((body, media, answer))
        except queue.Full:
            metrics.SHADOW.labels("dropped").inc()

    def run(self, local: str) -> None:
        from mlflow.pyfunc import scoring_server

        try:
            model = scoring_server.load_model_with_mlflow_config(local)
        except Exception:
            return log.exception("--shadow: cannot load the challenger; no traffic goes to it")
        schema, self.model = model.metadata.get_input_schema(), model
        while True:
            body, media, answer = self.copies.get()
            started = time.perf_counter()
            try:
                result = scoring_server.invocations(body, media, model, schema)
                same = result.status == 200 and labels_of(result.response) == labels_of(answer)
                outcome = "agree" if same else "disagree" if result.status == 200 else "error"
            except Exception:
                log.exception("--shadow: the challenger failed")
                outcome = "error"
            metrics.SHADOW_SECONDS.observe(time.perf_counter() - started)
            metrics.SHADOW.labels(outcome).inc()


def labels_of(answer) -> list:
    """The labels of an answer's predictions: per image its label, or its faces' labels."""
    return [(r.get("label"), [d.get("label") for d in r.get("detections", [])]) if isinstance(r, dict) else r
            for r in json.loads(answer)["predictions"]]


async def lifespan(receive, send) -> None:
    """Startup and shutdown, with nothing to do: the model loads in the background."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def run_here(fn, *args):
    return fn(*args)


async def read_body(receive, limit: int) -> bytes | None:
    """The body from ASGI `receive`; None when the client left, TooLarge as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """The app's `receive`: the body already read, then the client's own messages (a disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return again


def scrubbed(send):
    """The app's `send`: error answers (4xx, 5xx) buffered and scrubbed, others passed through."""
    start, chunks = None, []

    async def send_scrubbed(message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] >= 400:
            start = message
            return
        if start is None:
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = scrub(b"".join(chunks))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return send_scrubbed


class NoDelayH11(H11Protocol):
    """uvicorn's HTTP/1.1 with TCP_NODELAY on each connection: with several workers uvicorn leaves it off (its listening
    socket has proto 0, so asyncio skips it) and each keep-alive answer waits ~40 ms for a delayed ACK
    (uvicorn issue #3149)."""

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def mlflow_app(local: str):
    """MLflow's scoring app for a downloaded model, its predict marking each request's Ticket."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(local)
    model.predict = ticketed(model.predict)
    return scoring_server.init(model)


def forget_dead_workers() -> None:
    """Drop the live gauges of workers that died (kill -9 too), as prometheus-client asks of whoever replaces them."""
    from prometheus_client import multiprocess

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    for path in Path(folder).glob("gauge_live*_*.db") if folder else ():
        pid = int(path.stem.rsplit("_", 1)[1])
        if not Path(f"/proc/{pid}").exists():
            multiprocess.mark_process_dead(pid)


def create_app():
    """Factory for uvicorn (each worker): MLflow's scoring app for the downloaded model, behind the guard."""
    forget_dead_workers()
    shadow = json.loads(os.environ[SHADOW_ENV]) if os.environ.get(SHADOW_ENV) else None
    return Guard(lambda: mlflow_app(os.environ[MODEL_ENV]), settings_from_env(Limits),
                 json.loads(os.environ[LABELS_ENV]), int(os.environ.get(FOLLOW_ENV, "0")),
                 Shadow(shadow["local"], shadow["rate"]) if shadow else None)


def resolve(model_uri: str) -> tuple[str, dict]:
    """(the URI of one fixed version, its labels): an alias is resolved once, so the files downloaded and the version
    reported agree; a URI that is no registered model is labelled by itself."""
    import mlflow

    found = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if not found:
        return model_uri, {"name": model_uri, "version": "", "alias": ""}
    name, alias, version = found.groups()
    if alias:
        version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}", {"name": name, "version": str(version), "alias": alias or ""}


def download(model_uri: str, dest: Path) -> tuple[str, dict]:
    """(local folder, labels) of one fixed version of a model, checked to be servable (a python_function flavor)."""
    import mlflow
    from mlflow.models import Model

    try:
        fixed, labels = resolve(model_uri)
        local = mlflow.artifacts.download_artifacts(artifact_uri=fixed, dst_path=str(dest))
    except MlflowException as e:
        raise RuntimeError(f"cannot download model {model_uri}: {e.message}") from None
    if "python_function" not in Model.load(Path(local) / "MLmodel").flavors:
        raise RuntimeError(f"{model_uri} has no python_function flavor: not a model `cnnlab serve` can serve")
    if os.environ.get(TRUST_ENV) != "1":
        verify_model(local)
    return local, labels


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1, threads: int = 0,
          timeout: int = 0, trust_model_code: bool = False, follow: int = 0, shadow: str = "",
          shadow_rate: float = 0.05) -> None:
    """Download the model once, verify it (verify.py) unless `trust_model_code`, then run `workers` uvicorn workers of
    the guarded app, each with `threads` torch threads (default: CNNLAB_SERVING_THREADS, else cores / workers:
    oversubscribed cores collapse throughput). `follow`: re-resolve the alias every so many seconds and serve its new
    version; `shadow`: a model that gets a copy of a `shadow_rate` fraction of requests, off the request path. Every
    model, followed and shadow ones too, passes the same check."""
    import uvicorn

    from cnnlab.serving.model import Budget

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if follow and "@" not in model_uri:
        raise ValueError(f"--follow needs a model URI with an alias (models:/NAME@ALIAS), got {model_uri}")
    if not 0 < shadow_rate <= 1:
        raise ValueError(f"the shadow rate must be in (0, 1], got {shadow_rate}")
    if timeout:
        os.environ["CNNLAB_SERVING_TIMEOUT"] = str(timeout)
    limits = settings_from_env(Limits)
    budget = settings_from_env(Budget)  # a bad environment variable fails here, not in every worker
    root = Path(tempfile.mkdtemp(prefix="cnnlab-serve-"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        os.environ[TRUST_ENV] = "1" if trust_model_code else ""
        local, labels = download(model_uri, root / "model")
        os.environ[MODEL_ENV], os.environ[LABELS_ENV] = local, json.dumps(labels)
        os.environ[WORKERS_ENV], os.environ[FOLLOW_ENV] = str(workers), str(follow)
        if shadow:
            os.environ[SHADOW_ENV] = json.dumps({"local": download(shadow, root / "shadow")[0], "rate": shadow_rate})
        (root / "metrics").mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(root / "metrics")  # for workers in processes of their own
        if threads:
            os.environ["CNNLAB_SERVING_THREADS"] = str(threads)
        os.environ.setdefault("CNNLAB_SERVING_THREADS", str(threads_per_worker(workers)))
        os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(limits.timeout)
        print(f"cnnlab serve: {model_uri} (version {labels['version'] or '-'}), {workers} worker(s) x {os.environ['CNNLAB_SERVING_THREADS']} torch "
              f"thread(s); per worker {limits}; per request {budget}", file=sys.stderr, flush=True)
        # by name: a worker unpickles its config before it answers the supervisor's health checks, and this module
        # imports torch; loading a model can take longer than uvicorn's 5 s check on a busy machine
        config = uvicorn.Config("cnnlab.serving.guard:create_app", factory=True, host=host, port=port,
                                workers=workers, http="cnnlab.serving.guard:NoDelayH11", timeout_worker_healthcheck=120)
        if workers == 1:
            uvicorn.Server(config).run()
        else:  # a warm spare replaces a dead worker at once
            Supervisor(config, sockets=[config.bind_socket()]).run()
    finally:
        shutil.rmtree(root, ignore_errors=True)
