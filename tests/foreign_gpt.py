"""A small GPT written the way outside code is written (nanoGPT / flash-attn style), not by us.

The drop-in tests adopt PROTEUS ops into this model and compare it with itself unswapped. It is
deliberately ordinary: (B, T, C) activations, LayerNorm, learned positions, nn.Linear layers
(``bias`` optional), q/k/v viewed as flash-attn's (B, T, H, D) and handed to PyTorch's SDPA
(with GQA when ``n_kv_head < n_head``), and its own LeakyReLU(slope)² MLP. Each op lives on one
line of its own, which is the line a user would change:

* attention: ``CausalSelfAttention.attend`` (q, k, v in (B, T, H, D), returns (B, T, H, D));
* MLP: ``MLP.forward``;
* quantised linears: any ``nn.Linear`` of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 64
    mlp_mult: int = 3
    slope: float = 0.5  # the competition record's code uses LeakyReLU(0.5)²
    bias: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        kv = cfg.n_kv_head * self.head_dim
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_k = nn.Linear(cfg.n_embd, kv, bias=cfg.bias)
        self.c_v = nn.Linear(cfg.n_embd, kv, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention in flash-attn's layout: q (B, T, H, D), k/v (B, T, KV, D)."""
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True,
                                           enable_gqa=self.n_head != self.n_kv_head)
        return y.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q = self.c_q(x).view(b, t, self.n_head, self.head_dim)
        k = self.c_k(x).view(b, t, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(b, t, self.n_kv_head, self.head_dim)
        y = self.attend(q, k, v)
        return self.c_proj(y.reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.slope = cfg.slope
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_mult * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_mult * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.leaky_relu(self.c_fc(x), self.slope).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.normal_(m.bias, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        b, t = idx.size()
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
