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

Payload sections: ``side`` (LZMA of: per-tensor scales, row/column classes, delta-row pairs,
the frequency tables, and the small fp16/fp32 tensors), then one rANS stream per integer kind
(``int6``, ``int7``, ``int8``). Values are symbols (int6: q + 32; int8: q + 128) coded under
context tables; the coder, its contexts and delta rows are ``proteus.rans``'s.

Grouped coding (format v2 files without it still read): a stream may split its tables by role
(``attn.c_q.weight``, ``mlp.fc.weight``, ... across layers; LQER factors form one role). Each
role then has its own 16 tables (stream ``groups``/``roles``, entry ``group``).

Delta rows (v2 files without them still read): a stream with ``delta: 1`` has 16 more tables,
for rows coded as their residual against an earlier row of the same matrix; an entry's
``refs: [side offset, k]`` points to its k (row, ref) int32 pairs, checked (rows increasing,
each ref before its row) before they are used. Rows are never reordered: a static context
model codes a matrix in the same bits whatever the order of its rows, so the similarity of
rows enters through the residual, not the order.

The writer estimates each choice's code length plus its tables and pairs (one or per-role
table sets, with or without delta rows) and keeps the smallest, so a file only carries a
field where it pays.

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
from proteus.rans import (  # noqa: F401  (PROB_BITS, _freq_table: re-exported for tests)
    KIND_ALPHABET,
    N_CTX,
    PROB_BITS,
    _contexts,
    _freq_table,
    _log_means,
    check_delta_pairs,
    plan_delta_rows,
    rans_decode,
    rans_encode,
    undo_delta_rows,
)

ARTIFACT_MAGIC = b"PROTEUS\x00"
ARTIFACT_VERSION = 2
READS_VERSIONS = (1, 2)
MAX_HEADER_BYTES = 64 << 20  # decompressed JSON header; a real one is tens of KB
ARTIFACT_LIMIT = 16_000_000  # the challenge's budget: code bytes + artifact bytes (decimal)
MAX_ARTIFACT_BYTES = 1 << 30  # a file read as an artifact: 64x the budget, refused beyond


# ---------------------------------------------------------------------------------------------
# Artifact write / read


@dataclass
class ArtifactInfo:
    path: str
    total_bytes: int
    section_bytes: dict


LQER_SUFFIX = ("#lqer_a", "#lqer_b")  # table entries of a tensor's LQER factors (int8 kind)


def _entries(qstate: QuantizedState):
    """(name, tensor, the tensor its LQER factor belongs to or None), factors after their
    tensor: each factor is an int8 entry of its own, tied to it by ``lqer_of``."""
    for name, t in qstate.tensors.items():
        yield name, t, None
        for suffix, f in zip(LQER_SUFFIX, t.lqer or (), strict=False):
            yield name + suffix, f, name


def _coded(t: QTensor, delta: bool) -> dict:
    """One integer tensor as the coder sees it: symbols, log-means and delta pairs."""
    q2 = t.q.numpy().reshape(t.q.shape[0], -1).astype(np.int64)
    v, pairs = plan_delta_rows(q2, t.kind) if delta else (q2, np.zeros((0, 2), np.int64))
    direct = np.ones(q2.shape[0], bool)
    direct[pairs[:, 0]] = False
    rl, cl, ml = _log_means(v, direct)
    return dict(sym=v.ravel() + KIND_ALPHABET[t.kind][1], rl=rl, cl=cl, ml=ml, pairs=pairs)


def _choose_coding(kind: str, items: list[tuple[QTensor, str]]) -> tuple[dict, list[dict]]:
    """The cheapest of: one table set or one per role, each with or without delta rows (by
    the estimated code length plus tables and pairs). Returns (stream, one dict per tensor)."""
    alphabet, _ = KIND_ALPHABET[kind]
    names = sorted({r for _, r in items})
    group_of = [names.index(r) for _, r in items]
    best = None
    for delta in (False, True):
        coded = [_coded(t, delta) for t, _ in items]
        if delta and not any(c["pairs"].size for c in coded):
            continue
        sym = np.concatenate([c["sym"] for c in coded])
        pairs = b"".join(c["pairs"].astype("<i4").tobytes() for c in coded)
        pair_bytes = len(lzma.compress(pairs, preset=9 | lzma.PRESET_EXTREME)) if pairs else 0
        for groups in sorted({1, len(names)}):
            gs = group_of if groups > 1 else [0] * len(coded)
            ctx = np.concatenate([
                _contexts(kind, c["rl"], c["cl"], c["ml"], g, c["pairs"][:, 0], N_CTX * groups)
                for c, g in zip(coded, gs, strict=True)])
            freqs = _tables(sym, ctx, alphabet, groups + delta)
            cost = _cost(sym, ctx, freqs) + pair_bytes
            if best is None or cost < best[0]:
                best = (cost, dict(groups=groups, delta=int(delta), ctx=ctx, freqs=freqs,
                                   sym=sym), coded, gs)
    _, stream, coded, gs = best
    for c, g in zip(coded, gs, strict=True):
        c["group"] = g
    stream["roles"] = names
    return stream, coded


def _encode_payload(qstate: QuantizedState) -> tuple[list[dict], dict[str, bytes]]:
    """Tensor table + sections: 'side' (LZMA: scales, classes, delta pairs, tables, small
    tensors) and one rANS stream per integer kind."""
    entries = list(_entries(qstate))
    coded: dict[str, dict] = {}
    streams: dict[str, dict] = {}
    for kind in KIND_ALPHABET:
        items = [(name, t, "lqer" if owner else re.sub(r"^blocks\.\d+\.", "", name))
                 for name, t, owner in entries if t.kind == kind]
        if items:
            streams[kind], cs = _choose_coding(kind, [(t, r) for _, t, r in items])
            coded.update({name: c for (name, _, _), c in zip(items, cs, strict=True)})
    side = io.BytesIO()
    table: list[dict] = []
    sym_offset = {k: 0 for k in KIND_ALPHABET}
    for name, t, owner in entries:
        e = dict(name=name, kind=t.kind, shape=list(t.shape))
        if owner is not None:
            e["lqer_of"] = owner
        if t.kind in KIND_ALPHABET:
            c = coded[name]
            rows, cols = c["rl"].size, c["cl"].size
            e.update(side=side.tell(), rows=rows, cols=cols, ml=c["ml"], sym=sym_offset[t.kind])
            side.write(t.scale.numpy().astype("<f2").tobytes())
            side.write(c["rl"].tobytes())
            side.write(c["cl"].tobytes())
            if c["pairs"].size:
                e["refs"] = [side.tell(), int(c["pairs"].shape[0])]
                side.write(c["pairs"].astype("<i4").tobytes())
            if streams[t.kind]["groups"] > 1:
                e["group"] = c["group"]
            sym_offset[t.kind] += rows * cols
        else:
            arr = t.data.contiguous()
            e.update(side=side.tell(), dtype=str(arr.dtype).replace("torch.", ""))
            side.write(arr.numpy().tobytes())
        table.append(e)
    sections: dict[str, bytes] = {}
    stream_meta = {}
    for kind, s in streams.items():
        blob, lanes = rans_encode(s["sym"], s["ctx"], s["freqs"])
        stream_meta[kind] = dict(side=side.tell(), n=int(s["sym"].size), lanes=lanes)
        if s["groups"] > 1:
            stream_meta[kind].update(groups=s["groups"], roles=s["roles"])
        if s["delta"]:
            stream_meta[kind]["delta"] = 1
        side.write(s["freqs"].astype("<u2").tobytes())
        sections[kind] = blob
    sections["side"] = lzma.compress(side.getvalue(), preset=9 | lzma.PRESET_EXTREME)
    table.append(dict(name="__streams__", streams=stream_meta))
    return table, sections


def _tables(sym: np.ndarray, ctx: np.ndarray, alphabet: int, sets: int) -> np.ndarray:
    """Frequency tables of ``sets`` x 16 contexts from the symbols' counts."""
    counts = np.bincount(ctx * alphabet + sym, minlength=sets * N_CTX * alphabet)
    counts = counts.reshape(sets * N_CTX, alphabet)
    freqs = np.stack([_freq_table(c) for c in counts])
    freqs[counts.sum(1) == 0, 0] = 1 << PROB_BITS  # unused contexts: any valid table
    return freqs


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
              and _is_int(sm.get("groups", 1), 1, 256) and _is_int(sm.get("delta", 0), 0, 1),
              path, f"bad stream entry {kind}")
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
            refs = e.get("refs")
            if refs is not None:  # delta rows: (row, ref) int32 pairs in the side section
                _need(isinstance(refs, list) and len(refs) == 2 and _is_int(refs[0])
                      and _is_int(refs[1], 1, r - 1) and streams[kind].get("delta") == 1,
                      path, f"{name}: bad delta rows {str(refs)[:80]}")
                regions.append((refs[0], 8 * refs[1]))
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


def _pairs(path: str, side: bytes, e: dict) -> np.ndarray:
    """An entry's delta-row pairs (row, ref), checked; (0, 2) when it has none."""
    if e.get("refs") is None:
        return np.zeros((0, 2), np.int64)
    at, k = e["refs"]
    pairs = np.frombuffer(side, "<i4", 2 * k, at).astype(np.int64).reshape(k, 2)
    _need(check_delta_pairs(pairs, e["rows"]), path, f"{e['name']}: its delta rows must be "
          "increasing rows, each after the row it refers to")
    return pairs


def _n_ctx(stream: dict) -> int:
    """Contexts of a stream: 16 magnitude buckets per role group (one group unless grouped),
    and 16 residual buckets for delta rows when the stream has them."""
    return N_CTX * (stream.get("groups", 1) + stream.get("delta", 0))


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
                ctx[e["sym"] : e["sym"] + r * c] = _contexts(
                    kind, rl, cl, e["ml"], e.get("group", 0), _pairs(path, side, e)[:, 0],
                    N_CTX * sm.get("groups", 1))
        decoded[kind] = rans_decode(sections[kind], sm["n"], ctx, freqs, sm["lanes"])
    qs = QuantizedState()
    for e in entries:
        name, shape, kind = e["name"], tuple(e["shape"]), e["kind"]
        if kind in KIND_ALPHABET:
            r, c = e["rows"], e["cols"]
            scale = torch.from_numpy(np.frombuffer(side, "<f2", r, e["side"]).copy())
            sym = decoded[kind][e["sym"] : e["sym"] + r * c]
            q = undo_delta_rows((sym - KIND_ALPHABET[kind][1]).reshape(r, c),
                                _pairs(path, side, e), kind)
            q = torch.from_numpy(q.astype(np.int8))
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
    lines.append(f"{'tensor':42s} {'kind':5s} {'shape':>16s}  delta rows")
    refs = {e["name"]: e.get("refs", [0, 0])[1] for e in hdr["tensors"] if "kind" in e}
    for name, t, _ in _entries(qs):
        k = refs.get(name, 0)
        lines.append(f"{name:42s} {t.kind:5s} {str(tuple(t.shape)):>16s}  {k or '':>10}")
    return "\n".join(lines)
