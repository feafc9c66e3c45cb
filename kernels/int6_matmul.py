"""int6 dequant-matmul: ``y = x @ (Q · s)ᵀ`` reading 6-bit weights packed 4 values in 3 bytes.

Quantised weights ``Q`` (N, K) are integers in [-31, 31] with a per-output-row scale ``s`` (N,).
Because ``s`` is constant along a row, ``x @ (Q·s)ᵀ = (x @ Qᵀ) · s``: the kernel accumulates
``x @ Qᵀ`` in fp32 from the integers (exact in any float dtype: |Q| ≤ 31) and applies ``s`` once
per output column after the K loop.

Packed layout (``pack_int6``): per row, K must be a multiple of 4 and G = K / 4 groups. Group
``j`` holds the four values at ``k = j, j + G, j + 2G, j + 3G`` as offset-binary fields
``b = q + 32`` (6 bits, 1..63; 0 is never produced), packed little-endian into 24 bits::

     bit  23        18 17        12 11         6 5          0
         [    b3     ][    b2     ][    b1     ][    b0     ]      b_c = Q[n, j + c·G] + 32
         |<-- byte2 ------->|<----- byte1 ----->|<- byte0 ->|
          byte0 = b0 | (b1 & 3) << 6
          byte1 = b1 >> 2 | (b2 & 15) << 4
          byte2 = b2 >> 4 | b3 << 2

The three bytes of every group are stored as three *planes*: ``packed`` has shape (N, 3, G),
``packed[n, p, j]`` = byte p of group j of row n. A tile of ``BLOCK_G`` groups of ``BLOCK_N``
rows is therefore three contiguous (BLOCK_N, BLOCK_G) byte loads (coalesced, 16-byte vectors
when G % 16 == 0), and unpacking yields the four K-slices ``[j0, j0+BLOCK_G) + c·G`` that
multiply the matching four column slices of ``x`` — four ``tl.dot`` s per tile, no shuffles.
Bytes per weight: 0.75 (vs 2 for fp16: 6/16 of the traffic).

Error bound (tested): max |ours − float64| ≤ 2 × max |torch − float64| (+ 1e-6·max|y| floor
in fp32), where torch computes ``x @ dequantise(Q, s)ᵀ`` in the same dtype and float64 uses the
dequantised weights exactly. fp32 uses IEEE dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreting
from ._common import FLOAT_DTYPES, AotSpec, check_same_device, check_tensor

QMAX = 31

# ---------------------------------------------------------------------------------------------
# Packing (exact inverses; plain torch, used by the quantiser and the artifact)


def pack_int6(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) with values in [-31, 31], K % 4 == 0 -> uint8 (N, 3, K/4)."""
    check_tensor("pack_int6", "q", q, dtypes=(torch.int8,), ndim=2)
    n, k = q.shape
    if k % 4:
        raise ValueError(f"pack_int6: K={k} must be a multiple of 4 (pad the rows with zeros)")
    if q.numel() and (q.min() < -QMAX or q.max() > QMAX):
        raise ValueError(f"pack_int6: values must be in [-{QMAX}, {QMAX}], got "
                         f"[{int(q.min())}, {int(q.max())}]")
    b = (q.to(torch.int32) + 32).view(n, 4, k // 4)  # b[:, c, j] = Q[:, j + c*G] + 32
    b0, b1, b2, b3 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    byte0 = b0 | ((b1 & 3) << 6)
    byte1 = (b1 >> 2) | ((b2 & 15) << 4)
    byte2 = (b2 >> 4) | (b3 << 2)
    return torch.stack((byte0, byte1, byte2), dim=1).to(torch.uint8).contiguous()


def unpack_int6(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, K/4) -> int8 (N, K); the exact inverse of :func:`pack_int6`."""
    check_tensor("unpack_int6", "packed", packed, dtypes=(torch.uint8,), ndim=3)
    if packed.shape[1] != 3:
        raise ValueError(f"unpack_int6: packed must be (N, 3, K/4), got {tuple(packed.shape)}")
    p = packed.to(torch.int32)
    byte0, byte1, byte2 = p[:, 0], p[:, 1], p[:, 2]
    b0 = byte0 & 63
    b1 = (byte0 >> 6) | ((byte1 & 15) << 2)
    b2 = (byte1 >> 4) | ((byte2 & 3) << 4)
    b3 = byte2 >> 2
    q = torch.stack((b0, b1, b2, b3), dim=1) - 32  # (N, 4, G)
    return q.reshape(packed.shape[0], -1).to(torch.int8)


# ---------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _int6_matmul_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr,
    M, N, G,
    stride_xm, stride_ym,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[None, :].to(tl.int64) * (3 * G)  # (1, BLOCK_N): row starts
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for j0 in range(0, G, BLOCK_G):
        g = j0 + offs_g
        g_ok = g[:, None] < G
        # three byte planes, each a contiguous run of each row, loaded as (BLOCK_G, BLOCK_N)
        p0 = tl.load(w_rows + g[:, None], mask=g_ok & n_ok, other=0).to(tl.int32)
        p1 = tl.load(w_rows + G + g[:, None], mask=g_ok & n_ok, other=0).to(tl.int32)
        p2 = tl.load(w_rows + 2 * G + g[:, None], mask=g_ok & n_ok, other=0).to(tl.int32)
        # masked lanes load byte 0 -> field 0 -> -32; zero them through the x mask instead
        q0 = ((p0 & 63) - 32).to(tl.float32).to(x_ptr.dtype.element_ty)
        q1 = (((p0 >> 6) | ((p1 & 15) << 2)) - 32).to(tl.float32).to(x_ptr.dtype.element_ty)
        q2 = (((p1 >> 4) | ((p2 & 3) << 4)) - 32).to(tl.float32).to(x_ptr.dtype.element_ty)
        q3 = ((p2 >> 2) - 32).to(tl.float32).to(x_ptr.dtype.element_ty)
        x_ok = m_ok & (g[None, :] < G)
        x0 = tl.load(x_rows + g[None, :], mask=x_ok, other=0.0)
        x1 = tl.load(x_rows + G + g[None, :], mask=x_ok, other=0.0)
        x2 = tl.load(x_rows + 2 * G + g[None, :], mask=x_ok, other=0.0)
        x3 = tl.load(x_rows + 3 * G + g[None, :], mask=x_ok, other=0.0)
        acc = _dot(x0, q0, acc, IEEE)
        acc = _dot(x1, q1, acc, IEEE)
        acc = _dot(x2, q2, acc, IEEE)
        acc = _dot(x3, q3, acc, IEEE)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc * s[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)


def _config(m: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_G=32, num_warps=4, num_stages=1)
    if m <= 16:  # decode: weight-bandwidth bound; small M tile, wide N
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_G=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_G=32, num_warps=8, num_stages=3)


def _launch(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    m, k = x2.shape
    n, g = packed.shape[0], packed.shape[2]
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if m and n:
        cfg = _config(m)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _int6_matmul_kernel[grid](x2, packed, scale, y, m, n, g, x2.stride(0), y.stride(0),
                                  IEEE=x2.dtype == torch.float32, num_warps=warps,
                                  num_stages=stages, **cfg)
    return y


@torch.library.custom_op("proteus::int6_matmul", mutates_args=())
def _op(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _launch(x2, packed, scale)


@_op.register_fake
def _(x2, packed, scale):
    return x2.new_empty((x2.shape[0], packed.shape[0]))


def _validate(x, packed, scale) -> None:
    op = "int6_matmul"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "packed_w", packed, dtypes=(torch.uint8,), ndim=3, contiguous=True)
    check_tensor(op, "scale", scale, dtypes=(torch.float16, torch.float32), ndim=1)
    check_same_device(op, x=x, packed_w=packed, scale=scale)
    n, planes, g = packed.shape
    if planes != 3:
        raise ValueError(f"{op}: packed_w must be (N, 3, K/4) from pack_int6, got "
                         f"{tuple(packed.shape)}")
    if x.dim() < 1 or x.shape[-1] != 4 * g:
        raise ValueError(f"{op}: x's last dim {tuple(x.shape)[-1:]} must be K = 4 * {g} = "
                         f"{4 * g} to match packed_w")
    if scale.shape[0] != n:
        raise ValueError(f"{op}: scale has {scale.shape[0]} entries, expected N = {n}")


def int6_matmul(x: torch.Tensor, packed_w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (unpack_int6(packed_w) * scale[:, None])ᵀ`` for x (..., K); inference only."""
    _validate(x, packed_w, scale)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _op(x2, packed_w, scale.contiguous())
    return y.reshape(*x.shape[:-1], packed_w.shape[0])


def dequantize_int6(packed_w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 weights ``Q * s`` (the exact values the kernel multiplies by)."""
    return unpack_int6(packed_w).float() * scale.float()[:, None]


def int6_matmul_ref(x: torch.Tensor, packed_w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The specification: dequantise, then ``torch.matmul`` in x's dtype."""
    return x @ dequantize_int6(packed_w, scale).to(x.dtype).t()


# ---------------------------------------------------------------------------------------------
# sm_90 report: decode (M = 16) and prefill (M = 16384) on the model's two MLP shapes


def sm90_specs():
    specs = []
    for k, n in ((512, 1536), (1536, 512)):
        g = k // 4
        w = torch.empty((n, 3, g), dtype=torch.uint8)
        s = torch.empty(n, dtype=torch.float16)
        for m, name in ((16, "decode"), (16384, "prefill")):
            x = torch.empty((m, k), dtype=torch.bfloat16)
            cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_G=64, w=4, s=4) if m <= 16 else dict(
                BLOCK_M=128, BLOCK_N=128, BLOCK_G=32, w=8, s=3)
            warps, stages = cfg.pop("w"), cfg.pop("s")
            specs.append(AotSpec(
                f"int6_matmul.{name}", f"M={m} K={k} N={n} bf16", _int6_matmul_kernel,
                (x, w, s, x, m, n, g, k, n), dict(IEEE=False, **cfg), warps, stages,
                matrix=m > 16,
            ))
    return specs
