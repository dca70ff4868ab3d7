"""The terms of CSR's worst-class bound for a trained network: layer operator norms, spectral complexity, ||C||_2.

Jin et al. (ICLR 2025, arXiv 2501.13273) bound the worst-class robust error by ``nu ||C_gamma||_2`` (the training
robust confusion matrix with margin gamma, ``nu <= sqrt(K)``) plus a PAC-Bayesian model-complexity term built on
the spectrally-normalised margin bound of Neyshabur, Bhojanapalli & Srebro (ICLR 2018, Theorem 1):

    O( sqrt( (B^2 d^2 h ln(d h) prod_i ||W_i||_2^2 sum_i ||W_i||_F^2 / ||W_i||_2^2 + ln(d m / delta)) / (gamma^2 m) ) )

with the class-wise sample size m_min in place of m. This module computes every quantity in it from a model:

* :func:`conv2d_spectral_norm`, :func:`conv2d_row_norms`, :func:`conv2d_operator_norms` - a convolution as the
  linear operator it is on its actual input size (stride, padding, dilation, groups; zero padding): sigma_max by
  Lanczos iteration with ``conv2d`` / ``conv_transpose2d``, the Frobenius norm and ``||A^T||_{2,1}`` exactly from
  the operator's row norms (one ``conv2d`` of a ones input with the squared kernel); :func:`dense_operator` builds
  the operator's matrix from basis vectors (for checks on tiny inputs).
* :func:`layer_operators` - the network's linear layers in execution order with their input sizes, BatchNorm (eval
  mode) and the input normalisation folded in as diagonal scalings; :func:`spectral_complexity` - the Neyshabur
  et al. (2018) and Bartlett, Foster & Telgarsky (2017) forms.
* :func:`bound_terms` - ||C||_2, ||C||_1, nu, m_min, the complexity term and the bound's value (unit constant).

Biases (and the normalisation's mean shift, BatchNorm's shift) are left out, as in the theorem (bias-free
networks). Pooling counts as 1-Lipschitz and is not a layer; identity skip connections are not operators (the
theorem covers chains; on a residual network the same formula over its convolutions is a complexity measure, as
in Jiang et al., "Fantastic generalization measures", ICLR 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confspec_lightning import functional as CF


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's hyper-parameters (zero padding), as ``nn.Conv2d`` holds them (padding as integers)."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        """The geometry of ``conv``; ``padding='same'`` is resolved, a padding mode other than zeros refused."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"{conv}: padding_mode {conv.padding_mode!r} is not supported (zero padding only).")
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # "same" (stride 1): symmetric when dilation * (k - 1) is even
                total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
                if any(t % 2 for t in total):
                    raise ValueError(f"{conv}: padding='same' with an asymmetric padding is not supported.")
                padding = tuple(t // 2 for t in total)
        return cls(_pair(conv.stride), _pair(padding), _pair(conv.dilation), int(conv.groups))

    def output_size(self, kernel: Sequence[int], size: Sequence[int]) -> tuple[int, int]:
        """(H', W') of an input (H, W): floor((H + 2p - d (k - 1) - 1) / s) + 1 per dimension."""
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(size, kernel, self.stride, self.padding, self.dilation, strict=True)
        )


def _conv(x: Tensor, weight: Tensor, geometry: ConvGeometry) -> Tensor:
    return F.conv2d(x, weight, None, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)


def _conv_adjoint(y: Tensor, weight: Tensor, geometry: ConvGeometry, size: Sequence[int]) -> Tensor:
    """A^T y: ``conv_transpose2d`` with the output padding that gives back the input size (H, W)."""
    kernel = weight.shape[2:]
    output_padding = tuple(
        n - ((m - 1) * s - 2 * p + d * (k - 1) + 1)
        for n, m, k, s, p, d in zip(
            size, y.shape[2:], kernel, geometry.stride, geometry.padding, geometry.dilation, strict=True
        )
    )
    return F.conv_transpose2d(
        y, weight, None, geometry.stride, geometry.padding, output_padding, geometry.groups, geometry.dilation
    )


def _check_input_shape(weight: Tensor, input_shape: Sequence[int], geometry: ConvGeometry) -> tuple[int, int, int]:
    if weight.ndim != 4 or len(input_shape) != 3:
        raise ValueError(
            f"a conv2d operator needs a (C_out, C_in / groups, kh, kw) kernel and an input shape (C, H, W); got "
            f"{tuple(weight.shape)} and {tuple(input_shape)}."
        )
    channels = weight.shape[1] * geometry.groups
    if input_shape[0] != channels:
        raise ValueError(f"the kernel takes {channels} input channels; the input shape is {tuple(input_shape)}.")
    out = geometry.output_size(weight.shape[2:], input_shape[1:])
    if min(out) < 1:
        raise ValueError(f"the input {tuple(input_shape)} is smaller than the kernel's receptive field.")
    return int(input_shape[0]), int(input_shape[1]), int(input_shape[2])


def conv2d_spectral_norm(
    weight: Tensor,
    input_shape: Sequence[int],
    geometry: ConvGeometry | None = None,
    *,
    max_iterations: int = 300,
    tolerance: float = 1e-10,
    seed: int = 0,
) -> tuple[float, int, bool]:
    """sigma_max of the convolution x -> conv2d(x, weight) as a linear operator on inputs of shape (C, H, W).

    Lanczos iteration with full reorthogonalisation on A^T A (A = ``conv2d``, A^T = ``conv_transpose2d`` with the
    same stride, padding, dilation and groups: one application of each per step), float64, from a seeded Gaussian
    start (Golub & Van Loan, *Matrix Computations*, 4th ed., §10.1); sigma = sqrt of the largest Ritz value. Stops
    when that value's relative change is below ``tolerance``. A Ritz value never exceeds lambda_max(A^T A), so the
    estimate is a lower bound of sigma_max that converges much faster than the power method (same cost per step).

    Returns:
        (sigma_max, iterations run, converged).
    """
    geometry = geometry or ConvGeometry()
    channels, height, width = _check_input_shape(weight, input_shape, geometry)
    w = weight.detach().to(torch.float64)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(channels * height * width, generator=generator, dtype=torch.float64).to(w.device)
    basis = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    previous = -1.0
    n = q.numel()
    for iteration in range(1, min(max_iterations, n) + 1):
        image = _conv(basis[-1].reshape(1, channels, height, width), w, geometry)
        v = _conv_adjoint(image, w, geometry, (height, width)).reshape(-1)
        alphas.append(float(basis[-1] @ v))
        stacked = torch.stack(basis)
        v = v - stacked.t() @ (stacked @ v)  # full reorthogonalisation, twice ("twice is enough")
        v = v - stacked.t() @ (stacked @ v)
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        top = max(float(torch.linalg.eigvalsh(tridiagonal)[-1]), 0.0)
        beta = float(v.norm())
        if beta <= 1e-14 * max(top, 1e-300) or abs(top - previous) <= tolerance * max(top, 1e-300):
            return math.sqrt(top), iteration, True  # an invariant subspace, or the Ritz value has settled
        previous = top
        betas.append(beta)
        basis.append(v / beta)
    return math.sqrt(previous), min(max_iterations, n), n <= max_iterations


def conv2d_row_norms(weight: Tensor, input_shape: Sequence[int], geometry: ConvGeometry | None = None) -> Tensor:
    """Squared l2 norms of the operator's rows, one per output unit (C_out, H', W'), exactly.

    Row (o, p) of the operator holds w[o, c, k] at the input positions p * s - pad + k * d that lie inside the
    input (zero padding drops the others), so its squared norm is ``sum_{c, k valid} w[o, c, k]^2`` =
    ``conv2d(ones(C, H, W), w^2)`` at (o, p). float64.
    """
    geometry = geometry or ConvGeometry()
    channels, height, width = _check_input_shape(weight, input_shape, geometry)
    w = weight.detach().to(torch.float64)
    ones = torch.ones(1, channels, height, width, dtype=torch.float64, device=w.device)
    return _conv(ones, w * w, geometry)[0]


def conv2d_operator_norms(
    weight: Tensor, input_shape: Sequence[int], geometry: ConvGeometry | None = None, **power: object
) -> dict[str, float]:
    """``spectral`` ||A||_2, ``frobenius`` ||A||_F, ``l21`` ||A^T||_{2,1} of the convolution operator A (float64).

    ||A||_F^2 = sum of the squared row norms (:func:`conv2d_row_norms`), i.e. each kernel entry times the number
    of output positions at which it meets the input (not ||w||_F^2 H' W' unless every tap always meets it, as with
    circular padding); ||A^T||_{2,1} = sum of the row norms (Bartlett et al. 2017's (2,1) norm of A^T).
    ``power``: options of :func:`conv2d_spectral_norm`. Also ``iterations`` and ``converged`` of the Lanczos iteration.
    """
    rows = conv2d_row_norms(weight, input_shape, geometry)
    spectral, iterations, converged = conv2d_spectral_norm(weight, input_shape, geometry, **power)  # type: ignore[arg-type]
    return {
        "spectral": spectral,
        "frobenius": float(rows.sum().sqrt()),
        "l21": float(rows.sqrt().sum()),
        "iterations": iterations,
        "converged": converged,
    }


def linear_operator_norms(weight: Tensor) -> dict[str, float]:
    """``spectral``, ``frobenius`` and ``l21`` (sum of the rows' l2 norms) of a dense (out, in) matrix, exactly."""
    w = weight.detach().to(torch.float64)
    return {
        "spectral": float(torch.linalg.matrix_norm(w, ord=2)),
        "frobenius": float(w.norm()),
        "l21": float(w.norm(dim=1).sum()),
        "iterations": 0,
        "converged": True,
    }


def dense_operator(apply, input_shape: Sequence[int]) -> Tensor:
    """The matrix (n_out, n_in) of a linear map ``apply`` on inputs of ``input_shape``, column j = apply(e_j).

    Feeds the n_in basis vectors as one batch (float64): meant for checks on tiny inputs.
    """
    n_in = math.prod(input_shape)
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *input_shape)
    with torch.no_grad():
        out = apply(basis)
    return out.reshape(n_in, -1).t()


# ------------------------------------------------------------------ the network's layers
@dataclass
class LayerOperator:
    """One linear layer of a network as an operator, with the diagonal scalings folded into its kernel.

    Attributes:
        name: the module's name in the model.
        kind: ``conv2d`` or ``linear``.
        input_shape: (C, H, W) or (n,), one sample.
        output_shape: likewise.
        weight: the folded kernel / matrix (float64): diag(out_scale) A diag(in_scale).
        geometry: the convolution's geometry (None for a linear layer).
        folded: names of the BatchNorm / normalisation modules folded in.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight: Tensor
    geometry: ConvGeometry | None = None
    folded: list[str] = field(default_factory=list)

    def norms(self, **power: object) -> dict[str, float]:
        """:func:`conv2d_operator_norms` or :func:`linear_operator_norms` of the folded operator."""
        if self.kind == "conv2d":
            return conv2d_operator_norms(self.weight, self.input_shape, self.geometry, **power)
        return linear_operator_norms(self.weight)

    @property
    def width(self) -> int:
        """max(n_in, n_out): the units the layer's matrix has on either side (the theorem's h bounds both)."""
        return max(math.prod(self.input_shape), math.prod(self.output_shape))


def _batchnorm_scale(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """The per-channel scale gamma / sqrt(running_var + eps) of an eval-mode BatchNorm (x -> scale x + shift)."""
    if bn.running_var is None:
        raise ValueError(f"{bn}: BatchNorm without running statistics cannot be folded (track_running_stats=False).")
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    return scale * bn.weight.detach().double() if bn.weight is not None else scale


def _fold_input(layer: LayerOperator, scale: Tensor) -> None:
    """Multiply the layer's input channels (features of a linear layer: channel-major blocks) by ``scale``."""
    if layer.kind == "linear":
        n_in = layer.weight.shape[1]
        if n_in % scale.numel():
            raise ValueError(f"{layer.name}: {n_in} input features do not split into {scale.numel()} channels.")
        layer.weight = layer.weight * scale.repeat_interleave(n_in // scale.numel())[None, :]
        return
    groups = layer.geometry.groups if layer.geometry else 1
    c_out, c_per_group = layer.weight.shape[:2]
    index = (torch.arange(c_out)[:, None] // (c_out // groups)) * c_per_group + torch.arange(c_per_group)[None, :]
    layer.weight = layer.weight * scale[index][:, :, None, None]


def _fold_output(layer: LayerOperator, scale: Tensor) -> None:
    shape = (-1,) + (1,) * (layer.weight.ndim - 1)
    layer.weight = layer.weight * scale.reshape(shape)


def layer_operators(model: nn.Module, example: Tensor) -> list[LayerOperator]:
    """The Conv2d and Linear layers of ``model`` in the order one forward of ``example`` (a batch of one) runs them.

    Each layer is taken as an operator on the input size it actually receives. Diagonal scalings are folded in
    (the theorem's layers are the linear maps between ReLUs; biases and shifts are left out):

    * an eval-mode BatchNorm whose input is a layer's output (conv -> bn) scales that layer's output channels by
      gamma / sqrt(var + eps) (exact: BN o conv is a conv);
    * any other BatchNorm (pre-activation layouts: bn -> relu -> conv) and the input normalisation
      ``(x - mean) / std`` scale the input channels of the next layer that runs, by |gamma| / sqrt(var + eps) and
      1 / std (exact for the linear part where the scale is positive, ReLU being positively homogeneous; a
      projection shortcut that reads the same activation is counted without it).

    The model is put in eval mode for the forward and restored.
    """
    from confspec_lightning.models.normalize import Normalize

    events: list[tuple[str, nn.Module, Tensor, Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear | nn.modules.batchnorm._BatchNorm | Normalize):

            def hook(mod, inputs, output, name=name):
                events.append((name, mod, inputs[0], output))

            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.Conv1d | nn.Conv3d | nn.ConvTranspose2d):
            raise ValueError(f"{name}: {type(module).__name__} is not supported (Conv2d and Linear only).")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    layers: list[LayerOperator] = []
    last_output: Tensor | None = None
    pending: Tensor | None = None
    pending_names: list[str] = []
    for name, module, inp, out in events:
        if isinstance(module, nn.Conv2d | nn.Linear):
            if isinstance(module, nn.Conv2d):
                layer = LayerOperator(
                    name, "conv2d", tuple(inp.shape[1:]), tuple(out.shape[1:]), module.weight.detach().double(),
                    ConvGeometry.of(module),
                )  # fmt: skip
            else:
                layer = LayerOperator(
                    name, "linear", (inp.shape[-1],), (out.shape[-1],), module.weight.detach().double()
                )
            if pending is not None:
                _fold_input(layer, pending)
                layer.folded += pending_names
                pending, pending_names = None, []
            layers.append(layer)
            last_output = out
            continue
        if isinstance(module, Normalize):
            scale = 1.0 / module.std.detach().double().flatten()
        else:
            scale = _batchnorm_scale(module)
            if layers and inp is last_output:
                _fold_output(layers[-1], scale)
                layers[-1].folded.append(name)
                continue
            scale = scale.abs()
        pending = scale if pending is None else pending * scale
        pending_names.append(name)
    if not layers:
        raise ValueError(f"{type(model).__name__} runs no Conv2d or Linear layer on an input of shape {example.shape}.")
    return layers


# ------------------------------------------------------------------ spectral complexity
def spectral_complexity(spectral: Sequence[float], frobenius: Sequence[float], l21: Sequence[float] | None = None):
    """Spectral complexity of a network from its layers' operator norms, in log10 (products overflow).

    * Neyshabur, Bhojanapalli & Srebro (ICLR 2018, Theorem 1):
      ``prod_i ||W_i||_2^2 * sum_i ||W_i||_F^2 / ||W_i||_2^2``;
    * Bartlett, Foster & Telgarsky (NeurIPS 2017, Theorem 1.1; reference matrices 0, 1-Lipschitz activations):
      ``prod_i ||W_i||_2 * (sum_i (||W_i^T||_{2,1} / ||W_i||_2)^(2/3))^(3/2)`` (needs ``l21``).

    Returns:
        dict with ``log10_neyshabur``, ``log10_product`` (log10 prod_i ||W_i||_2), ``ratio_sum``
        (sum_i ||W_i||_F^2 / ||W_i||_2^2, between d and the sum of the layers' ranks) and, given ``l21``,
        ``log10_bartlett`` and ``bartlett_sum``.
    """
    if not spectral or len(spectral) != len(frobenius) or (l21 is not None and len(l21) != len(spectral)):
        raise ValueError("spectral, frobenius (and l21) need one entry per layer, at least one layer.")
    if min(spectral) <= 0:
        return {"log10_neyshabur": float("-inf"), "log10_product": float("-inf"), "ratio_sum": float("nan")}
    log_product = sum(math.log10(s) for s in spectral)
    ratio_sum = sum((f / s) ** 2 for f, s in zip(frobenius, spectral, strict=True))
    result = {
        "log10_neyshabur": 2 * log_product + math.log10(ratio_sum),
        "log10_product": log_product,
        "ratio_sum": ratio_sum,
    }
    if l21 is not None:
        bartlett_sum = sum((a / s) ** (2 / 3) for a, s in zip(l21, spectral, strict=True))
        result["bartlett_sum"] = bartlett_sum
        result["log10_bartlett"] = log_product + 1.5 * math.log10(bartlett_sum)
    return result


# ------------------------------------------------------------------ the bound
def bound_terms(
    confusion_rates: Tensor,
    class_counts: Tensor,
    log10_complexity: float,
    *,
    depth: int,
    width: int,
    input_radius: float,
    gamma: float,
    delta: float = 0.05,
) -> dict[str, float]:
    """The terms of the worst-class bound from the training robust confusion matrix with margin gamma.

    ``confusion_rates``: C_gamma, per-class error rates (columns divided by the class counts, zero diagonal; a
    sample counts when its adversarial logits have z_y <= max_{i != y} z_i + gamma, the additive margin of
    :func:`~confspec_lightning.functional.margin_predictions`). Returns (float):

    * ``spectral_norm`` ||C_gamma||_2, ``l1_norm`` ||C_gamma||_1 (the training worst-class margin error);
    * ``nu_sqrt_k`` = sqrt(K), the paper's upper value of nu; ``nu_train`` = ||C||_1 / ||C||_2 of this matrix
      (the plug-in of the data-dependent ratio; with it nu ||C||_2 is just ||C||_1);
    * ``m_min`` (smallest training class count), ``m``;
    * ``complexity``: sqrt((B^2 d^2 h ln(d h) SC + ln(d m_min / delta)) / (gamma^2 m_min)), SC = 10 **
      ``log10_complexity`` (Neyshabur et al. 2018, Theorem 1, with m -> m_min and the O(.) constant taken as 1:
      the paper's constants are unknown here), B = ``input_radius``, d = ``depth``, h = ``width``;
      ``log10_complexity_term`` its log10 (the term overflows a float for deep networks: then ``complexity`` is inf);
    * ``bound`` = sqrt(K) ||C_gamma||_2 + complexity, ``bound_nu_train`` = ||C_gamma||_1 + complexity.
    """
    if not 0 < gamma:
        raise ValueError(f"gamma must be > 0 (the complexity term divides by it); got {gamma!r}.")
    if depth < 1 or width < 1 or input_radius <= 0 or not 0 < delta < 1:
        raise ValueError(f"depth {depth}, width {width}, input_radius {input_radius}, delta {delta}: out of range.")
    counts = class_counts.to(torch.float64)
    if counts.ndim != 1 or counts.numel() != confusion_rates.shape[0] or float(counts.min()) <= 0:
        raise ValueError(f"class_counts must give every one of the K classes a positive count; got {counts.tolist()}.")
    diagnostics = CF.confusion_diagnostics(confusion_rates)
    k = confusion_rates.shape[0]
    m_min = float(counts.min())
    log_numerator = (
        2 * math.log10(input_radius)
        + 2 * math.log10(depth)
        + math.log10(width)
        + math.log10(max(math.log(depth * width), 1e-300))
        + log10_complexity
    )
    confidence = math.log(depth * m_min / delta)  # ln(d m_min / delta) > 0 for delta < 1
    low, high = sorted((log_numerator, math.log10(confidence)))
    log_numerator = high + math.log10(1.0 + 10 ** (low - high))  # log10(10^a + 10^b), no overflow
    log10_term = 0.5 * (log_numerator - math.log10(gamma**2 * m_min))
    complexity = 10**log10_term if log10_term < 300 else math.inf
    spectral = float(CF.spectral_norm(confusion_rates))
    l1 = float(diagnostics["l1_norm"])
    return {
        "spectral_norm": spectral,
        "l1_norm": l1,
        "nu_sqrt_k": math.sqrt(k),
        "nu_train": float(diagnostics["nu"]),
        "m_min": m_min,
        "m": float(counts.sum()),
        "complexity": complexity,
        "log10_complexity_term": log10_term,
        "bound": math.sqrt(k) * spectral + complexity,
        "bound_nu_train": l1 + complexity,
    }


def input_radius(x: Tensor, eps: float, norm: str) -> float:
    """B: an upper bound on ||x_adv||_2 over the perturbed inputs, min(max_i ||x_i||_2 + eps_2, sqrt(n)).

    eps_2 = eps sqrt(n) for l_inf (the l_2 radius of the l_inf ball), eps for l_2; sqrt(n) because pixels stay
    in [0, 1]. n = pixels per image.
    """
    n = x[0].numel()
    radius = eps * math.sqrt(n) if norm == "linf" else eps
    largest = float(x.detach().reshape(len(x), -1).double().norm(dim=1).max())
    return min(largest + radius, math.sqrt(n))
