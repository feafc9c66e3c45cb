"""XSA attention: causal GQA flash attention with the exclusive-self-attention projection fused.

Math, for query head ``h`` sharing KV head ``g(h) = h // (H / KV)`` (no copy of k/v: index map)::

    S = scale · Q_h K_gᵀ  (causal: key j ≤ query i),   P = softmax(S),   A = P V_g
    XSA (optional):  u_i = v_i / max(‖v_i‖, ε)  (own token's value, ε = 1e-6)
                     s_i = A_i · u_i,            O_i = A_i − s_i u_i
    without XSA:     O = A

Forward: online softmax in base 2 (``exp2`` of ``S·log2 e``), one program per (query block,
batch·head); the XSA epilogue loads the query block's own value rows (the rows of the diagonal
block) and projects. Saved for backward: ``lse`` (base-2 log-sum-exp per row, fp32) and
``s`` (fp32 per row, XSA only), next to q, k, v and O.

Backward (no T×T matrix is materialised):

1. ``_bwd_pre``: per query block, rebuild ``A = O + s u`` and push dO through the projection
   (``P_u = I − u uᵀ`` is symmetric)::

       dA = dO − (dO·u) u,    Δ_i = dA_i · A_i
       ∂L/∂u = −((dO·u) A + s dO),   dv_self = (∂L/∂u − (∂L/∂u · u) u) / ‖v‖   (‖v‖ > ε; else /ε)

2. ``_bwd_dkdv``: one program per (key block, batch·KV head) loops over the query heads of its
   group and the query blocks at or after the diagonal: ``dV += Pᵀ dA``, ``dK += dSᵀ Q · scale``
   with ``dS = P ⊙ (dA Vᵀ − Δ)``.
3. ``_bwd_dq``: one program per (query block, batch·head): ``dQ = dS K · scale``.

``dV = dV_attention + Σ_{heads of the group} dv_self``. Determinism: every output element is
accumulated by exactly one program in a fixed loop order and the group sum is a torch sum over
a fixed axis; there are no atomics, so the same inputs give the same bits run to run.

Error bound (tested): O, dQ, dK and dV are within 2 × the error of the PyTorch reference in the
same dtype, both measured against a float64 reference, plus an absolute floor (1e-5 in fp32,
1e-6 in fp16/bf16) for entries whose exact value is 0 and which torch happens to hit to 1e-15
(dq at T = 1, where the softmax has a single key). fp32 inputs use IEEE fp32 dots (no TF32).

Shapes: q (B, H, T, D), k/v (B, KV, T, D), H a multiple of KV, D in {16, 32, 64, 128}, any T ≥ 1;
float16/bfloat16/float32. Inputs are made contiguous if they are not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import interpreting
from ._common import FLOAT_DTYPES, AotSpec, check_same_device, check_same_dtype, check_tensor

XSA_EPS = 1e-6
LOG2E = 1.4426950408889634
SUPPORTED_D = (16, 32, 64, 128)

# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _own_unit_value(v_base, offs_m, offs_d, T, stride_t, EPS: tl.constexpr):
    """u = v / max(|v|, EPS) for the rows' own tokens, plus |v| (fp32)."""
    vs = tl.load(v_base + offs_m[:, None] * stride_t + offs_d[None, :],
                 mask=offs_m[:, None] < T, other=0.0).to(tl.float32)
    nrm = tl.sqrt(tl.sum(vs * vs, axis=1))
    u = vs / tl.maximum(nrm, EPS)[:, None]
    return u, nrm


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, SX,
    T, H, GROUP, qk_scale,
    sqb, sqh, sqt, skb, skh, skt,
    XSA: tl.constexpr, EPS: tl.constexpr, IEEE: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q_base = Q + b.to(tl.int64) * sqb + h * sqh
    k_base = K + b.to(tl.int64) * skb + g * skh
    v_base = V + b.to(tl.int64) * skb + g * skh
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T,
                other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for n0 in range(0, hi, BLOCK_N):
        keys = n0 + offs_n
        kt = tl.load(k_base + keys[None, :] * skt + offs_d[:, None], mask=keys[None, :] < T,
                     other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        ok = (offs_m[:, None] >= keys[None, :]) & (keys[None, :] < T)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * skt + offs_d[None, :], mask=keys[:, None] < T,
                    other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    a = acc / l_i[:, None]
    row = bh.to(tl.int64) * T + offs_m
    tl.store(LSE + row, m_i + tl.log2(l_i), mask=offs_m < T)
    if XSA:
        u, _nrm = _own_unit_value(v_base, offs_m, offs_d, T, skt, EPS)
        sx = tl.sum(a * u, axis=1)
        a = a - sx[:, None] * u
        tl.store(SX + row, sx, mask=offs_m < T)
    tl.store(O + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
             a.to(O.dtype.element_ty), mask=offs_m[:, None] < T)


@triton.jit
def _bwd_pre(
    O, DO, V, SX, DA, DELTA, DVX,
    T, H, GROUP,
    sqb, sqh, sqt, skb, skh, skt,
    XSA: tl.constexpr, EPS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    off = b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    rows = offs_m[:, None] < T
    o = tl.load(O + off, mask=rows, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=rows, other=0.0).to(tl.float32)
    row = bh.to(tl.int64) * T + offs_m
    if XSA:
        u, nrm = _own_unit_value(V + b.to(tl.int64) * skb + g * skh, offs_m, offs_d, T, skt, EPS)
        sx = tl.load(SX + row, mask=offs_m < T, other=0.0)
        a = o + sx[:, None] * u
        dou = tl.sum(do * u, axis=1)
        da = do - dou[:, None] * u
        gu = -(dou[:, None] * a + sx[:, None] * do)
        tangential = gu - tl.sum(gu * u, axis=1)[:, None] * u
        gv = tl.where((nrm > EPS)[:, None], tangential, gu) / tl.maximum(nrm, EPS)[:, None]
        tl.store(DVX + off, gv, mask=rows)
    else:
        a = o
        da = do
    # Δ from the dA the dots will read (rounded to the storage dtype), so that for a row whose
    # softmax has one key dS = P ⊙ (dA·v − Δ) cancels exactly as it does in exact arithmetic.
    da = da.to(DA.dtype.element_ty)
    tl.store(DELTA + row, tl.sum(da.to(tl.float32) * a, axis=1), mask=offs_m < T)
    tl.store(DA + off, da, mask=rows)


@triton.jit
def _bwd_dkdv(
    Q, K, V, DA, LSE, DELTA, DK, DV,
    T, H, KVH, GROUP, qk_scale, sm_scale,
    sqb, sqh, sqt, skb, skh, skt,
    IEEE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // KVH
    g = bg % KVH
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_off = b.to(tl.int64) * skb + g * skh + offs_n[:, None] * skt + offs_d[None, :]
    k = tl.load(K + kv_off, mask=offs_n[:, None] < T, other=0.0)
    v = tl.load(V + kv_off, mask=offs_n[:, None] < T, other=0.0)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    m_start = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for j in range(0, GROUP):
        h = g * GROUP + j
        q_base = b.to(tl.int64) * sqb + h * sqh
        row_base = (b * H + h).to(tl.int64) * T
        for m0 in range(m_start, T, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q_off = q_base + offs_m[:, None] * sqt + offs_d[None, :]
            q = tl.load(Q + q_off, mask=offs_m[:, None] < T, other=0.0)
            da = tl.load(DA + q_off, mask=offs_m[:, None] < T, other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < T, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            ok = (offs_m[:, None] >= offs_n[None, :]) & (offs_m[:, None] < T) & (
                offs_n[None, :] < T)
            p = tl.where(ok, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
            if IEEE:
                dv += tl.dot(tl.trans(p), da.to(tl.float32), input_precision="ieee")
                dp = tl.dot(da, tl.trans(v), input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(p.to(da.dtype)), da)
                dp = tl.dot(da, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if IEEE:
                dk += tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee")
            else:
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < T)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < T)


@triton.jit
def _bwd_dq(
    Q, K, V, DA, LSE, DELTA, DQ,
    T, H, GROUP, qk_scale, sm_scale,
    sqb, sqh, sqt, skb, skh, skt,
    IEEE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q_off = b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    q = tl.load(Q + q_off, mask=offs_m[:, None] < T, other=0.0)
    da = tl.load(DA + q_off, mask=offs_m[:, None] < T, other=0.0)
    row = bh.to(tl.int64) * T + offs_m
    lse = tl.load(LSE + row, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + row, mask=offs_m < T, other=0.0)
    k_base = K + b.to(tl.int64) * skb + g * skh
    v_base = V + b.to(tl.int64) * skb + g * skh
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for n0 in range(0, hi, BLOCK_N):
        keys = n0 + offs_n
        kv_off = keys[:, None] * skt + offs_d[None, :]
        k = tl.load(k_base + kv_off, mask=keys[:, None] < T, other=0.0)
        v = tl.load(v_base + kv_off, mask=keys[:, None] < T, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(da, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(da, tl.trans(v))
        ok = (offs_m[:, None] >= keys[None, :]) & (keys[None, :] < T)
        p = tl.where(ok, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds, k.to(tl.float32), input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < T)


# ---------------------------------------------------------------------------------------------
# Launchers


def _blocks(d: int) -> dict:
    if interpreting():
        return dict(fwd=(64, 64, 4, 1), bwd=(64, 64, 4, 1))
    if d <= 64:
        return dict(fwd=(128, 64, 8, 3), bwd=(64, 64, 4, 2))
    return dict(fwd=(128, 64, 8, 2), bwd=(64, 64, 8, 2))


def _launch_fwd(q, k, v, scale, xsa):
    b, h, t, d = q.shape
    kvh = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty((b, h, t), device=q.device, dtype=torch.float32)
    sx = torch.empty((b, h, t) if xsa else (1,), device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = _blocks(d)["fwd"]
    grid = (triton.cdiv(t, bm), b * h)
    _attn_fwd[grid](
        q, k, v, o, lse, sx, t, h, h // kvh, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        XSA=xsa, EPS=XSA_EPS, IEEE=q.dtype == torch.float32, D=d, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages,
    )
    return o, lse, sx


def _launch_bwd(q, k, v, o, lse, sx, do, scale, xsa):
    b, h, t, d = q.shape
    kvh = k.shape[1]
    group = h // kvh
    ieee = q.dtype == torch.float32
    bm, bn, warps, stages = _blocks(d)["bwd"]
    da = torch.empty_like(q)
    delta = torch.empty((b, h, t), device=q.device, dtype=torch.float32)
    dvx = torch.empty((b, h, t, d) if xsa else (1,), device=q.device, dtype=torch.float32)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    _bwd_pre[(triton.cdiv(t, bm), b * h)](
        o, do, v, sx, da, delta, dvx, t, h, group, *strides,
        XSA=xsa, EPS=XSA_EPS, D=d, BLOCK_M=bm, num_warps=warps, num_stages=1,
    )
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _bwd_dkdv[(triton.cdiv(t, bn), b * kvh)](
        q, k, v, da, lse, delta, dk, dv, t, h, kvh, group, scale * LOG2E, scale, *strides,
        IEEE=ieee, D=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    dq = torch.empty_like(q)
    _bwd_dq[(triton.cdiv(t, bm), b * h)](
        q, k, v, da, lse, delta, dq, t, h, group, scale * LOG2E, scale, *strides,
        IEEE=ieee, D=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    if xsa:
        # Each head's projection gradient is rounded to v's dtype before the group sum, like
        # the attention part (which the kernel stores in that dtype): where the two cancel
        # exactly in exact arithmetic (T = 1, where O ≡ 0), they then cancel exactly here too.
        dvx = dvx.to(v.dtype).float().view(b, kvh, group, t, d).sum(2)
        dv = (dv.float() + dvx).to(v.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Custom ops and autograd


@torch.library.custom_op("proteus::xsa_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, xsa: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(q, k, v, scale, xsa)


@_fwd_op.register_fake
def _(q, k, v, scale, xsa):
    b, h, t, _ = q.shape
    stats = q.new_empty((b, h, t), dtype=torch.float32)
    sx = q.new_empty((b, h, t) if xsa else (1,), dtype=torch.float32)
    return torch.empty_like(q), stats, sx


@torch.library.custom_op("proteus::xsa_attention_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            sx: torch.Tensor, do: torch.Tensor, scale: float, xsa: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(q, k, v, o, lse, sx, do, scale, xsa)


@_bwd_op.register_fake
def _(q, k, v, o, lse, sx, do, scale, xsa):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, scale, xsa = inputs
    o, lse, sx = output
    ctx.save_for_backward(q, k, v, o, lse, sx)
    ctx.scale, ctx.xsa = scale, xsa


def _backward(ctx, do, _dlse, _dsx):
    q, k, v, o, lse, sx = ctx.saved_tensors
    dq, dk, dv = _bwd_op(q, k, v, o, lse, sx, do.contiguous(), ctx.scale, ctx.xsa)
    return dq, dk, dv, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# Public op and reference


def _validate(q, k, v, causal) -> None:
    op = "xsa_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, ndim=4)
    check_same_device(op, q=q, k=k, v=v)
    check_same_dtype(op, q=q, k=k, v=v)
    b, h, t, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise ValueError(
            f"{op}: k/v {tuple(k.shape)} must be (B={b}, KV, T={t}, D={d}) to match q "
            f"{tuple(q.shape)}"
        )
    if h % k.shape[1]:
        raise ValueError(
            f"{op}: H={h} query heads is not a multiple of KV={k.shape[1]} key/value heads"
        )
    if d not in SUPPORTED_D:
        raise ValueError(f"{op}: head dim D={d} is not supported; use one of {SUPPORTED_D}")
    if t < 1:
        raise ValueError(f"{op}: sequence length must be >= 1, got T={t}")
    if not causal:
        raise ValueError(f"{op}: only causal attention is implemented (causal=True)")


def xsa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, xsa: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal GQA flash attention, optionally with the XSA projection; differentiable."""
    _validate(q, k, v, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _, _ = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), scale, bool(xsa))
    return o


def xsa_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, xsa: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The specification: SDPA (GQA) in the input dtype, then the XSA projection in fp32 (fp64
    for fp64 inputs)."""
    a = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    if not xsa:
        return a
    b, h, t, d = a.shape
    kvh = v.shape[1]
    acc = torch.promote_types(a.dtype, torch.float32)
    u = F.normalize(v.to(acc), dim=-1, eps=XSA_EPS).unsqueeze(2)  # (B, KV, 1, T, D)
    a5 = a.to(acc).view(b, kvh, h // kvh, t, d)
    return (a5 - (a5 * u).sum(-1, keepdim=True) * u).view(b, h, t, d).to(a.dtype)


# ---------------------------------------------------------------------------------------------
# sm_90 report: B=8 (per-GPU share), H=8, KV=4, T=2048, D=64, bf16, XSA on


def sm90_specs():
    b, h, kvh, t, d = 8, 8, 4, 2048, 64
    bf = torch.bfloat16
    q = torch.empty((b, h, t, d), dtype=bf)
    k = torch.empty((b, kvh, t, d), dtype=bf)
    st = torch.empty((b, h, t), dtype=torch.float32)
    dvx = torch.empty((b, h, t, d), dtype=torch.float32)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    shape = f"B={b} H={h} KV={kvh} T={t} D={d} bf16 xsa"
    bl = {"fwd": (128, 64, 8, 3), "bwd": (64, 64, 4, 2)}
    scale = 1 / math.sqrt(d)
    bm, bn, w, s = bl["fwd"]
    fwd = AotSpec("xsa_attention.fwd", shape, _attn_fwd,
                  (q, k, k, q, st, st, t, h, 2, scale * LOG2E, *strides),
                  dict(XSA=True, EPS=XSA_EPS, IEEE=False, D=d, BLOCK_M=bm, BLOCK_N=bn), w, s,
                  matrix=True)
    bm, bn, w, s = bl["bwd"]
    pre = AotSpec("xsa_attention.bwd_pre", shape, _bwd_pre,
                  (q, q, k, st, q, st, dvx, t, h, 2, *strides),
                  dict(XSA=True, EPS=XSA_EPS, D=d, BLOCK_M=bm), w, 1)
    dkdv = AotSpec("xsa_attention.bwd_dkdv", shape, _bwd_dkdv,
                   (q, k, k, q, st, st, k, k, t, h, kvh, 2, scale * LOG2E, scale, *strides),
                   dict(IEEE=False, D=d, BLOCK_M=bm, BLOCK_N=bn), w, s, matrix=True)
    dq = AotSpec("xsa_attention.bwd_dq", shape, _bwd_dq,
                 (q, k, k, q, st, st, q, t, h, 2, scale * LOG2E, scale, *strides),
                 dict(IEEE=False, D=d, BLOCK_M=bm, BLOCK_N=bn), w, s, matrix=True)
    return [fwd, pre, dkdv, dq]
