"""CIFAR-10/100 data modules: torchvision pickles and the JPEG archive, class names, splits."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import PIL
import pytest
import torch

from confspec_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    TinyImageNetDataModule,
    archive,
)
from confspec_lightning.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES

from archives import (
    CIFAR10_NPZ,
    CIFAR10_TEST_SHA256,
    SHARED,
    needs,
    pil_decode,
    write_cifar10_archive,
    write_cifar10_pickles,
    write_cifar100_pickles,
)


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


class _WholeSplits(CIFAR10DataModule):
    """The same module choosing its subsets after decoding whole splits (the base class's default)."""

    def split_labels(self, split):
        return None


def test_archive_subsets_decode_only_their_images_and_equal_a_whole_split_selection(tmp_path, monkeypatch):
    write_cifar10_archive(tmp_path / "cifar10_q75_jpeg.npz")
    archive.clear_cache()
    decoded = []
    decode = archive.decode_image
    monkeypatch.setattr(archive, "decode_image", lambda data, source: decoded.append(source) or decode(data, source))
    subsets = dict(val_per_class=1, train_per_class=1, train_eval_per_class=1, test_per_class=1)
    lazy, whole = CIFAR10DataModule(str(tmp_path), **subsets), _WholeSplits(str(tmp_path), **subsets)
    lazy.setup()
    # val 1 + train 1 (train_eval is drawn from it) per class of train, 1 per class of test
    assert len(decoded) == 20 + 10 and len({s for s in decoded if "[train]" in s}) == 20
    decoded.clear()
    whole.setup()
    assert len(decoded) == 30 + 20  # both splits whole
    assert lazy.splits.keys() == whole.splits.keys() == {"train", "val", "train_eval", "test"}
    for name in lazy.splits:
        for a, b in zip(lazy.splits[name].tensors, whole.splits[name].tensors, strict=True):
            assert torch.equal(a, b), name
    archive.clear_cache()


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
