"""Throughput of robust training: the module against a plain loop, CSR's cost, fast paths, many classes, data, DDP.

Everything in one table is measured side by side in one process: the configurations take turns
(round robin, ``--repeats`` rounds of ``--steps`` timed steps after ``--warmup`` untimed ones), and a
figure is the median step time over all rounds. Ratios compare medians of the same run.

    python benchmarks/throughput/run.py                              # CPU: small CNN; CUDA: PreActResNet-18, WRN-34-10
    python benchmarks/throughput/run.py --setups preact18 --repeats 5
    python benchmarks/throughput/run.py --sections steps classes     # a subset of the sections

Sections (``--sections``):

* ``steps``: plain loop (authors' recipe, ``plain_loop.py``) vs ``RobustFairLitModule`` in a real
  Trainer: fp32 TRADES, TRADES + CSR (streaming and epoch_pass), bf16-mixed, channels_last,
  torch.compile; images/s, achieved FLOP/s (all forward/backward passes, counted by
  ``torch.utils.flop_counter``) and, on a GPU, the fraction of its peak bf16 FLOP/s; peak memory.
* ``classes``: CSR bookkeeping (confusion update, weights, SVD) for K = 10, 200, 1000 on synthetic logits,
  against the measured step; a real 200-class run (Tiny-ImageNet subset of ``../shared/data``) when present.
* ``csr_cost``: a real Trainer's step of TRADES + CSR over TRADES alone for K = 10, 100, 200, 1000, both forms
  and every direction source (``epoch_pass``, ``streaming``, ``batch``, ``ema``), with a realistic backbone
  (CPU: the small CNN; CUDA: PreActResNet-18) and a tiny linear one (CSR's bookkeeping alone shows).
* ``data``: share of the step spent between steps (fetch, transfer, uint8 -> float, crop/flip) with the
  DataLoader and with ``data.on_device``.
* ``ddp``: CPU only: 1 process vs 2 gloo processes (weak and strong scaling).

Writes ``results_<device>.json`` next to this file and prints Markdown tables (``RESULTS.md`` quotes them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from plain_loop import plain_step  # noqa: E402

from confspec_lightning import CSR, AttackConfig, RobustFairLitModule  # noqa: E402
from confspec_lightning import functional as CF  # noqa: E402
from confspec_lightning.data.base import ClassificationDataModule, random_crop_flip  # noqa: E402
from confspec_lightning.metrics import RobustConfusionMatrix  # noqa: E402
from confspec_lightning.models import DigitsCNN, PreActResNet18, WideResNet  # noqa: E402

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
#: dense bf16 tensor-core peak (FLOP/s) of GPUs we may be lent; --peak-tflops overrides
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ----------------------------------------------------------------------------- set-ups
@dataclass
class Setup:
    """A backbone, its input and batch: one table of the ``steps`` section."""

    name: str
    build: Callable[[int], nn.Module]
    batch_size: int
    input_shape: tuple[int, int, int] = (3, 32, 32)
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(eps=8 / 255, step=2 / 255, steps=10))


SETUPS = {
    "smallcnn": Setup("smallcnn (DigitsCNN width 16, 32x32x3)", lambda k: DigitsCNN(k, in_channels=3, width=16), 64),
    "preact18": Setup("PreActResNet-18 (32x32x3)", lambda k: PreActResNet18(k), 128),
    "wrn34": Setup("WRN-34-10 (32x32x3)", lambda k: WideResNet(depth=34, widen_factor=10, num_classes=k), 128),
}


def configured_setup(key: str, args: argparse.Namespace) -> Setup:
    """The set-up ``key`` with the command line's ``--batch-size`` and ``--attack-steps``, where given."""
    setup = SETUPS[key]
    attack = setup.attack if args.attack_steps is None else replace(setup.attack, steps=args.attack_steps)
    return Setup(setup.name, setup.build, args.batch_size or setup.batch_size, setup.input_shape, attack)


class SyntheticImages(ClassificationDataModule):
    """Random uint8 images of a fixed shape (timing only: the content does not change the cost)."""

    def __init__(self, num_images: int, input_shape: tuple[int, ...], num_classes: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_images, self.input_shape, self.num_classes = num_images, input_shape, num_classes
        self.class_names = [str(c) for c in range(num_classes)]
        self.mean, self.std = CIFAR_MEAN[: input_shape[0]], CIFAR_STD[: input_shape[0]]

    def load_split(self, split: str):
        generator = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = self.num_images if split == "train" else 2 * self.eval_batch_size
        x = torch.randint(0, 256, (n, *self.input_shape), dtype=torch.uint8, generator=generator)
        return x, torch.arange(n) % self.num_classes


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """Host time at every batch start/end (after a device sync), and at the epoch start."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.starts, self.ends, self.epoch_start = device, [], [], None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(self.device)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())


def timed_trainer(timer: StepTimer, batches: int, **kwargs) -> pl.Trainer:
    """A Trainer for ``batches`` training batches of one epoch: no validation, logging or checkpoints."""
    return pl.Trainer(
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        **kwargs,
    )


@dataclass
class Timing:
    """Per-step periods (batch start to next batch start), compute (start to end) and epoch-start time."""

    periods: list[float] = field(default_factory=list)
    computes: list[float] = field(default_factory=list)
    epoch_starts: list[float] = field(default_factory=list)  # epoch start -> first batch start
    memory_bytes: int | None = None

    def add(
        self, starts: list[float], ends: list[float], warmup: int, epoch_start: float | None, computes_from=None
    ) -> None:
        """``starts``/``ends`` of consecutive steps; ``computes_from``: when the step proper began (default start)."""
        n = len(starts) - 1  # the last start only closes the last period
        begins = computes_from or starts
        self.periods += [starts[i + 1] - starts[i] for i in range(warmup, n)]
        self.computes += [ends[i] - begins[i] for i in range(warmup, n)]
        if epoch_start is not None:
            self.epoch_starts.append(starts[0] - epoch_start)

    @property
    def step(self) -> float:
        return statistics.median(self.periods)

    @property
    def gap_share(self) -> float:
        """Median share of a step spent outside the training step (fetch, transfer, augmentation, loop)."""
        return 1.0 - statistics.median(self.computes) / self.step


@dataclass
class Config:
    """One timed configuration of a table."""

    label: str
    kind: str  # "plain" or "module"
    precision: str = "32-true"
    csr: str | None = None  # None, "streaming", "epoch_pass", "batch", "ema" (module) / "authors" (plain)
    channels_last: bool = False
    compile: bool = False
    on_device: bool = False
    csr_form: str = "code"  # the CSR form of the module configurations


STEP_CONFIGS = [
    Config("plain loop, TRADES, fp32 (authors' recipe)", "plain"),
    Config("plain loop, TRADES + CSR, fp32 (authors' recipe: extra forward)", "plain", csr="authors"),
    Config("module, TRADES, fp32", "module"),
    Config("module, TRADES + CSR streaming, fp32", "module", csr="streaming"),
    Config("module, TRADES + CSR epoch_pass, fp32", "module", csr="epoch_pass"),
    Config("module, TRADES, bf16-mixed", "module", precision="bf16-mixed"),
    Config("module, TRADES, bf16-mixed + channels_last", "module", precision="bf16-mixed", channels_last=True),
    Config(
        "module, TRADES, bf16-mixed + channels_last + compile",
        "module",
        precision="bf16-mixed",
        channels_last=True,
        compile=True,
    ),
    Config(
        "module, TRADES + CSR streaming, bf16-mixed + channels_last + compile",
        "module",
        csr="streaming",
        precision="bf16-mixed",
        channels_last=True,
        compile=True,
    ),
]


class Runner:
    """Builds a configuration once and times ``steps`` training steps per call."""

    def __init__(self, config: Config, setup: Setup, device: torch.device, num_classes: int, data) -> None:
        self.config, self.setup, self.device, self.data = config, setup, device, data
        torch.manual_seed(0)
        backbone = setup.build(num_classes)
        optimizer = partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4)
        if config.kind == "plain":
            from confspec_lightning.models import Normalize

            self.model = nn.Sequential(Normalize(data.mean, data.std), backbone).to(device)
            self.optimizer = optimizer(self.model.parameters())
            self.direction = torch.ones(num_classes, num_classes, device=device)
        else:
            fairness = [CSR(form=config.csr_form, confusion_source=config.csr)] if config.csr else []
            self.module = RobustFairLitModule(
                backbone=backbone,
                num_classes=num_classes,
                train_attack=setup.attack,
                fairness=fairness,
                optimizer=optimizer,
                input_mean=data.mean,
                input_std=data.std,
                channels_last=config.channels_last,
                compile=config.compile,
            )
        self.timing = Timing()

    def run(self, steps: int, warmup: int, record: bool = True) -> None:
        if self.config.kind == "plain":
            self._run_plain(steps, warmup, record)
        else:
            self._run_module(steps, warmup, record)

    def _run_plain(self, steps: int, warmup: int, record: bool) -> None:
        attack = self.setup.attack
        starts, fetched, ends = [], [], []
        loader = iter(self.data.train_dataloader())
        for _ in range(warmup + steps):
            synchronize(self.device)
            starts.append(time.perf_counter())  # the period includes fetching, as in the Trainer
            x, y = next(loader)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x = random_crop_flip(x.float().div_(255.0), 4)
            synchronize(self.device)
            fetched.append(time.perf_counter())
            plain_step(
                self.model,
                self.optimizer,
                x,
                y,
                eps=attack.eps,
                step=attack.step,
                steps=attack.steps,
                csr_alpha=0.3 if self.config.csr else None,
                direction=self.direction,
            )
            synchronize(self.device)
            ends.append(time.perf_counter())
        starts.append(ends[-1])
        if record:
            self.timing.add(starts, ends, warmup, None, computes_from=fetched)

    def _run_module(self, steps: int, warmup: int, record: bool) -> None:
        timer = StepTimer(self.device)
        self.data.on_device = self.config.on_device
        trainer = timed_trainer(
            timer, warmup + steps + 1, accelerator=self.device.type, precision=self.config.precision
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        trainer.fit(self.module, self.data)
        if self.device.type == "cuda":
            self.timing.memory_bytes = max(self.timing.memory_bytes or 0, torch.cuda.max_memory_allocated(self.device))
        if record:
            self.timing.add(timer.starts, timer.ends, warmup, timer.epoch_start)


def interleaved(runners: list[Runner], repeats: int, steps: int, warmup: int) -> dict[str, float]:
    """One untimed round (compilation, caches), then ``repeats`` rounds in turn; the first round's seconds."""
    first_round = {}
    for runner in runners:
        start = time.perf_counter()
        runner.run(steps=2, warmup=1, record=False)
        first_round[runner.config.label] = time.perf_counter() - start
    for round_ in range(repeats):
        for runner in runners:
            runner.run(steps, warmup)
        print(f"  round {round_ + 1}/{repeats} done", flush=True)
    return first_round


def count_step_flops(setup: Setup, device: torch.device, num_classes: int = 10) -> int:
    """FLOPs of one TRADES step, every forward/backward pass counted (``torch.utils.flop_counter``).

    The attack's passes (a clean forward, then per step a forward and an input-gradient backward) and the
    training passes (two forwards, one full backward) of the recipe, on a batch of the set-up's shape.
    """
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = setup.build(num_classes).to(device)
    x = torch.rand(setup.batch_size, *setup.input_shape, device=device)
    y = torch.arange(setup.batch_size, device=device) % num_classes
    with FlopCounterMode(display=False) as counter:
        p_clean = model(x).detach().softmax(1)
        base = x.clone().requires_grad_(True)
        for _ in range(setup.attack.steps):
            x_adv = base * 1.0  # a non-leaf input: the counter's module hooks refuse autograd.grad on a leaf
            loss = F.kl_div(model(x_adv).log_softmax(1), p_clean, reduction="sum")
            torch.autograd.grad(loss, [x_adv])
        logits, logits_adv = model(x), model(x.detach())
        loss = F.cross_entropy(logits, y) + F.kl_div(
            logits_adv.log_softmax(1), logits.softmax(1), reduction="batchmean"
        )
        loss.backward()
    return counter.get_total_flops()


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16.items() if key in name), None)


def cpu_memory_probe(args: argparse.Namespace) -> None:
    """Child process: peak resident memory above the resting level while one configuration trains (JSON).

    On Linux the peak (VmHWM) is reset just before the timed steps, so the figure is the steps' own
    working set (activations, attack buffers, autocast copies) above what was resident before them.
    """
    config = next(c for c in STEP_CONFIGS if c.label == args.memory_probe)
    setup = configured_setup(args.setups[0], args)
    batch = setup.batch_size
    device = torch.device("cpu")
    data = SyntheticImages(batch * 8, setup.input_shape, batch_size=batch)
    data.setup()
    runner = Runner(config, setup, device, 10, data)
    runner.run(steps=1, warmup=1, record=False)  # allocator caches and lazy state exist before we measure
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set size (VmHWM) to now
    before = _proc_status_kib("VmRSS")
    runner.run(steps=3, warmup=1, record=False)
    print(json.dumps({"rss_growth_bytes": (_proc_status_kib("VmHWM") - before) * 1024}))


def _proc_status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def cpu_memory(config: Config, setup_key: str, setup: Setup) -> int | None:
    command = [sys.executable, __file__, "--setups", setup_key, "--memory-probe", config.label]
    command += ["--batch-size", str(setup.batch_size), "--attack-steps", str(setup.attack.steps)]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["rss_growth_bytes"] if lines else None


# ----------------------------------------------------------------------------- sections
def section_steps(setup_key: str, device: torch.device, args: argparse.Namespace) -> dict:
    setup = configured_setup(setup_key, args)
    batch = setup.batch_size
    configs = [
        c
        for c in STEP_CONFIGS
        if c.kind == "plain" or (not (c.compile and args.no_compile) and c.precision in args.precisions)
    ]
    steps_per_round = args.steps
    data = SyntheticImages(batch * (steps_per_round + args.warmup + 2), setup.input_shape, batch_size=batch)
    data.setup()
    print(f"[steps] {setup.name}, batch {batch}, {device}: building {len(configs)} configurations", flush=True)
    runners = [Runner(config, setup, device, 10, data) for config in configs]
    first_round = interleaved(runners, args.repeats, steps_per_round, args.warmup)
    flops = count_step_flops(setup, device)
    peak = peak_flops(device, args.peak_tflops)
    rows = []
    for runner in runners:
        t = runner.timing
        memory = t.memory_bytes
        if device.type == "cpu" and not runner.config.compile and not args.no_memory:
            memory = cpu_memory(runner.config, setup_key, setup)
        rows.append(
            {
                "config": runner.config.label,
                "step_ms": 1000 * t.step,
                "images_per_s": batch / t.step,
                "tflops_per_s": flops / t.step / 1e12,
                "peak_fraction": (flops / t.step / peak) if peak else None,
                "gap_share": t.gap_share,
                "epoch_start_ms": 1000 * statistics.median(t.epoch_starts) if t.epoch_starts else None,
                "first_round_s": first_round[runner.config.label],
                "memory_bytes": memory,
                "samples": len(t.periods),
            }
        )
    by_label = {r["config"]: r for r in rows}

    def ratio(a: str, b: str) -> float | None:
        return by_label[a]["step_ms"] / by_label[b]["step_ms"] if a in by_label and b in by_label else None

    plain, module = STEP_CONFIGS[0].label, STEP_CONFIGS[2].label
    epoch_pass_row = by_label.get(STEP_CONFIGS[4].label)
    streaming_row = by_label.get(STEP_CONFIGS[3].label)
    extra_epoch = None
    if epoch_pass_row and streaming_row:
        # the pass runs between the epoch start and the first batch; per training batch it costs:
        per_batch = (epoch_pass_row["epoch_start_ms"] - streaming_row["epoch_start_ms"]) / (
            steps_per_round + args.warmup + 1
        )
        extra_epoch = per_batch / streaming_row["step_ms"]
    fastest = min((r for r in rows if r["config"].startswith("module")), key=lambda r: r["step_ms"])
    summary = {
        "framework_tax (module fp32 / plain fp32)": ratio(module, plain),
        "csr_streaming_cost (module CSR streaming / module TRADES, fp32)": ratio(STEP_CONFIGS[3].label, module),
        "csr_vs_authors (module CSR streaming / plain CSR, fp32)": ratio(STEP_CONFIGS[3].label, STEP_CONFIGS[1].label),
        "epoch_pass_extra_per_epoch (pass time / epoch training time)": extra_epoch,
        "fastest module config": fastest["config"],
        "speedup (plain fp32 / fastest module)": by_label[plain]["step_ms"] / fastest["step_ms"],
        "fast-path speed-up (plain fp32 step / module TRADES bf16 + channels_last + compile step)": ratio(
            plain, STEP_CONFIGS[7].label
        ),
    }
    return {
        "setup": setup.name,
        "batch_size": batch,
        "attack_steps": setup.attack.steps,
        "flops_per_step": flops,
        "rows": rows,
        "summary": summary,
    }


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 30) -> float:
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def section_classes(device: torch.device, args: argparse.Namespace, step_seconds: float | None) -> dict:
    """CSR bookkeeping per step (update + weights) and per epoch (synced state + SVD) for K classes."""
    batch = 128
    rows = []
    for k in (10, 200, 1000):
        metric = RobustConfusionMatrix(k).to(device)
        logits = torch.randn(batch, k, device=device)
        target = torch.randint(0, k, (batch,), device=device)
        ce = torch.rand(batch, device=device)
        direction = torch.rand(k, k, device=device)

        def batch_bookkeeping(metric=metric, logits=logits, target=target, direction=direction, ce=ce):
            metric.update(logits, target)
            return (CF.csr_weights(direction, logits, target) * ce).mean()

        def epoch_bookkeeping(metric=metric):
            return CF.spectral_direction(CF.confusion_from_counts(*metric.synced_state()))

        per_step = time_call(batch_bookkeeping, device)
        metric.errors.random_(0, 50)
        metric.class_counts.fill_(500)
        per_epoch = time_call(epoch_bookkeeping, device, repeats=5)
        steps_per_epoch = {10: 391, 200: 782, 1000: 5005}[k]  # CIFAR-10 b128, Tiny-ImageNet b128, ImageNet b256
        row = {
            "classes": k,
            "per_step_ms": 1000 * per_step,
            "svd_per_epoch_ms": 1000 * per_epoch,
            "steps_per_epoch_assumed": steps_per_epoch,
        }
        if step_seconds:
            row["share_of_step"] = (per_step + per_epoch / steps_per_epoch) / step_seconds
        rows.append(row)
        print(f"[classes] K={k}: {row}", flush=True)
    result: dict = {"rows": rows, "reference_step_ms": 1000 * step_seconds if step_seconds else None}
    tin = ROOT.parent / "shared" / "data" / "tinyimagenet200_subset"
    if tin.is_dir() and not args.no_tin:
        result["tinyimagenet"] = tinyimagenet_run(tin, device, args)
    else:
        result["tinyimagenet"] = f"skipped: {tin} not found" if not tin.is_dir() else "skipped (--no-tin)"
    return result


#: section csr_cost: the class counts, and every (form, source) of CSR next to TRADES
CSR_COST_CLASSES = (10, 100, 200, 1000)
CSR_COST_CONFIGS = [Config("TRADES", "module")] + [
    Config(f"CSR {form} {source}", "module", csr=source, csr_form=form)
    for form in ("code", "paper")
    for source in ("epoch_pass", "streaming", "batch", "ema")
]


class TinyNet(nn.Module):
    """A linear classifier on 3x8x8 images: a step costs little, so CSR's bookkeeping shows."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def csr_cost_setups(device: torch.device, args: argparse.Namespace) -> dict[str, Callable[[int], Setup]]:
    """(backbone kind) -> K -> Setup: a realistic backbone for the device and a tiny one."""
    if device.type == "cpu":
        real = lambda k: Setup(  # noqa: E731
            "smallcnn (DigitsCNN width 16, 32x32x3)", lambda n: DigitsCNN(n, in_channels=3, width=16), 64
        )
    else:
        real = lambda k: Setup(  # noqa: E731
            f"PreActResNet-18 ({'32x32' if k <= 100 else '64x64'}x3)",
            lambda n: PreActResNet18(n),
            128,
            (3, 32, 32) if k <= 100 else (3, 64, 64),
        )
    tiny = lambda k: Setup(  # noqa: E731
        "tiny (linear, 8x8x3)", TinyNet, 256, (3, 8, 8), AttackConfig(eps=8 / 255, step=2 / 255, steps=2)
    )
    kinds = {"real": real, "tiny": tiny}
    return {key: kinds[key] for key in args.csr_cost_backbones}


def section_csr_cost(device: torch.device, args: argparse.Namespace) -> dict:
    """Step time of TRADES + CSR (both forms, every source) over TRADES alone, per K and backbone, side by side.

    The epoch pass of ``epoch_pass`` runs before the epoch's first step, so its steps cost what streaming's do; its
    pass is reported apart (``epoch_pass_ms``) and as a share of an epoch of ``steps_per_epoch`` steps.
    """
    tables = []
    for kind, make_setup in csr_cost_setups(device, args).items():
        for k in args.csr_cost_classes:
            setup = make_setup(k)
            batch = setup.batch_size
            data = SyntheticImages(batch * (args.steps + args.warmup + 2), setup.input_shape, num_classes=k,
                                   batch_size=batch)  # fmt: skip
            data.setup()
            print(f"[csr_cost] {kind}: {setup.name}, K={k}, batch {batch}, {device}", flush=True)
            runners = [Runner(config, setup, device, k, data) for config in CSR_COST_CONFIGS]
            interleaved(runners, args.repeats, args.steps, args.warmup)
            trades = runners[0].timing.step
            rows = []
            for runner in runners:
                t = runner.timing
                start = statistics.median(t.epoch_starts) if t.epoch_starts else None
                rows.append(
                    {
                        "config": runner.config.label,
                        "step_ms": 1000 * t.step,
                        "ratio": t.step / trades,
                        "epoch_start_ms": None if start is None else 1000 * start,
                        "samples": len(t.periods),
                    }
                )
            pass_rows = {r["config"]: r for r in rows}
            steps_per_epoch = {10: 391, 100: 391, 200: 782, 1000: 5005}[k]
            for form in ("code", "paper"):
                epoch_pass, streaming = pass_rows[f"CSR {form} epoch_pass"], pass_rows[f"CSR {form} streaming"]
                extra = epoch_pass["epoch_start_ms"] - streaming["epoch_start_ms"]
                epoch_pass["epoch_pass_ms"] = extra
                # the pass attacks every training batch once: per step it costs extra / (steps timed in that epoch)
                per_step = extra / (args.steps + args.warmup + 1)
                epoch_pass["ratio_with_pass"] = (epoch_pass["step_ms"] + per_step) / (1000 * trades)
            tables.append(
                {
                    "backbone": kind,
                    "setup": setup.name,
                    "classes": k,
                    "batch_size": batch,
                    "attack_steps": setup.attack.steps,
                    "steps_per_epoch_assumed": steps_per_epoch,
                    "rows": rows,
                }
            )
            worst = max(r["ratio"] for r in rows)
            print(f"[csr_cost] {kind} K={k}: TRADES {1000 * trades:.1f} ms; largest ratio {worst:.3f}", flush=True)
    return {"tables": tables}


def tinyimagenet_run(root: Path, device: torch.device, args: argparse.Namespace) -> dict:
    """A real 200-class run: TRADES vs TRADES + CSR (streaming) on Tiny-ImageNet images, side by side."""
    from confspec_lightning.data import TinyImageNetDataModule

    batch = args.batch_size or (64 if device.type == "cpu" else 128)
    data = TinyImageNetDataModule(root=str(root), source="archive", batch_size=batch, train_per_class=20)
    data.setup()
    setup = Setup(
        "smallcnn (DigitsCNN width 16, 64x64x3)" if device.type == "cpu" else "PreActResNet-18 (64x64x3)",
        (lambda k: DigitsCNN(k, in_channels=3, width=16)) if device.type == "cpu" else (lambda k: PreActResNet18(k)),
        batch,
        (3, 64, 64),
    )
    configs = [
        Config("module, TRADES, fp32", "module"),
        Config("module, TRADES + CSR streaming, fp32", "module", csr="streaming"),
    ]
    runners = [Runner(c, setup, device, 200, data) for c in configs]
    interleaved(runners, args.repeats, args.steps, args.warmup)
    trades, csr = (r.timing.step for r in runners)
    print(f"[classes] Tiny-ImageNet K=200: TRADES {1000 * trades:.1f} ms, CSR {1000 * csr:.1f} ms", flush=True)
    return {
        "setup": setup.name,
        "batch_size": batch,
        "trades_step_ms": 1000 * trades,
        "csr_step_ms": 1000 * csr,
        "ratio": csr / trades,
    }


def section_data(setup_key: str, device: torch.device, args: argparse.Namespace) -> dict:
    """Share of the step outside the training step, with the DataLoader and with ``data.on_device``."""
    setup = configured_setup(setup_key, args)
    batch = setup.batch_size
    data = SyntheticImages(50_000, setup.input_shape, batch_size=batch)  # CIFAR-10 size, uint8
    data.setup()
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    configs = [
        Config(
            f"module, TRADES, {precision}, DataLoader",
            "module",
            precision=precision,
            channels_last=device.type == "cuda",
        ),
        Config(
            f"module, TRADES, {precision}, data.on_device",
            "module",
            precision=precision,
            channels_last=device.type == "cuda",
            on_device=True,
        ),
    ]
    runners = [Runner(c, setup, device, 10, data) for c in configs]
    interleaved(runners, args.repeats, args.steps, args.warmup)
    rows = [
        {"config": r.config.label, "step_ms": 1000 * r.timing.step, "outside_step_share": r.timing.gap_share}
        for r in runners
    ]
    print(f"[data] {rows}", flush=True)
    return {"setup": setup.name, "batch_size": batch, "rows": rows}


def ddp_worker(args: argparse.Namespace) -> None:
    """Child process: ``--ddp-world`` gloo processes train ``steps`` TRADES steps; rank 0 prints the step time."""
    setup = SETUPS["smallcnn"]
    world = args.ddp_world
    batch = args.ddp_batch
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    data = SyntheticImages(batch * world * (args.steps + args.warmup + 2), setup.input_shape, batch_size=batch)
    module = RobustFairLitModule(
        backbone=setup.build(10),
        num_classes=10,
        train_attack=setup.attack,
        fairness=[CSR(confusion_source="streaming")],
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        input_mean=data.mean,
        input_std=data.std,
    )
    timer = StepTimer(torch.device("cpu"))
    trainer = timed_trainer(
        timer, args.steps + args.warmup + 1, accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto"
    )
    trainer.fit(module, data)
    if trainer.global_rank == 0:
        timing = Timing()
        timing.add(timer.starts, timer.ends, args.warmup, None)
        print(json.dumps({"world": world, "batch_per_rank": batch, "step_s": timing.step}), flush=True)


def section_ddp(args: argparse.Namespace) -> dict:
    """1 process (all cores) vs 2 gloo processes (half the cores each), weak and strong scaling."""
    batch = args.batch_size or SETUPS["smallcnn"].batch_size
    runs = []
    for world, per_rank in ((1, batch), (2, batch), (2, batch // 2)):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--ddp-worker",
                "--ddp-world",
                str(world),
                "--ddp-batch",
                str(per_rank),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))},
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise SystemExit(f"DDP worker failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        run = json.loads(lines[-1])
        run["images_per_s"] = world * per_rank / run["step_s"]
        runs.append(run)
        print(f"[ddp] {run}", flush=True)
    return {"runs": runs}


# ----------------------------------------------------------------------------- report
def fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}; torch {result['torch']}, lightning {result['lightning']}.", ""]
    for table in result.get("steps", []):
        lines += [
            f"**{table['setup']}**, batch {table['batch_size']}, "
            f"{table.get('attack_steps', 10)}-step l_inf TRADES attack, "
            f"{table['flops_per_step'] / 1e9:.1f} GFLOP per step (all passes):",
            "",
            "| configuration | step ms (median) | images/s | TFLOP/s | of peak bf16 | outside-step share "
            "| epoch start ms | first round s | peak memory MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in table["rows"]:
            memory = None if r["memory_bytes"] is None else r["memory_bytes"] / 2**20
            lines.append(
                f"| {r['config']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {r['tflops_per_s']:.3f} "
                f"| {fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '.1f')}{'%' if r['peak_fraction'] else ''} "
                f"| {100 * r['gap_share']:.1f}% | {fmt(r['epoch_start_ms'], '.0f')} | {r['first_round_s']:.1f} "
                f"| {fmt(memory, '.0f')} |"
            )
        lines += ["", "| ratio | value |", "|---|---|"]
        for key, value in table["summary"].items():
            lines.append(f"| {key} | {value if isinstance(value, str) else fmt(value, '.3f')} |")
        lines.append("")
    if "classes" in result:
        c = result["classes"]
        lines += [
            f"CSR bookkeeping, batch 128 (reference step {fmt(c['reference_step_ms'], '.1f')} ms):",
            "",
            "| K | per step ms (update + weights) | SVD per epoch ms | steps/epoch assumed | share of step |",
            "|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            share = r.get("share_of_step")
            lines.append(
                f"| {r['classes']} | {r['per_step_ms']:.3f} | {r['svd_per_epoch_ms']:.1f} "
                f"| {r['steps_per_epoch_assumed']} | {fmt(share and 100 * share, '.2f')}% |"
            )
        tin = c["tinyimagenet"]
        if isinstance(tin, dict):
            lines += [
                "",
                f"Real 200-class run (Tiny-ImageNet subset, {tin['setup']}, batch {tin['batch_size']}): TRADES "
                f"{tin['trades_step_ms']:.1f} ms, TRADES + CSR streaming {tin['csr_step_ms']:.1f} ms per step, "
                f"ratio {tin['ratio']:.3f}.",
            ]
        else:
            lines += ["", f"Real 200-class run: {tin}."]
        lines.append("")
    if "csr_cost" in result:
        lines += [
            "CSR's cost per training step over TRADES alone (median step ratio, measured side by side; the epoch "
            "pass of `epoch_pass` runs before an epoch's first step and is given apart, and amortised over the "
            "steps of that timed epoch):",
            "",
            "| backbone | K | batch | attack steps | TRADES ms | "
            + " | ".join(c.label.removeprefix("CSR ") for c in CSR_COST_CONFIGS[1:])
            + " |",
            "|" + "---|" * (4 + len(CSR_COST_CONFIGS)),
        ]
        for table in result["csr_cost"]["tables"]:
            rows = {r["config"]: r for r in table["rows"]}
            cells = [
                table["setup"],
                str(table["classes"]),
                str(table["batch_size"]),
                str(table["attack_steps"]),
                f"{rows['TRADES']['step_ms']:.1f}",
            ]
            for config in CSR_COST_CONFIGS[1:]:
                row = rows[config.label]
                cell = f"{row['ratio']:.3f}"
                if "ratio_with_pass" in row:
                    cell += f" ({row['ratio_with_pass']:.2f} with the pass)"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if "data" in result:
        d = result["data"]
        lines += [f"Data path ({d['setup']}, batch {d['batch_size']}, 50 000 uint8 CIFAR-size images):", ""]
        lines += ["| configuration | step ms | share of the step outside the training step |", "|---|---|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['config']} | {r['step_ms']:.1f} | {100 * r['outside_step_share']:.1f}% |")
        lines.append("")
    if "ddp" in result:
        lines += ["DDP on CPU (gloo), TRADES + CSR streaming, smallcnn:", ""]
        lines += ["| processes | batch per rank | step ms | images/s (global) |", "|---|---|---|---|"]
        for r in result["ddp"]["runs"]:
            lines.append(
                f"| {r['world']} | {r['batch_per_rank']} | {1000 * r['step_s']:.1f} | {r['images_per_s']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=None)
    parser.add_argument("--sections", nargs="+", choices=["steps", "classes", "csr_cost", "data", "ddp"], default=None)
    parser.add_argument("--csr-cost-classes", nargs="+", type=int, default=list(CSR_COST_CLASSES))
    parser.add_argument("--csr-cost-backbones", nargs="+", choices=["real", "tiny"], default=["real", "tiny"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the set-up's")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration and round")
    parser.add_argument(
        "--attack-steps", type=int, default=None, help="steps of the training attack (default: the set-up's, 10)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s of the device")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["32-true", "bf16-mixed"],
        default=["32-true", "bf16-mixed"],
        help="module configurations to time (the plain fp32 loop is always timed)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip CPU peak-memory probes")
    parser.add_argument("--no-tin", action="store_true", help="skip the real Tiny-ImageNet 200-class run")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default results_<device>.json here)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-batch", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        return ddp_worker(args)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.setups = args.setups or (["smallcnn"] if device.type == "cpu" else ["preact18", "wrn34"])
    if args.memory_probe:
        return cpu_memory_probe(args)
    sections = args.sections or ["steps", "classes", "csr_cost", "data", *(["ddp"] if device.type == "cpu" else [])]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the authors' recipe)
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    result: dict = {
        "device": name,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "steps": [],
    }
    if "steps" in sections:
        for key in args.setups:
            result["steps"].append(section_steps(key, device, args))
    if "classes" in sections:
        reference = None
        if result["steps"]:
            rows = {r["config"]: r for r in result["steps"][0]["rows"]}
            reference = rows[STEP_CONFIGS[2].label]["step_ms"] / 1000
        result["classes"] = section_classes(device, args, reference)
    if "csr_cost" in sections:
        result["csr_cost"] = section_csr_cost(device, args)
    if "data" in sections:
        result["data"] = section_data(args.setups[0], device, args)
    if "ddp" in sections and device.type == "cpu":
        result["ddp"] = section_ddp(args)
    out = args.out or HERE / f"results_{device.type}.json"
    out.write_text(json.dumps(result, indent=1))
    print("\n" + markdown(result))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
