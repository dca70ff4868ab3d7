"""The Tiny-ImageNet data module: folder layout, archives, errors, real splits."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from confspec_lightning.data import (
    TinyImageNetDataModule,
    archive,
)

from archives import TIN_DIR, TIN_WNIDS, needs, pil_decode, write_tin_archives, write_tin_folder


@pytest.fixture
def tin_folder(tmp_path):
    """A small Tiny-ImageNet folder tree (12 train / 3 val images per class) in its own directory."""
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


def test_real_tinyimagenet_module_exact_stratified_splits():
    needs(TIN_DIR / "tin200_val.npz", TIN_DIR / "tin200_train100.npz")
    dm = TinyImageNetDataModule(str(TIN_DIR), source="archive", val_per_class=2, train_per_class=3, test_per_class=1)
    dm.setup()
    for split, per_class in (("train", 3), ("val", 2), ("test", 1)):
        x, y = dm.splits[split].tensors
        assert x.shape == (200 * per_class, 3, 64, 64) and x.dtype == torch.uint8
        assert torch.equal(torch.bincount(y, minlength=200), torch.full((200,), per_class))
    archive.clear_cache()
