"""LeakyReLU²: the elementwise op and the fused MLP (forward + backward) against the number of
tokens M: ours (``triton``), unfused PyTorch (``ref``), compiled PyTorch (``ref-compile``) and
Liger-Kernel's ReLU² (``liger``: slope 0, since Liger has no leaky variant; checked against our
reference at slope 0, which is the same function).

Production: M = 2048 x 8 = 16,384 tokens per GPU, 512 -> 1536, bf16; the sweep is M = 2,048,
8,192, 16,384. On CPU (interpreter): 64 -> 192 at M = 32 and 64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from proteus.kernels.leaky_relu2 import (
    leaky_relu2,
    leaky_relu2_mlp,
    leaky_relu2_mlp_ref,
    leaky_relu2_ref,
)

from .conftest import ON_GPU, PROVIDERS, Case, check_then_time, provider_fn, sweep
from .peers import Unavailable, liger_relu_squared

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
D, H = (512, 1536) if ON_GPU else (64, 192)
MS, MAIN_M = ((2048, 8192, 16384), 16384) if ON_GPU else ((32, 64), 64)
CASES = sweep(MS, PROVIDERS + ["liger"], MAIN_M)
SLOPE = 0.9
LIGER_NOTE = "ReLU² (slope 0): Liger has no leaky variant"


def _slope(provider: str) -> float:
    return 0.0 if provider == "liger" else SLOPE


def _liger(benchmark, case):
    try:
        return liger_relu_squared()
    except Unavailable as e:
        case.skip(benchmark, "liger", str(e))


@pytest.mark.parametrize(("m", "provider"), CASES)
def test_bench_elementwise(benchmark, device, m, provider):
    case = Case("leaky_relu2 elementwise", f"{m}x{H}", "M", m)
    slope = _slope(provider)
    x = torch.randn(m, H, device=device, dtype=DTYPE)
    want = leaky_relu2_ref(x, slope)
    if provider == "liger":
        act = _liger(benchmark, case)
        fn = lambda: act(x)  # noqa: E731
    else:
        op = provider_fn(provider, leaky_relu2, leaky_relu2_ref)
        fn = lambda: op(x, slope)  # noqa: E731

    def check(y):  # ours is bit-identical; a peer within the dtype's default tolerance
        if provider == "liger":
            torch.testing.assert_close(y, want)
        else:
            assert torch.equal(y, want)

    check_then_time(benchmark, fn, check, case=case, provider=provider,
                    optional=provider == "liger", bytes=2 * x.numel() * x.element_size(),
                    note=LIGER_NOTE if provider == "liger" else "")


@pytest.mark.parametrize(("m", "provider"), CASES)
def test_bench_mlp_fwd_bwd(benchmark, device, m, provider):
    case = Case("leaky_relu2 MLP fwd+bwd", f"M={m} {D}->{H}", "M", m)
    slope = _slope(provider)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, D, device=device, dtype=DTYPE, generator=g).requires_grad_()
    w_up = (torch.randn(H, D, device=device, dtype=DTYPE, generator=g) * D**-0.5).requires_grad_()
    w_dn = (torch.randn(D, H, device=device, dtype=DTYPE, generator=g) * H**-0.5).requires_grad_()
    dy = torch.randn(m, D, device=device, dtype=DTYPE, generator=g)
    leaves = (x, w_up, w_dn)
    y_ref = leaky_relu2_mlp_ref(x, w_up, w_dn, slope)
    y_ref.backward(dy)
    want = [y_ref.detach()] + [t.grad.clone() for t in leaves]
    if provider == "liger":
        act = _liger(benchmark, case)
        fn = lambda x, w_up, w_dn, _slope: F.linear(act(F.linear(x, w_up)), w_dn)  # noqa: E731
    else:
        fn = provider_fn(provider, leaky_relu2_mlp, leaky_relu2_mlp_ref)

    def step():
        x.grad = w_up.grad = w_dn.grad = None
        y = fn(x, w_up, w_dn, slope)
        y.backward(dy)
        return y

    tol = dict(rtol=2e-2, atol=2e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-4)

    def check(y):
        for got, w in zip([y] + [t.grad for t in leaves], want, strict=True):
            torch.testing.assert_close(got, w, **tol)

    flops = 3 * 2 * 2 * m * D * H  # two matmuls forward, four backward
    check_then_time(benchmark, step, check, case=case, provider=provider,
                    optional=provider == "liger", flops=flops,
                    note=LIGER_NOTE if provider == "liger" else "")
