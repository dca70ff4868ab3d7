"""The JPEG archive reader: decoding, caching, errors naming the file; the real archives."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from confspec_lightning.data import (
    TinyImageNetDataModule,
    archive,
)
from confspec_lightning.data.cifar import CIFAR10_CLASSES

from archives import CIFAR10_NPZ, TIN_DIR, corrupt, needs, pil_decode, write_cifar10_archive


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
