"""The artifact file format: a safe, checksummed container with rANS-coded int6/int8 values.

Artifact file (little-endian)::

    magic  b"PROTEUS\\x00" (8 B) | version u32 | header length u32 | header | crc32 u32
    payload: the sections at the offsets the header's table gives (relative to payload)

The crc32 covers everything before it (magic, version, length and header; version 1 files,
still read, covered the header only), so a damaged version field is told apart from a file
of a newer format. The header is LZMA-compressed JSON; it holds ``meta`` (the run config and
notes), ``tensors`` (name, kind, shape, where its values and side data are) and ``sections``
(offset, nbytes and crc32 of every section). Reading parses JSON and numpy buffers only:
nothing is unpickled or executed. Every section is checked against its crc32, and the header's
table is checked for consistency (kinds, shapes, offsets, sizes, that each kind's symbols are
tiled exactly, the memory it needs) before anything is decoded, so a damaged or crafted file
raises one ArtifactError instead of half-loading, asking for terabytes or crashing.

Payload sections: ``side`` (LZMA of: per-tensor scales, row/column classes, the frequency
tables, and the small fp16/fp32 tensors), then one rANS stream per integer kind (``int6``, ``int7``,
``int8``). Values are symbols (int6: q + 32; int8: q + 128); each symbol's context is a
bucket of its predicted magnitude from its row's and column's mean |q|: 16 buckets whose
static frequency tables (quantised to 2^14) are shared by all tensors of the kind (see
``_contexts``: the row/column spread enters through a rank-1 magnitude prediction). rANS uses
a 32-bit state and 16-bit renormalisation over interleaved lanes, so encoding and decoding
are numpy-vectorised across lanes. The contexts capture structure a single order-0 model
misses: trained matrices have input columns and output rows of very different
spread, so the value distribution depends on where it sits.

Grouped coding (format v2 files without it still read): a stream may split its tables by role
(``attn.c_q.weight``, ``mlp.fc.weight``, ... across layers; LQER factors form one role). Each
role then has its own 16 tables (stream ``groups``/``roles``, entry ``group``). The writer
splits only when the estimated code length plus the compressed tables comes out smaller.
Rows are never reordered. A context model with static tables codes a matrix in the same
number of bits whatever the order of its rows. A permutation would only add bytes; it pays
for LZ-style coders such as the record's lrzip, not here.

LQER factors (``QTensor.lqer``) are int8 entries ``<name>#lqer_a`` / ``#lqer_b`` tied to their
int6/int7 matrix by ``lqer_of``; their shapes are checked against it before decoding.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from proteus.device import require_memory
from proteus.errors import ProteusError
from proteus.files import InputError, atomic_write, parse_json, read_bounded
from proteus.quant import INT_QMAX, ArtifactError, QTensor, QuantizedState

ARTIFACT_MAGIC = b"PROTEUS\x00"
ARTIFACT_VERSION = 2
READS_VERSIONS = (1, 2)
MAX_HEADER_BYTES = 64 << 20  # decompressed JSON header; a real one is tens of KB
ARTIFACT_LIMIT = 16_000_000  # the challenge's budget: code bytes + artifact bytes (decimal)
MAX_ARTIFACT_BYTES = 1 << 30  # a file read as an artifact: 64x the budget, refused beyond
PROB_BITS = 14
RANS_L = 1 << 16


# ---------------------------------------------------------------------------------------------
# rANS over interleaved lanes, with context-conditional static frequency tables


def _freq_table(counts: np.ndarray) -> np.ndarray:
    """Counts -> frequencies summing to 2^PROB_BITS, every present symbol >= 1."""
    m = 1 << PROB_BITS
    total = int(counts.sum())
    if total == 0:
        return np.zeros_like(counts)
    f = np.where(counts > 0, np.maximum(1, (counts * m) // total), 0).astype(np.int64)
    order = np.argsort(-counts, kind="stable")[: np.count_nonzero(counts)]
    i, diff = 0, m - int(f.sum())
    while diff:  # hand the rounding remainder to (or take it from) the most frequent symbols
        s = order[i % order.size]
        if diff > 0:
            f[s] += 1
            diff -= 1
        elif f[s] > 1:
            f[s] -= 1
            diff += 1
        i += 1
    return f


def _lanes(n: int) -> int:
    """Interleaved streams: enough for vectorised speed, few enough that states stay cheap."""
    lanes = 32
    while lanes < 4096 and lanes * 4096 < n:
        lanes *= 2
    return lanes


def rans_encode(sym: np.ndarray, ctx: np.ndarray, freqs: np.ndarray) -> tuple[bytes, int]:
    """Encode symbols ``sym`` with per-symbol context ``ctx`` under tables ``freqs[ctx]``.

    Returns (blob, lanes): blob = final lane states (u32 each) + 16-bit words in the order
    the decoder consumes them (step-major, then lane).
    """
    n = sym.size
    lanes = _lanes(n)
    steps = -(-n // lanes)
    pad = steps * lanes - n
    cums = np.concatenate([np.zeros((freqs.shape[0], 1), np.int64), np.cumsum(freqs, 1)[:, :-1]],
                          axis=1)
    pad_sym = int(np.argmax(freqs[0]))  # padding: a symbol context 0 can code; decoded, dropped
    s = np.concatenate([sym.astype(np.int64), np.full(pad, pad_sym)]).reshape(steps, lanes)
    c = np.concatenate([ctx.astype(np.int64), np.zeros(pad, np.int64)]).reshape(steps, lanes)
    f_all = freqs[c, s].astype(np.uint64)
    c_all = cums[c, s].astype(np.uint64)
    x = np.full(lanes, RANS_L, np.uint64)
    emitted = np.empty((steps, lanes), np.uint16)
    emit_mask = np.empty((steps, lanes), bool)
    k16, kp = np.uint64(16), np.uint64(PROB_BITS)
    bound = np.uint64((RANS_L >> PROB_BITS) << 16)
    for t in range(steps - 1, -1, -1):
        f = f_all[t]
        m = x >= bound * f
        emitted[t] = (x & np.uint64(0xFFFF)).astype(np.uint16)
        emit_mask[t] = m
        x = np.where(m, x >> k16, x)
        x = ((x // f) << kp) + x % f + c_all[t]
    words = emitted[emit_mask]
    return x.astype("<u4").tobytes() + words.astype("<u2").tobytes(), lanes


def rans_decode(blob: bytes, n: int, ctx: np.ndarray, freqs: np.ndarray, lanes: int
                ) -> np.ndarray:
    m = 1 << PROB_BITS
    n_words = (len(blob) - 4 * lanes) // 2
    if n_words < 0 or 4 * lanes + 2 * n_words != len(blob):
        raise ArtifactError("rANS stream has the wrong length")
    x = np.frombuffer(blob, "<u4", lanes, 0).astype(np.uint64)
    words = np.frombuffer(blob, "<u2", n_words, 4 * lanes).astype(np.uint64)
    n_ctx, alphabet = freqs.shape
    cums = np.concatenate([np.zeros((n_ctx, 1), np.int64), np.cumsum(freqs, 1)], axis=1)
    lookup = np.zeros((n_ctx, m), np.int64)
    for k in range(n_ctx):
        if freqs[k].sum() == m:
            lookup[k] = np.repeat(np.arange(alphabet), freqs[k])
    steps = -(-n // lanes)
    c = np.concatenate([ctx.astype(np.int64), np.zeros(steps * lanes - n, np.int64)])
    c = c.reshape(steps, lanes)
    out = np.empty((steps, lanes), np.int64)
    pos, mask_bits, kp = 0, np.uint64(m - 1), np.uint64(PROB_BITS)
    for t in range(steps):
        ct = c[t]
        slot = (x & mask_bits).astype(np.int64)
        s = lookup[ct, slot]
        out[t] = s
        x = freqs[ct, s].astype(np.uint64) * (x >> kp) + (slot - cums[ct, s]).astype(np.uint64)
        need = x < np.uint64(RANS_L)
        k = int(np.count_nonzero(need))
        if k:
            if pos + k > n_words:
                raise ArtifactError("rANS stream is corrupt (ran out of words)")
            x[need] = (x[need] << np.uint64(16)) | words[pos : pos + k]
            pos += k
    if pos != n_words or not np.all(x == RANS_L):
        raise ArtifactError("rANS stream is corrupt (final state mismatch)")
    return out.ravel()[:n]


# Context of entry (i, j) of a quantised matrix: a bucket of its predicted magnitude under a
# rank-1 scale model, |q_ij| ~ rowmean_i * colmean_j / mean (trained matrices have input
# columns and output rows of very different spread). Log-means are stored as integers
# (quarter-octaves), so encoder and decoder derive identical contexts. On a trained cpu-tiny
# model this took the int6 payload from 396 KB (order-0 entropy) to 385 KB of rANS output.
N_CTX = 16
# puts the predicted log2 magnitude range on 16 buckets (int7: one octave above int6)
CTX_OFFSET = {"int6": 12, "int7": 8, "int8": 4}


def _log_means(q2: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    a = np.abs(q2.astype(np.float64))
    code = lambda m: np.round(4 * np.log2(m + 0.05)).astype(np.int8)  # noqa: E731
    return code(a.mean(1)), code(a.mean(0)), int(code(np.array([a.mean()]))[0])


def _contexts(kind: str, rl: np.ndarray, cl: np.ndarray, ml: int) -> np.ndarray:
    pred = rl.astype(np.int64)[:, None] + cl.astype(np.int64)[None, :] - ml
    return np.clip((pred + CTX_OFFSET[kind]) // 2, 0, N_CTX - 1).ravel()


# ---------------------------------------------------------------------------------------------
# Artifact write / read


@dataclass
class ArtifactInfo:
    path: str
    total_bytes: int
    section_bytes: dict


KIND_ALPHABET = {"int6": (64, 32), "int7": (128, 64), "int8": (256, 128)}  # symbol = q + offset
LQER_SUFFIX = ("#lqer_a", "#lqer_b")  # table entries of a tensor's LQER factors (int8 kind)


def _entries(qstate: QuantizedState):
    """(name, tensor, the tensor its LQER factor belongs to or None), factors after their
    tensor: each factor is an int8 entry of its own, tied to it by ``lqer_of``."""
    for name, t in qstate.tensors.items():
        yield name, t, None
        for suffix, f in zip(LQER_SUFFIX, t.lqer or (), strict=False):
            yield name + suffix, f, name


def _encode_payload(qstate: QuantizedState) -> tuple[list[dict], dict[str, bytes]]:
    """Tensor table + sections: 'side' (LZMA: scales, classes, tables, small tensors) and one
    rANS stream per integer kind."""
    side = io.BytesIO()
    table: list[dict] = []
    streams = {k: ([], []) for k in KIND_ALPHABET}
    sym_offset = {k: 0 for k in KIND_ALPHABET}
    roles: dict[str, list[tuple[dict, str]]] = {k: [] for k in KIND_ALPHABET}
    for name, t, owner in _entries(qstate):
        e = dict(name=name, kind=t.kind, shape=list(t.shape))
        if owner is not None:
            e["lqer_of"] = owner
        if t.kind in KIND_ALPHABET:
            alphabet, off = KIND_ALPHABET[t.kind]
            q2 = t.q.numpy().reshape(t.q.shape[0], -1)
            rl, cl, ml = _log_means(q2)
            ctx = _contexts(t.kind, rl, cl, ml)
            e.update(side=side.tell(), rows=q2.shape[0], cols=q2.shape[1], ml=ml,
                     sym=sym_offset[t.kind])
            side.write(t.scale.numpy().astype("<f2").tobytes())
            side.write(rl.tobytes())
            side.write(cl.tobytes())
            streams[t.kind][0].append(q2.astype(np.int64).ravel() + off)
            streams[t.kind][1].append(ctx)
            roles[t.kind].append((e, "lqer" if owner else re.sub(r"^blocks\.\d+\.", "", name)))
            sym_offset[t.kind] += q2.size
        else:
            arr = t.data.contiguous()
            e.update(side=side.tell(), dtype=str(arr.dtype).replace("torch.", ""))
            side.write(arr.numpy().tobytes())
        table.append(e)
    sections: dict[str, bytes] = {}
    stream_meta = {}
    for kind, (syms, ctxs) in streams.items():
        if not syms:
            continue
        alphabet, _ = KIND_ALPHABET[kind]
        sym = np.concatenate(syms)
        names = sorted({r for _, r in roles[kind]})
        group_of = [names.index(r) for _, r in roles[kind]]
        grouped = np.concatenate([c + g * N_CTX for c, g in zip(ctxs, group_of, strict=True)])
        ctx, freqs = _tables(sym, np.concatenate(ctxs), alphabet, 1)
        g_ctx, g_freqs = _tables(sym, grouped, alphabet, len(names))
        groups = 1
        if len(names) > 1 and _cost(sym, g_ctx, g_freqs) < _cost(sym, ctx, freqs):
            ctx, freqs, groups = g_ctx, g_freqs, len(names)
            for (e, _), g in zip(roles[kind], group_of, strict=True):
                e["group"] = g
        blob, lanes = rans_encode(sym, ctx, freqs)
        stream_meta[kind] = dict(side=side.tell(), n=int(sym.size), lanes=lanes)
        if groups > 1:
            stream_meta[kind].update(groups=groups, roles=names)
        side.write(freqs.astype("<u2").tobytes())
        sections[kind] = blob
    sections["side"] = lzma.compress(side.getvalue(), preset=9 | lzma.PRESET_EXTREME)
    table.append(dict(name="__streams__", streams=stream_meta))
    return table, sections


def _tables(sym: np.ndarray, ctx: np.ndarray, alphabet: int, groups: int
            ) -> tuple[np.ndarray, np.ndarray]:
    counts = np.zeros((groups * N_CTX, alphabet), np.int64)
    np.add.at(counts, (ctx, sym), 1)
    freqs = np.stack([_freq_table(c) for c in counts])
    freqs[counts.sum(1) == 0, 0] = 1 << PROB_BITS  # unused contexts: any valid table
    return ctx, freqs


def _cost(sym: np.ndarray, ctx: np.ndarray, freqs: np.ndarray) -> float:
    """Bytes the rANS stream will take (its ideal code length under ``freqs``) plus the
    compressed tables: what decides whether grouping tensors by role pays."""
    bits = -np.log2(freqs[ctx, sym] / (1 << PROB_BITS)).sum()
    tables = lzma.compress(freqs.astype("<u2").tobytes(), preset=9 | lzma.PRESET_EXTREME)
    return bits / 8 + len(tables)


SECTION_ORDER = ("side", "int6", "int7", "int8")


def write_artifact(path: str, qstate: QuantizedState, meta: dict) -> ArtifactInfo:
    """Write atomically (temporary name in the same folder, then rename)."""
    table, sections = _encode_payload(qstate)
    layout, offset, body = [], 0, []
    for name in SECTION_ORDER:
        if name in sections:
            blob = sections[name]
            layout.append(dict(name=name, offset=offset, nbytes=len(blob), crc32=zlib.crc32(blob)))
            body.append(blob)
            offset += len(blob)
    header = lzma.compress(json.dumps(dict(meta=meta, tensors=table, sections=layout),
                                      separators=(",", ":")).encode(), preset=9)
    prefix = ARTIFACT_MAGIC + struct.pack("<II", ARTIFACT_VERSION, len(header)) + header
    head = prefix + struct.pack("<I", zlib.crc32(prefix))
    atomic_write(path, [head, *body])
    return ArtifactInfo(path, len(head) + offset,
                        {"header": len(head), **{s["name"]: s["nbytes"] for s in layout}})


def artifact_meta(path: str, raw: bytes) -> dict:
    """The ``meta`` of an artifact's header (its run config and notes), every header check
    done, nothing decoded."""
    hdr, _, _ = _read_header(path, raw)
    if not isinstance(hdr, dict) or not isinstance(hdr.get("meta"), dict):
        raise ArtifactError(f"{path}: malformed artifact header: expected meta")
    return hdr["meta"]


def _read_header(path: str, raw: bytes) -> tuple[dict, int, int]:
    """(header, payload start, format version) of an artifact's bytes, every check done."""
    if raw[:2] == b"PK":
        raise ArtifactError(f"{path} is a zip/torch.save file, not a PROTEUS artifact; it is "
                            "not loaded (such files can execute code when unpickled)")
    if raw[:1] == b"\x80":
        raise ArtifactError(f"{path} is a pickle, not a PROTEUS artifact; refusing to load it")
    if len(raw) < 16:
        raise ArtifactError(f"{path} is truncated ({len(raw)} bytes): shorter than the header")
    if raw[:8] != ARTIFACT_MAGIC:
        raise ArtifactError(f"{path} has the wrong magic {raw[:8]!r}: not a PROTEUS artifact")
    version, hlen = struct.unpack_from("<II", raw, 8)
    end = 16 + hlen + 4
    stored = struct.unpack_from("<I", raw, 16 + hlen)[0] if len(raw) >= end else None
    if version not in READS_VERSIONS:
        # A newer writer keeps this layout, whose checksum covers the version field: only a
        # version that its checksum vouches for is a newer file; any other is damage.
        if stored is not None and zlib.crc32(raw[: 16 + hlen]) == stored:
            raise ArtifactError(f"{path} is format version {version}, newer than this PROTEUS "
                                f"reads ({', '.join(map(str, READS_VERSIONS))}): upgrade proteus")
        raise ArtifactError(f"{path}: the format version field is damaged (reads {version}; "
                            f"this PROTEUS reads {', '.join(map(str, READS_VERSIONS))})")
    if stored is None:
        raise ArtifactError(f"{path} is truncated inside its header")
    header = raw[16 : 16 + hlen]
    if zlib.crc32(header if version == 1 else raw[: 16 + hlen]) != stored:
        raise ArtifactError(f"{path}: header checksum mismatch (file damaged)")
    try:
        d = lzma.LZMADecompressor()
        text = d.decompress(header, max_length=MAX_HEADER_BYTES)
        if not d.eof:
            raise ValueError("header too large or cut short")
    except (ValueError, lzma.LZMAError):
        raise ArtifactError(f"{path}: header is not valid (LZMA-compressed JSON)") from None
    try:
        return parse_json(text, f"{path}: header"), end, version
    except InputError as e:
        raise ArtifactError(str(e)) from None


_NP_DTYPES = {"float16": np.float16, "float32": np.float32, "int64": np.int64}
DENSE_KINDS = ("fp16", "fp32", "raw")


def _need(cond: bool, path: str, what: str) -> None:
    if not cond:
        raise ArtifactError(f"{path}: malformed artifact header: {what}")


def _is_int(v, lo: int = 0, hi: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _check_table(path: str, hdr, payload_len: int) -> tuple[list[dict], dict, int]:
    """The header's tensor entries and streams, checked against each other and the file:
    (entries, streams, decompressed side length). Nothing is decoded yet."""
    _need(isinstance(hdr, dict) and isinstance(hdr.get("meta"), dict)
          and isinstance(hdr.get("tensors"), list) and isinstance(hdr.get("sections"), list),
          path, "expected meta, tensors and sections")
    pos, names = 0, []
    for sec in hdr["sections"]:
        _need(isinstance(sec, dict) and sec.get("name") in SECTION_ORDER
              and sec["name"] not in names and _is_int(sec.get("offset"))
              and _is_int(sec.get("nbytes")) and _is_int(sec.get("crc32"), 0, 2**32 - 1),
              path, f"bad section entry {str(sec)[:80]}")
        _need(sec["offset"] == pos, path, f"section {sec['name']} is not where the one before "
              "it ends")
        pos += sec["nbytes"]
        names.append(sec["name"])
    _need("side" in names, path, "no side section")
    if pos > payload_len:
        raise ArtifactError(f"{path} is truncated: its sections need {pos} payload bytes, the "
                            f"file has {payload_len}")
    if pos < payload_len:
        raise ArtifactError(f"{path} has trailing bytes after its last section")
    tensors = hdr["tensors"]
    _need(all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in tensors), path,
          "tensor entries must be objects with a name")
    streams = [e for e in tensors if e["name"] == "__streams__"]
    _need(len(streams) == 1 and isinstance(streams[0].get("streams"), dict), path,
          "expected one stream table")
    streams = streams[0]["streams"]
    entries = [e for e in tensors if e["name"] != "__streams__"]
    _need(len({e["name"] for e in entries}) == len(entries), path, "a tensor name repeats")
    regions: list[tuple[int, int]] = []  # (start, bytes) of everything in the side section
    for kind, sm in streams.items():
        _need(kind in KIND_ALPHABET and kind in names and isinstance(sm, dict)
              and _is_int(sm.get("side")) and _is_int(sm.get("n"))
              and _is_int(sm.get("lanes"), 1, 1 << 20)
              and _is_int(sm.get("groups", 1), 1, 256), path, f"bad stream entry {kind}")
        regions.append((sm["side"], 2 * _n_ctx(sm) * KIND_ALPHABET[kind][0]))  # tables
    tiles: dict[str, list[tuple[int, int]]] = {k: [] for k in streams}
    total = 0
    for e in entries:
        name, kind, shape = e["name"], e.get("kind"), e.get("shape")
        _need(kind in KIND_ALPHABET or kind in DENSE_KINDS, path, f"{name}: unknown kind {kind}")
        _need(isinstance(shape, list) and len(shape) <= 8
              and all(_is_int(d, 0, 1 << 40) for d in shape), path, f"{name}: bad shape")
        count = int(np.prod(shape, dtype=object)) if shape else 1
        total += count
        _need(_is_int(e.get("side")), path, f"{name}: bad side offset")
        if kind in KIND_ALPHABET:
            r, c = e.get("rows"), e.get("cols")
            _need(kind in streams and _is_int(r, 1) and _is_int(c, 1) and len(shape) >= 1
                  and r == shape[0] and r * c == count and _is_int(e.get("sym"))
                  and _is_int(e.get("ml"), -128, 127), path, f"{name}: bad {kind} entry")
            _need(_is_int(e.get("group", 0), 0, streams[kind].get("groups", 1) - 1), path,
                  f"{name}: bad group {e.get('group')}")
            tiles[kind].append((e["sym"], r * c))
            regions.append((e["side"], 3 * r + c))  # fp16 scales, row and column classes
        else:
            _need(e.get("dtype") in _NP_DTYPES, path, f"{name}: unsupported dtype "
                  f"{e.get('dtype')}")
            regions.append((e["side"], count * np.dtype(_NP_DTYPES[e["dtype"]]).itemsize))
    _check_lqer(path, entries)
    for kind, spans in tiles.items():
        _tile(path, spans, streams[kind]["n"], f"the {kind} symbol stream")
    side_end = _tile(path, regions, None, "the side section")
    # decoding holds ~5 int64 arrays per symbol; the weights then take 4 bytes per value
    require_memory(40 * total, torch.device("cpu"), f"artifact {path}")
    return entries, streams, side_end


def _n_ctx(stream: dict) -> int:
    """Contexts of a stream: 16 magnitude buckets per role group (one group unless grouped)."""
    return N_CTX * stream.get("groups", 1)


def _check_lqer(path: str, entries: list[dict]) -> None:
    """LQER factor entries: int8, named after an int6/int7 matrix that holds both, of shapes
    (rows, r) and (r, cols) with 1 <= r <= min(rows, cols)."""
    by_name = {e["name"]: e for e in entries}
    for e in entries:
        owner = e.get("lqer_of")
        if owner is None:
            _need(not e["name"].endswith(LQER_SUFFIX), path, f"{e['name']}: a factor name "
                  "without its lqer_of")
            continue
        base = by_name.get(owner) if isinstance(owner, str) else None
        _need(base is not None and base.get("lqer_of") is None
              and base["kind"] in ("int6", "int7") and len(base["shape"]) == 2
              and e["kind"] == "int8" and len(e["shape"]) == 2
              and e["name"] in (owner + LQER_SUFFIX[0], owner + LQER_SUFFIX[1]), path,
              f"{e['name']}: bad LQER factor of {str(owner)[:80]}")
        pair = [by_name.get(owner + s) for s in LQER_SUFFIX]
        _need(all(p is not None and p.get("lqer_of") == owner for p in pair), path,
              f"{owner}: LQER needs both factors")
        (rows, cols), (ar, r), (br, bc) = base["shape"], pair[0]["shape"], pair[1]["shape"]
        _need(ar == rows and bc == cols and br == r and 1 <= r <= min(rows, cols), path,
              f"{owner}: LQER factors of shapes {pair[0]['shape']} and {pair[1]['shape']} do "
              f"not fit ({rows}, {cols})")


def _tile(path: str, spans: list[tuple[int, int]], total: int | None, what: str) -> int:
    """Spans (start, length) that cover [0, end) exactly once, in some order (as the writer
    lays them out); returns end, which must be ``total`` when given."""
    at = 0
    for start, n in sorted(spans):
        _need(start == at, path, f"{what} is not covered exactly once by its table")
        at += n
    _need(total is None or at == total, path, f"{what} holds {total}, its table {at}")
    return at


def read_artifact(path: str, expected_shapes: dict | Callable[[dict], dict] | None = None
                  ) -> tuple[QuantizedState, dict]:
    """Load and verify an artifact; returns (quantised state, meta). Executes nothing.

    ``expected_shapes``: name -> shape that those tensors must have (and every such name must
    be there), or a function of the meta that returns them (checked before decoding)."""
    try:
        raw = read_bounded(path, "artifact", MAX_ARTIFACT_BYTES)
    except InputError as e:
        raise ArtifactError(str(e)) from None
    try:
        return _read(path, raw, expected_shapes)
    except ProteusError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, struct.error,
            lzma.LZMAError) as e:  # a header that passed its checks yet does not decode
        raise ArtifactError(f"{path}: malformed artifact ({type(e).__name__}: {e})") from None


def _read(path: str, raw: bytes, expected_shapes) -> tuple[QuantizedState, dict]:
    hdr, start, _ = _read_header(path, raw)
    payload = memoryview(raw)[start:]
    entries, streams, side_len = _check_table(path, hdr, len(payload))
    sections = {}
    for s in hdr["sections"]:
        blob = bytes(payload[s["offset"] : s["offset"] + s["nbytes"]])
        if zlib.crc32(blob) != s["crc32"]:
            raise ArtifactError(f"{path}: checksum mismatch in section {s['name']} (damaged)")
        sections[s["name"]] = blob
    if callable(expected_shapes):
        expected_shapes = expected_shapes(hdr["meta"])
    if expected_shapes is not None:
        got = {e["name"]: tuple(e["shape"]) for e in entries}
        for name, shape in got.items():
            want = expected_shapes.get(name)
            if want is not None and tuple(want) != shape:
                raise ArtifactError(f"{path}: tensor {name} has shape {shape} "
                                    f"but the config expects {tuple(want)}")
        missing = sorted(set(expected_shapes) - set(got))
        if missing:
            raise ArtifactError(f"{path}: tensors missing for this config: {missing[:5]}")
    d = lzma.LZMADecompressor()
    side = d.decompress(sections["side"], max_length=side_len + 1)
    _need(d.eof and len(side) == side_len, path, f"the side section holds {len(side)} bytes, "
          f"its table says {side_len}")
    decoded = {}
    for kind, sm in streams.items():
        alphabet, _ = KIND_ALPHABET[kind]
        n_ctx = _n_ctx(sm)
        freqs = np.frombuffer(side, "<u2", n_ctx * alphabet, sm["side"]).astype(np.int64)
        freqs = freqs.reshape(n_ctx, alphabet)
        _need(bool(np.all(freqs.sum(1) == 1 << PROB_BITS)), path,
              f"the {kind} frequency tables do not sum to 2^{PROB_BITS}")
        ctx = np.empty(sm["n"], np.int64)
        for e in entries:
            if e["kind"] == kind:
                r, c = e["rows"], e["cols"]
                rl = np.frombuffer(side, np.int8, r, e["side"] + 2 * r)
                cl = np.frombuffer(side, np.int8, c, e["side"] + 3 * r)
                ctx[e["sym"] : e["sym"] + r * c] = (_contexts(kind, rl, cl, e["ml"])
                                                    + N_CTX * e.get("group", 0))
        decoded[kind] = rans_decode(sections[kind], sm["n"], ctx, freqs, sm["lanes"])
    qs = QuantizedState()
    for e in entries:
        name, shape, kind = e["name"], tuple(e["shape"]), e["kind"]
        if kind in KIND_ALPHABET:
            r, c = e["rows"], e["cols"]
            scale = torch.from_numpy(np.frombuffer(side, "<f2", r, e["side"]).copy())
            sym = decoded[kind][e["sym"] : e["sym"] + r * c]
            q = torch.from_numpy((sym - KIND_ALPHABET[kind][1]).astype(np.int8).reshape(r, c))
            qs.tensors[name] = QTensor(kind, shape, q=q, scale=scale)
        else:
            dt = _NP_DTYPES[e["dtype"]]
            count = int(np.prod(shape)) if shape else 1
            arr = np.frombuffer(side, dt, count, e["side"]).copy().reshape(shape)
            qs.tensors[name] = QTensor(kind, shape, data=torch.from_numpy(arr))
    for e in entries:  # the factors join their tensor (checked: both there, shapes fit)
        if e.get("lqer_of") is not None and e["name"].endswith(LQER_SUFFIX[0]):
            owner = qs.tensors[e["lqer_of"]]
            owner.lqer = (qs.tensors.pop(e["name"]),
                          qs.tensors.pop(e["lqer_of"] + LQER_SUFFIX[1]))
    return qs, hdr["meta"]


def lzma_baseline_bytes(qstate: QuantizedState) -> int:
    """The record's encoding: one byte per quantised value (+ scales, + small tensors), LZMA."""
    buf = io.BytesIO()
    for _, t, _ in _entries(qstate):
        if t.kind in INT_QMAX:
            buf.write(t.q.numpy().astype(np.int8).tobytes())
            buf.write(t.scale.numpy().tobytes())
        else:
            buf.write(t.data.contiguous().numpy().tobytes())
    return len(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))


def value_coding_report(qstate: QuantizedState, info: ArtifactInfo) -> dict[str, dict]:
    """Per integer kind: bytes of our rANS stream in the artifact ``write_artifact`` wrote
    (``info``), LZMA over one byte per value (the record's way to store them), and the values'
    order-0 entropy."""
    out = {}
    for kind in KIND_ALPHABET:
        vals = [t.q.numpy().astype(np.int8).ravel() for _, t, _ in _entries(qstate)
                if t.kind == kind]
        if not vals or kind not in info.section_bytes:
            continue
        v = np.concatenate(vals)
        counts = np.bincount(v.astype(np.int64) + 128)
        p = counts[counts > 0] / v.size
        out[kind] = dict(values=int(v.size), rans_bytes=int(info.section_bytes[kind]),
                         lzma_bytes=len(lzma.compress(v.tobytes(), preset=9 | lzma.PRESET_EXTREME)),
                         order0_bytes=float(-(p * np.log2(p)).sum() * v.size / 8))
    return out


def inspect_artifact(path: str) -> str:
    """The tensor table, the sections and their sizes (decodes the payload to report bits/value)."""
    qs, meta = read_artifact(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        hdr, start, version = _read_header(path, f.read())
    lines = [f"{path}: PROTEUS artifact v{version}, {size:,} bytes "
             f"(header {start:,})"]
    for s in hdr["sections"]:
        lines.append(f"  section {s['name']:5s} {s['nbytes']:>12,} bytes  crc32 {s['crc32']:08x}")
    counts = {}
    for _, t, _ in _entries(qs):
        counts[t.kind] = counts.get(t.kind, 0) + int(np.prod(t.shape))
    for kind in KIND_ALPHABET:
        sec = next((s for s in hdr["sections"] if s["name"] == kind), None)
        if sec:
            bits = 8 * sec["nbytes"] / counts[kind]
            lines.append(f"  {kind}: {counts[kind]:,} values, {bits:.3f} "
                         "bits/value in the rANS stream")
    lines.append(f"{'tensor':42s} {'kind':5s} {'shape':>16s}")
    for name, t, _ in _entries(qs):
        lines.append(f"{name:42s} {t.kind:5s} {str(tuple(t.shape)):>16s}")
    return "\n".join(lines)
