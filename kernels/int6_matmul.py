"""int6 dequant-matmul: ``y = x @ (Q · s)ᵀ + b`` reading 6-bit weights packed 4 values in 3 bytes.

Quantised weights ``Q`` (N, K) are integers in [-31, 31] with a per-output-row scale ``s`` (N,).
Because ``s`` is constant along a row, ``x @ (Q·s)ᵀ = (x @ Qᵀ) · s``: the kernel accumulates
``x @ Qᵀ`` in fp32 from the integers (exact in any float dtype: |Q| ≤ 31) and applies ``s`` once
per output column after the K loop, then adds the optional bias ``b`` (N,) before the one
rounding to x's dtype.

Backward (``int6_matmul`` is differentiable with respect to x and b; the weights are frozen and
get no gradient; saved for backward: ``packed_w`` and ``scale`` only, not x):
``dx = dy @ (Q·s)``, a reduction over N, so ``s`` cannot be factored out. The dgrad kernel
reads the same packed bytes, unpacks a (BLOCK_N, BLOCK_G) tile of each of the four K-slices,
multiplies by ``s`` in fp32 and rounds to dy's dtype — exactly the weights the reference
multiplies by (``dequantize_int6(...).to(dtype)``) — and accumulates four (BLOCK_M, BLOCK_G)
output tiles ``dx[:, j + c·G]`` in fp32. ``db = dy.sum(0)``.

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

Quantiser (``quantize_rows``, shared with ``proteus.quant``): per-row symmetric, ``q =
round(w / s)`` clipped to ±qmax, ``s = clip / qmax`` in fp16, the clip of each row the
percentile of |w| (from ``CLIP_PERCENTILES``) whose reconstruction has the smallest MSE.

Autocast (tested eager and compiled): under ``torch.autocast`` x and b are cast to the autocast
dtype, as ``F.linear`` casts its inputs, and y comes out in that dtype; ``packed_w`` and
``scale`` are not cast (the reference dequantises them in fp32 first).

Error bound (tested): max |ours − float64| ≤ 2 × max |torch − float64| (+ 1e-6·max|y| floor
in fp32), where torch computes ``F.linear(x, dequantise(Q, s), b)`` (and its dx) in the same
dtype and float64 uses the dequantised weights exactly. fp32 uses IEEE dots.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import nn

from ._backend import interpreting
from ._common import FLOAT_DTYPES, AotSpec, cast_inputs, check_same_device, check_tensor
from ._common import register_autocast as _register_autocast
from .gptq import gptq_quantize, input_hessians, lqer_factors, quantize_factor

QMAX = 31
CLIP_PERCENTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)

# ---------------------------------------------------------------------------------------------
# Quantiser and packing (plain torch; exact inverses, used by Int6Linear and the artifact)


def quantize_rows(w: torch.Tensor, qmax: int = QMAX, percentiles=CLIP_PERCENTILES):
    """Per-row symmetric quantisation: q = round(w / s) clipped to ±qmax, s = clip / qmax (fp16).

    The clip of each row is the percentile of |w| (from ``percentiles``) whose reconstruction
    has the smallest MSE. Returns (q int8, s fp16) on w's device.
    """
    check_tensor("quantize_rows", "w", w, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=2)
    if not 1 <= qmax <= 127:
        raise ValueError(f"quantize_rows: qmax must be in [1, 127], got {qmax}")
    w = w.detach().float()
    a = w.abs()
    best_q = best_s = best_err = None
    for p in percentiles:
        clip = a.max(dim=1).values if p >= 1.0 else torch.quantile(a, p, dim=1)
        s = (clip.clamp_min(1e-12) / qmax).half().float().clamp_min(2**-24)
        q = torch.round(w / s[:, None]).clamp(-qmax, qmax)
        err = ((q * s[:, None] - w) ** 2).sum(dim=1)
        if best_err is None:
            best_q, best_s, best_err = q, s, err
        else:
            better = err < best_err
            best_q = torch.where(better[:, None], q, best_q)
            best_s = torch.where(better, s, best_s)
            best_err = torch.minimum(err, best_err)
    return best_q.to(torch.int8), best_s.half()


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


def dequantize_int6(packed_w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 weights ``Q * s`` (the exact values the kernel multiplies by)."""
    return unpack_int6(packed_w).float() * scale.float()[:, None]


# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _unpack(p0, p1, p2):
    """The four signed 6-bit fields of byte planes p0, p1, p2 (int32), as int32."""
    q0 = (p0 & 63) - 32
    q1 = ((p0 >> 6) | ((p1 & 15) << 2)) - 32
    q2 = ((p1 >> 4) | ((p2 & 3) << 4)) - 32
    q3 = (p2 >> 2) - 32
    return q0, q1, q2, q3


@triton.jit
def _int6_matmul_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, b_ptr,
    M, N, G,
    stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr,
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
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for j0 in range(0, G, BLOCK_G):
        g = j0 + offs_g
        g_ok = g[:, None] < G
        # three byte planes, each a contiguous run of each row, loaded as (BLOCK_G, BLOCK_N)
        p0 = tl.load(w_rows + g[:, None], mask=g_ok & n_ok, other=0).to(tl.int32)
        p1 = tl.load(w_rows + G + g[:, None], mask=g_ok & n_ok, other=0).to(tl.int32)
        p2 = tl.load(w_rows + 2 * G + g[:, None], mask=g_ok & n_ok, other=0).to(tl.int32)
        # masked lanes load byte 0 -> field 0 -> -32; zero them through the x mask instead
        q0, q1, q2, q3 = _unpack(p0, p1, p2)
        x_ok = m_ok & (g[None, :] < G)
        x0 = tl.load(x_rows + g[None, :], mask=x_ok, other=0.0)
        x1 = tl.load(x_rows + G + g[None, :], mask=x_ok, other=0.0)
        x2 = tl.load(x_rows + 2 * G + g[None, :], mask=x_ok, other=0.0)
        x3 = tl.load(x_rows + 3 * G + g[None, :], mask=x_ok, other=0.0)
        acc = _dot(x0, q0.to(tl.float32).to(dt), acc, IEEE)
        acc = _dot(x1, q1.to(tl.float32).to(dt), acc, IEEE)
        acc = _dot(x2, q2.to(tl.float32).to(dt), acc, IEEE)
        acc = _dot(x3, q3.to(tl.float32).to(dt), acc, IEEE)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc * s[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)


@triton.jit
def _int6_dgrad_kernel(
    dy_ptr, w_ptr, s_ptr, dx_ptr,
    M, N, G,
    stride_dym, stride_dxm,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m[:, None] < M
    g_ok = offs_g[None, :] < G
    dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym
    dt = dy_ptr.dtype.element_ty
    acc0 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        dy = tl.load(dy_rows + n[None, :], mask=m_ok & (n[None, :] < N), other=0.0)
        w_rows = w_ptr + n[:, None].to(tl.int64) * (3 * G) + offs_g[None, :]  # (BLOCK_N, BLOCK_G)
        w_ok = (n[:, None] < N) & g_ok
        p0 = tl.load(w_rows, mask=w_ok, other=0).to(tl.int32)
        p1 = tl.load(w_rows + G, mask=w_ok, other=0).to(tl.int32)
        p2 = tl.load(w_rows + 2 * G, mask=w_ok, other=0).to(tl.int32)
        # rows past N get s = 0, so their (masked, byte-0) fields contribute exactly 0
        s = tl.load(s_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
        q0, q1, q2, q3 = _unpack(p0, p1, p2)
        # Q·s rounded to dy's dtype: the very weights the reference multiplies by
        acc0 = _dot(dy, (q0.to(tl.float32) * s).to(dt), acc0, IEEE)
        acc1 = _dot(dy, (q1.to(tl.float32) * s).to(dt), acc1, IEEE)
        acc2 = _dot(dy, (q2.to(tl.float32) * s).to(dt), acc2, IEEE)
        acc3 = _dot(dy, (q3.to(tl.float32) * s).to(dt), acc3, IEEE)
    dx_rows = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_g[None, :]
    out_ok = m_ok & g_ok
    tl.store(dx_rows, acc0.to(dx_ptr.dtype.element_ty), mask=out_ok)
    tl.store(dx_rows + G, acc1.to(dx_ptr.dtype.element_ty), mask=out_ok)
    tl.store(dx_rows + 2 * G, acc2.to(dx_ptr.dtype.element_ty), mask=out_ok)
    tl.store(dx_rows + 3 * G, acc3.to(dx_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------
# Launchers (validated inputs only)


def _config(m: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_G=32, num_warps=4, num_stages=1)
    if m <= 16:  # decode: weight-bandwidth bound; small M tile, wide N
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_G=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_G=32, num_warps=8, num_stages=3)


def _dgrad_config(m: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_G=32, num_warps=4, num_stages=1)
    if m <= 64:  # wgmma needs 64 rows per warpgroup
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_G=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_G=32, num_warps=8, num_stages=3)


def _grid_launch(kernel, cfg: dict, grid_fn: Callable[[dict], tuple], *args, **constexprs):
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    kernel[grid_fn(cfg)](*args, num_warps=warps, num_stages=stages, **constexprs, **cfg)


def _launch(x2, packed, scale, bias):
    m = x2.shape[0]
    n, g = packed.shape[0], packed.shape[2]
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if m and n:
        _grid_launch(_int6_matmul_kernel, _config(m),
                     lambda c: (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(n, c["BLOCK_N"])),
                     x2, packed, scale, y, y if bias is None else bias.contiguous(),  # stride 1
                     m, n, g, x2.stride(0),
                     y.stride(0), HAS_BIAS=bias is not None, IEEE=x2.dtype == torch.float32)
    return y


def _launch_dgrad(dy2, packed, scale):
    m, n = dy2.shape
    g = packed.shape[2]
    dx = torch.empty((m, 4 * g), device=dy2.device, dtype=dy2.dtype)
    if m and g:
        if n == 0:
            return dx.zero_()
        _grid_launch(_int6_dgrad_kernel, _dgrad_config(m),
                     lambda c: (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(g, c["BLOCK_G"])),
                     dy2, packed, scale, dx, m, n, g, dy2.stride(0), dx.stride(0),
                     IEEE=dy2.dtype == torch.float32)
    return dx


# ---------------------------------------------------------------------------------------------
# Validation (inside the op, after autocast: every surface goes through it)


def _check_weights(op: str, packed, scale, bias, bias_dtypes=FLOAT_DTYPES) -> dict:
    check_tensor(op, "packed_w", packed, dtypes=(torch.uint8,), ndim=3, contiguous=True)
    check_tensor(op, "scale", scale, dtypes=(torch.float16, torch.float32), ndim=1)
    n, planes, _ = packed.shape
    if planes != 3:
        raise ValueError(f"{op}: packed_w must be (N, 3, K/4) from pack_int6, got "
                         f"{tuple(packed.shape)}")
    if scale.shape[0] != n:
        raise ValueError(f"{op}: scale has {scale.shape[0]} entries, expected N = {n}")
    given = dict(packed_w=packed, scale=scale)
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=bias_dtypes, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"{op}: bias has {bias.shape[0]} entries, expected N = {n}")
        given["bias"] = bias
    return given


def _validate(x, packed, scale, bias) -> None:
    op = "int6_matmul"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    given = _check_weights(op, packed, scale, bias, (x.dtype,))
    check_same_device(op, x=x, **given)
    if x.dim() < 1 or x.shape[-1] != 4 * packed.shape[2]:
        g = packed.shape[2]
        raise ValueError(f"{op}: x's last dim {tuple(x.shape)[-1:]} must be K = 4 * {g} = "
                         f"{4 * g} to match packed_w")


# ---------------------------------------------------------------------------------------------
# Custom ops with autograd (dx, db) and autocast


@torch.library.custom_op("proteus::int6_matmul", mutates_args=())
def int6_matmul_op(x: torch.Tensor, packed_w: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``int6_matmul`` as a custom op (differentiable in x and bias)."""
    _validate(x, packed_w, scale, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _launch(x2, packed_w, scale.contiguous(), bias)
    return y.reshape(*x.shape[:-1], packed_w.shape[0])


@int6_matmul_op.register_fake
def _(x, packed_w, scale, bias=None):
    _validate(x, packed_w, scale, bias)
    return x.new_empty((*x.shape[:-1], packed_w.shape[0]))


@torch.library.custom_op("proteus::int6_matmul_dgrad", mutates_args=())
def _dgrad_op(dy2: torch.Tensor, packed_w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _launch_dgrad(dy2.contiguous(), packed_w, scale.contiguous())


@_dgrad_op.register_fake
def _(dy2, packed_w, scale):
    return dy2.new_empty((dy2.shape[0], 4 * packed_w.shape[2]))


def _setup(ctx, inputs, output):
    x, packed_w, scale, bias = (list(inputs) + [None])[:4]
    ctx.save_for_backward(packed_w, scale)
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    packed_w, scale = ctx.saved_tensors
    dy2 = dy.reshape(-1, dy.shape[-1])
    need = ctx.needs_input_grad
    dx = _dgrad_op(dy2, packed_w, scale).reshape(ctx.x_shape) if need[0] else None
    db = dy2.sum(0) if ctx.has_bias and need[3] else None
    return dx, None, None, db


int6_matmul_op.register_autograd(_backward, setup_context=_setup)
_register_autocast("proteus::int6_matmul",
                   {dev: cast_inputs("x", "bias") for dev in ("cpu", "cuda")})


def int6_matmul(x: torch.Tensor, packed_w: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, unpack_int6(packed_w) * scale[:, None], bias)`` for x (..., K).

    Differentiable with respect to x and bias (a Triton dgrad kernel reads the packed weights);
    ``packed_w`` and ``scale`` are frozen: a ``scale`` that requires grad is refused.
    """
    op = "int6_matmul"
    for name, t in (("x", x), ("packed_w", packed_w), ("scale", scale)):
        check_tensor(op, name, t)
    if bias is not None:
        check_tensor(op, "bias", bias)
    if scale.requires_grad:
        raise ValueError(f"{op}: scale requires grad, but the int6 weights are frozen (no "
                         "gradient flows to them); pass scale.detach()")
    return int6_matmul_op(x, packed_w, scale, bias)


def int6_matmul_ref(x: torch.Tensor, packed_w: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The specification: dequantise, round to x's dtype, then ``F.linear``."""
    return torch.nn.functional.linear(x, dequantize_int6(packed_w, scale).to(x.dtype), bias)


# ---------------------------------------------------------------------------------------------
# The module, and the function that swaps it into a model (gpt-fast's quantize.py style)


class Int6Linear(nn.Module):
    """``y = x @ (Q·s)ᵀ + b`` on packed int6 weights (inference, LoRA, test-time training).

    Buffers ``packed`` uint8 (out, 3, in/4) and ``scale`` fp16 (out,) are frozen; ``bias`` is an
    ``nn.Parameter`` (the Linear's own, kept by :meth:`from_linear`) or None. Differentiable with
    respect to its input and bias. ``use_kernel=False`` runs the PyTorch reference instead of the
    Triton kernel (for machines where the kernel would run on Triton's interpreter).

    Optional LQER factors (buffers ``lqer_a`` (out, r) and ``lqer_b`` (r, in), fp32, the
    dequantised int8 factors) add the low-rank correction ``(x Bᵀ) Aᵀ``: one extra pair of
    small matmuls (r is a few), not fused into the int6 kernel.
    """

    quantized = True  # what proteus.model checks to route around fused fp weights

    def __init__(self, packed_w: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None, *, use_kernel: bool = True,
                 lqer: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        _check_weights("Int6Linear", packed_w, scale, bias)
        self.out_features, _, g = packed_w.shape
        self.in_features = 4 * g
        self.register_buffer("packed", packed_w)
        self.register_buffer("scale", scale)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.use_kernel = use_kernel
        if lqer is not None:
            a, b = lqer
            ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2
                  and b.dim() == 2 and a.shape[0] == self.out_features
                  and b.shape[1] == self.in_features and a.shape[1] == b.shape[0] >= 1)
            if not ok:
                raise ValueError(f"Int6Linear: lqer factors must be (A ({self.out_features}, r), "
                                 f"B (r, {self.in_features})), got "
                                 f"{[tuple(getattr(t, 'shape', ())) for t in lqer]}")
            self.register_buffer("lqer_a", a.detach().float().to(packed_w.device))
            self.register_buffer("lqer_b", b.detach().float().to(packed_w.device))
        else:
            self.lqer_a = self.lqer_b = None

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None, *, use_kernel: bool = True,
                       lqer: tuple[torch.Tensor, torch.Tensor] | None = None) -> Int6Linear:
        """From int8 values in [-31, 31] (out, in) and their per-row scale."""
        return cls(pack_int6(q), scale.half(), bias, use_kernel=use_kernel, lqer=lqer)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, percentiles=CLIP_PERCENTILES,
                    use_kernel: bool = True, method: str = "rtn",
                    hessian: torch.Tensor | None = None, clip_sigmas: float | None = None,
                    lqer_rank: int = 0) -> Int6Linear:
        """Quantise ``linear.weight`` per row; its bias Parameter is kept (the same object).

        ``method="rtn"``: round to nearest (:func:`quantize_rows`). ``method="gptq"``: GPTQ
        under ``hessian`` = Σ xᵀx of the layer's inputs (``proteus.kernels.gptq``), with a clip
        of ``clip_sigmas`` standard deviations per row, or RTN's clip when it is None.
        ``lqer_rank`` > 0 adds int8 rank-r factors of the remaining error."""
        name = "Int6Linear.from_linear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: linear must be an nn.Linear, got {type(linear).__name__}")
        if linear.in_features % 4:
            raise ValueError(f"{name}: in_features={linear.in_features} must be a multiple of 4 "
                             "(int6 packs 4 values in 3 bytes)")
        if method not in ("rtn", "gptq"):
            raise ValueError(f"{name}: method must be 'rtn' or 'gptq', got {method!r}")
        if (method == "gptq") != (hessian is not None):
            raise ValueError(f"{name}: method='gptq' needs hessian= (and only it takes one)")
        if not isinstance(lqer_rank, int) or lqer_rank < 0:
            raise ValueError(f"{name}: lqer_rank must be an int >= 0, got {lqer_rank!r}")
        w = linear.weight.detach().float()
        q, s = quantize_rows(w, QMAX, percentiles)
        if method == "gptq":
            q, s = gptq_quantize(w, hessian.to(w.device), QMAX, clip_sigmas,
                                 scale=None if clip_sigmas else s)
        lqer = None
        if lqer_rank:
            a, b = lqer_factors(w - q.float() * s.float()[:, None], lqer_rank)
            lqer = tuple(qq.float() * ss.float()[:, None]
                         for qq, ss in (quantize_factor(a), quantize_factor(b)))
        return cls(pack_int6(q.cpu()).to(linear.weight.device), s, linear.bias,
                   use_kernel=use_kernel, lqer=lqer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = int6_matmul if self.use_kernel else int6_matmul_ref
        y = fn(x, self.packed, self.scale, self.bias)
        if self.lqer_a is not None:
            y = y + nn.functional.linear(nn.functional.linear(x, self.lqer_b.to(x.dtype)),
                                         self.lqer_a.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        r = "" if self.lqer_a is None else f", lqer_rank={self.lqer_a.shape[1]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{r}")


def replace_linear_int6(module: nn.Module, *,
                        filter: Callable[[str, nn.Linear], bool] | None = None,
                        use_kernel: bool = True, calibration=None,
                        clip_sigmas: float | None = None, lqer_rank: int = 0) -> nn.Module:
    """Swap every ``nn.Linear`` inside ``module`` (those ``filter(qualified_name, linear)``
    accepts) for ``Int6Linear.from_linear(linear)``, in place; returns ``module`` (or the new
    layer, when ``module`` is itself a Linear). A Linear whose weight is tied to another module
    (an output head tied to an embedding) is quantised on its own; the other keeps fp weights.

    ``calibration``: an iterable of batches (a tensor, or a tuple of ``module``'s arguments).
    Given, each Linear is GPTQ-quantised under the Hessian of its inputs over those batches
    (:func:`input_hessians`; a Linear that saw no input falls back to round-to-nearest).
    ``lqer_rank`` > 0 adds LQER factors to every swapped layer.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"replace_linear_int6: module must be an nn.Module, got "
                        f"{type(module).__name__}")
    if filter is not None and not callable(filter):
        raise TypeError(f"replace_linear_int6: filter must be a callable (name, linear) -> bool "
                        f"or None, got {type(filter).__name__}")
    chosen = {n for n, m in module.named_modules() if isinstance(m, nn.Linear)
              and (filter is None or not n or filter(n, m))}
    hessians = input_hessians(module, calibration, chosen) if calibration is not None else {}

    def swap(name: str, lin: nn.Linear) -> Int6Linear:
        h = hessians.get(name)
        return Int6Linear.from_linear(lin, use_kernel=use_kernel, lqer_rank=lqer_rank,
                                      method="rtn" if h is None else "gptq", hessian=h,
                                      clip_sigmas=clip_sigmas)

    if isinstance(module, nn.Linear):
        return swap("", module)

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Linear):
                if full in chosen:
                    setattr(parent, name, swap(full, child))
            else:
                walk(child, full + ".")

    walk(module, "")
    return module


# ---------------------------------------------------------------------------------------------
# sm_90 report: decode (M = 16) and prefill (M = 16384) on the model's two MLP shapes; the dgrad
# (LoRA / test-time training through frozen int6 weights) at the prefill shape


def sm90_specs():
    specs = []
    for k, n in ((512, 1536), (1536, 512)):
        g = k // 4
        w = torch.empty((n, 3, g), dtype=torch.uint8)
        s = torch.empty(n, dtype=torch.float16)
        for m, name in ((16, "decode"), (16384, "prefill")):
            x = torch.empty((m, k), dtype=torch.bfloat16)
            y = torch.empty((m, n), dtype=torch.bfloat16)
            cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_G=64, w=4, s=4) if m <= 16 else dict(
                BLOCK_M=128, BLOCK_N=128, BLOCK_G=32, w=8, s=3)
            warps, stages = cfg.pop("w"), cfg.pop("s")
            specs.append(AotSpec(
                f"int6_matmul.{name}", f"M={m} K={k} N={n} bf16", _int6_matmul_kernel,
                (x, w, s, y, y, m, n, g, k, n), dict(HAS_BIAS=False, IEEE=False, **cfg),
                warps, stages, matrix=m > 16,
            ))
        m = 16384
        dy = torch.empty((m, n), dtype=torch.bfloat16)
        dx = torch.empty((m, k), dtype=torch.bfloat16)
        specs.append(AotSpec(
            "int6_matmul.dgrad", f"M={m} K={k} N={n} bf16", _int6_dgrad_kernel,
            (dy, w, s, dx, m, n, g, n, k),
            dict(IEEE=False, BLOCK_M=128, BLOCK_N=64, BLOCK_G=32), 8, 3, matrix=True,
        ))
    return specs
