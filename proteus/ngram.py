"""An honest n-gram eval cache: exact counts, a normalised blend, and an audit that proves it.

Counts. For a stream x_0..x_N and order n, ``occ_n(t)`` = number of positions s < t whose n-gram
x_{s-n+1..s} equals the n-gram ending at t. The context of order n at t is x_{t-n+1..t-1}, and
the number of earlier positions with that context (whose own n-gram is complete before t) is
the number of earlier occurrences of the (n-1)-gram ending at t-1: ``ctx_n(t) = occ_{n-1}(t-1)``.
So one array of earlier-occurrence counts per order gives both numerator and denominator, and
``ctx_n(t) = Σ_v count_n(ctx, v)`` holds exactly (keys are exact: no hashing collisions).
``types_n(t)`` is the number of distinct tokens that followed the context before t.

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
tune-cache``: L-BFGS on the bits per byte, counts fixed) on the scores of training tokens the
model never trained on, never on validation tokens. The shipped values (``NgramConfig``'s
defaults) are that command's output for the cpu-tiny model trained 3,000 steps without
training shard 000001, fitted on that shard; its record, with what it was fitted on, is
``docs/cache_params_cpu_tiny.json``.

Order-exact semantics: the score at t uses counts of positions < t and nothing else. A shard
[start, end) is scored by counting everything before ``start`` first (for the document-level
counts, everything from the start of the document containing ``start``), so any split over
ranks or chunks gives the same numbers. Backends computing the counts: ``ref`` (a per-token dict
loop: the specification), ``numpy`` (one sort per order), ``triton`` (the device hash table of
``kernels/ngram_table.py``, chunk by chunk: look up, count within the chunk, then insert).
Document-level counts come from the numpy backend's own sorts (``earlier_counts_numpy`` with
``doc_start``: runs split where the document changes), from ``doc_counts`` (torch sorts on the
same device) for the triton backend, and from ``doc_counts_ref`` (a dictionary loop) for
``ref``; all three are tested equal.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from proteus.config import NGRAM_BACKENDS, ConfigError
from proteus.data import BOS_ID
from proteus.files import InputError, read_json
from proteus.kernels._backend import kernel_device
from proteus.kernels._keys import MAX_ORDER, VOCAB_BITS
from proteus.kernels.ngram_table import NgramTable, pack_keys, types_keys


@functools.lru_cache(maxsize=8)
def _pow_table(k: float, a: float, device: torch.device) -> torch.Tensor:
    """``k · max(c, 1)^a`` for every count of distinct tokens c in [0, 2^VOCAB_BITS]."""
    c = torch.arange((1 << VOCAB_BITS) + 1, dtype=torch.float64).clamp_(min=1.0)
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

    def validate(self) -> None:
        if not 2 <= self.order <= MAX_ORDER:
            raise ValueError(f"ngram order must be in [2, {MAX_ORDER}], got {self.order}")
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


@dataclass
class NgramCounts:
    """``occ[n-1, t]``: earlier occurrences of the n-gram ending at t (n = 1..N);
    ``types[n-2, t]``: distinct tokens seen after the context of that n-gram, before t (n = 2..N).
    Positions whose n-gram is incomplete (t < n-1) hold 0. int64 tensors, on the device that
    counted them (the GPU for the ``triton`` backend), so the blend runs there too."""

    occ: torch.Tensor
    types: torch.Tensor

    @staticmethod
    def from_numpy(occ: np.ndarray, types: np.ndarray) -> NgramCounts:
        return NgramCounts(torch.from_numpy(occ), torch.from_numpy(types))


# ---------------------------------------------------------------------------------------------
# Counts


def _pack_np(tok: np.ndarray, n: int) -> np.ndarray:
    """Key of the n-gram ending at each position (positions < n-1 get -1)."""
    key = np.full(tok.size, -1, np.int64)
    if tok.size >= n:
        k = np.full(tok.size - n + 1, n << 60, np.int64)
        for i in range(n):
            k |= tok[i : tok.size - n + 1 + i].astype(np.int64) << (VOCAB_BITS * (n - 1 - i))
        key[n - 1 :] = k
    return key


def _stable_sort(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted keys, permutation) of a stable sort. On the CPU, when (key, position) fits in 63
    bits, one unstable numpy sort of ``key << bits | position`` (unique values, so the same
    order) is ~3x faster than torch's stable sort."""
    m = key.numel()
    if key.device.type == "cpu" and m:
        k = key.numpy()
        lo = int(k.min())
        bits = max(1, (m - 1).bit_length())
        if int(k.max()) - lo < 1 << (62 - bits):
            comp = np.sort(((k - lo) << bits) | np.arange(m, dtype=np.int64))
            return (torch.from_numpy((comp >> bits) + lo),
                    torch.from_numpy(comp & ((1 << bits) - 1)))
    return torch.sort(key, stable=True)


def _sort_runs(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of ``key`` into runs of equal keys (positions in order within a run):
    (permutation, run-start flags, index of each element's run start), the last two in sorted
    order."""
    sk, srt = _stable_sort(key)
    new = torch.ones_like(sk, dtype=torch.bool)
    new[1:] = sk[1:] != sk[:-1]
    return srt, new, _run_starts(new)


def _run_starts(new: torch.Tensor) -> torch.Tensor:
    """Index of each element's run start, from the run-start flags."""
    pos = torch.arange(new.numel(), device=new.device)
    return torch.cummax(torch.where(new, pos, 0), 0).values


def _earlier_in_runs(srt: torch.Tensor, start: torch.Tensor, w: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Per position: the sum of ``w`` (default 1) over the earlier members of its run, in
    position order (``srt``, ``start`` from ``_sort_runs``)."""
    if w is None:
        e = torch.arange(srt.numel(), device=srt.device) - start
    else:
        ws = w[srt]
        cs = torch.cumsum(ws, 0) - ws
        e = cs - cs[start]
    out = torch.empty_like(e)
    out[srt] = e
    return out


def _followers(prev_srt: torch.Tensor, prev_start: torch.Tensor, cnt: torch.Tensor, n: int,
               streams: int = 1) -> torch.Tensor:
    """types of order n per position: within each context group (the (n-1)-gram ending at
    t-1, in position order: order n-1's runs shifted by one), the earlier first occurrences,
    i.e. positions whose order-n count ``cnt`` is 0. Positions t < n-1 get 0. ``cnt`` may hold
    ``streams`` streams of equal length one after another (positions within each stream)."""
    first = torch.zeros_like(cnt)  # first[j]: x_{j+1} is new after j
    first[:-1] = cnt[1:] == 0
    f2 = first.view(streams, -1)
    f2[:, : max(n - 2, 0)] = 0
    f2[:, f2.shape[1] - 1 :] = 0  # a stream's last position has no successor in it
    types = torch.zeros_like(cnt)
    types[1:] = _earlier_in_runs(prev_srt, prev_start, first)[:-1]
    types.view(streams, -1)[:, : n - 1] = 0
    return types


def earlier_counts_numpy(tokens: torch.Tensor, end: int, order: int,
                         doc_start: int | None = None):
    """Exact counts with one sort per order over dense n-gram ids (CPU, vectorised; the
    backend is named for numpy's sort, which ``_stable_sort`` uses).

    With ``doc_start``, also the document-level counts of targets [doc_start, end) from the
    same sorts, returned as ``(NgramCounts, DocCounts)``: a run of equal n-grams lists its
    positions in order, and the document label of a position s, ``L(s)`` = the number of BOS
    among x_<s, never decreases, so the occurrences inside the current document of t (those
    s < t with L(s) = L(t), see ``DocCounts``) are the stretch of t's run that shares L(t).
    Splitting each run where L changes gives the document counts without sorting again.

    ``tokens`` may also be a batch of streams (B, T), each counted on its own: they are
    flattened into one array and the order-1 key carries the stream's index, so every n-gram
    key does and no run crosses streams. Counts then have a batch axis after the order axis.
    One stream is the batch of one (the same code path; the audit scores every candidate
    target of a position as a batch of streams)."""
    batched = tokens.dim() == 2
    tok2 = (tokens if batched else tokens[None])[:, :end].to(torch.int64)
    nb = tok2.shape[0]
    tok = tok2.reshape(-1)
    m = tok.numel()
    occ = torch.zeros((order, m), dtype=torch.int64)
    types = torch.zeros((order - 1, m), dtype=torch.int64)
    with_doc = doc_start is not None
    if with_doc:
        is_bos = (tok == BOS_ID).to(torch.int64)
        label = torch.cumsum(is_bos, 0) - is_bos  # L(s); runs never cross streams
        doc_out = [torch.zeros((order - 1, nb, end - doc_start), dtype=torch.int64)
                   for _ in range(3)]
    ids = tok  # ids[t]: dense id of the n-gram ending at t (-1 if incomplete); order 1: tokens
    prev = None  # (sort permutation, run starts) of order n-1
    prev_doc = None  # (sort permutation, document-run starts, document counts) of order n-1
    for n in range(1, order + 1):
        if n > 1:
            key = torch.full((m,), -1, dtype=torch.int64)
            key[1:] = (ids[:-1] << VOCAB_BITS) | tok[1:]
            key.view(nb, end)[:, : n - 1] = -1  # incomplete n-grams (and no crossing streams)
        else:
            key = tok | (torch.arange(nb).repeat_interleave(end) << VOCAB_BITS)
        srt, new, start = _sort_runs(key)
        cnt = _earlier_in_runs(srt, start)
        cnt.view(nb, end)[:, : n - 1] = 0
        occ[n - 1] = cnt
        if n > 1 and end > 1:
            types[n - 2] = _followers(*prev, cnt, n, nb)
        if with_doc:
            ls = label[srt]
            dnew = new.clone()
            dnew[1:] |= ls[1:] != ls[:-1]
            dstart = _run_starts(dnew)
            dcnt = _earlier_in_runs(srt, dstart)
            dcnt.view(nb, end)[:, : n - 1] = 0
            if n > 1 and end > 1:
                p_srt, p_start, p_cnt = prev_doc
                dctx = torch.zeros_like(dcnt)
                dctx[1:] = p_cnt[:-1]
                dctx.view(nb, end)[:, 0] = 0
                for o, v in zip(doc_out, (dcnt, dctx, _followers(p_srt, p_start, dcnt, n, nb)),
                                strict=True):
                    o[n - 2] = v.view(nb, end)[:, doc_start:]
            prev_doc = (srt, dstart, dcnt)
        ids = torch.empty_like(cnt)
        ids[srt] = torch.cumsum(new, 0) - 1
        ids.view(nb, end)[:, : n - 1] = -1
        prev = (srt, start)
    occ, types = occ.view(order, nb, end), types.view(order - 1, nb, end)
    if not batched:
        occ, types = occ[:, 0], types[:, 0]
        if with_doc:
            doc_out = [o[:, 0] for o in doc_out]
    counts = NgramCounts(occ, types)
    return (counts, DocCounts(*doc_out)) if with_doc else counts


def earlier_counts_ref(tokens: torch.Tensor, end: int, order: int) -> NgramCounts:
    """The specification: walk the stream; at each t read the counts, then add x_t."""
    tok = tokens[:end].tolist()
    occ = np.zeros((order, end), np.int64)
    types = np.zeros((order - 1, end), np.int64)
    seen = [dict() for _ in range(order)]  # n-gram -> count
    follow = [dict() for _ in range(order)]  # context -> set of tokens that followed it
    for t in range(end):
        for n in range(1, order + 1):
            if t < n - 1:
                continue
            g = tuple(tok[t - n + 1 : t + 1])
            occ[n - 1, t] = seen[n - 1].get(g, 0)
            if n > 1:
                types[n - 2, t] = len(follow[n - 1].get(g[:-1], ()))
        for n in range(1, order + 1):
            if t >= n - 1:
                g = tuple(tok[t - n + 1 : t + 1])
                seen[n - 1][g] = seen[n - 1].get(g, 0) + 1
                follow[n - 1].setdefault(g[:-1], set()).add(g[-1])
    return NgramCounts.from_numpy(occ, types)


def _rank_in_group(keys: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Exclusive running sum of ``weights`` (default 1) over earlier equal keys (position order)."""
    srt, _, start = _sort_runs(keys)
    return _earlier_in_runs(srt, start, weights)


def earlier_counts_triton(tokens: torch.Tensor, end: int, order: int, chunk: int = 4096
                          ) -> NgramCounts:
    """Counts from the device hash table, chunk by chunk: look up, add within-chunk, insert.

    One table holds both n-gram counts (keys of ``pack_keys``) and, per context, the number of
    distinct tokens that followed it (``types_keys``)."""
    dev = kernel_device()
    tok = tokens[:end].to(dev)
    table = NgramTable(1 << 12, dev)
    occ = torch.zeros((order, end), dtype=torch.int64, device=dev)
    types = torch.zeros((order - 1, end), dtype=torch.int64, device=dev)
    for lo in range(0, end, chunk):
        hi = min(end, lo + chunk)
        ins_keys, ins_incs = [], []
        for n in range(1, order + 1):
            first = max(lo, n - 1)  # first position whose n-gram is complete
            if first >= hi:
                continue
            keys = pack_keys(tok[first - n + 1 : hi], n)
            cnt = table.lookup(keys).to(torch.int64) + _rank_in_group(keys)
            occ[n - 1, first:hi] = cnt
            uniq, c = torch.unique(keys, return_counts=True)
            ins_keys.append(uniq)
            ins_incs.append(c)
            if n > 1:
                ctx = types_keys(tok[first - n + 1 : hi - 1], n)
                fresh = (cnt == 0).to(torch.int64)
                types[n - 2, first:hi] = (table.lookup(ctx).to(torch.int64)
                                          + _rank_in_group(ctx, fresh))
                uctx, inv = torch.unique(ctx, return_inverse=True)
                add = torch.zeros(uctx.numel(), dtype=torch.int64, device=dev)
                add.index_add_(0, inv, fresh)
                keep = add > 0
                ins_keys.append(uctx[keep])
                ins_incs.append(add[keep])
        # every lookup of this chunk is done before any of its updates lands
        table.insert(torch.cat(ins_keys), torch.cat(ins_incs).to(torch.int32))
    return NgramCounts(occ, types)


def earlier_counts(tokens: torch.Tensor, end: int, order: int, backend: str = "numpy",
                   chunk: int = 4096) -> NgramCounts:
    """Counts for positions [0, end) with the chosen backend (all three are bit-identical)."""
    return _counts(tokens, end, order, backend, chunk)[0]


def _counts(tokens: torch.Tensor, end: int, order: int, backend: str, chunk: int,
            doc_start: int | None = None) -> tuple[NgramCounts, DocCounts | None]:
    """Whole-history counts for positions [0, end) and, with ``doc_start``, document-level
    counts for targets [doc_start, end): the numpy backend takes both from one set of sorts;
    the triton backend counts the documents with torch sorts on its device; ``ref`` walks
    dictionaries. A batch of streams (B, T) gets counts with a batch axis after the order axis
    (numpy: one set of sorts for the batch; the others: one stream at a time)."""
    _check_tokens(tokens, end, order)
    tokens = tokens.cpu().to(torch.int64)
    if backend == "numpy":
        if doc_start is None:
            return earlier_counts_numpy(tokens, end, order), None
        return earlier_counts_numpy(tokens, end, order, doc_start)
    if backend not in NGRAM_BACKENDS:
        raise ValueError(f"ngram backend must be one of {NGRAM_BACKENDS}, got {backend!r}")
    if tokens.dim() == 2:
        parts = [_counts(row, end, order, backend, chunk, doc_start) for row in tokens]
        c = NgramCounts(*(torch.stack([getattr(p[0], f) for p in parts], 1)
                          for f in ("occ", "types")))
        d = None if doc_start is None else DocCounts(
            *(torch.stack([getattr(p[1], f) for p in parts], 1) for f in ("tgt", "ctx", "types")))
        return c, d
    if backend == "triton":
        c = earlier_counts_triton(tokens, end, order, chunk)
        doc = doc_counts if doc_start is not None else None
        dev = c.occ.device
    else:
        c = earlier_counts_ref(tokens, end, order)
        doc = doc_counts_ref if doc_start is not None else None
        dev = tokens.device
    return c, (doc(tokens.to(dev), doc_start, end, order) if doc else None)


def _check_tokens(tokens: torch.Tensor, end: int, order: int) -> None:
    if tokens.dim() not in (1, 2) or tokens.dtype not in (torch.int64, torch.int32, torch.int16,
                                                          torch.uint16):
        raise ValueError(f"ngram: tokens must be a 1-D integer tensor (or a 2-D batch of "
                         f"streams), got {tuple(tokens.shape)} {tokens.dtype}")
    if not 0 <= end <= tokens.shape[-1]:
        raise ValueError(f"ngram: end must be in [0, {tokens.shape[-1]}], got {end}")
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"ngram order must be in [1, {MAX_ORDER}], got {order}")
    if end and tokens.numel() and (int(tokens[..., :end].min()) < 0
                                   or int(tokens[..., :end].max()) >= 1 << VOCAB_BITS):
        raise ValueError(f"ngram: token ids must be in [0, {1 << VOCAB_BITS}) (10-bit keys); "
                         "a larger vocabulary needs wider keys")


# ---------------------------------------------------------------------------------------------
# Counts within the current document


@dataclass
class DocCounts:
    """Counts over the current document only, for targets t in [start, end), orders n = 2..N.

    The document of target t is what follows the last BOS among x_<t (the whole stream if
    there is none): positions W(t) = {s : b(t) < s < t}, b(t) = the last s < t with x_s = BOS.
    ``tgt[n-2, i]`` = #{s in W(t): the n-gram ending at s equals the one ending at t},
    ``ctx[n-2, i]`` = #{s in W(t): the n-1 tokens before s equal the n-1 tokens before t},
    ``types[n-2, i]`` = the number of distinct x_s over those s; t = start + i. W(t) depends on
    x_<t only, and ``ctx = Σ_v tgt(ctx, v)`` exactly, as for the whole-history counts."""

    tgt: torch.Tensor
    ctx: torch.Tensor
    types: torch.Tensor


def doc_counts(tokens: torch.Tensor, start: int, end: int, order: int) -> DocCounts:
    """Document-level counts (see ``DocCounts``) by one stable sort per order, on the tokens'
    device. The key of the n-gram ending at i is (dense id of the (n-1)-gram ending at i-1,
    x_i), and order 1's key is (document of target i, x_i), so a key names both the n-gram and
    its document, and keys grow with the document: each sort permutes positions within their
    own document (cache-friendly gathers). Equal keys are one document's occurrences of one
    n-gram, in position order. Only tokens from the document containing ``start`` on are read.

    The context count of order n at t is the order n-1 count at t-1 (the context's tokens
    include the one that decides the document), and types come from the order n-1 sort."""
    if not 1 <= start <= end <= tokens.numel():
        raise ValueError(f"doc_counts: need 1 <= start <= end <= {tokens.numel()}, got "
                         f"[{start}, {end})")
    dev = tokens.device
    tok = tokens[:end].to(torch.int64)
    bos = torch.nonzero(tok[:start] == BOS_ID)
    b = int(bos[-1]) if bos.numel() else -1
    # n-grams reaching back over a document's BOS never recur inside that document (the BOS
    # would recur too), so counting can start at the first token after the last BOS
    lo = b + 1
    x = tok[lo:]
    m = x.numel()
    pos = torch.arange(m, device=dev)
    is_bos = (x == BOS_ID).to(torch.int64)
    doc = torch.cumsum(is_bos, 0) - is_bos  # the document of target i
    shape = (order - 1, end - start)
    out = [torch.zeros(shape, dtype=torch.int64, device=dev) for _ in range(3)]
    key = (doc << VOCAB_BITS) | x
    ids = key  # replaced by order 1's dense ids before any use
    prev = None  # (tgt, sort permutation, run starts) of order n-1
    for n in range(1, order + 1):
        if n > 1:
            key = torch.full_like(pos, -1)
            key[n - 1 :] = (ids[n - 2 : m - 1] << VOCAB_BITS) | x[n - 1 :]
            key[: n - 1] -= pos[: n - 1]  # incomplete n-grams: keys of their own
        srt, new, run = _sort_runs(key)
        tgt = _earlier_in_runs(srt, run)
        ids = torch.empty_like(pos)
        ids[srt] = torch.cumsum(new, 0)
        if n >= 2:
            p_tgt, p_srt, p_run = prev
            ctx = torch.zeros_like(pos)
            ctx[1:] = p_tgt[:-1]
            for o, v in zip(out, (tgt, ctx, _followers(p_srt, p_run, tgt, n)), strict=True):
                o[n - 2] = v[start - lo : end - lo]
        prev = (tgt, srt, run)
    return DocCounts(*out)


def doc_counts_ref(tokens: torch.Tensor, start: int, end: int, order: int) -> DocCounts:
    """The specification: walk the stream with per-document dictionaries, emptied after a BOS."""
    tok = tokens[:end].tolist()
    out = np.zeros((3, order - 1, end - start), np.int64)
    seen, ctxs, follow = {}, {}, {}
    for t in range(1, end):
        if tok[t - 1] == BOS_ID:
            seen, ctxs, follow = {}, {}, {}
        for n in range(2, order + 1):
            if t < n - 1:
                continue
            g = tuple(tok[t - n + 1 : t + 1])
            if t >= start:
                out[:, n - 2, t - start] = (seen.get(g, 0), ctxs.get(g[:-1], 0),
                                            len(follow.get(g[:-1], ())))
        for n in range(2, order + 1):
            if t >= n - 1:
                g = tuple(tok[t - n + 1 : t + 1])
                seen[g] = seen.get(g, 0) + 1
                ctxs[g[:-1]] = ctxs.get(g[:-1], 0) + 1
                follow.setdefault(g[:-1], set()).add(g[-1])
    return DocCounts(*(torch.from_numpy(a) for a in out))


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
    c, d = _counts(tokens, end, cfg.order, backend, cfg.chunk, start if cfg.doc else None)
    dev = c.occ.device  # the blend runs where the counts are (the GPU for ``triton``)
    o = cfg.order
    c_tgt = c.occ[1:o, ..., start:end]  # count_n(ctx, x_t)
    c_ctx = c.occ[: o - 1, ..., start - 1 : end - 1]  # ctx_n
    p_model = model_logp_target.to(dev, torch.float64).exp()[..., None]
    p = _mix(p_model, c_tgt[..., None], c_ctx, c.types[: o - 1, ..., start:end], cfg)
    if d is not None:
        p = _mix(p, d.tgt[..., None], d.ctx, d.types, cfg, doc=True)
    return torch.log(p[..., 0]).to(model_logp_target.device)


# ---------------------------------------------------------------------------------------------
# Fitting the parameters (``proteus tune-cache``) and the file that carries them

CACHE_PARAMS_FORMAT = "proteus-cache-params-1"
_FIELDS = ("weight", "k", "a", "doc_weight", "doc_k", "doc_a")


def cache_params_dict(cfg: NgramConfig, vocab_size: int, **meta) -> dict:
    """The JSON form of ``cfg``'s parameters, with what they fit (order, vocabulary)."""
    out = {"format": CACHE_PARAMS_FORMAT, "order": cfg.order, "doc": cfg.doc,
           "vocab_size": vocab_size}
    out.update({f: list(v) if isinstance(v, tuple) else v
                for f in _FIELDS for v in [getattr(cfg, f)]})
    out.update(meta)
    return out


def load_cache_params(path: str, order: int, doc: bool, vocab_size: int) -> NgramConfig:
    """An ``NgramConfig`` from a file of :func:`cache_params_dict`, refused (``ConfigError``,
    one line) when it does not fit the evaluation: another order, document switch or
    vocabulary, or not such a file at all."""
    try:
        d = read_json(path, "cache parameters", 1 << 20)
    except InputError as e:
        raise ConfigError(f"{e}; pass a file written by `proteus tune-cache`") from None
    if not isinstance(d, dict) or d.get("format") != CACHE_PARAMS_FORMAT:
        raise ConfigError(f"cache parameters {path} are not a `proteus tune-cache` file "
                          f"(format tag {CACHE_PARAMS_FORMAT!r} missing)")
    for key, want in (("order", order), ("doc", doc), ("vocab_size", vocab_size)):
        if d.get(key) != want:
            raise ConfigError(f"cache parameters {path} were fitted for {key} {d.get(key)!r}, "
                              f"this evaluation has {want!r}; refit with `proteus tune-cache` "
                              "for this model and cache, or drop --cache-params")
    try:
        cfg = NgramConfig(order=order, doc=doc, **{
            f: tuple(float(x) for x in d[f]) if isinstance(d[f], list) else float(d[f])
            for f in _FIELDS})
        cfg.validate()
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"cache parameters {path} are damaged: {str(e)[:120]}") from None
    return cfg


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def fit_cache_params(tokens: torch.Tensor, model_logp_target: torch.Tensor,
                     nbytes: torch.Tensor, cfg: NgramConfig = NgramConfig(),
                     iterations: int = 200) -> tuple[NgramConfig, dict]:
    """Fit ``cfg``'s confidence parameters (``weight``, ``k_n``, ``a_n`` for n = 2..order, and
    the document-level ones) to the targets [1, len) of ``tokens``: minimise the bits per byte
    of the blend, counts held fixed, by L-BFGS in float64 over unconstrained forms (weight =
    sigmoid, k and a = exp). The result is rounded to 4 significant digits; entries of orders
    above ``cfg.order`` repeat the highest fitted one. Returns it with the bits per byte of the
    model alone, of the blend with ``cfg`` and with the fitted parameters, each computed by
    ``ngram_blend_logprobs`` itself (not by the fit's copy of the blend)."""
    cfg.validate()
    n = tokens.numel()
    if model_logp_target.shape != (n - 1,) or nbytes.shape != (n - 1,):
        raise ValueError(f"fit_cache_params: model_logp_target and nbytes must have one entry per "
                         f"target ({n - 1}), got {tuple(model_logp_target.shape)} and "
                         f"{tuple(nbytes.shape)}")
    o = cfg.order
    c, d = _counts(tokens, n, o, "numpy", cfg.chunk, 1 if cfg.doc else None)
    parts = [(c.occ[1:o, 1:n].double(), c.occ[: o - 1, : n - 1].double(), c.types[: o - 1, 1:n])]
    if d is not None:
        parts.append((d.tgt.double(), d.ctx.double(), d.types))
    kinds = [(parts[0], ("weight", "k", "a"))]
    if d is not None:
        kinds.append((parts[1], ("doc_weight", "doc_k", "doc_a")))
    p_model = model_logp_target.double().exp()
    scale = 1.0 / (math.log(2) * float(nbytes.sum()))

    def unpack(theta):
        out, i = [], 0
        for _ in kinds:
            out.append((torch.sigmoid(theta[i]), theta[i + 1 : i + o].exp(),
                        theta[i + o : i + 2 * o - 1].exp()))
            i += 2 * o - 1
        return out

    def bpb(theta):
        p = p_model
        for ((c_tgt, c_ctx, types), _), (w, k, a) in zip(kinds, unpack(theta), strict=True):
            tt = types.clamp(min=1).double()
            for j in range(o - 1):
                lam = w * c_ctx[j] / (c_ctx[j] + k[j] * tt[j] ** a[j])
                p = p + lam * (c_tgt[j] / c_ctx[j].clamp(min=1) - p)
        return -torch.log(p).sum() * scale

    init = []
    for _, (fw, fk, fa) in kinds:
        w = min(getattr(cfg, fw), 0.999)
        init += [math.log(w / (1 - w)), *(math.log(x) for x in getattr(cfg, fk)[: o - 1]),
                 *(math.log(max(x, 1e-3)) for x in getattr(cfg, fa)[: o - 1])]
    theta = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=iterations, tolerance_grad=1e-10,
                            tolerance_change=1e-13, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = bpb(theta)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = {}
    for (_, names), (w, k, a) in zip(kinds, unpack(theta.detach()), strict=True):
        pad = MAX_ORDER - o  # orders above the fitted one repeat the highest fitted order
        fitted[names[0]] = _round(float(w))
        fitted[names[1]] = tuple(_round(float(x)) for x in (*k, *[k[-1]] * pad))
        fitted[names[2]] = tuple(_round(float(x)) for x in (*a, *[a[-1]] * pad))
    new = dataclasses.replace(cfg, **fitted)
    new.validate()

    def score(cf):
        return float(-ngram_blend_logprobs(tokens, 1, n, model_logp_target, cf).sum() * scale)

    info = dict(bpb_model=float(-model_logp_target.sum() * scale), bpb_start=score(cfg),
                bpb_fitted=score(new), targets=n - 1, bytes=int(nbytes.sum()))
    return new, info


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


# ---------------------------------------------------------------------------------------------
# The audit

AUDIT_CLASSES = ("bos_target", "after_bos", "chunk_edge", "shard_edge", "repeated_context",
                 "random")
AUDIT_WORLDS = (2, 3, 8)  # the splits over ranks whose shard edges the audit visits
MATERIALISE_ELEMENTS = 1 << 22  # tokens per batch when scoring every candidate of a position
MAX_BOS_POSITIONS = 256  # BOS targets are rare (~1 per 1,150 tokens here): audit all of them


def _spread(cands: torch.Tensor, k: int) -> list[int]:
    """Up to ``k`` of the sorted candidates, evenly spaced, the first and the last included."""
    cands = cands.unique()
    if cands.numel() <= k:
        return cands.tolist()
    return cands[torch.linspace(0, cands.numel() - 1, k).round().long()].unique().tolist()


def audit_positions(tokens: torch.Tensor, cfg: NgramConfig, n_random: int,
                    chunks: tuple[int, ...] = (), worlds: tuple[int, ...] = AUDIT_WORLDS,
                    per_class: int = 4, seed: int = 0) -> dict[str, list[int]]:
    """Target positions t (1 <= t < len) of every kind where a fast path could go wrong:
    ``bos_target`` (x_t is BOS), ``after_bos`` (x_{t-1} is BOS: an empty document),
    ``chunk_edge`` (the last and first targets of the device table's chunks and of any extra
    ``chunks``, e.g. test-time training's), ``shard_edge`` (the last and first targets of each
    rank's shard for ``worlds`` processes), ``repeated_context`` (the highest order's context
    seen at least twice before) and ``random``: every BOS target (up to
    ``MAX_BOS_POSITIONS``, spread over the stream), up to ``per_class`` of the other kinds
    (``n_random`` random ones)."""
    n = tokens.numel()
    if n < 2:
        raise ValueError(f"audit_positions: need at least 2 tokens, got {n}")
    tok = tokens.cpu().to(torch.int64)
    out = {"bos_target": _spread(torch.nonzero(tok[1:] == BOS_ID)[:, 0] + 1, MAX_BOS_POSITIONS),
           "after_bos": _spread(torch.nonzero(tok[:-1] == BOS_ID)[:, 0] + 1, per_class)}
    edges = []
    for c in (cfg.chunk, *chunks):
        for k in _spread(torch.arange(c, max(c, n), c), per_class):
            edges += [k - 1, k, k + 1]
    out["chunk_edge"] = sorted({t for t in edges if 1 <= t < n})
    shard = []
    for w in worlds:
        for r in range(1, w):
            lo = 1 + (n - 1) * r // w
            shard += [lo - 1, lo]
    out["shard_edge"] = sorted({t for t in shard if 1 <= t < n})
    ctx = earlier_counts_numpy(tok, n, cfg.order).occ[cfg.order - 2]
    out["repeated_context"] = _spread(torch.nonzero(ctx[:-1] >= 2)[:, 0] + 1, per_class)
    g = torch.Generator().manual_seed(seed)
    out["random"] = sorted(set(torch.randint(1, n, (n_random,), generator=g).tolist()))
    return out


def fast_distribution(tokens: torch.Tensor, t: int, model_logp: torch.Tensor,
                      cfg: NgramConfig, backend: str = "numpy", start: int = 1) -> torch.Tensor:
    """The fast scorer's own distribution at t: ``ngram_blend_logprobs`` run on the stream
    x_<t, v for every candidate v of the vocabulary (a batch of streams, as a shard [start,
    t+1)), with the model's log-probability ``model_logp[v]`` of each; (V,) float64."""
    v = model_logp.numel()
    if not 1 <= start <= t < tokens.numel():
        raise ValueError(f"fast_distribution: need 1 <= start <= t < {tokens.numel()}, got "
                         f"start {start}, t {t}")
    group = max(1, MATERIALISE_ELEMENTS // (t + 1))
    prefix = tokens[: t + 1].cpu().to(torch.int64)
    fill = torch.full((t - start,), -math.log(v), dtype=torch.float64)
    out = []
    for lo in range(0, v, group):
        cand = torch.arange(lo, min(v, lo + group))
        streams = prefix.repeat(cand.numel(), 1)
        streams[:, t] = cand
        lp = torch.cat((fill.expand(cand.numel(), -1), model_logp[cand].double()[:, None]), 1)
        out.append(ngram_blend_logprobs(streams, start, t + 1, lp, cfg, backend)[:, -1])
    return torch.cat(out).exp()


def yes_no(x: bool | None) -> str:
    """An audit check's verdict as the reports print it."""
    return "n/a" if x is None else "yes" if x else "NO"


@dataclass
class AuditReport:
    passed: bool
    scheme: str
    positions: int
    max_sum_error: float
    min_prob: float
    max_sum: float
    causal: bool
    consistent: bool | None  # the fast scores equal the reference at every position (None: n/a)
    classes: dict[str, int] = field(default_factory=dict)  # positions audited per kind
    materialised: int = 0  # positions where the fast scorer's whole distribution was compared
    fast_max_error: float | None = None  # max relative |p_fast - p_ref| over those
    fast_max_sum_error: float | None = None  # max |sum p_fast - 1| over those
    edits: int = 0  # edited streams (every token from a point on) whose earlier scores held
    edits_ok: bool | None = None
    splits_ok: bool | None = None  # the scores split over 2, 3, 8 shards equal the whole

    def __str__(self) -> str:
        verdict, yn = "PASS" if self.passed else "FAIL", yes_no
        kinds = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.classes.items() if v)
        text = (f"{verdict} ({self.scheme}, {self.positions} positions"
                f"{': ' + kinds if kinds else ''}): max |sum p - 1| = {self.max_sum_error:.2e}, "
                f"largest sum {self.max_sum:.6g}, min p = {self.min_prob:.2e}, "
                f"causal={yn(self.causal)}, fast scores match the reference="
                f"{yn(self.consistent)}")
        if self.materialised:
            text += (f"; the fast scorer's own distribution at {self.materialised} positions: "
                     f"max rel |p_fast - p_ref| = {self.fast_max_error:.1e}, max |sum - 1| = "
                     f"{self.fast_max_sum_error:.1e}")
        if self.edits_ok is not None:
            text += (f"; {self.edits} edited streams, earlier scores bit-identical="
                     f"{yn(self.edits_ok)}; split over {'/'.join(map(str, AUDIT_WORLDS))} "
                     f"shards identical={yn(self.splits_ok)}")
        return text


def edit_after(tokens: torch.Tensor, e: int, g: torch.Generator, vocab: int) -> torch.Tensor:
    """``tokens`` with every token from e on replaced at random (every 61st by a BOS, so the
    edited part holds document starts too)."""
    other = tokens.clone()
    other[e:] = torch.randint(0, vocab, (tokens.numel() - e,), generator=g)
    other[e::61] = BOS_ID
    return other


def _shards(n: int, world: int) -> list[tuple[int, int]]:
    """The target ranges [lo, hi) that ``world`` ranks score (as the evaluator splits them)."""
    return [(1 + (n - 1) * r // world, 1 + (n - 1) * (r + 1) // world) for r in range(world)]


def audit(tokens: torch.Tensor, positions: torch.Tensor | dict[str, list[int]],
          model_logprobs_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          cfg: NgramConfig = NgramConfig(), scheme: HashedTwoTableCache | None = None,
          tol: float = 1e-6, backend: str = "numpy", materialise: int = 6,
          edits: int = 8) -> AuditReport:
    """Audit the cache at ``positions`` (a tensor, or the classes of ``audit_positions``).

    1. Reference: materialise p_t over the vocabulary by direct scans of x_<t
       (``cache_distribution``); its sum must be 1 within ``tol``, p >= 0, and p_t must not move
       when the target and every later token change.
    2. The fast scorer (``ngram_blend_logprobs`` on ``backend``, the whole stream in one call,
       as one process scores it) must give each audited target exactly the reference's
       p_t(x_t) (relative 1e-9).
    3. Its whole distribution: at ``materialise`` positions (the earliest of each class first,
       where scoring all V candidates is cheapest), every candidate target v is scored through
       the fast path (``fast_distribution``, alternately as a shard starting at t); it must
       equal the reference's p_t(v) for every v and sum to 1.
    4. ``edits`` times, every token from an audited position e on is replaced (BOS included)
       and the whole stream rescored: every score of a target before e must stay bit-identical.
    5. Split into 2, 3 and 8 shards (as that many ranks score it), the scores must equal the
       whole stream's bit for bit.

    With ``scheme`` (the record's hashed cache) only step 1 applies: it has no fast scorer of
    ours to compare."""
    classes = positions if isinstance(positions, dict) else None
    pos_t = (torch.tensor(sorted({t for v in classes.values() for t in v}), dtype=torch.int64)
             if classes is not None else positions.to(torch.int64))
    n = tokens.numel()
    if pos_t.numel() == 0 or int(pos_t.min()) < 1 or int(pos_t.max()) >= n:
        raise ValueError(f"audit: need at least one position, each in [1, {n})")
    model_lp = model_logprobs_fn(tokens, pos_t).double()
    vocab = model_lp.shape[1]
    at = {t: i for i, t in enumerate(pos_t.tolist())}

    def dist(toks, t, lp):
        return scheme.distribution(toks, t, lp) if scheme else cache_distribution(toks, t, lp, cfg)

    sums, mins, causal = [], [], True
    refs = []
    g = torch.Generator().manual_seed(1234)
    for i, t in enumerate(pos_t.tolist()):
        p = dist(tokens, t, model_lp[i])
        refs.append(p)
        sums.append(p.sum().item())
        mins.append(p.min().item())
        other = tokens.clone()  # change the target and every later token: p_t must not move
        other[t:] = torch.randint(0, vocab, (n - t,), generator=g)
        lp2 = model_logprobs_fn(other, torch.tensor([t]))[0].double()
        if not torch.equal(dist(other, t, lp2), p):
            causal = False
    err = max(abs(s - 1.0) for s in sums)
    counts = {k: len(v) for k, v in classes.items()} if classes else {}
    rep = AuditReport(False, "", len(sums), err, min(mins), max(sums), causal, None, counts)
    if scheme is not None:
        rep.scheme = "hashed two-table cache (the original record)"
        rep.passed = err <= tol and min(mins) >= 0.0 and causal
        return rep
    rep.scheme = f"ngram order {cfg.order}, {backend} scorer"

    # 2. the fast scores of the whole stream; the model's input at an audited target is the
    # reference's, elsewhere a constant (the blend of a target reads its own model score only)
    stream_lp = torch.full((n - 1,), -math.log(vocab), dtype=torch.float64)
    tgt = tokens[pos_t].long()
    stream_lp[pos_t - 1] = model_lp[torch.arange(pos_t.numel()), tgt]
    fast = ngram_blend_logprobs(tokens, 1, n, stream_lp, cfg, backend)
    want = torch.stack([refs[i][int(tokens[t])] for t, i in at.items()])
    got = fast[pos_t - 1].exp()
    rep.consistent = bool(torch.all((got - want).abs() <= 1e-9 * want + 1e-15))

    # 3. the fast scorer's whole distribution: of each class first the earliest position
    # whose context both count kinds have seen (where every part of the blend is at work)
    c, d = earlier_counts_numpy(tokens.cpu().to(torch.int64), n, cfg.order, doc_start=1)
    busy = c.occ[0, :-1] > 0
    if d is not None and cfg.doc:
        busy &= d.ctx[0] > 0
    lists = list(classes.values()) if classes else []
    order = [min([t for t in v if busy[t - 1]] or v) for v in lists if v] + sorted(
        pos_t.tolist(), key=lambda t: (not bool(busy[t - 1]), t))
    chosen = list(dict.fromkeys(order))[:materialise]
    f_err, f_sum = 0.0, 0.0
    for j, t in enumerate(chosen):
        pf = fast_distribution(tokens, t, model_lp[at[t]], cfg, backend,
                               start=t if j % 2 else 1)
        pr = refs[at[t]]
        f_err = max(f_err, ((pf - pr).abs() / pr.clamp(min=1e-300)).max().item())
        f_sum = max(f_sum, abs(pf.sum().item() - 1.0))
    rep.materialised, rep.fast_max_error, rep.fast_max_sum_error = len(chosen), f_err, f_sum

    # 4. edit every token from e on: the scores of targets before e must not move
    e_pts = list(dict.fromkeys([min(v) for v in lists if v] + pos_t.tolist()))[:edits]
    ok = True
    for e in e_pts:
        other = edit_after(tokens, e, g, vocab)
        lp2 = stream_lp.clone()
        lp2[e - 1 :] -= 0.5  # the model's scores of the changed targets change too
        got2 = ngram_blend_logprobs(other, 1, n, lp2, cfg, backend)
        ok = ok and torch.equal(got2[: e - 1], fast[: e - 1])
    rep.edits, rep.edits_ok = len(e_pts), ok

    # 5. the same scores from the shards that 2, 3 and 8 ranks would score
    rep.splits_ok = all(
        torch.equal(torch.cat([ngram_blend_logprobs(tokens, lo, hi, stream_lp[lo - 1 : hi - 1],
                                                    cfg, backend)
                               for lo, hi in _shards(n, w)]), fast)
        for w in AUDIT_WORLDS)
    rep.passed = (err <= tol and min(mins) >= 0.0 and causal and rep.consistent
                  and f_err <= 1e-9 and f_sum <= tol and ok and rep.splits_ok)
    return rep
