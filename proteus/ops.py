"""The model's hot ops behind one switch: ``ref`` (PyTorch) or ``triton`` (the fused kernels).

The model never imports a kernel directly; it asks :func:`get_ops` for a bundle and calls
``ops.mlp``/``ops.attention``. A kernel therefore drops in without touching model code, and
``--kernels ref|triton`` is the only switch. The reference functions are the ones that live
beside each kernel (``kernels/<op>.py``), so ``ref`` and the specification are the same code.

On a machine without a GPU, ``triton`` runs the kernels on Triton's interpreter (slow: for
tests and convergence checks on tiny shapes, never for speed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from proteus.kernels import (
    int6_matmul,
    int6_matmul_ref,
    leaky_relu2,
    leaky_relu2_mlp,
    leaky_relu2_mlp_ref,
    leaky_relu2_ref,
    softcapped_ce,
    xsa_attention,
    xsa_attention_ref,
)


@dataclass(frozen=True)
class Ops:
    name: str
    # y = leaky_relu2(x @ w_up.T, slope) @ w_down.T
    mlp: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    # y = leaky_relu2(x, slope), elementwise (used with quantised eval weights)
    leaky_relu2: Callable[[torch.Tensor, float], torch.Tensor]
    # o = causal GQA attention of q (B,H,T,D), k/v (B,KV,T,D), with the XSA projection if xsa
    attention: Callable[..., torch.Tensor]
    # y = x @ (Q*s).T from packed int6 weights (eval of a quantised artifact)
    int6_matmul: Callable[..., torch.Tensor]
    # mean CE of softcap*tanh(z/softcap) for logits z (N, V), fused; None in `ref`, where the
    # model's chunked head (model.head_cross_entropy) computes it without the (N, V) logits
    softcapped_ce: Callable[..., torch.Tensor] | None = None


_CACHE: dict[str, Ops] = {}


def get_ops(kind: str) -> Ops:
    """The op bundle for ``kind`` ('ref' or 'triton')."""
    if kind in _CACHE:
        return _CACHE[kind]
    if kind not in ("ref", "triton"):
        raise ValueError(f"kernels must be 'ref' or 'triton', got {kind!r}")
    if kind == "ref":
        ops = Ops("ref", leaky_relu2_mlp_ref, leaky_relu2_ref, xsa_attention_ref,
                  int6_matmul_ref)
    else:
        ops = Ops("triton", leaky_relu2_mlp, leaky_relu2, xsa_attention, int6_matmul,
                  softcapped_ce)
    _CACHE[kind] = ops
    return ops
