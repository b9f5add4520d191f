"""The served model: a pyfunc that owns its preprocessing; image bytes or pixels in, labels and probabilities out.

Each request is checked against a budget (rows, decoded pixels, image sides and bytes) before anything is decoded,
then decoded and classified in chunks of bounded size, so memory stays flat however large a request is.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import struct
import threading
from dataclasses import asdict, dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from cnnlab.core.augment import TTA, tta_views, view_probabilities
from cnnlab.core.devices import resolve_precision
from cnnlab.core.calibration import calibrate
from cnnlab.core.data import DataError
from cnnlab.core.data.fer2013 import decode_gray
from cnnlab.serving import metrics
from cnnlab.serving.batching import Batcher, Batching

COLUMN = "image"
BATCH = 256  # images per forward pass
CHUNK_PIXELS = 1 << 22  # decoded pixels held at once (4 Mi: 1,820 FER images); a larger image is a chunk alone
NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
log = logging.getLogger(__name__)


class InputError(MlflowException, ValueError):
    """A client's mistake; MLflow's scoring server answers it with HTTP 400 and this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def settings_from_env(cls):
    """A dataclass of whole-number settings, each field overridden by the environment variable
    CNNLAB_SERVING_<FIELD>."""
    values = {}
    for f in fields(cls):
        name = f"CNNLAB_SERVING_{f.name.upper()}"
        if name in os.environ:
            text = os.environ[name]
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {text!r}")
            values[f.name] = int(text)
    return cls(**values)


@dataclass(frozen=True)
class Budget:
    """What one request may ask for; each field can be set by the environment variable CNNLAB_SERVING_<FIELD>."""
    max_rows: int = 1024  # images (or tensor rows) per request
    max_pixels: int = 4 * 4096 * 4096  # decoded pixels (height x width) per request: four 4096x4096 images
    max_side: int = 4096  # pixels, per image side
    max_image_bytes: int = 10 * 2**20  # one encoded image

    def check_rows(self, rows: int) -> None:
        if rows > self.max_rows:
            raise InputError(f"request has {rows} rows; the limit is {self.max_rows} per request "
                             f"(CNNLAB_SERVING_MAX_ROWS)")

    def check_side(self, width: int, height: int, where: str) -> None:
        if width > self.max_side or height > self.max_side:
            raise InputError(f"{where}: image is {width}x{height} pixels; the limit is "
                             f"{self.max_side}x{self.max_side} (CNNLAB_SERVING_MAX_SIDE)")

    def check_pixels(self, pixels: int, what: str) -> None:
        if pixels > self.max_pixels:
            raise InputError(f"{what} {pixels:,} pixels; the limit is {self.max_pixels:,} per request "
                             f"(CNNLAB_SERVING_MAX_PIXELS)")


def pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("torch", "torchvision", "mlflow", "numpy", "pandas", "opencv-python-headless", "grad-cam",
                "onnxruntime", "prometheus-client"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def signature(output: list[dict]):
    """Output and params schema, no input schema: MLflow can't express "an image column OR a pixel tensor" and would
    turn one of them into an error (a column schema makes a DataFrame of tensors); predict checks both itself."""
    from mlflow.models import infer_signature

    return infer_signature(None, pd.DataFrame(output), params=asdict(Options()))


def package_copy(dest: Path) -> str:
    """This package copied for a logged model's code_paths, as a namespace portion (no top-level __init__.py).

    MLflow puts code_paths first on sys.path when it loads a model; a regular package anywhere on sys.path wins over a
    namespace portion, so an installed cnnlab stays the one imported (here and in spawned workers) and the copy is
    imported only where cnnlab is not installed (`mlflow models serve` in a fresh environment).
    """
    package = Path(__file__).resolve().parents[1]

    def skip(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or (n == "__init__.py" and Path(folder) == package)]
    target = Path(dest) / package.name
    shutil.copytree(package, target, ignore=skip)
    return str(target)


# --- image headers: format and size before any decode ---------------------------------------------------------------

SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # JPEG frame headers


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:  # stray bytes between segments: skip to the next marker, as libjpeg does
            i = data.find(b"\xff", i)
            if i < 0:
                return None
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in SOF:
            height, width = struct.unpack(">HH", data[i + 5: i + 9])
            return width, height
        elif marker == 0xDA:  # scan data before any frame header
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2: i + 4], "big")
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or BMP header; None for anything else or a header cut short."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    if data[:2] == b"BM" and len(data) >= 26:
        header = struct.unpack("<I", data[14:18])[0]
        width, height = struct.unpack("<HH", data[18:22]) if header == 12 else struct.unpack("<ii", data[18:26])
        return (width, abs(height)) if width >= 0 else None
    return None


def image_bytes(value, where: str, budget: Budget) -> bytes:
    """A base64 string (a data URL too; raw bytes in process) -> the encoded image's bytes, size-checked."""
    limit = budget.max_image_bytes
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        if len(text) > 2 * limit:  # cheap pre-check before decoding; the exact one follows
            raise InputError(f"{where}: {len(text):,} base64 characters; the limit is {limit:,} bytes per image "
                             f"(CNNLAB_SERVING_MAX_IMAGE_BYTES)")
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
    if len(data) > limit:
        raise InputError(f"{where}: image is {len(data):,} bytes; the limit is {limit:,} bytes "
                         f"(CNNLAB_SERVING_MAX_IMAGE_BYTES)")
    return data


def decode(data: bytes, where: str, channels: int) -> np.ndarray:
    """Image bytes -> uint8 (H, W) gray, decoded as in training, or (3, H, W) RGB for color models (OpenCV only)."""
    import cv2

    try:
        if channels == 1:
            return decode_gray(data, where)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except DataError as e:
        raise InputError(str(e)) from None
    if img is None:
        raise InputError(f"{where}: not a decodable image")
    if img.dtype != np.uint8:
        raise InputError(f"{where}: expected 8-bit pixels, got {img.dtype}")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return img.transpose(2, 0, 1)


# --- requests: rows of encoded images, or a pixel tensor --------------------------------------------------------------

def runs(pixels: list[int], limit: int) -> list[list[int]]:
    """Consecutive rows in groups of at most BATCH rows and `limit` pixels (a larger image is a group alone)."""
    groups, current, total = [], [], 0
    for i, p in enumerate(pixels):
        if current and (total + p > limit or len(current) == BATCH):
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += p
    return groups + [current] if current else groups


def stacks(images: list[np.ndarray], rows: list[int]):
    """(rows, stacked array) per distinct image shape."""
    by_shape: dict[tuple, list[int]] = {}
    for k, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(k)
    for ks in by_shape.values():
        yield [rows[k] for k in ks], np.stack([images[k] for k in ks])


class Encoded:
    """Rows of PNG/JPEG/BMP bytes whose sizes, read from their headers, fit the budget; decoded chunk by chunk."""

    def __init__(self, values: list, budget: Budget, channels: int):
        budget.check_rows(len(values))
        if not values:
            raise InputError(f"empty request: no images in column {COLUMN!r}")
        self.blobs = [image_bytes(v, f"row {i}", budget) for i, v in enumerate(values)]
        self.sizes = []
        for i, data in enumerate(self.blobs):
            size = image_size(data)
            if size is None:
                known = data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or data[:2] == b"BM"
                what = "its header is cut short or invalid" if known else "not a PNG, JPEG or BMP image"
                raise InputError(f"row {i}: {what} ({len(data):,} bytes)")
            budget.check_side(*size, f"row {i}")
            self.sizes.append(size)
        self.pixels = [w * h for w, h in self.sizes]
        budget.check_pixels(sum(self.pixels), f"request's {len(values)} images decode to")
        self.channels = channels

    def __len__(self) -> int:
        return len(self.blobs)

    def image(self, i: int) -> np.ndarray:
        img = decode(self.blobs[i], f"row {i}", self.channels)
        if img.shape[-1] * img.shape[-2] > self.pixels[i]:  # the decoder must agree with the header it was held to
            raise InputError(f"row {i}: image decodes to {img.shape[-1]}x{img.shape[-2]} pixels, "
                             f"its header says {self.sizes[i][0]}x{self.sizes[i][1]}")
        return img

    def chunks(self):
        for rows in runs(self.pixels, CHUNK_PIXELS):
            yield from stacks([self.image(i) for i in rows], rows)


class Pixels:
    """A pixel tensor (N, H, W) / (N, 1, H, W) for gray models, (N, 3, H, W) for color: uint8 or integers 0-255, or
    floats 0-1; shape, size and range checked at once, converted chunk by chunk."""

    def __init__(self, array, budget: Budget, channels: int):
        if isinstance(array, torch.Tensor):
            array = array.numpy()
        try:
            a = np.asarray(array)
        except ValueError as e:  # ragged nested lists
            raise InputError(f"pixel tensor is not rectangular: {e}") from None
        if a.size == 0:
            raise InputError(f"empty request: pixel tensor of shape {a.shape} holds no pixels")
        if channels == 1 and a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        want = "(N, H, W) or (N, 1, H, W)" if channels == 1 else f"(N, {channels}, H, W)"
        if a.ndim != (3 if channels == 1 else 4) or (channels > 1 and a.shape[1] != channels):
            raise InputError(f"pixel tensor must have shape {want}, got {a.shape}")
        budget.check_rows(len(a))
        budget.check_side(a.shape[-1], a.shape[-2], "pixel tensor")
        budget.check_pixels(a.size // channels, f"pixel tensor of shape {a.shape} holds")
        self.array, self.dtype = a, self._dtype(a)

    @staticmethod
    def _dtype(a: np.ndarray):
        if a.dtype == np.uint8:
            return np.uint8
        if np.issubdtype(a.dtype, np.integer):  # JSON integers arrive as int64
            if a.min() < 0 or a.max() > 255:
                raise InputError(f"integer pixels must be within 0..255, got {a.min()}..{a.max()}")
            return np.uint8
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise InputError(f"float pixels must be finite and within 0..1, got {np.nanmin(a)}..{np.nanmax(a)}")
            return np.float32
        raise InputError(f"pixel dtype must be uint8 or integer (0-255) or float (0-1), got {a.dtype}")

    def __len__(self) -> int:
        return len(self.array)

    def image(self, i: int) -> np.ndarray:
        return self.array[i].astype(self.dtype, copy=False)

    def chunks(self):
        pixels = self.array[0].size
        for rows in runs([pixels] * len(self.array), CHUNK_PIXELS):
            yield rows, self.array[rows[0]: rows[-1] + 1].astype(self.dtype, copy=False)


class Crops:
    """Face crops of one image (already decoded, inside the budget)."""

    def __init__(self, crops: list[np.ndarray]):
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def chunks(self):
        yield from stacks(self.crops, list(range(len(self.crops))))


def image_column(model_input) -> list:
    """The `image` values of a DataFrame or a dict of columns; any other column set is an InputError."""
    columns = list(model_input.columns if isinstance(model_input, pd.DataFrame) else model_input.keys())
    if COLUMN not in columns:
        raise InputError(f"expected a column {COLUMN!r} of base64-encoded images, got columns {columns}; "
                         f"send pixel tensors as 'inputs' instead")
    values = model_input[COLUMN]
    if isinstance(values, (str, bytes)):
        return [values]
    return values.tolist() if isinstance(values, pd.Series) else list(np.asarray(values, dtype=object).ravel())


def images_of(model_input, budget: Budget, channels: int) -> Encoded | Pixels:
    if isinstance(model_input, (pd.DataFrame, dict)):
        return Encoded(image_column(model_input), budget, channels)
    if model_input is None:
        raise InputError("empty request: no input")
    return Pixels(model_input, budget, channels)


@dataclass(frozen=True)
class Options:
    """What a request may ask for in `params`; the defaults are the model's signature."""
    detect_faces: bool = False  # classify each face found (boxes, one record per face) instead of the whole image
    calibrated: bool = True  # apply the temperature fitted on validation (models trained with a validation split)
    tta: str = "none"  # average over test-time views: none, flip (2) or tencrop (10), as evaluation does
    explain: bool = False  # a Grad-CAM heat map (PNG data URL, the image's size) of the predicted class per image


def options_of(params) -> Options:
    if params is None:
        return Options()
    if not isinstance(params, dict):
        raise InputError(f"params must be an object, got {type(params).__name__}")
    known = {f.name: f.type for f in fields(Options)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(f"unknown params {unknown}; known: {sorted(known)}")
    for name, value in params.items():
        if known[name] == "bool" and not isinstance(value, (bool, np.bool_)):
            raise InputError(f"params.{name} must be true or false, got {value!r:.50}")
    if params.get("tta", "none") not in TTA:
        raise InputError(f"params.tta must be one of {list(TTA)}, got {params['tta']!r:.50}")
    return Options(**{k: bool(v) if known[k] == "bool" else v for k, v in params.items()})


def heatmap_png(heat: np.ndarray) -> str:
    """A 0-1 heat map as a grayscale PNG data URL."""
    import cv2

    _, png = cv2.imencode(".png", np.rint(np.clip(heat, 0, 1) * 255).astype(np.uint8))
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


def serving_precision() -> str:
    """CNNLAB_SERVING_PRECISION (fp32 or bf16); by default what training's `precision=auto` picks on this CPU."""
    choice = os.environ.get("CNNLAB_SERVING_PRECISION", "auto")
    if choice not in ("auto", "fp32", "bf16"):
        raise ValueError(f"CNNLAB_SERVING_PRECISION must be auto, fp32 or bf16, got {choice!r}")
    return resolve_precision(choice, torch.device("cpu"))


def serving_threads() -> int | None:
    """CNNLAB_SERVING_THREADS: torch threads of this process (`cnnlab serve` sets cores / workers)."""
    text = os.environ.get("CNNLAB_SERVING_THREADS")
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"CNNLAB_SERVING_THREADS must be a whole number >= 1, got {text!r}")
    return int(text)


RUNTIMES = ("auto", "torch", "onnx_fp32", "onnx_int8")


def serving_runtime(artifacts: dict) -> str:
    """CNNLAB_SERVING_RUNTIME: torch, onnx_fp32, onnx_int8 or auto (default: what the logged model's runtime.json
    chose; torch for a model logged without ONNX files)."""
    choice = os.environ.get("CNNLAB_SERVING_RUNTIME", "auto")
    if choice not in RUNTIMES:
        raise ValueError(f"CNNLAB_SERVING_RUNTIME must be one of {list(RUNTIMES)}, got {choice!r}")
    if choice != "auto":
        return choice
    if "runtime" not in artifacts:
        return "torch"
    return json.loads(Path(artifacts["runtime"]).read_text())["default"]


class FaceDetector:
    """OpenCV's bundled frontal-face Haar cascade (one per thread: a cascade is not safe to share)."""

    def __init__(self):
        import cv2

        self.cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
        if self.cascade.empty():
            raise RuntimeError(f"Haar cascade not found in {cv2.data.haarcascades}")

    def __call__(self, img: np.ndarray) -> list[tuple[int, int, int, int]]:
        import cv2

        if img.ndim == 3:
            img = cv2.cvtColor(np.ascontiguousarray(img.transpose(1, 2, 0)), cv2.COLOR_RGB2GRAY)
        if img.dtype != np.uint8:
            img = np.rint(img * 255).astype(np.uint8)
        boxes = self.cascade.detectMultiScale(img, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        return sorted(tuple(int(v) for v in box) for box in boxes)


class CnnlabModel(mlflow.pyfunc.PythonModel):
    """Rebuilds the trained Classifier from its bundle; predicts labels and per-class probabilities.

    predict returns one record (a dict) per image, as the REST answer has them: no DataFrame to build and convert.
    """

    def load_context(self, context) -> None:
        self._load(context.artifacts["bundle"])
        self._use_runtime(context.artifacts)

    @classmethod
    def from_bundle_file(cls, path) -> "CnnlabModel":
        model = cls()
        model._load(path)
        return model

    def _load(self, path) -> None:
        from cnnlab.core.models import from_bundle

        data = torch.load(path, map_location="cpu", weights_only=True)  # tensors, dicts, strings: no code runs
        self._setup(from_bundle(data), data["classes"], int(data["preprocess"].get("image_channels", 1)),
                    float(data.get("temperature", 1.0)))

    def _setup(self, classifier, classes: list[str], image_channels: int, temperature: float = 1.0) -> None:
        threads = serving_threads()
        if threads:
            torch.set_num_threads(threads)
        self.classes, self.channels, self.budget = list(classes), image_channels, settings_from_env(Budget)
        self.columns = [f"prob_{name}" for name in self.classes]
        self.classifier, self.temperature, self._explainer = classifier.eval(), temperature, None
        net = classifier.net.to(memory_format=torch.channels_last)  # oneDNN's fast layout for CPU convs, pools
        # weights cast once, not autocast: autocast re-casts every weight on every request (ms at batch 1);
        # norm layers stay fp32 for their running statistics
        self.dtype = torch.bfloat16 if serving_precision() == "bf16" else torch.float32
        net.to(self.dtype)
        for m in net.modules():
            if isinstance(m, NORMS):
                m.float()
        self._lock = threading.Lock()  # one forward at a time: concurrent ones would oversubscribe the cores
        self._local = threading.local()
        self.session, self.runtime = None, "torch"
        # concurrent requests with equal params share forward passes
        self._batcher = Batcher(lambda x, options: self.probabilities(x, options.tta), settings_from_env(Batching))

    def _use_runtime(self, artifacts: dict) -> None:
        """Serve through ONNX Runtime (CNNLAB_SERVING_RUNTIME, by default the logged model's choice); a runtime that
        is missing or fails on a first batch leaves torch serving, with one log line."""
        choice = serving_runtime(artifacts)
        if choice == "torch":
            return
        pre = self.classifier.preprocess
        try:
            from cnnlab.core.export import session

            sess = session(artifacts[choice], serving_threads(), spin=False)  # cores shared with the HTTP work
            sess.run(None, {"x": np.zeros((1, pre.channels, pre.size, pre.size), np.float32)})
        except Exception as e:  # noqa: BLE001 - any failure: torch still serves the same weights
            log.warning("ONNX Runtime (%s) unavailable, serving with torch: %s: %s", choice, type(e).__name__,
                        str(e)[:200])
            return
        self.session, self.runtime = sess, choice

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        """The network's outputs for preprocessed fp32 inputs: ONNX Runtime's session, else torch in its dtype."""
        if self.session is not None:
            return torch.from_numpy(self.session.run(None, {"x": x.contiguous().numpy()})[0])
        return self.classifier.net(x.to(self.dtype))

    @torch.inference_mode()
    def probabilities(self, pixels: np.ndarray, tta: str = "none") -> np.ndarray:
        """Class probabilities (N, C) for a stack of same-size images, N <= BATCH, averaged over the TTA views."""
        clf, views = self.classifier, tta_views(tta)
        x = torch.from_numpy(pixels)
        with self._lock:
            # the training preprocessing (fp32), then the net in its serving dtype
            probs = view_probabilities(lambda v: clf.probabilities(self._net(clf.preprocess(v))),
                                       views(x) if views else [x])
            return probs.float().numpy()

    def heatmaps(self, pixels: np.ndarray, targets: np.ndarray) -> list[str]:
        """Grad-CAM of each image's `targets` class, from an fp32 copy of the model (Grad-CAM needs fp32 and grads)."""
        import copy

        from cnnlab.core.explain import explain
        from cnnlab.core.models import MemberAverage

        if isinstance(self.classifier.net, MemberAverage):
            raise InputError("params.explain: an ensemble has no one feature map to explain; explain a member")
        with self._lock:
            if self._explainer is None:
                self._explainer = copy.deepcopy(self.classifier).float()
            try:
                maps = explain(self._explainer, torch.from_numpy(pixels), targets)
            except ValueError as e:  # ExplainUnavailable, or color images
                raise InputError(f"params.explain: {e}") from None
        return [heatmap_png(m) for m in maps]

    def classify(self, images: Encoded | Pixels, options: Options = Options()) -> tuple[np.ndarray, list | None]:
        """Probabilities (N, C), calibrated unless asked not to; with `explain`, a heat map per image."""
        probs = np.empty((len(images), len(self.classes)), np.float32)
        maps = [None] * len(images) if options.explain else None
        for rows, pixels in images.chunks():
            probs[rows] = self._batcher(pixels, options)
            if maps is not None:
                for row, heat in zip(rows, self.heatmaps(pixels, probs[rows].argmax(1))):
                    maps[row] = heat
        if options.calibrated and self.temperature != 1.0:
            probs = calibrate(probs, self.temperature).astype(np.float32)
        return probs, maps

    def records(self, probs: np.ndarray, maps: list | None = None) -> list[dict]:
        """label, class_index and one prob_<class> per class, per image; with maps, its `heatmap`."""
        index = probs.argmax(1).tolist()
        rows = [{"label": self.classes[k], "class_index": k, **dict(zip(self.columns, row))}
                for k, row in zip(index, probs.astype(np.float64).tolist())]
        for row, heat in zip(rows, maps or []):
            row["heatmap"] = heat
        return rows

    def faces(self, images: Encoded | Pixels, options: Options) -> list[dict]:
        """One record per image: how many faces, and per face its box (x, y, w, h), label and probabilities."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = FaceDetector()
        rows = []
        for i in range(len(images)):
            img = images.image(i)
            boxes = detector(img)
            crops = [np.ascontiguousarray(img[..., y: y + h, x: x + w]) for x, y, w, h in boxes]
            found = self.records(*self.classify(Crops(crops), options)) if crops else []
            detections = [{"box": dict(zip("xywh", box)), **face} for box, face in zip(boxes, found)]
            rows.append({"image": i, "faces": len(boxes), "detections": detections,
                         "message": f"{len(boxes)} face(s) found" if boxes else "no face found"})
        return rows

    def predict(self, context, model_input, params=None) -> list[dict]:
        with self._batcher.caller():
            return self._predict(model_input, params)

    def _predict(self, model_input, params) -> list[dict]:
        try:
            options = options_of(params)
            images = images_of(model_input, self.budget, self.channels)
            metrics.IMAGES.observe(len(images))
            if options.detect_faces:
                return self.faces(images, options)
            return self.records(*self.classify(images, options))
        except InputError:
            raise
        except Exception as e:  # a bug, not the client's mistake: 500, the traceback in the server's log only
            log.exception("predict failed")
            raise MlflowException(f"internal error: {type(e).__name__}; see the server log",
                                  error_code=INTERNAL_ERROR) from None
