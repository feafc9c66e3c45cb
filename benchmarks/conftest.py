"""Benchmark set-up shared by every kernel benchmark.

Each benchmark checks its provider against the reference first (it fails on a mismatch) and
only then times it. Providers are named ``triton`` (our kernel), ``ref`` (the PyTorch
reference, eager) and ``ref-compile`` (the reference under ``torch.compile``); the summary
printed by ``proteus bench`` gives each one's time as a ratio to ``ref`` in the same group.
On CPU the kernels run on Triton's interpreter at small shapes: the timings prove the harness,
not the kernel's speed. On a GPU the production shapes are used and ``extra_info`` carries the
bytes and FLOPs from which ``proteus bench`` derives GB/s, TFLOPS and % of the H100 roofline.
"""

from __future__ import annotations

import pytest
import torch

import proteus.kernels  # noqa: F401  (selects compiled vs interpreter before kernel modules load)
from proteus.kernels._backend import kernel_device

ON_GPU = torch.cuda.is_available()
PROVIDERS = ["triton", "ref", "ref-compile"]


@pytest.fixture
def device() -> str:
    return kernel_device()


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def run_timed(benchmark, fn, *, group: str, provider: str, rounds: int | None = None,
              **info) -> None:
    """Time ``fn`` (already checked by the caller) with GPU synchronisation."""

    def call():
        out = fn()
        sync()
        return out

    benchmark.group = group
    benchmark.extra_info.update(provider=provider, device="cuda" if ON_GPU else "cpu", **info)
    r = rounds or (50 if ON_GPU else 3)
    benchmark.pedantic(call, rounds=r, iterations=1, warmup_rounds=1)


def provider_fn(provider: str, kernel, ref):
    """The function a provider times: our ``kernel``, the eager ``ref``, or ``ref`` under
    ``torch.compile`` (inductor on CPU and GPU alike)."""
    if provider == "ref-compile":
        return torch.compile(ref, dynamic=False)
    return {"triton": kernel, "ref": ref}[provider]
