"""LeakyReLU²: elementwise forward/backward and the fused MLP matmuls.

Math (``s`` = slope, a runtime float, default 0.9)::

    t(x)  = x if x > 0 else s·x                  (LeakyReLU)
    y(x)  = t(x)²                                (LeakyReLU², "leaky_relu2")
    dy/dx = 2·t(x) · (1 if x > 0 else s)         (needs the sign of x: y alone cannot give it)

MLP (``x`` (M, D), ``W_up`` (H, D), ``W_down`` (D, H))::

    pre = x @ W_upᵀ,   h = y(pre),   out = h @ W_downᵀ
    dh  = dout @ W_down,   dpre = dh ⊙ y'(pre)
    dW_down = doutᵀ @ h,   dW_up = dpreᵀ @ x,   dx = dpre @ W_up

Kernels (one ``@triton.jit`` matmul serves both fused products through a constexpr epilogue):

1. ``_lr2_fwd_kernel`` / ``_lr2_bwd_kernel``: elementwise, any shape/size, fp32/fp16/bf16.
   Arithmetic mirrors the reference op by op, including the rounding to the storage dtype
   between ops (``t`` is rounded before it is squared, ``dy·2t`` is rounded before the slope
   multiply), and no multiply feeds an add, so FMA contraction cannot change a bit.
   **Bit-identical** to ``leaky_relu2_ref`` / ``leaky_relu2_backward_ref`` (NaN inputs give NaN
   outputs; NaN payload bits are not compared).
2. ``_lr2_matmul_kernel`` with ``EPILOGUE=0`` (MLP up-projection): ``pre = x @ W_upᵀ`` accumulated
   in fp32, rounded to the input dtype, then ``h = y(pre)`` in the epilogue. It stores ``h``
   (consumed by the down-projection) and ``pre`` (saved for backward). Saving ``pre`` rather
   than a 1-bit sign mask costs one extra M×H write but keeps the backward exact: a mask
   would force recovering ``t = ±sqrt(h)``, which is not bit-exact. Against the unfused
   reference (matmul writes pre; activation reads pre, writes t; square reads t, writes h) the
   fusion removes two reads and one write of an M×H tensor.
3. ``_lr2_matmul_kernel`` with ``EPILOGUE=1`` (down-projection dgrad): ``dh = dout @ W_down``
   in fp32, rounded, then ``dpre = y'(pre)`` applied in the epilogue from the saved ``pre``
   tile, in one kernel.

Error bound (tested): for the fused matmuls, max |ours − float64| ≤ 2 × max |torch − float64|
(+ 1e-6 absolute floor for fp32, where torch's own error can be ~0) for ``out`` and for
``dx``, ``dW_up``, ``dW_down``, with torch computing the same function in the same dtype.
fp32 inputs use IEEE fp32 dots (no TF32), so the bound holds on GPUs as well.

Saved for backward by ``leaky_relu2_mlp``: ``x``, ``W_up``, ``W_down``, ``pre`` and ``h``
(the unfused autograd graph saves pre, t and h).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from ._backend import interpreting
from ._common import FLOAT_DTYPES, AotSpec, check_same_device, check_same_dtype, check_tensor

# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _leaky(x, slope):
    """t = x if x > 0 else slope*x, rounded to x's dtype (x is loaded in its storage dtype)."""
    xf = x.to(tl.float32)
    return tl.where(xf > 0, xf, xf * slope).to(x.dtype)


@triton.jit
def _lr2_fwd_kernel(x_ptr, y_ptr, n, slope, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    t = _leaky(x, slope).to(tl.float32)
    tl.store(y_ptr + offs, (t * t).to(x.dtype), mask=mask)


@triton.jit
def _lr2_grad(dy, x, slope):
    """dx = (dy * (2t)) then * slope where x <= 0, each product rounded to the dtype."""
    t2 = (_leaky(x, slope).to(tl.float32) * 2.0).to(x.dtype)
    g = (dy.to(tl.float32) * t2.to(tl.float32)).to(x.dtype)
    gf = g.to(tl.float32)
    return tl.where(x.to(tl.float32) > 0, gf, gf * slope).to(x.dtype)


@triton.jit
def _lr2_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n, slope, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    dy = tl.load(dy_ptr + offs, mask=mask)
    tl.store(dx_ptr + offs, _lr2_grad(dy, x, slope), mask=mask)


@triton.jit
def _lr2_matmul_kernel(
    a_ptr, b_ptr, pre_ptr, out_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    slope,
    EPILOGUE: tl.constexpr,  # 0: store pre and h = y(pre); 1: out = y'(pre) * (a @ b)
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering of output tiles so consecutive programs reuse the same B columns.
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: a @jit helper the interpreter may
    num_n = (N + BLOCK_N - 1) // BLOCK_N  # not wrap when triton was imported before kernels
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_off = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    prod = acc.to(out_ptr.dtype.element_ty)  # rounded like a standalone matmul's output
    if EPILOGUE == 0:
        t = _leaky(prod, slope).to(tl.float32)
        tl.store(pre_ptr + c_off, prod, mask=c_mask)
        tl.store(out_ptr + c_off, (t * t).to(prod.dtype), mask=c_mask)
    else:
        pre = tl.load(pre_ptr + c_off, mask=c_mask, other=0.0)
        tl.store(out_ptr + c_off, _lr2_grad(prod, pre, slope), mask=c_mask)


# ---------------------------------------------------------------------------------------------
# Launchers (validated inputs only)


def _elementwise_block() -> int:
    # The interpreter pays per program, so it gets few large blocks; a GPU wants many small.
    return 65536 if interpreting() else 2048


def _matmul_config(m: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=1)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _launch_elementwise_fwd(x: torch.Tensor, slope: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        block = _elementwise_block()
        _lr2_fwd_kernel[(triton.cdiv(n, block),)](x, y, n, slope, BLOCK=block)
    return y


def _launch_elementwise_bwd(dy: torch.Tensor, x: torch.Tensor, slope: float) -> torch.Tensor:
    x, dy = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        block = _elementwise_block()
        _lr2_bwd_kernel[(triton.cdiv(n, block),)](dy, x, dx, n, slope, BLOCK=block)
    return dx


def _launch_matmul(a, b_t_strides, b, m, n, k, pre, out, slope, epilogue):
    cfg = _matmul_config(m)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _lr2_matmul_kernel[grid](
        a, b, pre, out, m, n, k,
        a.stride(0), a.stride(1), b_t_strides[0], b_t_strides[1], out.stride(0), out.stride(1),
        slope, EPILOGUE=epilogue, IEEE=a.dtype == torch.float32,
        num_warps=warps, num_stages=stages, **cfg,
    )


def _launch_up(x2: torch.Tensor, w_up: torch.Tensor, slope: float):
    m, k = x2.shape
    n = w_up.shape[0]
    pre = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    h = torch.empty_like(pre)
    if m and n:
        # B = W_upᵀ: element (k, n) lives at w_up[n, k]
        _launch_matmul(x2, (w_up.stride(1), w_up.stride(0)), w_up, m, n, k, pre, h, slope, 0)
    return pre, h


def _launch_dgrad(dy2: torch.Tensor, w_down: torch.Tensor, pre: torch.Tensor, slope: float):
    m, k = dy2.shape
    n = w_down.shape[1]
    dpre = torch.empty_like(pre)
    if m and n:
        # B = W_down (D, H): element (k, n) at w_down[k, n]
        _launch_matmul(dy2, (w_down.stride(0), w_down.stride(1)), w_down, m, n, k, pre, dpre,
                       slope, 1)
    return dpre


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees opaque ops with fake implementations) and autograd


@torch.library.custom_op("proteus::leaky_relu2_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, slope: float) -> torch.Tensor:
    return _launch_elementwise_fwd(x, slope)


@_fwd_op.register_fake
def _(x, slope):
    return torch.empty_like(x)


@torch.library.custom_op("proteus::leaky_relu2_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, slope: float) -> torch.Tensor:
    return _launch_elementwise_bwd(dy, x, slope)


@_bwd_op.register_fake
def _(dy, x, slope):
    return torch.empty_like(x)


def _fwd_setup(ctx, inputs, output):
    x, slope = inputs
    ctx.save_for_backward(x)
    ctx.slope = slope


def _fwd_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _bwd_op(dy, x, ctx.slope), None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


@torch.library.custom_op("proteus::leaky_relu2_mlp_up", mutates_args=())
def _up_op(x2: torch.Tensor, w_up: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_up(x2, w_up, slope)


@_up_op.register_fake
def _(x2, w_up, slope):
    out = x2.new_empty((x2.shape[0], w_up.shape[0]))
    return out, torch.empty_like(out)


@torch.library.custom_op("proteus::leaky_relu2_mlp_dgrad", mutates_args=())
def _dgrad_op(dy2: torch.Tensor, w_down: torch.Tensor, pre: torch.Tensor, slope: float
              ) -> torch.Tensor:
    return _launch_dgrad(dy2, w_down, pre, slope)


@_dgrad_op.register_fake
def _(dy2, w_down, pre, slope):
    return torch.empty_like(pre)


@torch.library.custom_op("proteus::leaky_relu2_mlp", mutates_args=())
def _mlp_op(x2: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pre, h = _launch_up(x2, w_up, slope)
    return h @ w_down.t(), pre, h


@_mlp_op.register_fake
def _(x2, w_up, w_down, slope):
    pre = x2.new_empty((x2.shape[0], w_up.shape[0]))
    return x2.new_empty((x2.shape[0], w_down.shape[0])), pre, torch.empty_like(pre)


def _mlp_setup(ctx, inputs, output):
    x2, w_up, w_down, slope = inputs
    _, pre, h = output
    ctx.save_for_backward(x2, w_up, w_down, pre, h)
    ctx.slope = slope


def _mlp_backward(ctx, dy, _dpre_unused, _dh_unused):
    x2, w_up, w_down, pre, h = ctx.saved_tensors
    dy = dy.contiguous()
    dpre = _dgrad_op(dy, w_down, pre, ctx.slope)
    return dpre @ w_up, dpre.t() @ x2, dy.t() @ h, None


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# ---------------------------------------------------------------------------------------------
# Public ops


def _check_x(op: str, x) -> None:
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_same_device(op, x=x)


def leaky_relu2(x: torch.Tensor, slope: float = 0.9) -> torch.Tensor:
    """``(x if x > 0 else slope*x)**2`` elementwise, differentiable; bit-identical to the ref."""
    _check_x("leaky_relu2", x)
    return _fwd_op(x, float(slope))


def leaky_relu2_mlp(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float = 0.9
) -> torch.Tensor:
    """``leaky_relu2(x @ w_upᵀ) @ w_downᵀ`` with the activation fused into both matmuls.

    x (..., D), w_up (H, D), w_down (D, H), all one float dtype on one device; differentiable in
    x, w_up and w_down. Error bound: see the module docstring.
    """
    op = "leaky_relu2_mlp"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w_up", w_up, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "w_down", w_down, dtypes=FLOAT_DTYPES, ndim=2)
    check_same_device(op, x=x, w_up=w_up, w_down=w_down)
    check_same_dtype(op, x=x, w_up=w_up, w_down=w_down)
    if x.dim() < 1 or x.shape[-1] != w_up.shape[1]:
        raise ValueError(
            f"{op}: x's last dim {tuple(x.shape)[-1:]} must equal w_up's input dim "
            f"{w_up.shape[1]} (w_up is (hidden, dim))"
        )
    if w_down.shape[1] != w_up.shape[0]:
        raise ValueError(
            f"{op}: w_down {tuple(w_down.shape)} must be (dim_out, hidden={w_up.shape[0]})"
        )
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y, _, _ = _mlp_op(x2, w_up.contiguous(), w_down.contiguous(), float(slope))
    return y.reshape(*x.shape[:-1], w_down.shape[0])


class FusedLeakyReLU2MLP(nn.Module):
    """Drop-in MLP: ``proj(leaky_relu2(fc(x)))``; state_dict keys ``fc.weight``, ``proj.weight``."""

    def __init__(self, dim: int, hidden: int, slope: float = 0.9):
        super().__init__()
        self.slope = slope
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leaky_relu2_mlp(x, self.fc.weight, self.proj.weight, self.slope)


# ---------------------------------------------------------------------------------------------
# References (the specification)


def leaky_relu2_ref(x: torch.Tensor, slope: float = 0.9) -> torch.Tensor:
    """``t = leaky_relu(x, slope)`` (in x's dtype), then ``t * t``."""
    return torch.nn.functional.leaky_relu(x, slope).square()


def leaky_relu2_backward_ref(dy: torch.Tensor, x: torch.Tensor, slope: float = 0.9) -> torch.Tensor:
    """``g = dy * (2t)``; ``dx = g`` where x > 0 else ``g * slope`` (what autograd computes)."""
    t = torch.nn.functional.leaky_relu(x, slope)
    g = dy * (t * 2)
    return torch.where(x > 0, g, g * slope)


def leaky_relu2_mlp_ref(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float = 0.9
) -> torch.Tensor:
    """The unfused MLP: ``leaky_relu2_ref(x @ w_upᵀ) @ w_downᵀ`` (autograd gives the gradients)."""
    return torch.nn.functional.linear(
        leaky_relu2_ref(torch.nn.functional.linear(x, w_up), slope), w_down
    )


# ---------------------------------------------------------------------------------------------
# sm_90 report: the production launches (M = 2048 tokens × 8 sequences per GPU, 512 → 1536)


def sm90_specs():
    m, d, hdim = 16384, 512, 1536
    bf = torch.bfloat16
    x = torch.empty((m, d), dtype=bf)
    w_up = torch.empty((hdim, d), dtype=bf)
    w_down = torch.empty((d, hdim), dtype=bf)
    pre = torch.empty((m, hdim), dtype=bf)
    dy = torch.empty((m, d), dtype=bf)
    big = torch.empty(m * hdim, dtype=bf)
    mm = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    shape = f"M={m} {d}->{hdim} bf16"
    return [
        AotSpec("leaky_relu2.fwd", f"n={m * hdim} bf16", _lr2_fwd_kernel,
                (big, big, big.numel(), 0.9), dict(BLOCK=2048), 4, 3),
        AotSpec("leaky_relu2.bwd", f"n={m * hdim} bf16", _lr2_bwd_kernel,
                (big, big, big, big.numel(), 0.9), dict(BLOCK=2048), 4, 3),
        AotSpec("leaky_relu2.mlp_up", shape, _lr2_matmul_kernel,
                (x, w_up, pre, pre, m, hdim, d, d, 1, 1, d, hdim, 1, 0.9),
                dict(EPILOGUE=0, IEEE=False, **mm), 8, 3, matrix=True),
        AotSpec("leaky_relu2.mlp_dgrad", f"M={m} {d}->{hdim} bf16", _lr2_matmul_kernel,
                (dy, w_down, pre, pre, m, hdim, d, d, 1, hdim, 1, hdim, 1, 0.9),
                dict(EPILOGUE=1, IEEE=False, **mm), 8, 3, matrix=True),
    ]
