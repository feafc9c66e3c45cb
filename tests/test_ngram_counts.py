"""The streaming exact counts (proteus.eval.stream_counts): the same integers as the whole-stream
numpy backend on any split into chunks, the same blended scores bit for bit, and a table that
stays exact while it grows."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
import torch

import proteus.eval.blend as ng
from proteus import data as D
from proteus.eval.blend import NgramConfig, ngram_blend_logprobs
from proteus.eval.counts import earlier_counts_numpy
from proteus.eval.stream_counts import MAX_LOAD, CountTable, stream_counts
from proteus.kernels import VOCAB_BITS


def _streamed(tok, start, end, order, doc, chunk):
    parts = list(stream_counts(tok, start, end, order, doc, chunk))
    names = ("tgt", "ctx", "types") + (("doc_tgt", "doc_ctx", "doc_types") if doc else ())
    if not parts:
        return {k: torch.zeros((order - 1, 0), dtype=torch.int64) for k in names}
    assert parts[0].lo == start and parts[-1].hi == end
    assert all(a.hi == b.lo for a, b in zip(parts, parts[1:], strict=False))
    return {k: torch.cat([torch.from_numpy(getattr(p, k)).long() for p in parts], 1)
            for k in names}


def _whole(tok, start, end, order):
    c, d = earlier_counts_numpy(tok, end, order, doc_start=start)
    o = order
    return dict(tgt=c.occ[1:o, start:end], ctx=c.occ[: o - 1, start - 1 : end - 1],
                types=c.types[: o - 1, start:end], doc_tgt=d.tgt, doc_ctx=d.ctx,
                doc_types=d.types)


def test_counts_equal_the_whole_stream_backend_on_random_streams():
    # tiny vocabularies (BOS = 1 is frequent: many documents, empty ones too) and chunks from
    # one position up: every chunk edge, prefix and straddling document is exercised
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        n = int(torch.randint(2, 160, (1,), generator=g))
        v = int(torch.randint(2, 6, (1,), generator=g))
        tok = torch.randint(0, v, (n,), generator=g)
        order = int(torch.randint(2, 7, (1,), generator=g))
        start = int(torch.randint(1, n, (1,), generator=g))
        end = int(torch.randint(start, n + 1, (1,), generator=g))
        chunk = int(torch.randint(1, 40, (1,), generator=g))
        got = _streamed(tok, start, end, order, True, chunk)
        want = _whole(tok, start, end, order)
        for k, w in want.items():
            assert torch.equal(got[k], w), (k, n, v, order, start, end, chunk)


@pytest.mark.parametrize("chunk", [1000, 4096])
def test_counts_equal_on_real_tokens(chunk):
    tok = D.load_tokens(D.bundled_val_glob(), "val")[:20000]
    got = _streamed(tok, 1, tok.numel(), 5, True, chunk)
    want = _whole(tok, 1, tok.numel(), 5)
    assert all(torch.equal(got[k], want[k]) for k in want)
    nodoc = _streamed(tok.numpy(), 7001, 15000, 5, False, chunk)  # a numpy stream, a shard
    want = _whole(tok, 7001, 15000, 5)
    assert all(torch.equal(nodoc[k], want[k]) for k in ("tgt", "ctx", "types"))


@pytest.mark.parametrize("cfg", [
    NgramConfig(), NgramConfig(order=6, doc=False),
    pytest.param(NgramConfig(doc=False), marks=pytest.mark.slow),
    pytest.param(NgramConfig(order=2), marks=pytest.mark.slow)])
def test_blend_is_bit_identical_to_the_whole_stream_path(cfg, monkeypatch):
    # a batch of one stream takes the whole-stream path (earlier_counts_numpy + _mix); the
    # one-stream path runs in 3000-position chunks here, so chunk edges fall inside documents
    monkeypatch.setattr(ng, "stream_counts", functools.partial(stream_counts, chunk=3000))
    tok = D.load_tokens(D.bundled_val_glob(), "val")[:20000]
    n = tok.numel()
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(n - 1, dtype=torch.float64, generator=g) * 9
    for start, end in ((1, n), (7001, 15000)):
        fast = ngram_blend_logprobs(tok, start, end, lp[start - 1 : end - 1], cfg)
        whole = ngram_blend_logprobs(tok[None], start, end, lp[None, start - 1 : end - 1], cfg)
        assert fast.dtype == torch.float64 and torch.equal(fast, whole[0])


def test_table_grows_and_stays_exact():
    rng = np.random.default_rng(0)
    t = CountTable(capacity=16)
    truth: dict[int, int] = {}
    for _ in range(40):
        # keys that share home slots (small range) and distant ones, counted in batches
        keys = np.unique(np.concatenate((rng.integers(0, 3000, 200),
                                         rng.integers(0, 1 << 59, 50))))
        t.add(t.upsert(keys), 1, 2)
        for k in keys.tolist():
            truth[k] = truth.get(k, 0) + 1
    assert t.size == len(truth) and t.size <= MAX_LOAD * t.cap
    keys = np.array(list(truth), np.int64)
    slot = t.find(keys)
    assert (slot >= 0).all() and np.unique(slot).size == slot.size
    assert np.array_equal(t.count(slot), np.array(list(truth.values())))
    assert np.array_equal(t.follow(slot), 2 * np.array(list(truth.values())))
    again = t.upsert(keys)  # present keys: found (the table may grow), not inserted again
    assert t.size == len(truth) and np.array_equal(t.count(again), list(truth.values()))
    absent = np.setdiff1d(rng.integers(0, 1 << 40, 500), keys)
    assert (t.find(absent) == -1).all()


def test_direct_table_is_indexed_by_the_key():
    t = CountTable(direct_bits=2 * VOCAB_BITS)
    keys = np.array([0, 5, (1 << 20) - 1])
    assert (t.find(keys) == -1).all() and t.nbytes == 8 << 20
    t.add(t.upsert(keys), np.array([1, 2, 3]), np.array([0, 7, 1]))
    assert np.array_equal(t.find(keys), keys) and t.find(np.array([6]))[0] == -1
    assert np.array_equal(t.count(keys), [1, 2, 3]) and np.array_equal(t.follow(keys), [0, 7, 1])


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        list(stream_counts(torch.zeros(10, dtype=torch.int64), 1, 10, 3, True, 0))


# sha256 of every count row (tgt, ctx, types, doc_tgt, doc_ctx, doc_types; int32 little-endian,
# orders 2..5, targets 1..end) of the whole bundled validation sample, computed by the
# whole-stream backend (earlier_counts_numpy, which this branch did not touch) when the
# streamed counts were rewritten for speed: the counts decide the blend's scores, so equal
# counts keep the bundled sample's bpb bit for bit.
BUNDLED_COUNTS_SHA256 = "8f4b8b722db8b0e151fa32cee9ddb3e5c32cbefe605075c0806d877f946cc06e"


def test_bundled_sample_counts_are_unchanged():
    tok = D.load_tokens(D.bundled_val_glob(), "val")
    parts = list(stream_counts(tok, 1, tok.numel(), 5, True))
    h = hashlib.sha256()
    for k in ("tgt", "ctx", "types", "doc_tgt", "doc_ctx", "doc_types"):
        h.update(np.concatenate([getattr(p, k) for p in parts], 1).astype("<i4").tobytes())
    assert h.hexdigest() == BUNDLED_COUNTS_SHA256
