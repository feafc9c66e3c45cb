"""LeakyReLU²: elementwise forward/backward and the fused MLP matmuls.

Math (``s`` = slope, a runtime float the caller always gives: there is no default, because
the published record's title says 0.9 and its code uses 0.5)::

    t(x)  = x if x > 0 else s·x                  (LeakyReLU)
    y(x)  = t(x)²                                (LeakyReLU², "leaky_relu2")
    dy/dx = 2·t(x) · (1 if x > 0 else s)         (needs the sign of x: y alone cannot give it)

MLP (``x`` (..., D), ``W_up`` (H, D), ``W_down`` (D_out, H), optional biases ``b_up`` (H,),
``b_down`` (D_out,))::

    pre = x @ W_upᵀ + b_up,   h = y(pre),   out = h @ W_downᵀ + b_down
    dh  = dout @ W_down,   dpre = dh ⊙ y'(pre)
    dW_down = doutᵀ @ h,   dW_up = dpreᵀ @ x,   dx = dpre @ W_up,   db = column sums

Kernels (one ``@triton.jit`` matmul serves both fused products through a constexpr epilogue):

1. ``_lr2_fwd_kernel`` / ``_lr2_bwd_kernel``: elementwise, any shape/size, fp32/fp16/bf16.
   Arithmetic mirrors the reference op by op, including the rounding to the storage dtype
   between ops (``t`` is rounded before it is squared, ``dy·2t`` is rounded before the slope
   multiply), and no multiply feeds an add, so FMA contraction cannot change a bit.
   **Bit-identical** to ``leaky_relu2_ref`` / ``leaky_relu2_backward_ref`` (NaN inputs give NaN
   outputs; NaN payload bits are not compared), also when ``y`` is stored in float32 for a
   half-precision ``x`` (what the reference gives under CUDA autocast, below).
2. ``_lr2_matmul_kernel`` with ``EPILOGUE=0`` (MLP up-projection): ``pre = x @ W_upᵀ (+ b_up)``
   accumulated in fp32, rounded once to the input dtype, then ``h = y(pre)`` in the epilogue. It
   stores ``h`` (consumed by the down-projection) and ``pre`` (saved for backward). Saving
   ``pre`` rather than a 1-bit sign mask costs one extra M×H write but keeps the backward exact:
   a mask would force recovering ``t = ±sqrt(h)``, which is not bit-exact. Against the unfused
   reference (matmul writes pre; activation reads pre, writes t; square reads t, writes h) the
   fusion removes two reads and one write of an M×H tensor.
3. ``_lr2_matmul_kernel`` with ``EPILOGUE=1`` (down-projection dgrad): ``dh = dout @ W_down``
   in fp32, rounded, then ``dpre = y'(pre)`` applied in the epilogue from the saved ``pre``
   tile, in one kernel.

Autocast (tested in eager and compiled, CPU bf16 here, CUDA fp16/bf16 under the ``cuda`` marker):
the ops do what their references do under the same ``torch.autocast``. ``leaky_relu2_mlp``
casts x, the weights and the biases to the autocast dtype (as ``F.linear`` does) and returns
that dtype; fp32 parameters get fp32 gradients through the casts. ``leaky_relu2`` keeps x's
dtype on CPU (neither ``leaky_relu`` nor ``square`` is on CPU autocast's lists) and returns
float32 under CUDA autocast (``square`` is ``pow``, which CUDA autocast runs in float32).

Error bound (tested): for the fused matmuls, max |ours − float64| ≤ 2 × max |torch − float64|
(+ 1e-6 absolute floor for fp32, where torch's own error can be ~0) for ``out`` and for
``dx``, ``dW_up``, ``dW_down`` (and the bias gradients), with torch computing the same function
in the same dtype. fp32 inputs use IEEE fp32 dots (no TF32), so the bound holds on GPUs as well.

Saved for backward by ``leaky_relu2_mlp``: ``x``, ``W_up``, ``W_down``, ``pre`` and ``h``
(the unfused autograd graph saves pre, t and h).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from ._backend import interpreting
from ._common import (
    FLOAT_DTYPES,
    AotSpec,
    cast_inputs,
    check_same_device,
    check_same_dtype,
    check_slope,
    check_tensor,
    dtype_names,
    register_autocast,
)

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
    tl.store(y_ptr + offs, (t * t).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lr2_grad(dy, x, slope):
    """dx = (dy * (2t)) then * slope where x <= 0; 2t is rounded to dy's dtype and dy·2t to x's,
    as autograd does through ``leaky_relu(x).square()`` (also when dy is float32 for a
    half-precision x: the square then ran in float32)."""
    t2 = (_leaky(x, slope).to(tl.float32) * 2.0).to(dy.dtype)
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
    a_ptr, b_ptr, pre_ptr, out_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    slope,
    EPILOGUE: tl.constexpr,  # 0: store pre = a @ b (+ bias) and h = y(pre); 1: y'(pre) * (a @ b)
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering of output tiles so consecutive programs reuse the same B columns.
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
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
    if HAS_BIAS:  # added to the fp32 accumulator: one rounding, as a linear with bias
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
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


def _launch_elementwise_fwd(x: torch.Tensor, slope: float, out_dtype: torch.dtype) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
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


def _launch_matmul(a, b_t_strides, b, m, n, k, pre, out, bias, slope, epilogue):
    cfg = _matmul_config(m)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _lr2_matmul_kernel[grid](
        a, b, pre, out, out if bias is None else bias.contiguous(), m, n, k,  # read at stride 1
        a.stride(0), a.stride(1), b_t_strides[0], b_t_strides[1], out.stride(0), out.stride(1),
        slope, EPILOGUE=epilogue, HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32,
        num_warps=warps, num_stages=stages, **cfg,
    )


def _launch_up(x2: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None, slope: float):
    m, k = x2.shape
    n = w_up.shape[0]
    pre = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    h = torch.empty_like(pre)
    if m and n:
        # B = W_upᵀ: element (k, n) lives at w_up[n, k]
        _launch_matmul(x2, (w_up.stride(1), w_up.stride(0)), w_up, m, n, k, pre, h, b_up,
                       slope, 0)
    return pre, h


def _launch_dgrad(dy2: torch.Tensor, w_down: torch.Tensor, pre: torch.Tensor, slope: float):
    m, k = dy2.shape
    n = w_down.shape[1]
    dpre = torch.empty_like(pre)
    if m and n:
        # B = W_down (D, H): element (k, n) at w_down[k, n]
        _launch_matmul(dy2, (w_down.stride(0), w_down.stride(1)), w_down, m, n, k, pre, dpre,
                       None, slope, 1)
    return dpre


# ---------------------------------------------------------------------------------------------
# Validation (inside the ops, after autocast: every surface goes through it)


def _check_elementwise(x, out_dtype) -> None:
    op = "leaky_relu2"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_same_device(op, x=x)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be None or {dtype_names(FLOAT_DTYPES)}, "
                        f"got {out_dtype}")


def _check_mlp(x, w_up, w_down, b_up, b_down) -> None:
    op = "leaky_relu2_mlp"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w_up", w_up, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "w_down", w_down, dtypes=FLOAT_DTYPES, ndim=2)
    given = dict(x=x, w_up=w_up, w_down=w_down)
    for name, b, size in (("b_up", b_up, w_up.shape[0]), ("b_down", b_down, w_down.shape[0])):
        if b is not None:
            check_tensor(op, name, b, dtypes=FLOAT_DTYPES, ndim=1)
            if b.shape[0] != size:
                raise ValueError(f"{op}: {name} has {b.shape[0]} entries, expected {size}")
            given[name] = b
    check_same_device(op, **given)
    check_same_dtype(op, **given)
    if x.dim() < 1 or x.shape[-1] != w_up.shape[1]:
        raise ValueError(
            f"{op}: x's last dim {tuple(x.shape)[-1:]} must equal w_up's input dim "
            f"{w_up.shape[1]} (w_up is (hidden, dim))"
        )
    if w_down.shape[1] != w_up.shape[0]:
        raise ValueError(
            f"{op}: w_down {tuple(w_down.shape)} must be (dim_out, hidden={w_up.shape[0]})"
        )


# ---------------------------------------------------------------------------------------------
# Custom ops: torch.compile sees opaque ops with fake implementations; autograd and autocast
# are registered on the ops themselves, so the function, the op and the module behave alike.


@torch.library.custom_op("proteus::leaky_relu2", mutates_args=())
def leaky_relu2_op(x: torch.Tensor, slope: float, out_dtype: torch.dtype | None = None
                   ) -> torch.Tensor:
    """``leaky_relu2`` as a custom op: ``y`` in ``out_dtype`` (default x's dtype)."""
    _check_elementwise(x, out_dtype)
    return _launch_elementwise_fwd(x, slope, out_dtype or x.dtype)


@leaky_relu2_op.register_fake
def _(x, slope, out_dtype=None):
    _check_elementwise(x, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.custom_op("proteus::leaky_relu2_backward", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, slope: float) -> torch.Tensor:
    return _launch_elementwise_bwd(dy, x, slope)


@_bwd_op.register_fake
def _(dy, x, slope):
    return x.new_empty(x.shape)


def _fwd_setup(ctx, inputs, output):
    x, slope = inputs[:2]
    ctx.save_for_backward(x)
    ctx.slope = slope


def _fwd_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _bwd_op(dy, x, ctx.slope), None, None


leaky_relu2_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)
# CPU autocast lists neither leaky_relu nor square: the op keeps x's dtype (no rule needed).
# CUDA autocast runs square (= pow) in float32: y comes out float32, t stays in x's dtype; an
# explicit out_dtype is kept (autocast's own rule for ops that take a dtype).
register_autocast("proteus::leaky_relu2", {
    "cuda": lambda names: lambda dev, dtype, args: [args[0], args[1], args[2] or torch.float32],
})


@torch.library.custom_op("proteus::leaky_relu2_mlp_dgrad", mutates_args=())
def _dgrad_op(dy2: torch.Tensor, w_down: torch.Tensor, pre: torch.Tensor, slope: float
              ) -> torch.Tensor:
    return _launch_dgrad(dy2, w_down, pre, slope)


@_dgrad_op.register_fake
def _(dy2, w_down, pre, slope):
    return torch.empty_like(pre)


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


@torch.library.custom_op("proteus::leaky_relu2_mlp", mutates_args=())
def leaky_relu2_mlp_op(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float,
    b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``leaky_relu2_mlp`` as a custom op: returns ``(out, pre, h)``; ``pre`` and ``h``
    ((rows, hidden)) are what its backward reads, most callers want ``[0]``."""
    _check_mlp(x, w_up, w_down, b_up, b_down)
    pre, h = _launch_up(x.reshape(-1, x.shape[-1]), w_up, b_up, slope)
    out = F.linear(h, w_down, b_down)
    return out.reshape(*x.shape[:-1], w_down.shape[0]), pre, h


@leaky_relu2_mlp_op.register_fake
def _(x, w_up, w_down, slope, b_up=None, b_down=None):
    _check_mlp(x, w_up, w_down, b_up, b_down)
    pre = x.new_empty((_rows(x), w_up.shape[0]))
    return x.new_empty((*x.shape[:-1], w_down.shape[0])), pre, torch.empty_like(pre)


def _mlp_setup(ctx, inputs, output):
    x, w_up, w_down, slope, b_up, b_down = (list(inputs) + [None, None])[:6]
    _, pre, h = output
    ctx.save_for_backward(x, w_up, w_down, pre, h)
    ctx.slope = slope
    ctx.biases = (b_up is not None, b_down is not None)


def _mlp_backward(ctx, dy, _dpre_unused, _dh_unused):
    x, w_up, w_down, pre, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
    dpre = _dgrad_op(dy2, w_down, pre, ctx.slope)
    dx = (dpre @ w_up).reshape(x.shape) if need[0] else None
    dw_up = dpre.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    dw_down = dy2.t() @ h if need[2] else None
    db_up = dpre.sum(0) if ctx.biases[0] and need[4] else None
    db_down = dy2.sum(0) if ctx.biases[1] and need[5] else None
    return dx, dw_up, dw_down, None, db_up, db_down


leaky_relu2_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)
register_autocast("proteus::leaky_relu2_mlp", {
    dev: cast_inputs("x", "w_up", "w_down", "b_up", "b_down") for dev in ("cpu", "cuda")
})


# ---------------------------------------------------------------------------------------------
# Public functions


def leaky_relu2(x: torch.Tensor, slope: float) -> torch.Tensor:
    """``(x if x > 0 else slope*x)**2`` elementwise, differentiable; bit-identical to
    :func:`leaky_relu2_ref`, under autocast too (see the module docstring)."""
    check_tensor("leaky_relu2", "x", x)
    return leaky_relu2_op(x, check_slope("leaky_relu2", slope))


def leaky_relu2_mlp(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float, *,
    b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(leaky_relu2(F.linear(x, w_up, b_up), slope), w_down, b_down)`` with the
    activation fused into both matmuls.

    x (..., D), w_up (H, D), w_down (D_out, H), biases (H,) and (D_out,) or None: one float
    dtype on one device (under autocast, the autocast dtype: they are cast as ``F.linear``
    casts them); differentiable in all of them. Error bound: see the module docstring.
    """
    op = "leaky_relu2_mlp"
    for name, t in (("x", x), ("w_up", w_up), ("w_down", w_down)):
        check_tensor(op, name, t)
    for name, b in (("b_up", b_up), ("b_down", b_down)):
        if b is not None:
            check_tensor(op, name, b)
    return leaky_relu2_mlp_op(x, w_up, w_down, check_slope(op, slope), b_up, b_down)[0]


# ---------------------------------------------------------------------------------------------
# Modules


class LeakyReLU2(nn.Module):
    """``leaky_relu2(x, slope)`` as a module (no parameters); ``slope`` is required."""

    def __init__(self, slope: float):
        super().__init__()
        self.slope = check_slope("LeakyReLU2", slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leaky_relu2(x, self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


class FusedLeakyReLU2MLP(nn.Module):
    """Drop-in MLP ``proj(leaky_relu2(fc(x), slope))`` on the fused kernels.

    ``fc`` and ``proj`` are ordinary ``nn.Linear`` layers (state_dict keys ``fc.weight``,
    ``proj.weight`` and, with ``bias=True``, ``fc.bias``, ``proj.bias``). ``slope`` is required.
    :meth:`from_linears` adopts a model's existing two Linear layers (the same modules and
    Parameters, not copies), so optimisers and tied references keep working.

    Composes with ``replace_linear_int6`` in either order: when ``fc`` or ``proj`` is a
    quantised layer (``Int6Linear``, which has no fp ``weight`` for the fused matmuls to read),
    or any other module put there after construction, the forward is
    ``proj(leaky_relu2(fc(x), slope))`` through each layer's own forward (the int6 kernel for
    the quantised ones, the elementwise LeakyReLU² kernel between them): the function the
    fused path computes on the dequantised weights.
    """

    def __init__(self, dim: int, hidden: int, *, slope: float, bias: bool = False,
                 dim_out: int | None = None, device=None, dtype=None):
        super().__init__()
        self.slope = check_slope("FusedLeakyReLU2MLP", slope)
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.fc = nn.Linear(dim, hidden, **kw)
        self.proj = nn.Linear(hidden, dim if dim_out is None else dim_out, **kw)

    @classmethod
    def from_linears(cls, fc: nn.Module, proj: nn.Module, *, slope: float
                     ) -> FusedLeakyReLU2MLP:
        """The MLP ``proj(leaky_relu2(fc(x), slope))`` around the given layers themselves:
        ``nn.Linear`` layers, or layers ``replace_linear_int6`` already quantised."""
        name = "FusedLeakyReLU2MLP.from_linears"
        for arg, lin in (("fc", fc), ("proj", proj)):
            if not (isinstance(lin, nn.Linear) or _is_quantized_linear(lin)):
                raise TypeError(f"{name}: {arg} must be an nn.Linear (or an Int6Linear), got "
                                f"{type(lin).__name__}")
        if proj.in_features != fc.out_features:
            raise ValueError(f"{name}: proj.in_features={proj.in_features} must equal "
                             f"fc.out_features={fc.out_features} (the hidden width)")
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.slope = check_slope(name, slope)
        mlp.fc, mlp.proj = fc, proj
        return mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.fc, nn.Linear) and isinstance(self.proj, nn.Linear):
            return leaky_relu2_mlp(x, self.fc.weight, self.proj.weight, self.slope,
                                   b_up=self.fc.bias, b_down=self.proj.bias)
        # a quantised (or otherwise swapped) layer: each layer's own forward
        return self.proj(leaky_relu2(self.fc(x), self.slope))

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


def _is_quantized_linear(layer: nn.Module) -> bool:
    """A packed-weight linear layer (``Int6Linear``): it marks itself ``quantized`` and has
    ``in_features``/``out_features`` (checked by attribute, so this file needs no import of the
    int6 op)."""
    return (isinstance(layer, nn.Module) and getattr(layer, "quantized", False) is True
            and hasattr(layer, "in_features") and hasattr(layer, "out_features"))


# ---------------------------------------------------------------------------------------------
# References (the specification)


def leaky_relu2_ref(x: torch.Tensor, slope: float) -> torch.Tensor:
    """``t = leaky_relu(x, slope)`` (in x's dtype), then ``t * t``."""
    return F.leaky_relu(x, slope).square()


def leaky_relu2_backward_ref(dy: torch.Tensor, x: torch.Tensor, slope: float) -> torch.Tensor:
    """``g = dy * (2t)``; ``dx = g`` where x > 0 else ``g * slope`` (what autograd computes)."""
    t = F.leaky_relu(x, slope)
    g = dy * (t * 2)
    return torch.where(x > 0, g, g * slope)


def leaky_relu2_mlp_ref(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float, *,
    b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused MLP: ``F.linear(leaky_relu2_ref(F.linear(x, w_up, b_up)), w_down, b_down)``
    (autograd gives the gradients)."""
    return F.linear(leaky_relu2_ref(F.linear(x, w_up, b_up), slope), w_down, b_down)


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
                (x, w_up, pre, pre, pre, m, hdim, d, d, 1, 1, d, hdim, 1, 0.9),
                dict(EPILOGUE=0, HAS_BIAS=False, IEEE=False, **mm), 8, 3, matrix=True),
        AotSpec("leaky_relu2.mlp_dgrad", f"M={m} {d}->{hdim} bf16", _lr2_matmul_kernel,
                (dy, w_down, pre, pre, pre, m, hdim, d, d, 1, hdim, 1, hdim, 1, 0.9),
                dict(EPILOGUE=1, HAS_BIAS=False, IEEE=False, **mm), 8, 3, matrix=True),
    ]
