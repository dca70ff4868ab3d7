"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes): always available offline."""

from __future__ import annotations

from typing import ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

# Per-channel statistics of all 1797 images scaled to [0, 1] (pixel values / 16).
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not accepted; it must be an integer >= 1.")


def _distributed_sampler(datamodule: pl.LightningDataModule) -> DistributedSampler | None:
    """Under DDP, a DistributedSampler that honours ``shuffle`` (Lightning's own always shuffles).

    With ``shuffle=False`` rank r takes samples r, r + W, r + 2W, ...: per-rank batch B / W then holds
    exactly the samples of a single-process batch B, which makes DDP runs comparable to one process.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return DistributedSampler(
        datamodule.splits["train"], shuffle=datamodule.hparams.shuffle, seed=datamodule.hparams.seed
    )


class DigitsDataModule(pl.LightningDataModule):
    """Stratified train/val/test split of the digits, images (1, 8, 8) in [0, 1].

    Args:
        batch_size: training batch size (per process under DDP).
        eval_batch_size: validation/test batch size (per process).
        val_fraction: share of all images held out for validation (stratified).
        test_fraction: share of all images held out for testing (stratified).
        seed: seed of the split (the same seed always gives the same split).
        shuffle: shuffle the training set each epoch.
        num_workers: DataLoader workers (0 is fastest for this in-memory data).
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
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_positive_int("data.batch_size", batch_size)
        _check_positive_int("data.eval_batch_size", eval_batch_size)
        for name, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name}={value!r} is not accepted; it must lie in (0, 1).")
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves too little "
                "training data; keep the sum below 0.9."
            )
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} is not accepted; it must be >= 0.")
        self.save_hyperparameters()
        self.splits: dict[str, TensorDataset] = {}

    @staticmethod
    def load_arrays() -> tuple[np.ndarray, np.ndarray]:
        """All digits as float32 images (N, 1, 8, 8) in [0, 1] and int64 labels (N,)."""
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = (bunch.images.astype(np.float32) / 16.0)[:, None]
        return images, bunch.target.astype(np.int64)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.model_selection import train_test_split

        images, labels = self.load_arrays()
        index = np.arange(len(labels))
        hp = self.hparams
        rest, test = train_test_split(index, test_size=hp.test_fraction, stratify=labels, random_state=hp.seed)
        train, val = train_test_split(
            rest, test_size=hp.val_fraction / (1 - hp.test_fraction), stratify=labels[rest], random_state=hp.seed
        )
        for name, idx in (("train", train), ("val", val), ("test", test)):
            idx = np.sort(idx)
            self.splits[name] = TensorDataset(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))

    def _loader(self, split: str, batch_size: int, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        if not self.splits:
            self.setup()
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, self.hparams.shuffle, _distributed_sampler(self))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, False)
