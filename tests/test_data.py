"""Data layer: IDX parsing, relabeling, permutation, FER2013 folder and CSV formats, bad input."""
from __future__ import annotations

import gzip
import shutil

import cv2
import numpy as np
import pytest
import torch

from cnnlab.core.data import DataError, load_splits, stratified_split
from cnnlab.core.data import fer2013, fmnist


def write_idx(path, array: np.ndarray, truncate: int = 0) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) - truncate])


def make_fmnist(folder, n_train=40, n_test=20, **corrupt) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = fmnist.FILES[split]
        write_idx(folder / img_name, rng.integers(0, 256, (n, 28, 28)), corrupt.get(f"{split}_images", 0))
        n_labels = n + corrupt.get(f"{split}_extra_labels", 0)
        write_idx(folder / lbl_name, np.arange(n_labels) % 10)


def test_idx_parsing_matches_real_file_shapes(fmnist_dir):
    images = fmnist.read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = fmnist.read_idx(fmnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


def test_relabel_mapping_into_three_classes():
    expected = {"T-shirt/top": "clothes", "Pullover": "clothes", "Dress": "clothes", "Coat": "clothes",
                "Shirt": "clothes", "Sandal": "shoes", "Sneaker": "shoes", "Ankle boot": "shoes",
                "Trouser": "others", "Bag": "others"}
    for original, name in enumerate(fmnist.CLASSES_10):
        assert fmnist.CLASSES_3[fmnist.RELABEL_3[original]] == expected[name]


def test_real_fmnist_splits_are_disjoint_stratified_and_relabeled(fmnist_dir):
    splits = load_splits("fmnist", str(fmnist_dir), val_fraction=0.1, seed=0)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (54000, 6000, 10000)
    counts = torch.bincount(splits["val"].labels, minlength=3)
    assert counts.tolist() == [3000, 1800, 1200]  # 5/3/2 original classes of 600 each
    ten = load_splits("fmnist", str(fmnist_dir), classes=10, seed=0)
    assert torch.equal(fmnist.RELABEL_3[ten["test"].labels], splits["test"].labels)


def test_permutation_is_a_bijection_applied_identically(fmnist_dir):
    perm = fmnist.permutation(7)
    assert torch.equal(torch.sort(perm).values, torch.arange(784))
    plain = load_splits("fmnist", str(fmnist_dir), seed=0)
    permuted = load_splits("fmnist", str(fmnist_dir), seed=0, permute=True, permute_seed=7)
    for name in ("train", "val", "test"):
        a, b = plain[name].images.reshape(-1, 784), permuted[name].images.reshape(-1, 784)
        assert torch.equal(a[:, perm], b)
        assert torch.equal(plain[name].labels, permuted[name].labels)
    assert plain["train"].digest != permuted["train"].digest


def test_stratified_split_is_seeded_and_disjoint():
    labels = torch.arange(1000) % 7
    keep, held = stratified_split(labels, 0.1, seed=3)
    assert len(set(keep.tolist()) & set(held.tolist())) == 0 and len(keep) + len(held) == 1000
    assert torch.equal(held, stratified_split(labels, 0.1, seed=3)[1])
    assert not torch.equal(held, stratified_split(labels, 0.1, seed=4)[1])


@pytest.mark.parametrize("corrupt, message", [
    ({"train_images": 100}, "truncated or corrupt"),
    ({"test_extra_labels": 3}, "has 20 images but"),
])
def test_bad_idx_files_name_the_file(tmp_path, corrupt, message):
    make_fmnist(tmp_path, **corrupt)
    fmnist._decoded.cache_clear()
    with pytest.raises(DataError, match=message) as err:
        fmnist.load(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_not_gzip_idx_is_rejected(tmp_path):
    make_fmnist(tmp_path)
    (tmp_path / fmnist.FILES["train"][0]).write_bytes(b"garbage")
    fmnist._decoded.cache_clear()
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        fmnist.load(str(tmp_path))


def test_unknown_class_mode_and_missing_folder(tmp_path):
    make_fmnist(tmp_path)
    with pytest.raises(DataError, match="classes must be 3 or 10, got 5"):
        fmnist.load(str(tmp_path), classes=5)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        fmnist.load(str(tmp_path / "nowhere"))


def write_csv_from_folder(folder, csv_path) -> None:
    """The original fer2013.csv format, rows in the folder loader's order."""
    lines = ["emotion,pixels,Usage"]
    for split, usage in (("train", "Training"), ("test", "PublicTest")):
        for path, label in fer2013._folder_files(folder, split):
            img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            lines.append(f'{label},{" ".join(map(str, img.flatten()))},{usage}')
    csv_path.write_text("\n".join(lines) + "\n")


def test_fer_folder_and_csv_give_identical_tensors(fer_subset, tmp_path):
    write_csv_from_folder(fer_subset, tmp_path / "fer2013.csv")
    train_f, test_f = fer2013.load(str(fer_subset))
    train_c, test_c = fer2013.load(str(tmp_path))
    assert train_f.images.shape == (280, 48, 48) and test_f.images.shape == (70, 48, 48)
    assert torch.equal(train_f.images, train_c.images) and torch.equal(train_f.labels, train_c.labels)
    assert torch.equal(test_f.images, test_c.images) and torch.equal(test_f.labels, test_c.labels)
    assert train_f.classes == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    # folder "neutral" maps to the CSV's 6, "sad" to 4
    neutral = [label for p, label in fer2013._folder_files(fer_subset, "train") if p.parent.name == "neutral"]
    assert set(neutral) == {6}


def test_fer_decode_is_cached_by_digest(fer_subset):
    train, _ = fer2013.load(str(fer_subset))
    cached = list(fer2013.cache_dir().glob(f"fer2013-{train.digest}-*.pt"))
    assert len(cached) == 1
    again, _ = fer2013.load(str(fer_subset))
    assert torch.equal(train.images, again.images) and again.digest == train.digest


@pytest.fixture
def fer_copy(fer_subset, tmp_path):
    dest = tmp_path / "fer"
    shutil.copytree(fer_subset, dest)
    return dest


def test_corrupt_image_is_named_or_skipped_and_counted(fer_copy):
    bad = next((fer_copy / "train" / "happy").iterdir())
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=bad.name):
        fer2013.load(str(fer_copy))
    train, _ = fer2013.load(str(fer_copy), on_bad="skip")
    assert len(train) == 279 and train.summary["skipped"] == 1 and bad.name in train.summary["skipped_examples"][0]


def test_wrong_size_image_and_unknown_folder(fer_copy):
    cv2.imwrite(str(fer_copy / "train" / "sad" / "big.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match="big.png: expected a 48x48 grayscale image"):
        fer2013.load(str(fer_copy))
    (fer_copy / "train" / "sad" / "big.png").unlink()
    (fer_copy / "train" / "bored").mkdir()
    with pytest.raises(DataError, match="unknown emotion folder 'bored'"):
        fer2013.load(str(fer_copy))


@pytest.mark.parametrize("row, message", [
    ("3,1 2 3,Training", "row 3: 3 pixel values, expected 2304"),
    ("3," + " ".join(["0"] * 2304) + ",Validation", "row 3: unknown Usage 'Validation'"),
    ("9," + " ".join(["0"] * 2304) + ",Training", "row 3: emotion 9 is outside"),
])
def test_bad_csv_rows_are_named(tmp_path, row, message):
    good = "0," + " ".join(["7"] * 2304) + ",Training"
    (tmp_path / "fer2013.csv").write_text(f"emotion,pixels,Usage\n{good}\n{row}\n")
    with pytest.raises(DataError, match=message):
        fer2013.load(str(tmp_path))


def test_missing_fer_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FER2013_DIR", raising=False)
    with pytest.raises(DataError, match="FER2013_DIR"):
        fer2013.load(None)
    with pytest.raises(DataError, match="expected train/ and test/"):
        fer2013.load(str(tmp_path))
