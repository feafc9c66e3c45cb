"""XSA attention kernels against the SDPA + projection reference."""

from __future__ import annotations

import pytest
import torch
from _kernel_checks import assert_within_2x_torch_error

from proteus.kernels.xsa_attention import xsa_attention, xsa_attention_ref

pytestmark = pytest.mark.interpret
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-6, torch.bfloat16: 1e-6}  # see kernel docstring


def _inputs(b, h, kv, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(b, h, t, d), mk(b, kv, t, d), mk(b, kv, t, d), mk(b, h, t, d)


def _run(fn, q, k, v, do, dtype, device, xsa):
    leaves = [x.to(dtype).to(device).requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, causal=True, xsa=xsa)
    grads = torch.autograd.grad(o, leaves, do.to(dtype).to(device))
    return [o.detach().cpu()] + [g.cpu() for g in grads]


def _check(b, h, kv, t, d, xsa, dtype, device):
    q, k, v, do = _inputs(b, h, kv, t, d)
    ref64 = _run(xsa_attention_ref, q, k, v, do, torch.float64, "cpu", xsa)
    torch_same = _run(xsa_attention_ref, q, k, v, do, dtype, device, xsa)
    ours = _run(xsa_attention, q, k, v, do, dtype, device, xsa)
    for name, a, b_, r in zip(("o", "dq", "dk", "dv"), ours, torch_same, ref64, strict=True):
        assert a.shape == r.shape and a.dtype == dtype
        assert_within_2x_torch_error(f"{name} {dtype} xsa={xsa}", a, b_, r, FLOOR[dtype])


# A representative subset of the cross product runs by default; the rest under -m slow.
DEFAULT = [
    (1, 4, 4, 17, 64, True, torch.float32),
    (2, 4, 2, 128, 64, True, torch.float32),
    (1, 4, 1, 200, 64, False, torch.float32),
    (1, 4, 2, 1, 64, True, torch.float32),
    (2, 4, 1, 17, 64, True, torch.float16),
    (1, 4, 2, 128, 64, True, torch.bfloat16),
    (1, 4, 4, 200, 64, False, torch.bfloat16),
    (1, 4, 2, 64, 32, True, torch.float32),
    (1, 2, 1, 40, 128, True, torch.float32),
]


@pytest.mark.parametrize("b, h, kv, t, d, xsa, dtype", DEFAULT)
def test_forward_and_gradients_within_2x_torch_error(b, h, kv, t, d, xsa, dtype, device):
    _check(b, h, kv, t, d, xsa, dtype, device)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("xsa", [True, False])
@pytest.mark.parametrize("t", [1, 17, 128, 200])
@pytest.mark.parametrize("b", [1, 2])
def test_full_cross_product(b, t, xsa, ratio, dtype, device):
    _check(b, 4, 4 // ratio, t, 64, xsa, dtype, device)


def test_gradcheck_tiny(device):
    # The kernel computes in fp32 (no fp64 path), so gradcheck runs in fp32 with loosened
    # tolerances (with fp64's defaults it fails on fp32 accumulation alone); the float64 check
    # is test_reference_gradcheck_float64.
    q, k, v, _ = _inputs(1, 2, 1, 9, 16, seed=3)
    leaves = [x.float().to(device).requires_grad_() for x in (q, k, v)]
    fn = lambda a, b, c: xsa_attention(a, b, c, xsa=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-3, atol=1e-2, rtol=1e-2, fast_mode=True)


def test_backward_is_deterministic(device):
    q, k, v, do = _inputs(2, 4, 2, 100, 32, seed=1)
    a = _run(xsa_attention, q, k, v, do, torch.float32, device, True)
    b = _run(xsa_attention, q, k, v, do, torch.float32, device, True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_xsa_output_is_orthogonal_to_own_value(device):
    q, k, v, _ = _inputs(1, 4, 2, 50, 64, seed=2)
    o = xsa_attention(q.float().to(device), k.float().to(device), v.float().to(device), xsa=True)
    u = torch.nn.functional.normalize(v.float(), dim=-1).repeat_interleave(2, dim=1)
    assert (o.cpu() * u).sum(-1).abs().max() < 1e-5


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    q, k, v, _ = _inputs(1, 4, 2, 33, 32)
    leaves = [x.float().to(device).requires_grad_() for x in (q, k, v)]
    f = torch.compile(lambda a, b, c: xsa_attention(a, b, c, xsa=True).square().sum(),
                      fullgraph=True, backend="aot_eager")
    f(*leaves).backward()
    got = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    xsa_attention(*leaves, xsa=True).square().sum().backward()
    for a, x in zip(got, leaves, strict=True):
        torch.testing.assert_close(a, x.grad)


def test_opcheck(device):
    from proteus.kernels.xsa_attention import xsa_attention_op

    q, k, v, _ = _inputs(1, 2, 1, 20, 16)
    args = [x.float().to(device).requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(xsa_attention_op, (*args, None, 0.25, True, "bhtd", -1))


def test_bad_inputs_name_the_argument(device):
    q = torch.randn(1, 4, 8, 64, device=device)
    k = torch.randn(1, 2, 8, 64, device=device)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        xsa_attention(q[0], k, k)
    with pytest.raises(ValueError, match="H=3 query heads is not a multiple of KV=2"):
        xsa_attention(torch.randn(1, 3, 8, 64, device=device), k, k)
    with pytest.raises(TypeError, match="k is torch.float16 but q is torch.float32"):
        xsa_attention(q, k.half(), k.half())
    with pytest.raises(ValueError, match="head dim D=48 is not supported"):
        xsa_attention(torch.randn(1, 4, 8, 48, device=device), torch.randn(1, 2, 8, 48,
                      device=device), torch.randn(1, 2, 8, 48, device=device))
    with pytest.raises(ValueError, match=r"layout='bhtd' expects q \(B, H, T, D\)"):
        xsa_attention(q, torch.randn(1, 2, 9, 64, device=device), torch.randn(1, 2, 9, 64,
                      device=device))
    with pytest.raises(TypeError, match="v must be float16/bfloat16/float32"):
        xsa_attention(q, k, k.long())
    with pytest.raises(ValueError, match="on meta but q is on"):
        xsa_attention(q, k.to("meta"), k)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("xsa", [True, False])
def test_production_shape_on_gpu(dtype, xsa):
    _check(8, 8, 4, 2048, 64, xsa, dtype, "cuda")


def test_reference_gradcheck_float64():
    q, k, v, _ = _inputs(1, 2, 1, 9, 16, seed=3)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    fn = lambda a, b, c: xsa_attention_ref(a, b, c, xsa=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
