"""Do the probabilities mean what they say? Expected calibration error, reliability bins, temperature scaling.

Temperature scaling divides the logits by one scalar T fitted on validation data (Guo et al. 2017). From
probabilities it is exact: log p = z - logsumexp(z), and softmax ignores the per-row constant.
"""
from __future__ import annotations

import numpy as np

BINS = 15
EPS = 1e-12  # probability floor of the NLL, as in the training loop's validation loss
TINY = float(np.finfo(np.float32).tiny)  # probabilities -> logits: below this an fp32 softmax resolves nothing
T_RANGE = (1e-2, 1e2)


def _checked(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64).ravel()
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError(f"expected probabilities (N, C) and N labels with N > 0, got {probs.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be class indices 0..{probs.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    return probs, labels


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def calibrate(probs, temperature: float) -> np.ndarray:
    """Probabilities (N, C) -> temperature-scaled probabilities; T = 1 returns them unchanged."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1:
        return probs
    return np.exp(_log_softmax(np.log(np.maximum(probs, TINY)) / temperature))


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the true labels."""
    probs, labels = _checked(probs, labels)
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], EPS)).mean())


def fit_temperature(scores, labels, logits: bool = False) -> float:
    """The T > 0 that minimises the NLL of softmax(z / T); z = log-probabilities unless `logits`.

    The NLL is convex in 1 / T, so a bounded scalar search on log T finds the global minimum."""
    from scipy.optimize import minimize_scalar

    scores, labels = _checked(scores, labels)
    z = scores if logits else np.log(np.maximum(scores, TINY))
    if not np.isfinite(z).all():
        raise ValueError("scores must be finite")
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        return -_log_softmax(z / np.exp(log_t))[rows, labels].mean()
    result = minimize_scalar(loss, bounds=np.log(T_RANGE), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(result.x))


def reliability(probs, labels, n_bins: int = BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of top-label confidence, (lo, hi]: count, mean confidence and accuracy (NaN when empty)."""
    probs, labels = _checked(probs, labels)
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": np.linspace(0, 1, n_bins + 1), "count": count,
                "confidence": np.bincount(bins, confidence, n_bins) / count,
                "accuracy": np.bincount(bins, correct, n_bins) / count}


def expected_calibration_error(probs, labels, n_bins: int = BINS) -> float:
    """Top-label ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    r = reliability(probs, labels, n_bins)
    filled = r["count"] > 0
    gaps = np.abs(r["accuracy"][filled] - r["confidence"][filled])
    return float(np.sum(r["count"][filled] * gaps) / r["count"].sum())
