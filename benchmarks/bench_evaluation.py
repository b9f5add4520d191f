"""Cost of trustworthy evaluation on a FER2013-sized split (3,589 test, 2,871 validation images, 7 classes, 48 px):
bootstrap intervals against image resampling and scipy.stats.bootstrap, the paired test, temperature fitting, the
per-split evaluation before and after this work's additions, and Grad-CAM.

    python benchmarks/bench_evaluation.py            # 5 repeats of each timing, the median reported
    python benchmarks/bench_evaluation.py --quick    # 1 repeat
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnnlab.core.logs import table  # noqa: E402

from cnnlab.core import calibration, evaluation, models, stats  # noqa: E402
from cnnlab.core.explain import explain  # noqa: E402
from cnnlab.core.preprocess import Classifier, Preprocess  # noqa: E402

N_TEST, N_VAL, CLASSES, RESAMPLES = 3589, 2871, 7, 2000


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds over `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Over-confident predictions of about 52% accuracy (logits scaled by 3), labels drawn from the true model."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.6, (n, CLASSES))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (true.cumsum(1) > rng.random((n, 1))).argmax(1)
    scaled = np.exp(3 * logits)
    return scaled / scaled.sum(1, keepdims=True), labels


def image_resampling(labels, preds) -> tuple[float, float, float, float]:
    """Baseline: resample image indices (NumPy, vectorised), percentile intervals of accuracy and macro F1."""
    index = np.random.default_rng(0).integers(0, len(labels), (RESAMPLES, len(labels)))
    codes = (labels * CLASSES + preds)[index] + CLASSES * CLASSES * np.arange(RESAMPLES)[:, None]
    cms = np.bincount(codes.ravel(), minlength=RESAMPLES * CLASSES ** 2).reshape(RESAMPLES, CLASSES, CLASSES)
    return (*np.quantile(stats.accuracy(cms), [0.025, 0.975]), *np.quantile(stats.macro_f1(cms), [0.025, 0.975]))


def scipy_bca(labels, preds) -> tuple[float, float]:
    """Baseline: scipy.stats.bootstrap, BCa, accuracy only (its jackknife leaves out each of the 3,589 images)."""
    from scipy.stats import bootstrap

    ci = bootstrap(((labels == preds).astype(float),), np.mean, n_resamples=RESAMPLES, method="BCa",
                   random_state=0, vectorized=True).confidence_interval
    return ci.low, ci.high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    repeats = 1 if parser.parse_args().quick else 5
    torch.set_num_threads(1)
    probs, labels = split(N_TEST, 0)
    val_probs, val_labels = split(N_VAL, 1)
    preds = probs.argmax(1)
    rows = []

    def row(what: str, seconds: float, result: str, baseline: str = "") -> None:
        rows.append((what, f"{1000 * seconds:.1f}", result, baseline))

    t, ci = timed(lambda: stats.classification_intervals(labels, preds, CLASSES, RESAMPLES), repeats)
    t_base, base = timed(lambda: image_resampling(labels, preds), repeats)
    row("bootstrap accuracy + macro F1, BCa, cell counts (ours)", t,
        f"acc [{ci['accuracy'].low:.4f}, {ci['accuracy'].high:.4f}], F1 [{ci['macro_f1'].low:.4f}, "
        f"{ci['macro_f1'].high:.4f}]")
    row("  baseline: resampling image indices, percentile", t_base,
        f"acc [{base[0]:.4f}, {base[1]:.4f}], F1 [{base[2]:.4f}, {base[3]:.4f}]", "baseline")
    t_scipy, (low, high) = timed(lambda: scipy_bca(labels, preds), repeats)
    row("  baseline: scipy.stats.bootstrap BCa, accuracy only", t_scipy, f"acc [{low:.4f}, {high:.4f}]", "baseline")
    other = np.where(np.random.default_rng(2).random(N_TEST) < 0.1, labels, preds)
    t, cmp = timed(lambda: stats.paired_comparison(labels, preds, other), repeats)
    row("McNemar + paired bootstrap of B - A", t,
        f"B - A {100 * cmp['difference']:+.2f} points, p = {cmp['p_value']:.2g}")
    t, temp = timed(lambda: calibration.fit_temperature(val_probs, val_labels), repeats)
    before = calibration.expected_calibration_error(probs, labels)
    after = calibration.expected_calibration_error(calibration.calibrate(probs, temp), labels)
    row("fit temperature on validation (2,871)", t, f"T = {temp:.3f} (true 3); test ECE {100 * before:.2f}% -> "
        f"{100 * after:.2f}%")
    t, _ = timed(lambda: calibration.expected_calibration_error(probs, labels), repeats)
    row("ECE, 15 bins", t, "")

    images = np.random.default_rng(3).integers(0, 256, (N_TEST, 48, 48), dtype=np.uint8)
    names = [f"c{k}" for k in range(CLASSES)]
    with tempfile.TemporaryDirectory() as tmp:
        def before_work():  # the outputs metrics_and_artifacts had before: report, ROC, confusion matrices
            from sklearn.metrics import classification_report
            classification_report(labels, preds, labels=list(range(CLASSES)), output_dict=True, zero_division=0)
            classification_report(labels, preds, labels=list(range(CLASSES)), digits=4, zero_division=0)
            evaluation._roc(probs, labels, names, Path(tmp) / "roc.png", "test")
            evaluation._confusion(labels, preds, names, Path(tmp) / "cm.png", "test")
        t_base, _ = timed(before_work, repeats)
        t, _ = timed(lambda: evaluation.metrics_and_artifacts(probs, labels, names, Path(tmp), "val", images=images,
                                                              temperature=temp), repeats)
        row("metrics_and_artifacts, one split (now)", t, "+ intervals, ECE, reliability, predictions")
        row("  baseline: its previous outputs only", t_base, "report, ROC, confusion matrices", "baseline")
        for label, name, options in (("fer_cnn", "fer_cnn", {}), ("vgg_bn", "vgg_bn", {}),
                                     ("resnet18 small_input", "resnet18", {"in_chans": 1, "small_input": True})):
            model = Classifier(Preprocess(0.5, 0.25, 48), models.create(name, **options)).eval()
            t, _ = timed(lambda: evaluation.gradcam_confusions(model, images, labels, probs, names,
                                                               Path(tmp) / "grid.png"), repeats)
            row(f"Grad-CAM grid, {label} (6 pairs x 4 images, test split only)", t, "")
            t, _ = timed(lambda: explain(model, images[:1]), repeats)
            row(f"explain, 1 image, {label}", t, "")
    print(f"torch {torch.__version__}, 1 thread, median of {repeats}; {N_TEST} test images, {CLASSES} classes, "
          f"{RESAMPLES} resamples")
    print(table(rows, ("what", "ms", "result", "")))


if __name__ == "__main__":
    main()
