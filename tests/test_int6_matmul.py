"""int6 packing (exact) and the dequant-matmul kernel (error bound vs float64)."""

from __future__ import annotations

import pytest
import torch
from _autocast import AUTOCAST_CASES, autocast_device
from _kernel_checks import assert_within_2x_torch_error
from torch import nn

from proteus.kernels import (
    Int6Linear,
    dequantize_int6,
    int6_matmul,
    int6_matmul_op,
    int6_matmul_ref,
    pack_int6,
    quantize_rows,
    replace_linear_int6,
    unpack_int6,
)

pytestmark = pytest.mark.interpret


def test_pack_unpack_exhaustive_round_trip():
    vals = torch.arange(-31, 32, dtype=torch.int8)
    # every value in every one of the four positions of a group, against every other value
    a, b = torch.meshgrid(vals, vals, indexing="ij")
    q = torch.stack((a.ravel(), b.ravel(), b.ravel().flip(0), a.ravel().flip(0)), dim=1)
    q = q.reshape(-1, 4)
    assert torch.equal(unpack_int6(pack_int6(q)), q)
    wide = torch.randint(-31, 32, (5, 4 * 97), dtype=torch.int8)  # odd number of groups
    assert torch.equal(unpack_int6(pack_int6(wide)), wide)
    assert pack_int6(wide).shape == (5, 3, 97)


def test_pack_layout_matches_the_bit_diagram():
    # group j holds k = j, j+G, j+2G, j+3G; fields are q + 32, little-endian 6-bit
    q = torch.tensor([[1, 2, 3, 4]], dtype=torch.int8)  # G = 1
    b = [v + 32 for v in (1, 2, 3, 4)]
    word = b[0] | b[1] << 6 | b[2] << 12 | b[3] << 18
    assert pack_int6(q).flatten().tolist() == [word & 255, (word >> 8) & 255, word >> 16]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="K=6 must be a multiple of 4"):
        pack_int6(torch.zeros(2, 6, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"values must be in \[-31, 31\]"):
        pack_int6(torch.full((1, 4), -32, dtype=torch.int8))
    with pytest.raises(TypeError, match="q must be int8"):
        pack_int6(torch.zeros(1, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, k, n", [(1, 128, 384), (16, 512, 96), (17, 384, 128), (130, 64, 72)])
def test_kernel_within_2x_torch_error(dtype, m, k, n, device):
    g = torch.Generator().manual_seed(m * 7 + k)
    q = torch.randint(-31, 32, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, generator=g) * 0.02 + 0.001).half()
    x = torch.randn(m, k, generator=g)
    packed = pack_int6(q).to(device)
    ref64 = x.double() @ dequantize_int6(packed.cpu(), s).double().t()
    ours = int6_matmul(x.to(dtype).to(device), packed, s.to(device)).cpu()
    torch_same = int6_matmul_ref(x.to(dtype), packed.cpu(), s)
    floor = 1e-6 * ref64.abs().max().item() if dtype == torch.float32 else 0.0
    assert ours.dtype == dtype and ours.shape == (m, n)
    assert_within_2x_torch_error(f"int6_matmul {dtype} {(m, k, n)}", ours, torch_same, ref64,
                                 floor)


def _int6_case(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed * 7 + m + k)
    q = torch.randint(-31, 32, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, generator=g) * 0.02 + 0.001).half()
    return pack_int6(q), s, torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, k, n", [(1, 128, 384), (17, 384, 100), (130, 64, 72), (3, 4, 1)])
def test_dgrad_within_2x_torch_error(dtype, m, k, n, device):
    # dx = dy @ (Q·s) through the dgrad kernel (packed weights, frozen), and db = dy.sum(0)
    packed, s, x, dy = _int6_case(m, k, n)
    bias = torch.randn(n)
    w64 = dequantize_int6(packed, s).double()
    leaves = [x.to(dtype).to(device).requires_grad_(), bias.to(dtype).to(device).requires_grad_()]
    y = int6_matmul(leaves[0], packed.to(device), s.to(device), leaves[1])
    dx, db = torch.autograd.grad(y, leaves, dy.to(dtype).to(device))
    ref = [t.detach().cpu().requires_grad_() for t in leaves]
    y_ref = int6_matmul_ref(ref[0], packed, s, ref[1])
    dx_ref, db_ref = torch.autograd.grad(y_ref, ref, dy.to(dtype))
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert dx.dtype == db.dtype == dtype and dx.shape == x.shape
    assert_within_2x_torch_error(f"dx {dtype}", dx.cpu(), dx_ref, dy.double() @ w64,
                                 floor * (dy.double() @ w64).abs().max().item())
    assert_within_2x_torch_error(f"db {dtype}", db.cpu(), db_ref, dy.double().sum(0), floor)
    y64 = x.double() @ w64.t() + bias.double()
    assert_within_2x_torch_error(f"y+b {dtype}", y.detach().cpu(), y_ref.detach(), y64,
                                 floor * y64.abs().max().item())


def test_weights_are_frozen(device):
    packed, s, x, _ = _int6_case(4, 32, 8)
    x = x.to(device).requires_grad_()
    with pytest.raises(ValueError, match="int6_matmul: scale requires grad, but the int6 "
                       "weights are frozen"):
        int6_matmul(x, packed.to(device), s.to(device).clone().requires_grad_())
    y = int6_matmul(x, packed.to(device), s.to(device))
    (dx,) = torch.autograd.grad(y.sum(), [x])
    assert dx.shape == x.shape


def test_a_strided_bias_is_read_as_its_values(device):
    # a slice of a larger parameter (stride 2): the kernel reads the bias at stride 1
    packed, s, x, _ = _int6_case(5, 16, 8)
    bias = torch.randn(16, device=device)[::2]
    y = int6_matmul(x.to(device), packed.to(device), s.to(device), bias)
    assert torch.equal(y, int6_matmul(x.to(device), packed.to(device), s.to(device),
                                      bias.contiguous()))


def test_int6_linear_from_linear_keeps_bias_and_matches_the_reference(device):
    torch.manual_seed(3)
    lin = nn.Linear(64, 40, device=device)
    layer = Int6Linear.from_linear(lin)
    assert layer.bias is lin.bias  # the Linear's own Parameter is kept
    assert [n for n, _ in layer.named_parameters()] == ["bias"]  # packed/scale are buffers
    q, s = quantize_rows(lin.weight.detach().cpu())
    assert torch.equal(layer.packed.cpu(), pack_int6(q)) and torch.equal(layer.scale.cpu(), s)
    assert (layer.in_features, layer.out_features) == (64, 40)
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = int6_matmul_ref(x_ref, layer.packed, layer.scale, lin.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, [x, lin.bias], dy)
    dx_ref, db_ref = torch.autograd.grad(y_ref, [x_ref, lin.bias], dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, db_ref, rtol=1e-5, atol=1e-5)
    ref_layer = Int6Linear(layer.packed, layer.scale, lin.bias, use_kernel=False)
    torch.testing.assert_close(ref_layer(x), y, rtol=1e-5, atol=1e-5)
    assert "in_features=64, out_features=40, bias=True" in repr(layer)


def test_replace_linear_int6_swaps_in_place_with_a_filter(device):
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(),
                          nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))).to(device)
    out = replace_linear_int6(model, filter=lambda name, lin: name != "2.1")
    assert out is model
    assert isinstance(model[0], Int6Linear) and model[0].bias is None
    assert isinstance(model[2][0], Int6Linear) and isinstance(model[2][1], nn.Linear)
    assert isinstance(replace_linear_int6(nn.Linear(8, 4)), Int6Linear)
    with pytest.raises(ValueError, match=r"Int6Linear.from_linear: in_features=6 must be a "
                       r"multiple of 4"):
        replace_linear_int6(nn.Sequential(nn.Linear(6, 4)))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("device_type, amp", AUTOCAST_CASES)
def test_under_autocast_matches_its_reference(device_type, amp, compiled):
    device = autocast_device(device_type)
    packed, s, x, dy = _int6_case(9, 64, 24)
    packed, s = packed.to(device), s.to(device)
    x = x.to(device).requires_grad_()
    bias = torch.randn(24, device=device, requires_grad=True)
    torch._dynamo.reset()
    fn = (torch.compile(int6_matmul, fullgraph=True, backend="aot_eager") if compiled
          else int6_matmul)
    with torch.autocast(device_type, amp):
        y, y_ref = fn(x, packed, s, bias), int6_matmul_ref(x, packed, s, bias)
    assert y.dtype == y_ref.dtype == amp
    grads = torch.autograd.grad(y, [x, bias], dy.to(device).to(amp))
    grads_ref = torch.autograd.grad(y_ref, [x, bias], dy.to(device).to(amp))
    w64 = dequantize_int6(packed.cpu(), s.cpu()).double()
    dy64 = dy.to(amp).double()
    y64 = x.detach().double().cpu() @ w64.t() + bias.detach().double().cpu()
    assert_within_2x_torch_error(f"y {amp}", y.detach().cpu(), y_ref.detach().cpu(), y64)
    for name, g, gr, g64 in zip(("dx", "db"), grads, grads_ref, (dy64 @ w64, dy64.sum(0)),
                                strict=True):
        assert g.dtype == torch.float32, f"{name}: fp32 leaves get fp32 gradients"
        assert_within_2x_torch_error(f"{name} {amp}", g.cpu(), gr.cpu(), g64)


def test_batched_leading_dims(device):
    q = torch.randint(-31, 32, (40, 64), dtype=torch.int8)
    s = torch.rand(40).half()
    x = torch.randn(2, 3, 64, device=device)
    y = int6_matmul(x, pack_int6(q).to(device), s.to(device))
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y.cpu(), int6_matmul_ref(x.cpu(), pack_int6(q), s), rtol=1e-5,
                               atol=1e-5)


def test_bad_inputs_are_clear_errors(device):
    packed = pack_int6(torch.zeros(8, 16, dtype=torch.int8)).to(device)
    s = torch.ones(8, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="x's last dim .* must be K = 4 \\* 4 = 16"):
        int6_matmul(torch.randn(3, 12, device=device), packed, s)
    with pytest.raises(ValueError, match="scale has 7 entries, expected N = 8"):
        int6_matmul(torch.randn(3, 16, device=device), packed, s[:7])
    with pytest.raises(TypeError, match="packed_w must be uint8"):
        int6_matmul(torch.randn(3, 16, device=device), packed.to(torch.int32), s)
    with pytest.raises(TypeError, match="x must be float16/bfloat16/float32"):
        int6_matmul(torch.ones(3, 16, dtype=torch.int32, device=device), packed, s)
    with pytest.raises(TypeError, match="int6_matmul: bias must be float32, got torch.float16"):
        int6_matmul(torch.randn(3, 16, device=device), packed, s, s)
    with pytest.raises(ValueError, match="int6_matmul: bias has 7 entries, expected N = 8"):
        int6_matmul(torch.randn(3, 16, device=device), packed, s, torch.zeros(7, device=device))
    with pytest.raises(TypeError, match="int6_matmul: packed_w must be a torch.Tensor, got list"):
        int6_matmul(torch.randn(3, 16, device=device), [1, 2], s)
    with pytest.raises(TypeError, match="Int6Linear.from_linear: linear must be an nn.Linear"):
        Int6Linear.from_linear(nn.Identity())
    with pytest.raises(ValueError, match=r"Int6Linear: packed_w must be \(N, 3, K/4\)"):
        Int6Linear(packed.reshape(8, 1, 12), s)
    with pytest.raises(TypeError, match="replace_linear_int6: module must be an nn.Module, got "
                       "list"):
        replace_linear_int6([nn.Linear(4, 4)])


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    layer = Int6Linear.from_linear(nn.Linear(32, 24, device=device))
    x = torch.randn(5, 32, device=device, requires_grad=True)
    f = torch.compile(lambda a: layer(a) * 2, fullgraph=True, backend="aot_eager")
    y = f(x)
    torch.testing.assert_close(y, layer(x) * 2)
    (dx,) = torch.autograd.grad(y.sum(), [x])
    (dx_eager,) = torch.autograd.grad((layer(x) * 2).sum(), [x])
    torch.testing.assert_close(dx, dx_eager)


def test_opcheck(device):
    packed = pack_int6(torch.randint(-31, 32, (24, 32), dtype=torch.int8)).to(device)
    s = torch.rand(24, device=device).half()
    x = torch.randn(5, 32, device=device, requires_grad=True)
    torch.library.opcheck(int6_matmul_op, (x, packed, s))
    torch.library.opcheck(int6_matmul_op, (x[None], packed, s,
                                           torch.randn(24, device=device, requires_grad=True)))


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 16384])
def test_production_shapes_on_gpu(m):
    for k, n in ((512, 1536), (1536, 512)):
        q = torch.randint(-31, 32, (n, k), dtype=torch.int8)
        s = (torch.rand(n) * 0.02).half()
        x = torch.randn(m, k)
        ref64 = x.double() @ dequantize_int6(pack_int6(q), s).double().t()
        ours = int6_matmul(x.bfloat16().cuda(), pack_int6(q).cuda(), s.cuda()).cpu()
        torch_same = int6_matmul_ref(x.bfloat16().cuda(), pack_int6(q).cuda(), s.cuda()).cpu()
        assert_within_2x_torch_error("int6 gpu", ours, torch_same, ref64)
        dy = torch.randn(m, n)
        xg = x.bfloat16().cuda().requires_grad_()
        (dx,) = torch.autograd.grad(int6_matmul(xg, pack_int6(q).cuda(), s.cuda()),
                                    [xg], dy.bfloat16().cuda())
        (dx_ref,) = torch.autograd.grad(int6_matmul_ref(xg, pack_int6(q).cuda(), s.cuda()),
                                        [xg], dy.bfloat16().cuda())
        dx64 = dy.bfloat16().double() @ dequantize_int6(pack_int6(q), s).double()
        assert_within_2x_torch_error("int6 dgrad gpu", dx.cpu(), dx_ref.cpu(), dx64)
