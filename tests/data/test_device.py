"""The on-device training loader: DistributedSampler order, resume, a real fit with the CSR epoch pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from confspec_lightning import RobustFairLitModule
from confspec_lightning.data import (
    CIFAR10DataModule,
    DigitsDataModule,
)
from confspec_lightning.data.device import DeviceTensorLoader

from archives import digits_train, write_cifar10_archive
from helpers import make_module, make_trainer


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


def test_device_loader_state_dict_resumes_mid_epoch():
    images, labels = torch.arange(30).float(), torch.arange(30)
    epoch = {"value": 4}
    make = lambda: DeviceTensorLoader(images, labels, batch_size=4, seed=2, epoch=lambda: epoch["value"])  # noqa: E731
    expected = [y.tolist() for _, y in make()]
    interrupted = make()
    iterator = iter(interrupted)
    seen = [next(iterator)[1].tolist() for _ in range(5)]
    state = interrupted.state_dict()
    assert state["epoch"] == 4 and state["batches"] == 5
    resumed = make()
    resumed.load_state_dict(state)
    assert seen + [y.tolist() for _, y in resumed] == expected
    epoch["value"] = 5
    assert len(list(resumed)) == len(expected)
