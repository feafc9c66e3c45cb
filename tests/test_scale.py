"""The evaluator at scale: shards read in windows, and the n-gram cache's memory bound on a
10 M-token stand-in (``proteus data synth-val``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from proteus import data as D
from proteus import synth
from proteus.eval.stream_counts import CHUNK, _Counter

# Counts a stand-in's validation stream through the streaming cache counts and prints the
# process's peak resident memory above what it held before counting, and the tables' bytes.
_MEASURE = """
import json, resource, sys
from proteus import data as D
from proteus.eval.stream_counts import _Counter, CHUNK
w = D.ShardWindows(sys.argv[1])
n = len(w)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
counter = _Counter(5, True)
for a in range(0, n, CHUNK):
    counter.step(w, a, min(n, a + CHUNK), max(a, 1))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(tokens=n, peak_above=peak - base, tables=counter.nbytes)))
"""


def test_shard_windows_read_what_load_tokens_reads(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1024, k).astype(np.uint16) for k in (5, 0, 700, 33)]
    for i, p in enumerate(parts):
        D.write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", p)
    pattern = str(tmp_path / "fineweb_val_*.bin")
    full = D.load_tokens(pattern, "val").numpy()
    w = D.ShardWindows(pattern)
    assert len(w) == full.size == 738
    for a, b in ((0, 738), (0, 5), (4, 6), (5, 705), (700, 738), (737, 738), (10, 10), (0, 999)):
        got = w[a:b]
        assert got.dtype == np.int64 and np.array_equal(got, full[a:b]), (a, b)
    with pytest.raises(TypeError, match="contiguous slices"):
        w[::2]
    with pytest.raises(D.DataError, match="outside the vocabulary of 100"):
        D.ShardWindows(pattern, vocab_size=100)[0:738]


@pytest.mark.slow
def test_cache_memory_bound_on_a_10m_token_stand_in(tmp_path, monkeypatch):
    # ~8,700 documents of the real lengths: ~10 M tokens, in shards of 4 M
    monkeypatch.setattr(synth, "SHARD_TOKENS", 4_000_000)
    rec = synth.synth_val(str(tmp_path / "v"), 8_700, seed=1)
    assert rec["tokens"] > 9_500_000 and len(rec["shards"]) == 3
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "v" / "*.bin")],
                         capture_output=True, text=True, timeout=1800, check=True)
    m = json.loads(out.stdout)
    per_million = 64 * 2**20 * m["tokens"] / 1e6  # the bound: 64 MiB per 1 M tokens of history
    assert m["tables"] < per_million and m["peak_above"] < per_million, m


def test_cache_tables_grow_at_most_64_mib_per_million_tokens():
    # the part of the cache's memory that grows with the stream, at the bundled sample's size
    # (1.04 M tokens: the most distinct n-grams per token the tables will see; the slow test
    # holds the whole process's peak on a 10 M-token stand-in)
    tok = D.load_tokens(D.bundled_val_glob(), "val")
    counter = _Counter(5, True)
    a, n = 0, tok.numel()
    while a < n:
        b = min(n, a + CHUNK)
        counter.step(tok, a, b, max(a, 1))
        a = b
    assert counter.nbytes < 64 * 2**20 * n / 1e6, counter.nbytes
