"""Prometheus metrics of the served model and of `cnnlab serve` (prometheus-client).

`cnnlab serve` sets PROMETHEUS_MULTIPROC_DIR before its workers start, so each worker writes its values to files there
and /metrics sums them over workers; elsewhere (one process, `mlflow models serve`) they stay in process memory.
"""
from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client import values

TIMES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)

REQUESTS = Counter("cnnlab_requests", "POST /invocations answers by HTTP status code", ["code"])
LATENCY = Histogram("cnnlab_request_seconds", "POST /invocations time to answer", buckets=TIMES)
IMAGES = Histogram("cnnlab_request_images", "images (or tensor rows) per request", buckets=SIZES)
BATCH = Histogram("cnnlab_batch_images", "images per forward pass of the batcher", buckets=SIZES)
BATCH_QUEUE = Gauge("cnnlab_batch_queue", "requests' image stacks waiting for the batcher", multiprocess_mode="livesum")
WAITING = Gauge("cnnlab_waiting_requests", "requests waiting for a slot", multiprocess_mode="livesum")
IN_FLIGHT = Gauge("cnnlab_in_flight_requests", "requests holding a slot", multiprocess_mode="livesum")
# Info metrics do not work in multiprocess mode: a gauge set to 1, labelled with what is served
MODEL = Gauge("cnnlab_model", "the served model (1) by name, version and alias", ["name", "version", "alias"],
              multiprocess_mode="livemax")


def latest() -> bytes:
    """The exposition text: every live worker's metrics combined in multiprocess mode, else this process's."""
    if values.ValueClass is values.MutexValue:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
