"""XSA attention forward and forward + backward against sequence length: our kernel vs the
reference (SDPA + separate XSA post-op, eager and compiled) vs peers (SDPA with each backend
forced, flash-attn 2, FA3; see peers.py), all checked against the reference first.

Sweep: the tokens per step stay at the production 16,384 per GPU (B = 16384 / T) while T goes
512 -> 4096 (the convention of FlashAttention's benchmark pages); T = 2048, B = 8 is the
production point. On CPU (interpreter) B = 1 and T is 64 and 128.
"""

from __future__ import annotations

import pytest
import torch

from proteus.kernels.xsa_attention import xsa_attention, xsa_attention_ref

from .conftest import (
    ON_GPU,
    PROVIDERS,
    Case,
    check_then_time,
    provider_fn,
    sweep,
)
from .peers import ATTENTION_PEERS, Unavailable, attention_peer

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
H, KV, D = (8, 4, 64) if ON_GPU else (4, 2, 64)
TS, MAIN_T = ((512, 1024, 2048, 4096), 2048) if ON_GPU else ((64, 128), 128)
TOKENS = 16384 if ON_GPU else None
CASES = sweep(TS, PROVIDERS + list(ATTENTION_PEERS), MAIN_T)
TOL = dict(rtol=2e-2, atol=2e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-4)


def _batch(t: int) -> int:
    return TOKENS // t if TOKENS else 1


def _case(kind: str, t: int) -> Case:
    return Case(f"xsa_attention {kind}", f"B{_batch(t)} H{H}/{KV} T{t} D{D}", "T", t)


def _work(t: int, backward: bool) -> dict:
    b, e = _batch(t), torch.finfo(DTYPE).bits // 8
    fwd_flops = 4 * b * H * t * t * D // 2  # QK^T and PV over the causal half
    fwd_bytes = (2 * b * H + 2 * b * KV) * t * D * e  # read q, k, v; write o
    if not backward:
        return dict(flops=fwd_flops, bytes=fwd_bytes)
    # backward ~2.5x the forward's FLOPs; reads q, k, v, o, dO and writes dq, dk, dv
    return dict(flops=fwd_flops * 7 // 2, bytes=fwd_bytes + (4 * b * H + 4 * b * KV) * t * D * e)


def _inputs(device, grad=False, t=MAIN_T):
    g = torch.Generator(device=device).manual_seed(0)
    b = _batch(t)
    q = torch.randn(b, H, t, D, device=device, dtype=DTYPE, generator=g)
    k = torch.randn(b, KV, t, D, device=device, dtype=DTYPE, generator=g)
    v = torch.randn(b, KV, t, D, device=device, dtype=DTYPE, generator=g)
    return [x.requires_grad_(grad) for x in (q, k, v)]


# the production point, under the names the single-shape rows use
T, B = MAIN_T, _batch(MAIN_T)
CAUSAL_FLOPS = _work(T, backward=False)["flops"]


def _provider(benchmark, case, provider, q, k, v):
    """(function of native q, k, v; the peer or None); skips a peer that cannot run here."""
    if provider in PROVIDERS:
        op = provider_fn(provider, xsa_attention, xsa_attention_ref)
        return (lambda q, k, v: op(q, k, v, xsa=True)), None
    try:
        peer = attention_peer(provider, q, k, v)
    except Unavailable as e:
        case.skip(benchmark, provider, str(e))
    return peer.fn, peer


@pytest.mark.parametrize(("t", "provider"), CASES)
def test_bench_forward(benchmark, device, t, provider):
    case = _case("fwd", t)
    q, k, v = _inputs(device, t=t)
    want = xsa_attention_ref(q, k, v, xsa=True)
    fn, peer = _provider(benchmark, case, provider, q, k, v)
    native = (q, k, v) if peer is None else tuple(map(peer.native, (q, k, v)))
    check_then_time(
        benchmark, lambda: fn(*native),
        lambda o: torch.testing.assert_close(o if peer is None else peer.bhtd(o), want, **TOL),
        case=case, provider=provider, optional=peer is not None,
        note=peer.note if peer else "", **_work(t, backward=False))


@pytest.mark.parametrize(("t", "provider"), CASES)
def test_bench_forward_backward(benchmark, device, t, provider):
    case = _case("fwd+bwd", t)
    q, k, v = _inputs(device, t=t)
    do = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    xsa_attention_ref(*leaves, xsa=True).backward(do)
    want = [x.grad for x in leaves]
    fn, peer = _provider(benchmark, case, provider, q, k, v)
    to_native = (lambda x: x) if peer is None else peer.native
    ins = [to_native(x).requires_grad_() for x in (q, k, v)]
    do_n = to_native(do)

    def step():
        for x in ins:
            x.grad = None
        o = fn(*ins)
        o.backward(do_n)
        return o

    def check(o):
        assert o.shape == do_n.shape
        for got, w in zip(ins, want, strict=True):
            torch.testing.assert_close(got.grad if peer is None else peer.bhtd(got.grad), w,
                                       **TOL)

    check_then_time(benchmark, step, check, case=case, provider=provider,
                    optional=peer is not None, note=peer.note if peer else "",
                    **_work(t, backward=True))
