"""Shared machinery of the image-classification data modules.

A subclass provides the images of each split as in-memory tensors (``uint8`` (N, C, H, W), or float in
[0, 1]) with int64 labels, plus the class attributes ``num_classes``, ``class_names``, ``mean``,
``std`` and ``input_shape`` (the CLI links them into the model). This base class adds

* a stratified validation split held out from train (``val_per_class`` images per class,
  deterministic given ``seed``), or the data set's own validation split, or else the test split
  (what much of the robustness literature does; say so when you report such numbers);
* optional stratified subsets of train and test (``train_per_class``, ``test_per_class``) for quick
  runs on small machines;
* an optional second validation (and test) loader ``train_eval``: ``train_eval_per_class`` training
  images per class without augmentation, for the train/test divergence diagnostic;
* a resumable training loader (:class:`ResumableDataLoader` with an :class:`EpochSampler`): its order is
  ``DistributedSampler``'s, a pure function of (seed, epoch, rank, world size), with one process too, and
  it exposes ``state_dict()``/``load_state_dict()`` (the epoch and the batches already delivered), which
  Lightning stores in checkpoints, so a fit resumed from a mid-epoch checkpoint continues with the
  batches not yet seen, in the same order;
* optionally (``on_device``) a training loader over the training split kept on the accelerator
  (:class:`~confspec_lightning.data.device.DeviceTensorLoader`): batches gathered there, in the order
  of that DistributedSampler;
* conversion to float in [0, 1] and the standard train augmentation (random crop with zero padding,
  horizontal flip) done per batch on the device, after the transfer (cheap, and the CSR epoch pass
  sees the same augmentation as training).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from confspec_lightning.data.device import DeviceTensorLoader, distributed_order
from confspec_lightning.validation import check_bool


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not accepted; it must be an integer >= {minimum}.")


def stratified_indices(labels: np.ndarray, per_class: int, seed: int, name: str = "per_class") -> np.ndarray:
    """Sorted indices of ``per_class`` samples of every class, drawn without replacement (seeded).

    Raises:
        ValueError: when a class has fewer than ``per_class`` samples (naming the option ``name``).
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ValueError(
                f"{name}={per_class!r} is not accepted: class {int(cls)} has {len(members)} samples, fewer than the "
                f"{per_class} per class asked for."
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop (zero padding ``padding``) and horizontal flip of a batch (B, C, H, W)."""
    b, _, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (``drop_last=False``) for any world size, one process included, that can resume.

    The order of an epoch is that of ``DistributedSampler(dataset, num_replicas, rank, shuffle, seed)``
    after ``set_epoch(epoch)``: a pure function of (seed, epoch, rank, world size), unlike a
    ``RandomSampler``, which draws from the global generator. Being a ``DistributedSampler``, Lightning
    leaves it in place under DDP. :meth:`resume_from` makes the next pass of the given epoch start after
    the samples already delivered (see :class:`ResumableDataLoader`).
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._resume: tuple[int, int] | None = None
        #: samples skipped at the start of the current pass
        self.skipped = 0

    def resume_from(self, epoch: int, samples: int) -> None:
        """Make the next pass skip its first ``samples`` indices if it is a pass of ``epoch`` (once)."""
        self._resume = (int(epoch), int(samples))

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None:
            epoch, samples = self._resume
            self._resume = None  # only the first pass after a restore
            if epoch == self.epoch:
                start = samples
        self.skipped = start
        order = distributed_order(len(self.dataset), self.epoch, self.seed, self.shuffle, self.rank, self.num_replicas)
        return iter(order[start:].tolist())


class EvaluationSampler(DistributedSampler):
    """Deals the batches of one sequential pass over a split to the ranks: rank r takes batches r, r + W, r + 2W, ...

    With ``DataLoader(dataset, batch_size=batch_size, sampler=EvaluationSampler(...))`` every batch a rank sees is
    a batch a single process sees (the same samples, the same global batch number), and every sample is seen once:
    no padding (Lightning's ``DistributedSampler`` repeats samples to even out the ranks, which changes per-class
    counts). An evaluation that seeds each batch by its global number (AutoAttack) and draws each sample's noise
    from its index (:class:`~confspec_lightning.attacks.noise.SampleNoise`) then gives a single process's results
    on any number of processes. A rank left without a batch (fewer batches than ranks) gets one *placeholder*
    (batch 0 again), which the evaluator skips: every rank then runs the same evaluation hooks and collectives,
    and Lightning's check that each rank has a batch passes. Being a ``DistributedSampler``, Lightning keeps it.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        check_positive_int("batch_size", batch_size)
        self.batch_size = batch_size
        self.dataset_size = len(dataset)  # type: ignore[arg-type]
        total = -(-self.dataset_size // batch_size)
        self.global_batches = list(range(rank, total, num_replicas))
        #: this rank has no batch of its own: it runs one placeholder batch that the evaluation skips
        self.placeholder = not self.global_batches and self.dataset_size > 0
        self.num_samples = sum(len(self._range(g)) for g in self.global_batches)
        if self.placeholder:
            self.num_samples = len(self._range(0))
        self.total_size = self.dataset_size

    def _range(self, global_batch: int) -> range:
        start = global_batch * self.batch_size
        return range(start, min(start + self.batch_size, self.dataset_size))

    def __iter__(self) -> Iterator[int]:
        batches = [0] if self.placeholder else self.global_batches
        for g in batches:
            yield from self._range(g)

    def __len__(self) -> int:
        return self.num_samples

    def global_batch(self, local_batch: int) -> int | None:
        """The number of this rank's batch ``local_batch`` in a single process's pass (None: the placeholder)."""
        return None if self.placeholder else self.global_batches[local_batch]

    def batch_indices(self, local_batch: int) -> Tensor:
        """The indices in the split of this rank's batch ``local_batch`` (int64)."""
        global_batch = self.global_batch(local_batch)
        return torch.as_tensor(list(self._range(0 if global_batch is None else global_batch)), dtype=torch.long)


def evaluation_sampler(loader: Any) -> EvaluationSampler | None:
    """The :class:`EvaluationSampler` of a loader, or None.

    Also found under Lightning's predict wrapper of the loader's batch sampler.
    """
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, EvaluationSampler):
            return sampler
    return None


class SamplePositions:
    """The index in its split of every sample of an evaluation batch, and the batch's number in one process's pass.

    Exact for a loader over an :class:`EvaluationSampler` (this library's data modules): a single process's indices
    and batch numbers on any number of processes. Another loader is taken as sequential: its samples are numbered in
    the order this process sees them (per loader; :meth:`reset` at every evaluation epoch's start).
    """

    def __init__(self) -> None:
        self._seen: dict[Any, int] = {}

    def reset(self) -> None:
        self._seen = {}

    def of(self, loader: Any, key: Any, batch_idx: int, size: int) -> tuple[Tensor | None, int]:
        """(indices (B,) int64, or None for a placeholder batch to skip; the batch's number)."""
        sampler = evaluation_sampler(loader)
        if sampler is not None:
            number = sampler.global_batch(batch_idx)
            return (None if number is None else sampler.batch_indices(batch_idx)), number or 0
        start = self._seen.get(key, 0)
        self._seen[key] = start + size
        return torch.arange(start, start + size), batch_idx


def process_layout() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose position Lightning saves and restores.

    ``state_dict()`` gives the epoch and the number of batches delivered by the pass that delivered a batch
    last (the training pass when Lightning saves in a training hook: the CSR epoch pass, another pass over
    this loader, is over by then), ``load_state_dict()`` makes the next pass of that epoch start after them.
    Lightning's fit loop stores the state in checkpoints (``loops.fit_loop.state_dict.combined_loader``) and
    loads it before it creates the training iterator of a resumed fit. Sized loaders are not pre-fetched by
    Lightning, so the count is that of the batches trained.
    """

    def __iter__(self) -> Iterator[Any]:
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            raise TypeError(f"ResumableDataLoader needs an EpochSampler; got {type(sampler).__name__}.")
        for count, batch in enumerate(batches, start=1):
            self._position = (int(sampler.epoch), sampler.skipped // int(self.batch_size) + count)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches", "batch_size"}`` of the pass that delivered the last batch (epoch -1: none yet)."""
        epoch, batches = getattr(self, "_position", (-1, 0))
        return {"epoch": epoch, "batches": batches, "batch_size": int(self.batch_size)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next pass of ``state_dict["epoch"]`` skip the batches already delivered."""
        samples = int(state_dict["batches"]) * int(state_dict.get("batch_size", self.batch_size))
        self.sampler.resume_from(int(state_dict["epoch"]), samples)


class ClassificationDataModule(pl.LightningDataModule):
    """Base of the data modules (see the module docstring).

    Args:
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size per process.
        val_per_class: images per class held out from train for validation (stratified, seeded);
            ``None`` uses the data set's own validation split where it has one, else the test split.
        train_per_class: keep only this many training images per class (after the hold-out); None = all.
        test_per_class: keep only this many test images per class; None = all.
        train_eval_per_class: if > 0, a second validation loader with this many training images per
            class (no augmentation), for the train/test divergence diagnostic.
        augment: random crop (``crop_padding``) and horizontal flip of training batches.
        crop_padding: zero padding of the random crop (4 for 32x32 images).
        seed: seed of the held-out splits.
        shuffle: shuffle the training set every epoch.
        num_workers: DataLoader workers (0 is right for in-memory tensors).
        on_device: keep the training split on the accelerator (``trainer.strategy.root_device``) as
            uint8 (float splits stay float), batches gathered there
            (:class:`~confspec_lightning.data.device.DeviceTensorLoader`); crop/flip already happen on
            the device. Removes DataLoader collation and host-to-device copies. Memory: N*C*H*W bytes,
            150 MB for CIFAR-10. The order of the batches is that of a ``DistributedSampler`` (seed
            ``seed``, ``shuffle``) on this rank, with one process too: a function of (seed, epoch,
            rank, world size) that a resumed run repeats. ``num_workers`` does not apply to it. The
            validation, test and predict loaders are unchanged (DataLoaders on the host).
    """

    num_classes: ClassVar[int]
    class_names: ClassVar[list[str]]
    mean: ClassVar[list[float]]
    std: ClassVar[list[float]]
    input_shape: ClassVar[tuple[int, ...]]

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        val_per_class: int | None = None,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        train_eval_per_class: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("data.batch_size", batch_size)
        check_positive_int("data.eval_batch_size", eval_batch_size)
        for name, value in (
            ("data.val_per_class", val_per_class),
            ("data.train_per_class", train_per_class),
            ("data.test_per_class", test_per_class),
        ):
            if value is not None:
                check_positive_int(name, value)
        check_positive_int("data.train_eval_per_class", train_eval_per_class, minimum=0)
        check_positive_int("data.crop_padding", crop_padding, minimum=0)
        check_positive_int("data.num_workers", num_workers, minimum=0)
        check_bool("data.on_device", on_device)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_per_class = val_per_class
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.train_eval_per_class = train_eval_per_class
        self.augment = augment
        self.crop_padding = crop_padding
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.on_device = on_device
        self.splits: dict[str, TensorDataset] = {}
        self._device_train: tuple[Tensor, Tensor, Tensor] | None = None  # (host images, device images, labels)

    # ----------------------------------------------------------- for subclasses
    def load_split(self, split: str, indices: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        """Images (N, C, H, W) (uint8, or float in [0, 1]) and int64 labels of one split.

        Splits: ``"train"``, ``"test"``, and ``"val"`` where :meth:`has_own_val` is true. ``indices``
        (sorted, unique) asks for those images only; :meth:`setup` passes it only to subclasses whose
        :meth:`split_labels` returns the labels.
        """
        raise NotImplementedError

    def split_labels(self, split: str) -> np.ndarray | None:
        """The int64 labels of ``split`` read without its images, where the source allows it (an archive).

        Then :meth:`setup` chooses its subsets on the labels and decodes only the images they use
        (``load_split(split, indices)``): a run on 2 images per class decodes 2 per class. ``None``
        (the default): :meth:`setup` loads whole splits and selects in memory.
        """
        return None

    def has_own_val(self) -> bool:
        """Whether the data set has its own validation split (used when ``val_per_class`` is None)."""
        return False

    def check_label_range(self, labels: np.ndarray, source: str) -> None:
        """Raise a ``ValueError`` naming ``source`` unless every label lies in [0, ``num_classes``)."""
        if len(labels) and not 0 <= labels.min() <= labels.max() < self.num_classes:
            raise ValueError(
                f"{source}: labels in [{labels.min()}, {labels.max()}]; expected labels in [0, {self.num_classes})."
            )

    # ------------------------------------------------------------------ splits
    def _split_source(self, split: str) -> tuple[np.ndarray, Callable[[np.ndarray | None], tuple[Tensor, Tensor]]]:
        """The labels of ``split`` and ``take``: ``take(indices)`` loads the images and labels there.

        ``indices`` are sorted (``None``: all); only those images are decoded where :meth:`split_labels` allows it.
        """
        labels = self.split_labels(split)
        if labels is not None:
            return labels, lambda idx: self.load_split(split, idx)
        x, y = self.load_split(split)

        def take(idx: np.ndarray | None) -> tuple[Tensor, Tensor]:
            return (x, y) if idx is None else (x[torch.from_numpy(idx)], y[torch.from_numpy(idx)])

        return y.numpy(), take

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        # the subsets of train, as indices into it: chosen on the labels, so only their images are loaded
        train_labels, take_train = self._split_source("train")
        parts: dict[str, np.ndarray] = {}
        remaining = np.arange(len(train_labels))
        if self.val_per_class is not None:
            parts["val"] = stratified_indices(train_labels, self.val_per_class, self.seed, "data.val_per_class")
            remaining = np.setdiff1d(remaining, parts["val"])
        if self.train_per_class is not None:
            remaining = remaining[
                stratified_indices(train_labels[remaining], self.train_per_class, self.seed + 3, "data.train_per_class")
            ]
        parts["train"] = remaining
        if self.train_eval_per_class > 0:
            parts["train_eval"] = remaining[
                stratified_indices(
                    train_labels[remaining], self.train_eval_per_class, self.seed + 1, "data.train_eval_per_class"
                )
            ]
        needed = np.unique(np.concatenate(list(parts.values())))
        whole = len(needed) == len(train_labels)
        train_x, train_y = take_train(None if whole else needed)
        for name, idx in parts.items():
            if len(idx) == len(train_y):  # the whole of what was loaded (sorted, unique): no copy
                self.splits[name] = TensorDataset(train_x, train_y)
            else:
                position = torch.from_numpy(idx if whole else np.searchsorted(needed, idx))
                self.splits[name] = TensorDataset(train_x[position], train_y[position])
        if "val" not in self.splits and self.has_own_val():
            self.splits["val"] = TensorDataset(*self.load_split("val"))
        test_labels, take_test = self._split_source("test")
        test_idx = None
        if self.test_per_class is not None:
            test_idx = stratified_indices(test_labels, self.test_per_class, self.seed + 2, "data.test_per_class")
        self.splits["test"] = TensorDataset(*take_test(test_idx))
        self.splits.setdefault("val", self.splits["test"])

    # ----------------------------------------------------------------- loaders
    def _loader(self, split: str, batch_size: int) -> DataLoader:
        """An evaluation loader: sequential batches, dealt to the ranks whole (:class:`EvaluationSampler`)."""
        if not self.splits:
            self.setup()
        world_size, rank = process_layout()
        dataset = self.splits[split]
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EvaluationSampler(dataset, batch_size, num_replicas=world_size, rank=rank),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _train_loader(self) -> ResumableDataLoader:
        if not self.splits:
            self.setup()
        # its own generator: creating an iterator draws a worker base seed, not from the global generator
        # (whose stream a resumed run restores; see confspec_lightning.checkpointing)
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(
            self.splits["train"],
            batch_size=self.batch_size,
            sampler=self._distributed_train_sampler(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    def _distributed_train_sampler(self) -> EpochSampler:
        """The training sampler: ``DistributedSampler`` order honouring ``shuffle``, for any world size.

        Under DDP Lightning's own sampler would always shuffle. With ``shuffle=False`` rank r takes samples
        r, r + W, r + 2W, ...: per-rank batch B / W then holds exactly the samples of a single-process
        batch B, so DDP runs compare with one process. With one process the order is that of a
        ``DistributedSampler`` with one replica (seeded with ``seed + epoch``).
        """
        world_size, rank = process_layout()
        return EpochSampler(
            self.splits["train"], num_replicas=world_size, rank=rank, shuffle=self.shuffle, seed=self.seed
        )

    def train_dataloader(self) -> DataLoader | DeviceTensorLoader:
        if self.on_device:
            return self._device_loader()
        return self._train_loader()

    def _device_loader(self) -> DeviceTensorLoader:
        """The training split on ``trainer.strategy.root_device`` (copied there once and kept), sharded by rank."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            raise RuntimeError("data.on_device=True needs the data module attached to a Trainer (trainer.fit).")
        if not self.splits:
            self.setup()
        device = trainer.strategy.root_device
        images, labels = self.splits["train"].tensors
        cached = self._device_train
        if cached is None or cached[0] is not images or cached[1].device != device:
            cached = self._device_train = (images, images.to(device), labels.to(device))
        return DeviceTensorLoader(
            cached[1],
            cached[2],
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=lambda: trainer.current_epoch,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        val = self._loader("val", self.eval_batch_size)
        if "train_eval" in self.splits:
            return [val, self._loader("train_eval", self.eval_batch_size)]
        return val

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        test = self._loader("test", self.eval_batch_size)
        if "train_eval" in self.splits:
            return [test, self._loader("train_eval", self.eval_batch_size)]
        return test

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    # ------------------------------------------------------- device-side steps
    def prepare_batch(self, batch: Any, augment: bool) -> Any:
        """A batch on its device: uint8 -> float in [0, 1]; crop + flip when ``augment``."""
        x, y = batch
        if not x.is_floating_point():
            x = x.float().div_(255.0)
        if augment:
            x = random_crop_flip(x, self.crop_padding)
        return x, y

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """:meth:`prepare_batch`, augmenting training batches when ``augment``."""
        trainer = getattr(self, "trainer", None)
        return self.prepare_batch(batch, augment=self.augment and trainer is not None and trainer.training)
