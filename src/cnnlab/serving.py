"""The served model: a pyfunc that owns its preprocessing; pixels in, label and class probabilities out."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch


class InputError(ValueError):
    """A client's mistake; the scoring server answers it with HTTP 400."""


def pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("torch", "torchvision", "mlflow", "numpy", "pandas", "opencv-python-headless"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def pixels_tensor(array) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) uint8 0-255 or float 0-1 -> tensor; anything else is an InputError."""
    a = np.asarray(array)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise InputError(f"pixel tensor must have shape (N, H, W) or (N, 1, H, W), got {a.shape}")
    if a.shape[0] == 0 or a.shape[1] < 1 or a.shape[2] < 1:
        raise InputError(f"pixel tensor is empty: shape {a.shape}")
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a))
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InputError("float pixels must be finite and within 0..1")
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    raise InputError(f"pixel dtype must be uint8 (0-255) or float (0-1), got {a.dtype}")


class CnnlabModel(mlflow.pyfunc.PythonModel):
    """Rebuilds the trained Classifier from its bundle; predicts labels and per-class probabilities."""

    def load_context(self, context) -> None:
        self._load(context.artifacts["bundle"])

    @classmethod
    def from_bundle_file(cls, path) -> "CnnlabModel":
        model = cls()
        model._load(path)
        return model

    def _load(self, path) -> None:
        from .models import from_bundle

        data = torch.load(path, map_location="cpu", weights_only=False)
        self.classes = data["classes"]
        self.classifier = from_bundle(data)

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor) -> pd.DataFrame:
        probs = self.classifier.probabilities(self.classifier(pixels)).numpy()
        index = probs.argmax(1)
        out = pd.DataFrame({"label": [self.classes[i] for i in index], "class_index": index.astype(np.int64)})
        for k, name in enumerate(self.classes):
            out[f"prob_{name}"] = probs[:, k].astype(np.float64)
        return out

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        return self.classify(pixels_tensor(model_input))
