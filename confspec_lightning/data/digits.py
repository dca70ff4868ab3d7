"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes): always available offline."""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from confspec_lightning.data.base import ClassificationDataModule
from confspec_lightning.validation import check_real

# Per-channel statistics of all 1797 images scaled to [0, 1] (pixel values / 16).
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


class DigitsDataModule(ClassificationDataModule):
    """Stratified train/val/test split of the digits, images (1, 8, 8) float in [0, 1], no augmentation.

    Args:
        batch_size: training batch size (per process under DDP).
        eval_batch_size: validation/test batch size (per process).
        val_fraction: share of all images held out for validation (stratified).
        test_fraction: share of all images held out for testing (stratified).
        seed: seed of the split (the same seed always gives the same split).
        shuffle: shuffle the training set each epoch.
        train_eval_per_class: if > 0, a second validation loader with this many training images per
            class (train/test divergence diagnostic).
        num_workers: DataLoader workers (0 is fastest for this in-memory data).
        on_device: keep the training split on the accelerator, batches gathered there (see
            :class:`~confspec_lightning.data.base.ClassificationDataModule`).
    """

    num_classes: ClassVar[int] = 10
    class_names: ClassVar[list[str]] = [str(d) for d in range(10)]
    mean: ClassVar[list[float]] = [DIGITS_MEAN]
    std: ClassVar[list[float]] = [DIGITS_STD]
    input_shape: ClassVar[tuple[int, ...]] = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        shuffle: bool = True,
        train_eval_per_class: int = 0,
        num_workers: int = 0,
        on_device: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            train_eval_per_class=train_eval_per_class,
            augment=False,
            seed=seed,
            shuffle=shuffle,
            num_workers=num_workers,
            on_device=on_device,
        )
        for name, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
            check_real(name, value, lambda v: 0.0 < v < 1.0, "in (0, 1)")
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves too little "
                "training data; keep the sum below 0.9."
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    @staticmethod
    @lru_cache(maxsize=1)
    def load_arrays() -> tuple[np.ndarray, np.ndarray]:
        """All digits as float32 images (N, 1, 8, 8) in [0, 1] and int64 labels (N,) (read once; do not modify)."""
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = (bunch.images.astype(np.float32) / 16.0)[:, None]
        return images, bunch.target.astype(np.int64)

    @cached_property
    def _split_indices(self) -> dict[str, np.ndarray]:
        from sklearn.model_selection import train_test_split

        _, labels = self.load_arrays()
        index = np.arange(len(labels))
        rest, test = train_test_split(index, test_size=self.test_fraction, stratify=labels, random_state=self.seed)
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1 - self.test_fraction),
            stratify=labels[rest],
            random_state=self.seed,
        )
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def has_own_val(self) -> bool:
        return True

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        images, labels = self.load_arrays()
        idx = self._split_indices[split]
        return torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])
