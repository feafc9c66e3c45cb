"""An honest n-gram eval cache: the normalised blend of the model with exact counts.

Distribution (the model as the base, then orders 2..N over the whole history from the lowest
up, then orders 2..N over the current document alone)::

    p_1(v) = p_model(v | x_<t)
    p_n(v) = (1 - λ_n) p_{n-1}(v) + λ_n count_n(ctx, v) / ctx_n                 n = 2 .. N
    λ_n    = weight · ctx_n / (ctx_n + k_n · max(types_n, 1)^a_n)      (0 < weight <= 1)
             (λ_n = 0 when ctx_n = 0)

and the same recursion continues with the document-level counts (``DocCounts``: only positions
after the last BOS of x_<t) and their own parameters (``doc_weight``, ``doc_k``, ``doc_a``).
Every step is a convex combination of two distributions over the whole vocabulary, so the
result is non-negative and sums to 1 by construction; equivalently
``p = (1-λ) p_model + λ p_cache`` with ``λ = 1 - Π (1 - λ_j)`` and p_cache a normalised mixture
of the count distributions. λ grows with how often the context was seen and shrinks with how
many different tokens followed it (a context that was always followed by the same token is
trusted most); it depends on the context's counts only, never on the target (the document of
t is decided by x_<t: a BOS at t itself changes nothing at t). The document-level counts add
recency: a phrase repeated within the current document is trusted more than one seen somewhere
in the history. The 2 + 2·2·(N-1) parameters are fitted by ``fit_cache_params`` (``proteus
tune-cache``, ``proteus/eval/fit.py``: L-BFGS on the bits per byte, counts fixed) on the scores
of training tokens the model never trained on, never on validation tokens. The shipped values
(``NgramConfig``'s defaults) are that command's output for the cpu-tiny model trained 3,000
steps without training shard 000001, fitted on that shard; its record, with what it was fitted
on, is ``docs/cache_params_cpu_tiny.json``.

The counts come from ``proteus/eval/counts.py``; ``cache_distribution`` is the reference: the
whole distribution at one position, counted by direct scans of x_<t (what the audit compares
the fast path with).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from proteus.data import BOS_ID
from proteus.eval.counts import _check_tokens, _counts
from proteus.eval.stream_counts import mix_numpy, stream_counts
from proteus.kernels import MAX_ORDER, MAX_VOCAB_BITS, VOCAB_BITS, id_bits, max_order


@functools.lru_cache(maxsize=8)
def _pow_table(k: float, a: float, device: torch.device) -> torch.Tensor:
    """``k · max(c, 1)^a`` for every count of distinct tokens c in [0, 2^MAX_VOCAB_BITS] (the
    same values for every vocabulary: an entry depends on c alone)."""
    c = torch.arange((1 << MAX_VOCAB_BITS) + 1, dtype=torch.float64).clamp_(min=1.0)
    return (k * c**a).to(device)


@dataclass(frozen=True)
class NgramConfig:
    order: int = 5  # highest n-gram order N (orders 2..N are mixed over the model)
    # Confidence of order n (tuples indexed by n = 2..MAX_ORDER; fitted for n <= 5 by
    # `proteus tune-cache` on held-out training tokens, see docs/cache_params_cpu_tiny.json; the
    # n = 6 entries repeat n = 5): λ_n = weight · ctx / (ctx + k_n · types^a_n). A context
    # trusted after few sightings has a small k_n; a large a_n distrusts contexts with many
    # followers.
    weight: float = 1.0  # the largest mixing weight of the whole-history counts
    k: tuple[float, ...] = (17.82, 14.05, 11.86, 10.3, 10.3)
    a: tuple[float, ...] = (1.226, 1.211, 1.565, 1.723, 1.723)
    doc: bool = True  # also mix in the counts of the current document alone (recency)
    doc_weight: float = 1.0  # the same parameters for the document's counts
    doc_k: tuple[float, ...] = (11.38, 3.92, 4.952, 4.664, 4.664)
    doc_a: tuple[float, ...] = (1.016, 1.538, 4.155, 1.327, 1.327)
    chunk: int = 4096  # positions per step of the triton backend
    # bits per token id in the count keys: 10 up to vocab 1024 (orders up to 6), 13 up to 8192
    # (orders up to 4: the 64-bit keys hold no more; proteus/kernels/_keys.py)
    id_bits: int = VOCAB_BITS

    @staticmethod
    def bits_for(vocab_size: int) -> int:
        """``id_bits`` for a vocabulary (``proteus.kernels.id_bits``)."""
        return id_bits(vocab_size)

    def validate(self) -> None:
        top = max_order(self.id_bits)  # a ValueError for a vocabulary above 8192
        if not 2 <= self.order <= top:
            vocab = (f" at a vocabulary of up to {1 << self.id_bits} ({self.id_bits}-bit token "
                     "ids in the 64-bit keys)" if top < MAX_ORDER else "")
            raise ValueError(f"ngram order must be in [2, {top}]{vocab}, got {self.order}")
        if not (0 < self.weight <= 1 and 0 < self.doc_weight <= 1):
            raise ValueError(f"ngram weights must be in (0, 1], got {self.weight}, "
                             f"{self.doc_weight}")
        for name in ("k", "a", "doc_k", "doc_a"):
            v = getattr(self, name)
            if len(v) != MAX_ORDER - 1 or min(v) < 0 or (name.endswith("k") and min(v) <= 0):
                raise ValueError(f"ngram {name} must hold {MAX_ORDER - 1} values (orders 2.."
                                 f"{MAX_ORDER}), k > 0 and a >= 0; got {v}")
        if self.chunk < 1:
            raise ValueError(f"ngram chunk must be >= 1, got {self.chunk}")

    def lambdas(self, ctx: torch.Tensor, types: torch.Tensor, doc: bool = False
                ) -> torch.Tensor:
        """λ_n for orders 2..N: ``ctx``/``types`` (N-1, ...) counts -> (N-1, ...) float64.
        ``doc`` selects the parameters of the document-level counts."""
        weight, ks, as_ = ((self.doc_weight, self.doc_k, self.doc_a) if doc
                           else (self.weight, self.k, self.a))
        ctx = ctx.to(torch.float64, copy=True)  # updated in place below
        types = types.long()
        # k_n · max(types, 1)^a_n from a table over every possible count of distinct tokens (a
        # gather instead of a float64 pow per element: the same values, ~4x cheaper)
        kt = torch.stack([_pow_table(ks[j], as_[j], ctx.device)[types[j]]
                          for j in range(ctx.shape[0])])
        return ctx.div_(kt.add_(ctx)).mul_(weight)



# ---------------------------------------------------------------------------------------------
# The blend


def _mix(p: torch.Tensor, c_tgt: torch.Tensor, c_ctx: torch.Tensor, types: torch.Tensor,
         cfg: NgramConfig, doc: bool = False) -> torch.Tensor:
    """p_n = (1 - λ_n) p_{n-1} + λ_n c_tgt_n / ctx_n, lowest order first (float64), with λ_n
    from ``cfg.lambdas`` (the document-level parameters with ``doc``).

    ``p`` (..., K): the current probability of K candidate tokens; ``c_tgt`` (N-1, ..., K),
    ``c_ctx`` and ``types`` (N-1, ...): counts of orders 2..N."""
    lam = cfg.lambdas(c_ctx, types, doc)
    for j in range(lam.shape[0]):
        q = c_tgt[j].double().div_(c_ctx[j].clamp(min=1)[..., None])
        p = q.sub_(p).mul_(lam[j][..., None]).add_(p)  # (1 - λ) p + λ q
    return p


def ngram_blend_logprobs(tokens: torch.Tensor, start: int, end: int,
                         model_logp_target: torch.Tensor,
                         cfg: NgramConfig = NgramConfig(), backend: str = "numpy"
                         ) -> torch.Tensor:
    """log p(x_t | x_<t) under the blend, for targets t in [start, end) (start >= 1), float64.

    ``model_logp_target[i]`` is the model's log-probability of x_{start+i}. Counts cover every
    position before ``end``, so the result for a position never depends on where the shard,
    the chunk or the batch boundaries lie. ``tokens`` may be a batch of streams (B, T) with
    ``model_logp_target`` (B, end - start): each stream is scored on its own."""
    cfg.validate()
    length = tokens.shape[-1]
    if not 1 <= start <= end <= length:
        raise ValueError(f"ngram_blend_logprobs: need 1 <= start <= end <= {length}, "
                         f"got [{start}, {end})")
    want = (*tokens.shape[:-1], end - start)
    if tuple(model_logp_target.shape) != want:
        raise ValueError(f"ngram_blend_logprobs: model_logp_target must have shape {want} "
                         f"(end - start = {end - start} per stream), got "
                         f"{tuple(model_logp_target.shape)}")
    if backend == "numpy" and tokens.dim() == 1:
        return _blend_streamed(tokens, start, end, model_logp_target, cfg)
    c, d = _counts(tokens, end, cfg.order, backend, cfg.chunk, start if cfg.doc else None,
                   cfg.id_bits)
    dev = c.occ.device  # the blend runs where the counts are (the GPU for ``triton``)
    o = cfg.order
    c_tgt = c.occ[1:o, ..., start:end]  # count_n(ctx, x_t)
    c_ctx = c.occ[: o - 1, ..., start - 1 : end - 1]  # ctx_n
    p_model = model_logp_target.to(dev, torch.float64).exp()[..., None]
    p = _mix(p_model, c_tgt[..., None], c_ctx, c.types[: o - 1, ..., start:end], cfg)
    if d is not None:
        p = _mix(p, d.tgt[..., None], d.ctx, d.types, cfg, doc=True)
    return torch.log(p[..., 0]).to(model_logp_target.device)




def _blend_streamed(tokens: torch.Tensor, start: int, end: int, model_logp_target: torch.Tensor,
                    cfg: NgramConfig) -> torch.Tensor:
    """The numpy backend on one stream: counts chunk by chunk (``proteus.eval.stream_counts``:
    the same integers as ``earlier_counts_numpy``, in memory that grows with the distinct
    n-grams), each chunk blended as it comes by ``mix_numpy`` (``_mix``'s float64 operations in
    its order: the same results bit for bit), exp and log by torch over the whole shard."""
    _check_tokens(tokens, end, cfg.order, cfg.id_bits)
    out = model_logp_target.detach().cpu().to(torch.float64).exp()  # p_model, then the blend
    p_all = out.numpy()
    cpu = torch.device("cpu")
    hist = [_pow_table(k, a, cpu).numpy() for k, a in zip(cfg.k, cfg.a, strict=True)]
    doc = [_pow_table(k, a, cpu).numpy() for k, a in zip(cfg.doc_k, cfg.doc_a, strict=True)]
    for cc in stream_counts(tokens, start, end, cfg.order, cfg.doc, bits=cfg.id_bits):
        p = p_all[cc.lo - start : cc.hi - start]
        mix_numpy(p, cc.tgt, cc.ctx, cc.types, hist, cfg.weight)
        if cfg.doc:
            mix_numpy(p, cc.doc_tgt, cc.doc_ctx, cc.doc_types, doc, cfg.doc_weight)
    return torch.log_(out).to(model_logp_target.device)


def _scan_counts(tok: np.ndarray, t: int, order: int, v: int, after: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts at t by scanning x_<t for each order's context, using continuation positions
    s > ``after`` only: (count(ctx, v) for every v, ctx count, types), orders 2..N."""
    c_tgt = np.zeros((order - 1, v))
    c_ctx = np.zeros(order - 1)
    types = np.zeros(order - 1)
    for n in range(2, order + 1):
        k = n - 1  # context length
        if t <= k:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(tok, k)[: t - k]
        match = np.nonzero((windows == tok[t - k : t]).all(axis=1))[0] + k  # after the context
        match = match[match > after]
        c_tgt[n - 2] = np.bincount(tok[match], minlength=v)[:v]
        c_ctx[n - 2] = match.size
        types[n - 2] = np.count_nonzero(c_tgt[n - 2])
    return torch.from_numpy(c_tgt), torch.from_numpy(c_ctx), torch.from_numpy(types)


def cache_distribution(tokens: torch.Tensor, t: int, model_logp: torch.Tensor,
                       cfg: NgramConfig) -> torch.Tensor:
    """The full blended distribution over the vocabulary at position t, counted directly.

    Independent of the fast paths: each order's counts come from scanning x_<t for its context
    (for the document-level counts, only positions after the last BOS of x_<t).
    """
    v = model_logp.numel()
    tok = tokens[:t].cpu().numpy().astype(np.int64)
    p = _mix(model_logp.double().exp(), *_scan_counts(tok, t, cfg.order, v, after=-1), cfg)
    if cfg.doc:
        bos = np.nonzero(tok == BOS_ID)[0]
        after = int(bos[-1]) if bos.size else -1
        p = _mix(p, *_scan_counts(tok, t, cfg.order, v, after), cfg, doc=True)
    return p


