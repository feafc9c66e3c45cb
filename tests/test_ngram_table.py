"""The device hash table against the dictionary reference: identical counts and lookups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proteus.kernels.ngram_table import NgramTable, NgramTableRef, pack_keys, types_keys

pytestmark = pytest.mark.interpret


def _slot_np(keys: np.ndarray, capacity: int) -> np.ndarray:
    """The kernel's probe start, in numpy (uint64 arithmetic wraps like the kernel's)."""
    x = keys.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0x7FB5D329728EA185)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x81DADEF4BC2DD44D)
    x = x ^ (x >> np.uint64(33))
    return (x & np.uint64(capacity - 1)).astype(np.int64)


def _same(table: NgramTable, ref: NgramTableRef, probe: torch.Tensor) -> None:
    assert len(table) == len(ref)
    assert torch.equal(table.lookup(probe).cpu(), ref.lookup(probe.cpu()))
    live = table.keys.cpu() != -1
    got = dict(zip(table.keys.cpu()[live].tolist(), table.counts.cpu()[live].tolist(),
                   strict=True))
    assert got == ref.table


def test_random_stream_matches_dictionary_including_growth(device):
    g = torch.Generator().manual_seed(1)
    table, ref = NgramTable(16, device), NgramTableRef()
    for _step in range(6):  # starts tiny, so it grows several times
        keys = torch.randint(0, 5000, (700,), generator=g) * 7919 + (3 << 60)
        incs = torch.randint(1, 4, (700,), generator=g, dtype=torch.int32)
        table.insert(keys.to(device), incs.to(device))
        ref.insert(keys, incs)
        probe = torch.cat([keys, torch.randint(0, 5000, (300,), generator=g) * 7919 + (3 << 60)])
        _same(table, ref, probe.to(device))
    assert table.capacity >= 2 * len(table)  # load stays at or below max_load
    assert table.capacity > 16


def test_colliding_keys_one_key_repeated_and_wraparound(device):
    cap = 1 << 12
    cand = np.arange(1, 2_000_000, dtype=np.int64) * 1031 + (2 << 60)
    slots = _slot_np(cand, cap)
    same = cand[slots == slots[0]][:150]  # 150 keys that all start probing at one slot
    last = cand[slots == cap - 1][:40]  # probes that must wrap from the end to slot 0
    assert same.size == 150 and last.size == 40
    keys = torch.from_numpy(np.concatenate([same, same[:50], last, np.full(500, same[7])]))
    keys = keys[torch.randperm(keys.numel(), generator=torch.Generator().manual_seed(0))]
    table, ref = NgramTable(cap, device), NgramTableRef()
    table.insert(keys.to(device))
    ref.insert(keys)
    assert table.capacity == cap  # no growth needed: the test really exercised long probes
    _same(table, ref, torch.cat([keys, keys + 1]).to(device))
    assert ref.table[int(same[7])] == 502


def test_empty_input_and_absent_keys(device):
    table = NgramTable(16, device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    table.insert(empty)
    assert len(table) == 0
    assert table.lookup(empty).numel() == 0
    assert table.lookup(torch.tensor([5, 1 << 62], device=device)).tolist() == [0, 0]


def test_growth_keeps_every_count(device):
    table, ref = NgramTable(16, device), NgramTableRef()
    keys = torch.arange(1000, dtype=torch.int64) * 3 + (1 << 60)
    table.insert(keys.to(device))
    ref.insert(keys)
    table.grow(1 << 14)
    assert table.capacity == 1 << 14
    _same(table, ref, keys.to(device))


def test_bad_input_is_a_clear_error(device):
    table = NgramTable(16, device)
    with pytest.raises(TypeError, match="keys"):
        table.insert(torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="non-negative"):
        table.insert(torch.tensor([-5], device=device))
    with pytest.raises(ValueError, match="keys"):
        table.lookup(torch.zeros(2, 2, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="incs"):
        table.insert(torch.zeros(3, dtype=torch.int64, device=device),
                     torch.ones(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="power of two"):
        NgramTable(100, device)
    with pytest.raises(ValueError, match="order"):
        pack_keys(torch.zeros(10, dtype=torch.int64), 7)
    with pytest.raises(ValueError, match="token ids"):
        pack_keys(torch.tensor([1024, 1]), 2)


def test_keys_are_injective_and_families_disjoint():
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 1024, (4000,), generator=g)
    all_keys, all_grams = [], []
    for n in range(1, 7):
        k = pack_keys(tok, n)
        grams = [(n, *tok[i : i + n].tolist()) for i in range(tok.numel() - n + 1)]
        all_keys += k.tolist()
        all_grams += grams
        assert int(k.min()) >= 0
    for n in range(2, 7):
        k = types_keys(tok, n)
        all_keys += k.tolist()
        all_grams += [("ctx", n, *tok[i : i + n - 1].tolist()) for i in range(k.numel())]
        assert int(k.min()) >= 0
    pairs = dict(zip(all_keys, all_grams, strict=True))
    # same key <=> same n-gram (of the same family and order)
    assert len(set(all_keys)) == len(set(all_grams)) == len(pairs)
