"""The production launches of every kernel, as the sm_90 report compiles them.

Compiling a kernel ahead of time needs its ``@triton.jit`` function and the exact positional
arguments and constexprs its launcher passes, so this is the one module outside ``kernels/``
that reaches into the op modules' internals (the jit functions and launch helpers, by their
underscore names). The shapes are the record model's (per GPU of 8: 2048-token sequences,
model dim 512, MLP hidden 1536, 8 query / 4 KV heads of 64); CPU tensors of those shapes and
dtypes stand in for device ones. ``tests/test_sm90_report.py`` compiles every spec, so a launch
whose signature drifts from its kernel fails there.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import torch

# the op modules (``proteus.kernels.leaky_relu2`` as an attribute is the op function of the same
# name, which the package re-exports, so the modules are looked up by name)
lr2, xsa, i6, ng, sce = (importlib.import_module(f"proteus.kernels.{m}") for m in (
    "leaky_relu2", "xsa_attention", "int6_matmul", "ngram_table", "softcapped_ce"))


@dataclasses.dataclass
class AotSpec:
    """One production launch of one kernel, as the report compiles it."""

    kernel: str  # report row, e.g. "leaky_relu2.mlp_up_fwd"
    shape: str  # the production shape in words, e.g. "M=16384 K=512 N=1536 bf16"
    fn: Any  # the @triton.jit kernel (or its @autotune/@heuristics wrapper)
    args: tuple  # positional launch arguments, CPU tensors standing in for device ones
    kwargs: dict  # constexpr keyword arguments (BLOCK sizes ...)
    num_warps: int = 4
    num_stages: int = 3
    matrix: bool = False  # the hot path is a matrix product: wgmma is expected on sm_90


# the production launches (M = 2048 tokens × 8 sequences per GPU, 512 → 1536)
def leaky_relu2_specs() -> list[AotSpec]:
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
        AotSpec("leaky_relu2.fwd", f"n={m * hdim} bf16", lr2._lr2_fwd_kernel,
                (big, big, big.numel(), 0.9), dict(BLOCK=2048), 4, 3),
        AotSpec("leaky_relu2.bwd", f"n={m * hdim} bf16", lr2._lr2_bwd_kernel,
                (big, big, big, big.numel(), 0.9), dict(BLOCK=2048), 4, 3),
        AotSpec("leaky_relu2.mlp_up", shape, lr2._lr2_matmul_kernel,
                (x, w_up, pre, pre, pre, m, hdim, d, d, 1, 1, d, hdim, 1, 0.9),
                dict(EPILOGUE=0, HAS_BIAS=False, IEEE=False, **mm), 8, 3, matrix=True),
        AotSpec("leaky_relu2.mlp_dgrad", f"M={m} {d}->{hdim} bf16", lr2._lr2_matmul_kernel,
                (dy, w_down, pre, pre, pre, m, hdim, d, d, 1, hdim, 1, hdim, 1, 0.9),
                dict(EPILOGUE=1, HAS_BIAS=False, IEEE=False, **mm), 8, 3, matrix=True),
    ]


# B=8 (per-GPU share), H=8, KV=4, T=2048, D=64, bf16, XSA on; with and without
# document masks (and a window, a runtime value: the same compiled code for every width)
def xsa_attention_specs() -> list[AotSpec]:
    b, h, kvh, t, d = 8, 8, 4, 2048, 64
    bf = torch.bfloat16
    q = torch.empty((b, h, t, d), dtype=bf)
    k = torch.empty((b, kvh, t, d), dtype=bf)
    st = torch.empty((b, h, t), dtype=torch.float32)
    seg = torch.empty((b, t), dtype=torch.int32)
    dvx = torch.empty((b, h, t, d), dtype=torch.float32)
    qs, ks = xsa._bht(q), xsa._bht(k)
    scale = 1 / math.sqrt(d)
    bl = {"fwd": (128, 64, 8, 3), "bwd": (64, 64, 4, 2)}
    specs = []
    bm, bn, w, s = bl["bwd"]
    shape = f"B={b} H={h} KV={kvh} T={t} D={d} bf16 xsa"
    specs.append(AotSpec("xsa_attention.bwd_pre", shape, xsa._bwd_pre,
                         (q, q, k, st, q, st, dvx, t, h, 2, *qs, *ks),
                         dict(XSA=True, EPS=xsa.XSA_EPS, D=d, BLOCK_M=bm), w, 1))
    for docs in (False, True):
        name = "xsa_attention." + ("{}_docs" if docs else "{}")
        label = shape + (" docs+window" if docs else "")
        sl = seg if docs else st
        win = 1024 if docs else t
        mask = dict(HAS_DOCS=docs, COUNT_TILES=False)
        bm, bn, w, s = bl["fwd"]
        specs.append(AotSpec(name.format("fwd"), label, xsa._attn_fwd,
                             (q, k, k, q, st, st, sl, st, t, h, 2, win, scale * xsa.LOG2E,
                              *qs, *ks, *ks, *qs),
                             dict(XSA=True, **mask, EPS=xsa.XSA_EPS, IEEE=False, D=d, BLOCK_M=bm,
                                  BLOCK_N=bn), w, s, matrix=True))
        bm, bn, w, s = bl["bwd"]
        specs.append(AotSpec(name.format("bwd_dkdv"), label, xsa._bwd_dkdv,
                             (q, k, k, q, st, st, k, k, sl, st, t, h, kvh, 2, win,
                              scale * xsa.LOG2E, scale, *qs, *ks, *ks, *qs, *ks),
                             dict(**mask, IEEE=False, D=d, BLOCK_M=bm, BLOCK_N=bn), w, s,
                             matrix=True))
        specs.append(AotSpec(name.format("bwd_dq"), label, xsa._bwd_dq,
                             (q, k, k, q, st, st, q, sl, st, t, h, 2, win, scale * xsa.LOG2E, scale,
                              *qs, *ks, *ks, *qs),
                             dict(**mask, IEEE=False, D=d, BLOCK_M=bm, BLOCK_N=bn), w, s,
                             matrix=True))
    return specs


# decode (M = 16) and prefill (M = 16384) on the model's two MLP shapes; the dgrad
# (LoRA / test-time training through frozen int6 weights) at the prefill shape
def int6_matmul_specs() -> list[AotSpec]:
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
                f"int6_matmul.{name}", f"M={m} K={k} N={n} bf16", i6._int6_matmul_kernel,
                (x, w, s, y, y, m, n, g, k, n), dict(HAS_BIAS=False, IEEE=False, **cfg),
                warps, stages, matrix=m > 16,
            ))
        m = 16384
        dy = torch.empty((m, n), dtype=torch.bfloat16)
        dx = torch.empty((m, k), dtype=torch.bfloat16)
        specs.append(AotSpec(
            "int6_matmul.dgrad", f"M={m} K={k} N={n} bf16", i6._int6_dgrad_kernel,
            (dy, w, s, dx, m, n, g, n, k),
            dict(IEEE=False, BLOCK_M=128, BLOCK_N=64, BLOCK_G=32), 8, 3, matrix=True,
        ))
    return specs


def ngram_table_specs() -> list[AotSpec]:
    n, cap = 1 << 20, 1 << 24
    keys = torch.empty(n, dtype=torch.int64)
    incs = torch.empty(n, dtype=torch.int32)
    tkeys = torch.empty(cap, dtype=torch.int64)
    tcounts = torch.empty(cap, dtype=torch.int32)
    size = torch.empty(1, dtype=torch.int64)
    shape = f"{n} keys, capacity {cap}"
    return [
        AotSpec("ngram_table.insert", shape, ng._insert_kernel,
                (keys, incs, n, tkeys, tcounts, size, cap - 1), dict(BLOCK=1024), 4, 1),
        AotSpec("ngram_table.lookup", shape, ng._lookup_kernel,
                (keys, incs, n, tkeys, tcounts, cap - 1), dict(BLOCK=1024), 4, 1),
    ]


# the production launch (2048 tokens × 8 sequences per GPU, vocabulary 8192)
def softcapped_ce_specs() -> list[AotSpec]:
    n, v = 16384, 8192
    z = torch.empty((n, v), dtype=torch.bfloat16)
    y = torch.empty(n, dtype=torch.int64)
    row = torch.empty(n, dtype=torch.float32)
    shape = f"N={n} V={v} bf16"
    block = dict(ROWS=1, BLOCK_V=8192)
    return [
        AotSpec("softcapped_ce.fwd", shape, sce._sce_fwd_kernel,
                (z, y, row, row, n, v, v, 30.0, -100), block, 16, 3),
        AotSpec("softcapped_ce.bwd", shape, sce._sce_bwd_kernel,
                (row, z, y, row, z, n, v, v, v, 0, 30.0, -100), block, 16, 3),
    ]


# one entry per op module of kernels/ that has Triton kernels (tests/test_sm90_report.py
# checks none is missing)
SPECS = {
    "leaky_relu2": leaky_relu2_specs,
    "xsa_attention": xsa_attention_specs,
    "int6_matmul": int6_matmul_specs,
    "ngram_table": ngram_table_specs,
    "softcapped_ce": softcapped_ce_specs,
}


def all_specs() -> list[AotSpec]:
    return [spec for specs in SPECS.values() for spec in specs()]
