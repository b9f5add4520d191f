"""What several tests share: the whole pipeline in one call, and TTA probabilities computed as evaluation does."""
from __future__ import annotations

from pathlib import Path

import torch

from cnnlab.core import pipeline
from cnnlab.core.augment import TTA, tta_views, view_probabilities
from cnnlab.core.config import Config


def run_pipeline(cfg: Config, out_dir: Path, callbacks=(), checkpoint_path: Path | None = None) -> pipeline.Trained:
    """Prepare, train and evaluate one experiment; evaluation files go to out_dir."""
    trained = pipeline.prepare(cfg)
    pipeline.train(trained, callbacks, checkpoint_path)
    pipeline.evaluate(trained, out_dir)
    return trained


def tta_probabilities(model, pixels: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """A Classifier's class probabilities (N, C) averaged over the test-time views `tta` names, as evaluation does."""
    if tta not in TTA:
        raise ValueError(f"tta must be one of {list(TTA)}, got {tta!r}")
    views = tta_views(tta)
    return view_probabilities(model, views(pixels) if views else [pixels])
