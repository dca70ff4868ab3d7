"""Key layouts of public robust checkpoints, and their conversion to this library's backbones (one registry).

A layout is a naming scheme of a state dict *and* the function its network computes. Read in the public code:

* ``trades_wideresnet``: TRADES ``models/wideresnet.py`` (also MART, TRADES-AWP, DAFA, HAT's ReLU ``wrn-*``, the
  CSR authors, RobustBench's ``WideResNet``): ``conv1``, ``block{1,2,3}.layer.{j}.{bn1,conv1,bn2,conv2}``,
  ``block{g}.layer.0.convShortcut``, a final ``bn1``, ``fc``; TRADES's own file (and MART's, DAFA's, RobustBench
  entries built with ``sub_block1=True``) also holds ``sub_block1.*``, built but never used in ``forward``: dropped.
  The block is :class:`~confspec_lightning.models.resnet.WideBlock` (the shortcut takes relu(bn1(x)) where the
  width changes) -> :class:`~confspec_lightning.models.resnet.WideResNet`.
* ``kuangliu_resnet18``: kuangliu ``pytorch-cifar`` ``models/resnet.py`` (MART, DAFA, RobustBench ``ResNet18``):
  ``conv1``, ``bn1``, ``layer{L}.{j}.{conv1,bn1,conv2,bn2}``, ``layer{L}.0.shortcut.{0,1}``, ``linear``
  -> :class:`~confspec_lightning.models.resnet.ResNet18`.
* ``preact_resnet18_input_shortcut``: fast_adversarial ``preact_resnet.py`` and RobustBench's ``PreActBlock``
  (``Wong2020Fast``, ``Andriushchenko2020Understanding``): the 1x1 shortcut takes the raw block input x
  -> ``PreActResNet18(shortcut="input")``.
* ``preact_resnet18_activated_shortcut``: kuangliu ``models/preact_resnet.py``, Rice et al. (RobustBench
  ``PreActBlockV2`` or ``out_shortcut=True``): the shortcut takes relu(bn1(x)) -> ``PreActResNet18()``.
  Both PreAct layouts name their modules ``conv1``, ``layer{L}.{j}.{bn1,conv1,bn2,conv2}``,
  ``layer{L}.0.shortcut.0``, an optional final ``bn`` (fast_adversarial and Rice et al. have it; kuangliu and
  RobustBench's default ``bn_before_fc=False`` do not: ``PreActResNet18(final_bn=False)``) and ``linear``. The
  keys cannot tell the two shortcuts apart, so a PreAct file needs the layout named (``init_weights_layout``).
* ``native``: this library's own names (a backbone's ``state_dict()``, or a Lightning checkpoint of
  ``RobustFairLitModule``): no conversion.

The public definitions pool with a fixed kernel (``avg_pool2d(out, 8)`` / ``(out, 4)``), ours globally: the same
function on inputs of 29 to 32 pixels (CIFAR). Wrapper prefixes (``module.``, ``model.``, ...) are stripped by
:mod:`confspec_lightning.models.weights` before a layout is detected.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from confspec_lightning.models.resnet import PreActResNet18, ResNet18, WideResNet

#: The layouts ``init_weights_layout`` accepts (``auto``: detected from the keys).
LayoutName = Literal[
    "auto",
    "native",
    "trades_wideresnet",
    "kuangliu_resnet18",
    "preact_resnet18_input_shortcut",
    "preact_resnet18_activated_shortcut",
]


@dataclass
class Conversion:
    """A state dict renamed into one of our backbones' names.

    Attributes:
        state: the tensors under our names.
        dropped: keys of the file that the layout does not use, with the reason (e.g. ``sub_block1.*``).
        unmatched: keys the layout does not know (a strict error, unless empty).
        description: what the file holds, e.g. ``WRN-34-10``.
    """

    state: dict[str, Tensor]
    dropped: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    description: str = ""


@dataclass(frozen=True)
class Layout:
    """One public key layout: who publishes it, what it becomes, how its keys are renamed.

    Attributes:
        name: the ``init_weights_layout`` value.
        backbone: the backbone class of this library that computes the same function (and its options).
        sources: who publishes files in this layout.
        input_convention: the inputs the public code feeds its models (read in its training scripts).
        knows: whether a key (wrappers stripped) belongs to this layout.
        signature: whether a set of keys is this layout's (detection).
        convert: renames the file's tensors into the backbone's names.
        check_backbone: None when the backbone computes this layout's function, else why not and what to build.
    """

    name: str
    backbone: str
    sources: str
    input_convention: str
    knows: Callable[[str], bool]
    signature: Callable[[set[str]], bool]
    convert: Callable[[dict[str, Tensor]], Conversion]
    check_backbone: Callable[[nn.Module, Conversion], str | None]


# ------------------------------------------------------------------------------------------------ WideResNet
_WRN_BLOCK = re.compile(r"^block([123])\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(\w+)$")
_WRN_TOP = re.compile(r"^(conv1\.weight|bn1\.\w+|fc\.\w+)$")
_WRN_SUB_BLOCK = re.compile(r"^sub_block1\.")


def _wrn_knows(key: str) -> bool:
    return bool(_WRN_BLOCK.match(key) or _WRN_TOP.match(key) or _WRN_SUB_BLOCK.match(key))


def _wrn_convert(state: dict[str, Tensor]) -> Conversion:
    per_group: dict[int, set[int]] = {}
    for key in state:
        if match := _WRN_BLOCK.match(key):
            per_group.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    n = max((max(js) + 1 for js in per_group.values()), default=0)
    out = Conversion(state={})
    for key, value in state.items():
        if match := _WRN_BLOCK.match(key):
            group, j, module, tensor = match.groups()
            name = "shortcut" if module == "convShortcut" else module
            out.state[f"blocks.{(int(group) - 1) * n + int(j)}.{name}.{tensor}"] = value
        elif _WRN_SUB_BLOCK.match(key):
            out.dropped[key] = "sub_block1 is built but never used in forward (TRADES's WideResNet)"
        elif key.startswith("bn1."):
            out.state["bn." + key.removeprefix("bn1.")] = value
        elif _WRN_TOP.match(key):
            out.state[key] = value
        else:
            out.unmatched.append(key)
    conv = state.get("block1.layer.0.conv1.weight")
    widen = int(conv.shape[0]) // 16 if conv is not None else "?"
    out.description = f"WRN-{6 * n + 4}-{widen}"
    return out


def _wrn_check(backbone: nn.Module, conversion: Conversion) -> str | None:
    if isinstance(backbone, WideResNet):
        return None
    depth, widen = conversion.description.removeprefix("WRN-").split("-")
    return (
        f"the backbone is a {type(backbone).__name__}: build confspec_lightning.models.WideResNet with depth {depth} "
        f"and widen_factor {widen} (the file's {conversion.description})"
    )


# ----------------------------------------------------------------------------------- ResNet-18 and PreAct-18
_STAGE = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def _block_index(state: dict[str, Tensor]) -> dict[tuple[int, int], int]:
    """(stage, block) -> the running block index of our ``layers`` Sequential."""
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for k in state if (m := _STAGE.match(k))})
    return {block: index for index, block in enumerate(blocks)}


_RESNET_BLOCK = re.compile(r"^(conv1|bn1|conv2|bn2|shortcut\.[01])\.\w+$")
_RESNET_TOP = re.compile(r"^(conv1\.weight|bn1\.\w+|linear\.\w+)$")


def _resnet_knows(key: str) -> bool:
    match = _STAGE.match(key)
    return bool(_RESNET_TOP.match(key) or (match and _RESNET_BLOCK.match(match.group(3))))


def _resnet_convert(state: dict[str, Tensor]) -> Conversion:
    index = _block_index(state)
    out = Conversion(state={}, description="ResNet-18 (kuangliu layout)")
    for key, value in state.items():
        match = _STAGE.match(key)
        if match and _RESNET_BLOCK.match(match.group(3)):
            out.state[f"layers.{index[(int(match.group(1)), int(match.group(2)))]}.{match.group(3)}"] = value
        elif key.startswith("bn1."):
            out.state["stem_bn." + key.removeprefix("bn1.")] = value
        elif _RESNET_TOP.match(key):
            out.state[key] = value
        else:
            out.unmatched.append(key)
    return out


def _resnet_check(backbone: nn.Module, conversion: Conversion) -> str | None:
    if type(backbone) is ResNet18:
        return None
    return f"the backbone is a {type(backbone).__name__}: build confspec_lightning.models.ResNet18"


_PREACT_BLOCK = re.compile(r"^(bn1|conv1|bn2|conv2|shortcut\.0)\.\w+$")
_PREACT_TOP = re.compile(r"^(conv1\.weight|bn\.\w+|linear\.\w+)$")


def _preact_knows(key: str) -> bool:
    match = _STAGE.match(key)
    return bool(_PREACT_TOP.match(key) or (match and _PREACT_BLOCK.match(match.group(3))))


def _preact_convert(state: dict[str, Tensor]) -> Conversion:
    index = _block_index(state)
    final = "with" if "bn.weight" in state else "without"
    out = Conversion(state={}, description=f"PreActResNet-18 {final} a final BN")
    for key, value in state.items():
        match = _STAGE.match(key)
        if match and _PREACT_BLOCK.match(match.group(3)):
            name = match.group(3).replace("shortcut.0.", "shortcut.")
            out.state[f"layers.{index[(int(match.group(1)), int(match.group(2)))]}.{name}"] = value
        elif key.startswith("bn."):
            out.state["final_bn." + key.removeprefix("bn.")] = value
        elif _PREACT_TOP.match(key):
            out.state[key] = value
        else:
            out.unmatched.append(key)
    return out


def _preact_check(shortcut: str) -> Callable[[nn.Module, Conversion], str | None]:
    def check(backbone: nn.Module, conversion: Conversion) -> str | None:
        file_final_bn = "final_bn.weight" in conversion.state
        wanted = f"PreActResNet18 with shortcut: {shortcut} and final_bn: {str(file_final_bn).lower()}"
        if not isinstance(backbone, PreActResNet18):
            return f"the backbone is a {type(backbone).__name__}: build {wanted}"
        if backbone.shortcut_input != shortcut:
            return (
                f"the backbone's shortcut takes the {backbone.shortcut_input} block input, the file's network the "
                f"{shortcut} one (same shapes, another function): build {wanted}"
            )
        if isinstance(backbone.final_bn, nn.BatchNorm2d) != file_final_bn:
            return f"the file is a {conversion.description}, the backbone is not: build {wanted}"
        return None

    return check


# ---------------------------------------------------------------------------------------------------- native
def _native_convert(state: dict[str, Tensor]) -> Conversion:
    return Conversion(state=dict(state), description="this library's own names")


NATIVE = Layout(
    name="native",
    backbone="the backbone itself",
    sources="this library (a backbone's state_dict(), a RobustFairLitModule checkpoint)",
    input_convention="recorded in a RobustFairLitModule checkpoint (net.normalize); a plain state dict: the data's",
    knows=lambda key: False,
    signature=lambda keys: False,
    convert=_native_convert,
    check_backbone=lambda backbone, conversion: None,
)

_PREACT_SIGNATURE: Callable[[set[str]], bool] = lambda keys: "layer1.0.bn1.weight" in keys and "bn1.weight" not in keys  # noqa: E731

#: Every layout, by ``init_weights_layout`` name.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        NATIVE,
        Layout(
            name="trades_wideresnet",
            backbone="WideResNet(depth, widen_factor)",
            sources="TRADES, MART, TRADES-AWP, DAFA, HAT (ReLU wrn-*), the CSR authors, RobustBench WideResNet",
            input_convention="raw pixels in [0, 1] (TRADES, MART, AWP, DAFA, the CSR authors; RobustBench: mu/sigma "
            "in the file where the model normalises)",
            knows=_wrn_knows,
            signature=lambda keys: any(_WRN_BLOCK.match(k) for k in keys),
            convert=_wrn_convert,
            check_backbone=_wrn_check,
        ),
        Layout(
            name="kuangliu_resnet18",
            backbone="ResNet18",
            sources="kuangliu pytorch-cifar, MART, DAFA, RobustBench ResNet18",
            input_convention="raw [0, 1] in MART, DAFA and RobustBench; kuangliu's own script normalises with the "
            "CIFAR mean/std",
            knows=_resnet_knows,
            signature=lambda keys: "layer1.0.conv1.weight" in keys and "bn1.weight" in keys,
            convert=_resnet_convert,
            check_backbone=_resnet_check,
        ),
        Layout(
            name="preact_resnet18_input_shortcut",
            backbone="PreActResNet18(shortcut='input', final_bn=<as the file>)",
            sources="fast_adversarial (Wong et al.), RobustBench PreActBlock (Wong2020Fast, "
            "Andriushchenko2020Understanding)",
            input_convention="fast_adversarial: CIFAR mean/std outside the model; RobustBench: mu/sigma in the model",
            knows=_preact_knows,
            signature=_PREACT_SIGNATURE,
            convert=_preact_convert,
            check_backbone=_preact_check("input"),
        ),
        Layout(
            name="preact_resnet18_activated_shortcut",
            backbone="PreActResNet18(shortcut='activated', final_bn=<as the file>)",
            sources="kuangliu pytorch-cifar preact_resnet, Rice et al. (RobustBench PreActBlockV2), this library",
            input_convention="Rice et al.: CIFAR mean/std; kuangliu: CIFAR mean/std in its script",
            knows=_preact_knows,
            signature=_PREACT_SIGNATURE,
            convert=_preact_convert,
            check_backbone=_preact_check("activated"),
        ),
    )
}


def knows_any(key: str) -> bool:
    """Whether some public layout knows ``key`` (for stripping wrapper prefixes before detection)."""
    return any(layout.knows(key) for layout in LAYOUTS.values())


def supported_layouts() -> str:
    """One line per layout: its name, the backbone it becomes, who publishes it (for error messages)."""
    return "; ".join(f"{layout.name} -> {layout.backbone} ({layout.sources})" for layout in LAYOUTS.values())


def detect_layout(keys: set[str], own: set[str]) -> tuple[list[str], str]:
    """The layouts whose signature the keys have (our own names first), and what was seen, in words.

    ``own``: the backbone's own keys. Several foreign layouts match when the keys cannot tell them apart (the
    PreAct shortcut variants); none when the layout is unknown.
    """
    weights = {k for k in keys if not k.endswith("num_batches_tracked")}
    own_matches = len(weights & own)
    if weights and own_matches >= 0.5 * len(weights):
        return ["native"], f"{own_matches} of {len(weights)} tensors named as the backbone's own"
    matches = [name for name, layout in LAYOUTS.items() if layout.signature(keys)]
    tops = sorted({k.split(".")[0] for k in weights})
    seen = f"top-level modules {', '.join(tops[:8])}{' ...' if len(tops) > 8 else ''}"
    return matches, seen
