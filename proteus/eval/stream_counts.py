"""Streaming exact n-gram counts for the cache: memory that grows with the distinct n-grams.

The numpy backend's whole-stream path (``proteus.eval.counts.earlier_counts_numpy``) sorts
the whole stream once per order and holds a dozen int64 arrays per position: ~640 bytes per
token of history. This module gives the same counts (bit for bit: integers) chunk by chunk,
holding only

* per order n, an exact hash table (``CountTable``) over the distinct n-grams seen so far: the
  packed n-gram (``n`` tokens of 10 bits, or up to 13 for a vocabulary of 8192 with n <= 4:
  an int64 key, no collisions) -> its count, and the
  number of distinct tokens that followed it (the ``types`` of the orders above, ``F``);
* the same tables for the current document only (emptied where a document ends), which hold
  the document that straddles a chunk's start;
* the working arrays of one chunk (``CHUNK`` = 65,536 positions: ~30-45 MB, whatever the
  stream's length).

Counting a chunk [a, b) of positions (``_Counter.step``): its window starts N-1 positions
earlier (the *prefix*: already in the tables, there for the contexts of the first targets).
For each order n, from the lowest up, the window's n-grams get dense ids by one sort (the key
of order n is (id of order n-1 at i-1, x_i), so the sort is over small integers and the order
of the ids is that of the packed keys); each run of equal n-grams is looked up in the table
once, and a position's earlier occurrences are the table's count plus its rank among the
chunk's members of its run (prefix members weigh 0: they are in the table). The types of a
context add, to the table's F of the context, the chunk's earlier positions with that context
whose n-gram was new. Runs split where the document label changes give the document-level
counts the same way (``proteus.eval.counts.DocCounts``: a document is what follows a BOS; the BOS
itself closes the one before it). Then the chunk's runs are added to the tables.

Memory: a table slot is 16 bytes (int64 key, int32 count, int32 F; the top order has no F)
at a load between 0.55 and 0.8, so ~20-30 bytes per distinct n-gram, summed over orders
1..N; the bundled 1.04 M validation tokens have 2.2 M distinct n-grams of orders 2..5 and
their tables take 44 MB. Nothing else grows with the stream except the caller's input and
output. Growing a table re-places every key at once (sorted by home slot, no probing).

Lookups and inserts are vectorised linear probing (``CountTable``), ``WINDOW`` slots a round:
every key probes in lock-step; a round resolves the keys that met themselves or an empty
slot; inserts claim an empty slot by writing and reading back (the keys inserted are
distinct, so a key that reads itself back owns the slot). Counts are integers, so the order
of updates cannot change them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from proteus.data import BOS_ID
from proteus.kernels import VOCAB_BITS, max_order

EMPTY = -1
_GOLD = np.uint64(0x9E3779B97F4A7C15)
MAX_LOAD = 0.8  # grow when an insert would pass this load ...
GROW_LOAD = 0.55  # ... to this load
WINDOW = 8  # slots probed per round (one 64-byte cache line of keys)
CHUNK = 1 << 16  # positions per step: its working arrays stay in the CPU's caches
_OFFS = np.arange(WINDOW)
PAD = 256  # physical slots after the last home slot


class CountTable:
    """Exact open-addressing table: non-negative int64 keys -> int32 count (and int32 F, the
    distinct followers, unless ``follow=False``).

    Linear probing from the high 32 bits of a Fibonacci hash scaled to ``cap`` (any size, so
    the table grows by less than doubling), ``WINDOW`` slots per round: at the loads used
    (<= ``MAX_LOAD``) a key is almost always resolved in the first round. A slot returned by
    ``find`` stays valid until ``reserve`` grows the table (it says so)."""

    def __init__(self, capacity: int = 1024, follow: bool = True):
        self.with_follow = follow
        self.size = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int, slots: int | None = None) -> None:
        """``capacity`` home slots; ``slots`` physical ones (the rest a tail that probing runs
        into instead of wrapping around)."""
        self.cap = int(capacity)
        n = max(int(slots or 0), self.cap + PAD)
        self.keys = np.full(n, EMPTY, np.int64)
        self.count = np.zeros(n, np.int32)
        self.follow = np.zeros(n if self.with_follow else 0, np.int32)

    def _extend(self) -> None:
        """Lengthen the tail (a probe ran to its end)."""
        grow = max(PAD, self.keys.size // 8)
        self.keys = np.concatenate((self.keys, np.full(grow, EMPTY, np.int64)))
        self.count = np.concatenate((self.count, np.zeros(grow, np.int32)))
        if self.with_follow:
            self.follow = np.concatenate((self.follow, np.zeros(grow, np.int32)))

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.count.nbytes + self.follow.nbytes

    def clear(self) -> None:
        if self.size:
            self.size = 0
            self._alloc(1024)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        h = (keys.view(np.uint64) * _GOLD) >> np.uint64(32)
        return ((h * np.uint64(self.cap)) >> np.uint64(32)).astype(np.int64)

    def reserve(self, m: int) -> bool:
        """Make room for ``m`` new keys; True if the table grew (every slot moved).

        Growing re-places every key at once: sorted by home slot, key i of m goes to
        ``max(home_i, slot_{i-1} + 1)`` = ``i + max_{j <= i}(home_j - j)`` (linear probing
        into an empty table, without rounds)."""
        if self.size + m <= MAX_LOAD * self.cap:
            return False
        occ = np.flatnonzero(self.keys != EMPTY)
        keys, count = self.keys[occ], self.count[occ]
        follow = self.follow[occ] if self.with_follow else None
        del occ
        self.keys = self.count = self.follow = None  # free the old table first
        self.cap = int((self.size + m) / GROW_LOAD) + 1
        order = np.argsort(self._home(keys))
        keys = keys[order]
        count = count[order]
        if follow is not None:
            follow = follow[order]
        del order
        ar = np.arange(keys.size)
        slot = self._home(keys)
        slot -= ar
        np.maximum.accumulate(slot, out=slot)
        slot += ar
        del ar
        self._alloc(self.cap, (int(slot[-1]) + 1 + PAD) if slot.size else 0)
        self.keys[slot] = keys
        self.count[slot] = count
        if follow is not None:
            self.follow[slot] = follow
        return True

    def _window(self, slot: np.ndarray) -> np.ndarray:
        while slot.size and int(slot.max()) + WINDOW > self.keys.size:
            self._extend()
        return slot[:, None] + _OFFS

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, or -1 where it is absent."""
        out = np.full(keys.size, -1, np.int64)
        idx = np.arange(keys.size)
        slot = self._home(keys)
        want = keys
        while idx.size:
            w = self._window(slot)
            k = self.keys[w]
            stop = (k == want[:, None]) | (k == EMPTY)
            j = stop.argmax(1)
            done = stop[np.arange(j.size), j]
            at = w[np.arange(j.size), j]
            hit = done & (self.keys[at] == want)
            out[idx[hit]] = at[hit]
            go = ~done
            idx, want = idx[go], want[go]
            slot = slot[go] + WINDOW
        return out

    def _claim(self, keys: np.ndarray) -> np.ndarray:
        """Place distinct keys that are absent from the table; their slots."""
        out = np.empty(keys.size, np.int64)
        idx = np.arange(keys.size)
        slot = self._home(keys)
        want = keys
        while idx.size:
            w = self._window(slot)
            free = self.keys[w] == EMPTY
            j = free.argmax(1)
            has = free[np.arange(j.size), j]
            at = w[np.arange(j.size), j]
            self.keys[at[has]] = want[has]  # of several keys on one slot, one write wins
            won = has & (self.keys[at] == want)
            out[idx[won]] = at[won]
            go = ~won
            idx, want, at, has = idx[go], want[go], at[go], has[go]
            slot = np.where(has, at, slot[go] + WINDOW)  # lost a race: look again from there
        self.size += keys.size
        return out

    def place(self, keys: np.ndarray, slot: np.ndarray, use: np.ndarray) -> np.ndarray:
        """``slot`` (``find``'s answer for distinct ``keys``, -1 where not looked up) with the
        absent keys where ``use`` placed; if the table had to grow, every looked-up key is
        found again."""
        miss = use & (slot < 0)
        n_miss = int(miss.sum())
        if not n_miss:
            return slot
        slot = slot.copy()
        if self.reserve(n_miss):
            look = slot >= 0
            slot[look] = self.find(keys[look])
        slot[miss] = self._claim(keys[miss])
        return slot


def _pack(ext: np.ndarray, off: int, n: int, length: int, bits: int = VOCAB_BITS) -> np.ndarray:
    """Packed key of the n-gram ending at ext[off + i], i in [0, length) (-1 where it would
    start before ext)."""
    key = np.full(length, -1, np.int64)
    first = max(0, n - 1 - off)  # the first i whose n-gram lies inside ext
    if first < length:
        k = np.zeros(length - first, np.int64)
        for j in range(n):
            lo = off + first - (n - 1) + j
            k = (k << bits) | ext[lo : lo + length - first]
        key[first:] = k
    return key


def _earlier(srt: np.ndarray, start: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per position: the sum of ``w`` over the earlier members of its run (positions in order
    within a run; ``srt`` the sort permutation, ``start`` each sorted element's run start)."""
    ws = w[srt]
    cs = np.cumsum(ws) - ws
    out = np.empty_like(cs)
    out[srt] = cs - cs[start]
    return out


def _starts(new: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(np.where(new, np.arange(new.size), 0))


@dataclass
class ChunkCounts:
    """Counts of the targets [lo, hi), orders n = 2..N on the first axis (int32 numpy
    arrays): whole history ``tgt`` (earlier occurrences of the n-gram ending at t), ``ctx``
    (of its context), ``types``; the same over the current document in ``doc_*`` (None
    without document counts)."""

    lo: int
    hi: int
    tgt: np.ndarray
    ctx: np.ndarray
    types: np.ndarray
    doc_tgt: np.ndarray | None = None
    doc_ctx: np.ndarray | None = None
    doc_types: np.ndarray | None = None


def _runs(dk: np.ndarray, idx: np.ndarray, bits: int):
    """Sort the window by ``dk`` (positions in order within equal keys): (permutation, run-start
    flags in sorted order)."""
    comp = np.sort(((dk - dk.min()) << bits) | idx)
    srt = comp & ((1 << bits) - 1)
    sk = comp >> bits
    new = np.ones(dk.size, bool)
    new[1:] = sk[1:] != sk[:-1]
    return srt, new


def _dense(srt: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(run id of each sorted element, run id of each position)."""
    rid = np.cumsum(new) - 1
    ids = np.empty_like(rid)
    ids[srt] = rid
    return rid, ids


def _lookup(table: CountTable, keys: np.ndarray, use: np.ndarray):
    """(slot or -1, count, F) of each key where ``use`` (0 and -1 elsewhere)."""
    slot = np.full(keys.size, -1, np.int64)
    slot[use] = table.find(keys[use])
    found = slot >= 0
    count = np.where(found, table.count[slot], 0).astype(np.int64)
    if not table.with_follow:
        return slot, count, None
    follow = np.where(found, table.follow[slot], 0).astype(np.int64)
    return slot, count, follow


def _add(table: CountTable, keys: np.ndarray, count: np.ndarray, follow: np.ndarray) -> None:
    """Add ``count`` and ``follow`` to distinct ``keys`` (placing the absent ones)."""
    use = (count > 0) | (follow > 0)
    keys, count, follow = keys[use], count[use], follow[use]
    if not keys.size:
        return
    slot = table.place(keys, table.find(keys), np.ones(keys.size, bool))
    table.count[slot] += count.astype(np.int32)
    if table.with_follow:
        table.follow[slot] += follow.astype(np.int32)


class _Counter:
    """The tables of every order (whole history, current document) and the chunk step."""

    def __init__(self, order: int, doc: bool, bits: int = VOCAB_BITS):
        self.order, self.doc, self.bits = order, doc, bits
        # the top order's F is never read (it would be the types of order N + 1)
        self.hist = [CountTable(follow=n < order) for n in range(1, order + 1)]
        self.docs = [CountTable(follow=n < order) for n in range(1, order + 1)] if doc else []
        self.last_occ = np.zeros(order, np.int64)  # occ_n(a - 1) of orders n = 1..N
        self.last_docc = np.zeros(order, np.int64)  # the same within its document

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.hist + self.docs)

    def step(self, tokens, a: int, b: int, lo: int) -> ChunkCounts:
        """Count positions [a, b) (a < b) into the tables; counts of targets [lo, b)."""
        big_n = self.order
        w0 = max(0, a - (big_n - 1))
        e0 = max(0, w0 - (big_n - 1))
        ext = np.asarray(tokens[e0:b]).astype(np.int64)
        win = ext[w0 - e0 :]
        length, p, o = b - w0, a - w0, lo - w0  # window, prefix (counted before), first target
        idx = np.arange(length)
        chunk = idx >= p
        bits = max(1, (length - 1).bit_length())
        names = ("tgt", "ctx", "types", "dtgt", "dctx", "dtypes") if self.doc else (
            "tgt", "ctx", "types")
        rows = {k: np.zeros((big_n - 1, b - lo), np.int32) for k in names}
        carry = np.zeros(big_n, np.int64)
        dcarry = np.zeros(big_n, np.int64)
        if self.doc:
            is_bos = win == BOS_ID
            label = np.cumsum(is_bos) - is_bos  # L(w0 + i) - L(w0): BOS closes its document
            lab_a = label[p]
            lab_b = label[-1] + int(is_bos[-1])  # the document of position b
            doc_updates = []
        prev = None
        for n in range(1, big_n + 1):
            valid = idx >= n - 1  # the n-gram lies inside the window
            if n == 1:
                dk = win
            else:
                shifted = np.zeros(length, np.int64)
                shifted[1:] = prev["ids"][:-1]
                dk = np.where(valid, (shifted << self.bits) | win, -1 - idx)
            srt, new = _runs(dk, idx, bits)
            _, ids = _dense(srt, new)
            start = _starts(new)
            wch = (chunk & valid).astype(np.int64)
            keys = _pack(ext, w0 - e0, n, length, self.bits)
            rkeys = keys[srt[new]]  # the packed n-gram of each run
            table = self.hist[n - 1]
            slot, hc, hf = _lookup(table, rkeys, rkeys >= 0)
            occ = hc[ids] + _earlier(srt, start, wch)
            occ[~valid] = 0
            add = np.bincount(ids, weights=wch, minlength=rkeys.size).astype(np.int64)
            grow = (rkeys >= 0) & (add > 0)
            slot = table.place(rkeys, slot, grow)
            table.count[slot[grow]] += add[grow].astype(np.int32)
            cur = dict(srt=srt, start=start, ids=ids, occ=occ, hf=hf, slot=slot)
            carry[n - 1] = occ[-1]
            if n >= 2:
                first = np.zeros(length, np.int64)  # first[j]: x_{j+1} is new after j
                first[:-1] = ((occ == 0) & chunk & valid)[1:]
                self._types(rows, "", n, o, p, prev, first, occ, valid, self.last_occ)
                fadd = np.bincount(prev["ids"], weights=first,
                                   minlength=prev["hf"].size).astype(np.int64)
                ok = (fadd > 0) & (prev["slot"] >= 0)
                self.hist[n - 2].follow[prev["slot"][ok]] += fadd[ok].astype(np.int32)
            if self.doc:
                # runs split where the document changes: one document's occurrences each
                ls = label[srt]
                dnew = new.copy()
                dnew[1:] |= ls[1:] != ls[:-1]
                _, dids = _dense(srt, dnew)
                dstart = _starts(dnew)
                drep = srt[dnew]
                dkeys, dlab = keys[drep], label[drep]
                _, dhc, dhf = _lookup(self.docs[n - 1], dkeys, (dkeys >= 0) & (dlab == lab_a))
                docc = dhc[dids] + _earlier(srt, dstart, wch)
                docc[~valid] = 0
                dadd = np.bincount(dids, weights=wch, minlength=dkeys.size).astype(np.int64)
                # what this chunk leaves in the document tables: the runs of the document
                # that goes on at b (F of order n arrives with order n + 1)
                keep = (dkeys >= 0) & (dlab == lab_b)
                cur.update(dstart=dstart, dids=dids, docc=docc, dhf=dhf, keep=keep)
                doc_updates.append([dkeys[keep], dadd[keep], np.zeros(int(keep.sum()),
                                                                      np.int64)])
                dcarry[n - 1] = docc[-1]
                if n >= 2:
                    dfirst = np.zeros(length, np.int64)
                    dfirst[:-1] = ((docc == 0) & chunk & valid)[1:]
                    dprev = dict(srt=prev["srt"], start=prev["dstart"], ids=prev["dids"],
                                 occ=prev["docc"], hf=prev["dhf"])
                    self._types(rows, "d", n, o, p, dprev, dfirst, docc, valid,
                                self.last_docc)
                    dfadd = np.bincount(prev["dids"], weights=dfirst, minlength=prev["keep"].size)
                    doc_updates[n - 2][2] = dfadd[prev["keep"]].astype(np.int64)
            prev = cur
        del prev, cur
        if self.doc:
            if lab_b != lab_a:
                for t in self.docs:
                    t.clear()
            for n, (k, c, f) in enumerate(doc_updates, 1):
                _add(self.docs[n - 1], k, c, f)
        self.last_occ, self.last_docc = carry, dcarry
        out = ChunkCounts(lo, b, rows["tgt"], rows["ctx"], rows["types"])
        if self.doc:
            out.doc_tgt, out.doc_ctx, out.doc_types = rows["dtgt"], rows["dctx"], rows["dtypes"]
        return out

    @staticmethod
    def _types(rows: dict, kind: str, n: int, o: int, p: int, prev: dict, first: np.ndarray,
               occ: np.ndarray, valid: np.ndarray, last: np.ndarray) -> None:
        """Rows of order n: the target counts ``occ``, the context counts (order n-1 at t-1;
        the chunk's first target takes it from ``last``), and types: the table's F of the
        context plus the chunk's earlier positions with that context whose n-gram was new."""
        tin = _earlier(prev["srt"], prev["start"], first)
        types = np.zeros(occ.size, np.int64)
        types[1:] = prev["hf"][prev["ids"][:-1]] + tin[:-1]
        types[~valid] = 0
        ctx = np.zeros(occ.size, np.int64)
        ctx[1:] = prev["occ"][:-1]
        if p > 0:
            ctx[p] = last[n - 2]
        ctx[~valid] = 0
        rows[kind + "tgt"][n - 2] = occ[o:]
        rows[kind + "ctx"][n - 2] = ctx[o:]
        rows[kind + "types"][n - 2] = types[o:]


def stream_counts(tokens, start: int, end: int, order: int, doc: bool = True,
                  chunk: int = CHUNK, bits: int = VOCAB_BITS) -> Iterator[ChunkCounts]:
    """Counts of the targets [start, end) chunk by chunk (see ``ChunkCounts``), every
    position before ``end`` counted: the same integers as ``earlier_counts_numpy``.

    ``tokens`` is anything sliced to a 1-D integer array (a tensor, a numpy array or memmap):
    only one chunk's window of it is read at a time. ``bits``: bits per token id in the packed
    keys (``proteus.kernels.id_bits`` of the vocabulary; ``max_order(bits)`` bounds ``order``)."""
    if chunk < 1:
        raise ValueError(f"stream_counts: chunk must be >= 1, got {chunk}")
    if not 1 <= order <= max_order(bits):
        raise ValueError(f"stream_counts: order must be in [1, {max_order(bits)}] with "
                         f"{bits}-bit token ids, got {order}")
    counter = _Counter(order, doc, bits)
    for a in range(0, end, chunk):
        b = min(end, a + chunk)
        cc = counter.step(tokens, a, b, min(max(a, start), b))
        if b > start:  # chunks before the shard are counted, not scored
            yield cc


def mix_numpy(p: np.ndarray, tgt: np.ndarray, ctx: np.ndarray, types: np.ndarray,
              tables: list[np.ndarray], weight: float) -> None:
    """``proteus.eval.blend._mix`` in numpy, in place on ``p`` (float64, one entry per target):
    for n = 2..N, λ = weight · ctx / (ctx + table_n[types]) and p = (c_tgt / max(ctx, 1) - p)
    · λ + p, with ``tables[n-2]`` = ``_pow_table``'s k_n · max(c, 1)^a_n. The same IEEE
    operations in the same order as the torch version, so the same bits (the tests compare)."""
    for j in range(tgt.shape[0]):
        c = ctx[j].astype(np.float64)
        lam = c / (tables[j][types[j]] + c) * weight
        q = tgt[j] / np.maximum(ctx[j], 1)
        q -= p
        q *= lam
        p += q
