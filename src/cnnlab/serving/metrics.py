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
SHADOW = Counter("cnnlab_shadow", "copies for the shadow model: agree, disagree (labels), error, dropped (busy)",
                 ["outcome"])
SHADOW_SECONDS = Histogram("cnnlab_shadow_seconds", "the shadow model's time per copy", buckets=TIMES)
# Info metrics do not work in multiprocess mode: a gauge set to 1, labelled with what is served
READY = Gauge("cnnlab_ready_workers", "workers whose model is loaded", multiprocess_mode="livesum")
MODEL = Gauge("cnnlab_model", "the served model (1) by name, version and alias", ["name", "version", "alias"],
              multiprocess_mode="livemax")


def registry() -> CollectorRegistry:
    """Every live worker's metrics combined in multiprocess mode, else this process's."""
    if values.ValueClass is values.MutexValue:
        return REGISTRY
    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)
    return combined


def latest() -> bytes:
    return generate_latest(registry())


def total(name: str) -> float:
    """A metric's samples summed (over workers, in multiprocess mode)."""
    return sum(s.value for family in registry().collect() for s in family.samples if s.name == name)
