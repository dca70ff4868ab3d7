"""The shared data-module machinery: stratified splits, augmentation on the device, resumable order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from confspec_lightning.data import (
    CIFAR10DataModule,
)
from confspec_lightning.data.base import EpochSampler, ResumableDataLoader
from confspec_lightning.data.cifar import CIFAR10_CLASSES

from archives import images, write_cifar10_archive, write_cifar10_pickles


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


@pytest.mark.parametrize("n, world_size, shuffle", [(10, 1, True), (10, 3, True), (7, 2, False), (64, 4, True)])
def test_epoch_sampler_is_distributed_samplers_order_for_any_world_size(n, world_size, shuffle):
    data = TensorDataset(torch.arange(n))
    for epoch in (0, 1, 5):
        for rank in range(world_size):
            ours = EpochSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=3)
            ref = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=3)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref)
            assert len(ours) == len(ref)
    torch.manual_seed(0)
    first = list(EpochSampler(data, shuffle=True, seed=3))
    torch.manual_seed(1)  # the global generator plays no part
    assert list(EpochSampler(data, shuffle=True, seed=3)) == first


def _batches(loader) -> list[list[int]]:
    return [batch[0].tolist() if isinstance(batch, list | tuple) else batch.tolist() for batch in loader]


def test_resumable_loader_continues_after_the_delivered_batches_of_the_same_epoch_only():
    data = TensorDataset(torch.arange(23))

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(data, batch_size=4, sampler=EpochSampler(data, shuffle=True, seed=1))

    full = loader()
    full.sampler.set_epoch(2)
    expected = _batches(full)
    assert len(expected) == 6 and full.state_dict() == {"epoch": 2, "batches": 6, "batch_size": 4}

    interrupted = loader()
    interrupted.sampler.set_epoch(2)
    iterator = iter(interrupted)
    seen = [next(iterator)[0].tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 3, "batch_size": 4}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    rest = _batches(resumed)
    assert seen + rest == expected
    assert resumed.state_dict()["batches"] == 6  # counts the skipped batches too
    resumed.sampler.set_epoch(3)
    assert len(_batches(resumed)) == 6  # the skip applies once

    other_epoch = loader()
    other_epoch.load_state_dict({"epoch": 1, "batches": 6, "batch_size": 4})  # an end-of-epoch-1 checkpoint
    other_epoch.sampler.set_epoch(2)
    assert _batches(other_epoch) == expected
