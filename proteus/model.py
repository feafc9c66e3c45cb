"""The GPT of the challenge's record submission, as plain ``nn.Module``s.

Every architectural choice is a :class:`~proteus.config.ModelConfig` flag whose default is the
record's. The two hot ops (the
LeakyReLU² MLP and the causal GQA attention with XSA) are called through an
:class:`~proteus.ops.Ops` bundle chosen by ``--kernels``; nothing here imports a kernel.

Data flow for tokens ``idx`` (B, T)::

    x = rms_norm(tok_emb[idx] + bigram(idx_prev, idx));  x = smear(x);  x0 = x
    first half of blocks:  x = block_i(x, x0);  push x            (U-Net encoder)
    second half:           x = x + w_j * pop();  x = block_j(x, x0)
    logits = softcap(rms_norm(x) @ tok_emb.T)

    block_i(x, x0):  x = m0 * x + m1 * x0                         (residual mix with x0)
                     x = x + a * attn(rms_norm(x) / sqrt(i+1))     (layer-norm scale)
                     x = x + b * mlp(rms_norm(x) / sqrt(i+1))

The pg-record entry's parts (docs/pg_record.md), each off unless its option is set: the
window SmearGate on the raw embedding, gated U-Net skips, a sparse per-head attention output
gate, depth recurrence (a span of blocks run again; :meth:`GPT.block_plan`), and a 2-lane
parallel decoder (:meth:`Block.forward_lanes`). Either smear never crosses a BOS.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from proteus.config import ModelConfig
from proteus.data import BOS_ID
from proteus.kernels import interpreting
from proteus.ops import Ops, get_ops


class _RMSNorm(torch.autograd.Function):
    """``F.rms_norm(x, (x.size(-1),))`` (eps = finfo(x.dtype).eps), with a two-line backward.

    ``y = x · r``, ``r = 1 / sqrt(mean(x²) + eps)``, computed in fp32 (fp64 for fp64) and
    returned in x's dtype; ``dx = r · (dy − y · mean(dy · y))``. PyTorch's own rms_norm backward
    on the CPU takes ~2x as long at this model's widths (32 and 128, measured); the function
    and its gradient are the same (tested against autograd in fp64).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        acc = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(acc.square().mean(-1, keepdim=True).add_(torch.finfo(x.dtype).eps))
        y = acc * r
        ctx.save_for_backward(y, r)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        y, r = ctx.saved_tensors
        d = dy.to(y.dtype)
        return (d - y * (d * y).mean(-1, keepdim=True)).mul_(r).to(dy.dtype)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMS norm over the last dim, no weight (see :class:`_RMSNorm`)."""
    return _RMSNorm.apply(x)


class Linear(nn.Linear):
    """Bias-free linear whose fp32 master weight is cast to the activation dtype (autocast-safe)."""

    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False):
        super().__init__(fan_in, fan_out, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """RoPE on the first ``dims`` of each head (partial RoPE), half-split rotation."""

    def __init__(self, dims: int, base: float, yarn_len: int = 0):
        super().__init__()
        self.dims, self.base, self.yarn_len = dims, base, yarn_len
        self.register_buffer("inv_freq", self._inv_freq(base), persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def _inv_freq(self, base: float) -> torch.Tensor:
        d = max(self.dims, 1)
        return 1.0 / (base ** (torch.arange(0, self.dims, 2, dtype=torch.float32) / d))

    def cos_sin(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (1, t, 1, dims/2), broadcastable over (B, T, heads, dims/2).
        With ``yarn_len`` and t > yarn_len the base is stretched to base·(t/L)^(d/(d−2)), so
        the frequencies depend on t (and the cache holds exactly t positions)."""
        stretch = self.yarn_len > 0 and t > self.yarn_len and self.dims > 2
        c = self._cache
        stale = c is None or c[1] != device or c[0] < t
        if not stale and self.yarn_len > 0:  # a stretched cache serves only its own length
            stale = c[0] != t if stretch else c[0] > self.yarn_len
        if stale:
            inv = self.inv_freq
            if stretch:
                inv = self._inv_freq(self.base * (t / self.yarn_len) ** (
                    self.dims / (self.dims - 2)))
            freqs = torch.outer(torch.arange(t, device=device, dtype=torch.float32),
                                inv.to(device))[None, :, None, :]
            self._cache = c = (t, device, freqs.cos(), freqs.sin())
        return c[2][:, :t], c[3][:, :t]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, heads, hd): rotate x[..., :dims], pass the rest through."""
        if self.dims == 0:
            return x
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return _Rotate.apply(x, cos, sin, self.dims)


def _rotate(x, cos, sin, dims: int) -> torch.Tensor:
    half = dims // 2
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


class _Rotate(torch.autograd.Function):
    """The half-split rotation of the first ``dims`` channels. Its gradient is the inverse
    rotation (the same with -sin) in one call, instead of autograd's per-slice zero-filled
    buffers and sums."""

    @staticmethod
    def forward(ctx, x, cos, sin, dims: int) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.dims = dims
        return _rotate(x, cos, sin, dims)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, -sin, ctx.dims), None, None, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, xsa: bool):
        super().__init__()
        d, h, kv, hd = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.h, self.kv, self.hd, self.xsa, self.qk_norm = h, kv, hd, xsa, cfg.qk_norm
        self.c_q = Linear(d, h * hd)
        self.c_k = Linear(d, kv * hd)
        self.c_v = Linear(d, kv * hd)
        self.proj = Linear(h * hd, d, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((h,), cfg.q_gain_init))
        # sparse output gate: head h's output * sigmoid(scale * gate_w[h] . x[:window]);
        # zero-initialised, so every head starts at half its output
        self.gate_scale = cfg.attn_gate_scale
        self.gate_w = (nn.Parameter(torch.zeros(h, cfg.attn_gate_window))
                       if cfg.attn_gate_window else None)
        self.fp32 = "auto"  # see GPT.set_attention_fp32

    def forward(self, x, rotary: Rotary, cos, sin, ops: Ops, ve: torch.Tensor | None = None,
                mask: dict | None = None):
        b, t, _ = x.shape
        h, kv, hd = self.h, self.kv, self.hd
        if getattr(self.c_q, "quantized", False):
            qkv = torch.cat((self.c_q(x), self.c_k(x), self.c_v(x)), dim=-1)
        else:  # one matmul for q, k and v (three parameters, so Muon sees three matrices)
            w = torch.cat((self.c_q.weight, self.c_k.weight, self.c_v.weight)).to(x.dtype)
            qkv = F.linear(x, w)
        qk, v = qkv.view(b, t, h + 2 * kv, hd).split((h + kv, kv), dim=2)
        if ve is not None:
            v = v + ve.view(b, t, kv, hd)
        if self.qk_norm:  # q and k share the head dim: one norm and one rotation for both
            qk = rms_norm(qk)
        qk = rotary.apply(qk, cos, sin)
        q, k = qk.split((h, kv), dim=2)
        q = q * self.q_gain.to(x.dtype)[None, None, :, None]
        # q, k, v stay (B, T, heads, D) views of the projection (flash-attn's layout): the
        # kernel reads them through their strides, no transposed copies (cpu-tiny step: same
        # speed as the copies, 0.999-1.004x, and the same loss bits).
        y = self._attend(q, k, v, ops, {"layout": "bthd", **(mask or {})})
        if self.gate_w is not None:
            w = self.gate_w.to(x.dtype)
            y = y * torch.sigmoid(self.gate_scale * F.linear(x[..., : w.size(1)], w))[..., None]
        return self.proj(y.reshape(b, t, h * hd))

    def _attend(self, q, k, v, ops: Ops, mask: dict) -> torch.Tensor:
        up = self.fp32 == "on" or (self.fp32 == "auto" and q.device.type == "cpu")
        if up and (q.dtype in (torch.bfloat16, torch.float16)
                   or torch.is_autocast_enabled(q.device.type)):
            with torch.autocast(q.device.type, enabled=False):
                y = ops.attention(q.float(), k.float(), v.float(), causal=True, xsa=self.xsa,
                                  **mask)
            return y.to(q.dtype)
        return ops.attention(q, k, v, causal=True, xsa=self.xsa, **mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.slope = cfg.mlp_slope
        self.fc = Linear(cfg.model_dim, cfg.mlp_hidden)
        self.proj = Linear(cfg.mlp_hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        if getattr(self.fc, "quantized", False):  # eval of an int6 artifact: packed weights
            return self.proj(ops.leaky_relu2(self.fc(x), self.slope))
        return ops.mlp(x, self.fc.weight.to(x.dtype), self.proj.weight.to(x.dtype), self.slope)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.resid_mix = (
            nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))
            if cfg.resid_mix else None
        )
        self.in_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0

    def forward(self, x, x0, rotary, cos, sin, ops: Ops, ve=None, mask: dict | None = None):
        if self.resid_mix is not None:
            m = self.resid_mix.to(x.dtype)
            x = m[0] * x + m[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(
            rms_norm(x) * self.in_scale, rotary, cos, sin, ops, ve, mask
        )
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.in_scale, ops)

    def forward_lanes(self, a, m, x0, post, resid, rotary, cos, sin, ops: Ops, ve=None,
                      mask: dict | None = None):
        """The parallel decoder's block: attention reads lane ``a`` (mixed with x0), the MLP
        reads lane ``m``; each lane keeps ``resid[lane]`` of itself and adds
        ``post[src, lane]`` of each output (src 0 = attention, 1 = MLP)."""
        read = a
        if self.resid_mix is not None:
            mix = self.resid_mix.to(a.dtype)
            read = mix[0] * a + mix[1] * x0
        att = self.attn_scale.to(a.dtype) * self.attn(rms_norm(read) * self.in_scale, rotary,
                                                      cos, sin, ops, ve, mask)
        mlp = self.mlp_scale.to(m.dtype) * self.mlp(rms_norm(m) * self.in_scale, ops)
        post, resid = post.to(a.dtype), resid.to(a.dtype)
        return (resid[0] * a + post[0, 0] * att + post[1, 0] * mlp,
                resid[1] * m + post[0, 1] * att + post[1, 1] * mlp)


class BigramHash(nn.Module):
    """Embedding of a hash of (previous token, token) into ``buckets`` rows, projected to width."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        # The table starts small but non-zero: with the projection zero-initialised, a zero
        # table would give both factors zero gradients forever.
        self.embed = nn.Embedding(buckets, dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = Linear(dim, model_dim, zero_init=True)

    def forward(self, idx: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """``starts`` (B, T) bool: positions that begin a document and so, like the first
        position, have no previous token."""
        prev = F.pad(idx[:, :-1], (1, 0), value=0)
        # The last bucket is reserved for the first position (it has no previous token).
        h = torch.bitwise_xor(prev * 36313, idx * 27191) % (self.buckets - 1)
        h[:, 0] = self.buckets - 1
        if starts is not None:
            h = torch.where(starts, self.buckets - 1, h)
        return self.proj(self.embed(h))


class SmearGate(nn.Module):
    """x_t <- (1 - g) * x_t + g * x_{t-1}, g = sigmoid(gate) per channel."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """``starts`` (B, T) bool: positions that begin a document mix in nothing, like the
        first position."""
        g = torch.sigmoid(self.gate.to(x.dtype))
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        if starts is not None:
            prev = prev.masked_fill(starts[..., None], 0.0)
        return x + g * (prev - x)


class WindowSmear(nn.Module):
    """x_t <- x_t + lam * sigmoid(w . x_t[:window]) * x_{t-1}: one scalar gate per token, read
    from the first ``window`` channels of the token itself (the pg-record entry's form, applied
    to the raw embedding). w and lam start at zero, so it starts as the identity."""

    def __init__(self, window: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, window))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """``starts`` (B, T) bool: positions that begin a document mix in nothing."""
        w = self.weight.to(x.dtype)
        g = self.lam.to(x.dtype) * torch.sigmoid(F.linear(x[..., : w.size(1)], w))
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        if starts is not None:
            prev = prev.masked_fill(starts[..., None], 0.0)
        return x + g * prev


class ValueEmbedding(nn.Module):
    """A token embedding added to v on selected blocks (one shared table, a gain per block)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = cfg.value_embed_set
        self.embed = nn.Embedding(cfg.vocab_size, cfg.value_embed_dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = Linear(cfg.value_embed_dim, cfg.num_kv_heads * cfg.head_dim, zero_init=True)
        self.scales = nn.Parameter(torch.ones(len(self.layers)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(idx))


HEAD_CHUNK_ROWS = 512  # at least this many rows per chunk (256 KB-2 MB of fp32 logits)
HEAD_MAX_CHUNKS = 16  # and at most this many chunks (bounds the launches on a GPU)


def _head_chunks(n: int) -> range:
    return range(0, n, max(HEAD_CHUNK_ROWS, -(-n // HEAD_MAX_CHUNKS)))


def _head_chunk(x, w, cap):
    """Logits of one chunk of rows in fp32 (fp64 for fp64 inputs), soft-capped:
    (capped logits, 1 - tanh² or None)."""
    z = F.linear(x, w).to(torch.promote_types(x.dtype, torch.float32))
    if cap <= 0:
        return z, None
    th = z.div_(cap).tanh_()
    return th * cap, th.mul_(th).neg_().add_(1.0)


def _head_loss(x, w, y, cap, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean loss over the chunks and, ``with_grad``, ∂L/∂z (N, V) in x's dtype."""
    n = x.size(0)
    g = torch.empty((n, w.size(0)), dtype=x.dtype, device=x.device) if with_grad else None
    total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
    chunks = _head_chunks(n)
    for s in chunks:
        e = min(n, s + chunks.step)
        zc, dcap = _head_chunk(x[s:e], w, cap)
        lse = torch.logsumexp(zc, dim=-1)
        yc = y[s:e, None]
        total += lse.sum() - zc.gather(-1, yc).sum()
        if g is not None:
            p = zc.sub_(lse[:, None]).exp_()  # softmax, in place
            p.scatter_add_(-1, yc, torch.full(yc.shape, -1.0, dtype=p.dtype, device=p.device))
            if dcap is not None:
                p.mul_(dcap)
            g[s:e] = p
    return total / n, g


class LinearSoftcapCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the output head, ``CE(cap · tanh((x Wᵀ) / cap), y)``, fused and
    chunked: the logits never exist as one (N, V) tensor.

    Same function as ``F.cross_entropy(softcap(F.linear(x, W).float()), y)`` (``cap <= 0``: no
    cap). The loss is a mean, so its gradient is known in the forward pass: each chunk of
    ``HEAD_CHUNK_ROWS`` rows or more (at most ``HEAD_MAX_CHUNKS`` chunks) computes its logits,
    log-sum-exp, loss and ``∂L/∂z = (softmax(zc) − onehot(y)) ⊙ (1 − tanh²) / N`` while the
    chunk is still in cache, and stores only that gradient (in the matmul dtype). The backward
    is two matmuls, ``dx = G W`` and ``dW = Gᵀ x``, scaled by the incoming gradient. The
    matmuls run in x's dtype (the caller casts to the autocast dtype); everything else in fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cap: float):
        loss, g = _head_loss(x, w, y, cap, with_grad=True)
        ctx.save_for_backward(x, w, g)
        ctx.n = x.size(0)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, g = ctx.saved_tensors
        scale = (grad / ctx.n).to(g.dtype)
        dx = (g @ w).mul_(scale) if ctx.needs_input_grad[0] else None
        dw = (g.t() @ x).mul_(scale) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def head_cross_entropy(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cap: float
                       ) -> torch.Tensor:
    """Mean cross-entropy (nats) of ``softcap(x Wᵀ)`` against ``y``; x (N, d), w (V, d).

    The matmuls run in the autocast dtype when autocast is on (as ``F.linear`` would), else in
    x's dtype; the logits, soft-cap and log-sum-exp in fp32. With gradients: one fused,
    chunked pass (:class:`LinearSoftcapCrossEntropy`); without, the same chunks, loss only.
    """
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(
        x.device.type) else x.dtype
    x, wd = x.to(dt), w.to(dt)
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or wd.requires_grad):
            return LinearSoftcapCrossEntropy.apply(x, wd, y, cap)
        return _head_loss(x, wd, y, cap, with_grad=False)[0]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: str = "ref"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.ops = get_ops(kernels)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=0.005)
        self.bigram = (
            BigramHash(cfg.bigram_buckets, cfg.bigram_dim, cfg.model_dim)
            if cfg.bigram_buckets else None
        )
        self.smear = None
        if cfg.smear_gate:
            self.smear = (WindowSmear(cfg.smear_window) if cfg.smear_window
                          else SmearGate(cfg.model_dim))
        self.ve = ValueEmbedding(cfg) if cfg.value_embed_set else None
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base, cfg.rope_yarn_len)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        if cfg.init_orthogonal and not self.tok_emb.weight.is_meta:
            for b in self.blocks:
                for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.fc):
                    nn.init.orthogonal_(lin.weight)
        # depth recurrence is part of the model: on unless training switches it off (before
        # train.recur_at_frac), so a saved model evaluates with it
        self.recurring = cfg.recur_extra > 0
        enc, dec = self.block_plan(self.recurring)
        n_skip = min(len(enc), len(dec))
        self.skip_weights = nn.Parameter(torch.ones(n_skip, cfg.model_dim)) if n_skip else None
        self.skip_gates = (nn.Parameter(torch.zeros(n_skip, cfg.model_dim))
                           if n_skip and cfg.skip_gates else None)
        # the parallel decoder's mixes, one set per block (the entry's layout): post[i, src,
        # lane] (src 0 = attention, 1 = MLP) and resid[i, lane]
        self.lane_post = self.lane_resid = None
        if cfg.parallel_from:
            self.lane_post = nn.Parameter(torch.ones(cfg.num_layers, 2, 2))
            self.lane_resid = nn.Parameter(torch.full((cfg.num_layers, 2), 1.1))
        self.lm_head = (
            None if cfg.tie_embeddings else Linear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        )

    def block_plan(self, recurring: bool) -> tuple[list[int], list[int]]:
        """The blocks the U-Net encoder and decoder run, in order. With recurrence on, blocks
        recur_first..recur_last run 1 + recur_extra times in a row; the sequence is split in
        half (the encoder gets the shorter half). Without U-Net skips everything is decoder."""
        c = self.cfg
        order = list(range(c.num_layers))
        if recurring and c.recur_extra:
            span = order[c.recur_first : c.recur_last + 1]
            order = order[: c.recur_first] + span * (1 + c.recur_extra) + order[
                c.recur_last + 1 :]
        n_enc = len(order) // 2 if c.unet_skips else 0
        return order[:n_enc], order[n_enc:]

    def set_recurrence(self, on: bool) -> None:
        """Depth recurrence on or off (training switches it on at train.recur_at_frac)."""
        self.recurring = bool(on) and self.cfg.recur_extra > 0

    def set_kernels(self, kernels: str) -> None:
        self.ops = get_ops(kernels)

    def set_attention_fp32(self, mode: str) -> None:
        """Attention precision when q/k/v arrive in bf16/fp16 (under autocast): ``on`` computes
        it in fp32 (inputs upcast, result cast back), ``off`` in the input dtype, ``auto`` (the
        default) is ``on`` for CPU tensors and ``off`` on a GPU. On the CPU, PyTorch's bf16
        attention backward is ~2.3x slower than its fp32 one (cpu-tiny shape, measured), so
        fp32 is both faster and more precise there; on a GPU bf16 is the fast path."""
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"attention fp32 mode must be auto, on or off, got {mode!r}")
        for block in self.blocks:
            block.attn.fp32 = mode

    def attention_mask(self, idx: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """The masking options the attention op gets for tokens ``idx`` (B, T) — a causal window
        (``attn_window``) and documents starting at BOS (``attn_docs``) — and, with documents,
        the (B, T) bool of document starts. Training and evaluation both go through here, so a
        model is scored with the masking it was trained with."""
        mask: dict = {}
        if self.cfg.attn_window:
            mask["window_size"] = (self.cfg.attn_window - 1, 0)
        if not self.cfg.attn_docs:
            return mask, None
        starts = idx == BOS_ID
        mask["doc_ids"] = starts.cumsum(dim=1, dtype=torch.int32)
        return mask, starts

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        z = self._raw_logits(idx)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(z / cap) if cap > 0 else z

    def _raw_logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self._features(idx)
        if self.lm_head is not None:  # a Linear, or an Int6Linear in an artifact's eval
            return self.lm_head(x).float()
        return F.linear(x, self.tok_emb.weight.to(x.dtype)).float()

    def _features(self, idx: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden states (B, T, d) that the output head reads."""
        ops = self.ops
        b, t = idx.shape
        mask, starts = self.attention_mask(idx)
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx, starts)
        # the smear never carries a document's last token into the next one's BOS, whether
        # or not attention is masked per document
        bos = idx == BOS_ID if self.smear is not None else None
        if isinstance(self.smear, WindowSmear):
            x = self.smear(x, bos)
        x = rms_norm(x)
        if isinstance(self.smear, SmearGate):
            x = self.smear(x, bos)
        x0 = x
        cos, sin = self.rotary.cos_sin(t, idx.device)
        ve_base = self.ve(idx) if self.ve is not None else None

        def run(i: int, *lanes):
            ve = None
            if ve_base is not None and i in self.ve.layers:
                ve = ve_base * self.ve.scales[self.ve.layers.index(i)].to(ve_base.dtype)
            if len(lanes) == 1:
                return self.blocks[i](lanes[0], x0, self.rotary, cos, sin, ops, ve, mask)
            return self.blocks[i].forward_lanes(*lanes, x0, self.lane_post[i],
                                                self.lane_resid[i], self.rotary, cos, sin,
                                                ops, ve, mask)

        enc, dec = self.block_plan(self.recurring)
        skips: list[torch.Tensor] = []
        for i in enc:
            x = run(i, x)
            skips.append(x)
        lanes = None
        for j, i in enumerate(dec):
            parallel = self.lane_post is not None and i >= self.cfg.parallel_from
            if parallel and lanes is None:
                lanes = (x, x)
            if skips and j < self.skip_weights.size(0):
                if parallel:
                    lanes = (self._add_skip(lanes[0], skips.pop(), j), lanes[1])
                else:
                    x = self._add_skip(x, skips.pop(), j)
            if parallel:
                lanes = run(i, *lanes)
            else:
                x = run(i, x)
        if lanes is not None:
            a, m = lanes
            final = self.cfg.parallel_final
            x = a if final == "attn" else m if final == "mlp" else 0.5 * (a + m)
        return rms_norm(x)

    def _add_skip(self, x: torch.Tensor, skip: torch.Tensor, j: int) -> torch.Tensor:
        """x + w_j * skip, or with skip gates lerp(w_j * skip, x, sigmoid(g_j))."""
        s = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + s
        return torch.lerp(s, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy (nats) over all positions if targets are given, else logits."""
        if targets is None:
            return self.logits(idx)
        y, cap = targets.reshape(-1), self.cfg.logit_softcap
        if self.lm_head is not None and getattr(self.lm_head, "quantized", False):
            return F.cross_entropy(self.logits(idx).view(y.numel(), -1), y)
        x = self._features(idx)
        x = x.reshape(-1, x.size(-1))
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        if self.ops.softcapped_ce is not None and cap > 0:  # the fused kernel on (N, V) logits
            return self.ops.softcapped_ce(F.linear(x, w.to(x.dtype)), y, cap)
        return head_cross_entropy(x, w, y, cap)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg, kernels: str | None = None) -> GPT:
    """The GPT of a :class:`~proteus.config.RunConfig`: its model, ``kernels`` (default: the
    config's) and its attention precision."""
    model = GPT(cfg.model, kernels or cfg.train.kernels)
    model.set_attention_fp32(cfg.train.attn_fp32)
    return model


def runs_interpreted_kernels(model: nn.Module) -> bool:
    """Whether ``model``'s forward launches Triton kernels on Triton's interpreter (``--kernels
    triton`` without a GPU), which keeps a launch's grid in globals: such forwards must not run
    side by side in Python threads (``proteus.device.map_one_thread``)."""
    return interpreting() and any(
        getattr(getattr(m, "ops", None), "name", "") == "triton" or getattr(m, "use_kernel", False)
        for m in model.modules())
