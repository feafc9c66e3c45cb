"""Content fingerprints of token streams: is this stream (a part of) those tokens?

A fitting step (``tune-cache``, GPTQ calibration) must not see validation tokens, and
``tune-cache`` must not fit on tokens the checkpoint trained on. Comparing files by name or by
a hash of the whole file misses a copy with one header integer changed, a slice, a
concatenation or a reordering. So we compare content instead.

Fingerprint. Every window of ``K`` consecutive tokens (a K-gram) is hashed to 64 bits
(a polynomial hash of the ids, then the splitmix64 finaliser so the bits are uniform). A
K-gram is *sampled* when its hash falls below ``2^64 / RATE``. That choice depends on the
K-gram alone, not on where it sits. The fingerprint of a stream is the sorted set of its
sampled hashes (about one per ``RATE`` tokens). Sampling by value is what makes the test
robust. A slice, a concatenation or a reordering of documents keeps every K-gram inside them,
so it keeps their sampled hashes too. A shard header is never tokens, and a changed header
integer changes nothing.

Overlap. ``overlap(stream, fp)`` is the fraction of the stream's sampled K-grams that are in
``fp``. A stream is refused when that fraction reaches ``REFUSE_FRACTION``.

False positives. Two unrelated K-grams share a 64-bit hash with probability 2^-64. For a
fingerprint of n hashes, a sampled K-gram of new text is a false hit with probability about
n / 2^64 (below 1e-13 for a billion-token reference). Hash collisions therefore play no part
in the refusal. What does play a part is natural text that genuinely repeats: boilerplate and
duplicated documents. Among the four bundled real shards (12 ordered pairs, K=16, RATE=16)
the largest such overlap is 0.70% (train_000001 in val: documents FineWeb holds twice). The
refusal fraction of 2% sits above that with a margin. A stream with less than 2% of its
sampled K-grams in the reference is allowed.

Misses. A copied region of L tokens holds about L/RATE sampled K-grams. It is refused once
they make up 2% of the stream. Validation text diluted below 2% of a stream (a short slice
appended to a long training file) is therefore let through, by design: that is the price of
the false-positive margin above.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from proteus import data as D

K = 16  # tokens per hashed window
RATE = 16  # one sampled K-gram per RATE on average
REFUSE_FRACTION = 0.02

_M64 = np.uint64
_PRIME = _M64(0x100000001B3)


def _kgram_hashes(tokens: np.ndarray, k: int) -> np.ndarray:
    """64-bit hash of every window of ``k`` tokens (wrapping uint64 arithmetic)."""
    t = np.asarray(tokens).astype(np.uint64) + _M64(1)
    n = t.size - k + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    h = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * _PRIME + t[j : j + n]
        h ^= h >> _M64(33)
        h *= _M64(0xFF51AFD7ED558CCD)
        h ^= h >> _M64(33)
        h *= _M64(0xC4CEB93FE53EC889)
        h ^= h >> _M64(33)
    return h


@dataclass(frozen=True)
class Fingerprint:
    """The sorted sampled K-gram hashes of a token stream, with the stream's length."""

    hashes: np.ndarray  # uint64, sorted, unique
    tokens: int
    k: int = K
    rate: int = RATE

    def digest(self) -> str:
        """sha256 of the parameters and hashes: equal digests mean equal fingerprints."""
        h = hashlib.sha256(f"k={self.k},rate={self.rate};".encode())
        h.update(self.hashes.astype("<u8").tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        """What provenance records: the method, the size and the digest."""
        return dict(k=self.k, rate=self.rate, tokens=int(self.tokens),
                    sampled=int(self.hashes.size), sha256=self.digest())

    def __or__(self, other: Fingerprint) -> Fingerprint:
        _same_params(self, other)
        return Fingerprint(np.union1d(self.hashes, other.hashes), self.tokens + other.tokens,
                           self.k, self.rate)


def _same_params(a: Fingerprint, b: Fingerprint) -> None:
    if (a.k, a.rate) != (b.k, b.rate):
        raise ValueError(f"fingerprints of different methods: k={a.k}/rate={a.rate} and "
                         f"k={b.k}/rate={b.rate}")


def _as_numpy(tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    return np.asarray(tokens)


def _sampled(tokens, k: int, rate: int) -> np.ndarray:
    if k < 1 or rate < 1:
        raise ValueError(f"fingerprint: k and rate must be >= 1, got k={k}, rate={rate}")
    h = _kgram_hashes(_as_numpy(tokens), k)
    limit = _M64((1 << 64) // rate - 1) if rate > 1 else _M64(2**64 - 1)
    return h[h <= limit]


def fingerprint(tokens, k: int = K, rate: int = RATE) -> Fingerprint:
    """The fingerprint of a token stream (a 1-D array or tensor of ids)."""
    t = _as_numpy(tokens)
    return Fingerprint(np.unique(_sampled(t, k, rate)), int(t.size), k, rate)


@dataclass(frozen=True)
class Overlap:
    sampled: int  # sampled K-grams in the stream (with repeats)
    hits: int  # of them, how many are in the fingerprint

    @property
    def fraction(self) -> float:
        return self.hits / self.sampled if self.sampled else 0.0

    @property
    def refused(self) -> bool:
        return self.sampled > 0 and self.fraction >= REFUSE_FRACTION

    def describe(self) -> str:
        return (f"{self.hits:,} of its {self.sampled:,} sampled {K}-token windows "
                f"({100 * self.fraction:.1f}%)")


def overlap(stream, fp: Fingerprint) -> Overlap:
    """How much of ``stream`` (tokens, or another Fingerprint's hashes) lies in ``fp``."""
    s = _sampled(stream, fp.k, fp.rate)
    hits = int(np.isin(s, fp.hashes, assume_unique=False).sum()) if s.size else 0
    return Overlap(int(s.size), hits)


def files_fingerprint(files: list[str]) -> Fingerprint:
    """The union of the fingerprints of the shards ``files`` (each hashed on its own, so no
    K-gram straddles two files)."""
    fp = Fingerprint(np.zeros(0, np.uint64), 0)
    for f in files:
        fp = fp | fingerprint(D.load_shard(f))
    return fp


def refuse_overlaps(files: list[str], refs: list[tuple[str, Fingerprint]], purpose: str
                    ) -> dict[str, dict]:
    """Raise ``DataError`` naming the first shard of ``files`` whose content overlaps one of
    ``refs`` (label, fingerprint) by ``REFUSE_FRACTION`` or more; else return each file's
    overlaps (label -> fraction) for provenance. ``purpose``: what the tokens would be for."""
    out = {}
    for f in files:
        tokens = D.load_shard(f)
        row = {}
        for label, fp in refs:
            ov = overlap(tokens, fp)
            if ov.refused:
                raise D.DataError(f"{f} overlaps {label}: {ov.describe()} are in them; "
                                  f"{purpose} (refused by content at >= "
                                  f"{100 * REFUSE_FRACTION:.0f}%)")
            row[label] = round(ov.fraction, 6)
        out[f] = row
    return out


def reference_fingerprints(train_glob: str, val_glob: str) -> list[tuple[str, Fingerprint]]:
    """(label, fingerprint) of the validation tokens and of a checkpoint's training tokens
    (the shards of its ``train_files``; '' = the bundled ones)."""
    val = files_fingerprint(D.resolve_files(val_glob or D.bundled_val_glob(), "val"))
    train = files_fingerprint(D.resolve_files(train_glob or D.bundled_train_glob(), "train"))
    return [("the validation tokens", val), ("the checkpoint's training tokens", train)]
