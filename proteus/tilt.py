"""The token-only n-gram tilt: one hint token per position from the longest earlier match, and
the model's distribution tilted towards it, normalised over the whole vocabulary.

Hint. For target position t (predicting x_t from x_0 .. x_{t-1}), find the longest k ≤
``max_order`` (and ≥ ``min_order``) such that the context x_{t-k} .. x_{t-1} occurred earlier in
the stream with its next token already seen: some start j < t - k with x_j .. x_{j+k-1} equal to
the context. The hint h_t is the token x_{j+k} after the most recent such occurrence. Only
tokens before t are read, so the hint cannot see the target. The match is exact: contexts are
compared through dense ranks of their token strings (prefix doubling, as in suffix-array
construction), never through a hash, so there are no collisions at any order.

Tilt. With strength β ≥ 0,

    p'(a) = e^{β·[a = h]} · p(a) / Z,   Z = Σ_a e^{β·[a = h]} p(a) = 1 + p(h)·(e^β − 1),

so p' sums to one over the vocabulary whatever p(h) is, and positions without a hint keep p.
The log-probability of the target is ``log p(x_t) + β·[x_t = h] − log1p(p(h)·expm1(β))``, which
needs the model's log-probability of two tokens per position: the target and the hint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

MAX_TILT_ORDER = 16


@dataclass(frozen=True)
class TiltConfig:
    """The tilt's parameters: match orders and strength (fitted on held-out training tokens)."""

    beta: float = 1.0
    max_order: int = MAX_TILT_ORDER
    min_order: int = 1

    def validate(self) -> None:
        if not 1 <= self.min_order <= self.max_order <= MAX_TILT_ORDER:
            raise ValueError(f"tilt: orders must satisfy 1 <= min_order ({self.min_order}) <= "
                             f"max_order ({self.max_order}) <= {MAX_TILT_ORDER}")
        if not (0.0 <= self.beta <= 20.0) or math.isnan(self.beta):
            raise ValueError(f"tilt: beta must be in [0, 20], got {self.beta}")


def _dense(keys: np.ndarray) -> np.ndarray:
    """Dense ranks (0 ..) of int64 keys: equal keys, equal ranks; distinct keys, distinct."""
    return np.unique(keys, return_inverse=True)[1].astype(np.int64)


def _string_ranks(tok: np.ndarray, max_order: int) -> dict[int, np.ndarray]:
    """rank[k][i]: a dense rank of the string tok[i : i + k], for i in [0, n - k], k ≤ max_order.

    Powers of two by doubling (rank_2p(i) = pair(rank_p(i), rank_p(i + p))); any other k from two
    overlapping windows of the largest power of two p ≤ k: pair(rank_p(i), rank_p(i + k − p)).
    Both are exact because the pair of ranks determines the string and vice versa.
    """
    n = tok.size
    ranks = {1: _dense(tok.astype(np.int64))}
    p = 1
    while 2 * p <= max_order and 2 * p <= n:
        r = ranks[p]
        m = n - 2 * p + 1
        ranks[2 * p] = _dense(r[:m] * (n + 1) + r[p : p + m])
        p *= 2
    for k in range(3, min(max_order, n) + 1):
        if k in ranks:
            continue
        q = 1 << (k.bit_length() - 1)
        r = ranks[q]
        m = n - k + 1
        ranks[k] = _dense(r[:m] * (n + 1) + r[k - q : k - q + m])
    return ranks


def _previous_same(keys: np.ndarray) -> np.ndarray:
    """For each index i, the largest j < i with keys[j] == keys[i], or -1."""
    order = np.argsort(keys, kind="stable")  # by key, then by index
    prev = np.full(keys.size, -1, dtype=np.int64)
    same = keys[order[1:]] == keys[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    return prev


def longest_match_hints(tokens: torch.Tensor, max_order: int = MAX_TILT_ORDER,
                        min_order: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(hint, order) for every position t of ``tokens`` (int64, -1 / 0 where there is none).

    ``hint[t]`` predicts ``tokens[t]`` from ``tokens[:t]`` only (module docstring); ``order[t]``
    is the length of the matched context.
    """
    TiltConfig(max_order=max_order, min_order=min_order).validate()
    tok = tokens.detach().cpu().numpy().astype(np.int64)
    n = tok.size
    hint = np.full(n, -1, dtype=np.int64)
    order = np.zeros(n, dtype=np.int64)
    if n < 2:
        return torch.from_numpy(hint), torch.from_numpy(order)
    ranks = _string_ranks(tok, max_order)
    for k in range(min_order, min(max_order, n - 1) + 1):
        # contexts of length k that have a next token: starts 0 .. n - k - 1
        keys = ranks[k][: n - k]
        prev = _previous_same(keys)
        starts = np.nonzero(prev >= 0)[0]
        t = starts + k  # the position the context ending at t - 1 predicts
        hint[t] = tok[prev[starts] + k]  # longer k run later and overwrite shorter matches
        order[t] = k
    return torch.from_numpy(hint), torch.from_numpy(order)


def hint_at(tokens: torch.Tensor, t: int, max_order: int = MAX_TILT_ORDER,
            min_order: int = 1) -> int:
    """The hint of position t alone (-1 for none), by a direct scan of x_<t: an implementation
    independent of ``longest_match_hints`` (no ranks, no sorting), for the audits. The earlier
    ends e ≤ t - 2 of the context x_{t-k} .. x_{t-1} are narrowed one token at a time from
    k = 1; the hint follows the latest end at the longest k that still has one."""
    tok = tokens[:t].detach().cpu().numpy().astype(np.int64)
    if t < 2:
        return -1
    ends = np.flatnonzero(tok[: t - 1] == tok[t - 1])
    best_k, best_e = 0, -1
    k = 1
    while ends.size and k <= max_order:
        best_k, best_e = k, int(ends[-1])
        if k == t - 1:  # the context would reach before x_0
            break
        ends = ends[ends >= k]
        ends = ends[tok[ends - k] == tok[t - 1 - k]]
        k += 1
    return int(tok[best_e + 1]) if best_k >= min_order else -1


def tilt_logprobs(logp_target: torch.Tensor, logp_hint: torch.Tensor, target: torch.Tensor,
                  hint: torch.Tensor, beta: float) -> torch.Tensor:
    """log p'(target) per position (float64): the tilt of the module docstring.

    ``logp_target``/``logp_hint``: the model's log-probabilities of the target and of the hint
    (any value where ``hint`` is -1); ``target``/``hint``: token ids.
    """
    lt, lh = logp_target.double(), logp_hint.double()
    has = hint >= 0
    log_z = torch.log1p(torch.exp(lh) * math.expm1(beta))
    bonus = torch.where(target == hint, torch.full_like(lt, beta), torch.zeros_like(lt))
    return torch.where(has, lt + bonus - log_z, lt)


def tilt_distribution(logp: torch.Tensor, hint: int, beta: float) -> torch.Tensor:
    """The full tilted distribution p' over the vocabulary from one row of model log-probs
    (float64): what the audit checks, Σ p' = 1."""
    p = logp.double().exp()
    if hint < 0:
        return p
    w = torch.ones_like(p)
    w[hint] = math.exp(beta)
    q = p * w
    return q / (1.0 + p[hint] * math.expm1(beta))


def fit_beta(logp_target: torch.Tensor, logp_hint: torch.Tensor, target: torch.Tensor,
             hint: torch.Tensor, lo: float = 0.0, hi: float = 8.0, iters: int = 60) -> float:
    """The β that minimises the tilted negative log-likelihood (golden-section search; the
    NLL is convex in β: a log-sum-exp of an affine function minus a linear one). Fit it on
    held-out training tokens, never on the tokens that are reported."""
    def nll(b: float) -> float:
        return -float(tilt_logprobs(logp_target, logp_hint, target, hint, b).sum())

    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    return round((a + b) / 2, 4)


FIT_MIN_ORDERS = (1, 2, 3, 4, 6, 8)  # the shortest matches ``fit_tilt`` tries


def fit_tilt(logp_target: torch.Tensor, logp_hint: torch.Tensor, target: torch.Tensor,
             hint: torch.Tensor, order: torch.Tensor, max_order: int = MAX_TILT_ORDER,
             min_orders: tuple[int, ...] = FIT_MIN_ORDERS) -> tuple[TiltConfig, dict]:
    """β and the shortest match fitted together: for each candidate min order m, the hints of
    shorter matches dropped (``longest_match_hints`` with ``min_order`` m gives exactly that:
    the longest match is the same when it is ≥ m) and β fitted by ``fit_beta``; the pair with
    the lowest tilted NLL wins. ``hint``/``order``: the hints with min order 1 and their match
    lengths. Returns the config and each candidate's (β, NLL in nats)."""
    tried = {}
    for m in sorted({m for m in min_orders if 1 <= m <= max_order}):
        h = torch.where(order >= m, hint, torch.full_like(hint, -1))
        beta = fit_beta(logp_target, logp_hint, target, h)
        nll = -float(tilt_logprobs(logp_target, logp_hint, target, h, beta).sum())
        tried[m] = (beta, nll)
    m = min(tried, key=lambda k: tried[k][1])
    cfg = TiltConfig(beta=tried[m][0], max_order=max_order, min_order=m)
    cfg.validate()
    return cfg, tried


def tilted_logprobs_fn(fn: Callable, tcfg: TiltConfig) -> Callable:
    """A model's ``(tokens, positions) -> (n, V)`` log-probability function (``fn``) with
    each row tilted towards the hint of its position in the ``tokens`` given, found by a
    direct scan of the tokens before it (``hint_at``, not the scorer's ``longest_match_hints``):
    the model the cache's audit sees under ``--cache ngram+tilt``."""
    def tilted(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = fn(tokens, positions)
        out = [torch.log(tilt_distribution(row, hint_at(tokens, t, tcfg.max_order,
                                                         tcfg.min_order), tcfg.beta))
               for t, row in zip(positions.tolist(), rows, strict=True)]
        return torch.stack(out) if out else rows.double()

    return tilted
