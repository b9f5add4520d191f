"""Dynamic batching inside the served model: concurrent predict calls of one worker share a forward pass.

Each call puts its stack of images on one queue and waits; one thread takes the oldest stack and the later ones with
the same key (same image shape and dtype, same request params), up to `max_batch` images, runs one forward pass and
hands each caller its own rows. It waits up to `max_wait_ms` for more only while other predict calls are in progress
but not yet queued (decoding, say), so a lone client pays no wait. Works wherever predict runs in threads: `cnnlab
serve` and `mlflow models serve` alike; a batch holds at most as many requests as run predict at once in the worker.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from cnnlab.serving import metrics


@dataclass(frozen=True)
class Batching:
    """Dynamic batching per worker; each field can be set by the environment variable CNNLAB_SERVING_<FIELD>."""
    # images per batched forward pass; 1: off (the default until it pays: benchmarks/results/serving_crowd.md)
    max_batch: int = 1
    max_wait_ms: int = 2  # how long a batch waits for requests still being decoded


class Item:
    """One caller's stack of images, and then its rows of the answer (or the error)."""

    def __init__(self, pixels: np.ndarray, key):
        self.pixels, self.key = pixels, (key, pixels.shape[1:], pixels.dtype)  # only equal keys stack
        self.done = threading.Event()
        self.result, self.error = None, None


class Batcher:
    """Runs `forward(pixels, key)` on the stacks of concurrent callers with equal keys, concatenated."""

    idle_s = 10.0  # the thread ends after this long without work (and restarts on the next call), so a model swapped
    # out by `cnnlab serve --follow` is not kept alive by its batcher

    def __init__(self, forward, settings: Batching):
        self.forward, self.max_batch, self.max_wait = forward, settings.max_batch, settings.max_wait_ms / 1000
        self.cond = threading.Condition()
        self.queue: list[Item] = []
        self.callers = 0  # predict calls in progress
        self.thread = None

    @contextmanager
    def caller(self):
        """Marks a predict call in progress: the batcher may wait for its images."""
        with self.cond:
            self.callers += 1
        try:
            yield
        finally:
            with self.cond:
                self.callers -= 1
                self.cond.notify_all()

    def __call__(self, pixels: np.ndarray, key) -> np.ndarray:
        if self.max_batch == 1:  # batching off: the caller's own forward pass
            metrics.BATCH.observe(len(pixels))
            return self.forward(pixels, key)
        item = Item(pixels, key)
        with self.cond:
            if self.thread is None:  # started in the worker that uses it, never before a fork
                self.thread = threading.Thread(target=self.loop, name="cnnlab-batcher", daemon=True)
                self.thread.start()
            self.queue.append(item)
            metrics.BATCH_QUEUE.inc()
            self.cond.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def pick(self) -> tuple[list[Item], bool]:
        """The oldest item and later ones with its key, up to max_batch images; and whether the batch is full."""
        first, picked, size = self.queue[0], [], 0
        for item in self.queue:
            if item.key != first.key:
                continue
            if picked and size + len(item.pixels) > self.max_batch:
                return picked, True
            picked.append(item)
            size += len(item.pixels)
        return picked, size >= self.max_batch

    def take(self) -> list[Item] | None:
        """The next batch, once full, or no caller is left on its way, or max_wait has passed; None after idle_s
        without any (the thread then ends)."""
        with self.cond:
            while not self.queue:
                if not self.cond.wait(self.idle_s) and not self.queue:
                    self.thread = None
                    return None
            deadline = time.monotonic() + self.max_wait
            while True:
                picked, full = self.pick()
                on_the_way = self.callers - len(self.queue)
                left = deadline - time.monotonic()
                if full or on_the_way <= 0 or left <= 0:
                    break
                self.cond.wait(left)
            taken = set(map(id, picked))
            self.queue = [item for item in self.queue if id(item) not in taken]
            metrics.BATCH_QUEUE.dec(len(picked))
            return picked

    def loop(self) -> None:
        while (batch := self.take()) is not None:
            try:
                out = self.forward(np.concatenate([item.pixels for item in batch]), batch[0].key[0])
                metrics.BATCH.observe(len(out))
                at = np.cumsum([0] + [len(item.pixels) for item in batch])
                for item, lo, hi in zip(batch, at, at[1:]):
                    item.result = out[lo:hi]
            except Exception as e:  # every caller of the batch gets the error, as it would alone
                for item in batch:
                    item.error = e
            for item in batch:
                item.done.set()
