"""What several tests share: the whole pipeline in one call, and TTA probabilities computed as evaluation does."""
from __future__ import annotations

from pathlib import Path

import torch

from cnnlab.core import pipeline
from cnnlab.core.augment import TTA, tta_views, view_probabilities
from cnnlab.core.config import Config
from cnnlab.serving import CnnlabModel


def run_pipeline(cfg: Config, out_dir: Path, callbacks=(), checkpoint_path: Path | None = None) -> pipeline.Trained:
    """Prepare, train and evaluate one experiment; evaluation files go to out_dir."""
    trained = pipeline.prepare(cfg)
    pipeline.train(trained, callbacks, checkpoint_path)
    pipeline.evaluate(trained, out_dir)
    return trained


def served_model(classifier, classes: list[str], image_channels: int = 1) -> CnnlabModel:
    """The cnnlab pyfunc around a Classifier in memory, as a logged model would load."""
    model = CnnlabModel()
    model._setup(classifier, classes, image_channels)
    return model


def tta_probabilities(model, pixels: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """A Classifier's class probabilities (N, C) averaged over the test-time views `tta` names, as evaluation does."""
    if tta not in TTA:
        raise ValueError(f"tta must be one of {list(TTA)}, got {tta!r}")
    views = tta_views(tta)
    return view_probabilities(lambda v: model.probabilities(model(v)), views(pixels) if views else [pixels])
