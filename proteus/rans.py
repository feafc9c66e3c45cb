"""The artifact's value coder: rANS over interleaved lanes, its context model and delta rows.

**rANS.** A 32-bit state and 16-bit renormalisation per lane; consecutive symbols go to
consecutive lanes, so encoding and decoding are numpy-vectorised across lanes. Each symbol is
coded under the static frequency table (quantised to 2^14) of its context.

**Contexts.** The context of entry (i, j) of a quantised matrix is a bucket of its predicted
magnitude under a rank-1 scale model, |q_ij| ~ rowmean_i * colmean_j / mean. Trained matrices
have input columns and output rows of very different spread, so the value distribution depends
on where a value sits. The log-means are stored as integers (quarter-octaves), so encoder and
decoder derive identical contexts.

**Delta rows.** Some rows of a trained matrix are near copies of another row. In a tied
embedding these are the tokens that training barely saw: the same softmax gradient pushes them
all the same way, so after quantisation they differ by a step or two. Such a row is coded as
its residual ``c = ((q_i - q_ref + off) mod A) - off`` against an earlier row ``ref < i``
(``A`` the kind's alphabet, ``off`` its offset), under 16 extra tables chosen by the row's mean
|residual|. ``q_i = ((q_ref + c + off) mod A) - off`` inverts it exactly, and rows rebuilt in
increasing order always find their reference rebuilt. The pairs (row, ref) are the only side
data. This does for our coder what sorting rows by similarity does for an LZ or
context-mixing coder (the record's lrzip): a static context model codes a matrix in the same
bits in any row order, so the similarity has to enter the model, not the order.
"""

from __future__ import annotations

import numpy as np

from proteus.quant import ArtifactError

PROB_BITS = 14
RANS_L = 1 << 16
KIND_ALPHABET = {"int6": (64, 32), "int7": (128, 64), "int8": (256, 128)}  # symbol = q + offset


def _freq_table(counts: np.ndarray) -> np.ndarray:
    """Counts -> frequencies summing to 2^PROB_BITS, every present symbol >= 1."""
    m = 1 << PROB_BITS
    total = int(counts.sum())
    if total == 0:
        return np.zeros_like(counts)
    f = np.where(counts > 0, np.maximum(1, (counts * m) // total), 0).astype(np.int64)
    order = np.argsort(-counts, kind="stable")[: np.count_nonzero(counts)]
    i, diff = 0, m - int(f.sum())
    while diff:  # hand the rounding remainder to (or take it from) the most frequent symbols
        s = order[i % order.size]
        if diff > 0:
            f[s] += 1
            diff -= 1
        elif f[s] > 1:
            f[s] -= 1
            diff += 1
        i += 1
    return f


def _lanes(n: int) -> int:
    """Interleaved streams: enough for vectorised speed, few enough that states stay cheap."""
    lanes = 32
    while lanes < 4096 and lanes * 4096 < n:
        lanes *= 2
    return lanes


def rans_encode(sym: np.ndarray, ctx: np.ndarray, freqs: np.ndarray) -> tuple[bytes, int]:
    """Encode symbols ``sym`` with per-symbol context ``ctx`` under tables ``freqs[ctx]``.

    Returns (blob, lanes): blob = final lane states (u32 each) + 16-bit words in the order
    the decoder consumes them (step-major, then lane).
    """
    n = sym.size
    lanes = _lanes(n)
    steps = -(-n // lanes)
    pad = steps * lanes - n
    cums = np.concatenate([np.zeros((freqs.shape[0], 1), np.int64), np.cumsum(freqs, 1)[:, :-1]],
                          axis=1)
    pad_sym = int(np.argmax(freqs[0]))  # padding: a symbol context 0 can code; decoded, dropped
    s = np.concatenate([sym.astype(np.int64), np.full(pad, pad_sym)]).reshape(steps, lanes)
    c = np.concatenate([ctx.astype(np.int64), np.zeros(pad, np.int64)]).reshape(steps, lanes)
    f_all = freqs[c, s].astype(np.uint64)
    c_all = cums[c, s].astype(np.uint64)
    x = np.full(lanes, RANS_L, np.uint64)
    emitted = np.empty((steps, lanes), np.uint16)
    emit_mask = np.empty((steps, lanes), bool)
    k16, kp = np.uint64(16), np.uint64(PROB_BITS)
    bound = np.uint64((RANS_L >> PROB_BITS) << 16)
    for t in range(steps - 1, -1, -1):
        f = f_all[t]
        m = x >= bound * f
        emitted[t] = (x & np.uint64(0xFFFF)).astype(np.uint16)
        emit_mask[t] = m
        x = np.where(m, x >> k16, x)
        x = ((x // f) << kp) + x % f + c_all[t]
    words = emitted[emit_mask]
    return x.astype("<u4").tobytes() + words.astype("<u2").tobytes(), lanes


def rans_decode(blob: bytes, n: int, ctx: np.ndarray, freqs: np.ndarray, lanes: int
                ) -> np.ndarray:
    m = 1 << PROB_BITS
    n_words = (len(blob) - 4 * lanes) // 2
    if n_words < 0 or 4 * lanes + 2 * n_words != len(blob):
        raise ArtifactError("rANS stream has the wrong length")
    x = np.frombuffer(blob, "<u4", lanes, 0).astype(np.uint64)
    words = np.frombuffer(blob, "<u2", n_words, 4 * lanes).astype(np.uint64)
    n_ctx, alphabet = freqs.shape
    cums = np.concatenate([np.zeros((n_ctx, 1), np.int64), np.cumsum(freqs, 1)], axis=1)
    lookup = np.zeros((n_ctx, m), np.int64)
    for k in range(n_ctx):
        if freqs[k].sum() == m:
            lookup[k] = np.repeat(np.arange(alphabet), freqs[k])
    steps = -(-n // lanes)
    c = np.concatenate([ctx.astype(np.int64), np.zeros(steps * lanes - n, np.int64)])
    c = c.reshape(steps, lanes)
    out = np.empty((steps, lanes), np.int64)
    pos, mask_bits, kp = 0, np.uint64(m - 1), np.uint64(PROB_BITS)
    for t in range(steps):
        ct = c[t]
        slot = (x & mask_bits).astype(np.int64)
        s = lookup[ct, slot]
        out[t] = s
        x = freqs[ct, s].astype(np.uint64) * (x >> kp) + (slot - cums[ct, s]).astype(np.uint64)
        need = x < np.uint64(RANS_L)
        k = int(np.count_nonzero(need))
        if k:
            if pos + k > n_words:
                raise ArtifactError("rANS stream is corrupt (ran out of words)")
            x[need] = (x[need] << np.uint64(16)) | words[pos : pos + k]
            pos += k
    if pos != n_words or not np.all(x == RANS_L):
        raise ArtifactError("rANS stream is corrupt (final state mismatch)")
    return out.ravel()[:n]


# Context of entry (i, j) of a quantised matrix: a bucket of its predicted magnitude under a
# rank-1 scale model, |q_ij| ~ rowmean_i * colmean_j / mean (trained matrices have input
# columns and output rows of very different spread). Log-means are stored as integers
# (quarter-octaves), so encoder and decoder derive identical contexts. On a trained cpu-tiny
# model this took the int6 payload from 396 KB (order-0 entropy) to 385 KB of rANS output.
N_CTX = 16
# puts the predicted log2 magnitude range on 16 buckets (int7: one octave above int6)
CTX_OFFSET = {"int6": 12, "int7": 8, "int8": 4}


def _log_means(q2: np.ndarray, direct: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Quarter-octave codes of the mean |value| of each row, of each column and of the whole
    matrix; the column and whole-matrix means over the ``direct`` rows only (a boolean mask;
    all rows when None): delta rows hold residuals, not values."""
    a = np.abs(q2.astype(np.float64))
    d = a if direct is None else a[direct]
    code = lambda m: np.round(4 * np.log2(m + 0.05)).astype(np.int8)  # noqa: E731
    return code(a.mean(1)), code(d.mean(0)), int(code(np.array([d.mean()]))[0])


def _contexts(kind: str, rl: np.ndarray, cl: np.ndarray, ml: int, group: int = 0,
              delta_rows: np.ndarray | None = None, delta_base: int = 0) -> np.ndarray:
    """Contexts of a matrix's values, row-major: its ``group``'s 16 magnitude buckets.
    ``delta_rows`` (row indices) are coded as residuals: their contexts are ``delta_base`` + a
    bucket of the row's own mean |residual| (its ``rl``), the same for the whole row."""
    pred = rl.astype(np.int64)[:, None] + cl.astype(np.int64)[None, :] - ml
    ctx = np.clip((pred + CTX_OFFSET[kind]) // 2, 0, N_CTX - 1) + N_CTX * group
    if delta_rows is not None and delta_rows.size:
        bucket = np.clip((rl[delta_rows].astype(np.int64) + DELTA_CTX_OFFSET) // 2, 0, N_CTX - 1)
        ctx[delta_rows] = delta_base + bucket[:, None]
    return ctx.ravel()


# ---------------------------------------------------------------------------------------------
# Delta rows

DELTA_CTX_OFFSET = 8  # residual row means from ~0.25 (bucket 0) up to ~50 (bucket 15)
DELTA_PAIR_BITS = 24  # a (row, ref) pair's side cost, after LZMA, in the writer's estimate
# A residual must be estimated to save this much per value: the nearest of many unrelated rows
# is a little closer than a typical one (a minimum over candidates), which the Laplace
# estimate would take for similarity; random rows then never qualify.
DELTA_MARGIN_BITS = 0.5
_CHUNK = 1024  # rows per block of the nearest-row search (bounds its memory)


def _bits_per_value(mean_abs: np.ndarray) -> np.ndarray:
    """The writer's estimate of a row's code length per value from its mean |value|: the
    entropy of a discrete Laplace law of that mean, log2(1 + 2e·m) bits (0 at m = 0)."""
    return np.log2(1 + 2 * np.e * mean_abs)


def nearest_earlier_rows(q2: np.ndarray) -> np.ndarray:
    """For each row i >= 1, the earlier row j < i nearest to it in L2 (row 0 gets -1)."""
    x = q2.astype(np.float32)
    sq = (x * x).sum(1)
    ref = np.full(x.shape[0], -1, np.int64)
    for a in range(1, x.shape[0], _CHUNK):
        b = min(x.shape[0], a + _CHUNK)
        d2 = sq[a:b, None] + sq[None, :b] - 2 * (x[a:b] @ x[:b].T)
        d2[np.arange(b - a)[:, None] + a <= np.arange(b)[None, :]] = np.inf  # only j < i
        ref[a:b] = np.argmin(d2, axis=1)
    return ref


def residual(q_row: np.ndarray, q_ref: np.ndarray, kind: str) -> np.ndarray:
    alphabet, off = KIND_ALPHABET[kind]
    return (q_row - q_ref + off) % alphabet - off


def plan_delta_rows(q2: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(values to code, pairs): the rows whose residual against their nearest earlier row is
    estimated to code in fewer bits than the row itself (by ``DELTA_MARGIN_BITS`` per value,
    pair cost included) are replaced by that residual; ``pairs`` is an int64 (k, 2) array of
    (row, ref), rows increasing."""
    q2 = q2.astype(np.int64)
    if q2.shape[0] < 2:
        return q2, np.zeros((0, 2), np.int64)
    ref = nearest_earlier_rows(q2)
    res = residual(q2[1:], q2[ref[1:]], kind)
    cols = q2.shape[1]
    own = cols * _bits_per_value(np.abs(q2[1:]).mean(1))
    delta = cols * (_bits_per_value(np.abs(res).mean(1)) + DELTA_MARGIN_BITS) + DELTA_PAIR_BITS
    rows = np.nonzero(delta < own)[0] + 1
    v = q2.copy()
    v[rows] = res[rows - 1]
    return v, np.stack([rows, ref[rows]], 1)


def check_delta_pairs(pairs: np.ndarray, rows: int) -> bool:
    """Pairs a reader may apply: rows strictly increasing in [1, rows), each ref < its row."""
    r, ref = pairs[:, 0], pairs[:, 1]
    return bool(np.all((r >= 1) & (r < rows) & (ref >= 0) & (ref < r))
                and np.all(np.diff(r) > 0))


def undo_delta_rows(v2: np.ndarray, pairs: np.ndarray, kind: str) -> np.ndarray:
    """The values, from the coded values and checked pairs: rows rebuilt in increasing order."""
    alphabet, off = KIND_ALPHABET[kind]
    q = v2.astype(np.int64).copy()
    for row, ref in pairs.tolist():
        q[row] = (q[ref] + q[row] + off) % alphabet - off
    return q
