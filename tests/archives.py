"""Small image archives and pickles in the data sets' formats, written for tests; the offline data's paths."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from confspec_lightning.data import (
    DigitsDataModule,
)
from confspec_lightning.data.cifar import CIFAR10_CLASSES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


CIFAR10_NPZ = SHARED / "cifar10_q75" / "cifar10_q75_jpeg.npz"


TIN_DIR = SHARED / "tinyimagenet200_subset"


# sha256 of the decoded CIFAR-10 test split, uint8 (N, H, W, 3), with Pillow 13.0.0 (shared/data/README.md).
CIFAR10_TEST_SHA256 = "5a6aa8185204d80b65d3dfb540696dadd5f10d185ded226a96665d3e0fc6259f"


def needs(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"offline data not found (expected beside the repository): {', '.join(missing)}")


# ------------------------------------------------------------------ fake data in each layout
def images(n: int, size: int, seed: int, channels: int = 3) -> np.ndarray:
    """n distinct uint8 images (N, H, W, C) smooth enough to survive JPEG recognisably."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, size // 8, size // 8, channels), dtype=np.uint8)
    return coarse.repeat(8, axis=1).repeat(8, axis=2)


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def pil_decode(data: bytes | Path) -> np.ndarray:
    """Reference decode (H, W, 3) -> (3, H, W)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    return np.asarray(Image.open(source).convert("RGB")).transpose(2, 0, 1)


def pack(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


def write_cifar10_archive(path: Path, train_per_class: int = 3, test_per_class: int = 2) -> dict[str, list[bytes]]:
    """A CIFAR-10 archive in the README's format; returns the JPEG bytes of each split."""
    arrays: dict[str, np.ndarray] = {"classes": np.array(CIFAR10_CLASSES)}
    blobs = {}
    for seed, (split, per_class) in enumerate((("train", train_per_class), ("test", test_per_class))):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        blobs[split] = [jpeg(im) for im in images(len(labels), 32, seed)]
        arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"] = pack(blobs[split])
        arrays[f"{split}_labels"] = labels
        arrays[f"{split}_names"] = np.array([f"{split}/{CIFAR10_CLASSES[y]}/{i:04d}.jpg" for i, y in enumerate(labels)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return blobs


def write_cifar10_pickles(root: Path, names: list[str], per_class_per_batch: int = 2, test_per_class: int = 3):
    """torchvision's ``cifar-10-batches-py`` layout; returns (train data, labels), (test data, labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = []
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    for files, per_class in ((train_files, per_class_per_batch), (["test_batch"], test_per_class)):
        datas, labels = [], []
        for file in files:
            y = rng.permutation(np.repeat(np.arange(10), per_class))
            data = rng.integers(0, 256, (len(y), 3072), dtype=np.uint8)
            entry = {"batch_label": file, "labels": y.tolist(), "data": data, "filenames": [f"{i}.png" for i in y]}
            (folder / file).write_bytes(pickle.dumps(entry))
            datas.append(data)
            labels.append(y)
        out.append((np.concatenate(datas), np.concatenate(labels)))
    meta = {"num_cases_per_batch": 10 * per_class_per_batch, "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return out


def write_cifar100_pickles(root: Path, names: list[str]):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = []
    for file, per_class in (("train", 2), ("test", 1)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        entry = {
            "filenames": [f"{i}.png" for i in fine],
            "batch_label": file,
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": data,
        }
        (folder / file).write_bytes(pickle.dumps(entry))
        out.append((data, fine))
    meta = {"fine_label_names": names, "coarse_label_names": [f"super{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return out


TIN_WNIDS = ["n00000003", "n00000001", "n00000002"]


TIN_WORDS = {"n00000001": "crane, bird", "n00000002": "crane, machine", "n00000003": "Egyptian cat, cat"}


def write_tin_folder(root: Path, train_per_class: int = 12, val_per_class: int = 3) -> None:
    """Tiny-ImageNet's folder layout with 3 classes (the second one grayscale), names ``<wnid>_0..11``."""
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in TIN_WNIDS))
    words = {**TIN_WORDS, "n09999999": "unrelated"}
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in words.items()))
    for label, wnid in enumerate(TIN_WNIDS):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i, im in enumerate(images(train_per_class, 64, seed=10 + label, channels=1 if label == 1 else 3)):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg(im))
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(3), val_per_class))
    lines = []
    for i, (label, im) in enumerate(zip(labels, images(len(labels), 64, seed=20), strict=True)):
        (root / "val" / "images" / f"val_{i}.JPEG").write_bytes(jpeg(im[..., :1] if label == 1 else im))
        lines.append(f"val_{i}.JPEG\t{TIN_WNIDS[label]}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))


def write_tin_archives(folder_root: Path, out: Path) -> None:
    """The README's Tiny-ImageNet archives holding the very JPEG files of a folder layout."""
    out.mkdir(parents=True, exist_ok=True)
    train = [(f, y) for y, w in enumerate(TIN_WNIDS) for f in sorted((folder_root / "train" / w / "images").iterdir())]
    train.sort(key=lambda item: (item[1], int(re.findall(r"_(\d+)\.", item[0].name)[0])))
    val = []
    for line in (folder_root / "val" / "val_annotations.txt").read_text().splitlines():
        file, wnid = line.split("\t")[:2]
        val.append((folder_root / "val" / "images" / file, TIN_WNIDS.index(wnid)))
    for name, items in (("tin200_train100.npz", train), ("tin200_val.npz", val)):
        data, offsets = pack([f.read_bytes() for f, _ in items])
        np.savez(
            out / name,
            jpeg=data,
            offsets=offsets,
            labels=np.array([y for _, y in items], dtype=np.uint8),
            names=np.array([f.name for f, _ in items]),
            wnids=np.array(TIN_WNIDS),
            class_names=np.array([TIN_WORDS[w] for w in TIN_WNIDS]),
        )


def corrupt(path: Path, how: str) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    if how == "missing key":
        del arrays["train_offsets"]
    elif how == "offsets end":
        arrays["train_offsets"] = arrays["train_offsets"][:-1]
        arrays["train_labels"] = arrays["train_labels"][:-1]
    elif how == "offsets order":
        arrays["train_offsets"][[3, 4]] = arrays["train_offsets"][[4, 3]]
    elif how == "bad jpeg":
        start, stop = arrays["train_offsets"][1:3]
        arrays["train_jpeg"][start:stop] = 0
    np.savez(path, **arrays)


# --------------------------------------------------------------------------- Tiny-ImageNet
# ------------------------------------------------------------------------ on-device loader
def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    """The real digits training split (1167 images: odd, so two ranks need padding)."""
    dm = DigitsDataModule()
    dm.setup()
    return dm.splits["train"].tensors
