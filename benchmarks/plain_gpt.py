"""A plain eager GPT of the original challenge design, the baseline for the training benchmark.

The challenge's starting script: tied embeddings, RMSNorm, causal GQA attention with q/k
RMS norm, full RoPE and a learnable q gain, ReLU² MLP, per-block residual mix with x0,
U-Net skips, logit soft-cap, trained with AdamW. None of PROTEUS's extras (BigramHash,
SmearGate, value embeddings, XSA, partial RoPE, layer-norm scale) and no fused ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms(x):
    return F.rms_norm(x, (x.size(-1),))


class _Attn(nn.Module):
    def __init__(self, d, h, kv):
        super().__init__()
        self.h, self.kv, self.hd = h, kv, d // h
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, kv * self.hd, bias=False)
        self.v = nn.Linear(d, kv * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.q_gain = nn.Parameter(torch.full((h,), 1.5))

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q = _rms(self.q(x).view(b, t, self.h, self.hd))
        k = _rms(self.k(x).view(b, t, self.kv, self.hd))
        v = self.v(x).view(b, t, self.kv, self.hd)

        def rope(u):
            u1, u2 = u.chunk(2, dim=-1)
            c, s = cos[None, :, None, :], sin[None, :, None, :]
            return torch.cat((u1 * c - u2 * s, u2 * c + u1 * s), dim=-1)

        q = rope(q) * self.q_gain[None, None, :, None]
        k = rope(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, d, h, kv, mult):
        super().__init__()
        self.attn = _Attn(d, h, kv)
        self.fc = nn.Linear(d, mult * d, bias=False)
        self.proj = nn.Linear(mult * d, d, bias=False)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))

    def forward(self, x, x0, cos, sin):
        x = self.mix[0] * x + self.mix[1] * x0
        x = x + self.attn_scale * self.attn(_rms(x), cos, sin)
        return x + self.mlp_scale * self.proj(torch.relu(self.fc(_rms(x))).square())


class PlainGPT(nn.Module):
    def __init__(self, vocab=1024, layers=4, d=128, h=4, kv=2, mult=3, softcap=30.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, h, kv, mult) for _ in range(layers))
        self.skip = nn.Parameter(torch.ones(layers // 2, d))
        self.softcap = softcap
        hd = d // h
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2) / hd),
                             persistent=False)

    def forward(self, idx, targets):
        t = idx.size(1)
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        x = x0 = _rms(self.emb(idx))
        n_enc, skips = len(self.blocks) // 2, []
        for i, blk in enumerate(self.blocks):
            if i >= n_enc and skips:
                x = x + self.skip[i - n_enc] * skips.pop()
            x = blk(x, x0, cos, sin)
            if i < n_enc:
                skips.append(x)
        z = F.linear(_rms(x), self.emb.weight)
        z = self.softcap * torch.tanh(z / self.softcap)
        return F.cross_entropy(z.view(-1, z.size(-1)).float(), targets.reshape(-1))
