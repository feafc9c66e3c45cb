"""The n-gram table's key format, in one place (plain Python: importable without torch/triton).

A key packs an n-gram of token ids as ``n << 60 | x_{t-n+1} << b(n-1) | ... | x_t``: ``b`` bits
per token (``VOCAB_BITS`` = 10 by default, up to ``MAX_VOCAB_BITS`` = 13 for a vocabulary of
8192) and an order tag in bits 60-62, so at most ``60 // b`` tokens fit below the tag. The
per-context type counts use a second family, ``7 << 60 | n << 50 | context``, whose context of
n - 1 tokens must fit in 50 bits. ``max_order(b)`` is the highest order both allow:

    b = 10 (vocab <= 1024): orders up to 6 (``MAX_ORDER``)
    b = 11, 12 (<= 4096):   orders up to 5
    b = 13 (<= 8192):       orders up to 4

The CPU counts (``proteus.eval.counts``, ``proteus.eval.stream_counts``) use the same widths,
so every backend supports the same orders.
"""

VOCAB_BITS = 10
MAX_VOCAB_BITS = 13
MAX_ORDER = 6


def id_bits(vocab_size: int) -> int:
    """Bits per token id in a key for a vocabulary of ``vocab_size`` (at least ``VOCAB_BITS``:
    vocabularies up to 1024 keep the 10-bit keys)."""
    return max(VOCAB_BITS, (int(vocab_size) - 1).bit_length())


def max_order(bits: int = VOCAB_BITS) -> int:
    """The highest n-gram order whose keys hold ``bits``-bit token ids (module docstring)."""
    if not VOCAB_BITS <= bits <= MAX_VOCAB_BITS:
        raise ValueError(f"ngram keys: token ids of {bits} bits are not supported (vocabularies "
                         f"up to {1 << MAX_VOCAB_BITS}, {VOCAB_BITS}..{MAX_VOCAB_BITS} bits)")
    return min(MAX_ORDER, 60 // bits, 50 // bits + 1)
