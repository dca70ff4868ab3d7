"""Bad input: every config value and data shape is accepted, or rejected before training with a clear error.

Property-based (hypothesis) over the public constructors' fields and the metric / functional API's inputs:
an input is either valid (and accepted) or rejected with a ``ValueError``/``TypeError`` whose message names
the field and the bad value (its ``repr``) and says what is accepted. Then corrupt or truncated data
archives and weight files, and untrusted checkpoints whose unpickling would run code.
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from confspec_lightning import AttackConfig, RobustFairLitModule
from confspec_lightning import functional as CF
from confspec_lightning.data import DigitsDataModule, archive
from confspec_lightning.fairness import CFA, CSR, DAFA, FAAL, FRL, WAT
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.models import DigitsCNN
from confspec_lightning.models.weights import load_backbone_weights

from archives import write_cifar10_archive
from helpers import make_module, make_trainer

EXAMPLES = 60
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
#: how many examples each property test ran, and how many were rejected (printed with ``pytest -s``)
TRIED: dict[str, list[int]] = {}


def count(test: str, accepted: bool) -> None:
    tried = TRIED.setdefault(test, [0, 0])
    tried[0] += 1
    tried[1] += not accepted


# --------------------------------------------------------------------------------------------------- helpers
def assert_names(error: BaseException, field: str, value: Any) -> None:
    """The message names ``field`` and shows ``repr(value)`` (and says what is accepted)."""
    message = str(error)
    assert isinstance(error, ValueError | TypeError), f"{type(error).__name__}: {message}"
    assert field in message, f"field {field!r} not named in: {message}"
    assert repr(value) in message, f"value {value!r} not shown in: {message}"
    assert re.search(r"must|choose|accepted|needs|expected", message), f"no hint of what is accepted: {message}"


def check_field(build: Callable[..., Any], field: str, name: str, value: Any, valid: bool) -> bool:
    """``build(**{name: value})`` is accepted when ``valid``, else rejected naming ``field`` and the value."""
    try:
        build(**{name: value})
    except (ValueError, TypeError) as error:
        assert not valid, f"{field}={value!r} is valid but was rejected: {error}"
        assert_names(error, field, value)
        return False
    assert valid, f"{field}={value!r} is invalid but was accepted"
    return True


def real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def integer(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def choice(*accepted: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in accepted


def in_range(low: float, high: float, closed_high: bool = True, open_low: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if not real(v):
            return False
        return (v > low if open_low else v >= low) and (v <= high if closed_high else v < high)

    return ok


def at_least(low: float, strict: bool = False) -> Callable[[Any], bool]:
    return lambda v: real(v) and (v > low if strict else v >= low)


#: any config value: numbers at the edges (NaN, inf, huge, tiny, negative, 0), booleans, strings, None, lists
ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-300, 5e-324, 1e308, -1.0, float("nan"), float("inf"), float("-inf")]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=5),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.sampled_from(
        [
            "linf",
            "l2",
            "relative",
            "additive",
            "epoch_pass",
            "streaming",
            "batch",
            "ema",
            "paper",
            "kl",
            "counts",
            "0.3",
        ]
    ),
    st.lists(st.floats(allow_nan=True), max_size=2),
)

SPECS: dict[str, tuple[Callable[..., Any], dict[str, Callable[[Any], bool]]]] = {
    "attack": (
        AttackConfig,
        {
            "norm": choice("linf", "l2"),
            "eps": in_range(0, 1, open_low=True),  # linf (the default norm): pixels lie in [0, 1]
            "step": at_least(0, strict=True),
            "steps": lambda v: integer(v, 1),
            "random_start": is_bool,
        },
    ),
    "csr": (
        CSR,
        {
            "alpha": in_range(0, 1),
            "gamma": in_range(0, 1, closed_high=False),
            "form": choice("code", "paper"),
            # None = the form's default
            "surrogate": lambda v: v is None or choice("counts", "kl", "soft")(v),
            "margin": lambda v: v is None or choice("relative", "additive")(v),
            "confusion_source": lambda v: v is None or choice("epoch_pass", "streaming", "batch", "ema")(v),
            "ema_decay": in_range(0, 1, closed_high=False),
            "include_diagonal": lambda v: v is None or is_bool(v),
            "rescale": lambda v: v is None or is_bool(v),
            "normalize": lambda v: v is None or is_bool(v),
        },
    ),
    "csr_paper": (
        lambda **kwargs: CSR(form="paper", **kwargs),
        {
            "surrogate": lambda v: v is None or choice("kl", "soft")(v),  # counts: no gradient
            "include_diagonal": lambda v: v is None or v is False,  # L has no diagonal
            "confusion_source": lambda v: v is None or choice("epoch_pass", "streaming", "batch", "ema")(v),
        },
    ),
    "frl": (
        FRL,
        {
            "mode": choice("reweight", "reweight_remargin"),
            "tau": lambda v: v is None or real(v),
            "rate_nat": at_least(0),
            "rate_bndy": at_least(0),
            "rate_margin": at_least(0),
            "rate_halving_epochs": lambda v: integer(v, 1),
            "max_multiplier_sum": in_range(0, 1),
            "margin_scale": at_least(0),
            "eps_multiplier_min": in_range(0, 3.0),  # <= the default eps_multiplier_max
            "eps_multiplier_max": at_least(0.98),  # >= the default eps_multiplier_min
            "eval_steps": lambda v: integer(v, 1),
        },
    ),
    "faal": (FAAL, {"radius": at_least(0, strict=True), "iterations": lambda v: integer(v, 1)}),
    "cfa": (
        CFA,
        {
            "eps_base": at_least(0),
            "beta_base": at_least(0),
            "warmup_epochs": lambda v: integer(v, 0),
            "classwise_eps": is_bool,
            "classwise_beta": is_bool,
            "weight_average": is_bool,
            "average_decay": in_range(0, 1, closed_high=False),
            "average_threshold": in_range(0, 1),
            "average_eval_steps": lambda v: integer(v, 1),
        },
    ),
    "wat": (WAT, {"eta": at_least(0)}),
    "dafa": (
        DAFA,
        {
            "warmup_epochs": lambda v: integer(v, 0),
            "lam": at_least(0),
            "min_weight": at_least(0, strict=True),
        },
    ),
}

#: the name errors give a field of a SPECS entry (csr_paper: CSR's fields with form=paper)
FIELD_PREFIX = {"csr_paper": "csr"}
FIELDS = [(prefix, name) for prefix, (_, fields) in SPECS.items() for name in fields]


@pytest.mark.parametrize("prefix", list(SPECS))
@SETTINGS
@given(data=st.data())
def test_config_fields_are_accepted_or_named(prefix, data):
    build, fields = SPECS[prefix]
    name = data.draw(st.sampled_from(sorted(fields)), label="field")
    value = data.draw(ANY_VALUE, label="value")
    accepted = check_field(build, f"{FIELD_PREFIX.get(prefix, prefix)}.{name}", name, value, fields[name](value))
    count(f"{prefix} constructor", accepted)


EDGE_VALUES = [
    float("nan"),
    float("inf"),
    float("-inf"),
    None,
    True,
    False,
    "x",
    -1,
    0,
    0.5,
    1,
    4.0,
    1e308,
    5e-324,
    [1],
]


@pytest.mark.parametrize("prefix", list(SPECS))
def test_config_fields_at_fixed_edge_values(prefix):
    """Every field of every constructor against the same edge values (complements the random draws)."""
    build, fields = SPECS[prefix]
    for name, valid in fields.items():
        for value in EDGE_VALUES:
            count(
                f"{prefix} constructor (edge values)",
                check_field(build, f"{FIELD_PREFIX.get(prefix, prefix)}.{name}", name, value, valid(value)),
            )


MODULE_FIELDS: dict[str, Callable[[Any], bool]] = {
    "num_classes": lambda v: integer(v, 2) and v <= 100_000,  # the backbone's output size is checked at setup
    "objective": choice("trades", "pgd_at", "mart"),
    "beta": at_least(0),
    "eval_seed": lambda v: integer(v, 0),
    "channels_last": is_bool,
    "compile": lambda v: v is False,  # True is valid but compiles on first use; not drawn below
    "compile_mode": choice("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "input_std": lambda v: isinstance(v, list) and len(v) == 1 and real(v[0]) and v[0] > 0,
    "input_mean": lambda v: isinstance(v, list) and len(v) == 1 and real(v[0]),
}


def check_module_field(name: str, value: Any) -> bool:
    if name in ("input_std", "input_mean") and isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]  # a per-channel list with one (possibly bad) entry
    valid = MODULE_FIELDS[name](value)
    try:
        make_module(fairness=[], **{name: value})
    except (ValueError, TypeError) as error:
        assert not valid, f"{name}={value!r} is valid but was rejected: {error}"
        shown = value[0] if name.startswith("input_") and isinstance(value, list) and len(value) == 1 else value
        field = f"{name}[0]" if shown is not value else name
        assert_names(error, field, shown)
        return False
    assert valid, f"{name}={value!r} is invalid but was accepted"
    return True


@SETTINGS
@given(data=st.data())
def test_module_fields_are_accepted_or_named(data):
    name = data.draw(st.sampled_from(sorted(MODULE_FIELDS)), label="field")
    value = data.draw(ANY_VALUE.filter(lambda v: v is not True) if name == "compile" else ANY_VALUE, label="value")
    count("RobustFairLitModule", check_module_field(name, value))


def test_module_fields_at_fixed_edge_values():
    for name in MODULE_FIELDS:
        for value in EDGE_VALUES:
            if not (name == "compile" and value is True):
                count("RobustFairLitModule (edge values)", check_module_field(name, value))


@SETTINGS
@given(
    eps=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=2)),
    steps=st.one_of(st.integers(-3, 5), st.floats(allow_nan=True), st.booleans()),
)
def test_module_attack_dicts_from_checkpoints_are_checked(eps, steps):
    config = {"eps": eps, "steps": steps}
    valid = real(eps) and 0 < eps <= 1 and integer(steps, 1)  # linf (the default): pixels lie in [0, 1]
    try:
        make_module(fairness=[], train_attack=config)
    except (ValueError, TypeError) as error:
        assert not valid, error
        field, value = ("attack.eps", eps) if not (real(eps) and 0 < eps <= 1) else ("attack.steps", steps)
        assert_names(error, field, value)
        count("train_attack dict", False)
        return
    assert valid
    count("train_attack dict", True)


DATA_FIELDS: dict[str, Callable[[Any], bool]] = {
    "batch_size": lambda v: integer(v, 1),
    "eval_batch_size": lambda v: integer(v, 1),
    "train_eval_per_class": lambda v: integer(v, 0),
    "num_workers": lambda v: integer(v, 0) and v <= 2**62,
    "val_fraction": in_range(0, 0.5, open_low=True),  # with the default test_fraction 0.2: sum < 0.9 is checked too
    "test_fraction": in_range(0, 0.6, open_low=True),
    "on_device": is_bool,
}
DATA_FLOAT_FIELDS = ("val_fraction", "test_fraction")


@SETTINGS
@given(data=st.data())
def test_digits_data_module_fields_are_accepted_or_named(data):
    name = data.draw(st.sampled_from(sorted(DATA_FIELDS)), label="field")
    value = data.draw(ANY_VALUE, label="value")
    valid = DATA_FIELDS[name](value)
    if name in DATA_FLOAT_FIELDS and real(value) and 0 < value < 1 and not valid:
        # the sum check names both fields and the sum, not the single value
        with pytest.raises(ValueError, match=r"data\.val_fraction \+ data\.test_fraction = .*below 0\.9"):
            DigitsDataModule(**{name: value})
        count("DigitsDataModule", False)
        return
    count("DigitsDataModule", check_field(DigitsDataModule, f"data.{name}", name, value, valid))


def test_digits_data_module_fields_at_fixed_edge_values():
    for name, valid in DATA_FIELDS.items():
        for value in EDGE_VALUES:
            if name in DATA_FLOAT_FIELDS and real(value) and 0 < value < 1 and not valid(value):
                continue  # the sum check (see the property test)
            count(
                "DigitsDataModule (edge values)",
                check_field(DigitsDataModule, f"data.{name}", name, value, valid(value)),
            )


def test_digits_fraction_of_wrong_type_is_named():
    with pytest.raises((TypeError, ValueError), match=r"data\.val_fraction='0\.1'"):
        DigitsDataModule(val_fraction="0.1")


# ------------------------------------------------------------------------------------ metric / functional API
def tensors(max_dims: int = 3) -> st.SearchStrategy[torch.Tensor]:
    """Tensors of random shape (0-3 dims, sizes 0-5) and dtype, with edge values."""

    @st.composite
    def build(draw):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=max_dims)))
        dtype = draw(
            st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool])
        )
        n = int(np.prod(shape)) if shape else 1
        if dtype.is_floating_point:
            values = draw(st.lists(st.floats(-1e4, 1e4, width=16) | st.just(float("nan")), min_size=n, max_size=n))
        else:
            values = draw(st.lists(st.integers(-2, 6), min_size=n, max_size=n))
        return (
            torch.tensor(values, dtype=torch.float64 if dtype.is_floating_point else torch.int64)
            .reshape(shape)
            .to(dtype)
        )

    return build()


def float_matrix(rows: st.SearchStrategy[int], cols: int) -> st.SearchStrategy[torch.Tensor]:
    """Well-shaped float matrices (rows, cols) with edge values (NaN and +-1e4 logits are valid)."""
    values = st.floats(-1e4, 1e4, width=32) | st.just(float("nan"))
    dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
    return st.tuples(rows, dtypes).flatmap(
        lambda rd: st.lists(values, min_size=rd[0] * cols, max_size=rd[0] * cols).map(
            lambda v: torch.tensor(v, dtype=torch.float64).reshape(rd[0], cols).to(rd[1])
        )
    )


def labels(batch: int) -> st.SearchStrategy[torch.Tensor]:
    """Mostly in-range int64 labels of the right length, sometimes out of range, of another dtype or shape."""
    return st.one_of(
        st.lists(st.integers(0, 2), min_size=batch, max_size=batch).map(lambda v: torch.tensor(v, dtype=torch.long)),
        st.lists(st.integers(-2, 6), min_size=batch, max_size=batch).map(lambda v: torch.tensor(v, dtype=torch.long)),
        tensors(),
    )


def assert_shape_or_value_named(error: BaseException, field: str, tensor: torch.Tensor) -> None:
    """A bad tensor: the message names the field and its shape, dtype or the bad entry."""
    message = str(error)
    assert isinstance(error, ValueError | TypeError), message
    assert field in message, f"{field!r} not named in: {message}"
    shown = [repr(tuple(tensor.shape)), str(tensor.dtype)]
    if not tensor.dtype.is_floating_point and tensor.numel():
        shown += [repr(int(tensor.min())), repr(int(tensor.max()))]
    if tensor.dtype.is_floating_point and tensor.numel():
        bad = tensor.double()[~(torch.isfinite(tensor.double()) & (tensor.double() >= 0))]
        shown += [repr(float(bad[0]))] if bad.numel() else []
    assert any(s in message for s in shown), f"none of {shown} in: {message}"


def valid_labels(target: torch.Tensor, batch: int, k: int) -> bool:
    return (
        target.shape == (batch,)
        and not target.dtype.is_floating_point
        and target.dtype != torch.bool
        and (target.numel() == 0 or (int(target.min()) >= 0 and int(target.max()) < k))
    )


@SETTINGS
@given(logits=float_matrix(st.integers(0, 6), 3) | tensors(), data=st.data())
def test_confusion_metric_update_accepts_or_names(logits, data):
    k = 3
    batch = logits.shape[0] if logits.ndim else 0
    target = data.draw(labels(batch), label="target")
    metric = RobustConfusionMatrix(k)
    logits_ok = logits.dtype.is_floating_point and logits.ndim == 2 and logits.shape[1] == k
    valid = logits_ok and valid_labels(target, batch, k)
    for update in (metric.update, lambda lg, t: CF.robust_confusion_matrix(lg, t, k, gamma=0.1)):
        try:
            update(logits, target)
        except (ValueError, TypeError) as error:
            assert not valid, f"valid input rejected: {error}"
            bad, field = (logits, "logits") if not logits_ok else (target, "target")
            assert_shape_or_value_named(error, field, bad)
            continue
        assert valid, f"invalid logits {tuple(logits.shape)} {logits.dtype} / target {target!r} accepted"
    count("RobustConfusionMatrix.update / robust_confusion_matrix", valid)
    if valid:
        errors, counts = metric.synced_state()
        assert int(counts.sum()) == batch and int(errors.sum()) <= batch


@SETTINGS
@given(
    shape=st.one_of(
        st.integers(1, 5).map(lambda n: (n, n)),
        st.tuples(st.integers(0, 5), st.integers(0, 5)),
        st.lists(st.integers(0, 4), max_size=3).map(tuple),
    ),
    bad_entries=st.booleans(),
    data=st.data(),
)
def test_spectral_direction_accepts_or_names(shape, bad_entries, data):
    n = int(np.prod(shape)) if shape else 1
    edge = st.sampled_from([0.0, 1.0, 1e300, 5e-324] + ([float("nan"), float("inf"), -1.0, -1e-300] * bad_entries))
    values = data.draw(
        st.lists(
            st.one_of(st.floats(0, 1e300), st.integers(0, 10).map(float), edge),
            min_size=n,
            max_size=n,
        ),
        label="values",
    )
    confusion = torch.tensor(values, dtype=torch.float64).reshape(shape)
    square = confusion.ndim == 2 and confusion.shape[0] == confusion.shape[1] and confusion.shape[0] > 0
    valid = square and bool((torch.isfinite(confusion) & (confusion >= 0)).all())
    for rescale in (True, False):
        try:
            g = CF.spectral_direction(confusion, rescale=rescale)
        except ValueError as error:
            assert not valid, error
            assert_shape_or_value_named(error, "confusion", confusion)
            continue
        assert valid
        assert bool(torch.isfinite(g).all()) and float(g.min()) >= 0
        if rescale:
            assert float(g.max()) <= 2.01 + 1e-9
    count("spectral_direction", valid)


@SETTINGS
@given(
    direction=float_matrix(st.just(3), 3).map(lambda d: d.abs().nan_to_num(0.0)) | tensors(),
    logits=float_matrix(st.integers(0, 6), 3) | tensors(),
    data=st.data(),
)
def test_csr_weights_accepts_or_names(direction, logits, data):
    batch = logits.shape[0] if logits.ndim else 0
    target = data.draw(labels(batch), label="target")
    square = direction.ndim == 2 and direction.shape[0] == direction.shape[1]
    k = direction.shape[0] if square else -1
    logits_ok = logits.dtype.is_floating_point and logits.ndim == 2 and logits.shape[1] == k
    valid = square and k >= 1 and logits_ok and valid_labels(target, batch, k)
    try:
        weights = CF.csr_weights(direction, logits, target)
    except (ValueError, TypeError) as error:
        assert not valid, error
        if not square:
            assert_shape_or_value_named(error, "direction", direction)
        elif not logits_ok:
            assert_shape_or_value_named(error, "logits", logits)
        else:
            assert_shape_or_value_named(error, "target", target)
        count("csr_weights", False)
        return
    assert valid, f"accepted direction {tuple(direction.shape)}, logits {tuple(logits.shape)}, target {target!r}"
    assert weights.shape == (batch,) and weights.dtype == torch.float32
    count("csr_weights", True)


def test_report_how_many_examples_were_tried(capsys):
    """Not a check: prints how many inputs each property test tried and rejected (run with ``-s``)."""
    with capsys.disabled():
        for name, (tried, rejected) in sorted(TRIED.items()):
            print(
                f"\n{name}: {tried} inputs tried, {rejected} rejected with a named error, {tried - rejected} accepted"
            )


# --------------------------------------------------------------------------------- corrupt / truncated files
def truncation_offsets(size: int, n: int = 10) -> list[int]:
    """``n`` cut points spread over the file, the very start and end included."""
    return sorted({0, 1, size - 1, *np.linspace(2, size - 2, n - 3).astype(int).tolist()})


def test_truncated_archive_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "c10.npz"
    write_cifar10_archive(path)
    original = path.read_bytes()
    offsets = truncation_offsets(len(original))
    assert len(offsets) >= 10
    for cut in offsets:
        archive.clear_cache()
        path.write_bytes(original[:cut])
        with pytest.raises(ValueError, match=re.escape(str(path)) + r".*(truncated|corrupt)") as info:
            archive.decode_archive(path, "train")
        assert "Traceback" not in str(info.value), cut
    # flipped bytes in the middle: also named
    corrupt = bytearray(original)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(corrupt))
    archive.clear_cache()
    with pytest.raises(ValueError, match=re.escape(str(path))):
        archive.decode_archive(path, "train")


def test_truncated_weights_file_is_a_clear_error_naming_the_file(tmp_path):
    torch.manual_seed(0)
    source = DigitsCNN(width=8)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"net.backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    original = path.read_bytes()
    for cut in truncation_offsets(len(original)):
        path.write_bytes(original[:cut])
        target = DigitsCNN(width=8)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match=re.escape(repr(str(path))) + r".*(corrupt or truncated|no state dict)"):
            load_backbone_weights(target, path)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # untouched
        with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
            make_module(fairness=[], init_weights=str(path))


# ------------------------------------------------------------------------------------------ untrusted files
class Payload:
    """Unpickling this object would create the file ``marker`` (code execution)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def malicious_checkpoint(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A Lightning-style checkpoint of a real module, with a code-executing object in it."""
    marker = tmp_path / "pwned"
    module = make_module(fairness=[])
    path = tmp_path / "evil.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.6.0",
            "epoch": 0,
            "global_step": 0,
            "loops": {},
            "extra": Payload(marker),
        },
        path,
    )
    assert not marker.exists()
    return path, marker


def test_malicious_weights_file_is_refused_by_init_weights(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + r" holds pickled Python objects.*refused"):
        load_backbone_weights(DigitsCNN(width=8), path)
    with pytest.raises(ValueError, match=r"holds pickled Python objects"):
        make_module(fairness=[], init_weights=str(path))
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_by_load_from_checkpoint(tmp_path, monkeypatch):
    path, marker = malicious_checkpoint(tmp_path)
    # even where the environment asks torch to default to unsafe loading, the explicit weights_only=True holds
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + r" holds pickled Python objects.*weights_only"):
        RobustFairLitModule.load_from_checkpoint(path, backbone=DigitsCNN(width=8))
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_by_trainer_ckpt_path(tmp_path, monkeypatch):
    """``fit --ckpt_path``: Lightning 2.6 passes weights_only=None to torch.load, which torch >= 2.6 treats as
    True unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set; an explicit weights_only=True holds even then."""
    import pickle

    path, marker = malicious_checkpoint(tmp_path)
    for weights_only in (None, True):
        if weights_only:
            monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        trainer = make_trainer(max_epochs=1, limit_train_batches=1)
        with pytest.raises(pickle.UnpicklingError, match=r"Weights only load failed"):
            trainer.fit(
                make_module(fairness=[]), DigitsDataModule(batch_size=16), ckpt_path=path, weights_only=weights_only
            )
        assert not marker.exists()


def test_valid_checkpoint_still_loads_with_weights_only(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, enable_checkpointing=True, callbacks=[callback])
    module = make_module(fairness=[CSR()])
    trainer.fit(module, DigitsDataModule(batch_size=16))
    loaded = RobustFairLitModule.load_from_checkpoint(
        tmp_path / "last.ckpt", backbone=DigitsCNN(width=8), fairness=[CSR()], strict=True
    )
    for key, value in module.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert isinstance(loaded.net, nn.Sequential)


def test_malicious_checkpoint_is_refused_by_the_cli_ckpt_path(tmp_path, monkeypatch):
    """``confspec fit --ckpt_path FILE`` loads with weights_only=True even where the environment asks torch for
    unsafe loading (the CLI makes Lightning's weights_only=None explicit)."""
    import pickle

    from confspec_lightning.cli import main

    path, marker = malicious_checkpoint(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    args = ["fit", "--config", "digits/trades", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"]
    with pytest.raises(ValueError, match=r"--ckpt_path=.* holds pickled Python objects") as error:
        main([*args, "--trainer.logger=false", f"--ckpt_path={path}", "--debug"])
    assert isinstance(error.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()
    with pytest.raises(SystemExit) as exit_info:  # without --debug: one line naming the file, exit status 2
        main([*args, "--trainer.logger=false", f"--ckpt_path={path}"])
    assert exit_info.value.code == 2
    assert not marker.exists()
