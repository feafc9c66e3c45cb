"""XSA attention: causal GQA flash attention with the exclusive-self-attention projection fused,
document masks (packed ``cu_seqlens`` or per-row document ids) and causal sliding windows.

Math, for query head ``h`` sharing KV head ``g(h) = h // (H / KV)`` (no copy of k/v: index map)::

    S = scale · Q_h K_gᵀ,   P = softmax(S over the keys row i may see),   A = P V_g
    XSA (optional):  u_i = v_i / max(‖v_i‖, ε)  (own token's value, ε = 1e-6)
                     s_i = A_i · u_i,            O_i = A_i − s_i u_i
    without XSA:     O = A

Row ``i`` may see key ``j`` iff ``lo_i ≤ j ≤ i`` with ``lo_i = max(start of i's document,
i − left)``: causal, within the document (documents are contiguous runs of positions, so "same
document" is "at or after the document's first position"), and within a window of ``left + 1``
keys (flash-attn's ``window_size=(left, 0)``; ``left = -1``: no window). The diagonal is always
visible, so no row is empty.

Work is proportional to what is unmasked: each query block's key loop runs from the key block
holding ``lo`` of its first row to its diagonal, and each key block's query loop (dK/dV) from
its diagonal to the last query that sees its last key (``min(end of that key's document − 1,
key + left)``). ``lo`` and that last query are non-decreasing in the position, so the keys a
query block sees form one contiguous range (and so do the queries that see a key block): the
loop bounds visit exactly the tiles holding at least one visible (query, key) pair — fully
masked tiles are never loaded, not computed and zeroed (tested by counting the tiles each
program visits against a brute-force count, ``mask_tiles``).

Forward: online softmax in base 2 (``exp2`` of ``S·log2 e``), one program per (query block,
batch·head); the XSA epilogue loads the query block's own value rows (the rows of the diagonal
block) and projects. Saved for backward: ``lse`` (base-2 log-sum-exp per row, fp32) and
``s`` (fp32 per row, XSA only), next to q, k, v, O and the document segments.

Backward (no T×T matrix is materialised):

1. ``_bwd_pre``: per query block, rebuild ``A = O + s u`` and push dO through the projection
   (``P_u = I − u uᵀ`` is symmetric)::

       dA = dO − (dO·u) u,    Δ_i = dA_i · A_i
       ∂L/∂u = −((dO·u) A + s dO),   dv_self = (∂L/∂u − (∂L/∂u · u) u) / ‖v‖   (‖v‖ > ε; else /ε)

2. ``_bwd_dkdv``: one program per (key block, batch·KV head) loops over the query heads of its
   group and the query blocks that see it: ``dV += Pᵀ dA``, ``dK += dSᵀ Q · scale`` with
   ``dS = P ⊙ (dA Vᵀ − Δ)``.
3. ``_bwd_dq``: one program per (query block, batch·head): ``dQ = dS K · scale``.

``dV = dV_attention + Σ_{heads of the group} dv_self``. Determinism: every output element is
accumulated by exactly one program in a fixed loop order and the group sum is a torch sum over
a fixed axis; there are no atomics, so the same inputs give the same bits run to run.

Error bound (tested, masked and unmasked): O, dQ, dK and dV are within 2 × the error of the
PyTorch reference in the same dtype, both measured against a float64 reference built from
explicitly masked attention, plus an absolute floor (1e-5 in fp32, 1e-6 in fp16/bf16) for
entries whose exact value is 0 and which torch happens to hit to 1e-15 (dq of a row whose
softmax has a single key: T = 1, window 1, a document of length 1). fp32 inputs use IEEE fp32
dots (no TF32).

Layouts, through strides (no copies): ``layout="bhtd"`` takes q (B, H, T, D) and k/v
(B, KV, T, D); ``"bthd"`` (flash-attn's) takes q (B, T, H, D) and k/v (B, T, KV, D); the packed
varlen form q (total_T, H, D), k/v (total_T, KV, D) is ``bthd`` with B = 1. Any view whose last
dimension has unit stride is read in place (transposes, slices of a fused qkv projection); the
output and the gradients are new contiguous tensors in the input's layout. A last dimension
with a stride other than 1 is copied first, as flash-attn does. H a multiple of KV, D in
{16, 32, 64, 128}, any T ≥ 1; float16/bfloat16/float32. Under ``torch.autocast`` q, k and v are
cast to the autocast dtype first, as PyTorch's ``scaled_dot_product_attention`` is.
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
    autocast_cast,
    cast_inputs,
    check_same_device,
    check_same_dtype,
    check_tensor,
    register_autocast,
)

XSA_EPS = 1e-6
LOG2E = 1.4426950408889634
SUPPORTED_D = (16, 32, 64, 128)
LAYOUTS = ("bhtd", "bthd")
_LAYOUT_SHAPES = {"bhtd": ("(B, H, T, D)", "(B, KV, T, D)"),
                  "bthd": ("(B, T, H, D)", "(B, T, KV, D)")}
MAX_ROW_ELEMENTS = 2**31  # per-batch-row offsets are int32 in the kernels

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
def _first_key(SEG_LO, b, rows, T, WIN, HAS_DOCS: tl.constexpr):
    """The first key each query row may see: max(its document's start, row - WIN, 0); 0 for
    the padding rows past T (so that they see some key and stay finite; they are not stored)."""
    lo = rows - WIN
    if HAS_DOCS:
        lo = tl.maximum(lo, tl.load(SEG_LO + b.to(tl.int64) * T + rows, mask=rows < T, other=0))
    return tl.where(rows < T, tl.maximum(lo, 0), 0)


@triton.jit
def _last_query(SEG_HI, b, keys, T, WIN, HAS_DOCS: tl.constexpr):
    """The last query that sees each key: min(its document's end - 1, key + WIN, T - 1); -1
    for the padding keys past T (no query sees them)."""
    hi = tl.minimum(keys + WIN, T - 1)
    if HAS_DOCS:
        hi = tl.minimum(hi, tl.load(SEG_HI + b.to(tl.int64) * T + keys, mask=keys < T,
                                    other=0) - 1)
    return tl.where(keys < T, hi, -1)


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, SX, SEG_LO, TILES,
    T, H, GROUP, WIN, qk_scale,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    XSA: tl.constexpr, HAS_DOCS: tl.constexpr, COUNT_TILES: tl.constexpr, EPS: tl.constexpr,
    IEEE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_base = K + b.to(tl.int64) * skb + g * skh
    v_base = V + b.to(tl.int64) * svb + g * svh
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=offs_m[:, None] < T, other=0.0)
    lo = _first_key(SEG_LO, b, offs_m, T, WIN, HAS_DOCS)
    # A finite start: a row may meet tiles that are wholly masked for it before its first
    # visible key (its block starts in an earlier document), and -inf - -inf would be NaN.
    m_i = tl.full((BLOCK_M,), -1.0e38, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    tiles = 0
    n_lo = (_first_key(SEG_LO, b, m0, T, WIN, HAS_DOCS) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)
    for n0 in range(n_lo, hi, BLOCK_N):
        keys = n0 + offs_n
        kt = tl.load(k_base + keys[None, :] * skt + offs_d[:, None], mask=keys[None, :] < T,
                     other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        # keys < T follows for the stored rows (i < T); padding rows may read zero keys.
        ok = (offs_m[:, None] >= keys[None, :]) & (keys[None, :] >= lo[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * svt + offs_d[None, :], mask=keys[:, None] < T,
                    other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        tiles += 1
    a = acc / l_i[:, None]
    row = bh.to(tl.int64) * T + offs_m
    tl.store(LSE + row, m_i + tl.log2(l_i), mask=offs_m < T)
    if XSA:
        u, _nrm = _own_unit_value(v_base, offs_m, offs_d, T, svt, EPS)
        sx = tl.sum(a * u, axis=1)
        a = a - sx[:, None] * u
        tl.store(SX + row, sx, mask=offs_m < T)
    tl.store(O + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             a.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    if COUNT_TILES:
        tl.store(TILES + bh * tl.num_programs(0) + pid_m, tiles)


@triton.jit
def _bwd_pre(
    O, DO, V, SX, DA, DELTA, DVX,
    T, H, GROUP,
    sob, soh, sot, svb, svh, svt,
    XSA: tl.constexpr, EPS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # O, dO, dA and the XSA dv buffer share one layout (all are allocated like O).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    off = b.to(tl.int64) * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    rows = offs_m[:, None] < T
    o = tl.load(O + off, mask=rows, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=rows, other=0.0).to(tl.float32)
    row = bh.to(tl.int64) * T + offs_m
    if XSA:
        u, nrm = _own_unit_value(V + b.to(tl.int64) * svb + g * svh, offs_m, offs_d, T, svt, EPS)
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
    Q, K, V, DA, LSE, DELTA, DK, DV, SEG_HI, TILES,
    T, H, KVH, GROUP, WIN, qk_scale, sm_scale,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb, sdh, sdt,
    HAS_DOCS: tl.constexpr, COUNT_TILES: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // KVH
    g = bg % KVH
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + b.to(tl.int64) * skb + g * skh + offs_n[:, None] * skt + offs_d[None, :],
                mask=offs_n[:, None] < T, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + g * svh + offs_n[:, None] * svt + offs_d[None, :],
                mask=offs_n[:, None] < T, other=0.0)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    tiles = 0
    # Query i sees key j iff j <= i <= last(j): the same mask as lo_i <= j <= i, with a
    # per-key bound loaded once instead of a per-query one loaded in every iteration.
    last = _last_query(SEG_HI, b, offs_n, T, WIN, HAS_DOCS)
    m_start = (n0 // BLOCK_M) * BLOCK_M
    m_end = tl.max(last, axis=0) + 1
    for j in range(0, GROUP):
        h = g * GROUP + j
        q_base = b.to(tl.int64) * sqb + h * sqh
        a_base = b.to(tl.int64) * sob + h * soh
        row_base = (b * H + h).to(tl.int64) * T
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = tl.load(Q + q_base + offs_m[:, None] * sqt + offs_d[None, :],
                        mask=offs_m[:, None] < T, other=0.0)
            da = tl.load(DA + a_base + offs_m[:, None] * sot + offs_d[None, :],
                         mask=offs_m[:, None] < T, other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < T, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            ok = (offs_m[:, None] >= offs_n[None, :]) & (offs_m[:, None] <= last[None, :])
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
            tiles += 1
    out = b.to(tl.int64) * sdb + g * sdh + offs_n[:, None] * sdt + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < T)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < T)
    if COUNT_TILES:
        tl.store(TILES + bg * tl.num_programs(0) + pid_n, tiles)


@triton.jit
def _bwd_dq(
    Q, K, V, DA, LSE, DELTA, DQ, SEG_LO, TILES,
    T, H, GROUP, WIN, qk_scale, sm_scale,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    HAS_DOCS: tl.constexpr, COUNT_TILES: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dA, dQ share O's layout.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    a_off = b.to(tl.int64) * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=offs_m[:, None] < T, other=0.0)
    da = tl.load(DA + a_off, mask=offs_m[:, None] < T, other=0.0)
    row = bh.to(tl.int64) * T + offs_m
    lse = tl.load(LSE + row, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + row, mask=offs_m < T, other=0.0)
    lo = _first_key(SEG_LO, b, offs_m, T, WIN, HAS_DOCS)
    k_base = K + b.to(tl.int64) * skb + g * skh
    v_base = V + b.to(tl.int64) * svb + g * svh
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    tiles = 0
    n_lo = (_first_key(SEG_LO, b, m0, T, WIN, HAS_DOCS) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)
    for n0 in range(n_lo, hi, BLOCK_N):
        keys = n0 + offs_n
        k = tl.load(k_base + keys[:, None] * skt + offs_d[None, :], mask=keys[:, None] < T,
                    other=0.0)
        v = tl.load(v_base + keys[:, None] * svt + offs_d[None, :], mask=keys[:, None] < T,
                    other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(da, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(da, tl.trans(v))
        # keys < T follows for the stored rows (i < T); padding rows may read zero keys.
        ok = (offs_m[:, None] >= keys[None, :]) & (keys[None, :] >= lo[:, None])
        p = tl.where(ok, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds, k.to(tl.float32), input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
        tiles += 1
    tl.store(DQ + a_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < T)
    if COUNT_TILES:
        tl.store(TILES + bh * tl.num_programs(0) + pid_m, tiles)


# ---------------------------------------------------------------------------------------------
# Launchers. Everything below works on logical (B, H, T, D) views of the caller's tensors.


def _blocks(d: int) -> dict:
    if interpreting():
        return dict(fwd=(64, 64, 4, 1), bwd=(64, 64, 4, 1))
    if d <= 64:
        return dict(fwd=(128, 64, 8, 3), bwd=(64, 64, 4, 2))
    return dict(fwd=(128, 64, 8, 2), bwd=(64, 64, 8, 2))


def _logical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The (B, heads, T, D) view of a tensor in ``layout`` (no copy)."""
    return x if layout == "bhtd" else x.transpose(1, 2)


def _bht(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _win(window: int, t: int) -> int:
    # "No window" is a window wider than the sequence: one code path, no branch in the kernel.
    return window if window >= 0 else t


def _seg_args(seg: torch.Tensor | None, dummy: torch.Tensor):
    return (seg[0], seg[1]) if seg is not None else (dummy, dummy)


def _launch_fwd(q, k, v, seg, scale, xsa, layout, window, tiles=None):
    ql, kl, vl = (_logical(x, layout) for x in (q, k, v))
    b, h, t, d = ql.shape
    kvh = kl.shape[1]
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    ol = _logical(o, layout)
    lse = torch.empty((b, h, t), device=q.device, dtype=torch.float32)
    sx = torch.empty((b, h, t) if xsa else (1,), device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = _blocks(d)["fwd"]
    seg_lo, _ = _seg_args(seg, lse)
    _attn_fwd[(triton.cdiv(t, bm), b * h)](
        ql, kl, vl, ol, lse, sx, seg_lo, lse if tiles is None else tiles,
        t, h, h // kvh, _win(window, t), scale * LOG2E,
        *_bht(ql), *_bht(kl), *_bht(vl), *_bht(ol),
        XSA=xsa, HAS_DOCS=seg is not None, COUNT_TILES=tiles is not None, EPS=XSA_EPS,
        IEEE=q.dtype == torch.float32, D=d, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages,
    )
    return o, lse, sx


def _launch_bwd(q, k, v, o, lse, sx, do, seg, scale, xsa, layout, window, tiles=None):
    """dq, dk, dv; ``tiles`` (optional) = (dkdv counts, dq counts) buffers for the tests."""
    if do.stride() != o.stride():
        # o, dO, dA, dQ and the XSA buffer share one set of strides (those of a new tensor
        # shaped like q); an incoming gradient in any other strides is copied into them once.
        do = torch.empty(o.shape, device=o.device, dtype=o.dtype).copy_(do)
    ql, kl, vl, ol, dol = (_logical(x, layout) for x in (q, k, v, o, do))
    b, h, t, d = ql.shape
    kvh = kl.shape[1]
    group = h // kvh
    ieee = q.dtype == torch.float32
    bm, bn, warps, stages = _blocks(d)["bwd"]
    da = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    dal, dql, dkl, dvl = (_logical(x, layout) for x in (da, dq, dk, dv))
    delta = torch.empty((b, h, t), device=q.device, dtype=torch.float32)
    dvx = torch.empty(q.shape if xsa else (1,), device=q.device, dtype=torch.float32)
    dvxl = _logical(dvx, layout) if xsa else dvx
    _bwd_pre[(triton.cdiv(t, bm), b * h)](
        ol, dol, vl, sx, dal, delta, dvxl, t, h, group, *_bht(ol), *_bht(vl),
        XSA=xsa, EPS=XSA_EPS, D=d, BLOCK_M=bm, num_warps=warps, num_stages=1,
    )
    seg_lo, seg_hi = _seg_args(seg, delta)
    win = _win(window, t)
    common = dict(HAS_DOCS=seg is not None, COUNT_TILES=tiles is not None, IEEE=ieee, D=d,
                  BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    strides = (*_bht(ql), *_bht(kl), *_bht(vl), *_bht(ol))
    _bwd_dkdv[(triton.cdiv(t, bn), b * kvh)](
        ql, kl, vl, dal, lse, delta, dkl, dvl, seg_hi,
        delta if tiles is None else tiles[0],
        t, h, kvh, group, win, scale * LOG2E, scale, *strides, *_bht(dkl), **common,
    )
    _bwd_dq[(triton.cdiv(t, bm), b * h)](
        ql, kl, vl, dal, lse, delta, dql, seg_lo, delta if tiles is None else tiles[1],
        t, h, group, win, scale * LOG2E, scale, *strides, **common,
    )
    if xsa:
        # Each head's projection gradient is rounded to v's dtype before the group sum, like
        # the attention part (which the kernel stores in that dtype): where the two cancel
        # exactly in exact arithmetic (T = 1, where O ≡ 0), they then cancel exactly here too.
        dvx = dvxl.to(v.dtype).float().unflatten(1, (kvh, group)).sum(2)
        dvl.copy_(dvl.float() + dvx)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Custom ops and autograd


def _stats_shape(q: torch.Tensor, layout: str) -> tuple[int, int, int]:
    b, h, t, _ = _logical(q, layout).shape
    return b, h, t


@torch.library.custom_op("proteus::xsa_attention", mutates_args=())
def xsa_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     seg: torch.Tensor | None, scale: float, xsa: bool, layout: str, window: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The registered custom op (``torch.ops.proteus.xsa_attention``, autograd and autocast
    attached): ``(o, lse, s)`` for inputs as :func:`xsa_attention` validates them; ``seg`` is
    the (2, B, T) int32 document start/end per position or None, ``window`` the left width
    (-1: none). Use :func:`xsa_attention` unless you need the op itself."""
    return _launch_fwd(q, k, v, seg, scale, xsa, layout, window)


@xsa_attention_op.register_fake
def _(q, k, v, seg, scale, xsa, layout, window):
    bht = _stats_shape(q, layout)
    stats = q.new_empty(bht, dtype=torch.float32)
    sx = q.new_empty(bht if xsa else (1,), dtype=torch.float32)
    return q.new_empty(q.shape), stats, sx


@torch.library.custom_op("proteus::xsa_attention_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            sx: torch.Tensor, do: torch.Tensor, seg: torch.Tensor | None, scale: float, xsa: bool,
            layout: str, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(q, k, v, o, lse, sx, do, seg, scale, xsa, layout, window)


@_bwd_op.register_fake
def _(q, k, v, o, lse, sx, do, seg, scale, xsa, layout, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, seg, scale, xsa, layout, window = inputs
    o, lse, sx = output
    ctx.save_for_backward(q, k, v, o, lse, sx, seg)
    ctx.args = (scale, xsa, layout, window)


def _backward(ctx, do, _dlse, _dsx):
    q, k, v, o, lse, sx, seg = ctx.saved_tensors
    dq, dk, dv = _bwd_op(q, k, v, o, lse, sx, do, seg, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


xsa_attention_op.register_autograd(_backward, setup_context=_setup)
# The raw op casts like SDPA under autocast too (the functions cast before validating).
register_autocast("proteus::xsa_attention", {dev: cast_inputs("q", "k", "v")
                                             for dev in ("cpu", "cuda")})


@torch.library.custom_op("proteus::xsa_varlen_segments", mutates_args=())
def _varlen_segments(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """(2, 1, total) int32: each position's document start and end, from validated cu_seqlens.
    The values are checked here, inside an op, so the check also runs under torch.compile."""
    _check_cu_seqlens_values(cu_seqlens, total, max_seqlen)
    pos = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    doc = torch.searchsorted(cu_seqlens, pos, right=True) - 1
    return torch.stack((cu_seqlens[doc], cu_seqlens[doc + 1])).unsqueeze(1)


@_varlen_segments.register_fake
def _(cu_seqlens, total, max_seqlen):
    return cu_seqlens.new_empty((2, 1, total))


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_cu_seqlens_values(cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    op = "xsa_attention_varlen"
    vals = cu.cpu().long()  # one copy (a sync on a GPU), then checks on the host
    if vals[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got {int(vals[0])}")
    lengths = vals.diff()
    bad = torch.nonzero(lengths < 0)
    if bad.numel():
        i = int(bad[0]) + 1
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got entry {i} = "
                         f"{int(vals[i])} after {int(vals[i - 1])}")
    if vals[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must end at total_T = {total} (q.shape[0]), got "
                         f"{int(vals[-1])}")
    longest = int(lengths.max())
    if longest > max_seqlen:
        raise ValueError(f"{op}: max_seqlen = {max_seqlen} is less than the longest document "
                         f"({longest} tokens)")


def window_left(op: str, window_size) -> int:
    """flash-attn's ``window_size=(left, right)`` for causal attention -> ``left`` (-1: none)."""
    ok = (isinstance(window_size, (tuple, list)) and len(window_size) == 2
          and all(isinstance(w, int) and not isinstance(w, bool) for w in window_size))
    if not ok:
        raise TypeError(f"{op}: window_size must be a pair of ints (left, right) as in "
                        f"flash-attn, got {window_size!r}")
    left, right = window_size
    if left < -1:
        raise ValueError(f"{op}: window_size[0] must be -1 (no window) or >= 0 (a causal window "
                         f"of left + 1 keys, so at least 1 key), got {left}")
    if right not in (-1, 0):
        raise ValueError(f"{op}: window_size[1] must be 0 (or -1) for causal attention, which "
                         f"never sees keys after the query, got {right}")
    return left


def _check_options(op: str, causal, layout) -> None:
    if not causal:
        raise ValueError(f"{op}: only causal attention is implemented (causal=True)")
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {', '.join(map(repr, LAYOUTS))} "
                         f"('bthd' is flash-attn's), got {layout!r}")


def _validate(op: str, q, k, v, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, ndim=4)
    check_same_device(op, q=q, k=k, v=v)
    check_same_dtype(op, q=q, k=k, v=v)
    qs, ks = _LAYOUT_SHAPES[layout]
    b, h, t, d = _logical(q, layout).shape
    kb, kvh, kt, kd = _logical(k, layout).shape
    expects = (f"layout={layout!r} expects q {qs} and k/v {ks} with the same B, T and D; "
               f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or (kb, kt, kd) != (b, t, d):
        raise ValueError(f"{op}: {expects}")
    if h % kvh:
        raise ValueError(f"{op}: H={h} query heads is not a multiple of KV={kvh} key/value heads "
                         f"({expects})")
    if d not in SUPPORTED_D:
        raise ValueError(f"{op}: head dim D={d} is not supported; use one of {SUPPORTED_D}")
    if t < 1:
        raise ValueError(f"{op}: sequence length must be >= 1, got T={t}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        # within a batch row the kernels index with int32 (only the row offset is int64)
        extent = sum((n - 1) * abs(st) for n, st in zip(x.shape[1:], x.stride()[1:], strict=True))
        if extent >= MAX_ROW_ELEMENTS:
            raise ValueError(f"{op}: {name} spans {extent + 1} elements within a batch row; at "
                             f"most {MAX_ROW_ELEMENTS} (int32 offsets): split the sequence")


def _autocast(q, k, v):
    """Cast to the autocast dtype when autocast is on, as ``scaled_dot_product_attention``
    is, before validation (the op's own autocast rule would cast only after it)."""
    dev = q.device.type if isinstance(q, torch.Tensor) else "cpu"
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        q, k, v = (autocast_cast(x, dev, dt) for x in (q, k, v))
    return q, k, v


def _unit_last_dim(x: torch.Tensor) -> torch.Tensor:
    # flash-attn does the same: only the head dimension must be contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


def _segments_from_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(2, B, T) int32: each position's document start and end (exclusive); a document is a
    run of equal ids."""
    b, t = doc_ids.shape
    pos = torch.arange(t, device=doc_ids.device, dtype=torch.int32).expand(b, t)
    first = torch.ones((b, 1), device=doc_ids.device, dtype=torch.bool)
    start = torch.cat((first, doc_ids[:, 1:] != doc_ids[:, :-1]), dim=1)
    end = torch.cat((start[:, 1:], first), dim=1)
    lo = torch.cummax(torch.where(start, pos, 0), dim=1).values
    hi = torch.where(end, pos + 1, t).flip(1).cummin(dim=1).values.flip(1)
    return torch.stack((lo, hi)).to(torch.int32)


def _check_doc_ids(op: str, doc_ids, q: torch.Tensor, layout: str) -> None:
    check_tensor(op, "doc_ids", doc_ids, ndim=2)
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise TypeError(f"{op}: doc_ids must be an integer tensor, got {doc_ids.dtype}")
    b, _, t, _ = _logical(q, layout).shape
    if tuple(doc_ids.shape) != (b, t):
        raise ValueError(f"{op}: doc_ids must be (B, T) = ({b}, {t}) for q {tuple(q.shape)} "
                         f"in layout={layout!r}, got {tuple(doc_ids.shape)}")
    if doc_ids.device != q.device:
        raise ValueError(f"{op}: doc_ids is on {doc_ids.device} but q is on {q.device}")


# ---------------------------------------------------------------------------------------------
# Public ops, module and references


def xsa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, xsa: bool = False,
    scale: float | None = None, layout: str = "bhtd", window_size: tuple[int, int] = (-1, 0),
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA flash attention, optionally with the XSA projection; differentiable.

    ``layout``: ``"bhtd"`` (q (B, H, T, D), k/v (B, KV, T, D)) or flash-attn's ``"bthd"``
    (q (B, T, H, D), k/v (B, T, KV, D)); views are read in place and the output has q's shape.
    ``window_size=(left, 0)``: each query sees at most its ``left + 1`` latest keys (-1: all).
    ``doc_ids`` (B, T) integers: a document is a run of equal ids (``doc_ids_from_bos(tokens)``
    gives them for streams whose documents start at BOS); queries see only their own document.
    ``scale`` defaults to 1/sqrt(D).
    """
    op = "xsa_attention"
    _check_options(op, causal, layout)
    left = window_left(op, window_size)
    q, k, v = _autocast(q, k, v)
    _validate(op, q, k, v, layout)
    seg = None
    if doc_ids is not None:
        _check_doc_ids(op, doc_ids, q, layout)
        seg = _segments_from_ids(doc_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _, _ = xsa_attention_op(_unit_last_dim(q), _unit_last_dim(k), _unit_last_dim(v), seg,
                               scale, bool(xsa), layout, left)
    return o


def _check_varlen(op: str, q, k, v, cu_seqlens, max_seqlen) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, ndim=3)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: expects packed q (total_T, H, D) and k/v (total_T, KV, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_tensor(op, "cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must hold num_docs + 1 >= 2 entries, got "
                         f"{cu_seqlens.numel()}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"{op}: max_seqlen must be an int >= 1, got {max_seqlen!r}")


def xsa_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, *, causal: bool = True, xsa: bool = False,
    window_size: tuple[int, int] = (-1, 0), scale: float | None = None,
) -> torch.Tensor:
    """Packed documents, flash-attn's varlen convention: q (total_T, H, D), k/v (total_T, KV, D),
    ``cu_seqlens`` int32 (num_docs + 1,) of document starts (0 first, total_T last,
    non-decreasing; an empty document is allowed), ``max_seqlen`` at least the longest
    document. Each query sees only the earlier keys of its own document (and of its window).
    Returns (total_T, H, D); differentiable."""
    op = "xsa_attention_varlen"
    _check_options(op, causal, "bthd")
    left = window_left(op, window_size)
    q, k, v = _autocast(q, k, v)
    _check_varlen(op, q, k, v, cu_seqlens, max_seqlen)
    q4, k4, v4 = q[None], k[None], v[None]
    _validate(op, q4, k4, v4, "bthd")
    seg = _varlen_segments(cu_seqlens, q.shape[0], max_seqlen)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _, _ = xsa_attention_op(_unit_last_dim(q4), _unit_last_dim(k4), _unit_last_dim(v4), seg,
                               scale, bool(xsa), "bthd", left)
    return o[0]


def _flash_attn_options(op, dropout_p, softcap, alibi_slopes, return_attn_probs):
    if dropout_p != 0.0:
        raise ValueError(f"{op}: dropout_p must be 0.0 (attention dropout is not implemented), "
                         f"got {dropout_p}")
    if softcap != 0.0:
        raise ValueError(f"{op}: softcap must be 0.0 (not implemented), got {softcap}")
    if alibi_slopes is not None:
        raise ValueError(f"{op}: alibi_slopes must be None (ALiBi is not implemented)")
    if return_attn_probs:
        raise ValueError(f"{op}: return_attn_probs=True is not supported")


def xsa_flash_attn_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
    softmax_scale: float | None = None, causal: bool = True,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes=None,
    deterministic: bool = False, return_attn_probs: bool = False, *, xsa: bool = False,
) -> torch.Tensor:
    """flash-attn's ``flash_attn_func`` signature (same positions and defaults except
    ``causal=True``) plus ``xsa=``: q (B, T, H, D), k/v (B, T, KV, D) -> (B, T, H, D).
    ``from proteus.kernels import xsa_flash_attn_func as flash_attn_func`` swaps it in.
    Always deterministic; dropout, softcap, ALiBi and returned probabilities are refused."""
    _flash_attn_options("xsa_flash_attn_func", dropout_p, softcap, alibi_slopes,
                        return_attn_probs)
    return xsa_attention(q, k, v, causal=causal, xsa=xsa, scale=softmax_scale, layout="bthd",
                         window_size=tuple(window_size))


def xsa_flash_attn_varlen_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
    softmax_scale: float | None = None, causal: bool = True,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes=None,
    deterministic: bool = False, return_attn_probs: bool = False, *, xsa: bool = False,
) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` signature plus ``xsa=``, for self-attention over
    packed documents: ``cu_seqlens_k`` must be ``cu_seqlens_q`` (the same tensor) and
    ``max_seqlen_k`` equal to ``max_seqlen_q``."""
    op = "xsa_flash_attn_varlen_func"
    _flash_attn_options(op, dropout_p, softcap, alibi_slopes, return_attn_probs)
    if cu_seqlens_k is not cu_seqlens_q or max_seqlen_k != max_seqlen_q:
        raise ValueError(f"{op}: only self-attention over one packing is supported: pass the "
                         "same cu_seqlens tensor and max_seqlen for q and k")
    return xsa_attention_varlen(q, k, v, cu_seqlens_q, max_seqlen_q, causal=causal, xsa=xsa,
                                window_size=tuple(window_size), scale=softmax_scale)


class XSAAttention(nn.Module):
    """Attention as a module: ``forward(q, k, v, doc_ids=None) -> output`` (no weights).

    ``causal`` (must be True), ``xsa``, ``scale`` (None: 1/sqrt(D)), ``layout`` ("bhtd" or
    flash-attn's "bthd") and ``window_size`` ((left, 0), flash-attn's convention) are fixed at
    construction and checked there; ``doc_ids`` (B, T) masks documents per call."""

    def __init__(self, *, causal: bool = True, xsa: bool = False, scale: float | None = None,
                 layout: str = "bhtd", window_size: tuple[int, int] = (-1, 0)):
        super().__init__()
        _check_options("XSAAttention", causal, layout)
        window_left("XSAAttention", window_size)
        self.causal, self.xsa, self.scale = causal, xsa, scale
        self.layout, self.window_size = layout, tuple(window_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return xsa_attention(q, k, v, causal=self.causal, xsa=self.xsa, scale=self.scale,
                             layout=self.layout, window_size=self.window_size, doc_ids=doc_ids)

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, xsa={self.xsa}, scale={self.scale}, "
                f"layout={self.layout!r}, window_size={self.window_size}")


def doc_ids_from_bos(tokens: torch.Tensor, bos_id: int = 1) -> torch.Tensor:
    """(B, T) document ids of token streams whose documents start with ``bos_id``: the number
    of BOS tokens at or before each position (tokens before the first BOS are document 0)."""
    check_tensor("doc_ids_from_bos", "tokens", tokens, ndim=2)
    return (tokens == bos_id).cumsum(dim=1, dtype=torch.int32)


def attention_mask(t: int, window: int = -1, doc_ids: torch.Tensor | None = None,
                   device=None) -> torch.Tensor:
    """The specification of the mask, explicitly: (B or 1, T, T) bool, True where query i may
    see key j — causal (j ≤ i), within the window (i − j ≤ left, ``window`` = left, -1: none)
    and in the same document (same run of ``doc_ids``)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    ok = j <= i
    if window >= 0:
        ok = ok & (i - j <= window)
    ok = ok[None]
    if doc_ids is not None:
        first = torch.ones_like(doc_ids[:, :1], dtype=torch.bool)
        run = torch.cat((first, doc_ids[:, 1:] != doc_ids[:, :-1]), dim=1).cumsum(1)
        ok = ok & (run[:, :, None] == run[:, None, :])
    return ok


def xsa_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, xsa: bool = False,
    scale: float | None = None, layout: str = "bhtd", window_size: tuple[int, int] = (-1, 0),
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The specification: SDPA (GQA) in the input dtype — ``is_causal`` without masks, the
    explicit boolean :func:`attention_mask` with them — then the XSA projection in fp32 (fp64
    for fp64 inputs). Same arguments and layouts as :func:`xsa_attention`."""
    _check_options("xsa_attention_ref", causal, layout)
    left = window_left("xsa_attention_ref", window_size)
    ql, kl, vl = (_logical(x, layout) for x in (q, k, v))
    gqa = ql.shape[1] != kl.shape[1]
    if left < 0 and doc_ids is None:
        a = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True, scale=scale,
                                           enable_gqa=gqa)
    else:
        mask = attention_mask(ql.shape[2], left, doc_ids, ql.device)[:, None]
        a = F.scaled_dot_product_attention(ql, kl, vl, attn_mask=mask, scale=scale,
                                           enable_gqa=gqa)
    if xsa:
        b, h, t, d = a.shape
        kvh = vl.shape[1]
        acc = torch.promote_types(a.dtype, torch.float32)
        u = F.normalize(vl.to(acc), dim=-1, eps=XSA_EPS).unsqueeze(2)  # (B, KV, 1, T, D)
        a5 = a.to(acc).reshape(b, kvh, h // kvh, t, d)
        a = (a5 - (a5 * u).sum(-1, keepdim=True) * u).view(b, h, t, d).to(a.dtype)
    return _logical(a, layout)


def xsa_attention_varlen_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, *, causal: bool = True, xsa: bool = False,
    window_size: tuple[int, int] = (-1, 0), scale: float | None = None,
) -> torch.Tensor:
    """The varlen specification: the packed stream as one row of :func:`xsa_attention_ref`
    whose document ids number the documents of ``cu_seqlens``."""
    lengths = cu_seqlens.diff().long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)
    o = xsa_attention_ref(q[None], k[None], v[None], causal=causal, xsa=xsa, scale=scale,
                          layout="bthd", window_size=window_size, doc_ids=ids[None])
    return o[0]


# ---------------------------------------------------------------------------------------------
# Work done under a mask: the tiles the loop bounds visit


def _tile_loops(seg: torch.Tensor | None, t: int, window: int, bm: int, bn: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' loop bounds, per batch row: the tiles each query block visits (forward and
    dQ) and each key block visits (dK/dV), (B, ceil(T/bm)) and (B, ceil(T/bn)); B = 1 without
    documents."""
    pos = torch.arange(t)[None]
    win = _win(window, t)
    lo, hi = (pos - win).clamp(min=0), (pos + win).clamp(max=t - 1)
    if seg is not None:
        lo = torch.maximum(lo, seg[0].long())
        hi = torch.minimum(hi, seg[1].long() - 1)
    m0 = torch.arange(0, t, bm)
    q_tiles = (torch.clamp(m0 + bm, max=t) - lo[:, m0] // bn * bn + bn - 1) // bn
    n0 = torch.arange(0, t, bn)
    m_end = hi[:, torch.clamp(n0 + bn, max=t) - 1] + 1
    k_tiles = (m_end - n0 // bm * bm + bm - 1) // bm
    return q_tiles, k_tiles


def mask_tiles(t: int, *, window: int = -1, doc_ids: torch.Tensor | None = None,
               block_m: int = 128, block_n: int = 64) -> dict:
    """Tiles the kernels visit per head for rows of length ``t`` (one row, or the rows of
    ``doc_ids``, summed), next to plain causal attention over as many rows at the same blocks:
    ``fwd`` (query blocks × key tiles; dQ's loop is the same at its blocks), ``dkdv`` (key
    blocks × query tiles) and ``causal_fwd``, ``causal_dkdv``. A forward tile is 2 matmuls of
    ``2·block_m·block_n·D`` FLOPs."""
    seg = _segments_from_ids(doc_ids) if doc_ids is not None else None
    rows = 1 if doc_ids is None else doc_ids.shape[0]
    q_tiles, k_tiles = _tile_loops(seg, t, window, block_m, block_n)
    cq, ck = _tile_loops(None, t, -1, block_m, block_n)
    return dict(fwd=int(q_tiles.sum()), dkdv=int(k_tiles.sum()), causal_fwd=rows * int(cq.sum()),
                causal_dkdv=rows * int(ck.sum()))
