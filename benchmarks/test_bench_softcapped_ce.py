"""Softcapped cross-entropy, forward + backward, against the number of rows M (tokens).

Two families:

* ``softcapped_ce logits``: the loss of (M, V) logits. ``triton`` (our fused kernel), ``ref``
  (PyTorch eager: fp32 upcast, ``softcap * tanh``, ``F.cross_entropy``: ``softcapped_ce_ref``),
  ``ref-compile`` (the same under torch.compile). Work: the kernel's bytes, three passes over
  the logits (the forward reads them, the backward reads them and writes their gradient).
* ``softcapped_ce head``: the output head, ``x`` (M, D) and ``W`` (V, D) to the loss, with
  gradients for both: ``triton`` (``F.linear``, then our kernel), ``ref`` / ``ref-compile``
  (``F.linear``, then the reference), and ``liger`` (Liger-Kernel's fused linear cross-entropy
  with its ``softcap``; skipped with its reason where it is not installed or cannot run).
  Work: the three matmuls' FLOPs.

Every provider is checked against the reference (loss and gradients) before it is timed.
Production: M = 2048 x 8 = 16,384 tokens per GPU, V = 8192, D = 512, bf16; the sweep is
M = 4,096, 16,384 and 65,536. On CPU (interpreter): V = 1024, D = 64 at M = 32 and 64, fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from proteus.kernels.softcapped_ce import softcapped_ce, softcapped_ce_ref

from .conftest import ON_GPU, PROVIDERS, Case, check_then_time, provider_fn, sweep
from .peers import Unavailable, liger_fused_linear_softcapped_ce

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
V, D = (8192, 512) if ON_GPU else (1024, 64)
MS, MAIN_M = ((4096, 16384, 65536), 16384) if ON_GPU else ((32, 64), 64)
SOFTCAP = 30.0
TOL = dict(rtol=2e-2, atol=2e-3) if ON_GPU else dict(rtol=1e-4, atol=1e-6)


def _targets(m, device):
    return torch.randint(0, V, (m,), generator=torch.Generator().manual_seed(1)).to(device)


def _check_against(want):
    def check(got):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.float(), b.float(), **TOL)

    return check


def _run_ref(loss_fn, *leaves):
    """The reference's loss and its leaves' gradients (the grads are left cleared)."""
    for t in leaves:
        t.grad = None
    loss = loss_fn()
    loss.backward()
    out = [loss.detach()] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out


@pytest.mark.parametrize(("m", "provider"), sweep(MS, PROVIDERS, MAIN_M))
def test_bench_logits_fwd_bwd(benchmark, device, m, provider):
    case = Case("softcapped_ce logits fwd+bwd", f"M={m} V={V}", "M", m)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(m, V, generator=g) * 8).to(device, DTYPE).requires_grad_()
    y = _targets(m, device)
    fn = provider_fn(provider, softcapped_ce, softcapped_ce_ref)

    def step():
        z.grad = None
        loss = fn(z, y, SOFTCAP)
        loss.backward()
        return loss.detach(), z.grad

    want = _run_ref(lambda: softcapped_ce_ref(z, y, SOFTCAP), z)
    check_then_time(benchmark, step, _check_against(want), case=case, provider=provider,
                    bytes=3 * m * V * z.element_size())


def _head_triton(x, w, y, softcap):
    return softcapped_ce(F.linear(x, w), y, softcap)


def _head_ref(x, w, y, softcap):
    return softcapped_ce_ref(F.linear(x, w), y, softcap)


@pytest.mark.parametrize(("m", "provider"), sweep(MS, PROVIDERS + ["liger"], MAIN_M))
def test_bench_head_fwd_bwd(benchmark, device, m, provider):
    case = Case("softcapped_ce head fwd+bwd", f"M={m} D={D} V={V}", "M", m)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, D, generator=g).to(device, DTYPE).requires_grad_()
    w = (torch.randn(V, D, generator=g) * D**-0.5 * 4).to(device, DTYPE).requires_grad_()
    y = _targets(m, device)
    if provider == "liger":
        try:
            fn = liger_fused_linear_softcapped_ce()
        except Unavailable as e:
            case.skip(benchmark, provider, str(e))
    else:
        fn = provider_fn(provider, _head_triton, _head_ref)

    def step():
        x.grad = w.grad = None
        loss = fn(x, w, y, SOFTCAP)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    want = _run_ref(lambda: _head_ref(x, w, y, SOFTCAP), x, w)
    check_then_time(benchmark, step, _check_against(want), case=case, provider=provider,
                    optional=provider == "liger", flops=3 * 2 * m * D * V,
                    note="Liger's fused linear cross-entropy" if provider == "liger" else "")
