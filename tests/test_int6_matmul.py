"""int6 packing (exact) and the dequant-matmul kernel (error bound vs float64)."""

from __future__ import annotations

import pytest
import torch

from proteus.kernels._testing import assert_within_2x_torch_error
from proteus.kernels.int6_matmul import (
    dequantize_int6,
    int6_matmul,
    int6_matmul_ref,
    pack_int6,
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


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    packed = pack_int6(torch.randint(-31, 32, (24, 32), dtype=torch.int8)).to(device)
    s = torch.rand(24, device=device).half()
    x = torch.randn(5, 32, device=device)
    f = torch.compile(lambda a: int6_matmul(a, packed, s) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), int6_matmul(x, packed, s) * 2)


def test_opcheck(device):
    from proteus.kernels.int6_matmul import _op

    packed = pack_int6(torch.randint(-31, 32, (24, 32), dtype=torch.int8)).to(device)
    torch.library.opcheck(_op, (torch.randn(5, 32, device=device), packed,
                                torch.rand(24, device=device).half()))


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
