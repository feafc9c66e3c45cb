"""The original record's hashed two-table cache: a documented negative example the audit must
flag, and its fast numpy scorer (the speed baseline of the cache benchmark)."""

from __future__ import annotations

import numpy as np
import torch

from proteus.eval.counts import _pack_np
from proteus.kernels._keys import VOCAB_BITS

# ---------------------------------------------------------------------------------------------
# The original record's scheme (a documented negative example) and its fast numpy scorer


class HashedTwoTableCache:
    """The invalid construction: two independently hashed count tables.

    ``p_cache(v) = min(1, full[h(ctx, v)] / ctxc[h(ctx)])`` for the highest order whose hashed
    context count is ≥ 2, blended as ``0.8 p_model + 0.2 p_cache``. Collisions make both tables
    over-count independently, so Σ_v p_cache(v) is far above 1 once the tables are loaded. The
    record put 62 M tokens into 4 M buckets (~15 per bucket); ``buckets`` defaults to the same
    load for the stream being audited.
    """

    def __init__(self, order: int = 5, buckets: int | None = None):
        self.order, self.buckets = order, buckets

    def _hash(self, keys: np.ndarray, buckets: int) -> np.ndarray:
        x = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return ((x >> np.uint64(17)) % np.uint64(buckets)).astype(np.int64)

    def distribution(self, tokens: torch.Tensor, t: int, model_logp: torch.Tensor
                     ) -> torch.Tensor:
        v = model_logp.numel()
        tok = tokens[:t].numpy().astype(np.int64)
        buckets = self.buckets or max(1024, t // 15)
        p_cache = None
        for n in range(self.order, 1, -1):
            if t < n:
                continue
            full = np.bincount(self._hash(_pack_np(tok, n)[n - 1 :], buckets), minlength=buckets)
            ctxc = np.bincount(self._hash(_pack_np(tok[:-1], n - 1)[n - 2 :], buckets),
                               minlength=buckets)
            ctx_key = _pack_np(tok[t - n + 1 :], n - 1)[-1]
            cden = ctxc[self._hash(np.array([ctx_key]), buckets)[0]]
            if cden < 2:
                continue
            cand = (ctx_key << VOCAB_BITS | np.arange(v)) & ~(np.int64(15) << 60) | (n << 60)
            p_cache = np.minimum(1.0, full[self._hash(cand, buckets)] / cden)
            break
        pm = model_logp.double().exp()
        if p_cache is None:
            return pm
        return 0.8 * pm + 0.2 * torch.from_numpy(p_cache)


def hashed_numpy_cache_logprobs(tokens: np.ndarray, model_logp: np.ndarray, order: int = 5,
                                buckets: int = 1 << 22, chunk: int = 2048) -> np.ndarray:
    """A reimplementation of the record's fast hashed cache scorer (the speed baseline).

    Per 2048-token chunk: hash the n-grams, score targets from the two count tables (highest
    order with hashed context count >= 2), then add the chunk to the tables. Not normalised.
    """
    n_tok = tokens.size
    full = [np.zeros(buckets, np.int32) for _ in range(order + 1)]
    ctxc = [np.zeros(buckets, np.int32) for _ in range(order + 1)]
    keys = {n: _pack_np(tokens, n) for n in range(1, order + 1)}
    mix = np.uint64(0x9E3779B97F4A7C15)
    hashed = {n: ((keys[n].astype(np.uint64) * mix) >> np.uint64(17)).astype(np.int64) % buckets
              for n in keys}
    out = np.empty(n_tok - 1)
    for lo in range(1, n_tok, chunk):
        hi = min(n_tok, lo + chunk)
        t = np.arange(lo, hi)
        p_cache = np.zeros(hi - lo)
        done = np.zeros(hi - lo, bool)
        for n in range(order, 1, -1):
            ok = (t >= n - 1) & ~done
            hf = hashed[n][t]
            hc = hashed[n - 1][t - 1]
            den = ctxc[n][hc]
            use = ok & (den >= 2)
            p_cache[use] = np.minimum(1.0, full[n][hf[use]] / den[use])
            done |= use
        p = 0.8 * np.exp(model_logp[lo - 1 : hi - 1]) + 0.2 * p_cache
        out[lo - 1 : hi - 1] = np.log(np.maximum(p, 1e-30))
        for n in range(2, order + 1):
            ok = t >= n - 1
            np.add.at(full[n], hashed[n][t[ok]], 1)
            np.add.at(ctxc[n], hashed[n - 1][t[ok] - 1], 1)
    return out


