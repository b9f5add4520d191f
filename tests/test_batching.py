"""Dynamic batching in the served model: concurrent callers share forward passes and each gets exactly the answer it
would get alone; requests with different params never share one."""
from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from prometheus_client import REGISTRY

from cnnlab.serving.batching import Batcher, Batching
from cnnlab.serving.model import CnnlabModel
from support import served_model

SAMPLES = Path(__file__).resolve().parents[1] / "serving" / "samples"
CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def model(monkeypatch, max_batch: int) -> CnnlabModel:
    from cnnlab.core.models import create
    from cnnlab.core.preprocess import Classifier, Preprocess

    monkeypatch.setenv("CNNLAB_SERVING_PRECISION", "fp32")
    monkeypatch.setenv("CNNLAB_SERVING_MAX_BATCH", str(max_batch))
    monkeypatch.setenv("CNNLAB_SERVING_MAX_WAIT_MS", "200")  # long: the batches gather even on a loaded machine
    torch.manual_seed(0)
    clf = Classifier(Preprocess(0.5, 0.25, 48), create("fer_cnn", num_classes=7)).eval()
    return served_model(clf, CLASSES)


def batches() -> tuple[float, float]:
    """(forward passes, images) the batchers of this process have run so far."""
    return (REGISTRY.get_sample_value("cnnlab_batch_images_count"),
            REGISTRY.get_sample_value("cnnlab_batch_images_sum"))


def requests_mix(files: list[Path]) -> list[tuple]:
    """(input, params) of mixed sizes and kinds: base64 images, pixel tensors, TTA, face detection, explain."""
    photo = base64.b64encode((SAMPLES / "two_faces.jpg").read_bytes()).decode()
    images = [base64.b64encode(f.read_bytes()).decode() for f in files]
    pixels = np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    mix = []
    for k in range(24):
        size = (1, 3, 7)[k % 3]
        mix.append((pd.DataFrame({"image": images[k: k + size]}), None))
    mix += [(pixels[:k + 1], {"tta": "flip"}) for k in range(4)]
    mix += [(pixels[:2], None), (pixels, {"calibrated": False})]
    mix += [(pixels[:k, :40, :44], None) for k in (1, 3)]  # another image size, the same params: never one stack
    mix += [(pd.DataFrame({"image": [photo]}), {"detect_faces": True})] * 3
    mix += [(pd.DataFrame({"image": images[:2]}), {"explain": True})]
    return mix


def test_batched_equals_unbatched_under_concurrent_callers(fer_subset, monkeypatch):
    files = sorted(fer_subset.glob("test/*/*.jpg"))[:40]
    mix = requests_mix(files)
    alone = model(monkeypatch, max_batch=1)
    want = [alone.predict(None, x, params=p) for x, p in mix]
    batched = model(monkeypatch, max_batch=64)
    start = threading.Barrier(len(mix))
    passes, images = batches()

    def call(k: int) -> list[dict]:
        start.wait()
        x, p = mix[k]
        return batched.predict(None, x, params=p)
    with ThreadPoolExecutor(len(mix)) as pool:
        got = list(pool.map(call, range(len(mix))))
    passes, images = batches()[0] - passes, batches()[1] - images
    assert passes < len(mix) - 5, f"{passes:.0f} forward passes for {len(mix)} concurrent requests: no batching"
    assert images / passes > 2
    for (x, p), g, w in zip(mix, got, want):
        if p and p.get("detect_faces"):
            g, w = [d for r in g for d in r["detections"]], [d for r in w for d in r["detections"]]
            assert [d["box"] for d in g] == [d["box"] for d in w] and len(g) == 2
        assert [r.get("label") for r in g] == [r.get("label") for r in w], p
        assert [r.get("heatmap") is None for r in g] == [r.get("heatmap") is None for r in w]
        probs = lambda rows: np.array([[r[f"prob_{c}"] for c in CLASSES] for r in rows])  # noqa: E731
        np.testing.assert_allclose(probs(g), probs(w), atol=1e-5, rtol=0)


def test_params_never_share_a_batch():
    """Each caller's stack is filled with its key: a forward pass that mixed keys would see two values."""
    seen = []

    def forward(x: np.ndarray, key: int) -> np.ndarray:
        seen.append((key, set(np.unique(x).tolist()), len(x)))
        return x[:, :1] * 10.0

    batcher = Batcher(forward, Batching(max_batch=16, max_wait_ms=100))
    start = threading.Barrier(30)

    def call(k: int) -> np.ndarray:
        key, rows = k % 3, 1 + k % 5
        with batcher.caller():
            start.wait()
            return batcher(np.full((rows, 2), key, np.float32), key)
    with ThreadPoolExecutor(30) as pool:
        got = list(pool.map(call, range(30)))
    for k, out in enumerate(got):
        assert out.shape == (1 + k % 5, 1) and (out == 10.0 * (k % 3)).all()
    assert all(values == {key} for key, values, _ in seen)
    assert len(seen) < 30 and max(size for *_, size in seen) > 5  # more than one caller's rows in a pass


def test_errors_reach_every_caller_of_the_batch():
    def forward(x, key):
        raise RuntimeError("broken net")

    batcher = Batcher(forward, Batching(max_batch=8, max_wait_ms=1))
    with pytest.raises(RuntimeError, match="broken net"):
        batcher(np.zeros((2, 2)), "k")
    assert batcher.thread.is_alive()


def test_an_idle_batcher_lets_its_model_go_and_restarts_on_the_next_call(monkeypatch):
    """A model swapped out (`cnnlab serve --follow`) is freed once its batcher's thread has been idle for idle_s."""
    import gc
    import weakref

    served = model(monkeypatch, max_batch=8)
    served._batcher.idle_s = 0.2
    pixels = np.random.default_rng(1).integers(0, 256, (3, 48, 48), dtype=np.uint8)
    first = served.predict(None, pixels)
    thread = served._batcher.thread
    assert thread.is_alive()
    thread.join(timeout=10)  # idle: it ends by itself
    assert not thread.is_alive() and served._batcher.thread is None
    again = served.predict(None, pixels)  # the next call starts a new one
    assert again == first
    ref = weakref.ref(served)
    served._batcher.thread.join(timeout=10)
    del served
    gc.collect()
    assert ref() is None
