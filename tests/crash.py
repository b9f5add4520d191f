"""A crash between two epochs, injected into the real loop as a callback (after the epoch's checkpoint and metrics)."""
from __future__ import annotations

from cnnlab.core.training import Callback


class Crash(Exception):
    pass


class CrashAfter(Callback):
    """Raises Crash at the end of epoch `epoch` (0-based)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, loop, epoch: int, metrics: dict) -> None:
        if epoch == self.epoch:
            raise Crash("simulated crash")
