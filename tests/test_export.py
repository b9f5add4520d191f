"""The served network in ONNX Runtime: fp32 parity with torch, int8 agreement on a trained model, the logged model's
files and default, the torch switch and the fallback when the runtime is missing or broken; the fer_mobile preset."""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from cnnlab.core import export, models, pipeline
from cnnlab.core.config import make_config
from cnnlab.core.preprocess import Classifier, Preprocess
from cnnlab.serving.model import CnnlabModel
from support import run_pipeline


@pytest.mark.parametrize("name, kwargs", [("face_mobile", {"width": 8, "se": True}), ("fer_cnn", {})])
def test_fp32_runtime_matches_torch(tmp_path, name, kwargs):
    torch.manual_seed(0)
    clf = Classifier(Preprocess(0.5, 0.25, 48), models.create(name, **kwargs)).eval()
    for m in clf.modules():  # BatchNorm statistics that are not the identity, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    pixels = torch.randint(0, 256, (7, 48, 48), dtype=torch.uint8)
    sess = export.session(export.to_onnx(clf, tmp_path / "m.onnx"), threads=1)
    with torch.inference_mode():
        want = clf(pixels).softmax(1).numpy()
    for batch in (1, 7):  # the batch dimension is dynamic
        got = export.softmax(export.run(sess, export.net_input(clf, pixels), batch))
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.fixture(scope="module")
def logged(tmp_path_factory, fmnist_dir):
    """A small trained fmnist_cnn (2,000 training images, 1 epoch, 500 test images) logged with its ONNX files,
    downloaded: (model folder, its test images)."""
    from cnnlab.tracking.experiments import run

    root = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = make_config("fmnist_cnn", data_dir=str(fmnist_dir), limit=2000, epochs=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        result = run(cfg)
        model = mlflow.search_logged_models(filter_string=f"source_run_id = '{result['run_id']}'",
                                            output_format="list")[0]
        folder = Path(mlflow.artifacts.download_artifacts(model.artifact_location, dst_path=str(root / "model")))
    test = pipeline.load_data(cfg)["test"]
    return folder, test.images.numpy()


def serve(folder: Path, monkeypatch, runtime: str = "auto", **env) -> CnnlabModel:
    monkeypatch.setenv("CNNLAB_SERVING_RUNTIME", runtime)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return mlflow.pyfunc.load_model(str(folder)).unwrap_python_model()


def probs(model: CnnlabModel, images: np.ndarray, **params) -> np.ndarray:
    rows = model.predict(None, images, params or None)
    return np.array([[r[c] for c in model.columns] for r in rows])


def test_logged_model_carries_onnx_and_serves_its_choice(logged, monkeypatch):
    folder, _ = logged
    files = {p.name for p in (folder / "artifacts").iterdir()}
    assert {"model.pt", "model_fp32.onnx", "model_int8.onnx", "runtime.json"} <= files
    choice = json.loads((folder / "artifacts" / "runtime.json").read_text())
    assert choice["default"] in ("onnx_int8", "onnx_fp32") and "validation" in choice["reason"]
    lost = choice["val_accuracy"]["fp32"] - choice["val_accuracy"]["int8"]
    assert (choice["default"] == "onnx_int8") == (lost <= export.INT8_TOLERANCE)
    model = serve(folder, monkeypatch, CNNLAB_SERVING_THREADS="1")
    assert model.runtime == choice["default"] and model.session.get_session_options().intra_op_num_threads == 1
    assert serve(folder, monkeypatch, "torch").session is None


def test_int8_labels_agree_with_fp32_on_500_test_images(logged, monkeypatch):
    folder, images = logged
    assert len(images) >= 500
    fp32 = probs(serve(folder, monkeypatch, "onnx_fp32"), images).argmax(1)
    int8 = probs(serve(folder, monkeypatch, "onnx_int8"), images).argmax(1)
    assert (fp32 == int8).mean() >= 0.99


def test_runtime_answers_as_torch_with_every_param(logged, monkeypatch):
    folder, images = logged
    torch_model = serve(folder, monkeypatch, "torch", CNNLAB_SERVING_PRECISION="fp32")
    onnx_model = serve(folder, monkeypatch, "onnx_fp32")
    assert onnx_model.runtime == "onnx_fp32"
    for params in ({}, {"tta": "tencrop"}, {"calibrated": False}):
        np.testing.assert_allclose(probs(onnx_model, images[:64], **params), probs(torch_model, images[:64], **params),
                                   atol=1e-4)
    explained = onnx_model.predict(None, images[:2], {"explain": True})  # Grad-CAM from the torch weights
    assert all(r["heatmap"].startswith("data:image/png;base64,") for r in explained)


def test_broken_or_missing_runtime_falls_back_to_torch_with_one_line(logged, monkeypatch, tmp_path, caplog):
    folder, images = logged
    broken = Path(shutil.copytree(folder, tmp_path / "broken"))
    (broken / "artifacts" / "model_int8.onnx").write_bytes(b"not an onnx file")
    want = probs(serve(folder, monkeypatch, "torch"), images[:32])
    with caplog.at_level(logging.WARNING, logger="cnnlab.serving.model"):
        model = serve(broken, monkeypatch, "onnx_int8")
    assert model.runtime == "torch" and model.session is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == "cnnlab.serving.model"]
    assert "ONNX Runtime (onnx_int8) unavailable, serving with torch" in line
    np.testing.assert_allclose(probs(model, images[:32]), want, atol=1e-6)
    caplog.clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: importing it fails
    with caplog.at_level(logging.WARNING, logger="cnnlab.serving.model"):
        assert serve(folder, monkeypatch).runtime == "torch"
    assert "ModuleNotFoundError" in caplog.records[-1].getMessage()


def test_unknown_runtime_is_refused(logged, monkeypatch):
    with pytest.raises(Exception, match="CNNLAB_SERVING_RUNTIME must be one of .*got 'tensorrt'"):
        serve(logged[0], monkeypatch, "tensorrt")


def test_fer_mobile_preset_trains_and_exports(fer_subset, tmp_path):
    cfg = make_config("fer_mobile", data_dir=str(fer_subset), epochs=1, tta="flip")
    trained = run_pipeline(cfg, tmp_path)
    assert trained.spec == {"name": "face_mobile", "num_classes": 7, "in_chans": 1, "dropout": 0.2, "width": 32,
                            "expand": 1, "se": False}
    assert len(trained.history) == 1 and 0 <= trained.metrics["test_tta_accuracy"] <= 1
    assert "test_accuracy_raw" in trained.metrics  # EMA: the averaged weights are served, the trained ones measured
    val = trained.splits["val"]
    files = export.export(trained.model, tmp_path / "onnx", trained.splits["train"].images, (val.images, val.labels))
    choice = json.loads(Path(files["runtime"]).read_text())
    assert set(choice["val_accuracy"]) == {"fp32", "int8"} and choice["default"] in files
