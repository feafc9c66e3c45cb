"""Data: the challenge's shard format, a per-rank streaming loader, and bits-per-byte.

Shard format (little-endian): a 256 x int32 header — ``[0]`` magic 20240520, ``[1]`` version 1,
``[2]`` token count — then ``count`` uint16 token ids. Every document starts with BOS (id 1).

Bits per byte, the challenge's scoring rule: ``bpb = (loss_nats / ln 2) * (tokens / bytes)``,
where a target token's bytes are the UTF-8 length of its piece without the leading "▁", plus
one if it has a leading "▁" and the previous token is not a boundary token
(control/unknown/unused), and byte-fallback tokens count one.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from proteus.caseops import OPERATORS as CASEOPS_OPERATORS
from proteus.errors import ProteusError
from proteus.files import InputError, atomic_write, check_file

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
MAX_TOKENIZER_BYTES = 64 << 20  # a 1024-token SentencePiece model is ~250 KB
MAX_SHARD_BYTES = 1 << 36  # a FineWeb shard is ~200 MB


class DataError(ProteusError):
    """Missing, corrupt or mismatched data or tokenizer; the message names the file and the fix."""


# The bundled samples, by vocabulary: SP1024 (the challenge's baseline tokenizer) and SP8192
# CaseOps (the record entries' tokenizer over the same documents, with the validation shard's
# byte sidecar); proteus/data/README.md gives their provenance.
BUNDLED = {1024: ("", "fineweb_1024_bpe.model"),
           8192: ("sp8192_caseops", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")}


def bundled_dir(vocab_size: int = 1024) -> Path:
    if vocab_size not in BUNDLED:
        raise DataError(f"no bundled data for a vocabulary of {vocab_size} (bundled: "
                        f"{', '.join(map(str, BUNDLED))}); pass --tokenizer, --train-files and "
                        "--val-files")
    return Path(str(resources.files("proteus") / "data")) / BUNDLED[vocab_size][0]


def bundled_tokenizer(vocab_size: int = 1024) -> str:
    return str(bundled_dir(vocab_size) / BUNDLED[vocab_size][1])


def bundled_train_glob(vocab_size: int = 1024) -> str:
    return str(bundled_dir(vocab_size) / "fineweb_train_*.bin")


def bundled_val_glob(vocab_size: int = 1024) -> str:
    return str(bundled_dir(vocab_size) / "fineweb_val_*.bin")


def read_shard_header(path: str | os.PathLike) -> int:
    """Check a shard's header against its size; return its token count."""
    path = str(path)
    try:
        if os.path.exists(path):  # a FIFO or a device is refused, not read
            check_file(path, "shard", MAX_SHARD_BYTES)
    except InputError as e:
        raise DataError(str(e)) from None
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(
            f"shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header"
        )
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(
            f"shard {path} has magic {int(header[0])}, expected {SHARD_MAGIC}: "
            "not a challenge token shard"
        )
    if int(header[1]) != SHARD_VERSION:
        raise DataError(
            f"shard {path} has format version {int(header[1])}, this reader knows {SHARD_VERSION}"
        )
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise DataError(
            f"shard {path} is corrupt or truncated: header says {count} tokens "
            f"({expected} bytes) but the file has {size} bytes"
        )
    return count


def load_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """All tokens of one shard as a uint16 array (header checked first); token ids outside
    ``vocab_size``, when it is given, are refused (they would index past the embedding)."""
    count = read_shard_header(path)
    tokens = np.fromfile(str(path), dtype="<u2", count=count, offset=HEADER_BYTES)
    if tokens.size != count:
        raise DataError(f"shard {path}: read {tokens.size} of {count} tokens")
    if vocab_size is not None and tokens.size:
        top = int(tokens.max())
        if top >= vocab_size:
            raise DataError(f"shard {path} holds token id {top}, outside the vocabulary of "
                            f"{vocab_size}; tokenize it with the model's tokenizer or set "
                            "--vocab-size")
    return tokens


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write tokens in the challenge format (atomically: temp name, then rename)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise DataError("write_shard: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    atomic_write(path, [header.tobytes(), tokens.astype("<u2").tobytes()])


def is_byte_sidecar(path: str | os.PathLike) -> bool:
    """A byte sidecar (``fineweb_val_bytes_NNNNNN.bin``) is in the shard format but holds byte
    counts, not tokens: a glob such as ``fineweb_val_*.bin`` never reads one as tokens."""
    return "_bytes_" in os.path.basename(str(path))


def sidecar_path(shard: str | os.PathLike) -> str:
    """Where the byte sidecar of a validation shard lives: ``fineweb_val_bytes_`` + its number."""
    head, name = os.path.split(str(shard))
    return os.path.join(head, name.replace("_val_", "_val_bytes_", 1))


def resolve_files(pattern: str, what: str) -> list[str]:
    files = sorted(f for f in glob.glob(pattern) if not is_byte_sidecar(f))
    if not files:
        raise DataError(
            f"no {what} shards match {pattern!r}; pass an existing glob "
            f"(--{what}-files) or leave it empty for the bundled sample"
        )
    return files


def load_tokens(pattern: str, what: str, limit: int = 0, vocab_size: int | None = None
                ) -> torch.Tensor:
    """Concatenate the shards matching ``pattern`` (int64), optionally only the first ``limit``
    (token ids checked against ``vocab_size`` when given)."""
    parts, total = [], 0
    for path in resolve_files(pattern, what):
        parts.append(load_shard(path, vocab_size))
        total += parts[-1].size
        if limit and total >= limit:
            break
    tokens = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    return tokens[:limit] if limit else tokens


class ShardWindows:
    """The concatenated shards of ``pattern`` read in windows: ``len()`` tokens, and
    ``windows[a:b]`` -> int64 array of tokens a..b-1, read from memory-mapped shards (only the
    pages of the window are touched, so a reader of a 60 M-token set holds what it slices).
    Headers are checked when it opens; token ids are checked against ``vocab_size`` per window.
    """

    def __init__(self, pattern: str, what: str = "val", vocab_size: int | None = None):
        self.files = resolve_files(pattern, what)
        self.counts = [read_shard_header(f) for f in self.files]
        self.offsets = np.concatenate(([0], np.cumsum(self.counts))).astype(np.int64)
        self.vocab_size = vocab_size
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.files[i], dtype="<u2", mode="r",
                                      offset=HEADER_BYTES, shape=(self.counts[i],))
        return self._maps[i]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardWindows: only contiguous slices [a:b] are read")
        a, b, _ = key.indices(len(self))
        out = np.empty(max(0, b - a), np.int64)
        if b <= a:
            return out
        first = int(np.searchsorted(self.offsets, a, "right")) - 1
        at = a
        for i in range(first, len(self.files)):
            if at >= b:
                break
            lo, hi = at - int(self.offsets[i]), min(b, int(self.offsets[i + 1])) - int(
                self.offsets[i])
            if hi > lo:
                out[at - a : at - a + hi - lo] = self._map(i)[lo:hi]
                at += hi - lo
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            raise DataError(f"validation tokens {a:,}..{b:,} hold token id {int(out.max())}, "
                            f"outside the vocabulary of {self.vocab_size}")
        return out


def load_byte_sidecar(pattern: str, limit: int = 0) -> torch.Tensor | None:
    """The original UTF-8 bytes of every token of the shards matching ``pattern`` (int64, the
    same length and order as :func:`load_tokens`), from their byte sidecars; ``None`` when the
    shards have none (bytes then come from the tokenizer's pieces: :class:`ByteLUT`). Shards
    with and without sidecars are not mixed, and each sidecar must count its shard's tokens."""
    shards = resolve_files(pattern, "val")
    have = [os.path.exists(sidecar_path(f)) for f in shards]
    if not any(have):
        return None
    if not all(have):
        missing = shards[have.index(False)]
        raise DataError(f"shard {missing} has no byte sidecar {sidecar_path(missing)} while "
                        "other shards of the glob do; use shards of one kind")
    parts, total = [], 0
    for f in shards:
        nbytes = load_shard(sidecar_path(f))
        if nbytes.size != read_shard_header(f):
            raise DataError(f"byte sidecar {sidecar_path(f)} counts {nbytes.size} tokens, its "
                            f"shard {f} holds {read_shard_header(f)}")
        parts.append(nbytes)
        total += nbytes.size
        if limit and total >= limit:
            break
    out = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    return out[:limit] if limit else out


class TokenStream:
    """Endless stream over training shards; each rank reads its own disjoint slice of a step.

    Every step consumes ``global_tokens + 1`` consecutive tokens from the stream (shards are
    concatenated, wrapping at the end); rank ``r`` of ``w`` takes the ``r``-th contiguous chunk
    of ``global_tokens / w + 1`` tokens (inputs and shifted targets). The ranks' slices never
    overlap, and the union over ranks equals what one process would read for the same step.
    """

    def __init__(self, pattern: str, rank: int = 0, world: int = 1,
                 vocab_size: int | None = None):
        self.files = resolve_files(pattern, "train")
        for f in self.files:
            if read_shard_header(f) == 0:  # _take could never finish a batch over it
                raise DataError(f"shard {f} holds no tokens; remove it or fix the glob")
        self.rank, self.world, self.vocab_size = rank, world, vocab_size
        self._file_idx, self._pos = -1, 0
        self._tokens = np.zeros(0, dtype=np.uint16)

    def state(self) -> tuple[int, int]:
        """The stream's position (shard index, offset): :meth:`restore` returns to it."""
        return self._file_idx, self._pos

    def restore(self, state: tuple[int, int]) -> None:
        """Continue from a position :meth:`state` returned (the shard is re-read if needed)."""
        file_idx, pos = state
        if not -1 <= file_idx < len(self.files) or pos < 0:
            raise DataError(f"stream position {state} is outside the {len(self.files)} "
                            "training shards")
        if file_idx != self._file_idx:
            self._tokens = (load_shard(self.files[file_idx], self.vocab_size) if file_idx >= 0
                            else np.zeros(0, dtype=np.uint16))
        self._file_idx, self._pos = file_idx, pos

    def shards(self) -> list[tuple[str, int]]:
        """(file name, token count) of every shard, in stream order: a saved position means
        the same thing only over the same shards."""
        return [(os.path.basename(f), read_shard_header(f)) for f in self.files]

    def _take(self, n: int) -> np.ndarray:
        out, need = [], n
        while need:
            if self._pos >= self._tokens.size:
                self._file_idx = (self._file_idx + 1) % len(self.files)
                self._tokens = load_shard(self.files[self._file_idx], self.vocab_size)
                self._pos = 0
                if not self._tokens.size:  # emptied since it was opened: no progress possible
                    raise DataError(f"shard {self.files[self._file_idx]} holds no tokens")
            chunk = self._tokens[self._pos : self._pos + need]
            out.append(chunk)
            self._pos += chunk.size
            need -= chunk.size
        return np.concatenate(out)

    def next_batch(self, global_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if global_tokens % (self.world * seq_len):
            raise DataError(
                f"batch of {global_tokens} tokens does not split into {self.world} ranks x "
                f"sequences of {seq_len}"
            )
        per_rank = global_tokens // self.world
        span = self._take(global_tokens + 1)
        local = torch.from_numpy(
            span[self.rank * per_rank : (self.rank + 1) * per_rank + 1].astype(np.int64)
        )
        x = local[:-1].view(-1, seq_len)
        y = local[1:].view(-1, seq_len)
        return x, y


# ---------------------------------------------------------------------------------------------
# Tokenizer and bits per byte


def load_tokenizer(path: str = "", vocab_size: int = 1024):
    """The SentencePiece model at ``path``, or the bundled one for ``vocab_size`` when empty."""
    path = path or bundled_tokenizer(vocab_size)
    if not os.path.exists(path):
        raise DataError(
            f"tokenizer {path} not found; pass --tokenizer with the model's .model file "
            "or leave it empty for the bundled one"
        )
    try:
        check_file(path, "tokenizer", MAX_TOKENIZER_BYTES)  # /dev/zero would be read forever
    except InputError as e:
        raise DataError(str(e)) from None
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with its own text
        raise DataError(f"tokenizer {path} could not be loaded: {e}") from None
    if not ok:
        raise DataError(f"tokenizer {path} could not be loaded")
    return sp


@dataclass(frozen=True)
class ByteLUT:
    """Per-token byte counts for bpb, from the tokenizer's pieces (the rule in this module's
    docstring). For a CaseOps tokenizer (proteus.caseops) the operator pieces count no bytes,
    except an operator right after ESC, which is a literal character of the text (3 bytes)."""

    base_bytes: torch.Tensor  # int64 (V,): UTF-8 bytes of the piece without its leading "▁"
    has_space: torch.Tensor  # bool (V,): piece starts with "▁"
    is_boundary: torch.Tensor  # bool (V,): control/unknown/unused token
    escaped_bytes: torch.Tensor | None = None  # int64 (V,): bytes after ESC (CaseOps only)
    esc_id: int = -1  # CaseOps' ESC piece, -1 for other tokenizers

    @property
    def vocab_size(self) -> int:
        return self.base_bytes.numel()

    def target_bytes(self, prev: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Bytes of each target token given the token before it (same shapes)."""
        nb = self.base_bytes[target]
        extra = self.has_space[target] & ~self.is_boundary[prev]
        nb = nb + extra.to(nb.dtype)
        if self.escaped_bytes is not None:
            nb = torch.where(prev == self.esc_id, self.escaped_bytes[target], nb)
        return nb


def build_byte_lut(sp, vocab_size: int | None = None) -> ByteLUT:
    n = sp.vocab_size()
    if vocab_size is not None and vocab_size != n:
        raise DataError(
            f"vocab_size {vocab_size} does not match the tokenizer's {n} pieces; "
            f"set --vocab-size {n} or use the matching tokenizer"
        )
    base = np.zeros(n, dtype=np.int64)
    space = np.zeros(n, dtype=np.bool_)
    boundary = np.zeros(n, dtype=np.bool_)
    operators = {}
    for i in range(n):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
            boundary[i] = True
            continue
        if sp.IsByte(i):
            base[i] = 1
            continue
        piece = sp.IdToPiece(i)
        if piece in CASEOPS_OPERATORS:
            operators[piece] = i
        if piece.startswith("\u2581"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    if len(operators) < len(CASEOPS_OPERATORS):  # not a CaseOps tokenizer
        return ByteLUT(torch.from_numpy(base), torch.from_numpy(space),
                       torch.from_numpy(boundary))
    escaped = base.copy()
    for i in operators.values():
        base[i] = 0
    return ByteLUT(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary),
                   torch.from_numpy(escaped), operators[CASEOPS_OPERATORS[-1]])


def tokenizer_lut(path: str, vocab_size: int) -> ByteLUT:
    """The byte table of the tokenizer at ``path`` (or the bundled one for ``vocab_size``)."""
    return build_byte_lut(load_tokenizer(path, vocab_size), vocab_size)


def bits_per_byte(sum_nll_nats: float, total_bytes: int) -> float:
    """bpb = (mean loss / ln 2) * tokens / bytes = total nats / ln 2 / total bytes."""
    if total_bytes <= 0:
        raise ValueError("bits_per_byte: no bytes scored")
    return sum_nll_nats / math.log(2) / total_bytes


def unigram_bpb(train: torch.Tensor, val: torch.Tensor, lut: ByteLUT) -> float:
    """The unigram baseline: val tokens scored by add-one-smoothed train frequencies."""
    counts = torch.bincount(train, minlength=lut.vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    nll = -logp[val[1:]].sum().item()
    return bits_per_byte(nll, int(lut.target_bytes(val[:-1], val[1:]).sum()))
