"""The n-gram cache: scoring throughput on the bundled ~1M-token validation sample, and the
device hash table's inserts/s and lookups/s against the number of keys.

Scoring providers: ``numpy`` (ours: exact counts over the whole history and over the current
document, normalised blend; the CPU path, streamed in chunks), ``numpy-history-only`` (the same
without the document-level counts, ``NgramConfig(doc=False)``), ``numpy-whole-stream`` (the
same scores from the earlier whole-stream path: one sort per order over every position) and
``hashed-record`` (a reimplementation of the original record's hashed two-table numpy cache
with 2048-token chunks: the speed baseline, invalid as a distribution). The model's
log-probabilities are a fixed stand-in: the cache's cost does not depend on their values.

Table providers: ``triton`` (the open-addressing table on the device), ``ref`` (the plain
dictionary, the table's specification) and ``numpy-sorted`` (the CPU path: sorted unique keys
and counts, merged with ``np.unique``, looked up by binary search; ``peers.SortedCountsTable``).
Keys: 2^18, 2^20 and 2^22 on a GPU (the CPU tables up to 2^20); 2^11 and 2^12 on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proteus import data as D
from proteus.eval.blend import NgramConfig, ngram_blend_logprobs
from proteus.eval.counts import doc_counts_ref, earlier_counts, earlier_counts_numpy
from proteus.eval.hashed import hashed_numpy_cache_logprobs
from proteus.kernels.ngram_table import NgramTable, NgramTableRef

from .conftest import ON_GPU, Case, check_then_time, run_timed, sweep
from .peers import SortedCountsTable


@pytest.fixture(scope="module")
def stream():
    tokens = D.load_tokens(D.bundled_val_glob(), "val")
    logp = torch.full((tokens.numel() - 1,), -4.0, dtype=torch.float64)
    return tokens, logp


@pytest.mark.parametrize("provider", ["numpy", "numpy-history-only", "numpy-whole-stream",
                                      "hashed-record"])
def test_bench_cache_scoring(benchmark, stream, provider):
    tokens, logp = stream
    n = tokens.numel() - 1
    if provider == "numpy-whole-stream":
        # the numpy backend before the streamed counts: one sort of the whole stream per order
        # (a batch of one stream still takes that path); its scores are the default's, bit
        # for bit (tests/test_ngram_counts.py)
        def fn():
            return ngram_blend_logprobs(tokens[None], 1, n + 1, logp[None], NgramConfig())[0]
    elif provider.startswith("numpy"):
        head = tokens[:20000]
        # the timed path: both kinds of counts from the numpy backend's sorts
        a, c = earlier_counts_numpy(head, 20000, 5, doc_start=1)
        b, d = earlier_counts(head, 20000, 5, "ref"), doc_counts_ref(head, 1, 20000, 5)
        assert torch.equal(a.occ, b.occ) and torch.equal(a.types, b.types)
        assert all(torch.equal(x, y) for x, y in ((c.tgt, d.tgt), (c.ctx, d.ctx),
                                                  (c.types, d.types)))
        cfg = NgramConfig(doc=provider == "numpy")
        fn = lambda: ngram_blend_logprobs(tokens, 1, n + 1, logp, cfg)  # noqa: E731
    else:
        fn = lambda: hashed_numpy_cache_logprobs(tokens.numpy(), logp.numpy())  # noqa: E731

    def check(out):
        assert out.shape[0] == n and np.isfinite(np.asarray(out)).all()

    check_then_time(benchmark, fn, check, case=Case("ngram cache scoring", f"{n:,} tokens (CPU)"),
                    provider=provider, tokens=n, baseline=provider == "hashed-record", rounds=3)


KEYS = (1 << 18, 1 << 20, 1 << 22) if ON_GPU else (1 << 11, 1 << 12)
# the CPU tables (a Python dict takes ~1 s per million keys) stop at a million keys on a GPU
CPU_MAX_KEYS = 1 << 20
TABLES = {"ref": NgramTableRef, "numpy-sorted": SortedCountsTable}
TABLE_CASES = [c for c in sweep(KEYS, ["triton", *TABLES], KEYS[-1])
               if c.values[1] == "triton" or c.values[0] <= CPU_MAX_KEYS]


@pytest.mark.parametrize("op", ["insert", "lookup"])
@pytest.mark.parametrize(("n_keys", "provider"), TABLE_CASES)
def test_bench_table(benchmark, device, n_keys, provider, op):
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 1 << 50, (n_keys,), generator=g) | (3 << 60)
    if provider == "triton":
        keys_d = keys.to(device)
        table = NgramTable(1 << (n_keys.bit_length() + 1), device)
    else:
        keys_d, table = keys, TABLES[provider]()
    table.insert(keys_d)
    table.insert(keys_d[:2048])
    want = torch.ones(min(4096, n_keys), dtype=torch.int32)
    want[:2048] += 1
    assert torch.equal(table.lookup(keys_d[:4096]).cpu(), want)  # once each, 2048 twice
    if op == "insert":
        fn = lambda: table.insert(keys_d)  # noqa: E731
    else:
        fn = lambda: table.lookup(keys_d)  # noqa: E731
    run_timed(benchmark, fn, case=Case(f"ngram table {op}", f"{n_keys:,} keys", "keys", n_keys),
              provider=provider, items=n_keys,
              rounds=30 if ON_GPU and provider == "triton" else 3)
