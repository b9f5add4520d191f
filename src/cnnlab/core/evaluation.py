"""Predictions -> metrics and artifact files: confusion matrix, ROC/AUC, classification report, bootstrap intervals,
calibration (ECE, reliability diagram), per-image predictions, Grad-CAM of the worst confusions, curves."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score, roc_curve  # noqa: E402

from cnnlab.core import calibration, stats  # noqa: E402

GRADCAM_PAIRS, GRADCAM_PER_PAIR = 6, 4  # the most confused (true, predicted) pairs, their most confident mistakes


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def metrics_and_artifacts(probs: np.ndarray, labels: np.ndarray, classes: list[str], out_dir: Path,
                          prefix: str, *, images=None, model=None, temperature: float | None = None,
                          n_resamples: int = stats.RESAMPLES, seed: int = stats.SEED) -> dict[str, float]:
    """Write `{prefix}_*` files into out_dir and return flat metrics: accuracy and macro F1 with bootstrap intervals,
    per-class P/R/F1/AUC, ECE and NLL (also after `temperature`, if given). `images` (uint8 (N, H, W)) add a
    per-image digest to the predictions file; with `model` too, a Grad-CAM grid of the worst confusions (slow: ask
    for it once per run)."""
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
    for name, ci in stats.classification_intervals(labels, preds, len(classes), n_resamples, seed).items():
        metrics[f"{prefix}_{name}_ci_low"], metrics[f"{prefix}_{name}_ci_high"] = ci.low, ci.high
    metrics.update(_calibration(probs, labels, out_dir / f"{prefix}_reliability.png", prefix, temperature))
    write_predictions(out_dir / f"{prefix}_predictions.csv", probs, labels, classes, images)
    if model is not None and images is not None:
        gradcam_confusions(model, images, labels, probs, classes, out_dir / f"{prefix}_gradcam_confusions.png")
    return metrics


def image_digests(images) -> list[str]:
    """A short content digest per image: rows of two prediction files hold the same images if these match."""
    images = np.ascontiguousarray(np.asarray(images))
    return [hashlib.blake2b(img.tobytes(), digest_size=8).hexdigest() for img in images]


def write_predictions(path: Path, probs: np.ndarray, labels: np.ndarray, classes: list[str], images=None) -> None:
    """One row per image: index, true label, predicted label, image digest (with images), one prob_<class> each."""
    import pandas as pd

    frame = pd.DataFrame({"index": np.arange(len(labels)), "label": labels, "predicted": probs.argmax(1)})
    if images is not None:
        frame["image_digest"] = image_digests(images)
    for k, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, k]
    frame.to_csv(path, index=False, float_format="%.7g")


def read_predictions(path: Path) -> dict:
    """A predictions file -> {"labels", "predicted", "probs", "classes", "digests" (or None)}; a bad file is an error
    naming it and what is wrong."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable predictions CSV ({e})") from None
    prob_columns = [c for c in frame.columns if c.startswith("prob_")]
    missing = [c for c in ("index", "label", "predicted") if c not in frame.columns]
    missing += [] if prob_columns else ["prob_*"]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {list(frame.columns)}")
    classes = [c.removeprefix("prob_") for c in prob_columns]
    for column in ("label", "predicted"):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~values.isin(range(len(classes)))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: row {row} {column} '{frame[column].iloc[row]}' is not a class index "
                             f"0..{len(classes) - 1}")
    if not (frame["index"].to_numpy() == np.arange(len(frame))).all():
        raise ValueError(f"{path}: column index must count 0..{len(frame) - 1} in order")
    return {"labels": frame["label"].to_numpy(np.int64), "predicted": frame["predicted"].to_numpy(np.int64),
            "probs": frame[prob_columns].to_numpy(np.float64), "classes": classes,
            "digests": frame["image_digest"].astype(str).tolist() if "image_digest" in frame.columns else None}


def _calibration(probs, labels, path: Path, prefix: str, temperature: float | None) -> dict[str, float]:
    """ECE and NLL, before and after temperature scaling when a temperature is given; the reliability diagram."""
    metrics = {f"{prefix}_ece": calibration.expected_calibration_error(probs, labels),
               f"{prefix}_nll": calibration.nll(probs, labels)}
    curves = [("uncalibrated", probs, metrics[f"{prefix}_ece"])]
    if temperature is not None:
        scaled = calibration.calibrate(probs, temperature)
        metrics[f"{prefix}_ece_calibrated"] = calibration.expected_calibration_error(scaled, labels)
        metrics[f"{prefix}_nll_calibrated"] = calibration.nll(scaled, labels)
        curves.append((f"T = {temperature:.3g}", scaled, metrics[f"{prefix}_ece_calibrated"]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for name, p, ece in curves:
        r = calibration.reliability(p, labels)
        filled = r["count"] > 0
        top.plot(r["confidence"][filled], r["accuracy"][filled], "o-", label=f"{name} (ECE {100 * ece:.2f}%)")
        bottom.stairs(r["count"], r["edges"], fill=True, alpha=0.5, label=name)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
            title=f"{prefix}: reliability ({calibration.BINS} bins, top label)")
    top.legend(fontsize=8, loc="best")
    bottom.set(xlabel="confidence", ylabel="images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return metrics


def worst_confusions(labels: np.ndarray, probs: np.ndarray, pairs: int = GRADCAM_PAIRS,
                     per_pair: int = GRADCAM_PER_PAIR) -> list[tuple[int, int, int, np.ndarray]]:
    """The most frequent (true, predicted) mistakes: true, predicted, count and its most confident images' indices."""
    preds = probs.argmax(1)
    cm = confusion_matrix(labels, preds, labels=list(range(probs.shape[1])))
    np.fill_diagonal(cm, 0)
    order = np.argsort(-cm, axis=None, kind="stable")[:pairs]
    out = []
    for true, pred in zip(*np.unravel_index(order, cm.shape)):
        if cm[true, pred] == 0:
            break
        idx = np.flatnonzero((labels == true) & (preds == pred))
        out.append((int(true), int(pred), len(idx), idx[np.argsort(-probs[idx, pred], kind="stable")[:per_pair]]))
    return out


def gradcam_confusions(model, images, labels, probs, classes: list[str], path: Path) -> None:
    """One row per confused pair: its most confidently wrong images with the Grad-CAM of the predicted class, drawn
    as one mosaic (one axes: a grid of subplots costs seconds per run)."""
    from cnnlab.core.explain import ExplainUnavailable, explain

    images = np.asarray(images)
    pairs = worst_confusions(labels, probs)
    message = "no mistakes to explain" if not pairs else ""
    maps = {}
    if pairs:
        index = np.concatenate([idx for *_, idx in pairs])
        targets = np.concatenate([np.full(len(idx), pred) for _, pred, _, idx in pairs])
        try:
            maps = dict(zip(index, explain(model, images[index], targets)))
        except ExplainUnavailable as e:
            message = str(e)
    h, w = images.shape[1:3]
    pad = max(h, w) // 4
    rows = max(len(pairs), 1)
    mosaic = np.ones((rows * (h + pad), GRADCAM_PER_PAIR * (w + pad), 3))
    fig, ax = plt.subplots(figsize=(2 * GRADCAM_PER_PAIR, 2.1 * rows))
    for row, (true, pred, count, idx) in enumerate(pairs):
        top = row * (h + pad) + pad
        for col, i in enumerate(idx):
            left = col * (w + pad)
            mosaic[top: top + h, left: left + w] = _overlay(images[i], maps.get(i))
            ax.text(left + w / 2, top - 1, f"p({classes[pred]}) = {probs[i, pred]:.2f}", fontsize=8,
                    ha="center", va="bottom")
        ax.text(-pad / 2, top + h / 2, f"true {classes[true]}\npredicted {classes[pred]}\n({count} images)",
                fontsize=8, ha="right", va="center")
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    title = "Grad-CAM of the predicted class on the most confident mistakes"
    ax.set_title(f"{title}\n({message})" if message else title, fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _overlay(image: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """A grayscale image as RGB in 0..1, blended with the heat map in the jet colormap when there is one."""
    gray = image.astype(np.float64) / (255.0 if image.dtype == np.uint8 else 1.0)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    return rgb if heat is None else 0.6 * rgb + 0.4 * plt.get_cmap("jet")(heat)[..., :3]


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
