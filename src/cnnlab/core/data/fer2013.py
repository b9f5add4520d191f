"""FER2013 from the Kaggle folder layout (train/<emotion>/*.jpg) or the original fer2013.csv."""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from cnnlab.core import logs
from cnnlab.core.data import DataError, Option, Split, cache_dir, register_dataset

# canonical order = the CSV's numbering
CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
SIZE = 48
CSV_USAGE = {"Training": "train", "PublicTest": "public", "PrivateTest": "private"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
log = logging.getLogger(__name__)
HOW_TO_GET = ("download FER2013 (Kaggle 'msambare/fer2013' folder layout, or the original fer2013.csv) and "
              "pass data_dir or set FER2013_DIR")


def decode_gray(data: bytes, source: str) -> np.ndarray:
    """Decode image bytes to a uint8 (H, W) grayscale array; the error names `source`."""
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if img is None:
        raise DataError(f"{source}: not a decodable image")
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.dtype != np.uint8:
        raise DataError(f"{source}: expected 8-bit pixels, got {img.dtype}")
    return img


def find_source(data_dir: str | None) -> Path:
    candidates = [("argument", data_dir), ("FER2013_DIR", os.environ.get("FER2013_DIR"))]
    for origin, d in candidates:
        if not d:
            continue
        p = Path(d)
        if p.is_file() and p.suffix == ".csv":
            return p
        if (p / "fer2013.csv").is_file():
            return p / "fer2013.csv"
        if (p / "train").is_dir() and (p / "test").is_dir():
            return p
        raise DataError(f"FER2013 not found in {p} ({origin}): expected train/ and test/ folders or fer2013.csv. "
                        f"To get it: {HOW_TO_GET}")
    raise DataError(f"FER2013 location not given: no data_dir argument and FER2013_DIR is not set. To get it: {HOW_TO_GET}")


def _check_shape(img: np.ndarray, source: str) -> None:
    if img.shape != (SIZE, SIZE):
        raise DataError(f"{source}: expected a {SIZE}x{SIZE} grayscale image, got shape {img.shape}")


def _folder_files(root: Path, split: str) -> list[tuple[Path, int]]:
    folder = root / split
    files = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name.lower() not in CLASSES:
            raise DataError(f"{sub}: unknown emotion folder {sub.name!r}; expected one of {CLASSES}")
        label = CLASSES.index(sub.name.lower())
        files += [(f, label) for f in sorted(sub.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{folder}: no images found")
    return files


def _decode_folder(split: str, files: list[tuple[Path, int]], contents: list[bytes], on_bad: str, summary: dict):
    images, labels = [], []
    for (path, label), data in logs.progress(zip(files, contents), len(files), f"FER2013: decoding {split}/"):
        try:
            img = decode_gray(data, str(path))
            _check_shape(img, str(path))
        except DataError as e:
            if on_bad != "skip":
                raise
            summary.setdefault("skipped", []).append(str(e))
            continue
        images.append(img)
        labels.append(label)
    return images, labels


def _decode_csv(path: Path, on_bad: str, summary: dict) -> dict[str, tuple[list, list]]:
    out = {v: ([], []) for v in CSV_USAGE.values()}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"emotion", "pixels", "Usage"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for row_no, row in enumerate(logs.progress(reader, None, f"FER2013: decoding {path.name}"), start=2):
            where = f"{path} row {row_no}"
            try:
                usage = CSV_USAGE.get(row["Usage"])
                if usage is None:
                    raise DataError(f"{where}: unknown Usage {row['Usage']!r}; expected one of {list(CSV_USAGE)}")
                label = int(row["emotion"])
                if not 0 <= label < len(CLASSES):
                    raise DataError(f"{where}: emotion {label} is outside 0..{len(CLASSES) - 1}")
                pixels = np.array(row["pixels"].split(), dtype=np.int64)
                if pixels.size != SIZE * SIZE:
                    raise DataError(f"{where}: {pixels.size} pixel values, expected {SIZE * SIZE}")
                if pixels.min() < 0 or pixels.max() > 255:
                    raise DataError(f"{where}: pixel values outside 0..255")
            except (ValueError, TypeError) as e:
                if not isinstance(e, DataError):
                    e = DataError(f"{where}: {e}")
                if on_bad != "skip":
                    raise e from None
                summary.setdefault("skipped", []).append(str(e))
                continue
            out[usage][0].append(pixels.astype(np.uint8).reshape(SIZE, SIZE))
            out[usage][1].append(label)
    return out


def _to_tensors(images: list, labels: list) -> tuple[torch.Tensor, torch.Tensor]:
    if not images:
        return torch.zeros((0, SIZE, SIZE), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _decode_all(source: Path, on_bad: str) -> tuple[str, dict]:
    """Decode the whole source once; cached on disk under its content digest."""
    h = hashlib.sha256()
    if source.is_file():
        h.update(source.read_bytes())
        files, contents = None, None
    else:
        files = {s: _folder_files(source, s) for s in ("train", "test")}
        contents = {}
        for s, entries in files.items():
            reading = logs.progress(entries, len(entries), f"FER2013: reading {s}/", after=5)  # slow when disk-cold
            contents[s] = [p.read_bytes() for p, _ in reading]
            for (p, label), data in zip(entries, contents[s]):
                h.update(f"{s}/{label}/{p.name}:{len(data)}".encode())
                h.update(data)
    digest = h.hexdigest()[:16]
    cached = cache_dir() / f"fer2013-{digest}-{on_bad}.pt"
    if cached.exists():
        return digest, torch.load(cached)
    summary: dict = {}
    if files is None:
        decoded = {k: _to_tensors(*v) for k, v in _decode_csv(source, on_bad, summary).items()}
    else:
        decoded = {s: _to_tensors(*_decode_folder(s, files[s], contents[s], on_bad, summary)) for s in files}
    result = {"splits": decoded, "summary": {"skipped": len(summary.get("skipped", [])),
                                             "skipped_examples": summary.get("skipped", [])[:20]}}
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    torch.save(result, tmp)
    os.replace(tmp, cached)  # never leave a half-written cache that looks complete
    log.info("FER2013: decoded once; later runs load %s", cached)
    return digest, result


@register_dataset("fer2013", title="FER2013", size=SIZE, channels=1, options=(
    Option("on_bad", str, "error", ("error", "skip")),  # a corrupt or wrong-size image: stop, or skip and count it
    Option("test_split", str, "public", tuple(v for v in CSV_USAGE.values() if v != "train"))))
def load(data_dir: str | None, on_bad: str, test_split: str) -> tuple[Split, Split]:
    source = find_source(data_dir)
    digest, result = _decode_all(source, on_bad)
    splits = result["splits"]
    if "train" in splits and "public" not in splits:  # folder layout: its test/ is one half (PublicTest)
        splits = {"train": splits["train"], "public": splits["test"]}
    if test_split not in splits:
        raise DataError(f"test_split {test_split!r} is not available in {source}; available: "
                        f"{[k for k in splits if k != 'train']}")
    if len(splits["train"][0]) == 0:
        raise DataError(f"{source}: no training images")
    summary = dict(result["summary"], source=str(source), test_split=test_split)
    train = Split(*splits["train"], CLASSES, digest, "train", summary)
    test = Split(*splits[test_split], CLASSES, digest, "test", summary)
    return train, test
