"""Evaluation you can trust: bootstrap intervals, paired tests, calibration, Grad-CAM, and `cnnlab compare`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from cnnlab.core import calibration, evaluation, models, stats
from cnnlab.core.explain import ExplainUnavailable, explain
from cnnlab.core.preprocess import Classifier, Preprocess


def noisy_predictions(n: int, n_classes: int, right: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    return labels, np.where(rng.random(n) < right, labels, rng.integers(0, n_classes, n))


# --- bootstrap intervals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", stats.METHODS)
def test_accuracy_interval_covers_the_true_accuracy_about_95_percent_of_the_time(method):
    rng = np.random.default_rng(0)
    reps, n, p = 1000, 500, 0.7
    covered = 0
    for rep in range(reps):
        correct = rng.random(n) < p
        labels = np.zeros(n, dtype=np.int64)
        ci = stats.classification_intervals(labels, np.where(correct, 0, 1), 2, n_resamples=1000, seed=rep,
                                            method=method)["accuracy"]
        assert ci.low <= ci.estimate <= ci.high
        covered += ci.low <= p <= ci.high
    assert 0.93 <= covered / reps <= 0.97, covered / reps


def test_drawing_cell_counts_matches_resampling_images():
    """Drawing cell counts is the same bootstrap as resampling images: the same interval up to Monte Carlo error."""
    labels, preds = noisy_predictions(600, 5, 0.6, seed=1)
    ours = stats.classification_intervals(labels, preds, 5, n_resamples=4000, seed=0, method="percentile")
    index = np.random.default_rng(1).integers(0, len(labels), (4000, len(labels)))
    cms = [stats.confusion_counts(labels[i], preds[i], 5) for i in index]
    for name, fn in (("accuracy", stats.accuracy), ("macro_f1", stats.macro_f1)):
        low, high = np.quantile(fn(np.stack(cms)), [0.025, 0.975])
        assert ours[name].low == pytest.approx(low, abs=0.01) and ours[name].high == pytest.approx(high, abs=0.01)


def test_macro_f1_matches_scikit_learn_with_a_class_never_seen():
    labels, preds = noisy_predictions(300, 4, 0.5, seed=2)  # class 4 of 5: neither true nor predicted
    cm = stats.confusion_counts(labels, preds, 5)
    assert stats.macro_f1(cm) == pytest.approx(f1_score(labels, preds, average="macro", labels=range(5),
                                                        zero_division=0))
    assert stats.accuracy(cm) == pytest.approx((labels == preds).mean())


def test_intervals_are_seeded_and_bad_input_is_named():
    labels, preds = noisy_predictions(400, 3, 0.7, seed=3)
    first = stats.classification_intervals(labels, preds, 3, seed=5)
    assert first == stats.classification_intervals(labels, preds, 3, seed=5)
    assert first != stats.classification_intervals(labels, preds, 3, seed=6)
    with pytest.raises(ValueError, match="label 7 at row 0 is not a class index 0..2"):
        stats.classification_intervals([7, 0], [0, 0], 3)
    with pytest.raises(ValueError, match="method must be one of"):
        stats.classification_intervals(labels, preds, 3, method="normal")


# --- paired comparison ---------------------------------------------------------------------------------------------

def paired(a_only: int, b_only: int, both: int = 50, neither: int = 10) -> tuple[np.ndarray, np.ndarray]:
    right_a = np.r_[np.ones(a_only), np.zeros(b_only), np.ones(both), np.zeros(neither)].astype(bool)
    right_b = np.r_[np.zeros(a_only), np.ones(b_only), np.ones(both), np.zeros(neither)].astype(bool)
    return right_a, right_b


def test_mcnemar_chi_square_with_continuity_correction_by_hand():
    # 30 and 12 discordant pairs: (|30 - 12| - 1)^2 / 42 = 289 / 42; P(chi2_1 > 6.881) = 0.00871
    result = stats.mcnemar(*paired(30, 12))
    assert (result["a_only"], result["b_only"], result["n"], result["method"]) == (30, 12, 102, "chi2")
    assert result["statistic"] == pytest.approx(289 / 42)
    assert result["p_value"] == pytest.approx(0.0087119, abs=1e-6)


def test_mcnemar_exact_binomial_for_few_discordant_pairs_by_hand():
    # 2 and 9 discordant: p = 2 * P(X <= 2), X ~ Bin(11, 1/2) = 2 * (1 + 11 + 55) / 2048
    result = stats.mcnemar(*paired(2, 9))
    assert result["method"] == "exact" and result["statistic"] == 2
    assert result["p_value"] == pytest.approx(134 / 2048)


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (7, 7), (40, 40), (3, 12), (30, 50)])
def test_mcnemar_is_symmetric(a_only, b_only):
    forward, backward = stats.mcnemar(*paired(a_only, b_only)), stats.mcnemar(*paired(b_only, a_only))
    assert forward["p_value"] == pytest.approx(backward["p_value"])
    assert forward["statistic"] == pytest.approx(backward["statistic"])
    if a_only == b_only:
        assert forward["p_value"] == 1.0


def test_paired_comparison_and_the_registry_verdict():
    labels = np.zeros(400, dtype=np.int64)
    right_a, right_b = paired(10, 40, both=300, neither=50)
    result = stats.paired_comparison(labels, np.where(right_a, 0, 1), np.where(right_b, 0, 1))
    assert result["difference"] == pytest.approx(30 / 400)
    assert result["accuracy_b"] - result["accuracy_a"] == pytest.approx(result["difference"])
    assert 0 < result["difference_ci_low"] < result["difference"] < result["difference_ci_high"]
    assert stats.significantly_better(result)
    swapped = stats.paired_comparison(labels, np.where(right_b, 0, 1), np.where(right_a, 0, 1))
    assert swapped["difference"] == -result["difference"] and not stats.significantly_better(swapped)
    close = stats.paired_comparison(labels, *(np.where(r, 0, 1) for r in paired(20, 24, both=300, neither=56)))
    assert not stats.significantly_better(close) and close["difference_ci_low"] < 0 < close["difference_ci_high"]
    assert "not significant at alpha 0.05" in stats.describe(close)


# --- calibration ---------------------------------------------------------------------------------------------------

def sampled_from(logits: np.ndarray, seed: int) -> np.ndarray:
    """Labels drawn from softmax(logits): probabilities equal to softmax(logits) are calibrated by construction."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    rng = np.random.default_rng(seed)
    return (probs.cumsum(1) > rng.random((len(probs), 1))).argmax(1)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ece_of_calibrated_predictions_is_near_zero_and_of_overconfident_ones_is_not():
    logits = np.random.default_rng(0).normal(0, 1.5, (20000, 5))
    labels = sampled_from(logits, seed=1)
    assert calibration.expected_calibration_error(softmax(logits), labels) < 0.015
    assert calibration.expected_calibration_error(softmax(5 * logits), labels) > 0.2


def test_temperature_scaling_fixes_an_overconfident_model():
    logits = np.random.default_rng(2).normal(0, 1.5, (8000, 7))
    labels = sampled_from(logits, seed=3)
    val, test = slice(0, 4000), slice(4000, None)
    overconfident = softmax(5 * logits)
    t = calibration.fit_temperature(overconfident[val], labels[val])
    assert 4.0 < t < 6.0  # the true model is logits / 5
    assert t == pytest.approx(calibration.fit_temperature(5 * logits[val], labels[val], logits=True), rel=1e-3)
    before = calibration.expected_calibration_error(overconfident[test], labels[test])
    after = calibration.expected_calibration_error(calibration.calibrate(overconfident[test], t), labels[test])
    assert after < before / 4 and after < 0.03
    assert calibration.nll(calibration.calibrate(overconfident[test], t), labels[test]) < \
        calibration.nll(overconfident[test], labels[test])
    np.testing.assert_allclose(calibration.calibrate(overconfident, t), softmax(5 * logits / t), atol=1e-9)


def test_calibrate_is_the_identity_at_t_1_and_refuses_bad_temperatures():
    probs = softmax(np.random.default_rng(4).normal(size=(10, 3)))
    np.testing.assert_array_equal(calibration.calibrate(probs, 1.0), probs)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            calibration.calibrate(probs, bad)
    with pytest.raises(ValueError, match="labels must be class indices 0..2"):
        calibration.fit_temperature(probs, np.full(10, 3))


# --- Grad-CAM ------------------------------------------------------------------------------------------------------

def corner_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 noise; label 1 when the top-left 5x5 corner holds a bright square, 0 when it holds a dark one."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 16, 16), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 2, (n,), generator=gen)
    images[:, :5, :5] = torch.where(labels[:, None, None] == 1, 230, 25).to(torch.uint8)
    return images, labels


def test_gradcam_highlights_the_corner_that_decides_the_label():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 8 * 8, 2))
    model = Classifier(Preprocess(0.5, 0.29, 16), net)
    images, labels = corner_images(512, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = torch.randint(0, len(images), (64,))
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_images, test_labels = corner_images(64, seed=1)
    with torch.no_grad():
        assert (model(test_images).argmax(1) == test_labels).float().mean() > 0.95
    maps = explain(model, test_images, test_labels)
    assert maps.shape == (64, 16, 16) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    quadrants = maps.reshape(64, 2, 8, 2, 8).sum((2, 4)).reshape(64, 4)  # top-left, top-right, bottom-left, ...
    share = quadrants / quadrants.sum(1, keepdims=True).clip(1e-9)
    assert (share.argmax(1) == 0).mean() >= 0.9  # the corner's quadrant holds the most mass in (nearly) every image
    assert np.median(share[:, 0]) > 0.4, np.median(share, 0)  # uniform: 0.25
    assert model.training and all(p.requires_grad for p in model.parameters())  # mode and flags restored


@pytest.mark.parametrize("name, options", [("fmnist_cnn", {}), ("fer_cnn", {"variant": "model1"}), ("vgg_bn", {}),
                                           ("vgg_bn", {"head": "fc", "width": 8}), ("resnet18", {"in_chans": 1})])
def test_explain_gives_a_map_per_image_at_the_pixels_resolution_for_every_conv_model(name, options):
    model = Classifier(Preprocess(0.5, 0.25, 28 if name == "fmnist_cnn" else 48), models.create(name, **options))
    pixels = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8)
    maps = explain(model, pixels)
    assert maps.shape == (3, 40, 36) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1


def test_explain_works_with_frozen_weights_and_refuses_bf16_weights_and_the_mlp():
    net = models.create("resnet18", in_chans=1)
    models.freeze_resnet(net, "layer4")
    model = Classifier(Preprocess(0.5, 0.25, 48), net)
    maps = explain(model, np.random.default_rng(0).random((2, 48, 48)), targets=[3, 5])
    assert maps.shape == (2, 48, 48) and maps.max() > 0.5
    with pytest.raises(ValueError, match="targets must be class indices 0..6"):
        explain(model, np.zeros((1, 48, 48), np.uint8), targets=[7])
    model.net.to(torch.bfloat16)
    with pytest.raises(ValueError, match="explain needs float32 weights"):
        explain(model, np.zeros((1, 48, 48), np.uint8))
    mlp = Classifier(Preprocess(0.5, 0.25, 28), models.create("mlp"))
    with pytest.raises(ExplainUnavailable, match="no convolutional feature map"):
        explain(mlp, torch.zeros(2, 28, 28, dtype=torch.uint8))


# --- metrics_and_artifacts and the predictions file ----------------------------------------------------------------

def test_metrics_and_artifacts_adds_intervals_calibration_predictions_and_gradcam(tmp_path):
    classes = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 90)
    probs = softmax(3 * np.eye(3)[labels] + rng.normal(0, 1.5, (90, 3)))
    images = rng.integers(0, 256, (90, 28, 28), dtype=np.uint8)
    model = Classifier(Preprocess(0.5, 0.25, 28), models.create("fmnist_cnn"))
    m = evaluation.metrics_and_artifacts(probs, labels, classes, tmp_path, "test", images=images, model=model,
                                         temperature=1.7)
    for name in ("accuracy", "macro_f1"):
        assert m[f"test_{name}_ci_low"] < m[f"test_{name}"] < m[f"test_{name}_ci_high"]
    assert m["test_ece"] == pytest.approx(calibration.expected_calibration_error(probs, labels))
    assert m["test_ece_calibrated"] == pytest.approx(
        calibration.expected_calibration_error(calibration.calibrate(probs, 1.7), labels))
    files = {p.name for p in tmp_path.iterdir()}
    assert {"test_classification_report.json", "test_roc.png", "test_confusion_matrix.png", "test_reliability.png",
            "test_predictions.csv", "test_gradcam_confusions.png"} <= files
    back = evaluation.read_predictions(tmp_path / "test_predictions.csv")
    assert back["classes"] == classes and (back["labels"] == labels).all()
    assert (back["predicted"] == probs.argmax(1)).all() and np.allclose(back["probs"], probs, atol=1e-6)
    assert back["digests"] == evaluation.image_digests(images) and len(set(back["digests"])) == 90
    plain = evaluation.metrics_and_artifacts(probs, labels, classes, tmp_path / "plain", "val")
    assert "val_ece_calibrated" not in plain and not (tmp_path / "plain" / "val_gradcam_confusions.png").exists()


def test_worst_confusions_orders_pairs_by_count_and_images_by_confidence():
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[0.1, 0.9, 0], [0.2, 0.8, 0], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05],
                      [0, 0, 1.0]])
    pairs = evaluation.worst_confusions(labels, probs)
    assert [pair[:3] for pair in pairs] == [(0, 1, 2), (0, 2, 1), (1, 0, 1)]
    assert pairs[0][3].tolist() == [0, 1]


@pytest.mark.parametrize("text, message", [
    ("index,label,predicted\n0,0,0\n", r"missing column\(s\) \['prob_\*'\]"),
    ("index,label,predicted,prob_a,prob_b\n0,0,0,0.5,0.5\n1,0,2,0.5,0.5\n", "row 1 predicted '2' is not a class index"),
    ("index,label,predicted,prob_a,prob_b\n0,x,0,0.5,0.5\n", "row 0 label 'x' is not a class index"),
    ("index,label,predicted,prob_a,prob_b\n1,0,0,0.5,0.5\n", "column index must count"),
])
def test_a_bad_predictions_file_is_named_with_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "test_predictions.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        evaluation.read_predictions(path)
    assert str(path) in str(e.value)


# --- cnnlab compare on real tracked runs ---------------------------------------------------------------------------

def test_check_same_images_refuses_other_datasets_and_classes():
    from cnnlab.tracking.compare import check_same_images

    base = {"run_id": "a", "dataset_digest": "d1", "classes": ["x", "y"], "labels": np.array([0, 1]),
            "digests": None}
    with pytest.raises(ValueError, match="different datasets"):
        check_same_images(base, {**base, "run_id": "b", "dataset_digest": "d2"})
    with pytest.raises(ValueError, match="different classes"):
        check_same_images(base, {**base, "run_id": "b", "classes": ["x", "z"]})
    with pytest.raises(ValueError, match="true label differs at 1 of 2 rows"):
        check_same_images(base, {**base, "run_id": "b", "labels": np.array([0, 0])})


def test_cnnlab_compare_two_tracked_runs(fmnist_dir, capsys):
    import mlflow

    from cnnlab.cli import main
    from cnnlab.tracking.experiments import make_config, run

    common = dict(epochs=1, limit=300, data_dir=str(fmnist_dir), log_model=False)
    cnn = run(make_config("fmnist_cnn", **common))
    mlp = run(make_config("fmnist_mlp", **common))  # same seed and limit: the same 75 test images
    other = run(make_config("fmnist_cnn", **common, seed=1))  # the limit draws other test images
    logged = mlflow.get_run(cnn["run_id"]).data.metrics
    assert logged["test_accuracy_ci_low"] <= cnn["test_accuracy"] <= logged["test_accuracy_ci_high"]
    assert "test_ece" in logged

    assert main(["compare", cnn["run_id"], mlp["run_id"], "--resamples", "500"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["n"] == 75 and result["method"] in ("exact", "chi2")
    assert result["accuracy_a"] == pytest.approx(cnn["test_accuracy"])
    assert result["accuracy_b"] == pytest.approx(mlp["test_accuracy"])
    assert result["difference"] == pytest.approx(mlp["test_accuracy"] - cnn["test_accuracy"])
    assert result["difference_ci_low"] <= result["difference"] <= result["difference_ci_high"]
    assert result["b_significantly_better"] == (result["difference"] > 0 and result["p_value"] < 0.05)
    assert "McNemar" in err

    assert main(["compare", cnn["run_id"], other["run_id"]]) == 2
    assert "image digest differs at" in capsys.readouterr().err
    assert main(["compare", cnn["run_id"], "0" * 32]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["compare", cnn["run_id"], mlp["run_id"], "--split", "train"]) == 2
    assert "has no evaluation/train_predictions.csv" in capsys.readouterr().err
    files = [a.path for a in mlflow.MlflowClient().list_artifacts(mlp["run_id"], "evaluation")]
    assert "evaluation/test_gradcam_confusions.png" in files  # drawn without heat maps: the MLP has no conv map
    assert Path(mlflow.artifacts.download_artifacts(run_id=cnn["run_id"],
                                                   artifact_path="evaluation/test_reliability.png")).stat().st_size
