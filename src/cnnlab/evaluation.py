"""Predictions -> metrics and artifact files: confusion matrix, ROC/AUC, classification report, curves."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score, roc_curve  # noqa: E402


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def metrics_and_artifacts(probs: np.ndarray, labels: np.ndarray, classes: list[str], out_dir: Path,
                          prefix: str) -> dict[str, float]:
    """Write `{prefix}_*` files into out_dir and return flat metrics (accuracy, macro F1, per-class P/R/F1/AUC)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    preds = probs.argmax(1)
    idx = list(range(len(classes)))
    report = classification_report(labels, preds, labels=idx, target_names=classes, output_dict=True, zero_division=0)
    (out_dir / f"{prefix}_classification_report.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{prefix}_classification_report.txt").write_text(
        classification_report(labels, preds, labels=idx, target_names=classes, digits=4, zero_division=0))
    metrics = {f"{prefix}_accuracy": float((preds == labels).mean()),
               f"{prefix}_macro_f1": report["macro avg"]["f1-score"]}
    for c in classes:
        for key, short in (("precision", "precision"), ("recall", "recall"), ("f1-score", "f1")):
            metrics[f"{prefix}_{short}_{_safe(c)}"] = report[c][key]
    metrics.update(_roc(probs, labels, classes, out_dir / f"{prefix}_roc.png", prefix))
    _confusion(labels, preds, classes, out_dir / f"{prefix}_confusion_matrix.png", prefix)
    return metrics


def _confusion(labels, preds, classes, path: Path, title: str) -> None:
    cm = confusion_matrix(labels, preds, labels=list(range(len(classes))))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(6 + 1.2 * len(classes), 3 + 0.5 * len(classes)))
    for ax, data, fmt, name in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalized")):
        ax.imshow(data, cmap="Blues")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
               xlabel="predicted", ylabel="true", title=f"{title}: {name}")
        ax.tick_params(axis="x", rotation=45)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if data[i, j] > data.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _roc(probs, labels, classes, path: Path, prefix: str) -> dict[str, float]:
    fig, ax = plt.subplots(figsize=(6, 5))
    metrics, aucs = {}, []
    for k, name in enumerate(classes):
        positives = labels == k
        if positives.all() or not positives.any():  # AUC undefined for a class absent from (or alone in) the split
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, k])
        auc = roc_auc_score(positives, probs[:, k])
        metrics[f"{prefix}_auc_{_safe(name)}"] = float(auc)
        aucs.append(auc)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    if aucs:
        metrics[f"{prefix}_macro_auc"] = float(np.mean(aucs))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{prefix}: one-vs-rest ROC")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return metrics


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train against validation (when there is a validation split)."""
    epochs = range(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        if f"val_{key}" in history[0]:
            ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=key, title=key)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
