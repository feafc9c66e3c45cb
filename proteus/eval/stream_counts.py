"""Streaming exact n-gram counts for the cache: memory that grows with the distinct n-grams.

The numpy backend's whole-stream path (``proteus.eval.counts.earlier_counts_numpy``) sorts
the whole stream once per order and holds a dozen int64 arrays per position: ~640 bytes per
token of history. This module gives the same counts (bit for bit: integers) chunk by chunk,
holding only

* per order n, a table of the distinct n-grams seen so far (``CountTable``): the packed
  n-gram (``n`` tokens of 10 bits: an exact int64 key, no collisions) -> its count and the
  number of distinct tokens that followed it (the ``types`` of order n + 1, ``F``), packed in
  one int64 (count in the high 32 bits). Orders 1 and 2 are arrays indexed by the key itself
  (2^10 and 2^20 slots); higher orders are open-addressing hash tables;
* the same tables for the current document only, used only when a document is longer than a
  chunk (see below);
* the working arrays of one chunk (``CHUNK`` = 65,536 positions, whatever the stream's length).

Counting a chunk [a, b) of positions (``_Counter.step``): its window starts N-1 positions
earlier (the *prefix*: already in the tables, there for the contexts of the first targets).
For each order n, from the lowest up, the window's n-grams get dense ids by one sort (the key
of order n is (id of order n-1 at i-1, x_i), so the sort is over small integers and the order
of the ids is that of the packed keys); each run of equal n-grams is looked up in the table
once (and inserted if new), and a position's earlier occurrences are the table's count plus
its rank among the chunk's members of its run (prefix members are in the table already). The
types of a context add, to the table's F of the context, the chunk's earlier positions with
that context whose n-gram was new (a running sum over the runs of order n-1). Runs split where
the document label changes give the document-level counts the same way
(``proteus.eval.counts.DocCounts``: a document is what follows a BOS; the BOS itself closes
the one before it).

``stream_counts`` ends each chunk just after a BOS when the chunk holds one, so the next chunk
starts a new document: the document-level counts of a chunk then come from its own sort
alone, and the document tables stay empty. Only a document longer than a chunk goes through
them (its counts before the chunk are looked up there). Counts are exact integers whatever
the chunking, so this choice changes the speed, never a result.

Memory: a hash-table slot is 16 bytes (int64 key, int64 count and F) at a load between 0.5
and 0.75, so ~21-32 bytes per distinct n-gram of orders 3..N, plus 8 MB for order 2's array;
the bundled 1.04 M validation tokens have 2.1 M distinct n-grams of orders 3..5 (tables of
~60 MB; a load of 0.3-0.6 was ~5% faster and took ~85 MB). Nothing else grows with the
stream except the caller's input and output. Growing a table re-places every key at once
(sorted by home slot, no probing).

Lookups are vectorised linear probing (``CountTable.upsert``), one slot a round: every key
probes in lock-step; a key that meets itself is found; a key that meets an empty slot claims
it by writing and reading back (the keys of one call are distinct, so a key that reads itself
back owns the slot; the others probe on). Half the keys or more are resolved in the first
round. Counts are integers, so the order of updates cannot change them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from proteus.data import BOS_ID
from proteus.kernels import VOCAB_BITS

EMPTY = -1
_GOLD = np.uint64(0x9E3779B97F4A7C15)
MAX_LOAD = 0.75  # grow when an insert could pass this load ...
GROW_LOAD = 0.5  # ... to this load
START_CAP = 1 << 17  # home slots of a whole-history table at the start (2 MB)
CHUNK = 1 << 16  # positions per step: its working arrays stay in the CPU's caches
PAD = 256  # physical slots after the last home slot
WINDOW = 8  # slots a round for the tail of long probes (one 64-byte line of keys)
_OFFS = np.arange(WINDOW)
DIRECT_ORDERS = 2  # orders whose table is an array indexed by the packed key (2^(10 n) slots)
_LOW = (1 << 32) - 1  # F in the low 32 bits of a value, the count above it
_V = 1 << VOCAB_BITS  # keys are built as id * _V + token: numpy's int64 shifts are slower


_AR = np.arange(0)


def _arange(n: int) -> np.ndarray:
    """``np.arange(n)`` (int64), a view of one cached array (read only)."""
    global _AR
    if _AR.size < n:
        _AR = np.arange(max(n, CHUNK + 64))
        _AR.flags.writeable = False
    return _AR[:n]


def _cumsum(x: np.ndarray) -> np.ndarray:
    """Inclusive running sum as int64 (torch's CPU cumsum of int64 is several times numpy's;
    of bool it is slow: convert first)."""
    return torch.cumsum(torch.from_numpy(x.astype(np.int64, copy=False)), 0).numpy()


class CountTable:
    """Exact table: non-negative int64 keys -> (count, F), packed in one int64 ``vals`` entry
    (``count << 32 | F``).

    With ``direct_bits``, an array over every key below ``2 ** direct_bits`` (the slot of a key
    is the key). Otherwise open addressing: linear probing from the high 32 bits of a
    Fibonacci hash scaled to ``cap`` (any size, so the table grows by less than doubling).
    A slot returned by ``find`` or ``upsert`` stays valid until the next ``upsert``."""

    def __init__(self, capacity: int = 1024, direct_bits: int = 0):
        self.direct = direct_bits > 0
        self.size = 0
        if self.direct:
            self.cap = 1 << direct_bits
            self.keys = None
            self.vals = np.zeros(self.cap, np.int64)
        else:
            self._alloc(capacity)

    def _alloc(self, capacity: int, slots: int | None = None) -> None:
        """``capacity`` home slots; ``slots`` physical ones (the rest a tail that probing runs
        into instead of wrapping around)."""
        self.cap = int(capacity)
        n = max(int(slots or 0), self.cap + PAD)
        self.keys = np.full(n, EMPTY, np.int64)
        self.vals = np.zeros(n, np.int64)

    def _extend(self) -> None:
        """Lengthen the tail (a probe ran to its end)."""
        grow = max(PAD, self.keys.size // 8)
        self.keys = np.concatenate((self.keys, np.full(grow, EMPTY, np.int64)))
        self.vals = np.concatenate((self.vals, np.zeros(grow, np.int64)))

    @property
    def nbytes(self) -> int:
        return self.vals.nbytes + (0 if self.direct else self.keys.nbytes)

    def count(self, slot: np.ndarray) -> np.ndarray:
        return self.vals[slot] >> 32

    def follow(self, slot: np.ndarray) -> np.ndarray:
        return self.vals[slot] & _LOW

    def add(self, slot: np.ndarray, count: np.ndarray | int = 0,
            follow: np.ndarray | int = 0) -> None:
        """Add to the counts and F of distinct slots."""
        self.vals[slot] += (np.asarray(count, np.int64) << 32) + follow

    def clear(self) -> None:
        if self.size:
            self.size = 0
            if self.direct:
                self.vals.fill(0)
            else:
                self._alloc(1024)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        h = (keys.view(np.uint64) * _GOLD) >> np.uint64(32)
        return ((h * np.uint64(self.cap)) >> np.uint64(32)).view(np.int64)

    def _reserve(self, m: int) -> None:
        """Make room for ``m`` new keys.

        Growing re-places every key at once: sorted by home slot, key i of m goes to
        ``max(home_i, slot_{i-1} + 1)`` = ``i + max_{j <= i}(home_j - j)`` (linear probing
        into an empty table, without rounds)."""
        if self.size + m <= MAX_LOAD * self.cap:
            return
        occ = np.flatnonzero(self.keys != EMPTY)
        keys, vals = self.keys[occ], self.vals[occ]
        del occ
        self.keys = self.vals = None  # free the old table first
        self.cap = int((self.size + m) / GROW_LOAD) + 1
        # keys in slot order are nearly in home order (probing moves a key a few slots): a
        # stable sort (timsort) of such runs is ~linear
        order = np.argsort(self._home(keys), kind="stable")
        keys = keys[order]
        vals = vals[order]
        del order
        ar = np.arange(keys.size)
        slot = self._home(keys)
        slot -= ar
        slot = torch.cummax(torch.from_numpy(slot), 0).values.numpy()
        slot += ar
        del ar
        self._alloc(self.cap, (int(slot[-1]) + 1 + PAD) if slot.size else 0)
        self.keys[slot] = keys
        self.vals[slot] = vals

    def _probe(self, keys: np.ndarray, insert: bool) -> np.ndarray:
        """Slot of each of the distinct ``keys``: where it is, or (``insert``) the empty slot
        it claims, or -1 (absent, not inserted).

        Each round writes every probing key's current slot to the answer (the keys that go on
        overwrite theirs later), then keeps the unresolved ones by integer indexing: fewer
        passes than masking the answer and the probes apart."""
        slot = self._home(keys)
        out = None
        rem = None  # the keys still probing (None: all, in order)
        want = keys
        while True:
            if rem is not None and int(slot.max()) >= self.keys.size:
                self._extend()  # home slots are < cap: only later rounds can run off the end
                continue
            k = self.keys[slot]
            done = k == want
            empty = np.flatnonzero(k == EMPTY)
            if insert and empty.size:
                at, w = slot[empty], want[empty]
                self.keys[at] = w  # of several keys on one slot, one write wins
                won = self.keys[at] == w
                done[empty[won]] = True
                self.size += int(np.count_nonzero(won))
                ans = slot
            elif insert:
                ans = slot
            else:
                done[empty] = True
                ans = slot.copy()
                ans[empty] = -1
            if rem is None:
                out = ans
            else:
                out[rem] = ans
            go = np.flatnonzero(~done)
            if not go.size:
                return out
            rem = go if rem is None else rem[go]
            want = want[go]
            slot = slot[go]
            slot += 1
            if rem.size * 8 < keys.size:  # a tail of long probes: a window of slots a round
                out[rem] = self._probe_windows(want, slot, insert)
                return out

    def _probe_windows(self, want: np.ndarray, slot: np.ndarray, insert: bool) -> np.ndarray:
        """``_probe`` for the few keys left after its first rounds, ``WINDOW`` slots a round
        (a 2-D gather: dearer per key, but a long probe takes one or two rounds, not dozens)."""
        out = np.empty(want.size, np.int64)
        rem = np.arange(want.size)
        while rem.size:
            while int(slot.max()) + WINDOW > self.keys.size:
                self._extend()
            w = slot[:, None] + _OFFS
            k = self.keys[w]
            stop = (k == want[:, None]) | (k == EMPTY)
            j = stop.argmax(1)
            row = np.arange(j.size)
            has = stop[row, j]
            at = slot + j
            empty = has & (k[row, j] == EMPTY)
            done = has.copy()
            res = at.copy()
            if insert:
                e = np.flatnonzero(empty)
                self.keys[at[e]] = want[e]  # of several keys on one slot, one write wins
                won = self.keys[at[e]] == want[e]
                done[e[~won]] = False  # lost a race: look again from that slot
                self.size += int(np.count_nonzero(won))
            else:
                res[empty] = -1
            out[rem[done]] = res[done]
            go = ~done
            slot = np.where(has, at, slot + WINDOW)[go]
            rem, want = rem[go], want[go]
        return out

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, or -1 where it is absent."""
        if self.direct:
            return np.where(self.vals[keys] != 0, keys, -1)
        return self._probe(keys, insert=False)

    def upsert(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each of the distinct ``keys``, inserting (count 0, F 0) the absent ones."""
        if self.direct:
            self.size += keys.size  # an upper bound: it only says "not empty"
            return keys
        self._reserve(keys.size)
        return self._probe(keys, insert=True)


class _Runs:
    """The window's positions sorted into runs of equal keys (positions in order within a
    run): ``srt`` the permutation, ``start`` each run's first sorted index, ``rid`` the run of
    each sorted element, ``ids`` the run of each position."""

    def __init__(self, srt: np.ndarray, new: np.ndarray):
        self.srt = srt
        self.start = np.flatnonzero(new)
        self.rid = _cumsum(new)
        self.rid -= 1
        self.ids = np.empty_like(self.rid)
        self.ids[srt] = self.rid

    @property
    def size(self) -> int:
        return self.start.size

    def lengths(self) -> np.ndarray:
        out = np.empty_like(self.start)
        np.subtract(self.start[1:], self.start[:-1], out=out[:-1])
        out[-1:] = self.srt.size - self.start[-1:]
        return out

    def earlier(self, base: np.ndarray) -> np.ndarray:
        """Per position: ``base`` of its run plus the number of earlier members of its run."""
        out = np.empty_like(self.srt)
        out[self.srt] = (base - self.start)[self.rid] + _arange(self.srt.size)
        return out

    def earlier_sum(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(per position: the sum of ``w`` over the earlier members of its run, per run: the
        sum of ``w`` over its members)."""
        ws = w[self.srt]
        cs = _cumsum(ws)
        cs -= ws  # exclusive
        at = cs[self.start]  # the sum before each run
        total = np.empty_like(at)
        np.subtract(at[1:], at[:-1], out=total[:-1])
        total[-1:] = cs[-1:] + ws[-1:] - at[-1:]
        out = np.empty_like(cs)
        out[self.srt] = cs - at[self.rid]
        return out, total


def _sort_runs(dk: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort the window by ``dk`` (positions in order within equal keys): (permutation,
    run-start flags in sorted order)."""
    comp = dk - dk.min()
    comp <<= bits
    comp += _arange(dk.size)
    comp.sort()
    srt = comp & ((1 << bits) - 1)
    comp >>= bits
    new = np.empty(dk.size, bool)
    new[0] = True
    np.not_equal(comp[1:], comp[:-1], out=new[1:])
    return srt, new


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


@dataclass
class _Order:
    """What order n leaves for order n + 1: its runs, each position's earlier occurrences,
    and per run its table slot (``None`` for the document runs) and the table's F."""

    runs: _Runs
    occ: np.ndarray
    follow: np.ndarray
    h: int  # runs before h are positions whose n-gram reaches out of the window
    slot: np.ndarray | None = None  # the table slot of each run from h on
    add: np.ndarray | None = None  # what the chunk adds to the count of each run from h on


def _add(table: CountTable, keys: np.ndarray, count: np.ndarray, follow: np.ndarray) -> None:
    """Add ``count`` and ``follow`` to distinct ``keys`` (placing the absent ones)."""
    use = (count > 0) | (follow > 0)
    if use.any():
        table.add(table.upsert(keys[use]), count[use], follow[use])


class _Counter:
    """The tables of every order (whole history, current document) and the chunk step."""

    def __init__(self, order: int, doc: bool):
        self.order, self.doc = order, doc
        bits = [VOCAB_BITS * n if n <= DIRECT_ORDERS else 0 for n in range(1, order + 1)]
        self.hist = [CountTable(direct_bits=d) for d in bits]
        self.docs = [CountTable() for _ in range(order)] if doc else []
        self.last_occ = np.zeros(order, np.int64)  # occ_n(a - 1) of orders n = 1..N
        self.last_docc = np.zeros(order, np.int64)  # the same within its document

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.hist + self.docs)

    def step(self, tokens, a: int, b: int, lo: int) -> ChunkCounts:
        """Count positions [a, b) (a < b) into the tables; counts of targets [lo, b)."""
        big_n = self.order
        w0 = max(0, a - (big_n - 1))
        win = np.asarray(tokens[w0:b]).astype(np.int64)
        length, p, o = b - w0, a - w0, lo - w0  # window, prefix (counted before), first target
        bits = max(1, (length - 1).bit_length())
        rows = {k: np.zeros((big_n - 1, b - lo), np.int32) for k in (
            ("tgt", "ctx", "types", "dtgt", "dctx", "dtypes") if self.doc else
            ("tgt", "ctx", "types"))}
        carry = np.zeros(big_n, np.int64)
        dcarry = np.zeros(big_n, np.int64)
        if self.doc:
            is_bos = win == BOS_ID
            label = _cumsum(is_bos) - is_bos  # L(w0 + i) - L(w0): BOS closes its document
            lab_a = int(label[p])
            lab_b = int(label[-1] + is_bos[-1])  # the document of position b
            # positions of the documents of a and b (a suffix for b: empty after a final BOS)
            sb = int(np.searchsorted(label, lab_b))
            straddle = any(t.size for t in self.docs)  # the document of a began before it
            updates = []
        prev = dprev = None
        pk = win  # packed key of the n-gram ending at each position (order n)
        for n in range(1, big_n + 1):
            h = min(n - 1, length)  # positions before h: the n-gram reaches out of the window
            q0 = max(p, h)  # the first position counted by this chunk
            if n == 1:
                dk = win
            else:
                dk = np.empty(length, np.int64)
                np.multiply(prev.runs.ids[h - 1 : -1], _V, out=dk[h:])
                dk[h:] += win[h:]
                dk[:h] = -1 - _arange(h)  # keys of their own, sorted first: runs 0..h-1
                nxt = np.empty(length, np.int64)
                nxt[:h] = -1
                np.multiply(pk[h - 1 : -1], _V, out=nxt[h:])
                nxt[h:] += win[h:]
                pk = nxt
            srt, new = _sort_runs(dk, bits)
            runs = _Runs(srt, new)
            rep = srt[runs.start]  # the first position of each run
            # whole history: the table's count and F of each run, then the chunk's members
            table = self.hist[n - 1]
            if not table.direct and not table.size:
                table._alloc(START_CAP)  # a first chunk's distinct n-grams fit
            slot = table.upsert(pk[rep[h:]])
            val = table.vals[slot]
            base = np.zeros(runs.size, np.int64)
            base[h:] = val >> 32
            follow = np.zeros(runs.size, np.int64)
            follow[h:] = val & _LOW
            add = runs.lengths()
            add[:h] = 0
            if q0 > h:  # prefix members are in the table already
                pre = runs.ids[h:q0]
                np.subtract.at(base, pre, 1)
                np.subtract.at(add, pre, 1)
            occ = runs.earlier(base)
            occ[:h] = 0
            cur = _Order(runs, occ, follow, h, slot, add[h:])
            carry[n - 1] = occ[-1]
            if n >= 2:
                fadd = self._rows(rows, "", n, o, p, q0, prev, occ, self.last_occ)
                # order n-1's counts and F in one update (its table is not read again)
                self.hist[n - 2].add(prev.slot, prev.add, fadd[prev.h :])
            if n == big_n:
                table.add(slot, cur.add)
            if self.doc:
                dcur = self._doc_order(runs, new, label, lab_a, sb, pk, rep, h, q0, n,
                                       straddle, updates)
                dcarry[n - 1] = dcur.occ[-1]
                if n >= 2:
                    dfadd = self._rows(rows, "d", n, o, p, q0, dprev, dcur.occ, self.last_docc)
                    if updates[n - 2] is not None:
                        updates[n - 2][2] = dfadd[updates[n - 2][3]]
                dprev = dcur
            prev = cur
        del prev, cur, dprev
        if self.doc:
            if lab_b != lab_a:
                for t in self.docs:
                    t.clear()
            for n, u in enumerate(updates, 1):
                if u is not None:
                    _add(self.docs[n - 1], *u[:3])
        self.last_occ, self.last_docc = carry, dcarry
        out = ChunkCounts(lo, b, rows["tgt"], rows["ctx"], rows["types"])
        if self.doc:
            out.doc_tgt, out.doc_ctx, out.doc_types = rows["dtgt"], rows["dctx"], rows["dtypes"]
        return out

    def _doc_order(self, runs: _Runs, new: np.ndarray, label: np.ndarray, lab_a: int, sb: int,
                   pk: np.ndarray, rep: np.ndarray, h: int, q0: int, n: int, straddle: bool,
                   updates: list) -> _Order:
        """Order n over the current document: the runs split where the label changes; the
        document tables are read only for a document that began before the chunk."""
        ls = label[runs.srt]
        dnew = new.copy()
        dnew[1:] |= ls[1:] != ls[:-1]
        druns = _Runs(runs.srt, dnew)
        drep = runs.srt[druns.start]
        base = np.zeros(druns.size, np.int64)
        follow = np.zeros(druns.size, np.int64)
        add = druns.lengths()
        add[:h] = 0
        if straddle:
            mine = np.flatnonzero(label[drep] == lab_a)
            mine = mine[mine >= h]
            slot = self.docs[n - 1].find(pk[drep[mine]])
            got = slot >= 0
            val = self.docs[n - 1].vals[slot[got]]
            base[mine[got]] = val >> 32
            follow[mine[got]] = val & _LOW
        if q0 > h:  # prefix members of the document of a are in its tables
            pre = druns.ids[h:q0]
            pre = pre[label[drep[pre]] == lab_a]
            np.subtract.at(base, pre, 1)
            np.subtract.at(add, pre, 1)
        occ = druns.earlier(base)
        occ[:h] = 0
        # what this chunk leaves in the document tables: the runs of the document that goes on
        # at b (its F of order n arrives with order n + 1)
        if sb < runs.srt.size:
            keep = np.unique(druns.ids[max(sb, h):])
            updates.append([pk[drep[keep]], add[keep], np.zeros(keep.size, np.int64), keep])
        else:
            updates.append(None)
        return _Order(druns, occ, follow, h)

    @staticmethod
    def _rows(rows: dict, kind: str, n: int, o: int, p: int, q0: int, prev: _Order,
              occ: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Rows of order n: the target counts ``occ``, the context counts (order n-1 at t-1;
        the chunk's first position takes it from ``last``), and types: the table's F of the
        context plus the chunk's earlier positions with that context whose n-gram was new.
        Returns what the chunk adds to the F of each run of order n-1."""
        length = occ.size
        first = np.zeros(length, np.int64)  # first[j]: x_{j+1} is new after j
        first[q0 - 1 : -1] = occ[q0:] == 0
        tin, fadd = prev.runs.earlier_sum(first)
        h = n - 1
        t0 = max(o, h)  # targets before t0 have incomplete n-grams: all 0
        r = t0 - o
        if t0 < length:
            rows[kind + "tgt"][n - 2, r:] = occ[t0:]
            ctx = rows[kind + "ctx"][n - 2]
            ctx[r:] = prev.occ[t0 - 1 : -1]
            if t0 == p:
                ctx[r] = last[n - 2]
            rows[kind + "types"][n - 2, r:] = (prev.follow[prev.runs.ids[t0 - 1 : -1]]
                                              + tin[t0 - 1 : -1])
        return fadd


def stream_counts(tokens, start: int, end: int, order: int, doc: bool = True,
                  chunk: int = CHUNK) -> Iterator[ChunkCounts]:
    """Counts of the targets [start, end) chunk by chunk (see ``ChunkCounts``), every
    position before ``end`` counted: the same integers as ``earlier_counts_numpy``.

    ``tokens`` is anything sliced to a 1-D integer array (a tensor, a numpy array or memmap):
    only one chunk's window of it is read at a time. With document counts, a chunk ends just
    after its last BOS when it holds one (see the module's docstring)."""
    if chunk < 1:
        raise ValueError(f"stream_counts: chunk must be >= 1, got {chunk}")
    counter = _Counter(order, doc)
    a = 0
    while a < end:
        b = min(end, a + chunk)
        if doc and b < end:
            bos = np.flatnonzero(np.asarray(tokens[a:b]) == BOS_ID)
            if bos.size:
                b = a + int(bos[-1]) + 1
        cc = counter.step(tokens, a, b, min(max(a, start), b))
        if b > start:  # chunks before the shard are counted, not scored
            yield cc
        a = b


def mix_numpy(p: np.ndarray, tgt: np.ndarray, ctx: np.ndarray, types: np.ndarray,
              tables: list[np.ndarray], weight: float) -> None:
    """``proteus.eval.blend._mix`` in numpy, in place on ``p`` (float64, one entry per target):
    for n = 2..N, λ = weight · ctx / (ctx + table_n[types]) and p = (c_tgt / max(ctx, 1) - p)
    · λ + p, with ``tables[n-2]`` = ``_pow_table``'s k_n · max(c, 1)^a_n. The same IEEE
    operations in the same order as the torch version, so the same bits (the tests compare).

    Where ctx = 0, λ = 0 and c_tgt = 0, so the step adds (0 - p) · 0 = -0 to p: p is
    unchanged, bit for bit. Rows where most contexts are new are mixed at their other
    positions only."""
    for j in range(tgt.shape[0]):
        nz = np.flatnonzero(ctx[j])
        if nz.size > 0.6 * p.size:
            c = ctx[j].astype(np.float64)
            lam = c / (tables[j][types[j]] + c) * weight
            q = tgt[j] / np.maximum(ctx[j], 1)
            q -= p
            q *= lam
            p += q
        elif nz.size:
            c = ctx[j][nz].astype(np.float64)
            lam = c / (tables[j][types[j][nz]] + c) * weight
            q = tgt[j][nz] / c
            pn = p[nz]
            q -= pn
            q *= lam
            q += pn
            p[nz] = q
