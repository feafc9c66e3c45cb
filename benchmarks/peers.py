"""Peers: what a kernel engineer already uses, as benchmark providers next to ours.

Each constructor returns something to call, or raises ``Unavailable`` with a one-line reason
(not installed; no kernel on this device for these inputs), which the benchmark turns into a
recorded skip. None of these packages is a dependency of PROTEUS; none is imported at module
load.

* attention: PyTorch SDPA with one backend forced (``sdpa-math``, ``sdpa-efficient``,
  ``sdpa-flash``, ``sdpa-cudnn``), each followed by the separate XSA post-op, which is exactly
  ``xsa_attention_ref`` run under ``torch.nn.attention.sdpa_kernel`` (where a backend takes no
  GQA, k/v are expanded to the query heads inside the timed call, as a user would); flash-attn
  2's ``flash_attn_func`` (``flash-attn``) and FA3's ``flash_attn_interface.flash_attn_func``
  (``fa3``), in their own (B, T, H, D) layout, followed by the record's XSA post-op written in
  that layout (``xsa_post_op_bthd``).
* LeakyReLU²: Liger-Kernel's ReLU² (``LigerReLUSquaredFunction``; Liger has no leaky variant,
  so it is checked against our reference at slope 0, the same function).
* softcapped cross-entropy: Liger-Kernel's fused linear cross-entropy with its ``softcap``
  (``liger_fused_linear_cross_entropy``): the output head's matmul, the cap and the loss in one
  chunked op, so it is timed against our head (``F.linear``, then our kernel) on the same x, W.
* int6 matmul: torchao's int8 and int4 weight-only linear (``Int8WeightOnlyConfig``,
  ``Int4WeightOnlyConfig``) quantising the dequantised int6 weights themselves (their own
  rounding: checked by relative error, see the benchmark).
* n-gram table: ``SortedCountsTable``, the sort-based counting the cache's numpy backend
  uses (np.unique, then binary search); the plain dictionary is the table's reference.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from proteus.kernels.xsa_attention import XSA_EPS, xsa_attention_ref


class Unavailable(Exception):
    """A peer that cannot run here; the message is the one-line reason."""


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001  (an ImportError, or a package broken on this host)
        msg = (str(e).strip().splitlines() or [""])[0][:120]
        raise Unavailable(f"{what} is not installed or does not import here ({module}: "
                          f"{type(e).__name__}: {msg})") from None


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------------------------------
# Attention

SDPA_BACKENDS = {"sdpa-math": "MATH", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}
ATTENTION_PEERS = (*SDPA_BACKENDS, "flash-attn", "fa3")


@dataclass
class AttentionPeer:
    """``fn(q, k, v)``: causal GQA attention + XSA in ``layout`` ("bhtd" or "bthd")."""

    fn: Callable
    layout: str
    note: str = ""

    def native(self, t: torch.Tensor) -> torch.Tensor:
        """A (B, heads, T, D) tensor in this peer's layout (a copy made before timing)."""
        return t if self.layout == "bhtd" else t.transpose(1, 2).contiguous()

    def bhtd(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.layout == "bhtd" else t.transpose(1, 2)


def xsa_post_op_bthd(o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The record's separate XSA step in flash-attn's layout: o (B, T, H, D), v (B, T, KV, D);
    remove from each head's output its component along its KV head's unit value (in fp32, or
    fp64 for fp64 inputs, as the reference)."""
    b, t, h, d = o.shape
    kv = v.shape[2]
    acc = torch.promote_types(o.dtype, torch.float32)
    u = F.normalize(v.to(acc), dim=-1, eps=XSA_EPS).unsqueeze(3)  # (B, T, KV, 1, D)
    o5 = o.to(acc).view(b, t, kv, h // kv, d)
    return (o5 - (o5 * u).sum(-1, keepdim=True) * u).view(b, t, h, d).to(o.dtype)


def _sdpa_peer(provider: str, q, k, v) -> AttentionPeer:
    attention = _import("torch.nn.attention", "torch.nn.attention (PyTorch >= 2.3)")
    backend = getattr(attention.SDPBackend, SDPA_BACKENDS[provider])

    def run(q, k, v, expand: bool):
        if expand:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        with attention.sdpa_kernel([backend]):
            return xsa_attention_ref(q, k, v, xsa=True)

    why = ""
    for expand in (False, True):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            try:
                run(q, k, v, expand)
            except RuntimeError as e:
                said = [str(w.message).strip().splitlines()[0] for w in caught]
                why = (said or [str(e).strip().splitlines()[0]])[0][:160]
                continue
        note = "k/v expanded to the query heads (no GQA in this backend)" if expand else ""
        return AttentionPeer(lambda q, k, v, e=expand: run(q, k, v, e), "bhtd", note)
    raise Unavailable(f"SDPA's {SDPA_BACKENDS[provider]} backend has no kernel here for "
                      f"{str(q.dtype).removeprefix('torch.')} q{tuple(q.shape)} on "
                      f"{q.device.type}: {why}")


def _flash_peer(module: str, what: str) -> AttentionPeer:
    func = _import(module, what).flash_attn_func
    if not torch.cuda.is_available():
        raise Unavailable(f"{what} needs a CUDA GPU")

    def run(q, k, v):
        o = func(q, k, v, causal=True)
        return xsa_post_op_bthd(o[0] if isinstance(o, tuple) else o, v)

    return AttentionPeer(run, "bthd", f"{what} {_version(module.split('_interface')[0])}")


def attention_peer(provider: str, q, k, v) -> AttentionPeer:
    """The peer ``provider`` of ATTENTION_PEERS for inputs q (B, H, T, D), k/v (B, KV, T, D)."""
    if provider in SDPA_BACKENDS:
        return _sdpa_peer(provider, q, k, v)
    if provider == "flash-attn":
        return _flash_peer("flash_attn", "flash-attn")
    if provider == "fa3":
        return _flash_peer("flash_attn_interface", "FlashAttention-3 (flash_attn_interface)")
    raise ValueError(f"attention_peer: unknown provider {provider!r}; one of {ATTENTION_PEERS}")


# ---------------------------------------------------------------------------------------------
# LeakyReLU²


def liger_relu_squared() -> Callable[[torch.Tensor], torch.Tensor]:
    """Liger-Kernel's ReLU² (``relu(x)**2``, differentiable): our op at slope 0."""
    mod = _import("liger_kernel.ops.relu_squared", "Liger-Kernel with its ReLU² op")
    apply = mod.LigerReLUSquaredFunction.apply

    def act(x: torch.Tensor) -> torch.Tensor:
        y = apply(x)  # some releases return (y, x) so that x is saved without a copy
        return y[0] if isinstance(y, tuple) else y

    return act


# ---------------------------------------------------------------------------------------------
# Softcapped cross-entropy


def liger_fused_linear_softcapped_ce() -> Callable[..., torch.Tensor]:
    """Liger-Kernel's fused linear cross-entropy with a soft-cap: ``fn(x, w, y, softcap)`` is
    the mean ``F.cross_entropy(softcap * tanh((x @ w.T) / softcap), y)``, differentiable in x
    and w. Releases without the ``softcap`` argument raise ``Unavailable``."""
    mod = _import("liger_kernel.transformers.functional",
                  "Liger-Kernel with its fused linear cross-entropy")
    fused = getattr(mod, "liger_fused_linear_cross_entropy", None)
    if fused is None or "softcap" not in inspect.signature(fused).parameters:
        raise Unavailable(f"Liger-Kernel {_version('liger_kernel')} has no fused linear "
                          "cross-entropy with a softcap argument")

    def run(x, w, y, softcap):
        out = fused(x, w, y, softcap=softcap)
        return out[0] if isinstance(out, tuple) else out  # some releases add the z-loss

    return run


# ---------------------------------------------------------------------------------------------
# int6 matmul

TORCHAO_CONFIGS = {"torchao-int8": "Int8WeightOnlyConfig", "torchao-int4": "Int4WeightOnlyConfig"}


def torchao_linear(provider: str, w: torch.Tensor) -> torch.nn.Module:
    """An ``nn.Linear`` holding ``w`` (N, K), quantised by torchao's weight-only ``provider``."""
    quant = _import("torchao.quantization", "torchao")
    name = TORCHAO_CONFIGS[provider]
    config = getattr(quant, name, None)
    if config is None:
        raise Unavailable(f"torchao {_version('torchao')} has no {name}")
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    try:
        quant.quantize_(lin, config(group_size=min(128, w.shape[1])) if "int4" in provider
                        else config())
    except Exception as e:  # noqa: BLE001  (kernels torchao lacks on this device/dtype)
        msg = (str(e).strip().splitlines() or [""])[0][:120]
        raise Unavailable(f"torchao {_version('torchao')} {name} cannot quantise here "
                          f"({w.device.type}, {str(w.dtype).removeprefix('torch.')}): "
                          f"{type(e).__name__}: {msg}") from None
    return lin


# ---------------------------------------------------------------------------------------------
# n-gram table


class SortedCountsTable:
    """The table's API over sorted unique keys and their counts in numpy arrays (the CPU path):
    insert merges the new keys in with one ``np.unique``, lookup is a binary search."""

    def __init__(self):
        self.keys = np.empty(0, dtype=np.int64)
        self.counts = np.empty(0, dtype=np.int64)

    def insert(self, keys: torch.Tensor) -> None:
        new = keys.cpu().numpy()
        merged, inverse = np.unique(np.concatenate([self.keys, new]), return_inverse=True)
        weights = np.concatenate([self.counts, np.ones(new.size, dtype=np.int64)])
        # float64 sums of integer counts are exact below 2**53
        counts = np.bincount(inverse, weights=weights, minlength=merged.size)
        self.keys, self.counts = merged, counts.astype(np.int64)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        want = keys.cpu().numpy()
        if not self.keys.size:
            return torch.zeros(want.size, dtype=torch.int32, device=keys.device)
        i = np.minimum(np.searchsorted(self.keys, want), self.keys.size - 1)
        out = np.where(self.keys[i] == want, self.counts[i], 0).astype(np.int32)
        return torch.from_numpy(out).to(keys.device)
