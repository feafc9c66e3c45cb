"""The n-gram table's key format, in one place (plain Python: importable without torch/triton).

A key packs an n-gram of token ids as ``n << 60 | x_{t-n+1} << 10(n-1) | ... | x_t``: ``VOCAB_BITS``
bits per token and an order tag in bits 60-62, so at most ``MAX_ORDER`` tokens fit in the 60
bits below the tag and a vocabulary of at most ``2**VOCAB_BITS`` ids.
"""

VOCAB_BITS = 10
MAX_ORDER = 6
