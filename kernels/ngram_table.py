"""GPU-resident exact n-gram count table: open addressing over 64-bit keys, atomic updates.

Keys (``pack_keys``): an n-gram of token ids of ``bits`` bits each (10 for vocab ≤ 1024, n ≤ 6;
13 for vocab ≤ 8192, n ≤ 4: ``_keys.max_order``) is packed as
``n << 60 | x_{t-n+1} << bits(n-1) | ... | x_t``: the order tag keeps n-grams of different orders
distinct, and the packing is injective, so there are no collisions between different n-grams:
counts are exact. Tag 7 is a second family (``types_keys``: ``7 << 60 | n << 50 | context``)
that counts the distinct tokens seen after each context. ``EMPTY = -1`` marks a free slot (a
packed key is never negative: tags stay below 8, bit 63 is clear).

Table: ``keys`` int64 (capacity,), ``counts`` int32 (capacity,), capacity a power of two,
linear probing from ``splitmix64(key) & (capacity - 1)``.

* ``_insert_kernel``: each lane claims a slot with ``atomic_cas(slot, EMPTY, key)``; if the slot
  was empty or already held its key it adds its increment with ``atomic_add``, otherwise it
  probes the next slot. Lanes whose key is already placed drop out of the loop (``atomic_cas``
  has no mask, so inactive lanes compare against ``-2``, which is never stored). Slots newly
  claimed are counted with an atomic add on a size counter.
* ``_lookup_kernel``: probes until the key (return its count) or an empty slot (return 0).

Capacity rule: before an insert of ``m`` keys the table grows (rehash into twice the capacity)
until ``size + m ≤ max_load · capacity`` (default max_load 0.5). Since ``m`` bounds the number of
new keys, an insert can never find the table full: no update is dropped or half-applied.
Integer counts make the results independent of the order in which lanes run: the table's
counts and lookups are bit-identical to the dictionary reference (``NgramTableRef``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreting
from ._common import check_same_device, check_tensor
from ._keys import VOCAB_BITS, max_order

EMPTY = -1
NEVER = -2  # compare value for masked-off lanes: never present in the table
_EMPTY = tl.constexpr(EMPTY)  # the same values, visible inside @triton.jit code
_NEVER = tl.constexpr(NEVER)


def pack_keys(tokens: torch.Tensor, order: int, bits: int = VOCAB_BITS) -> torch.Tensor:
    """Keys of the n-grams ending at positions order-1 .. len-1 of a 1-D int64 token tensor,
    ``bits`` bits per token id."""
    top = max_order(bits)
    if not 1 <= order <= top:
        raise ValueError(f"pack_keys: order must be in [1, {top}] with {bits}-bit token ids, "
                         f"got {order}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= 1 << bits):
        raise ValueError(f"pack_keys: token ids must be in [0, {1 << bits}) ({bits}-bit keys)")
    n = tokens.numel() - order + 1
    if n <= 0:
        return tokens.new_zeros(0)
    key = torch.full((n,), order << 60, dtype=torch.int64, device=tokens.device)
    for i in range(order):
        key |= tokens[i : i + n].to(torch.int64) << (bits * (order - 1 - i))
    return key


def types_keys(tokens: torch.Tensor, order: int, bits: int = VOCAB_BITS) -> torch.Tensor:
    """Keys of the contexts ((order-1)-grams) ending at positions order-2 .. len-1, in a key
    family of their own (``7 << 60 | order << 50 | context``), for per-context type counts."""
    top = max_order(bits)
    if not 2 <= order <= top:
        raise ValueError(f"types_keys: order must be in [2, {top}] with {bits}-bit token ids, "
                         f"got {order}")
    ctx = pack_keys(tokens, order - 1, bits)
    return (ctx & ((1 << 50) - 1)) | (7 << 60) | (order << 50)


@triton.jit
def _slot(key, mask_cap):
    x = key.to(tl.uint64)
    x = (x ^ (x >> 31)) * 0x7FB5D329728EA185
    x = (x ^ (x >> 27)) * 0x81DADEF4BC2DD44D
    x = x ^ (x >> 33)
    return (x & mask_cap.to(tl.uint64)).to(tl.int64)


@triton.jit
def _insert_kernel(keys_ptr, inc_ptr, n, table_keys, table_counts, size_ptr, mask_cap,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    active = offs < n
    key = tl.load(keys_ptr + offs, mask=active, other=0)
    inc = tl.load(inc_ptr + offs, mask=active, other=0)
    slot = _slot(key, mask_cap)
    empty = tl.full((BLOCK,), _EMPTY, tl.int64)
    never = tl.full((BLOCK,), _NEVER, tl.int64)
    while tl.sum(active.to(tl.int32)) > 0:
        cmp = tl.where(active, empty, never)
        old = tl.atomic_cas(table_keys + slot, cmp, key)
        placed = active & ((old == _EMPTY) | (old == key))
        tl.atomic_add(table_counts + slot, inc, mask=placed)
        tl.atomic_add(size_ptr + tl.zeros((BLOCK,), tl.int64), tl.full((BLOCK,), 1, tl.int64),
                      mask=active & (old == _EMPTY))
        active = active & ~placed
        slot = tl.where(active, (slot + 1) & mask_cap, slot)


@triton.jit
def _lookup_kernel(keys_ptr, out_ptr, n, table_keys, table_counts, mask_cap,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    active = offs < n
    key = tl.load(keys_ptr + offs, mask=active, other=0)
    slot = _slot(key, mask_cap)
    result = tl.zeros((BLOCK,), tl.int32)
    while tl.sum(active.to(tl.int32)) > 0:
        cur = tl.load(table_keys + slot, mask=active, other=_EMPTY)
        hit = active & (cur == key)
        result = tl.where(hit, tl.load(table_counts + slot, mask=hit, other=0), result)
        active = active & ~hit & (cur != _EMPTY)
        slot = tl.where(active, (slot + 1) & mask_cap, slot)
    tl.store(out_ptr + offs, result, mask=offs < n)


def _block() -> int:
    return 8192 if interpreting() else 1024


class NgramTable:
    """Exact key -> int32 count table in device memory (see module docstring)."""

    def __init__(self, capacity: int = 1 << 16, device: str | torch.device = "cpu",
                 max_load: float = 0.5):
        if capacity < 16 or capacity & (capacity - 1):
            raise ValueError(f"NgramTable: capacity must be a power of two >= 16, got {capacity}")
        if not 0.0 < max_load < 1.0:
            raise ValueError(f"NgramTable: max_load must be in (0, 1), got {max_load}")
        self.max_load = max_load
        self.device = torch.device(device)
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys = torch.full((capacity,), EMPTY, dtype=torch.int64, device=self.device)
        self.counts = torch.zeros(capacity, dtype=torch.int32, device=self.device)
        self._size = torch.zeros(1, dtype=torch.int64, device=self.device)

    def __len__(self) -> int:
        return int(self._size.item())

    def _check(self, keys: torch.Tensor) -> torch.Tensor:
        check_tensor("NgramTable", "keys", keys, dtypes=(torch.int64,), ndim=1)
        check_same_device("NgramTable", keys=keys, table=self.keys)
        if keys.numel() and int(keys.min()) < 0:
            raise ValueError("NgramTable: keys must be non-negative packed n-grams")
        return keys.contiguous()

    def grow(self, min_capacity: int | None = None) -> None:
        """Rehash into a larger table (at least double); counts are carried over exactly."""
        old_keys, old_counts = self.keys, self.counts
        new_cap = self.capacity * 2
        while min_capacity and new_cap < min_capacity:
            new_cap *= 2
        self._alloc(new_cap)
        live = old_keys != EMPTY
        self._insert(old_keys[live].contiguous(), old_counts[live].contiguous())

    def _insert(self, keys: torch.Tensor, incs: torch.Tensor) -> None:
        n = keys.numel()
        if n:
            block = _block()
            _insert_kernel[(triton.cdiv(n, block),)](
                keys, incs, n, self.keys, self.counts, self._size, self.capacity - 1,
                BLOCK=block)

    def insert(self, keys: torch.Tensor, incs: torch.Tensor | None = None) -> None:
        """Add ``incs`` (default 1 each) to the count of every key (repeats accumulate)."""
        keys = self._check(keys)
        if incs is None:
            incs = torch.ones(keys.numel(), dtype=torch.int32, device=keys.device)
        else:
            check_tensor("NgramTable.insert", "incs", incs, dtypes=(torch.int32,), ndim=1)
            if incs.numel() != keys.numel():
                raise ValueError("NgramTable.insert: incs must have one entry per key")
        need = len(self) + keys.numel()
        if need > self.max_load * self.capacity:
            self.grow(min_capacity=int(need / self.max_load) + 1)
        self._insert(keys, incs.contiguous())

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """int32 count of every key (0 if absent)."""
        keys = self._check(keys)
        out = torch.empty(keys.numel(), dtype=torch.int32, device=keys.device)
        n = keys.numel()
        if n:
            block = _block()
            _lookup_kernel[(triton.cdiv(n, block),)](keys, out, n, self.keys, self.counts,
                                                     self.capacity - 1, BLOCK=block)
        return out


class NgramTableRef:
    """The specification: a plain dictionary of counts with the same API."""

    def __init__(self, capacity: int = 0, device: str | torch.device = "cpu",
                 max_load: float = 0.5):
        self.device = torch.device(device)
        self.table: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.table)

    def insert(self, keys: torch.Tensor, incs: torch.Tensor | None = None) -> None:
        incs_l = [1] * keys.numel() if incs is None else incs.tolist()
        for k, c in zip(keys.tolist(), incs_l, strict=True):
            self.table[k] = self.table.get(k, 0) + c

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.table.get(k, 0) for k in keys.tolist()], dtype=torch.int32,
                            device=self.device)
