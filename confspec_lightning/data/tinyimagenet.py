"""Tiny-ImageNet-200 (64x64 RGB, 200 classes) from the standard folder layout or the compact JPEG archives.

The official test images have no labels, so the official validation set (50 per class) serves as the
test split here; validation is held out from train (``val_per_class``), else it is that test split.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from confspec_lightning.data import archive
from confspec_lightning.data.base import ClassificationDataModule
from confspec_lightning.validation import check_choice

#: File names of the Tiny-ImageNet archives (see ``shared/data/README.md``).
TIN_TRAIN_ARCHIVE = "tin200_train100.npz"
TIN_VAL_ARCHIVE = "tin200_val.npz"

Split = Literal["train", "test"]
TinyImageNetSource = Literal["auto", "folder", "archive"]
IMAGE_SUFFIXES = (".jpeg", ".jpg")
FOLDER_FILES = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")


def unique_class_names(names: list[str], wnids: list[str]) -> list[str]:
    """The first comma-separated name of every class, with `` (<wnid>)`` appended where names clash."""
    first = [name.split(",")[0].strip() or wnid for name, wnid in zip(names, wnids, strict=True)]
    counts = Counter(first)
    return [f"{name} ({wnid})" if counts[name] > 1 else name for name, wnid in zip(first, wnids, strict=True)]


def natural_key(name: str) -> list[int | str]:
    """Sort key putting ``n01443537_2.JPEG`` before ``n01443537_10.JPEG``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class TinyImageNetDataModule(ClassificationDataModule):
    """Tiny-ImageNet-200: train split, and the official val set as the test split (uint8 (3, 64, 64)).

    Args:
        root: a directory in one of two layouts. ``folder`` (the standard one): ``wnids.txt``,
            ``words.txt`` (optional, for class names), ``train/<wnid>/images/*.JPEG``,
            ``val/images/*.JPEG`` and ``val/val_annotations.txt`` (tab-separated file, wnid, box).
            ``archive``: ``tin200_train100.npz`` and ``tin200_val.npz`` (keys ``jpeg``, ``offsets``,
            ``labels`` indexing ``wnids``, ``class_names``; see ``shared/data/README.md``).
        source: ``"folder"``, ``"archive"``, or ``"auto"`` (the folder layout if ``wnids.txt`` is there,
            since it holds the full train set, else the archives).
        **kwargs: the :class:`~confspec_lightning.data.base.ClassificationDataModule` arguments
            (batch sizes, ``val_per_class``, ``train_per_class``, ``test_per_class``,
            ``train_eval_per_class``, ``augment``, ``crop_padding``, ``seed``, ``shuffle``, ``num_workers``,
            ``on_device``).
    """

    num_classes: ClassVar[int] = 200
    class_names: ClassVar[list[str]] = []
    mean: ClassVar[list[float]] = [0.4802, 0.4481, 0.3975]
    std: ClassVar[list[float]] = [0.2770, 0.2691, 0.2821]
    input_shape: ClassVar[tuple[int, ...]] = (3, 64, 64)

    def __init__(
        self,
        root: str = "data/tiny-imagenet-200",
        source: TinyImageNetSource = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            **kwargs,
        )
        check_choice("data.source", source, TinyImageNetSource)
        self.root = Path(root)
        archives = (self.root / TIN_TRAIN_ARCHIVE, self.root / TIN_VAL_ARCHIVE)
        if source == "auto":
            if (self.root / "wnids.txt").is_file() or not all(p.is_file() for p in archives):
                source = "folder"
            else:
                source = "archive"
        self.source = source
        if source == "folder":
            missing = [f for f in FOLDER_FILES if not (self.root / f).exists()]
            if missing:
                raise FileNotFoundError(
                    f"Tiny-ImageNet not found in {self.root}: expected the folder layout wnids.txt, words.txt, "
                    "train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt (missing: "
                    f"{', '.join(missing)}), or the archives {TIN_TRAIN_ARCHIVE} and {TIN_VAL_ARCHIVE} "
                    "(data.source: archive)."
                )
            self.wnids = self._read_wnids()
            names = self._read_words()
        else:
            missing = [p.name for p in archives if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"Tiny-ImageNet archives not found in {self.root}: expected {TIN_TRAIN_ARCHIVE} and "
                    f"{TIN_VAL_ARCHIVE} (missing: {', '.join(missing)})."
                )
            meta = archive.load_arrays(archives[0], ["wnids", "class_names"])
            self.wnids = [str(w) for w in meta["wnids"]]
            names = [str(n) for n in meta["class_names"]]
            if len(names) != len(self.wnids):
                raise ValueError(f"{archives[0]}: {len(names)} class_names for {len(self.wnids)} wnids.")
            val_wnids = [str(w) for w in archive.load_arrays(archives[1], ["wnids"])["wnids"]]
            if val_wnids != self.wnids:
                raise ValueError(f"{archives[1]}: its 'wnids' differ from those of {archives[0]}.")
        if len(set(self.wnids)) != len(self.wnids) or not self.wnids:
            raise ValueError(f"{self.root}: the wnids must be unique and non-empty; got {len(self.wnids)} entries.")
        self.num_classes = len(self.wnids)
        self.class_names = unique_class_names(names, self.wnids)

    # ----------------------------------------------------------- metadata
    def _read_wnids(self) -> list[str]:
        return [line.strip() for line in (self.root / "wnids.txt").read_text().splitlines() if line.strip()]

    def _read_words(self) -> list[str]:
        """Names of the wnids from ``words.txt`` (``wnid<TAB>names``); the wnid itself where absent."""
        words = self.root / "words.txt"
        table: dict[str, str] = {}
        if words.is_file():
            for line in words.read_text().splitlines():
                wnid, _, names = line.partition("\t")
                table[wnid.strip()] = names.strip()
        return [table.get(wnid) or wnid for wnid in self.wnids]

    # ------------------------------------------------------------- splits
    def _archive_path(self, split: str) -> Path:
        return self.root / (TIN_TRAIN_ARCHIVE if split == "train" else TIN_VAL_ARCHIVE)

    def split_labels(self, split: str) -> np.ndarray | None:
        """The archive's labels of ``split``, so :meth:`setup` decodes only the images it keeps.

        ``None`` for the folder layout (decoded whole).
        """
        check_choice("split", split, Split)
        if self.source != "archive":
            return None
        path = self._archive_path(split)
        labels = archive.load_split_labels(path, None)
        self.check_label_range(labels, str(path))
        return labels

    def load_split(self, split: str, indices: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        check_choice("split", split, Split)
        if self.source == "archive":
            path = self._archive_path(split)
            images, labels = archive.decode_archive(path, None, indices)
            source = str(path)
        elif indices is not None:
            raise ValueError("indices apply to the archives only (the folder layout is read whole).")
        else:
            anchor = self.root / ("wnids.txt" if split == "train" else "val/val_annotations.txt")
            key = ("tinyimagenet-folder", str(self.root.resolve()), split, *archive.file_key(anchor))
            images, labels = archive.cached(key, lambda: self._decode_folder(split))
            source = str(self.root / ("train" if split == "train" else "val"))
        if images.shape[1:] != self.input_shape:
            raise ValueError(f"{source}: images of shape {images.shape[1:]}; expected {self.input_shape}.")
        self.check_label_range(labels, source)
        return torch.from_numpy(images), torch.from_numpy(labels)

    def _folder_files(self, split: str) -> tuple[list[Path], np.ndarray]:
        """Image files and labels of ``split`` in the folder layout (train: per wnid, natural order)."""
        files: list[Path] = []
        labels: list[int] = []
        if split == "train":
            for label, wnid in enumerate(self.wnids):
                folder = self.root / "train" / wnid / "images"
                if not folder.is_dir():
                    raise FileNotFoundError(f"{folder}: missing image folder of class {wnid!r} (listed in wnids.txt).")
                names = sorted(
                    (p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key
                )
                if not names:
                    raise FileNotFoundError(f"{folder}: no *.JPEG images of class {wnid!r}.")
                files += [folder / name for name in names]
                labels += [label] * len(names)
        else:
            index = {wnid: i for i, wnid in enumerate(self.wnids)}
            annotations = self.root / "val" / "val_annotations.txt"
            for number, line in enumerate(annotations.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 2 or fields[1].strip() not in index:
                    raise ValueError(
                        f"{annotations}:{number}: expected 'file<TAB>wnid<TAB>box' with a wnid of wnids.txt, "
                        f"got {line!r}."
                    )
                files.append(self.root / "val" / "images" / fields[0].strip())
                labels.append(index[fields[1].strip()])
            if not files:
                raise ValueError(f"{annotations}: no annotated images.")
        return files, np.asarray(labels, dtype=np.int64)

    def _decode_folder(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        files, labels = self._folder_files(split)
        return archive.decode_images(((path, str(path)) for path in files), len(files), f"decoding {split}"), labels
