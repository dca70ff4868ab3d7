"""Compact image archives: JPEG files concatenated in an ``.npz`` (numpy only, no pickle).

An archive holds, for a split with key prefix ``p`` (``"train_"``, ``"test_"``, or ``""`` for a
single-split file):

* ``{p}jpeg``: uint8 (B,), all JPEG files concatenated;
* ``{p}offsets``: int64 (N + 1,), image i is ``jpeg[offsets[i]:offsets[i + 1]]`` (``offsets[0] == 0``,
  increasing, ``offsets[-1] == len(jpeg)``);
* ``{p}labels``: integer (N,), the class index of every image;

plus metadata arrays such as ``classes`` (CIFAR-10) or ``wnids``/``class_names`` (Tiny-ImageNet).
Images are decoded with Pillow (``convert("RGB")``, so grayscale JPEGs become 3 equal channels) into
uint8 (N, 3, H, W). Full decodes are cached in memory once per process, keyed by the resolved path,
size and mtime of the file and the split, so several data modules or tests share one decode.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")

#: How many decoded splits the module-level cache keeps (least recently used ones are dropped).
CACHE_SIZE = 6

_CACHE: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


def cached(key: tuple[Any, ...], build: Callable[[], T]) -> T:
    """``build()``, memoised in the module-level cache under ``key`` (at most :data:`CACHE_SIZE` entries).

    The cached value is shared: callers must not modify it in place.
    """
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = build()
    _CACHE[key] = value
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def clear_cache() -> None:
    """Drop every cached decode (frees the memory)."""
    _CACHE.clear()


def file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """Cache key of a file: resolved path, size and mtime (ns), so a rewritten file is decoded again."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns


def split_keys(split: str | None) -> tuple[str, str, str]:
    """The ``(jpeg, offsets, labels)`` keys of ``split`` (``None``: an archive of a single split)."""
    prefix = f"{split}_" if split else ""
    return f"{prefix}jpeg", f"{prefix}offsets", f"{prefix}labels"


def load_arrays(path: str | os.PathLike[str], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read only the arrays ``keys`` of the ``.npz`` archive ``path`` (``allow_pickle=False``).

    Cheap for small metadata arrays (e.g. ``classes``): the other members are not read.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a readable ``.npz`` (truncated, corrupt) or lacks one of ``keys``.
    """
    path = _existing(path, keys)
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise ValueError(f"{path}: not a readable .npz archive (truncated or corrupt?): {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, not an .npz archive with keys {_quoted(keys)}.")
    with archive:
        for key in keys:
            if key not in archive.files:
                raise ValueError(
                    f"{path}: missing array {key!r}; expected keys {_quoted(keys)} (found: {_quoted(archive.files)})."
                )
        out = {}
        for key in keys:
            try:
                out[key] = archive[key]
            except _READ_ERRORS as exc:
                raise ValueError(f"{path}: array {key!r} is unreadable (truncated or corrupt archive?): {exc}") from exc
    return out


def load_split_arrays(path: str | os.PathLike[str], split: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The validated ``(jpeg, offsets, labels)`` arrays of ``split`` (not decoded).

    Raises:
        ValueError: on a missing key, wrong dtypes/shapes, or offsets that are not increasing from 0
            to ``len(jpeg)`` with one more entry than labels.
    """
    jpeg_key, offsets_key, labels_key = keys = split_keys(split)
    arrays = load_arrays(path, keys)
    jpeg, offsets, labels = (arrays[k] for k in keys)
    if jpeg.dtype != np.uint8 or jpeg.ndim != 1:
        raise ValueError(f"{path}: {jpeg_key!r} must be a 1-D uint8 array, got {jpeg.dtype} {jpeg.shape}.")
    for key, array in ((offsets_key, offsets), (labels_key, labels)):
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{path}: {key!r} must be a 1-D integer array, got {array.dtype} {array.shape}.")
    if len(offsets) != len(labels) + 1:
        raise ValueError(
            f"{path}: {offsets_key!r} has {len(offsets)} entries; expected len({labels_key!r}) + 1 = {len(labels) + 1}."
        )
    if len(offsets) and offsets[0] != 0:
        raise ValueError(f"{path}: {offsets_key!r} must start at 0, got {int(offsets[0])}.")
    if np.any(np.diff(offsets) <= 0):
        bad = int(np.flatnonzero(np.diff(offsets) <= 0)[0])
        raise ValueError(f"{path}: {offsets_key!r} must be increasing; image {bad} has no bytes or a negative size.")
    if int(offsets[-1]) != len(jpeg):
        raise ValueError(
            f"{path}: the last of {offsets_key!r} is {int(offsets[-1])} but {jpeg_key!r} has {len(jpeg)} bytes "
            "(truncated or inconsistent archive)."
        )
    return jpeg, offsets.astype(np.int64, copy=False), _checked_labels(path, labels_key, labels)


def load_split_labels(path: str | os.PathLike[str], split: str | None) -> np.ndarray:
    """The int64 labels of ``split`` alone (its JPEG bytes are not read): enough to choose a subset.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_arrays`; a labels array that is not 1-D integer
            or holds a negative label.
    """
    labels_key = split_keys(split)[2]
    labels = load_arrays(path, [labels_key])[labels_key]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {labels_key!r} must be a 1-D integer array, got {labels.dtype} {labels.shape}.")
    return _checked_labels(path, labels_key, labels)


def _checked_labels(path: str | os.PathLike[str], key: str, labels: np.ndarray) -> np.ndarray:
    """Integer ``labels`` as int64, refusing a negative one (naming the file and the array)."""
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{path}: {key!r} holds a negative label {int(labels.min())}.")
    return labels.astype(np.int64, copy=False)


def decode_image(data: bytes | str | os.PathLike[str], source: str) -> np.ndarray:
    """One image (JPEG bytes or a file path) as uint8 (H, W, 3) RGB; errors name ``source``."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{source}: could not be decoded as an image (corrupt or truncated?): {exc}") from exc


#: Decodes of at least this many images show a progress bar (on a terminal; tqdm stays silent in log files).
PROGRESS_MIN_IMAGES = 5000


def decode_images(
    items: Iterable[tuple[bytes | str | os.PathLike[str], str]], count: int, description: str = "decoding images"
) -> np.ndarray:
    """Decode ``count`` ``(data, source)`` pairs of the same size into uint8 (N, 3, H, W).

    A progress bar (``description``) shows on a terminal for :data:`PROGRESS_MIN_IMAGES` images or more.

    Raises:
        ValueError: when an image cannot be decoded or differs in size from the first one (the error
            names its ``source``).
    """
    from tqdm.auto import tqdm

    out: np.ndarray | None = None
    progress = tqdm(
        items,
        total=count,
        desc=description,
        unit="img",
        leave=False,
        disable=None if count >= PROGRESS_MIN_IMAGES else True,
    )
    for i, (data, source) in enumerate(progress):
        image = decode_image(data, source)
        if out is None:
            out = np.empty((count, *image.shape), dtype=np.uint8)
        elif image.shape != out.shape[1:]:
            raise ValueError(
                f"{source}: image of size {image.shape[1]}x{image.shape[0]}, but the first image of the split is "
                f"{out.shape[2]}x{out.shape[1]}; all images of a split must have the same size."
            )
        out[i] = image
    if out is None:
        raise ValueError("no images to decode.")
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def decode_archive(
    path: str | os.PathLike[str], split: str | None = None, indices: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the images of ``split`` of the archive ``path`` into uint8 (N, 3, H, W) and int64 labels (N,).

    Args:
        path: the ``.npz`` archive.
        split: key prefix (``"train"`` reads ``train_jpeg``, ``train_offsets``, ``train_labels``);
            ``None`` for an archive of a single split (``jpeg``, ``offsets``, ``labels``).
        indices: decode only these images (in this order; not cached), e.g. a handful for a quick
            check; ``None`` decodes the whole split once per process (cached, shared: do not modify
            the returned arrays in place).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: on a truncated/corrupt archive, a missing key, bad offsets, an index out of range,
            or an image that cannot be decoded.
    """
    if indices is None:
        _existing(path, split_keys(split))
        return cached(("archive", *file_key(path), split), lambda: _decode_archive(path, split, None))
    return _decode_archive(path, split, np.asarray(indices))


def _decode_archive(
    path: str | os.PathLike[str], split: str | None, indices: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    jpeg, offsets, labels = load_split_arrays(path, split)
    n = len(labels)
    if indices is None:
        indices = np.arange(n)
    elif indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty 1-D sequence of integers, got {indices.dtype} {indices.shape}.")
    elif indices.min() < 0 or indices.max() >= n:
        raise ValueError(
            f"{path}: indices must lie in [0, {n}) for split {split!r}; got {indices.min()}..{indices.max()}."
        )
    name = f"{path}[{split}]" if split else str(path)
    items = ((jpeg[offsets[i] : offsets[i + 1]].tobytes(), f"{name} image {i}") for i in indices)
    description = f"decoding {Path(path).name}" + (f" [{split}]" if split else "")
    return decode_images(items, len(indices), description), labels[indices]


def _existing(path: str | os.PathLike[str], keys: Sequence[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: archive not found (expected an .npz file with keys {_quoted(keys)}).")
    return path


def _quoted(keys: Iterable[str]) -> str:
    return ", ".join(map(repr, keys))
