"""The pg-record entry's weights, in our layout (and back).

The entry (``records/track_10min_16mb/2026-04-27_..._1.0611/train_gpt.py`` in the challenge
repository) keeps each kind of block matrix of all ``n`` blocks in one 3-D "bank"::

    qo_bank       (2n, d, d)      [i] = block i's query,  [n + i] = its output projection
    kv_bank       (2n, kv*hd, d)  [i] = block i's key,    [n + i] = its value
    mlp_up_bank   (n, hidden, d)  [i] = block i's up projection
    mlp_down_bank (n, d, hidden)  [i] = block i's down projection

Ours has one ``Linear`` per matrix (``blocks.i.attn.c_q.weight`` ...). The other tensors map one
to one by name (table in docs/pg_record.md). One map is not a copy: the entry rotates the RoPE
pair (x1, x2) of each head by -θ, we rotate it by +θ; swapping the two halves of the rotated
dims of every query and key head (rows ``[0, r/2)`` and ``[r/2, r)`` of each head's slice,
r = rope_dims) turns one into the other, and leaves q·k unchanged. So the same weights give
the same function, and the map is exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from proteus.config import ModelConfig, ProteusError
from proteus.model import GPT

# tensors with the same role and shape in both layouts: ours -> the entry's
_SAME = {"attn_scale": "attn_scale", "mlp_scale": "mlp_scale", "resid_mix": "resid_mix",
         "attn.q_gain": "attn.q_gain", "attn.gate_w": "attn.attn_gate_w"}
_TOP = {"tok_emb.weight": "tok_emb.weight", "skip_weights": "skip_weights",
        "skip_gates": "skip_gates", "lane_post": "parallel_post_lambdas",
        "lane_resid": "parallel_resid_lambdas", "smear.weight": "smear_gate.weight",
        "smear.lam": "smear_lambda", "lm_head.weight": "lm_head.weight"}


def _rope_swap(w: torch.Tensor, heads: int, rope_dims: int) -> torch.Tensor:
    """Rows of a q or k projection (heads*hd, d) with the two halves of each head's rotated
    dims exchanged (an involution: applying it twice is the identity)."""
    if rope_dims == 0:
        return w.clone()
    hd, half = w.size(0) // heads, rope_dims // 2
    perm = torch.arange(hd)
    perm[:half], perm[half:rope_dims] = torch.arange(half, rope_dims), torch.arange(half)
    rows = (torch.arange(heads)[:, None] * hd + perm[None]).reshape(-1)
    return w[rows.to(w.device)].clone()


def _bank_map(n: int) -> dict[str, tuple[str, int, bool]]:
    """Our matrix name -> (bank, index, RoPE rows swapped)."""
    out = {}
    for i in range(n):
        b = f"blocks.{i}."
        out[b + "attn.c_q.weight"] = ("qo_bank", i, True)
        out[b + "attn.proj.weight"] = ("qo_bank", n + i, False)
        out[b + "attn.c_k.weight"] = ("kv_bank", i, True)
        out[b + "attn.c_v.weight"] = ("kv_bank", n + i, False)
        out[b + "mlp.fc.weight"] = ("mlp_up_bank", i, False)
        out[b + "mlp.proj.weight"] = ("mlp_down_bank", i, False)
    return out


def _names(mc: ModelConfig) -> dict[str, str]:
    """Our non-bank tensor name -> the entry's, for the tensors this config has."""
    out = {}
    for i in range(mc.num_layers):
        for ours, theirs in _SAME.items():
            out[f"blocks.{i}.{ours}"] = f"blocks.{i}.{theirs}"
    out.update(_TOP)
    return out


def load_record_state_dict(sd: Mapping[str, torch.Tensor], mc: ModelConfig
                           ) -> dict[str, torch.Tensor]:
    """The entry's state dict ``sd`` as ours for model config ``mc`` (e.g. the ``pg-record``
    preset's), every tensor in fp32 or wider (the entry trains banks and scalars in bf16): load with
    ``GPT(mc).load_state_dict(...)``. A missing tensor or a shape that does not fit ``mc`` is
    refused with one line naming it."""
    from_meta = _expected(mc)
    out: dict[str, torch.Tensor] = {}
    bank = _bank_map(mc.num_layers)
    names = _names(mc)
    heads = {"qo_bank": mc.num_heads, "kv_bank": mc.num_kv_heads}
    for key, shape in from_meta.items():
        if key in bank:
            src, idx, swap = bank[key]
            t = _get(sd, src, key)
            if t.dim() != 3 or idx >= t.size(0):
                raise ProteusError(f"record state dict: {src} has shape {tuple(t.shape)}, "
                                   f"too few matrices for {mc.num_layers} blocks")
            w = t[idx]
            w = _rope_swap(w, heads[src], mc.rope_dims) if swap else w.clone()
        elif key in names:
            w = _get(sd, names[key], key).clone()
        else:
            raise ProteusError(f"record state dict: our tensor {key} has no counterpart in the "
                               "entry's layout (the config has a component the entry lacks: "
                               "BigramHash or value embeddings?)")
        if tuple(w.shape) != shape:
            raise ProteusError(f"record state dict: {key} would get shape {tuple(w.shape)}, "
                               f"the config needs {shape}")
        out[key] = w.to(torch.promote_types(w.dtype, torch.float32))
    return out


def to_record_state_dict(ours: Mapping[str, torch.Tensor], mc: ModelConfig
                         ) -> dict[str, torch.Tensor]:
    """Our state dict in the entry's layout (the inverse of :func:`load_record_state_dict`)."""
    n = mc.num_layers
    out: dict[str, torch.Tensor] = {}
    banks: dict[str, list] = {"qo_bank": [None] * 2 * n, "kv_bank": [None] * 2 * n,
                              "mlp_up_bank": [None] * n, "mlp_down_bank": [None] * n}
    heads = {"qo_bank": mc.num_heads, "kv_bank": mc.num_kv_heads}
    for key, (src, idx, swap) in _bank_map(n).items():
        w = ours[key]
        banks[src][idx] = _rope_swap(w, heads[src], mc.rope_dims) if swap else w
    out.update({k: torch.stack(v) for k, v in banks.items()})
    for key, theirs in _names(mc).items():
        if key in ours:
            out[theirs] = ours[key].clone()
    return out


def _get(sd: Mapping[str, torch.Tensor], name: str, ours: str) -> torch.Tensor:
    if name not in sd:
        raise ProteusError(f"record state dict: no tensor {name!r} (for our {ours}); is it a "
                           "state dict of the entry's GPT built with this config?")
    return sd[name]


def _expected(mc: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(mc).state_dict().items()}


def record_env(mc: ModelConfig) -> dict[str, str]:
    """The entry's environment variables that build its GPT with the model of ``mc`` (how the
    equivalence check builds both models from one config)."""
    return {
        "VOCAB_SIZE": str(mc.vocab_size), "NUM_LAYERS": str(mc.num_layers),
        "MODEL_DIM": str(mc.model_dim), "NUM_HEADS": str(mc.num_heads),
        "NUM_KV_HEADS": str(mc.num_kv_heads), "MLP_MULT": str(mc.mlp_mult),
        "XSA_LAST_N": str(mc.xsa_last_n), "QK_GAIN_INIT": str(mc.q_gain_init),
        "ROPE_DIMS": str(mc.rope_dims), "ROPE_BASE": str(mc.rope_base),
        "ROPE_YARN": str(int(mc.rope_yarn_len > 0)), "LOGIT_SOFTCAP": str(mc.logit_softcap),
        "TIE_EMBEDDINGS": str(int(mc.tie_embeddings)), "LN_SCALE": str(int(mc.ln_scale)),
        "SKIP_GATES_ENABLED": str(int(mc.skip_gates)),
        "PARALLEL_START_LAYER": str(mc.parallel_from),
        "PARALLEL_FINAL_LANE": mc.parallel_final,
        "NUM_LOOPS": str(mc.recur_extra), "LOOP_START": str(mc.recur_first),
        "LOOP_END": str(mc.recur_last),
        "SMEAR_GATE_ENABLED": str(int(mc.smear_gate and mc.smear_window > 0)),
        "GATE_WINDOW": str(mc.smear_window or mc.attn_gate_window or 12),
        "SPARSE_ATTN_GATE_ENABLED": str(int(mc.attn_gate_window > 0)),
        "SPARSE_ATTN_GATE_SCALE": str(mc.attn_gate_scale),
    }
