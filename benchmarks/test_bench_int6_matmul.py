"""int6 dequant-matmul: the kernel reading packed weights vs dequantise + matmul vs fp16 weights.

Providers: ``triton`` (packed weights, unpacked in registers), ``ref`` (dequantise, then
``torch.matmul``), ``ref-compile`` (the same under torch.compile) and ``dense`` (``torch.matmul``
on already-dequantised weights in the activation dtype: the bandwidth target, whose weights are
16/6 times larger on a GPU)."""

from __future__ import annotations

import pytest
import torch

from proteus.kernels.int6_matmul import int6_matmul, int6_matmul_ref, pack_int6

from .conftest import ON_GPU, PROVIDERS, provider_fn, run_timed

DTYPE = torch.float16 if ON_GPU else torch.float32
K, N = (512, 1536) if ON_GPU else (128, 192)
MS = (16, 16384) if ON_GPU else (4, 64)


@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("provider", PROVIDERS + ["dense"])
def test_bench_int6_matmul(benchmark, device, provider, m):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-31, 32, (N, K), generator=g, dtype=torch.int8)
    packed = pack_int6(q).to(device)
    scale = (torch.rand(N, generator=g) * 0.01 + 0.001).half().to(device)
    x = torch.randn(m, K, generator=g).to(device, DTYPE)
    ref = int6_matmul_ref(x, packed, scale)
    if provider == "dense":
        w = (q.float() * scale.float().cpu()[:, None]).to(device, DTYPE)
        fn = lambda: x @ w.t()  # noqa: E731
    else:
        op = provider_fn(provider, int6_matmul, int6_matmul_ref)
        fn = lambda: op(x, packed, scale)  # noqa: E731
    tol = dict(rtol=1e-2, atol=1e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fn(), ref, **tol)
    wbytes = packed.numel() if provider != "dense" else N * K * x.element_size()
    run_timed(benchmark, fn, group=f"int6_matmul M={m} K={K} N={N}", provider=provider,
              bytes=wbytes + m * (K + N) * x.element_size(), flops=2 * m * K * N)
