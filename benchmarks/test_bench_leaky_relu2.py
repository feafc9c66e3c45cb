"""LeakyReLU²: the elementwise op and the fused MLP (forward + backward), three providers."""

from __future__ import annotations

import pytest
import torch

from proteus.kernels.leaky_relu2 import (
    leaky_relu2,
    leaky_relu2_mlp,
    leaky_relu2_mlp_ref,
    leaky_relu2_ref,
)

from .conftest import ON_GPU, PROVIDERS, provider_fn, run_timed

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# production: T=2048 x B=8 tokens per GPU, 512 -> 1536; interpreter: a small slice of it
M, D, H = (16384, 512, 1536) if ON_GPU else (64, 64, 192)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_elementwise(benchmark, device, provider):
    x = torch.randn(M, H, device=device, dtype=DTYPE)
    fn = provider_fn(provider, leaky_relu2, leaky_relu2_ref)
    assert torch.equal(fn(x, 0.9), leaky_relu2_ref(x, 0.9))  # bit-identical, then timed
    nbytes = 2 * x.numel() * x.element_size()
    run_timed(benchmark, lambda: fn(x, 0.9), group=f"leaky_relu2 elementwise {M}x{H}",
              provider=provider, bytes=nbytes)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_mlp_fwd_bwd(benchmark, device, provider):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, D, device=device, dtype=DTYPE, generator=g).requires_grad_()
    w_up = (torch.randn(H, D, device=device, dtype=DTYPE, generator=g) * D**-0.5).requires_grad_()
    w_dn = (torch.randn(D, H, device=device, dtype=DTYPE, generator=g) * H**-0.5).requires_grad_()
    dy = torch.randn(M, D, device=device, dtype=DTYPE, generator=g)
    fn = provider_fn(provider, leaky_relu2_mlp, leaky_relu2_mlp_ref)

    def step():
        x.grad = w_up.grad = w_dn.grad = None
        y = fn(x, w_up, w_dn, 0.9)
        y.backward(dy)
        return y

    y = step()
    grads = [t.grad.clone() for t in (x, w_up, w_dn)]
    x.grad = w_up.grad = w_dn.grad = None
    y_ref = leaky_relu2_mlp_ref(x, w_up, w_dn, 0.9)
    y_ref.backward(dy)
    tol = dict(rtol=2e-2, atol=2e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    for got, t in zip(grads, (x, w_up, w_dn), strict=True):
        torch.testing.assert_close(got, t.grad, **tol)
    flops = 3 * 2 * 2 * M * D * H  # two matmuls forward, four backward
    run_timed(benchmark, step, group=f"leaky_relu2 MLP fwd+bwd M={M} {D}->{H}",
              provider=provider, flops=flops)
