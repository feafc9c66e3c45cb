"""int6 dequant-matmul against M (decode -> prefill): the kernel reading packed weights vs
dequantise-then-matmul vs dense weights vs torchao's weight-only linears.

Providers: ``triton`` (packed weights, unpacked in registers), ``ref`` (dequantise, then
``torch.matmul``), ``ref-compile`` (the same under torch.compile), ``dense`` (``torch.matmul``
on already-dequantised weights in the activation dtype: the bandwidth target, whose weights are
16/6 times larger), ``torchao-int8`` / ``torchao-int4`` (torchao's weight-only quantisation of
those dense weights, eager, bf16 activations on a GPU). Ours, ``ref`` and ``dense`` compute
the same product and are checked with ``assert_close``; torchao re-quantises the int6 weights
with its own rounding, so its check is on the relative error ‖y − ref‖ / ‖ref‖: at most 2e-2
for int8 (its step is ~1/4 of the int6 step) and 0.12 for int4 (4 bits for 6-bit values: ~7%
expected); a wrong layout or scale gives ~1.

Production: the model's MLP matrix 512 -> 1536, M = 16 (decode), 256, 2048 and 16,384
(prefill), fp16. On CPU (interpreter): 128 -> 192 at M = 4 and 64, fp32.
"""

from __future__ import annotations

import pytest
import torch

from proteus.kernels.int6_matmul import Int6Linear, int6_matmul, int6_matmul_ref, pack_int6

from .conftest import ON_GPU, PROVIDERS, Case, check_then_time, provider_fn, sweep
from .peers import TORCHAO_CONFIGS, Unavailable, torchao_linear

DTYPE = torch.float16 if ON_GPU else torch.float32
K, N = (512, 1536) if ON_GPU else (128, 192)
MS, MAIN_M = ((16, 256, 2048, 16384), 16384) if ON_GPU else ((4, 64), 64)
CASES = sweep(MS, PROVIDERS + ["dense", *TORCHAO_CONFIGS], MAIN_M)
TORCHAO_MAX_REL_ERR = {"torchao-int8": 2e-2, "torchao-int4": 0.12}
TORCHAO_DTYPE = torch.bfloat16 if ON_GPU else DTYPE  # torchao's int4 kernel takes bf16 only


@pytest.mark.parametrize(("m", "provider"), CASES)
def test_bench_int6_matmul(benchmark, device, m, provider):
    case = Case("int6_matmul", f"M={m} K={K} N={N}", "M", m)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-31, 32, (N, K), generator=g, dtype=torch.int8)
    packed = pack_int6(q).to(device)
    scale = (torch.rand(N, generator=g) * 0.01 + 0.001).half().to(device)
    x = torch.randn(m, K, generator=g).to(device, DTYPE)
    want = int6_matmul_ref(x, packed, scale)
    tol = dict(rtol=1e-2, atol=1e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    dense = (q.float() * scale.float().cpu()[:, None]).to(device, DTYPE)
    wbytes = packed.numel()
    if provider == "dense":
        fn = lambda: x @ dense.t()  # noqa: E731
        wbytes = dense.numel() * dense.element_size()
    elif provider in TORCHAO_CONFIGS:
        xt = x.to(TORCHAO_DTYPE)
        try:
            lin = torchao_linear(provider, dense.to(TORCHAO_DTYPE))
        except Unavailable as e:
            case.skip(benchmark, provider, str(e))
        fn = lambda: lin(xt)  # noqa: E731
        wbytes = (N * K) // (1 if "int8" in provider else 2)
    else:
        op = provider_fn(provider, int6_matmul, int6_matmul_ref)
        fn = lambda: op(x, packed, scale)  # noqa: E731

    def check(y):
        if provider in TORCHAO_CONFIGS:
            err = ((y.float() - want.float()).norm() / want.float().norm()).item()
            assert err <= TORCHAO_MAX_REL_ERR[provider], (provider, err)
        else:
            torch.testing.assert_close(y, want, **tol)

    check_then_time(benchmark, fn, check, case=case, provider=provider,
                    optional=provider in TORCHAO_CONFIGS,
                    bytes=wbytes + m * (K + N) * x.element_size(), flops=2 * m * K * N)


LQER_RANKS = (0, 4)


@pytest.mark.parametrize("rank", LQER_RANKS)
@pytest.mark.parametrize(("m", "provider"), sweep(MS, ["triton", "ref"], MAIN_M))
def test_bench_int6_linear_lqer(benchmark, device, m, provider, rank):
    """``Int6Linear`` with and without rank-``rank`` LQER factors, unfused: the int6 matmul,
    then ``(x Bᵀ) Aᵀ``. The time between the two ranks is all that fusing the low-rank term
    into the int6 kernel could win."""
    case = Case("int6_linear_lqer", f"M={m} K={K} N={N} rank={rank}", "M", m)
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-31, 32, (N, K), generator=g, dtype=torch.int8)
    scale = (torch.rand(N, generator=g) * 0.01 + 0.001).half()
    lqer = (torch.randn(N, rank, generator=g) * 1e-3, torch.randn(rank, K, generator=g)
            ) if rank else None
    lin = Int6Linear.from_quantized(q, scale, use_kernel=provider == "triton", lqer=lqer)
    lin = lin.to(device)
    x = torch.randn(m, K, generator=g).to(device, DTYPE)
    w = q.double() * scale.double()[:, None]
    if rank:
        w = w + lqer[0].double() @ lqer[1].double()
    want = (x.double().cpu() @ w.t()).to(device, DTYPE)
    tol = dict(rtol=1e-2, atol=1e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-4)

    def fn():
        with torch.no_grad():
            return lin(x)

    check_then_time(benchmark, fn, lambda y: torch.testing.assert_close(y, want, **tol),
                    case=case, provider=provider,
                    bytes=(N * K * 6) // 8 + rank * (N + K) * 4 + m * (K + N) * x.element_size(),
                    flops=2 * m * (K * N + rank * (K + N)))
