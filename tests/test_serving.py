"""The fer_cnn champion behind MLflow's own REST server and behind `cnnlab serve`: real FER2013 images in, the same
answers as in process; client mistakes get a 4xx and the server keeps serving, within bounded memory."""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch

from cnnlab.tracking import registry
from cnnlab.serving import model as serving
from cnnlab.core.data.fer2013 import decode_gray
from cnnlab.tracking.experiments import make_config, run
from cnnlab.core.calibration import calibrate
from cnnlab.serving.model import CnnlabModel, InputError
from cnnlab.serving.verify import MODEL_CODE, UntrustedModel, load_model, verify_model

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "serving" / "samples"
sys.path.insert(0, str(REPO / "serving"))
sys.path.insert(0, str(REPO / "benchmarks"))
from servers import ModelServer, status_kb  # noqa: E402 - benchmarks/servers.py
import client  # serving/client.py, the CLI under test
from payload import Payload  # tests/payload.py
from support import served_model

JSON = "application/json"
services = pytest.mark.services  # a real `mlflow models serve` or `cnnlab serve`


@dataclass
class Trained:
    root: Path
    tracking_uri: str
    uri: str  # models:/fer_cnn@champion
    model: mlflow.pyfunc.PyFuncModel  # the registered version, loaded in process
    bundle: Path  # its trained Classifier, as saved by training
    files: list[Path]  # real FER2013 test JPEGs


@dataclass
class Served:
    kind: str  # "mlflow": `mlflow models serve`; "cnnlab": `cnnlab serve`
    server: ModelServer
    trained: Trained

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def model(self) -> mlflow.pyfunc.PyFuncModel:
        return self.trained.model

    @property
    def files(self) -> list[Path]:
        return self.trained.files

    def post(self, body) -> requests.Response:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        return requests.post(self.url + "/invocations", data=data, headers={"Content-Type": JSON}, timeout=120)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def frame(values: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image": values})


def split(values: list) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


def png(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".png", pixels)[1].tobytes()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fer_subset) -> Trained:
    """A tiny fer_cnn, trained and registered (champion) in its own store."""
    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        run(make_config("fer_cnn", data_dir=str(fer_subset), limit=200, epochs=1))
        assert registry.register("fer_cnn")["alias"] == "champion"
        model = mlflow.pyfunc.load_model("models:/fer_cnn@champion")
        local = Path(mlflow.artifacts.download_artifacts("models:/fer_cnn@champion", dst_path=str(root / "model")))
    files = sorted(fer_subset.glob("test/*/*.jpg"))[::5]
    return Trained(root, uri, "models:/fer_cnn@champion", model, local / "artifacts" / "model.pt", files)


def start(trained: Trained, name: str, guarded: bool, workers: int = 1, **env) -> ModelServer:
    # as many torch threads as this process: the same kernels, so the same numbers to the last bit
    threads = str(torch.get_num_threads())
    server = ModelServer(trained.root / name, trained.uri, trained.tracking_uri, guarded=guarded, workers=workers,
                         env={"OMP_NUM_THREADS": threads, "CNNLAB_SERVING_THREADS": threads, **env})
    return server.start(timeout=240)


@pytest.fixture(scope="module", params=["mlflow", "cnnlab"])
def served(request, trained) -> Served:
    """The champion on a free loopback port: `mlflow models serve`, then `cnnlab serve`."""
    server = start(trained, request.param, guarded=request.param == "cnnlab")
    try:
        yield Served(request.param, server, trained)
    finally:
        server.stop()


def assert_same(answer: list[dict], expected: list[dict], atol: float = 1e-6) -> None:
    got, want = pd.DataFrame(answer), pd.DataFrame(expected)
    assert list(got.columns) == list(want.columns)
    assert got["label"].tolist() == want["label"].tolist()
    assert got["class_index"].tolist() == want["class_index"].tolist()
    probs = [c for c in want.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[probs].to_numpy(), want[probs].to_numpy(), atol=atol)
    np.testing.assert_allclose(got[probs].sum(axis=1), 1.0, atol=1e-4)


@services
def test_base64_fer_images_match_in_process(served):
    images = [b64(f.read_bytes()) for f in served.files]
    expected = served.model.predict(frame(images))
    assert len(expected) == len(images) and {"prob_happy", "prob_neutral"} <= set(expected[0])
    r = served.post(split(images))
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], expected)
    r = served.post({"dataframe_records": [{"image": v} for v in images]})
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], expected)


def test_decoded_exactly_as_in_training(trained, fer_subset, monkeypatch):
    """fp32 serving of the test JPEGs == the trained Classifier on the training loader's own pixels."""
    from cnnlab.core.data import fer2013
    from cnnlab.core.models import from_bundle
    from cnnlab.core.training import predict

    files = sorted(fer_subset.glob("test/*/*.jpg"))  # the loader's order: class folders, then file names
    _, test = fer2013.load(str(fer_subset))
    data = torch.load(trained.bundle, weights_only=True)
    expected = predict(from_bundle(data), test.images, precision="fp32")
    monkeypatch.setenv("CNNLAB_SERVING_PRECISION", "fp32")
    model = CnnlabModel.from_bundle_file(trained.bundle)
    got = model.predict(None, frame([b64(f.read_bytes()) for f in files]), params={"calibrated": False})
    np.testing.assert_allclose(pd.DataFrame(got).filter(like="prob_").to_numpy(), expected.numpy(), atol=1e-6)
    # by default the temperature fitted on validation is applied: the same ranking, other confidences
    assert data["temperature"] > 0 and abs(data["temperature"] - 1) > 1e-3
    calibrated = model.predict(None, frame([b64(f.read_bytes()) for f in files]))
    np.testing.assert_allclose(pd.DataFrame(calibrated).filter(like="prob_").to_numpy(),
                               calibrate(expected.numpy(), data["temperature"]), atol=1e-5)
    assert [r["label"] for r in calibrated] == [r["label"] for r in got]
    monkeypatch.setenv("CNNLAB_SERVING_PRECISION", "bf16")  # the default on CPUs with AMX: close, not equal
    got = CnnlabModel.from_bundle_file(trained.bundle).predict(None, test.images.numpy(), params={"calibrated": False})
    np.testing.assert_allclose(pd.DataFrame(got).filter(like="prob_").to_numpy(), expected.numpy(), atol=2e-2)


def test_tta_and_explain_params(trained, fer_subset, monkeypatch):
    """params.tta averages the views as evaluation does; params.explain adds a Grad-CAM PNG of each image's size."""
    from support import tta_probabilities
    from cnnlab.core.data import fer2013
    from cnnlab.core.models import from_bundle

    monkeypatch.setenv("CNNLAB_SERVING_PRECISION", "fp32")
    _, test = fer2013.load(str(fer_subset))
    images = test.images[:6]
    model = CnnlabModel.from_bundle_file(trained.bundle)
    with torch.inference_mode():
        want = tta_probabilities(from_bundle(torch.load(trained.bundle, weights_only=True)), images, "tencrop")
    got = model.predict(None, images.numpy(), params={"tta": "tencrop", "calibrated": False})
    np.testing.assert_allclose(pd.DataFrame(got).filter(like="prob_").to_numpy(), want.numpy(), atol=1e-5)
    plain = model.predict(None, images.numpy(), params={"calibrated": False})
    assert np.abs(pd.DataFrame(plain).filter(like="prob_").to_numpy() - want.numpy()).max() > 1e-4

    explained = model.predict(None, images.numpy(), params={"explain": True})
    assert [r["label"] for r in explained] == [r["label"] for r in model.predict(None, images.numpy())]
    for row in explained:
        assert row["heatmap"].startswith("data:image/png;base64,")
        heat = cv2.imdecode(np.frombuffer(base64.b64decode(row["heatmap"].split(",", 1)[1]), np.uint8), 0)
        assert heat.shape == (48, 48) and heat.max() > 0
    assert "heatmap" not in plain[0]
    for params, message in (({"tta": "fivecrop"}, "params.tta must be one of"), ({"explain": "yes"}, "params.explain"),
                            ({"colour": True}, "unknown params"), ({"calibrated": 1}, "params.calibrated")):
        with pytest.raises(InputError, match=message):
            model.predict(None, images.numpy(), params=params)


def test_explain_unavailable_is_a_client_error():
    """A net without a convolutional feature map (the MLP) cannot be explained: a 400 naming why, not a 500."""
    from cnnlab.core.models import create
    from cnnlab.core.preprocess import Classifier, Preprocess

    clf = Classifier(Preprocess(0.5, 0.25, 28), create("mlp", num_classes=3)).eval()
    model = served_model(clf, ["a", "b", "c"])
    pixels = np.zeros((2, 28, 28), np.uint8)
    assert len(model.predict(None, pixels)) == 2
    with pytest.raises(InputError, match="params.explain: .*no convolutional feature map"):
        model.predict(None, pixels, params={"explain": True})


def test_chunks_and_sizes_keep_row_order(trained, monkeypatch):
    """Images of mixed sizes over many small chunks: the same answers, in input order, as one image at a time."""
    model = CnnlabModel.from_bundle_file(trained.bundle)
    gray = [decode_gray(f.read_bytes(), str(f)) for f in trained.files]
    images = [cv2.resize(img, (48 + 16 * (i % 3), 48 + 8 * (i % 2))) for i, img in enumerate(gray)]
    singles = [model.predict(None, frame([b64(png(img))]))[0] for img in images]
    monkeypatch.setattr(serving, "CHUNK_PIXELS", 3 * 48 * 48)
    assert_same(model.predict(None, frame([b64(png(img)) for img in images])), singles)
    assert len(serving.runs([48 * 48] * 10, 3 * 48 * 48)) == 4
    assert serving.runs([10, 10 ** 6, 10], 100) == [[0], [1], [2]]  # a large image is a chunk alone


@services
def test_pixel_tensors_match_the_decoded_images(served):
    images = [b64(f.read_bytes()) for f in served.files]
    expected = served.model.predict(frame(images))
    pixels = np.stack([decode_gray(f.read_bytes(), str(f)) for f in served.files])  # the training decode
    for body in ({"inputs": pixels.tolist()}, {"inputs": pixels[:, None].tolist()}, {"instances": pixels.tolist()}):
        r = served.post(body)
        assert r.status_code == 200, r.text
        assert_same(r.json()["predictions"], expected)
    r = served.post({"inputs": (pixels / 255.0).tolist()})
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], served.model.predict(pixels.astype(np.float32) / 255), atol=1e-5)


@services
def test_any_format_size_and_color(served):
    gray = decode_gray(served.files[0].read_bytes(), "sample")
    color = cv2.resize(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), (160, 120))
    color[..., 2] = 255 - color[..., 2]  # really colored
    images = [b64(png(gray)), b64(cv2.imencode(".bmp", gray)[1].tobytes()),
              b64(cv2.imencode(".jpg", color)[1].tobytes()), b64(png(color))]
    expected = served.model.predict(frame(images))
    r = served.post(split(images))
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], expected)
    # PNG and BMP of the same pixels are the same image; MIME line breaks and data URLs are fine
    assert_same(r.json()["predictions"][1:2], expected[:1])
    wrapped = base64.encodebytes(served.files[0].read_bytes()).decode()
    r = served.post(split([wrapped, "data:image/jpeg;base64," + b64(served.files[0].read_bytes())]))
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], served.model.predict(frame([b64(served.files[0].read_bytes())] * 2)))


def big_bmp() -> bytes:
    """A real, valid image over 10 MB (but within 4096x4096)."""
    return cv2.imencode(".bmp", np.random.default_rng(0).integers(0, 256, (1900, 1900, 3), dtype=np.uint8))[1].tobytes()


BLANK = png(np.zeros((4096, 4096), np.uint8))  # the largest image allowed: 23 KB encoded, 16 MB decoded

BAD = {
    "invalid base64": (split(["not base64 at all!"]), "row 0: invalid base64"),
    "not an image": (split([b64(b"GIF89a but really just text")]), "row 0: not a PNG, JPEG or BMP image"),
    "truncated image": (split([b64((SAMPLES / "happy.jpg").read_bytes()[:1000])]), "row 0: not a decodable image"),
    "empty body": ("", "valid JSON"),
    "empty request": ({}, "exactly one of the input fields"),
    "no rows": (split([]), "empty request: no images"),
    "empty tensor": ({"inputs": []}, "empty request"),
    "wrong column": ({"dataframe_split": {"columns": ["img"], "data": [["x"]]}}, "expected a column 'image'"),
    "null image": (split([None]), "row 0: expected a base64-encoded image string, got NoneType"),
    "tensor rank 2": ({"inputs": [[0, 1, 2], [3, 4, 5]]}, "shape (N, H, W) or (N, 1, H, W), got (2, 3)"),
    "tensor 3 channels": ({"inputs": np.zeros((1, 3, 4, 4), int).tolist()}, "got (1, 3, 4, 4)"),
    "tensor ragged": ({"inputs": [[[1, 2], [3]]]}, "inhomogeneous"),
    "tensor strings": ({"inputs": [[["a", "b"]]]}, "pixel dtype must be"),
    "tensor over 255": ({"inputs": [[[0, 256]]]}, "integer pixels must be within 0..255, got 0..256"),
    "tensor float over 1": ({"inputs": [[[0.0, 12.5]]]}, "float pixels must be finite and within 0..1"),
    "tensor too wide": ({"inputs": np.zeros((1, 1, 4097), np.uint8).tolist()}, "the limit is 4096x4096"),
    "tensor too many rows": ({"inputs": np.zeros((1025, 1, 1), np.uint8).tolist()},
                             "request has 1025 rows; the limit is 1024 per request (CNNLAB_SERVING_MAX_ROWS)"),
    "too many images": (split(["x"] * 1025), "request has 1025 rows; the limit is 1024"),
    "image too wide": (split([b64(png(np.zeros((8, 4097), np.uint8)))]),
                       "row 0: image is 4097x8 pixels; the limit is 4096x4096"),
    "image over 10 MB": (split([b64(big_bmp())]), "bytes; the limit is 10,485,760 bytes"),
    "pixels over budget": (split([b64(BLANK)] * 5), "request's 5 images decode to 83,886,080 pixels; the limit is "
                                                    "67,108,864 per request (CNNLAB_SERVING_MAX_PIXELS)"),
    "bad parameter": ({**split([b64((SAMPLES / "happy.jpg").read_bytes())]), "params": {"detect_faces": "maybe"}},
                      "detect_faces"),
}


@services
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_4xx_naming_it_and_server_keeps_serving(served, case):
    body, fragment = BAD[case]
    r = served.post(body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert fragment in r.json()["message"], r.json()["message"][-500:]
    good = [b64(served.files[0].read_bytes())]
    r = served.post(split(good))
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], served.model.predict(frame(good)))


def test_bad_input_in_process_is_input_error(trained, monkeypatch):
    with pytest.raises(InputError, match="row 1: invalid base64"):
        trained.model.predict(frame([b64(trained.files[0].read_bytes()), "%%%"]))
    with pytest.raises(InputError, match="pixel dtype"):
        trained.model.predict(np.zeros((1, 4, 4), bool))
    monkeypatch.setenv("CNNLAB_SERVING_MAX_PIXELS", str(100 * 48 * 48))
    model = CnnlabModel.from_bundle_file(trained.bundle)
    with pytest.raises(InputError, match=r"pixel tensor of shape \(101, 48, 48\) holds 232,704 pixels; the limit "
                                         r"is 230,400 per request \(CNNLAB_SERVING_MAX_PIXELS\)"):
        model.predict(None, np.zeros((101, 48, 48), np.uint8))
    assert len(model.predict(None, np.zeros((100, 48, 48), np.uint8))) == 100
    monkeypatch.setenv("CNNLAB_SERVING_MAX_ROWS", "many")
    with pytest.raises(ValueError, match="CNNLAB_SERVING_MAX_ROWS must be a whole number >= 1, got 'many'"):
        CnnlabModel.from_bundle_file(trained.bundle)


def test_bundle_loads_without_running_code(trained, tmp_path):
    """weights_only: a model version whose bundle carries a pickled callable is refused, and the callable never runs."""
    data = torch.load(trained.bundle, weights_only=True)
    marker = tmp_path / "ran"
    data["spec"]["payload"] = Payload(str(marker))
    torch.save(data, tmp_path / "model.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        CnnlabModel.from_bundle_file(tmp_path / "model.pt")
    assert not marker.exists()


def test_registered_model_holds_no_pickle_and_predicts_as_the_pickled_one(trained, tmp_path, monkeypatch):
    """Models-from-code: no python_model.pkl, a model.pt that loads as weights only, the same answers as the same
    bundle logged the old way (a pickled CnnlabModel), which cnnlab now refuses to load, saying how to log it again."""
    monkeypatch.setenv("CNNLAB_SERVING_RUNTIME", "torch")  # the old way logged no ONNX files: compare torch with torch
    folder = trained.bundle.parents[1]
    assert not list(folder.rglob("*.pkl")) and (folder / "model_code.py").read_bytes() == MODEL_CODE.read_bytes()
    verify_model(folder)
    images = frame([b64(f.read_bytes()) for f in trained.files])
    answers = load_model(str(folder)).predict(images)
    classes = torch.load(trained.bundle, weights_only=True)["classes"]
    assert [k for k in answers[0] if k.startswith("prob_")] == [f"prob_{c}" for c in classes]
    mlflow.set_experiment("logged_the_old_way")
    with mlflow.start_run():
        old = mlflow.pyfunc.log_model(name="old", python_model=CnnlabModel(), artifacts={"bundle": str(trained.bundle)},
                                      code_paths=[serving.package_copy(tmp_path / "code")])
    old_folder = Path(mlflow.artifacts.download_artifacts(old.model_uri, dst_path=str(tmp_path / "old")))
    assert (old_folder / "python_model.pkl").exists()
    assert mlflow.pyfunc.load_model(str(old_folder)).predict(images) == answers
    with pytest.raises(UntrustedModel, match=r"model file python_model.pkl .* log it again with this cnnlab: "
                                             r"`cnnlab ensemble RUN_ID`.*--trust-model-code"):
        load_model(old.model_uri)
    assert load_model(old.model_uri, trust_model_code=True).predict(images) == answers


def test_a_model_logged_before_models_from_code_is_refused(tmp_path):
    """The vgg_bn of tests/fixtures (logged by an older cnnlab, with python_model.pkl) is refused, saying how to log it
    again; tests/test_layout.py shows MLflow itself still loads it."""
    with tarfile.open(REPO / "tests" / "fixtures" / "model_before_move.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    with pytest.raises(UntrustedModel, match=r"model file python_model.pkl \(in .*/model\): a pickled Python object"):
        verify_model(tmp_path / "model")


TAMPERED = {  # the file named in the refusal -> how a model version's writer changed a copy of the champion
    "model_code.py": lambda d: (d / "model_code.py").write_text((d / "model_code.py").read_text() + "# changed\n"),
    "code/helpers.py": lambda d: (d / "code" / "helpers.py").write_text("import os\n"),
    "python_model.pkl": lambda d: (d / "python_model.pkl").write_bytes(cloudpickle.dumps(CnnlabModel())),
}


@services
def test_cnnlab_serve_refuses_a_tampered_model_unless_trusted(trained, monkeypatch, capsys):
    """Each tampered copy, registered as a new version, is refused by `cnnlab serve` naming the file; the changed model
    file, served with --trust-model-code, answers as the champion."""
    from cnnlab import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.tracking_uri)
    mlflow.set_tracking_uri(trained.tracking_uri)
    client = mlflow.MlflowClient()
    client.create_registered_model("tampered")
    for name, tamper in TAMPERED.items():
        copy = trained.root / "tampered" / name.replace("/", "_")
        shutil.copytree(trained.bundle.parents[1], copy)
        tamper(copy)
        version = client.create_model_version("tampered", str(copy)).version
        assert cli.main(["serve", f"models:/tampered/{version}", "-p", "1"]) == 2
        err = capsys.readouterr().err
        assert f"model file {name} (in " in err and "--trust-model-code" in err, err
    server = ModelServer(trained.root / "trusted", "models:/tampered/1", trained.tracking_uri, guarded=True,
                         trust_model_code=True, env={"OMP_NUM_THREADS": str(torch.get_num_threads()),
                                                     "CNNLAB_SERVING_THREADS": str(torch.get_num_threads())})
    try:
        server.start(timeout=240)
        images = [b64(f.read_bytes()) for f in trained.files[:4]]
        r = requests.post(server.url + "/invocations", json=split(images), timeout=120)
        assert r.status_code == 200, r.text
        assert_same(r.json()["predictions"], trained.model.predict(frame(images)))
    finally:
        server.stop()


@services
def test_detect_faces(served):
    photo = (SAMPLES / "two_faces.jpg").read_bytes()
    r = served.post({**split([b64(photo)]), "params": {"detect_faces": True}})
    assert r.status_code == 200, r.text
    [row] = r.json()["predictions"]
    assert row["faces"] == 2 and len(row["detections"]) == 2 and row["message"] == "2 face(s) found"
    gray = decode_gray(photo, "two_faces.jpg")
    for d, (x0, y0) in zip(row["detections"], [(60, 90), (380, 110)]):  # where the 192 px faces were pasted
        x, y, w, h = (d["box"][k] for k in "xywh")
        assert abs(x - x0) < 40 and abs(y - y0) < 40 and 150 < w < 250 and w == h
        crop = served.model.predict(gray[None, y: y + h, x: x + w])
        assert_same([{k: v for k, v in d.items() if k != "box"}], crop)
    in_process = served.model.predict(frame([b64(photo)]), params={"detect_faces": True})
    assert in_process[0]["detections"] == row["detections"]

    r = served.post({**split([b64(photo)]), "params": {"detect_faces": True, "explain": True, "tta": "flip"}})
    assert r.status_code == 200, r.text  # the signature lists every param: MLflow passes them on
    assert all(d["heatmap"].startswith("data:image/png;base64,") for d in r.json()["predictions"][0]["detections"])

    no_face = np.full((240, 320, 3), 180, np.uint8)
    r = served.post({**split([b64(cv2.imencode(".jpg", no_face)[1].tobytes())]), "params": {"detect_faces": True}})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == [{"image": 0, "faces": 0, "detections": [], "message": "no face found"}]


def test_faces_from_many_threads_at_once(trained):
    """One face detector per thread: concurrent requests get what one request alone gets."""
    photo = frame([b64((SAMPLES / "two_faces.jpg").read_bytes())])
    alone = trained.model.predict(photo, params={"detect_faces": True})
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: trained.model.predict(photo, params={"detect_faces": True}), range(24)))
    assert all(a == alone for a in answers)


def test_color_model_decodes_rgb(tmp_path):
    """A model trained on RGB images (bundle key image_channels=3) gets channel-first RGB, as its training had."""
    from cnnlab.core.models import create
    from cnnlab.core.preprocess import Classifier, Preprocess

    torch.manual_seed(0)
    clf = Classifier(Preprocess(0.5, 0.25, 48, channels=3), create("fer_cnn", num_classes=7, in_chans=3)).eval()
    classes = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    model = served_model(clf, classes, image_channels=3)
    bgr = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    rgb = bgr[..., ::-1].transpose(2, 0, 1)  # what the model must see: RGB, channel first
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    with torch.inference_mode():
        want = clf.probabilities(clf(torch.from_numpy(np.stack([rgb, np.stack([gray] * 3)])))).numpy()
    got = model.predict(None, frame([b64(png(bgr)), b64(png(gray))]))
    np.testing.assert_allclose(pd.DataFrame(got).filter(like="prob_").to_numpy(), want, atol=1e-5)
    tensor = model.predict(None, np.stack([rgb]))
    np.testing.assert_allclose(pd.DataFrame(tensor).filter(like="prob_").to_numpy(), want[:1], atol=1e-5)
    with pytest.raises(InputError, match=r"shape \(N, 3, H, W\), got \(1, 40, 56\)"):
        model.predict(None, gray[None])
    assert serving.decode(png(bgr), "x", 3).shape == (3, 40, 56)
    assert (serving.decode(cv2.imencode(".png", np.dstack([bgr, bgr[..., :1]]))[1].tobytes(), "x", 3) == rgb).all()


@pytest.mark.slow
def test_loading_a_model_keeps_the_installed_package(trained, tmp_path):
    """A logged model carries a copy of cnnlab (code_paths) that MLflow puts first on sys.path; loading it in process
    must keep the installed cnnlab, in this process and in workers it spawns; where cnnlab is not installed the
    copy serves."""
    script = tmp_path / "load.py"
    script.write_text(f"""
import json, multiprocessing, sys
from pathlib import Path
WHERE = "str(__import__('importlib.util').util.find_spec('cnnlab').submodule_search_locations[0])"
if __name__ == "__main__":
    if sys.argv[1] == "without-cnnlab":  # an environment where cnnlab is not installed
        sys.path = [p for p in sys.path if not (Path(p or ".") / "cnnlab" / "__init__.py").exists()]
    import mlflow
    model = mlflow.pyfunc.load_model({trained.uri!r})
    import cnnlab.serving.model
    answer = model.predict({{"image": [{b64(trained.files[0].read_bytes())!r}]}})
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a worker inherits this sys.path
        child = pool.apply(eval, (WHERE,))
    print(json.dumps({{"here": str(Path(cnnlab.serving.model.__file__).parents[1]), "child": child,
                      "label": answer[0]["label"]}}))
""")
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.tracking_uri}
    out = {}
    for mode in ("installed", "without-cnnlab"):
        proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = str(Path(serving.__file__).resolve().parents[1])
    assert out["installed"]["here"] == out["installed"]["child"] == installed
    copy = out["without-cnnlab"]["here"]
    assert copy.endswith("/artifacts/code/cnnlab") and out["without-cnnlab"]["child"] == copy
    expected = trained.model.predict(frame([b64(trained.files[0].read_bytes())]))[0]["label"]
    assert out["installed"]["label"] == out["without-cnnlab"]["label"] == expected


@services
def test_client_cli(served, capsys):
    files = [SAMPLES / "happy.jpg", SAMPLES / "sad.jpg"]
    assert client.main([served.url, *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = served.model.predict(frame([b64(f.read_bytes()) for f in files]))
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == [e["label"] for e in expected]
    assert client.main([served.url, str(SAMPLES / "two_faces.jpg"), "--detect-faces"]) == 0
    assert "2 face(s) found" in capsys.readouterr().out
    assert client.main([served.url, str(REPO / "serving" / "README.md")]) == 1
    assert "not a PNG, JPEG or BMP image" in capsys.readouterr().err


# --- a seeded campaign of malformed requests ---------------------------------------------------------------------

def nested(depth: int, rng) -> str:
    return "[" * depth + "0" + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "0" + "}" * depth


def header_png(width: int, height: int, rng) -> bytes:
    """A PNG signature and header claiming width x height, then noise."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + rng.bytes(int(rng.integers(4, 400)))


def header_jpeg(width: int, height: int, rng) -> bytes:
    return b"\xff\xd8\xff\xc0\x00\x0b\x08" + struct.pack(">HH", height, width) + b"\x01\x01\x11\x00" + rng.bytes(64)


def header_bmp(width: int, height: int, rng) -> bytes:
    return b"BM" + struct.pack("<IHHIIiiHH", 1000, 0, 0, 54, 40, width, height, 1, 24) + rng.bytes(200)


def huge_side(rng) -> int:
    return int(rng.integers(4097, 2 ** 31 - 1))


def random_text(rng, n: int) -> str:
    return "".join(map(chr, rng.integers(32, 127, n)))


SAMPLE = (SAMPLES / "happy.jpg").read_bytes()
GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
       b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")  # a 1x1 image
OTHER_FORMATS = [GIF] + [cv2.imencode(ext, np.zeros((8, 8, 3), np.uint8))[1].tobytes() for ext in (".tiff", ".webp")]
KINDS = {  # name -> rng -> (body, Content-Type); each one a client mistake
    "invalid base64": lambda rng: (split([random_text(rng, int(rng.integers(1, 300))) + "!"]), JSON),
    "base64 of noise": lambda rng: (split([b64(b"\x00" + rng.bytes(int(rng.integers(1, 3000))))]), JSON),
    "truncated JPEG": lambda rng: (split([b64(SAMPLE[: int(rng.integers(3, len(SAMPLE) - 1))])]), JSON),
    "PNG header over 4096": lambda rng: (split([b64(header_png(huge_side(rng), huge_side(rng), rng))]), JSON),
    "JPEG header over 4096": lambda rng: (split([b64(header_jpeg(int(rng.integers(4097, 65536)), 8, rng))]), JSON),
    "BMP header over 4096": lambda rng: (split([b64(header_bmp(8, huge_side(rng), rng))]), JSON),
    "BMP negative width": lambda rng: (split([b64(header_bmp(-int(rng.integers(1, 100)), 8, rng))]), JSON),
    "zero-size PNG": lambda rng: (split([b64(header_png(0, 0, rng))]), JSON),
    "pixels over budget": lambda rng: (split([b64(BLANK)] * int(rng.integers(5, 40))), JSON),
    "too many rows": lambda rng: (split(["x"] * int(rng.integers(1025, 5000))), JSON),
    "deep nesting": lambda rng: (f'{{"inputs": {nested(int(rng.integers(5000, 100000)), rng)}}}', JSON),
    "nesting over 32": lambda rng: (f'{{"inputs": {nested(int(rng.integers(33, 600)), rng)}}}', JSON),
    "integer of 5000+ digits": lambda rng: (f'{{"inputs": [[[{"9" * int(rng.integers(5000, 20000))}]]]}}', JSON),
    "invalid UTF-8": lambda rng: (b'{"inputs": "' + bytes(rng.integers(0x80, 0xC0, 8, dtype=np.uint8)) + b'"}', JSON),
    "not JSON": lambda rng: (random_text(rng, int(rng.integers(1, 500))), JSON),
    "JSON scalar or list": lambda rng: (["0", '"image"', "null", "true", "[]", "[{}]"][rng.integers(6)], JSON),
    "empty body": lambda rng: ("", JSON),
    "no Content-Type": lambda rng: (split([b64(SAMPLE)]), None),
    "wrong Content-Type": lambda rng: (split([b64(SAMPLE)]),
                                       ["text/plain", "image/png", "application/xml", "multipart/form-data"][
                                           rng.integers(4)]),
    "charset not UTF-8": lambda rng: (split([b64(SAMPLE)]), "application/json; charset=latin-1"),
    "unknown Content-Type parameter": lambda rng: (split([b64(SAMPLE)]), "application/json; format=pandas-split"),
    "unknown input field": lambda rng: ({"images": [b64(SAMPLE)]}, JSON),
    "chat-style body": lambda rng: ({["messages", "prompt", "input"][rng.integers(3)]: random_text(rng, 20)}, JSON),
    "two input fields": lambda rng: ({"inputs": [[[0]]], "instances": [[[0]]]}, JSON),
    "split not an object": lambda rng: ({"dataframe_split": [[b64(SAMPLE)]]}, JSON),
    "split columns mismatch": lambda rng: ({"dataframe_split": {"columns": ["image"], "data": [["a", "b"]]}}, JSON),
    "records not a list": lambda rng: ({"dataframe_records": {"image": b64(SAMPLE)}}, JSON),
    "wrong column": lambda rng: ({"dataframe_split": {"columns": ["img"], "data": [[b64(SAMPLE)]]}}, JSON),
    "image not a string": lambda rng: (split([[None, 1, 2.5, True, [1, 2], {"a": 1}][rng.integers(6)]]), JSON),
    "no rows": lambda rng: (split([]), JSON),
    "tensor of wrong rank": lambda rng: ({"inputs": np.zeros((2,) * [1, 2, 5][rng.integers(3)], int).tolist()},
                                         JSON),
    "tensor with 3 channels": lambda rng: ({"inputs": np.zeros((1, 3, 4, 4), int).tolist()}, JSON),
    "ragged tensor": lambda rng: ({"inputs": [[[1, 2], [3]]]}, JSON),
    "tensor of strings": lambda rng: ({"inputs": [[[random_text(rng, 3)]]]}, JSON),
    "tensor of booleans": lambda rng: ({"inputs": [[[True, False]]]}, JSON),
    "integer pixels out of range": lambda rng: ({"inputs": [[[int(rng.choice([-1, 256, 10 ** 6]))]]]}, JSON),
    "float pixels out of range": lambda rng: ({"inputs": [[[float(rng.choice([-0.5, 1.5, 1e300]))]]]}, JSON),
    "NaN or Infinity pixels": lambda rng: ('{"inputs": [[[0.5, %s]]]}' % ["NaN", "Infinity", "-Infinity"][
        rng.integers(3)], JSON),
    "tensor over 4096 wide": lambda rng: ({"inputs": np.zeros((1, 1, 4097), int).tolist()}, JSON),
    "tensor of too many rows": lambda rng: ({"inputs": np.zeros((int(rng.integers(1025, 3000)), 1, 1), int).tolist()},
                                            JSON),
    "empty tensor": lambda rng: ({"inputs": [[], [[]], [[[]]]][rng.integers(3)]}, JSON),
    "params not an object": lambda rng: ({**split([b64(SAMPLE)]), "params": ["x", [1], 5][rng.integers(3)]}, JSON),
    "detect_faces not a boolean": lambda rng: ({**split([b64(SAMPLE)]), "params": {"detect_faces": ["maybe", 3, [1]][
        rng.integers(3)]}}, JSON),
    "GIF, TIFF or WebP": lambda rng: (split([b64(OTHER_FORMATS[rng.integers(3)])]), JSON),
    "16-bit PNG": lambda rng: (split([b64(png(np.full((8, 8), 1000, np.uint16)))]), JSON),
    "bad data URL": lambda rng: (split(["data:image/png;base64," + random_text(rng, 20) + "%"]), JSON),
    "unpaired surrogate": lambda rng: ('{"dataframe_split": {"columns": ["image"], "data": [["\\ud800abc"]]}}', JSON),
    "CSV that does not parse": lambda rng: ('image\n"x\n' + random_text(rng, 50), "text/csv"),
    "CSV without an image column": lambda rng: ("a,b\n1,2\n", "text/csv"),
    "unknown path": lambda rng: (split([b64(SAMPLE)]), JSON, "/predict"),
}
# MLflow's own parser fails these before any model code runs: HTTP 500 under `mlflow models serve` (documented in
# serving/README.md); `cnnlab serve` answers them with a 4xx
MLFLOW_500 = {"deep nesting", "integer of 5000+ digits", "no Content-Type"}
MLFLOW_TRACEBACK = {"CSV that does not parse"}  # MLflow puts the stack trace in this 400's body


@services
def test_bad_input_campaign(served):
    """1,000+ seeded malformed requests of many kinds: each gets a 4xx without a stack trace, the server stays up and
    answers a valid request as before."""
    good = split([b64(f.read_bytes()) for f in served.files[:3]])
    before = served.post(good).json()
    rng, seen, wrong = np.random.default_rng(12), {}, []
    session = requests.Session()
    for i in range(1050):
        name = list(KINDS)[i % len(KINDS)]
        body, content_type, *path = KINDS[name](rng)
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else str.encode(body) \
            if isinstance(body, str) else body
        r = session.post(served.url + (path[0] if path else "/invocations"), data=data, timeout=120,
                         headers={"Content-Type": content_type} if content_type else {})
        expected_500 = served.kind == "mlflow" and name in MLFLOW_500
        ok = r.status_code == 500 if expected_500 else 400 <= r.status_code < 500
        if r.status_code >= 500:  # the server drops the connection after a 500
            session = requests.Session()
        traced = "Traceback" in r.text or "stack_trace" in r.text
        if not ok or (traced and not (served.kind == "mlflow" and name in MLFLOW_TRACEBACK)):
            wrong.append(f"{name}: HTTP {r.status_code} {r.text[:300]}")
        seen.setdefault(name, set()).add(r.status_code)
        if i % 100 == 0:
            assert requests.get(served.url + "/ping", timeout=10).status_code == 200
    assert not wrong, f"{len(wrong)} wrong answers, e.g.:\n" + "\n".join(wrong[:20])
    assert len(seen) == len(KINDS) >= 45
    assert served.server.running()
    assert served.post(good).json() == before


# --- memory, overload and time-outs ---------------------------------------------------------------------------------

def request_peak_kb(pid: int, request) -> tuple[requests.Response, int]:
    """A request's answer and its own peak RSS growth: the process's peak (VmHWM) is reset to its current RSS first
    (writing 5 to /proc/PID/clear_refs), so earlier, larger peaks do not hide it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    base = status_kb(pid, "VmHWM")
    answer = request()
    return answer, status_kb(pid, "VmHWM") - base


@services
def test_memory_stays_bounded(served):
    """An over-budget request is refused before decoding anything; images within the budget are decoded one chunk
    at a time, so four of the largest images cost no more peak memory than one."""
    pid = max(served.server.processes(), key=lambda p: status_kb(p, "VmRSS"))  # the one that runs the model
    r, refused = request_peak_kb(pid, lambda: served.post(split([b64(BLANK)] * 32)))  # 536 M pixels, 750 KB of JSON
    assert r.status_code == 400 and "536,870,912 pixels; the limit is 67,108,864" in r.json()["message"], r.text
    assert refused < 100_000, f"peak RSS grew {refused / 1000:.0f} MB for a refused request"
    r, one = request_peak_kb(pid, lambda: served.post(split([b64(BLANK)])))
    assert r.status_code == 200, r.text
    r, four = request_peak_kb(pid, lambda: served.post(split([b64(BLANK)] * 4)))
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4, r.text
    assert four - one < 64_000, f"4 images grew peak RSS {four / 1000:.0f} MB, 1 image {one / 1000:.0f} MB"


def raw_request(url: str, head: bytes, body: bytes = b"", wait: float = 30) -> bytes:
    """Send bytes as they are (a body shorter than announced, say); the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < length(answer):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


@pytest.fixture(scope="module")
def strict(trained) -> ModelServer:
    """`cnnlab serve -w 2`, each worker with one request at a time, one waiting, a 10 s time-out (room for a loaded
    machine), a 1 MB body limit."""
    server = start(trained, "strict", guarded=True, workers=2, CNNLAB_SERVING_MAX_ACTIVE="1",
                   CNNLAB_SERVING_MAX_QUEUE="1", CNNLAB_SERVING_TIMEOUT="10", CNNLAB_SERVING_MAX_BODY_BYTES=str(2 ** 20))
    try:
        yield server
    finally:
        server.stop()


@services
def test_two_workers_answer_as_one(strict, trained):
    images = [b64(f.read_bytes()) for f in trained.files[:3]]
    answers = [requests.post(strict.url + "/invocations", json=split(images), timeout=60) for _ in range(6)]
    assert all(r.status_code == 200 for r in answers)
    assert_same(answers[0].json()["predictions"], trained.model.predict(frame(images)))
    assert len({json.dumps(r.json()) for r in answers}) == 1
    assert len(strict.processes()) >= 3  # the supervisor and its two workers


def test_no_delay_on_every_connection():
    """uvicorn's workers share a listening socket made without IPPROTO_TCP, so asyncio leaves Nagle's algorithm on;
    NoDelayH11 turns it off, else each keep-alive answer waits ~40 ms for the client's delayed ACK."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from cnnlab.serving.guard import NoDelayH11

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:  # proto 0, as uvicorn binds it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()), listener.accept()[0] as accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            transport = type("Transport", (), {"get_extra_info": lambda self, key, default=None: accepted
                                               if key == "socket" else default})()
            NoDelayH11(Config(app=lambda scope, receive, send: None), ServerState(), {}).connection_made(transport)
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@services
def test_guard_overload_is_503_with_retry_after(strict):
    slow = json.dumps({**split([b64((SAMPLES / "two_faces.jpg").read_bytes())] * 2),  # well within the 10 s time-out
                       "params": {"detect_faces": True}})
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: requests.post(strict.url + "/invocations", data=slow, timeout=60,
                                                        headers={"Content-Type": JSON}), range(8)))
    codes = sorted(r.status_code for r in answers)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, [(r.status_code, r.text[:200]) for r in answers]
    for r in answers:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1" and "server busy" in r.json()["message"]
    assert requests.post(strict.url + "/invocations", data=slow, headers={"Content-Type": JSON},
                         timeout=60).status_code == 200


@services
def test_guard_body_limit_and_time_out(strict):
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    answer = raw_request(strict.url, head % 10 ** 9)  # refused from the header, before any body is read
    assert answer.startswith(b"HTTP/1.1 413") and b"body of 1,000,000,000 bytes; the limit is 1,048,576" in answer
    chunks = (b"x" * 2 ** 16 for _ in range(17))  # no Content-Length: counted as it arrives
    r = requests.post(strict.url + "/invocations", data=chunks, headers={"Content-Type": JSON}, timeout=30)
    assert r.status_code == 413 and "body over 1,048,576 bytes" in r.json()["message"]
    start_time = time.monotonic()
    answer = raw_request(strict.url, head % 100, b'{"inputs": ')  # the rest never comes
    assert answer.startswith(b"HTTP/1.1 408") and 9.5 < time.monotonic() - start_time < 40, answer[:200]
    assert strict.running() and requests.get(strict.url + "/ping", timeout=10).status_code == 200


def test_guard_json_check():
    """The guard finds what Python's json fails on with RecursionError or ValueError, and nothing inside strings."""
    from cnnlab.serving.guard import json_problem

    assert json_problem(b'{"inputs": [[[1, 2]]]}', 32) is None
    assert json_problem(b'{"a": "' + b"[" * 10_000 + b'"}', 32) is None  # brackets inside a string
    assert json_problem(b'{"a": "\\"' + b"[" * 10_000 + b'"}', 32) is None  # after an escaped quote, still inside
    assert "nested 41 levels deep" in json_problem(b'{"a": "\\\\", "b": ' + b"[" * 40 + b"]" * 40 + b"}", 32)
    assert "nested 40 levels deep; the limit is 32" in json_problem(b"[" * 40 + b"]" * 40, 32)
    assert "a number of 5,000 digits" in json_problem(b"[" + b"7" * 5000 + b"]", 32)
    assert json_problem(b'["' + b"7" * 5000 + b'"]', 32) is None  # digits in a string are no number
    assert json_problem(json.dumps(split([b64(BLANK)] * 400)).encode(), 32) is None  # 12 MB of base64
