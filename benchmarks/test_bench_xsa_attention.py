"""XSA attention forward and forward + backward: our kernel vs SDPA + separate XSA post-op,
plain causal and masked (documents of the bundled validation sample, a sliding window).

Masked groups count the FLOPs of the visible (query, key) pairs only, so their TFLOPS are
useful work; a kernel that computed masked tiles would show lower TFLOPS, not higher.
"""

from __future__ import annotations

import pytest
import torch

from proteus.data import bundled_val_glob, load_tokens
from proteus.kernels.xsa_attention import (
    attention_mask,
    doc_ids_from_bos,
    xsa_attention,
    xsa_attention_ref,
)

from .conftest import ON_GPU, PROVIDERS, provider_fn, run_timed

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
B, H, KV, T, D = (8, 8, 4, 2048, 64) if ON_GPU else (1, 4, 2, 128, 64)
WINDOW = 512 if ON_GPU else 32
MASKS = ["causal", "docs", f"window{WINDOW}"]


def _mask_kwargs(mask: str, device) -> dict:
    if mask == "docs":  # B rows of T consecutive validation tokens; documents start at BOS
        tokens = load_tokens(bundled_val_glob(), "val", limit=B * T).view(B, T)
        return dict(doc_ids=doc_ids_from_bos(tokens).to(device))
    if mask.startswith("window"):
        return dict(window_size=(WINDOW - 1, 0))
    return {}


def _flops(kw: dict) -> int:
    """2 matmuls of 2·D FLOPs per visible (query, key) pair, per head."""
    ids = kw.get("doc_ids")
    visible = attention_mask(T, kw.get("window_size", (-1, 0))[0],
                             None if ids is None else ids.cpu()).expand(B, T, T).sum().item()
    return int(4 * D * H * visible)


def _inputs(device, grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, T, D, device=device, dtype=DTYPE, generator=g)
    k = torch.randn(B, KV, T, D, device=device, dtype=DTYPE, generator=g)
    v = torch.randn(B, KV, T, D, device=device, dtype=DTYPE, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


TOL = dict(rtol=2e-2, atol=2e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_forward(benchmark, device, provider, mask):
    q, k, v = _inputs(device)
    kw = dict(xsa=True, **_mask_kwargs(mask, device))
    fn = provider_fn(provider, xsa_attention, xsa_attention_ref)
    torch.testing.assert_close(fn(q, k, v, **kw), xsa_attention_ref(q, k, v, **kw), **TOL)
    run_timed(benchmark, lambda: fn(q, k, v, **kw),
              group=f"xsa_attention fwd {mask} B{B} H{H}/{KV} T{T} D{D}", provider=provider,
              flops=_flops(kw))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_forward_backward(benchmark, device, provider, mask):
    q, k, v = _inputs(device, grad=True)
    do = torch.randn_like(q.detach())
    kw = dict(xsa=True, **_mask_kwargs(mask, device))
    fn = provider_fn(provider, xsa_attention, xsa_attention_ref)

    def step():
        for t in (q, k, v):
            t.grad = None
        o = fn(q, k, v, **kw)
        o.backward(do)
        return o

    o = step()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    xsa_attention_ref(q, k, v, **kw).backward(do)
    for got, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(got, t.grad, **TOL)
    assert o.shape == q.shape
    run_timed(benchmark, step, group=f"xsa_attention fwd+bwd {mask} B{B} H{H}/{KV} T{T} D{D}",
              provider=provider, flops=_flops(kw) * 7 // 2)  # bwd ~2.5x fwd
