"""The fer_cnn champion behind MLflow's own REST server: real FER2013 images in, the same answers as in process."""
from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch

from cnnlab import registry
from cnnlab.data.fer2013 import decode_gray
from cnnlab.experiments import make_config, run
from cnnlab.serving import InputError

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "serving" / "samples"
sys.path.insert(0, str(REPO / "serving"))
import client  # serving/client.py, the CLI under test


@dataclass
class Served:
    url: str
    model: mlflow.pyfunc.PyFuncModel  # the same registered version, loaded in process
    bundle: Path  # its trained Classifier, as saved by training
    files: list[Path]  # real FER2013 test JPEGs

    def post(self, body) -> requests.Response:
        kw = {"json": body} if isinstance(body, dict) else {"data": body}
        return requests.post(self.url + "/invocations", headers={"Content-Type": "application/json"}, timeout=60, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def frame(values: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image": values})


def split(values: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve not up after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, fer_subset):
    """Train a tiny fer_cnn, register it (champion), serve models:/fer_cnn@champion on a free loopback port."""
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
    port, log = free_port(), root / "server.log"
    # as many torch threads as this process: the same kernels, so the same numbers to the last bit
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/fer_cnn@champion", "--env-manager",
                                 "local", "-p", str(port), "-h", "127.0.0.1"], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url, log)
        files = sorted(fer_subset.glob("test/*/*.jpg"))[::5]
        yield Served(url, model, local / "artifacts" / "model.pt", files)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def assert_same(answer: list[dict], expected: pd.DataFrame, atol: float = 1e-6) -> None:
    got = pd.DataFrame(answer)
    assert list(got.columns) == list(expected.columns)
    assert got["label"].tolist() == expected["label"].tolist()
    assert got["class_index"].tolist() == expected["class_index"].tolist()
    probs = [c for c in expected.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[probs].to_numpy(), expected[probs].to_numpy(), atol=atol)
    np.testing.assert_allclose(got[probs].sum(1), 1.0, atol=1e-4)


def test_base64_fer_images_match_in_process(served):
    images = [b64(f.read_bytes()) for f in served.files]
    expected = served.model.predict(frame(images))
    assert len(expected) == len(images) and {"prob_happy", "prob_neutral"} <= set(expected.columns)
    r = served.post(split(images))
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], expected)
    r = served.post({"dataframe_records": [{"image": v} for v in images]})
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], expected)


def test_decoded_exactly_as_in_training(served, fer_subset, monkeypatch):
    """fp32 serving of the test JPEGs == the trained Classifier on the training loader's own pixels."""
    from cnnlab.data import fer2013
    from cnnlab.models import from_bundle
    from cnnlab.serving import CnnlabModel
    from cnnlab.training import predict

    files = sorted(fer_subset.glob("test/*/*.jpg"))  # the loader's order: class folders, then file names
    _, test = fer2013.load(str(fer_subset))
    expected = predict(from_bundle(torch.load(served.bundle, weights_only=False)), test.images, precision="fp32")
    monkeypatch.setenv("CNNLAB_SERVING_PRECISION", "fp32")
    got = CnnlabModel.from_bundle_file(served.bundle).predict(None, frame([b64(f.read_bytes()) for f in files]))
    np.testing.assert_allclose(got.filter(like="prob_").to_numpy(), expected.numpy(), atol=1e-6)
    monkeypatch.setenv("CNNLAB_SERVING_PRECISION", "bf16")  # the default on CPUs with AMX: close, not equal
    got = CnnlabModel.from_bundle_file(served.bundle).predict(None, test.images.numpy())
    np.testing.assert_allclose(got.filter(like="prob_").to_numpy(), expected.numpy(), atol=2e-2)


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


def test_any_format_size_and_color(served):
    gray = decode_gray(served.files[0].read_bytes(), "sample")
    color = cv2.resize(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), (160, 120))
    color[..., 2] = 255 - color[..., 2]  # really colored
    images = [b64(cv2.imencode(".png", gray)[1].tobytes()), b64(cv2.imencode(".bmp", gray)[1].tobytes()),
              b64(cv2.imencode(".jpg", color)[1].tobytes()), b64(cv2.imencode(".png", color)[1].tobytes())]
    expected = served.model.predict(frame(images))
    r = served.post(split(images))
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], expected)
    # PNG and BMP of the same pixels are the same image; MIME line breaks and data URLs are fine
    assert_same(r.json()["predictions"][1:2], expected.iloc[:1])
    wrapped = base64.encodebytes(served.files[0].read_bytes()).decode()
    r = served.post(split([wrapped, "data:image/jpeg;base64," + b64(served.files[0].read_bytes())]))
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], served.model.predict(frame([b64(served.files[0].read_bytes())] * 2)))


def big_bmp() -> bytes:
    """A real, valid image over 10 MB (but within 4096x4096)."""
    return cv2.imencode(".bmp", np.random.default_rng(0).integers(0, 256, (1900, 1900, 3), dtype=np.uint8))[1].tobytes()


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
    "image too wide": (split([b64(cv2.imencode(".png", np.zeros((8, 4097), np.uint8))[1].tobytes())]),
                       "row 0: image is 4097x8 pixels; the limit is 4096x4096"),
    "image over 10 MB": (split([b64(big_bmp())]), "bytes; the limit is 10 MB"),
    "bad parameter": ({**split([b64((SAMPLES / "happy.jpg").read_bytes())]), "params": {"detect_faces": "maybe"}},
                      "detect_faces"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_4xx_and_server_keeps_serving(served, case):
    body, fragment = BAD[case]
    r = served.post(body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert fragment in r.json()["message"], r.json()["message"][-500:]
    good = [b64(served.files[0].read_bytes())]
    r = served.post(split(good))
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], served.model.predict(frame(good)))


def test_bad_input_in_process_is_input_error(served):
    with pytest.raises(InputError, match="row 1: invalid base64"):
        served.model.predict(frame([b64(served.files[0].read_bytes()), "%%%"]))
    with pytest.raises(InputError, match="pixel dtype"):
        served.model.predict(np.zeros((1, 4, 4), bool))


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
    assert in_process["detections"][0] == row["detections"]

    no_face = np.full((240, 320, 3), 180, np.uint8)
    r = served.post({**split([b64(cv2.imencode(".jpg", no_face)[1].tobytes())]), "params": {"detect_faces": True}})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == [{"image": 0, "faces": 0, "detections": [], "message": "no face found"}]


def test_client_cli(served, capsys):
    files = [SAMPLES / "happy.jpg", SAMPLES / "sad.jpg"]
    assert client.main([served.url, *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = served.model.predict(frame([b64(f.read_bytes()) for f in files]))
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == expected["label"].tolist()
    assert client.main([served.url, str(SAMPLES / "two_faces.jpg"), "--detect-faces"]) == 0
    assert "2 face(s) found" in capsys.readouterr().out
    assert client.main([served.url, str(REPO / "serving" / "README.md")]) == 1
    assert "not a PNG, JPEG or BMP image" in capsys.readouterr().err
