"""The served model: a pyfunc that owns its preprocessing; image bytes or pixels in, labels and probabilities out."""
from __future__ import annotations

import base64
import binascii
import io
import os
from importlib.metadata import PackageNotFoundError, version

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from .data import DataError
from .data.fer2013 import decode_gray

MAX_SIDE = 4096  # pixels, per side
MAX_BYTES = 10 * 2**20  # 10 MB per encoded image
FORMATS = ("PNG", "JPEG", "BMP")
COLUMN = "image"
BATCH = 256  # images per forward pass: bounds memory for large requests
NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


class InputError(MlflowException, ValueError):
    """A client's mistake; MLflow's scoring server answers it with HTTP 400 and this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("torch", "torchvision", "mlflow", "numpy", "pandas", "opencv-python-headless", "pillow"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def signature(output: pd.DataFrame):
    """Output and params schema, no input schema: MLflow can't express "an image column OR a pixel tensor" and would
    turn one of them into an error (a column schema makes a DataFrame of tensors); predict checks both itself."""
    from mlflow.models import infer_signature

    return infer_signature(None, output, params={"detect_faces": False})


def _check_header(data: bytes, where: str) -> None:
    """Format and size from the header alone (PIL opens lazily), before any full decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise InputError(f"{where}: image too large ({e}); the limit is {MAX_SIDE}x{MAX_SIDE} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InputError(f"{where}: not a PNG, JPEG or BMP image ({len(data)} bytes)") from None
    if width > MAX_SIDE or height > MAX_SIDE:
        raise InputError(f"{where}: image is {width}x{height} pixels; the limit is {MAX_SIDE}x{MAX_SIDE}")


def decode_image(value, where: str) -> np.ndarray:
    """A base64 string (or raw bytes, in process) of a PNG, JPEG or BMP file -> uint8 (H, W), as in training."""
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value  # data URLs too
        if len(text) > 2 * MAX_BYTES:  # cheap pre-check; the exact one follows the decode
            raise InputError(f"{where}: {len(text)} base64 characters; the limit is {MAX_BYTES // 2**20} MB per image")
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"{where}: invalid base64 ({e})") from None
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise InputError(f"{where}: expected a base64-encoded image string, got {type(value).__name__} {value!r:.50}")
    if not data:
        raise InputError(f"{where}: empty image")
    if len(data) > MAX_BYTES:
        raise InputError(f"{where}: image is {len(data)} bytes; the limit is {MAX_BYTES // 2**20} MB "
                         f"({MAX_BYTES} bytes)")
    _check_header(data, where)
    try:
        return decode_gray(data, where)
    except DataError as e:
        raise InputError(str(e)) from None


def image_column(model_input) -> list:
    """The `image` values of a DataFrame or a dict of columns; any other column set is an InputError."""
    columns = list(model_input.columns if isinstance(model_input, pd.DataFrame) else model_input.keys())
    if COLUMN not in columns:
        raise InputError(f"expected a column {COLUMN!r} of base64-encoded images, got columns {columns}; "
                         f"send pixel tensors as 'inputs' instead")
    values = model_input[COLUMN]
    values = [values] if isinstance(values, (str, bytes)) else list(np.asarray(values, dtype=object).ravel())
    if not values:
        raise InputError(f"empty request: no images in column {COLUMN!r}")
    return values


def pixels_array(array) -> np.ndarray:
    """(N, H, W) or (N, 1, H, W) uint8/integer 0-255 or float 0-1 -> uint8 or float32 (N, H, W); else an InputError."""
    try:
        a = np.asarray(array)
    except ValueError as e:  # ragged nested lists
        raise InputError(f"pixel tensor is not rectangular: {e}") from None
    if a.size == 0:
        raise InputError(f"empty request: pixel tensor of shape {a.shape} holds no pixels")
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise InputError(f"pixel tensor must have shape (N, H, W) or (N, 1, H, W), got {a.shape}")
    if a.shape[1] > MAX_SIDE or a.shape[2] > MAX_SIDE:
        raise InputError(f"images are {a.shape[2]}x{a.shape[1]} pixels; the limit is {MAX_SIDE}x{MAX_SIDE}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.integer):  # JSON integers arrive as int64
        if a.min() < 0 or a.max() > 255:
            raise InputError(f"integer pixels must be within 0..255, got {a.min()}..{a.max()}")
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InputError(f"float pixels must be finite and within 0..1, got {np.nanmin(a)}..{np.nanmax(a)}")
        return a.astype(np.float32)
    raise InputError(f"pixel dtype must be uint8 or integer (0-255) or float (0-1), got {a.dtype}")


def to_images(model_input) -> list[np.ndarray] | np.ndarray:
    """Base64 images (DataFrame or dict column) -> list of uint8 (H, W); pixel tensors -> (N, H, W) array."""
    if isinstance(model_input, (pd.DataFrame, dict)):
        return [decode_image(v, f"row {i}") for i, v in enumerate(image_column(model_input))]
    if model_input is None:
        raise InputError("empty request: no input")
    if isinstance(model_input, torch.Tensor):
        model_input = model_input.numpy()
    return pixels_array(model_input)


def serving_precision() -> str:
    """CNNLAB_SERVING_PRECISION (fp32 or bf16); by default bf16 on CPUs with AMX (2x faster there), else fp32."""
    choice = os.environ.get("CNNLAB_SERVING_PRECISION", "auto")
    if choice not in ("auto", "fp32", "bf16"):
        raise ValueError(f"CNNLAB_SERVING_PRECISION must be auto, fp32 or bf16, got {choice!r}")
    if choice == "auto":
        from .devices import cpu_has_bf16

        return "bf16" if cpu_has_bf16() else "fp32"
    return choice


class FaceDetector:
    """OpenCV's bundled frontal-face Haar cascade."""

    def __init__(self):
        import cv2

        self.cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
        if self.cascade.empty():
            raise RuntimeError(f"Haar cascade not found in {cv2.data.haarcascades}")

    def __call__(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        if gray.dtype != np.uint8:
            gray = np.rint(gray * 255).astype(np.uint8)
        boxes = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        return sorted(tuple(int(v) for v in box) for box in boxes)


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
        net = self.classifier.net.to(memory_format=torch.channels_last)  # oneDNN's fast layout for CPU convs, pools
        # bf16 weights once, not autocast: autocast re-casts every weight on every request (ms at batch 1);
        # norm layers stay fp32 for their running statistics
        self.dtype = torch.bfloat16 if serving_precision() == "bf16" else torch.float32
        net.to(self.dtype)
        for m in net.modules():
            if isinstance(m, NORMS):
                m.float()
        self._faces = None

    @torch.inference_mode()
    def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Class probabilities (N, C) for a batch of same-size images, in batches of BATCH."""
        clf, out = self.classifier, []
        for i in range(0, len(pixels), BATCH):
            x = clf.preprocess(pixels[i: i + BATCH]).to(self.dtype)  # the training preprocessing, in fp32
            out.append(clf.probabilities(clf.net(x)).numpy())
        return np.concatenate(out).astype(np.float64)

    def image_probabilities(self, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Probabilities for images of any sizes: one batch per distinct size, rows in input order."""
        if isinstance(images, np.ndarray):
            return self.probabilities(torch.from_numpy(images))
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.shape, []).append(i)
        probs = np.empty((len(images), len(self.classes)))
        for idx in groups.values():
            probs[idx] = self.probabilities(torch.from_numpy(np.stack([images[i] for i in idx])))
        return probs

    def frame(self, probs: np.ndarray) -> pd.DataFrame:
        """label, class_index and one prob_<class> column per class."""
        index = probs.argmax(1)
        return pd.DataFrame({"label": [self.classes[i] for i in index], "class_index": index.astype(np.int64),
                             **{f"prob_{name}": probs[:, k] for k, name in enumerate(self.classes)}})

    def faces(self, images) -> pd.DataFrame:
        """One row per image: how many faces, and per face its box (x, y, w, h), label and probabilities."""
        self._faces = self._faces or FaceDetector()
        rows = []
        for i, img in enumerate(images):
            boxes = self._faces(img)
            crops = [img[y: y + h, x: x + w] for x, y, w, h in boxes]
            found = self.frame(self.image_probabilities(crops)).to_dict("records") if crops else []
            detections = [{"box": dict(zip("xywh", box)), **face} for box, face in zip(boxes, found)]
            rows.append({"image": i, "faces": len(boxes), "detections": detections,
                         "message": f"{len(boxes)} face(s) found" if boxes else "no face found"})
        return pd.DataFrame(rows, columns=["image", "faces", "detections", "message"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = to_images(model_input)
        if (params or {}).get("detect_faces"):
            return self.faces(images)
        return self.frame(self.image_probabilities(images))
