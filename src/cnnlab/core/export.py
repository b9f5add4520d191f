"""The served network as ONNX for ONNX Runtime: fp32, and int8 (static QDQ, per channel) calibrated on training
images; parity with torch checked where it matters. The torch weights stay the source of truth (Grad-CAM, training)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from cnnlab.core.preprocess import Classifier

INT8_TOLERANCE = 0.005  # int8 may cost at most 0.5 accuracy points on validation, else fp32 is served
CALIBRATION_IMAGES = 512
log = logging.getLogger(__name__)


def net_input(classifier: Classifier, pixels: torch.Tensor) -> np.ndarray:
    """What the exported network takes: the classifier's own preprocessing of uint8 or 0-1 pixels, fp32."""
    with torch.inference_mode():
        return classifier.preprocess(pixels).float().contiguous().numpy()


def to_onnx(classifier: Classifier, path: Path) -> Path:
    """The classifier's network (after preprocessing) as an fp32 ONNX file with a dynamic batch dimension."""
    pre = classifier.preprocess
    if not pre.size:
        raise ValueError("an ensemble's outer preprocessing has no input size: export its members")
    net = classifier.net.float().eval()
    example = torch.zeros(2, pre.channels, pre.size, pre.size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=["x"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    program.save(str(path))
    return path


class Calibration:
    """ONNX Runtime's CalibrationDataReader over preprocessed training images, in batches."""

    def __init__(self, inputs: np.ndarray, batch: int = 64):
        self.batches = iter([{"x": inputs[i: i + batch]} for i in range(0, len(inputs), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize(fp32: Path, int8: Path, calibration: np.ndarray) -> Path:
    """Static int8 QDQ, per-channel weights (s8) and u8 activations calibrated (min-max) on `calibration`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(int8), Calibration(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()
    return int8


def session(path: Path | str, threads: int | None = None, spin: bool = True):
    """An ONNX Runtime CPU session with all graph optimizations; `threads` intra-op threads (None: all cores).
    spin=False: idle threads sleep instead of spinning, for a server whose request handling shares the cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads or 0, 1
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits of preprocessed inputs, `batch` at a time."""
    return np.concatenate([sess.run(None, {"x": inputs[i: i + batch]})[0] for i in range(0, len(inputs), batch)])


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def export(classifier: Classifier, out_dir: Path, train_images: torch.Tensor,
           val: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, str]:
    """fp32 and int8 ONNX files of a trained classifier and runtime.json saying which one to serve and why: int8
    unless it loses more than INT8_TOLERANCE accuracy against fp32 on `val` (images, labels). Returns artifact paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = to_onnx(classifier, out_dir / "model_fp32.onnx")
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:CALIBRATION_IMAGES]
    int8 = quantize(fp32, out_dir / "model_int8.onnx", net_input(classifier, train_images[pick]))
    choice = {"default": "onnx_int8", "reason": "int8 not checked: no validation split"}
    if val is not None:
        inputs, labels = net_input(classifier, val[0]), val[1].numpy()
        acc = {name: float((run(session(p), inputs).argmax(1) == labels).mean()) for name, p in
               (("fp32", fp32), ("int8", int8))}
        lost = acc["fp32"] - acc["int8"]
        choice = {"default": "onnx_int8" if lost <= INT8_TOLERANCE else "onnx_fp32", "val_accuracy": acc,
                  "reason": f"int8 {'within' if lost <= INT8_TOLERANCE else 'beyond'} {100 * INT8_TOLERANCE:.1f} "
                            f"points of fp32 on validation ({100 * acc['int8']:.2f}% vs {100 * acc['fp32']:.2f}%)"}
    log.info("ONNX export: serving %s (%s)", choice["default"], choice["reason"])
    (out_dir / "runtime.json").write_text(json.dumps(choice, indent=1))
    return {"onnx_fp32": str(fp32), "onnx_int8": str(int8), "runtime": str(out_dir / "runtime.json")}
