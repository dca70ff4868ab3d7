"""A training loader over tensors that already live on the accelerator: one gather per batch.

For an in-memory data set of CIFAR size the ``DataLoader`` path (per-sample indexing, collation, a
host-to-device copy of every batch) can cost more than the model. :class:`DeviceTensorLoader` keeps the
images and labels on the device and gathers each batch there with one ``index_select`` of a batch of
indices; the per-epoch order is computed once on the CPU and moved to the device once per pass.

The order is exactly that of ``torch.utils.data.DistributedSampler(dataset, num_replicas=W, rank=r,
shuffle=shuffle, seed=seed, drop_last=False)`` after ``set_epoch(epoch)``, also for a single process
(W = 1): a pure function of (seed, epoch, rank, world size), so a resumed run sees the same data order,
and a run with ``on_device`` sees the same batches as a DDP run of the DataLoader path. Like the
DataLoader path's ``ResumableDataLoader`` it has ``state_dict()``/``load_state_dict()`` (epoch, batches
delivered), which Lightning keeps in checkpoints: a fit resumed mid-epoch continues after the batches
already trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from confspec_lightning.validation import check_int


def distributed_order(
    num_samples: int, epoch: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
) -> Tensor:
    """Indices (CPU, int64) of one rank's share in the order of ``DistributedSampler`` (``drop_last=False``).

    A permutation from a CPU generator seeded with ``seed + epoch`` (or ``0..N-1`` without ``shuffle``),
    padded by repeating it from the start up to a multiple of ``world_size``, then every
    ``world_size``-th index from ``rank``.
    """
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=generator)
    else:
        order = torch.arange(num_samples)
    total = math.ceil(num_samples / world_size) * world_size
    if total > num_samples:
        order = order.repeat(math.ceil(total / num_samples))[:total]
    return order[rank:total:world_size]


class DeviceTensorLoader:
    """Batches ``(images[idx], labels[idx])`` of tensors already on a device, in ``DistributedSampler`` order.

    An iterable with ``__len__`` that Lightning takes as a training dataloader as it is: it is no
    ``DataLoader``, so neither ``use_distributed_sampler`` nor a strategy replaces it; the sharding across
    ranks is done here (``rank``, ``world_size``). Each pass reads the epoch from ``epoch`` (for instance
    ``lambda: trainer.current_epoch``) when its first batch is requested, so two passes in one epoch (the
    CSR epoch pass, then training) see the same order. The order of the pass is generated on the CPU and
    moved to the device once (non-blocking); batches are slices of it and gathers on the device, with no
    host-device synchronisation per batch.

    Args:
        images: (N, ...) tensor on the device (uint8 images stay uint8: the data module's
            ``on_after_batch_transfer`` converts them).
        labels: (N,) tensor on the same device.
        batch_size: batch size of this process; the last batch may be smaller (``drop_last=False``).
        shuffle: a new permutation every epoch (seeded with ``seed + epoch``), else ``0..N-1``.
        seed: seed of the permutations (the same on every rank).
        epoch: a callable giving the current epoch; None means always epoch 0.
        rank: this process's rank.
        world_size: the number of processes.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epoch: Callable[[], int] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
        if images.device != labels.device:
            raise ValueError(f"images on {images.device} but labels on {labels.device}; put both on one device.")
        check_int("batch_size", batch_size, 1)
        check_int("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} is not accepted; it must be an integer in [0, {world_size}).")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self._position = (-1, 0)  # (epoch, batches delivered) of the pass that delivered a batch last
        self._resume: tuple[int, int] | None = None

    @property
    def device(self) -> torch.device:
        """The device holding the tensors (and where the batches are gathered)."""
        return self.images.device

    @property
    def num_samples(self) -> int:
        """Samples per pass on this rank: ``ceil(N / world_size)`` (the padding repeats samples)."""
        return math.ceil(self.images.shape[0] / self.world_size)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """This rank's indices (CPU) for ``epoch``, in the order the batches take them."""
        return distributed_order(self.images.shape[0], epoch, self.seed, self.shuffle, self.rank, self.world_size)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches", "batch_size"}`` of the pass that delivered the last batch (epoch -1: none yet).

        Lightning saves it in checkpoints; when it saves in a training hook that pass is the training one
        (the CSR epoch pass, another pass over this loader, is over by then).
        """
        return {"epoch": self._position[0], "batches": self._position[1], "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next pass skip the samples already delivered, if it is a pass of the saved epoch (once)."""
        samples = int(state_dict["batches"]) * int(state_dict.get("batch_size", self.batch_size))
        self._resume = (int(state_dict["epoch"]), samples)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: nothing runs (and the epoch is not read) until the first batch is asked for, so an
        # iterator created ahead of the epoch (Lightning creates one when it sets the loader up) is right.
        epoch = 0 if self.epoch is None else int(self.epoch())
        skip = 0
        if self._resume is not None:
            resume_epoch, samples = self._resume
            self._resume = None  # only the first pass after a restore
            if resume_epoch == epoch:
                skip = samples
        order = self.order(epoch)[skip:]
        if self.device.type == "cuda":
            order = order.pin_memory()  # a truly asynchronous copy
        order = order.to(self.device, non_blocking=True)
        for count, start in enumerate(range(0, order.shape[0], self.batch_size), start=1):
            index = order[start : start + self.batch_size]
            self._position = (epoch, skip // self.batch_size + count)
            yield self.images.index_select(0, index), self.labels.index_select(0, index)
