"""A validation stand-in of the challenge's size, built from the bundled documents.

The challenge scores 50,000 FineWeb documents (~62 M tokens with SP1024); the package bundles
~1,570 documents (2.47 M tokens). ``synth_val`` writes ``docs`` new documents in the shard
format. Each starts with BOS and takes its length from a bundled validation document drawn at
random (the real length distribution: ~1,150 tokens on average, so ~58 M tokens for 50,000
documents against the real set's ~62 M). It is filled with *pieces* of bundled documents: a
piece is a run of 16..256 consecutive tokens of one source document, at a random offset, from
a source drawn at random for each piece. So the stand-in has document boundaries, the real
token and short n-gram statistics and the real document lengths, but it is not the stream
repeated: a document is a splice of many sources, and two copies of one long passage are rare.

What differs from the real set (the docs page says the same): every piece is text the bundled
sample already holds, so long n-grams (beyond ~16 tokens) recur far more often than in
50,000 fresh documents, which favours an n-gram cache; the junctions between pieces are
mid-sentence and mid-word; documents mix topics; the sources include the training shards
(real FineWeb/FineWeb-Edu text, see proteus/data/README.md), so a model trained on the bundled
shards has seen parts of it. Use it for time and memory at scale, never for a bpb claim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from proteus.config import ConfigError
from proteus.data import BOS_ID, bundled_dir, load_shard, write_shard
from proteus.files import atomic_write_json

PIECE = (16, 256)  # piece lengths, inclusive
SHARD_TOKENS = 10_000_000  # tokens per written shard (the reader streams them in windows)
MAX_DOCS = 1_000_000


def bundled_documents(kind: str = "*") -> list[np.ndarray]:
    """Every document of the bundled shards of ``kind`` (val, train; * both, validation
    first), each starting with BOS."""
    files = sorted(bundled_dir().glob("fineweb_val_*.bin")) if kind in ("*", "val") else []
    files += sorted(bundled_dir().glob("fineweb_train_*.bin")) if kind in ("*", "train") else []
    docs = []
    for f in files:
        tok = load_shard(f)
        starts = np.flatnonzero(tok == BOS_ID)
        bounds = list(starts) + [tok.size]
        docs += [tok[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b - a > 1]
    return docs


def synth_documents(n_docs: int, seed: int = 0):
    """Yield ``n_docs`` spliced documents (uint16 arrays, BOS first), deterministically."""
    src = bundled_documents()
    lengths = np.array([d.size for d in bundled_documents("val")])
    rng = np.random.default_rng(seed)
    for _ in range(n_docs):
        length = int(lengths[rng.integers(lengths.size)])
        out = [np.array([BOS_ID], np.uint16)]
        have = 1
        while have < length:
            d = src[int(rng.integers(len(src)))]
            want = min(int(rng.integers(PIECE[0], PIECE[1] + 1)), length - have, d.size - 1)
            at = 1 + int(rng.integers(d.size - want))  # never the source's BOS
            out.append(d[at : at + want])
            have += want
        yield np.concatenate(out)


def synth_val(out_dir: str, n_docs: int, seed: int = 0) -> dict:
    """Write the stand-in's shards ``fineweb_val_NNNNNN.bin`` (``SHARD_TOKENS`` each, the last
    shorter; documents may cross shards, as in the challenge's) and ``synth_val.json`` (what it
    is, how it was made); return that record. Refuses a bad count or a directory that already
    holds shards, before writing anything."""
    if not 1 <= n_docs <= MAX_DOCS:
        raise ConfigError(f"synth-val: --docs must be in [1, {MAX_DOCS:,}], got {n_docs}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"synth-val: --out {out_dir} is a file; pass a directory")
    if out.is_dir() and any(out.glob("fineweb_val_*.bin")):
        raise ConfigError(f"synth-val: {out_dir} already holds validation shards; pass an "
                          "empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    buf, held, shards, total = [], 0, [], 0

    def flush(final: bool) -> None:
        nonlocal buf, held
        while held >= SHARD_TOKENS or (final and held):
            tok = np.concatenate(buf)
            path = out / f"fineweb_val_{len(shards):06d}.bin"
            write_shard(path, tok[:SHARD_TOKENS])
            shards.append(path.name)
            rest = tok[SHARD_TOKENS:]
            buf, held = ([rest], rest.size) if rest.size else ([], 0)

    for doc in synth_documents(n_docs, seed):
        buf.append(doc)
        held += doc.size
        total += doc.size
        flush(False)
    flush(True)
    record = {"format": "proteus-synth-val-1", "docs": n_docs, "tokens": total,
              "seed": seed, "shards": shards, "piece_tokens": list(PIECE),
              "sources": "the bundled shards of proteus/data (validation and training)",
              "differs": "spliced from the bundled sample: long n-grams recur more often than "
                         "in fresh text; junctions mid-sentence; topics mixed; includes the "
                         "bundled training text. For time and memory at scale, not for bpb."}
    atomic_write_json(out / "synth_val.json", record)
    return record
