"""CIFAR-10 (torchvision pickles or the compact JPEG archive) and CIFAR-100 (torchvision pickles)."""

from __future__ import annotations

import pickle
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from confspec_lightning.data import archive
from confspec_lightning.data.base import ClassificationDataModule
from confspec_lightning.validation import check_choice

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# fmt: off
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
)
# fmt: on

#: File name of the CIFAR-10 JPEG archive (see ``shared/data/README.md``).
CIFAR10_ARCHIVE = "cifar10_q75_jpeg.npz"

CIFAR10Source = Literal["auto", "torchvision", "archive"]
Split = Literal["train", "test"]


@cache
def _files_only_dataset(name: Literal["CIFAR10", "CIFAR100"]) -> type:
    """A subclass of torchvision's ``CIFAR10``/``CIFAR100`` that checks only that its files exist (no md5).

    torchvision compares the md5 of every batch file (and of the meta file) with those of the original
    tarball. Pickles in exactly torchvision's format but with other bytes (rebuilt from the offline JPEG
    archive, generated for tests, re-pickled by another Python) then fail with "Dataset not found or
    corrupted" although they load fine; a download still verifies the tarball's md5.
    """
    import torchvision.datasets

    base = getattr(torchvision.datasets, name)

    class FilesOnly(base):  # type: ignore[valid-type, misc]
        def _check_integrity(self) -> bool:
            folder = Path(self.root, self.base_folder)
            return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            self.classes = _read_meta(Path(self.root, self.base_folder, self.meta["filename"]), self.meta["key"])
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    FilesOnly.__name__ = FilesOnly.__qualname__ = f"FilesOnly{name}"
    return FilesOnly


def _read_meta(path: Path, key: str) -> list[str]:
    """Class names under ``key`` of a torchvision CIFAR meta pickle (``batches.meta`` or ``meta``)."""
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f, encoding="latin1")
        return [str(name) for name in meta[key]]
    except FileNotFoundError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a CIFAR meta pickle with {key!r} ({type(exc).__name__}: {exc}).") from exc


class _TorchvisionCIFAR(ClassificationDataModule):
    """Shared loading of torchvision's CIFAR pickles (``root/<folder>/...``)."""

    mean: ClassVar[list[float]]
    std: ClassVar[list[float]]
    input_shape: ClassVar[tuple[int, ...]] = (3, 32, 32)

    dataset_name: ClassVar[Literal["CIFAR10", "CIFAR100"]]
    folder: ClassVar[str]
    train_files: ClassVar[tuple[str, ...]]
    test_files: ClassVar[tuple[str, ...]]
    meta_file: ClassVar[str]
    meta_key: ClassVar[str]
    default_classes: ClassVar[tuple[str, ...]]

    def __init__(self, root: str, download: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(download, bool):
            raise ValueError(f"data.download={download!r} is not accepted; it must be true or false.")
        self.root = Path(root)
        self.download = download

    @property
    def torchvision_dir(self) -> Path:
        """Directory of the pickles in torchvision's layout."""
        return self.root / self.folder

    def _torchvision_class_names(self) -> list[str]:
        """Names from the meta pickle when present, else the standard ones (e.g. before a download)."""
        meta = self.torchvision_dir / self.meta_file
        names = _read_meta(meta, self.meta_key) if meta.is_file() else list(self.default_classes)
        if len(names) != self.num_classes:
            raise ValueError(f"{meta}: {len(names)} class names under {self.meta_key!r}; expected {self.num_classes}.")
        return names

    def _check_torchvision_files(self, alternative: str = "") -> None:
        """Raise ``FileNotFoundError`` (naming the directory and files) unless downloading or all exist."""
        if self.download:
            return
        files = (*self.train_files, *self.test_files, self.meta_file)
        missing = [f for f in files if not (self.torchvision_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.dataset_name} not found: expected torchvision's layout {self.torchvision_dir}/ with files "
                f"{', '.join(files)} (missing: {', '.join(missing)}). Pass `--data.init_args.download true` (in "
                f"YAML: data: init_args: download: true) where the network allows{alternative}."
            )

    def prepare_data(self) -> None:
        if self.download and self._uses_torchvision():
            for train in (True, False):
                _files_only_dataset(self.dataset_name)(str(self.root), train=train, download=True)

    def _uses_torchvision(self) -> bool:
        return True

    def _load_torchvision(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        self._check_torchvision_files()
        dataset = _files_only_dataset(self.dataset_name)(str(self.root), train=split == "train", download=self.download)
        images = np.ascontiguousarray(np.asarray(dataset.data, dtype=np.uint8).transpose(0, 3, 1, 2))
        return images, np.asarray(dataset.targets, dtype=np.int64)

    def _checked(self, images: np.ndarray, labels: np.ndarray, source: str) -> tuple[Tensor, Tensor]:
        if images.shape[1:] != self.input_shape:
            raise ValueError(f"{source}: images of shape {images.shape[1:]}; expected {self.input_shape}.")
        if len(labels) != len(images):
            raise ValueError(f"{source}: {len(labels)} labels for {len(images)} images.")
        self.check_label_range(labels, source)
        return torch.from_numpy(images), torch.from_numpy(labels)


class CIFAR10DataModule(_TorchvisionCIFAR):
    """CIFAR-10 (50000 train, 10000 test, 32x32 RGB) from torchvision's pickles or the JPEG archive.

    Validation is held out from train (``val_per_class``), else it is the test split.

    Args:
        root: for ``archive``, the ``.npz`` file or a directory holding ``cifar10_q75_jpeg.npz``
            (keys ``train_jpeg``/``train_offsets``/``train_labels``, the same for ``test_``, and
            ``classes``; see ``shared/data/README.md``); for ``torchvision``, the directory holding
            ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.
        source: ``"archive"``, ``"torchvision"``, or ``"auto"`` (the archive if one is found, else torchvision).
        download: let torchvision download the pickles when they are missing (needs the network).
        **kwargs: the :class:`~confspec_lightning.data.base.ClassificationDataModule` arguments
            (batch sizes, ``val_per_class``, ``train_per_class``, ``test_per_class``,
            ``train_eval_per_class``, ``augment``, ``crop_padding``, ``seed``, ``shuffle``, ``num_workers``,
            ``on_device``).
    """

    num_classes: ClassVar[int] = 10
    class_names: ClassVar[list[str]] = list(CIFAR10_CLASSES)
    mean: ClassVar[list[float]] = [0.4914, 0.4822, 0.4465]
    std: ClassVar[list[float]] = [0.2471, 0.2435, 0.2616]

    dataset_name = "CIFAR10"
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    meta_key = "label_names"
    default_classes = CIFAR10_CLASSES

    def __init__(
        self,
        root: str = "data/cifar10",
        source: CIFAR10Source = "auto",
        download: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root,
            download=download,
            **kwargs,
        )
        check_choice("data.source", source, CIFAR10Source)
        archive_path = self.root if self.root.suffix == ".npz" else self.root / CIFAR10_ARCHIVE
        if source == "auto":
            source = "archive" if archive_path.is_file() else "torchvision"
        self.source = source
        self.archive_path: Path | None = None
        if source == "archive":
            if download:
                raise ValueError(
                    "data.download=True only applies to data.source='torchvision'; the JPEG archive is a local file."
                )
            if not archive_path.is_file():
                raise FileNotFoundError(
                    f"CIFAR-10 archive not found: {archive_path} (data.root must be the .npz file or a directory "
                    f"holding {CIFAR10_ARCHIVE})."
                )
            self.archive_path = archive_path
            names = [str(c) for c in archive.load_arrays(archive_path, ["classes"])["classes"]]
            if len(names) != self.num_classes:
                raise ValueError(f"{archive_path}: {len(names)} names in 'classes'; expected {self.num_classes}.")
        else:
            self._check_torchvision_files(
                alternative=(
                    f", or use the JPEG archive (data.source: archive, data.root: the {CIFAR10_ARCHIVE} file or its "
                    "directory)"
                )
            )
            names = self._torchvision_class_names()
        self.class_names = names

    def _uses_torchvision(self) -> bool:
        return self.source == "torchvision"

    def split_labels(self, split: str) -> np.ndarray | None:
        """The archive's labels of ``split``, so :meth:`setup` decodes only the images it keeps.

        ``None`` for torchvision's pickles (read whole).
        """
        check_choice("split", split, Split)
        if self.archive_path is None:
            return None
        labels = archive.load_split_labels(self.archive_path, split)
        self.check_label_range(labels, f"{self.archive_path}[{split}]")
        return labels

    def load_split(self, split: str, indices: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        check_choice("split", split, Split)
        if self.archive_path is not None:
            images, labels = archive.decode_archive(self.archive_path, split, indices)
            return self._checked(images, labels, f"{self.archive_path}[{split}]")
        if indices is not None:
            raise ValueError("indices apply to the JPEG archive only (torchvision's pickles are read whole).")
        return self._checked(*self._load_torchvision(split), str(self.torchvision_dir))


class CIFAR100DataModule(_TorchvisionCIFAR):
    """CIFAR-100 (50000 train, 10000 test, 32x32 RGB, the 100 fine labels) from torchvision's pickles.

    Validation is held out from train (``val_per_class``), else it is the test split.

    Args:
        root: the directory holding ``cifar-100-python/{train,test,meta}`` (torchvision's layout).
        download: let torchvision download the pickles when they are missing (needs the network).
        **kwargs: the :class:`~confspec_lightning.data.base.ClassificationDataModule` arguments
            (batch sizes, ``val_per_class``, ``train_per_class``, ``test_per_class``,
            ``train_eval_per_class``, ``augment``, ``crop_padding``, ``seed``, ``shuffle``, ``num_workers``,
            ``on_device``).
    """

    num_classes: ClassVar[int] = 100
    class_names: ClassVar[list[str]] = list(CIFAR100_CLASSES)
    mean: ClassVar[list[float]] = [0.5071, 0.4865, 0.4409]
    std: ClassVar[list[float]] = [0.2673, 0.2564, 0.2762]

    dataset_name = "CIFAR100"
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    meta_key = "fine_label_names"
    default_classes = CIFAR100_CLASSES

    def __init__(
        self,
        root: str = "data/cifar100",
        download: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root,
            download=download,
            **kwargs,
        )
        self._check_torchvision_files(alternative=" (no offline copy of the CIFAR-100 images exists)")
        self.class_names = self._torchvision_class_names()

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        check_choice("split", split, Split)
        return self._checked(*self._load_torchvision(split), str(self.torchvision_dir))
