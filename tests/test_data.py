"""Data modules: CIFAR-10/100 (torchvision pickles, JPEG archive), Tiny-ImageNet (folder, archives), splits."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from confspec_lightning import RobustFairLitModule
from confspec_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    TinyImageNetDataModule,
    archive,
)
from confspec_lightning.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from confspec_lightning.data.device import DeviceTensorLoader

from helpers import make_module, make_trainer

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


# ------------------------------------------------------------------------------- archives
def test_decode_archive_matches_pillow_selected_indices_and_cache(tmp_path):
    path = tmp_path / "c10.npz"
    blobs = write_cifar10_archive(path)
    x, y = archive.decode_archive(path, "train")
    assert x.shape == (30, 3, 32, 32) and x.dtype == np.uint8 and x.flags.c_contiguous
    assert y.dtype == np.int64 and np.array_equal(y, np.repeat(np.arange(10), 3))
    assert np.array_equal(x, np.stack([pil_decode(b) for b in blobs["train"]]))
    xs, ys = archive.decode_archive(path, "train", indices=[7, 0, 29])
    assert np.array_equal(xs, x[[7, 0, 29]]) and np.array_equal(ys, y[[7, 0, 29]])
    assert archive.decode_archive(path, "train")[0] is x  # decoded once per process
    write_cifar10_archive(path, train_per_class=4)  # rewritten: size and mtime change, the cache notices
    os.utime(path, ns=(1, 1))
    assert archive.decode_archive(path, "train")[0].shape[0] == 40
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 40\)"):
        archive.decode_archive(path, "train", indices=[40])


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


@pytest.mark.parametrize(
    "how, error",
    [
        ("truncated", r"not a readable \.npz archive \(truncated or corrupt\?\)"),
        ("missing key", r"missing array 'train_offsets'; expected keys 'train_jpeg', 'train_offsets', 'train_labels'"),
        ("offsets end", r"the last of 'train_offsets' is \d+ but 'train_jpeg' has \d+ bytes"),
        ("offsets order", r"'train_offsets' must be increasing"),
        ("bad jpeg", r"\[train\] image 1: could not be decoded"),
    ],
)
def test_corrupt_archive_errors_name_the_file(tmp_path, how, error):
    path = tmp_path / "c10.npz"
    write_cifar10_archive(path)
    corrupt(path, how)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + error):
        archive.decode_archive(path, "train")


def test_missing_archive_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.npz")) + ".*train_jpeg"):
        archive.decode_archive(tmp_path / "nope.npz", "train")


# ------------------------------------------------------------------------------- CIFAR-10
def test_cifar10_torchvision_pickles_load_despite_md5(tmp_path):
    import torchvision

    names = [f"name{i}" for i in range(10)]
    (train_x, train_y), (test_x, test_y) = write_cifar10_pickles(tmp_path, names)
    # Stock torchvision rejects rebuilt pickles (md5 of the original files): the module must not.
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        torchvision.datasets.CIFAR10(str(tmp_path), train=True)
    dm = CIFAR10DataModule(str(tmp_path))  # auto: no archive here -> torchvision
    assert dm.source == "torchvision" and dm.class_names == names and dm.num_classes == 10
    assert dm.input_shape == (3, 32, 32) and not dm.has_own_val()
    x, y = dm.load_split("train")
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), train_x.reshape(-1, 3, 32, 32)) and np.array_equal(y.numpy(), train_y)
    x, y = dm.load_split("test")
    assert np.array_equal(x.numpy(), test_x.reshape(-1, 3, 32, 32)) and np.array_equal(y.numpy(), test_y)


def test_cifar10_archive_source(tmp_path):
    blobs = write_cifar10_archive(tmp_path / "c10" / "cifar10_q75_jpeg.npz")
    for root, source in ((tmp_path / "c10", "auto"), (tmp_path / "c10" / "cifar10_q75_jpeg.npz", "archive")):
        dm = CIFAR10DataModule(str(root), source=source, test_per_class=1)
        assert dm.source == "archive" and dm.class_names == list(CIFAR10_CLASSES)
        dm.setup()
        assert len(dm.splits["train"]) == 30 and len(dm.splits["test"]) == 10
        assert dm.splits["val"] is dm.splits["test"]  # no own val and no val_per_class: the test split
    x, _ = dm.load_split("test")
    assert np.array_equal(x[1].numpy(), pil_decode(blobs["test"][1]))


def test_cifar_missing_files_explain_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10DataModule(str(tmp_path / "none"))
    message = str(info.value)
    for part in ("cifar-10-batches-py", "data_batch_1", "test_batch", "batches.meta", "download: true", "archive"):
        assert part in message
    # With download the files may come later (prepare_data): no error yet, the standard class names.
    assert CIFAR100DataModule(str(tmp_path / "none"), download=True).class_names == list(CIFAR100_CLASSES)
    with pytest.raises(FileNotFoundError, match=r"cifar10_q75_jpeg\.npz"):
        CIFAR10DataModule(str(tmp_path / "none"), source="archive")
    write_cifar10_pickles(tmp_path, list(CIFAR10_CLASSES))
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: test_batch\)"):
        CIFAR10DataModule(str(tmp_path), source="torchvision")
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/ with files train, test, meta"):
        CIFAR100DataModule(str(tmp_path))


def test_bad_arguments_name_value_and_choices(tmp_path):
    with pytest.raises(ValueError, match=r"data\.source='web' is not accepted; choose one of 'auto', 'torchvision'"):
        CIFAR10DataModule(str(tmp_path), source="web")
    with pytest.raises(ValueError, match=r"data\.source='web' is not accepted; choose one of 'auto', 'folder'"):
        TinyImageNetDataModule(str(tmp_path), source="web")
    with pytest.raises(ValueError, match=r"data\.download='yes'"):
        CIFAR100DataModule(str(tmp_path), download="yes")
    write_cifar10_archive(tmp_path / "cifar10_q75_jpeg.npz")
    with pytest.raises(ValueError, match=r"data\.download=True only applies to data\.source='torchvision'"):
        CIFAR10DataModule(str(tmp_path), source="archive", download=True)
    with pytest.raises(ValueError, match=r"data\.batch_size=0"):
        CIFAR10DataModule(str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match=r"split='val' is not accepted; choose one of 'train', 'test'"):
        CIFAR10DataModule(str(tmp_path)).load_split("val")


def test_cifar100_torchvision_pickles_fine_labels(tmp_path):
    names = [f"fine{i}" for i in range(100)]
    (train_x, train_y), (test_x, test_y) = write_cifar100_pickles(tmp_path, names)
    dm = CIFAR100DataModule(str(tmp_path), val_per_class=1)
    assert dm.class_names == names and dm.num_classes == 100 and len(dm.mean) == 3
    x, y = dm.load_split("train")
    assert np.array_equal(x.numpy(), train_x.reshape(-1, 3, 32, 32)) and np.array_equal(y.numpy(), train_y)
    x, y = dm.load_split("test")
    assert np.array_equal(x.numpy(), test_x.reshape(-1, 3, 32, 32)) and np.array_equal(y.numpy(), test_y)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [100, 100, 100]
    assert torch.equal(torch.bincount(dm.splits["val"].tensors[1], minlength=100), torch.ones(100, dtype=torch.int64))


def test_default_class_names_match_the_original_meta_files():
    needs(SHARED / "cifar10_q75" / "batches.meta", SHARED / "cifar100_meta_only" / "meta")
    from torchvision.datasets.utils import check_integrity

    meta10 = SHARED / "cifar10_q75" / "batches.meta"
    assert check_integrity(str(meta10), "5ff9c542aee3614f3951f8cda6e48888")
    assert pickle.loads(meta10.read_bytes(), encoding="latin1")["label_names"] == list(CIFAR10_CLASSES)
    meta100 = pickle.loads((SHARED / "cifar100_meta_only" / "meta").read_bytes(), encoding="latin1")
    assert meta100["fine_label_names"] == list(CIFAR100_CLASSES)


# --------------------------------------------------------------------------- Tiny-ImageNet
@pytest.fixture
def tin_folder(tmp_path) -> Path:
    write_tin_folder(tmp_path / "tin")
    return tmp_path / "tin"


def test_tinyimagenet_folder_layout(tin_folder):
    dm = TinyImageNetDataModule(str(tin_folder))
    assert dm.source == "folder" and dm.num_classes == 3 and dm.input_shape == (3, 64, 64)
    assert dm.class_names == ["Egyptian cat", "crane (n00000001)", "crane (n00000002)"]  # first name, unique
    x, y = dm.load_split("train")
    assert x.shape == (36, 3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(y, torch.arange(3).repeat_interleave(12))
    files = [tin_folder / "train" / TIN_WNIDS[0] / "images" / f"{TIN_WNIDS[0]}_{i}.JPEG" for i in range(12)]
    assert np.array_equal(x[:12].numpy(), np.stack([pil_decode(f) for f in files]))  # natural order: _2 before _10
    gray = x[y == 1]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])  # grayscale -> RGB
    x, y = dm.load_split("test")  # the official val set
    lines = (tin_folder / "val" / "val_annotations.txt").read_text().splitlines()
    assert x.shape == (9, 3, 64, 64) and y.tolist() == [TIN_WNIDS.index(line.split("\t")[1]) for line in lines]
    assert not dm.has_own_val()


def test_tinyimagenet_archives_match_the_folder(tin_folder, tmp_path):
    write_tin_archives(tin_folder, tmp_path / "archives")
    write_tin_archives(tin_folder, tin_folder)  # both layouts in one root: auto prefers the folder
    assert TinyImageNetDataModule(str(tin_folder)).source == "folder"
    folder = TinyImageNetDataModule(str(tin_folder), source="folder")
    packed = TinyImageNetDataModule(str(tmp_path / "archives"))
    assert packed.source == "archive" and packed.class_names == folder.class_names
    for split in ("train", "test"):
        for a, b in zip(folder.load_split(split), packed.load_split(split), strict=True):
            assert torch.equal(a, b)


def test_tinyimagenet_errors(tin_folder, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        TinyImageNetDataModule(str(tmp_path / "none"))
    for part in ("wnids.txt", "train/<wnid>/images/*.JPEG", "val/val_annotations.txt", "tin200_train100.npz"):
        assert part in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"missing: tin200_train100\.npz, tin200_val\.npz"):
        TinyImageNetDataModule(str(tin_folder), source="archive")
    with (tin_folder / "val" / "val_annotations.txt").open("a") as f:
        f.write("val_99.JPEG\tn12345678\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations\.txt:10: expected 'file<TAB>wnid<TAB>box'"):
        TinyImageNetDataModule(str(tin_folder)).load_split("test")
    (tin_folder / "train" / TIN_WNIDS[2] / "images" / f"{TIN_WNIDS[2]}_3.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=re.escape(f"{TIN_WNIDS[2]}_3.JPEG") + ": could not be decoded"):
        TinyImageNetDataModule(str(tin_folder)).load_split("train")


# ---------------------------------------------------------------------- splits, augmentation
def test_stratified_validation_held_out_from_train(tmp_path):
    write_cifar10_pickles(tmp_path, list(CIFAR10_CLASSES), per_class_per_batch=2)  # 10 per class

    def splits(seed: int) -> dict[str, torch.utils.data.TensorDataset]:
        dm = CIFAR10DataModule(str(tmp_path), val_per_class=3, seed=seed, train_eval_per_class=2)
        dm.setup()
        return dm.splits

    def rows(dataset) -> set[bytes]:
        return {image.numpy().tobytes() for image in dataset.tensors[0]}

    first = splits(0)
    val_y = first["val"].tensors[1]
    assert torch.equal(torch.bincount(val_y, minlength=10), torch.full((10,), 3))
    assert torch.equal(torch.bincount(first["train"].tensors[1], minlength=10), torch.full((10,), 7))
    assert not rows(first["val"]) & rows(first["train"])  # disjoint
    assert rows(first["train_eval"]) <= rows(first["train"]) and len(first["train_eval"]) == 20
    assert len(first["test"]) == 30
    assert torch.equal(splits(0)["val"].tensors[0], first["val"].tensors[0])  # same seed, same split
    assert rows(splits(1)["val"]) != rows(first["val"])  # another seed, another split


def test_augmentation_only_while_training(tmp_path):
    write_cifar10_archive(tmp_path / "cifar10_q75_jpeg.npz")
    dm = CIFAR10DataModule(str(tmp_path), crop_padding=0)
    x = torch.from_numpy(images(16, 32, seed=3).transpose(0, 3, 1, 2).copy())
    y = torch.arange(16)
    expected = x.float() / 255
    for trainer in (None, SimpleNamespace(training=False)):
        dm.trainer = trainer
        out, out_y = dm.on_after_batch_transfer((x, y), 0)
        assert out.dtype == torch.float32 and torch.equal(out, expected) and out_y is y
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    out, _ = dm.on_after_batch_transfer((x, y), 0)
    flipped = torch.tensor([torch.equal(o, e.flip(-1)) for o, e in zip(out, expected, strict=True)])
    same = torch.tensor([torch.equal(o, e) for o, e in zip(out, expected, strict=True)])
    assert out.shape == x.shape and bool((flipped | same).all()) and flipped.any() and same.any()
    dm.crop_padding = 4
    out, _ = dm.on_after_batch_transfer((x, y), 0)
    assert out.shape == x.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, expected)
    dm.augment = False
    assert torch.equal(dm.on_after_batch_transfer((x, y), 0)[0], expected)


# ------------------------------------------------------------------------ real offline data
def test_real_cifar10_archive_few_images():
    needs(CIFAR10_NPZ)
    x, y = archive.decode_archive(CIFAR10_NPZ, "train", indices=[0, 4999, 5000, 49999])
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == [0, 0, 1, 9]
    assert 40 < x.mean() < 215 and x.std() > 10  # real pictures, not blank
    x, y = archive.decode_archive(CIFAR10_NPZ, "test", indices=[0, 9999])
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 9]
    meta = archive.load_arrays(CIFAR10_NPZ, ["classes", "test_labels"])
    assert meta["classes"].tolist() == list(CIFAR10_CLASSES)
    assert np.array_equal(np.bincount(meta["test_labels"]), np.full(10, 1000))


def test_real_tinyimagenet_archives_few_images():
    needs(TIN_DIR / "tin200_val.npz", TIN_DIR / "tin200_train100.npz")
    for name, n in (("tin200_val.npz", 10000), ("tin200_train100.npz", 20000)):
        x, y = archive.decode_archive(TIN_DIR / name, None, indices=[0, 1, n - 1])
        assert x.shape == (3, 3, 64, 64) and x.dtype == np.uint8 and ((y >= 0) & (y < 200)).all()
    dm = TinyImageNetDataModule(str(TIN_DIR))
    assert dm.source == "archive" and dm.num_classes == 200 and len(set(dm.class_names)) == 200
    assert dm.class_names[:3] == ["Egyptian cat", "reel", "volleyball"] and dm.wnids[0] == "n02124075"


def test_real_cifar10_module_exact_stratified_splits():
    needs(CIFAR10_NPZ)
    dm = CIFAR10DataModule(str(CIFAR10_NPZ.parent), val_per_class=4, train_per_class=10, test_per_class=3)
    dm.setup()
    for split, per_class in (("train", 10), ("val", 4), ("test", 3)):
        x, y = dm.splits[split].tensors
        assert x.shape == (10 * per_class, 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), per_class))


def test_real_cifar10_test_split_sha256():
    needs(CIFAR10_NPZ)
    if PIL.__version__ != "13.0.0":
        pytest.skip(f"the README's sha256 is for Pillow 13.0.0 (libjpeg-turbo); this is Pillow {PIL.__version__}")
    x, y = archive.decode_archive(CIFAR10_NPZ, "test")  # cached by the previous test when run together
    assert x.shape == (10000, 3, 32, 32) and np.array_equal(np.bincount(y), np.full(10, 1000))
    assert hashlib.sha256(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).tobytes()).hexdigest() == CIFAR10_TEST_SHA256


def test_real_tinyimagenet_module_exact_stratified_splits():
    needs(TIN_DIR / "tin200_val.npz", TIN_DIR / "tin200_train100.npz")
    dm = TinyImageNetDataModule(str(TIN_DIR), source="archive", val_per_class=2, train_per_class=3, test_per_class=1)
    dm.setup()
    for split, per_class in (("train", 3), ("val", 2), ("test", 1)):
        x, y = dm.splits[split].tensors
        assert x.shape == (200 * per_class, 3, 64, 64) and x.dtype == torch.uint8
        assert torch.equal(torch.bincount(y, minlength=200), torch.full((200,), per_class))
    archive.clear_cache()


# ------------------------------------------------------------------------ on-device loader
def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    """The real digits training split (1167 images: odd, so two ranks need padding)."""
    dm = DigitsDataModule()
    dm.setup()
    return dm.splits["train"].tensors


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world_size", [1, 2])
def test_device_loader_matches_distributed_sampler(world_size, shuffle):
    x, y = digits_train()
    dataset = TensorDataset(x, y)
    epoch = [0]
    for rank in range(world_size):
        loader = DeviceTensorLoader(
            x, y, 50, shuffle=shuffle, seed=3, epoch=lambda: epoch[0], rank=rank, world_size=world_size
        )
        for epoch[0] in (0, 1):
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=3)
            sampler.set_epoch(epoch[0])
            expected = list(DataLoader(dataset, batch_size=50, sampler=sampler))
            got = list(loader)
            assert len(loader) == len(expected) == len(got) and got[-1][1].shape[0] < 50  # last batch partial
            for (gx, gy), (ex, ey) in zip(got, expected, strict=True):
                assert torch.equal(gx, ex) and torch.equal(gy, ey)


def test_device_loader_order_is_a_function_of_the_epoch():
    x, y = digits_train()
    epoch = [0]
    loader = DeviceTensorLoader(x, y, 64, shuffle=True, seed=0, epoch=lambda: epoch[0])

    def labels() -> torch.Tensor:
        return torch.cat([batch_y for _, batch_y in loader])

    first = labels()
    assert torch.equal(labels(), first)  # a second pass in the same epoch (the CSR epoch pass): same order
    assert torch.equal(torch.sort(first).values, torch.sort(y).values)  # one process: every sample once
    epoch[0] = 1
    second = labels()
    assert not torch.equal(second, first)
    epoch[0] = 0
    assert torch.equal(labels(), first)  # a resumed run sees the same order
    assert torch.equal(DeviceTensorLoader(x, y, 64, seed=1).order(0).sort().values, torch.arange(len(y)))
    assert not torch.equal(DeviceTensorLoader(x, y, 64, seed=1).order(0), loader.order(0))


class BatchRecordingModule(RobustFairLitModule):
    """Records the training batches (after the device hooks) and those of the CSR epoch pass."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def epoch_context(self, epoch):
        context = super().epoch_context(epoch)
        passes = context.train_batches

        def recorded():
            for x, target in passes():
                self.seen.setdefault(("csr", self.current_epoch), []).append((x.clone(), target.clone()))
                yield x, target

        return dataclasses.replace(context, train_batches=recorded)

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(("train", self.current_epoch), []).append((batch[0].clone(), batch[1].clone()))
        return super().training_step(batch, batch_idx)


def test_on_device_fit_with_csr_epoch_pass():
    dm = DigitsDataModule(batch_size=32, on_device=True, seed=1)
    dm.setup()
    x, y = dm.splits["train"].tensors
    x_u8 = (x * 255).round().to(torch.uint8)  # the real images as uint8, the CIFAR-size case
    dm.splits["train"] = TensorDataset(x_u8, y)
    module = make_module(cls=BatchRecordingModule)
    initial = torch.nn.utils.parameters_to_vector(module.parameters()).clone()
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    loader = trainer.train_dataloader
    assert isinstance(loader, DeviceTensorLoader)  # Lightning neither wraps nor replaces it
    assert loader.images.dtype == torch.uint8 and loader.device == trainer.strategy.root_device
    assert (loader.rank, loader.world_size, loader.seed, loader.shuffle) == (0, 1, 1, True)
    for epoch in (0, 1):
        order = loader.order(epoch)[:96]
        expected_x = x_u8[order].float() / 255
        for source in ("train", "csr"):
            batches = module.seen[(source, epoch)]
            assert len(batches) == 3
            seen_x = torch.cat([b[0] for b in batches])
            assert seen_x.dtype == torch.float32 and 0 <= seen_x.min() and seen_x.max() <= 1
            assert torch.equal(seen_x, expected_x) and torch.equal(torch.cat([b[1] for b in batches]), y[order])
    assert not torch.equal(loader.order(0)[:96], loader.order(1)[:96])
    assert not torch.equal(torch.nn.utils.parameters_to_vector(module.parameters()), initial)  # it trained


def test_on_device_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match=r"data\.on_device='yes' is not accepted; it must be true or false\."):
        DigitsDataModule(on_device="yes")
    write_cifar10_archive(tmp_path / "cifar10_q75_jpeg.npz")
    with pytest.raises(ValueError, match=r"data\.on_device=1 is not accepted"):
        CIFAR10DataModule(str(tmp_path), on_device=1)
    assert CIFAR10DataModule(str(tmp_path), on_device=True).on_device  # the subclasses forward it
    with pytest.raises(RuntimeError, match=r"data\.on_device=True needs the data module attached to a Trainer"):
        DigitsDataModule(on_device=True).train_dataloader()
