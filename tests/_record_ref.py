"""An independent float64 formulation of the GPT with the pg-record components (for tests).

Written from the maths of docs/pg_record.md, not from proteus/model.py: RoPE as complex
multiplication, attention as an explicit masked softmax per head, XSA as a projection, the
block order of depth recurrence spelled out, the parallel lanes as two running sums. It reads
our state dict (names only) and returns the final normalised hidden states (B, T, d).
"""

from __future__ import annotations

import math

import torch

BOS = 1


def _rms(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _rope(x, dims, base, yarn_len):
    """x (B, T, H, hd): pairs (x[j], x[j + dims/2]), j < dims/2, as complex numbers turned by
    t * base^(-2j/dims) radians at position t."""
    if dims == 0:
        return x
    t_len, half = x.size(1), dims // 2
    if yarn_len and t_len > yarn_len and dims > 2:
        base = base * (t_len / yarn_len) ** (dims / (dims - 2))
    j = torch.arange(half, dtype=torch.float64)
    theta = torch.arange(t_len, dtype=torch.float64)[:, None] * base ** (-2 * j / dims)
    z = torch.complex(x[..., :half], x[..., half:dims]) * torch.polar(
        torch.ones_like(theta), theta)[None, :, None, :]
    return torch.cat((z.real, z.imag, x[..., dims:]), dim=-1)


def _attention(W, p, mc, x, idx, xsa):
    b, t, d = x.shape
    h, kv, hd = mc.num_heads, mc.num_kv_heads, d // mc.num_heads
    q = (x @ W[p + "c_q.weight"].T).view(b, t, h, hd)
    k = (x @ W[p + "c_k.weight"].T).view(b, t, kv, hd)
    v = (x @ W[p + "c_v.weight"].T).view(b, t, kv, hd)
    if mc.qk_norm:
        q, k = _rms(q), _rms(k)
    q = _rope(q, mc.rope_dims, mc.rope_base, mc.rope_yarn_len)
    k = _rope(k, mc.rope_dims, mc.rope_base, mc.rope_yarn_len)
    q = q * W[p + "q_gain"][None, None, :, None]
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None].expand(b, t, t)
    if mc.attn_docs:
        doc = (idx == BOS).cumsum(1)
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    y = torch.empty(b, t, h, hd, dtype=x.dtype)
    for head in range(h):
        g = head // (h // kv)
        s = torch.einsum("bid,bjd->bij", q[:, :, head], k[:, :, g]) / math.sqrt(hd)
        s = s.masked_fill(~allowed, float("-inf"))
        a = torch.softmax(s, -1) @ v[:, :, g]
        if xsa:  # remove the component along the position's own value vector
            u = v[:, :, g] / v[:, :, g].norm(dim=-1, keepdim=True)
            a = a - (a * u).sum(-1, keepdim=True) * u
        y[:, :, head] = a
    if mc.attn_gate_window:
        gw = W[p + "gate_w"]
        y = y * _sig(mc.attn_gate_scale * (x[..., : gw.size(1)] @ gw.T))[..., None]
    return y.reshape(b, t, d) @ W[p + "proj.weight"].T


def _mlp(W, p, mc, x):
    z = x @ W[p + "fc.weight"].T
    z = torch.where(z > 0, z, mc.mlp_slope * z)
    return (z * z) @ W[p + "proj.weight"].T


def _parts(W, i, mc, x, x0, idx):
    """(attention input after the x0 mix, attention out, the scaled attention branch fn)."""
    p = f"blocks.{i}."
    s = 1 / math.sqrt(i + 1) if mc.ln_scale else 1.0
    if mc.resid_mix:
        x = W[p + "resid_mix"][0] * x + W[p + "resid_mix"][1] * x0
    xsa = i >= mc.num_layers - mc.xsa_last_n
    att = W[p + "attn_scale"] * _attention(W, p + "attn.", mc, _rms(x) * s, idx, xsa)
    return x, att, s


def _block(W, i, mc, x, x0, idx):
    p = f"blocks.{i}."
    x, att, s = _parts(W, i, mc, x, x0, idx)
    x = x + att
    return x + W[p + "mlp_scale"] * _mlp(W, p + "mlp.", mc, _rms(x) * s)


def _lanes(W, i, mc, a, m, x0, idx):
    p = f"blocks.{i}."
    _, att, s = _parts(W, i, mc, a, x0, idx)
    mlp = W[p + "mlp_scale"] * _mlp(W, p + "mlp.", mc, _rms(m) * s)
    post, res = W["lane_post"][i], W["lane_resid"][i]
    return (res[0] * a + post[0, 0] * att + post[1, 0] * mlp,
            res[1] * m + post[0, 1] * att + post[1, 1] * mlp)


def order(mc, recurring):
    n = mc.num_layers
    seq = list(range(n))
    if recurring and mc.recur_extra:
        seq = []
        for i in range(n):
            seq.append(i)
            if i == mc.recur_last:
                for _ in range(mc.recur_extra):
                    seq += list(range(mc.recur_first, mc.recur_last + 1))
    return seq


def features(sd, mc, idx, recurring=True):
    W = {k: v.detach().double() for k, v in sd.items()}
    b, t = idx.shape
    x = W["tok_emb.weight"][idx]
    bos = (idx == BOS).double()[..., None]
    if mc.smear_gate and mc.smear_window:
        w, lam = W["smear.weight"][0], W["smear.lam"][0]
        new = x.clone()
        for pos in range(1, t):
            g = lam * _sig(x[:, pos, : w.numel()] @ w)
            new[:, pos] = x[:, pos] + g[:, None] * x[:, pos - 1] * (1 - bos[:, pos])
        x = new
    x = _rms(x)
    if mc.smear_gate and not mc.smear_window:
        g = _sig(W["smear.gate"])
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1) * (1 - bos)
        x = (1 - g) * x + g * prev
    x0 = x
    seq = order(mc, recurring)
    n_enc = len(seq) // 2 if mc.unet_skips else 0
    enc, dec = seq[:n_enc], seq[n_enc:]
    skips = []
    for i in enc:
        x = _block(W, i, mc, x, x0, idx)
        skips.append(x)
    a = m = None
    for j, i in enumerate(dec):
        lanes = bool(mc.parallel_from) and i >= mc.parallel_from
        if lanes and a is None:
            a, m = x, x
        if skips and j < W["skip_weights"].size(0):
            s = W["skip_weights"][j] * skips.pop()
            cur = a if lanes else x
            if mc.skip_gates:
                g = _sig(W["skip_gates"][j])
                cur = g * cur + (1 - g) * s
            else:
                cur = cur + s
            if lanes:
                a = cur
            else:
                x = cur
        if lanes:
            a, m = _lanes(W, i, mc, a, m, x0, idx)
        else:
            x = _block(W, i, mc, x, x0, idx)
    if a is not None:
        x = {"mean": (a + m) / 2, "attn": a, "mlp": m}[mc.parallel_final]
    return _rms(x)
