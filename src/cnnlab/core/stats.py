"""Is a number noise? Bootstrap intervals for accuracy and macro F1, and paired tests of two models on one split.

Resampling n images with replacement is a multinomial draw over the cells of their contingency table (true x
predicted, or right/wrong of two models), and every statistic here is a function of those cells: drawing cell counts
directly is the same bootstrap in O(resamples x cells) instead of O(resamples x images).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats as sps

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
ALPHA = 0.05
EXACT_BELOW = 25  # McNemar: exact binomial test below this many discordant pairs, chi-square above
METHODS = ("bca", "percentile")


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def confusion_counts(labels, preds, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows true, columns predicted; a label outside 0..C-1 is an error."""
    labels, preds = np.asarray(labels, dtype=np.int64).ravel(), np.asarray(preds, dtype=np.int64).ravel()
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    for name, values in (("label", labels), ("prediction", preds)):
        bad = (values < 0) | (values >= n_classes)
        if bad.any():
            row = np.flatnonzero(bad)[0]
            raise ValueError(f"{name} {values[row]} at row {row} is not a class index 0..{n_classes - 1}")
    return np.bincount(labels * n_classes + preds, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy(cm: np.ndarray) -> np.ndarray:
    """Accuracy of confusion matrices (..., C, C)."""
    return np.trace(cm, axis1=-2, axis2=-1) / cm.sum(axis=(-2, -1))


def macro_f1(cm: np.ndarray) -> np.ndarray:
    """Macro F1 of confusion matrices (..., C, C); a class never true nor predicted scores 0, as in scikit-learn."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denom = cm.sum(-1) + cm.sum(-2)  # 2 tp + fp + fn
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)
    return f1.mean(-1)


def resample_cells(counts: np.ndarray, n_resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples, *counts.shape) cell counts of n = counts.sum() images drawn with replacement."""
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")
    flat = np.asarray(counts, dtype=np.int64).ravel()
    n = int(flat.sum())
    if n == 0:
        raise ValueError("no samples to bootstrap")
    draws = np.random.default_rng(seed).multinomial(n, flat / n, size=n_resamples)
    return draws.reshape(n_resamples, *np.shape(counts))


def interval(counts: np.ndarray, draws: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray],
             level: float = LEVEL, method: str = "bca") -> Interval:
    """Bootstrap interval of `statistic` (maps counts (..., *counts.shape) to (...)) from resample_cells' draws."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    estimate = float(statistic(np.asarray(counts)))
    boot = statistic(draws)
    tail = (1 - level) / 2
    quantiles = np.array([tail, 1 - tail])
    if method == "bca":
        flat = np.asarray(counts, dtype=np.int64).ravel()
        quantiles = _bca_quantiles(boot, estimate, flat, statistic, np.shape(counts), quantiles)
    low, high = np.quantile(boot, quantiles)
    return Interval(estimate, float(low), float(high))


def _bca_quantiles(boot, estimate, flat, statistic, shape, quantiles) -> np.ndarray:
    """Bias-corrected and accelerated quantiles (Efron 1987); the jackknife has one value per non-empty cell."""
    below = (np.sum(boot < estimate) + np.sum(boot <= estimate)) / (2 * len(boot))  # ties count half
    below = np.clip(below, 0.5 / len(boot), 1 - 0.5 / len(boot))
    z0 = sps.norm.ppf(below)
    if flat.sum() < 2:
        return quantiles
    cells = np.flatnonzero(flat)
    leave_one_out = np.repeat(flat[None], len(cells), axis=0)
    leave_one_out[np.arange(len(cells)), cells] -= 1
    jack = statistic(leave_one_out.reshape(len(cells), *shape))
    weights = flat[cells]
    d = np.sum(weights * jack) / weights.sum() - jack
    spread = np.sum(weights * d ** 2)
    a = np.sum(weights * d ** 3) / (6 * spread ** 1.5) if spread > 0 else 0.0
    z = sps.norm.ppf(quantiles)
    return sps.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))


def classification_intervals(labels, preds, n_classes: int, n_resamples: int = RESAMPLES, seed: int = SEED,
                             level: float = LEVEL, method: str = "bca") -> dict[str, Interval]:
    """Bootstrap intervals for accuracy and macro F1 (the same resamples for both)."""
    cm = confusion_counts(labels, preds, n_classes)
    draws = resample_cells(cm, n_resamples, seed)
    return {"accuracy": interval(cm, draws, accuracy, level, method),
            "macro_f1": interval(cm, draws, macro_f1, level, method)}


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test on paired right/wrong vectors: exact binomial below EXACT_BELOW discordant pairs, else
    chi-square with continuity correction. `a_only`: A right and B wrong; `b_only`: the reverse."""
    a, b = np.asarray(correct_a, dtype=bool).ravel(), np.asarray(correct_b, dtype=bool).ravel()
    if len(a) != len(b):
        raise ValueError(f"paired test needs equal lengths, got {len(a)} and {len(b)}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = a_only + b_only
    if discordant < EXACT_BELOW:
        statistic = float(min(a_only, b_only))
        p = 1.0 if discordant == 0 else sps.binomtest(a_only, discordant, 0.5).pvalue
        method = "exact"
    else:
        statistic = max(abs(a_only - b_only) - 1, 0) ** 2 / discordant
        p, method = float(sps.chi2.sf(statistic, 1)), "chi2"
    return {"n": len(a), "a_only": a_only, "b_only": b_only, "statistic": statistic, "p_value": min(float(p), 1.0),
            "method": method}


def _paired_difference(cells: np.ndarray) -> np.ndarray:
    """Accuracy of B minus accuracy of A from (..., 4) counts ordered (both right, A only, B only, both wrong)."""
    return (cells[..., 2] - cells[..., 1]) / cells.sum(-1)


def paired_comparison(labels, pred_a, pred_b, n_resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> dict:
    """Two models' predictions on the same images: accuracies, B - A with a paired bootstrap interval, McNemar."""
    labels = np.asarray(labels).ravel()
    pred_a, pred_b = np.asarray(pred_a).ravel(), np.asarray(pred_b).ravel()
    if not len(labels) == len(pred_a) == len(pred_b):
        raise ValueError(f"paired comparison needs equal lengths: {len(labels)} labels, {len(pred_a)} and "
                         f"{len(pred_b)} predictions")
    right_a, right_b = pred_a == labels, pred_b == labels
    test = mcnemar(right_a, right_b)
    cells = np.array([np.sum(right_a & right_b), test["a_only"], test["b_only"], np.sum(~right_a & ~right_b)])
    diff = interval(cells, resample_cells(cells, n_resamples, seed), _paired_difference, level)
    return {"accuracy_a": float(right_a.mean()), "accuracy_b": float(right_b.mean()),
            "difference": diff.estimate, "difference_ci_low": diff.low, "difference_ci_high": diff.high,
            "level": level, **test}


def significantly_better(comparison: dict, alpha: float = ALPHA) -> bool:
    """True when B beats A and McNemar's test rejects equal error rates at `alpha`."""
    return comparison["difference"] > 0 and comparison["p_value"] < alpha


def describe(comparison: dict, alpha: float = ALPHA) -> str:
    """One line a person reads: the difference, its interval, the test and the verdict."""
    c = comparison
    verdict = "significant" if c["p_value"] < alpha else "not significant"
    return (f"B - A = {100 * c['difference']:+.2f} points ({c['level']:.0%} CI {100 * c['difference_ci_low']:+.2f} "
            f"to {100 * c['difference_ci_high']:+.2f}) on {c['n']} images; McNemar ({c['method']}) "
            f"A-only {c['a_only']}, B-only {c['b_only']}, p = {c['p_value']:.3g}: {verdict} at alpha {alpha}")
