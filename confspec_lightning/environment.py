"""What a run ran with: package versions, the library's version and commit, the device.

Numbers repeat exactly only with the same code, package versions and machine (float reduction orders differ
between CPU kernels, BLAS builds and GPU models). Every run records this next to its results: the ``config.yaml``
header and the ``environment`` field of each report.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

#: The packages whose versions can change a result.
PACKAGES = ("torch", "lightning", "torchmetrics", "numpy", "pyautoattack", "jsonargparse")


def package_version(name: str) -> str:
    """The installed version of ``name``, or ``"not installed"``; torch's own (with its build, e.g. ``+cu130``)."""
    if name == "torch":
        import torch

        return str(torch.__version__)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def library_commit() -> str | None:
    """The git commit of the library's source (``+changes`` when it differs from it), when it is a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        if not (root / ".git").exists():
            return None
        commit = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "confspec_lightning")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+changes" if changed else commit


def device_name(device: Any = None) -> str:
    """A readable name of ``device``: the GPU model, or the CPU's; None: the CPU and the GPUs there are."""
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    gpus = ""
    if device is None and torch.cuda.is_available():
        gpus = f"; CUDA: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"CPU {cpu} ({os.cpu_count()} cores){gpus}"


def environment(device: Any = None) -> dict[str, Any]:
    """The versions, commit and device of this process, as plain values (JSON and YAML friendly)."""
    from confspec_lightning import __version__

    return {
        "confspec_lightning": __version__,
        "commit": library_commit(),
        **{name: package_version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_name(device),
    }


def header_lines(device: Any = None) -> list[str]:
    """``environment()`` as comment lines for the head of a saved ``config.yaml``."""
    values = environment(device)
    return [f"{key}: {value}" for key, value in values.items()]
