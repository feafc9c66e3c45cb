"""Exact n-gram counts for the eval cache: three backends that give the same integers.

For a stream x_0..x_N and order n, ``occ_n(t)`` = number of positions s < t whose n-gram
x_{s-n+1..s} equals the n-gram ending at t. The context of order n at t is x_{t-n+1..t-1}, and
the number of earlier positions with that context (whose own n-gram is complete before t) is
the number of earlier occurrences of the (n-1)-gram ending at t-1: ``ctx_n(t) = occ_{n-1}(t-1)``.
So one array of earlier-occurrence counts per order gives both numerator and denominator, and
``ctx_n(t) = Σ_v count_n(ctx, v)`` holds exactly (keys are exact: no hashing collisions).
``types_n(t)`` is the number of distinct tokens that followed the context before t.

Order-exact semantics: the score at t uses counts of positions < t and nothing else. A shard
[start, end) is scored by counting everything before ``start`` first (for the document-level
counts, everything from the start of the document containing ``start``), so any split over
ranks or chunks gives the same numbers. Backends computing the counts: ``ref`` (a per-token dict
loop: the specification), ``numpy`` (one sort per order), ``triton`` (the device hash table of
``kernels/ngram_table.py``, chunk by chunk: look up, count within the chunk, then insert).
Document-level counts come from the numpy backend's own sorts (``earlier_counts_numpy`` with
``doc_start``: runs split where the document changes), from ``doc_counts`` (torch sorts on the
same device) for the triton backend, and from ``doc_counts_ref`` (a dictionary loop) for
``ref``; all three are tested equal. The blend over these counts is ``proteus/eval/blend.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from proteus.config import NGRAM_BACKENDS
from proteus.data import BOS_ID
from proteus.kernels import VOCAB_BITS, kernel_device, max_order
from proteus.kernels.ngram_table import NgramTable, pack_keys, types_keys


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
                         doc_start: int | None = None, bits: int = VOCAB_BITS):
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
    target of a position as a batch of streams). ``bits``: bits per token id in the keys
    (``proteus.kernels.id_bits`` of the vocabulary)."""
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
            key[1:] = (ids[:-1] << bits) | tok[1:]
            key.view(nb, end)[:, : n - 1] = -1  # incomplete n-grams (and no crossing streams)
        else:
            key = tok | (torch.arange(nb).repeat_interleave(end) << bits)
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


def earlier_counts_triton(tokens: torch.Tensor, end: int, order: int, chunk: int = 4096,
                          bits: int = VOCAB_BITS) -> NgramCounts:
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
            keys = pack_keys(tok[first - n + 1 : hi], n, bits)
            cnt = table.lookup(keys).to(torch.int64) + _rank_in_group(keys)
            occ[n - 1, first:hi] = cnt
            uniq, c = torch.unique(keys, return_counts=True)
            ins_keys.append(uniq)
            ins_incs.append(c)
            if n > 1:
                ctx = types_keys(tok[first - n + 1 : hi - 1], n, bits)
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
                   chunk: int = 4096, bits: int = VOCAB_BITS) -> NgramCounts:
    """Counts for positions [0, end) with the chosen backend (all three are bit-identical);
    ``bits`` per token id in the keys."""
    return _counts(tokens, end, order, backend, chunk, bits=bits)[0]


def _counts(tokens: torch.Tensor, end: int, order: int, backend: str, chunk: int,
            doc_start: int | None = None, bits: int = VOCAB_BITS
            ) -> tuple[NgramCounts, DocCounts | None]:
    """Whole-history counts for positions [0, end) and, with ``doc_start``, document-level
    counts for targets [doc_start, end): the numpy backend takes both from one set of sorts;
    the triton backend counts the documents with torch sorts on its device; ``ref`` walks
    dictionaries. A batch of streams (B, T) gets counts with a batch axis after the order axis
    (numpy: one set of sorts for the batch; the others: one stream at a time)."""
    _check_tokens(tokens, end, order, bits)
    tokens = tokens.cpu().to(torch.int64)
    if backend == "numpy":
        if doc_start is None:
            return earlier_counts_numpy(tokens, end, order, bits=bits), None
        return earlier_counts_numpy(tokens, end, order, doc_start, bits)
    if backend not in NGRAM_BACKENDS:
        raise ValueError(f"ngram backend must be one of {NGRAM_BACKENDS}, got {backend!r}")
    if tokens.dim() == 2:
        parts = [_counts(row, end, order, backend, chunk, doc_start, bits) for row in tokens]
        c = NgramCounts(*(torch.stack([getattr(p[0], f) for p in parts], 1)
                          for f in ("occ", "types")))
        d = None if doc_start is None else DocCounts(
            *(torch.stack([getattr(p[1], f) for p in parts], 1) for f in ("tgt", "ctx", "types")))
        return c, d
    if backend == "triton":
        c = earlier_counts_triton(tokens, end, order, chunk, bits)
        doc = doc_counts if doc_start is not None else None
        dev = c.occ.device
    else:
        c = earlier_counts_ref(tokens, end, order)
        doc = doc_counts_ref if doc_start is not None else None
        dev = tokens.device
    return c, (doc(tokens.to(dev), doc_start, end, order, bits) if doc else None)


def _check_tokens(tokens: torch.Tensor, end: int, order: int, bits: int = VOCAB_BITS) -> None:
    if tokens.dim() not in (1, 2) or tokens.dtype not in (torch.int64, torch.int32, torch.int16,
                                                          torch.uint16):
        raise ValueError(f"ngram: tokens must be a 1-D integer tensor (or a 2-D batch of "
                         f"streams), got {tuple(tokens.shape)} {tokens.dtype}")
    if not 0 <= end <= tokens.shape[-1]:
        raise ValueError(f"ngram: end must be in [0, {tokens.shape[-1]}], got {end}")
    top = max_order(bits)
    if not 1 <= order <= top:
        raise ValueError(f"ngram order must be in [1, {top}] with {bits}-bit token ids, got "
                         f"{order}")
    if end and tokens.numel() and (int(tokens[..., :end].min()) < 0
                                   or int(tokens[..., :end].max()) >= 1 << bits):
        raise ValueError(f"ngram: token ids must be in [0, {1 << bits}) ({bits}-bit keys); "
                         "a larger vocabulary needs wider keys (NgramConfig.id_bits)")


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


def doc_counts(tokens: torch.Tensor, start: int, end: int, order: int,
               bits: int = VOCAB_BITS) -> DocCounts:
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
    key = (doc << bits) | x
    ids = key  # replaced by order 1's dense ids before any use
    prev = None  # (tgt, sort permutation, run starts) of order n-1
    for n in range(1, order + 1):
        if n > 1:
            key = torch.full_like(pos, -1)
            key[n - 1 :] = (ids[n - 2 : m - 1] << bits) | x[n - 1 :]
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


def doc_counts_ref(tokens: torch.Tensor, start: int, end: int, order: int,
                   bits: int = VOCAB_BITS) -> DocCounts:
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


