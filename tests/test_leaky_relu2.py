"""LeakyReLU² kernels against their references (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from proteus.kernels._testing import assert_within_2x_torch_error
from proteus.kernels.leaky_relu2 import (
    FusedLeakyReLU2MLP,
    _bwd_op,
    leaky_relu2,
    leaky_relu2_backward_ref,
    leaky_relu2_mlp,
    leaky_relu2_mlp_ref,
    leaky_relu2_ref,
)

pytestmark = pytest.mark.interpret
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _edge_input(n, dtype, device):
    x = (torch.randn(n) * 3).to(dtype)
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -1e-3])
    return x.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.9, 0.0, 1.0, 0.5])
@pytest.mark.parametrize("shape", [(100_003,), (3, 7, 11), (0,), (1,)])
def test_elementwise_forward_backward_bit_identical(dtype, slope, shape, device):
    n = int(torch.tensor(shape).prod())
    x = _edge_input(max(n, 6), dtype, device)[:n].reshape(shape)
    _exact(leaky_relu2(x, slope), leaky_relu2_ref(x, slope))
    dy = torch.randn(shape).to(dtype).to(device)
    _exact(_bwd_op(dy, x, slope), leaky_relu2_backward_ref(dy, x, slope))
    # autograd through the op gives the same bits as autograd through the reference
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    leaky_relu2(xa, slope).backward(dy)
    leaky_relu2_ref(xb, slope).backward(dy)
    _exact(xa.grad, xb.grad)


def test_elementwise_non_contiguous_input(device):
    x = torch.randn(64, 48, device=device).t()
    _exact(leaky_relu2(x), leaky_relu2_ref(x))


def _mlp_case(m, d, h, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    wu = torch.randn(h, d, generator=g, dtype=torch.float64) / d**0.5
    wd = torch.randn(d, h, generator=g, dtype=torch.float64) / h**0.5
    dy = torch.randn(m, d, generator=g, dtype=torch.float64)
    return x, wu, wd, dy


def _grads(fn, x, wu, wd, dy, dtype, device):
    leaves = [t.to(dtype).to(device).requires_grad_() for t in (x, wu, wd)]
    y = fn(*leaves, 0.9)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype).to(device))
    return [y.detach().cpu()] + [gr.cpu() for gr in grads]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, d, h", [(128, 128, 384), (1, 48, 80), (17, 40, 72), (200, 64, 192)])
def test_fused_mlp_within_2x_torch_error(dtype, m, d, h, device):
    x, wu, wd, dy = _mlp_case(m, d, h, dtype, device)
    ref64 = _grads(leaky_relu2_mlp_ref, x, wu, wd, dy, torch.float64, "cpu")
    torch_same = _grads(leaky_relu2_mlp_ref, x, wu, wd, dy, dtype, device)
    ours = _grads(leaky_relu2_mlp, x, wu, wd, dy, dtype, device)
    floor = 1e-6 if dtype == torch.float32 else 0.0
    names = ("out", "dx", "dW_up", "dW_down")
    for name, a, b, r in zip(names, ours, torch_same, ref64, strict=True):
        assert a.dtype == dtype and a.shape == r.shape
        assert_within_2x_torch_error(f"{name} {dtype}", a, b, r, floor=floor)


def test_fused_up_projection_epilogue_is_exact_activation(device):
    # h must be the elementwise op applied to the kernel's own pre-activation, bit for bit
    from proteus.kernels.leaky_relu2 import _up_op

    x = torch.randn(50, 32, dtype=torch.bfloat16, device=device)
    w = torch.randn(96, 32, dtype=torch.bfloat16, device=device)
    pre, h = _up_op(x, w, 0.9)
    _exact(h, leaky_relu2_ref(pre, 0.9))


def test_module_is_drop_in(device):
    torch.manual_seed(0)
    mod = FusedLeakyReLU2MLP(32, 96).to(device)
    assert set(mod.state_dict()) == {"fc.weight", "proj.weight"}
    x = torch.randn(2, 5, 32, device=device)
    ref = leaky_relu2_mlp_ref(x, mod.fc.weight, mod.proj.weight, 0.9)
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors(device):
    x = torch.randn(4, 8, device=device)
    w_up, w_down = torch.randn(16, 8, device=device), torch.randn(8, 16, device=device)
    with pytest.raises(TypeError, match=r"leaky_relu2: x must be float16/bfloat16/float32, got "
                       r"torch.int64"):
        leaky_relu2(torch.ones(3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        leaky_relu2([1.0, 2.0])
    with pytest.raises(ValueError, match="last dim .* must equal w_up's input dim 8"):
        leaky_relu2_mlp(torch.randn(4, 9, device=device), w_up, w_down)
    with pytest.raises(ValueError, match="w_down .* must be"):
        leaky_relu2_mlp(x, w_up, torch.randn(8, 15, device=device))
    with pytest.raises(TypeError, match="w_up is torch.float16 but x is torch.float32"):
        leaky_relu2_mlp(x, w_up.half(), w_down)
    with pytest.raises(ValueError, match="w_up must have 2 dimensions"):
        leaky_relu2_mlp(x, w_up[None], w_down)
    with pytest.raises(ValueError, match="on meta but x is on"):
        leaky_relu2_mlp(x, w_up.to("meta"), w_down)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x = torch.randn(16, 32, device=device, requires_grad=True)
    wu = torch.randn(64, 32, device=device, requires_grad=True)
    wd = torch.randn(32, 64, device=device, requires_grad=True)

    def f(x, wu, wd):
        return leaky_relu2_mlp(x, wu, wd, 0.9).sum() + leaky_relu2(x, 0.5).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, wu, wd)
    out.backward()
    g = [t.grad.clone() for t in (x, wu, wd)]
    for t in (x, wu, wd):
        t.grad = None
    f(x, wu, wd).backward()
    for a, t in zip(g, (x, wu, wd), strict=True):
        torch.testing.assert_close(a, t.grad)


def test_opcheck(device):
    from proteus.kernels.leaky_relu2 import _fwd_op, _up_op

    x = torch.randn(8, 16, device=device, requires_grad=True)
    torch.library.opcheck(_fwd_op, (x, 0.9))
    torch.library.opcheck(_up_op, (x.detach(), torch.randn(32, 16, device=device), 0.9))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_mlp_production_shape_on_gpu(dtype):
    x, wu, wd, dy = _mlp_case(16384, 512, 1536, dtype, "cuda")
    ref64 = _grads(leaky_relu2_mlp_ref, x, wu, wd, dy, torch.float64, "cpu")
    torch_same = _grads(leaky_relu2_mlp_ref, x, wu, wd, dy, dtype, "cuda")
    ours = _grads(leaky_relu2_mlp, x, wu, wd, dy, dtype, "cuda")
    names = ("out", "dx", "dW_up", "dW_down")
    for name, a, b, r in zip(names, ours, torch_same, ref64, strict=True):
        assert_within_2x_torch_error(name, a, b, r)
