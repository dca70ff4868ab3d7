"""Fast-path options (channels_last, torch.compile) and the no-host-sync property of the CSR bookkeeping."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from confspec_lightning import CSR
from confspec_lightning import functional as CF
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.objectives import ObjectiveOutput

from helpers import make_module, make_trainer


def _fit_parameters(**module_kwargs) -> tuple[dict[str, torch.Tensor], pl.LightningModule]:
    pl.seed_everything(0)
    module = make_module(fairness=[CSR(confusion_source="streaming")], **module_kwargs)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(batch_size=32, shuffle=False))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}, module


@pytest.fixture(scope="module")
def reference_parameters() -> dict[str, torch.Tensor]:
    return _fit_parameters()[0]


def test_channels_last_trains_the_same_model(reference_parameters):
    params, module = _fit_parameters(channels_last=True)
    conv = module.backbone.features[2].weight  # (2w, w, 3, 3): the formats differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = module.format_input(torch.rand(4, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    # NHWC convolutions sum in another order; PGD's sign() can flip on such round-off, so after 3 SGD steps the
    # weights differ by up to ~1.5e-4 (measured); a wrong layout would differ by the weights' size (~0.1).
    for key, value in reference_parameters.items():
        torch.testing.assert_close(params[key], value, rtol=1e-3, atol=1e-3, msg=key)


def test_compiled_network_trains_the_same_model_and_keeps_checkpoint_keys(reference_parameters):
    # aot_eager traces with dynamo + AOTAutograd (train/eval graphs, input gradients of the attack) without
    # generating kernels, so the test is quick; inductor is measured by benchmarks/throughput.
    params, module = _fit_parameters(compile=True, compile_backend="aot_eager")
    assert getattr(module.net, "_compiled_call_impl", None) is not None
    assert list(params) == list(reference_parameters)  # no "_orig_mod." prefixes in checkpoints
    for key, value in reference_parameters.items():
        torch.testing.assert_close(params[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compile": "yes"}, "compile='yes' is not accepted"),
        ({"channels_last": 1}, "channels_last=1 is not accepted"),
        ({"compile_mode": "fastest"}, "compile_mode='fastest' is not accepted"),
        ({"compile": True, "compile_backend": "nope"}, "compile_backend='nope' is not accepted"),
    ],
)
def test_fast_path_options_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)


FORMS_AND_SOURCES = [
    (form, source) for form in ("code", "paper") for source in ("epoch_pass", "streaming", "batch", "ema")
]


def _csr_batch_bookkeeping(
    device: str, num_classes: int = 10, gamma: float = 0.1, form: str = "code", source: str = "streaming"
) -> RobustConfusionMatrix:
    """One training batch of CSR bookkeeping: the direction (per-step sources), weights or penalty, the update."""
    extra = {"include_diagonal": False} if form == "code" else {}
    csr = CSR(form=form, confusion_source=source, gamma=gamma, **extra)
    csr.bind(num_classes)
    csr.to(device)
    logits = torch.randn(16, num_classes, device=device)
    target = torch.randint(0, num_classes, (16,), device=device)
    ce = torch.rand(16, device=device)
    output = ObjectiveOutput(terms={"ce": ce}, coefficients={"ce": 1.0}, adv_logits=logits, adv_ce=ce)
    adjustment = csr.loss_adjustment(output, target)
    csr.on_train_batch_end(output, target)
    assert adjustment.extra_terms["csr"].shape == ()
    return csr.confusion


@pytest.mark.parametrize(("form", "source"), FORMS_AND_SOURCES)
def test_csr_batch_bookkeeping_reads_no_data_on_the_host(form, source):
    """On the meta device tensors have no data: any host read (.item(), bincount's data-dependent size,
    a Python branch on a value) raises. The per-batch CSR path of both forms and every source (the per-step
    sources' direction included: subspace iteration, no SVD) must run there, so it can never synchronise the
    host with an accelerator inside the training step."""
    confusion = _csr_batch_bookkeeping("meta", form=form, source=source)
    assert confusion.errors.device.type == "meta"
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.bincount(torch.zeros(3, dtype=torch.long, device="meta"), minlength=10)  # the old update did this


def test_the_svd_solver_is_the_one_that_reads_the_host():
    """The reference solver (a float64 SVD after checking the matrix's entries) does read the host: the meta device
    tells the two paths apart, so the test above would catch a host read coming back into the default one."""
    with pytest.raises((NotImplementedError, RuntimeError)):
        csr = CSR(form="paper", direction_solver="svd")
        csr.bind(10)
        csr.to("meta")
        logits = torch.randn(16, 10, device="meta")
        target = torch.randint(0, 10, (16,), device="meta")
        output = ObjectiveOutput(terms={"ce": logits[:, 0]}, coefficients={"ce": 1.0}, adv_logits=logits,
                                 adv_ce=logits[:, 0])  # fmt: skip
        csr.loss_adjustment(output, target)


@pytest.mark.parametrize(("form", "source"), [("code", "epoch_pass"), ("paper", "batch"), ("code", "ema")])
def test_the_whole_training_step_reads_no_data_on_the_host(form, source):
    """Attack, objective, every CSR term, the NaN guard (read every N steps: nonfinite_check_interval > 1),
    the epoch means and the training confusion: the module's training_step on the meta device."""
    module = make_module(fairness=[CSR(form=form, confusion_source=source)])
    module.nonfinite_check_interval = 100
    module.to("meta")
    x = torch.rand(8, 1, 8, 8, device="meta")
    y = torch.randint(0, 10, (8,), device="meta")
    loss = module.training_step((x, y), 0)
    assert loss.device.type == "meta" and loss.shape == ()


def test_confusion_counts_match_a_reference_count():
    torch.manual_seed(0)
    pred, target = torch.randint(0, 7, (500,)), torch.randint(0, 7, (500,))
    expected = torch.zeros(7, 7, dtype=torch.long)
    for p, t in zip(pred.tolist(), target.tolist(), strict=True):
        expected[p, t] += 1
    assert torch.equal(CF.counts_per_class(target, 7), expected.sum(0))
    expected.fill_diagonal_(0)
    assert torch.equal(CF._confusion_counts(pred, target, 7), expected)
    errors, counts = torch.zeros(7, 7, dtype=torch.long), torch.zeros(7, dtype=torch.long)
    for chunk in range(0, 500, 64):  # accumulated batch by batch, as the metric does
        CF.accumulate_confusion_(errors, counts, pred[chunk : chunk + 64], target[chunk : chunk + 64])
    assert torch.equal(errors, expected) and torch.equal(counts, CF.counts_per_class(target, 7))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host-device syncs exist only there)")
@pytest.mark.parametrize(("form", "source"), FORMS_AND_SOURCES)
def test_csr_batch_bookkeeping_does_not_synchronise_cuda(form, source):
    torch.cuda.set_sync_debug_mode("error")
    try:
        confusion = _csr_batch_bookkeeping("cuda", num_classes=200, form=form, source=source)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(confusion.class_counts.sum()) == 16
