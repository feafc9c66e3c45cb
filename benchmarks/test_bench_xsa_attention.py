"""XSA attention forward and forward + backward: our kernel vs SDPA + separate XSA post-op."""

from __future__ import annotations

import pytest
import torch

from proteus.kernels.xsa_attention import xsa_attention, xsa_attention_ref

from .conftest import ON_GPU, PROVIDERS, provider_fn, run_timed

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
B, H, KV, T, D = (8, 8, 4, 2048, 64) if ON_GPU else (1, 4, 2, 128, 64)
CAUSAL_FLOPS = 4 * B * H * T * T * D // 2  # QK^T and PV over the causal half


def _inputs(device, grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, T, D, device=device, dtype=DTYPE, generator=g)
    k = torch.randn(B, KV, T, D, device=device, dtype=DTYPE, generator=g)
    v = torch.randn(B, KV, T, D, device=device, dtype=DTYPE, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


TOL = dict(rtol=2e-2, atol=2e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_forward(benchmark, device, provider):
    q, k, v = _inputs(device)
    fn = provider_fn(provider, xsa_attention, xsa_attention_ref)
    torch.testing.assert_close(fn(q, k, v, xsa=True), xsa_attention_ref(q, k, v, xsa=True),
                               **TOL)
    run_timed(benchmark, lambda: fn(q, k, v, xsa=True),
              group=f"xsa_attention fwd B{B} H{H}/{KV} T{T} D{D}", provider=provider,
              flops=CAUSAL_FLOPS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_forward_backward(benchmark, device, provider):
    q, k, v = _inputs(device, grad=True)
    do = torch.randn_like(q.detach())
    fn = provider_fn(provider, xsa_attention, xsa_attention_ref)

    def step():
        for t in (q, k, v):
            t.grad = None
        o = fn(q, k, v, xsa=True)
        o.backward(do)
        return o

    o = step()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    xsa_attention_ref(q, k, v, xsa=True).backward(do)
    for got, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(got, t.grad, **TOL)
    assert o.shape == q.shape
    run_timed(benchmark, step, group=f"xsa_attention fwd+bwd B{B} H{H}/{KV} T{T} D{D}",
              provider=provider, flops=CAUSAL_FLOPS * 7 // 2)  # bwd ~2.5x fwd
