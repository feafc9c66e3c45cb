"""LeakyReLU² kernels against their references (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
from _autocast import AUTOCAST_CASES, autocast_device
from torch import nn

from proteus.kernels import (
    FusedLeakyReLU2MLP,
    LeakyReLU2,
    leaky_relu2,
    leaky_relu2_mlp,
    leaky_relu2_mlp_op,
    leaky_relu2_mlp_ref,
    leaky_relu2_op,
    leaky_relu2_ref,
)
from proteus.kernels._testing import assert_within_2x_torch_error
from proteus.kernels.leaky_relu2 import _bwd_op, leaky_relu2_backward_ref

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elementwise_float32_output_is_the_squared_half_value(dtype, device):
    # out_dtype=float32 is what the reference gives under CUDA autocast: t in x's dtype, t*t in
    # fp32; the backward then gets a float32 dy for a half-precision x
    x = _edge_input(4099, dtype, device)
    x[6:8] = 40000.0 if dtype == torch.float16 else 1e38  # 2t overflows x's dtype, not fp32
    x.requires_grad_()
    y = leaky_relu2_op(x, 0.5, torch.float32)
    t = torch.nn.functional.leaky_relu(x.detach(), 0.5).float()
    assert y.dtype == torch.float32
    _exact(y, t * t)
    dy = torch.randn(x.shape, device=device)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(torch.nn.functional.leaky_relu(xr, 0.5).float().square(),
                                    xr, dy)
    assert dx.dtype == dtype
    _exact(dx, dx_ref)


def test_elementwise_non_contiguous_input(device):
    x = torch.randn(64, 48, device=device).t()
    _exact(leaky_relu2(x, 0.9), leaky_relu2_ref(x, 0.9))


def _mlp_case(m, d, h, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    wu = torch.randn(h, d, generator=g, dtype=torch.float64) / d**0.5
    wd = torch.randn(d, h, generator=g, dtype=torch.float64) / h**0.5
    dy = torch.randn(m, d, generator=g, dtype=torch.float64)
    biases = (torch.randn(h, generator=g, dtype=torch.float64) * 0.5,
              torch.randn(d, generator=g, dtype=torch.float64) * 0.5) if bias else ()
    return (x, wu, wd, *biases), dy


def _grads(fn, leaves64, dy, dtype, device, slope=0.9):
    leaves = [t.to(dtype).to(device).requires_grad_() for t in leaves64]
    x, wu, wd, *b = leaves
    kw = dict(b_up=b[0], b_down=b[1]) if b else {}
    y = fn(x, wu, wd, slope, **kw)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype).to(device))
    return [y.detach().cpu()] + [gr.cpu() for gr in grads]


def _check_mlp(dtype, m, d, h, device, bias=False):
    leaves, dy = _mlp_case(m, d, h, bias=bias)
    ref64 = _grads(leaky_relu2_mlp_ref, leaves, dy, torch.float64, "cpu")
    torch_same = _grads(leaky_relu2_mlp_ref, leaves, dy, dtype, device)
    ours = _grads(leaky_relu2_mlp, leaves, dy, dtype, device)
    floor = 1e-6 if dtype == torch.float32 else 0.0
    names = ("out", "dx", "dW_up", "dW_down", "db_up", "db_down")
    for name, a, b, r in zip(names, ours, torch_same, ref64, strict=False):
        assert a.dtype == dtype and a.shape == r.shape
        assert_within_2x_torch_error(f"{name} {dtype}", a, b, r, floor=floor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, d, h", [(128, 128, 384), (1, 48, 80), (17, 40, 72), (200, 64, 192)])
def test_fused_mlp_within_2x_torch_error(dtype, m, d, h, device):
    _check_mlp(dtype, m, d, h, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_mlp_with_biases_within_2x_torch_error(dtype, device):
    _check_mlp(dtype, 70, 48, 144, device, bias=True)


def test_fused_mlp_leading_dims_and_strided_weights(device):
    x = torch.randn(2, 3, 32, device=device)
    wu = torch.randn(32, 96, device=device).t() / 6  # (96, 32) as a transposed view: no copy
    wd = torch.randn(32, 96, device=device) / 10
    y = leaky_relu2_mlp(x, wu, wd, 0.5)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, leaky_relu2_mlp_ref(x, wu, wd, 0.5), rtol=1e-5, atol=1e-5)


def test_fused_mlp_reads_a_strided_bias_as_its_values(device):
    # biases sliced from larger parameters (stride 2): the up-projection kernel reads b_up at
    # stride 1, so a strided one must give what its contiguous copy gives
    x = torch.randn(5, 16, device=device)
    wu, wd = torch.randn(32, 16, device=device), torch.randn(16, 32, device=device)
    bu, bd = torch.randn(64, device=device)[::2], torch.randn(32, device=device)[::2]
    y = leaky_relu2_mlp(x, wu, wd, 0.5, b_up=bu, b_down=bd)
    assert torch.equal(y, leaky_relu2_mlp(x, wu, wd, 0.5, b_up=bu.contiguous(),
                                          b_down=bd.contiguous()))


def test_fused_up_projection_epilogue_is_exact_activation(device):
    # h must be the elementwise op applied to the kernel's own pre-activation, bit for bit
    x = torch.randn(50, 32, dtype=torch.bfloat16, device=device)
    w = torch.randn(96, 32, dtype=torch.bfloat16, device=device)
    _, pre, h = leaky_relu2_mlp_op(x, w, torch.randn(32, 96, dtype=torch.bfloat16,
                                                     device=device), 0.9)
    _exact(h, leaky_relu2_ref(pre, 0.9))


# --- the three surfaces ---------------------------------------------------------------------


def test_module_owns_linears_and_requires_the_slope(device):
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="slope"):
        FusedLeakyReLU2MLP(32, 96)  # no silent default
    mod = FusedLeakyReLU2MLP(32, 96, slope=0.5, device=device)
    assert set(mod.state_dict()) == {"fc.weight", "proj.weight"}
    x = torch.randn(2, 5, 32, device=device)
    ref = leaky_relu2_mlp_ref(x, mod.fc.weight, mod.proj.weight, 0.5)
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    biased = FusedLeakyReLU2MLP(32, 96, slope=0.5, bias=True, dim_out=40, device=device)
    assert set(biased.state_dict()) == {"fc.weight", "fc.bias", "proj.weight", "proj.bias"}
    assert biased(x).shape == (2, 5, 40)


def test_module_adopts_existing_linears(device):
    fc = nn.Linear(32, 96, device=device)
    proj = nn.Linear(96, 40, device=device)
    mod = FusedLeakyReLU2MLP.from_linears(fc, proj, slope=0.5)
    assert mod.fc is fc and mod.proj is proj  # the same Parameters: optimisers keep working
    x = torch.randn(3, 32, device=device, requires_grad=True)
    ref = proj(torch.nn.functional.leaky_relu(fc(x), 0.5).square())
    y = mod(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.sum(), [x, fc.weight, fc.bias, proj.weight, proj.bias])
    g_ref = torch.autograd.grad(ref.sum(), [x, fc.weight, fc.bias, proj.weight, proj.bias])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="proj.in_features=40 must equal fc.out_features=96"):
        FusedLeakyReLU2MLP.from_linears(fc, nn.Linear(40, 8), slope=0.5)
    with pytest.raises(TypeError,
                       match=r"fc must be an nn.Linear \(or an Int6Linear\), got Conv1d"):
        FusedLeakyReLU2MLP.from_linears(nn.Conv1d(2, 2, 1), proj, slope=0.5)


def test_elementwise_module_and_op(device):
    x = torch.randn(7, 9, device=device)
    _exact(LeakyReLU2(0.5)(x), leaky_relu2_ref(x, 0.5))
    _exact(torch.ops.proteus.leaky_relu2(x, 0.5), leaky_relu2_ref(x, 0.5))
    assert "slope=0.5" in repr(LeakyReLU2(0.5))


def test_bad_inputs_are_clear_errors(device):
    x = torch.randn(4, 8, device=device)
    w_up, w_down = torch.randn(16, 8, device=device), torch.randn(8, 16, device=device)
    with pytest.raises(TypeError, match=r"leaky_relu2: x must be float16/bfloat16/float32, got "
                       r"torch.int64"):
        leaky_relu2(torch.ones(3, dtype=torch.int64, device=device), 0.5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        leaky_relu2([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match="leaky_relu2: slope must be a float, got Tensor"):
        leaky_relu2(x, torch.tensor(0.5))
    with pytest.raises(ValueError, match="leaky_relu2_mlp: slope must be finite, got nan"):
        leaky_relu2_mlp(x, w_up, w_down, float("nan"))
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'slope'"):
        leaky_relu2_mlp(x, w_up, w_down)
    with pytest.raises(ValueError, match="last dim .* must equal w_up's input dim 8"):
        leaky_relu2_mlp(torch.randn(4, 9, device=device), w_up, w_down, 0.5)
    with pytest.raises(ValueError, match="w_down .* must be"):
        leaky_relu2_mlp(x, w_up, torch.randn(8, 15, device=device), 0.5)
    with pytest.raises(TypeError, match="w_up is torch.float16 but x is torch.float32"):
        leaky_relu2_mlp(x, w_up.half(), w_down, 0.5)
    with pytest.raises(ValueError, match="w_up must have 2 dimensions"):
        leaky_relu2_mlp(x, w_up[None], w_down, 0.5)
    with pytest.raises(ValueError, match="on meta but x is on"):
        leaky_relu2_mlp(x, w_up.to("meta"), w_down, 0.5)
    with pytest.raises(ValueError, match="leaky_relu2_mlp: b_up has 15 entries, expected 16"):
        leaky_relu2_mlp(x, w_up, w_down, 0.5, b_up=torch.zeros(15, device=device))
    with pytest.raises(TypeError, match="leaky_relu2_mlp: b_down must be a torch.Tensor"):
        leaky_relu2_mlp(x, w_up, w_down, 0.5, b_down=0.0)


# --- autocast -------------------------------------------------------------------------------


def _leaves(device, *shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(s, generator=g) / s[-1] ** 0.5).to(dtype).to(device).requires_grad_()
            for s in shapes]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("device_type, amp", AUTOCAST_CASES)
def test_mlp_under_autocast_matches_its_reference(device_type, amp, compiled):
    # fp32 parameters (the usual AMP set-up); the reported crash was here: bf16 eager vs fp32
    # compiled output, and an AssertionError deep in Triton in the backward
    device = autocast_device(device_type)
    x, wu, wd, bu, bd = _leaves(device, (6, 5, 32), (96, 32), (32, 96), (96,), (32,))
    torch._dynamo.reset()

    def ours(*a):
        return leaky_relu2_mlp(a[0], a[1], a[2], 0.5, b_up=a[3], b_down=a[4])

    def ref(*a):
        return leaky_relu2_mlp_ref(a[0], a[1], a[2], 0.5, b_up=a[3], b_down=a[4])

    fn = torch.compile(ours, fullgraph=True, backend="aot_eager") if compiled else ours
    leaves = (x, wu, wd, bu, bd)
    with torch.autocast(device_type, amp):
        y, y_ref = fn(*leaves), ref(*leaves)
    assert y.dtype == y_ref.dtype == amp
    dy = torch.randn(y.shape, device=device).to(amp)
    grads = torch.autograd.grad(y, leaves, dy)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    leaves64 = [t.detach().double().cpu().requires_grad_() for t in leaves]
    y64 = ref(*leaves64)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double().cpu())
    assert_within_2x_torch_error(f"out {amp}", y.cpu(), y_ref.cpu(), y64)
    for name, g, gr, g64 in zip(("dx", "dW_up", "dW_down", "db_up", "db_down"), grads,
                                grads_ref, grads64, strict=True):
        assert g.dtype == torch.float32, f"{name}: fp32 parameters get fp32 gradients"
        assert_within_2x_torch_error(f"{name} {amp}", g.cpu(), gr.cpu(), g64)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("device_type, amp", AUTOCAST_CASES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x32", "x16"])
def test_elementwise_under_autocast_matches_its_reference(device_type, amp, x_dtype, compiled):
    # bit for bit, dtype included (CPU: x's dtype; CUDA: float32, as torch's square there)
    device = autocast_device(device_type)
    x = _edge_input(2053, x_dtype, device).requires_grad_()
    torch._dynamo.reset()
    fn = (torch.compile(leaky_relu2, fullgraph=True, backend="aot_eager") if compiled
          else leaky_relu2)
    module = LeakyReLU2(0.5)
    with torch.autocast(device_type, amp):
        y, y_ref, y_mod = fn(x, 0.5), leaky_relu2_ref(x, 0.5), module(x)
    assert y.dtype == y_ref.dtype == y_mod.dtype
    _exact(y, y_ref)
    _exact(y_mod, y_ref)
    dy = torch.randn(y.shape, device=device).to(y.dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    assert dx.dtype == x_dtype
    _exact(dx, dx_ref)


@pytest.mark.parametrize("device_type, amp", AUTOCAST_CASES)
def test_module_and_op_under_autocast(device_type, amp):
    device = autocast_device(device_type)
    mod = FusedLeakyReLU2MLP(32, 64, slope=0.5, bias=True, device=device)
    x = torch.randn(4, 32, device=device)
    with torch.autocast(device_type, amp):
        y = mod(x)
        out, pre, h = torch.ops.proteus.leaky_relu2_mlp(x, mod.fc.weight, mod.proj.weight, 0.5,
                                                       mod.fc.bias, mod.proj.bias)
    assert y.dtype == out.dtype == pre.dtype == h.dtype == amp
    _exact(y, out)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in mod.parameters())


# --- torch.compile and custom-op checks -----------------------------------------------------


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
    x = torch.randn(8, 16, device=device, requires_grad=True)
    torch.library.opcheck(leaky_relu2_op, (x, 0.9))
    torch.library.opcheck(leaky_relu2_op, (x.detach().half(), 0.9, torch.float32))
    w_up = torch.randn(32, 16, device=device, requires_grad=True)
    w_down = torch.randn(16, 32, device=device, requires_grad=True)
    b_up = torch.randn(32, device=device, requires_grad=True)
    torch.library.opcheck(leaky_relu2_mlp_op, (x, w_up, w_down, 0.5))
    torch.library.opcheck(leaky_relu2_mlp_op, (x[None], w_up, w_down, 0.5, b_up, None))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_mlp_production_shape_on_gpu(dtype):
    leaves, dy = _mlp_case(16384, 512, 1536)
    ref64 = _grads(leaky_relu2_mlp_ref, leaves, dy, torch.float64, "cpu")
    torch_same = _grads(leaky_relu2_mlp_ref, leaves, dy, dtype, "cuda")
    ours = _grads(leaky_relu2_mlp, leaves, dy, dtype, "cuda")
    names = ("out", "dx", "dW_up", "dW_down")
    for name, a, b, r in zip(names, ours, torch_same, ref64, strict=True):
        assert_within_2x_torch_error(name, a, b, r)
