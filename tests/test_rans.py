"""The artifact's value coder (proteus/rans.py): delta rows, bit for bit, and their fields.

A delta row is coded as its residual against an earlier row of the same matrix. The residual
is taken modulo the kind's alphabet, so it inverts exactly for every pair of values; the
writer uses it only where it makes the file smaller; a crafted header or side section that
misplaces the rows is refused with one line.
"""

from __future__ import annotations

import json
import lzma
import struct
import zlib

import numpy as np
import pytest
import torch
from test_checkpoint import _rewrite  # a crafted header: edited JSON, checksums redone

from proteus import artifact as A
from proteus.errors import ProteusError
from proteus.quant import QTensor, QuantizedState
from proteus.rans import (
    KIND_ALPHABET,
    check_delta_pairs,
    nearest_earlier_rows,
    plan_delta_rows,
    residual,
    undo_delta_rows,
)


@pytest.mark.parametrize("kind", list(KIND_ALPHABET))
def test_residual_inverts_for_every_pair_of_values(kind):
    alphabet, off = KIND_ALPHABET[kind]
    values = np.arange(-off, off)  # every symbol, the unused -off included
    row, ref = np.meshgrid(values, values)
    res = residual(row.ravel(), ref.ravel(), kind)
    assert res.min() >= -off and res.max() < off  # a symbol of the same alphabet
    q = np.stack([ref.ravel(), res])  # row 1 is coded against row 0
    back = undo_delta_rows(q, np.array([[1, 0]]), kind)
    assert np.array_equal(back[1], row.ravel())


def _near_copies(rows=96, cols=64, seed=0):
    """Random int8 rows; every third row from 30 on is a copy of an earlier row with a few
    entries moved by one step (what the untrained rows of a tied embedding look like)."""
    g = np.random.default_rng(seed)
    q = np.clip(np.round(g.normal(0, 40, (rows, cols))), -127, 127).astype(np.int64)
    copies = {}
    for i in range(30, rows, 3):
        src = int(g.integers(0, i))
        q[i] = np.clip(q[src] + (g.random(cols) < 0.2) * g.choice([-1, 1], cols), -127, 127)
        copies[i] = src
    return q, copies


def test_plan_picks_the_near_copies_and_only_them():
    q, copies = _near_copies()
    assert np.array_equal(nearest_earlier_rows(q)[list(copies)], list(copies.values()))
    v, pairs = plan_delta_rows(q, "int8")
    assert dict(pairs.tolist()) == copies
    assert np.array_equal(undo_delta_rows(v, pairs, "int8"), q)
    assert np.abs(v[list(copies)]).max() <= 1  # the copies' residuals are steps of one
    assert check_delta_pairs(pairs, q.shape[0])
    for bad in ([[0, 0]], [[5, 5]], [[5, 7]], [[9, 1], [9, 2]], [[9, 1], [8, 2]], [[96, 1]]):
        assert not check_delta_pairs(np.array(bad), 96), bad


def _state(with_copies=True):
    q, _ = _near_copies(rows=200, cols=128, seed=1)
    if not with_copies:
        q = np.clip(np.round(np.random.default_rng(2).normal(0, 40, q.shape)), -127, 127)
    g = torch.Generator().manual_seed(3)
    qs = QuantizedState()
    qs.tensors["tok_emb.weight"] = QTensor("int8", q.shape, q=torch.from_numpy(q).to(torch.int8),
                                           scale=torch.rand(q.shape[0], generator=g).half())
    w6 = torch.randint(-31, 32, (64, 128), generator=g, dtype=torch.int8)
    qs.tensors["blocks.0.mlp.fc.weight"] = QTensor("int6", (64, 128), q=w6,
                                                   scale=torch.ones(64).half())
    return qs


def _header(raw: bytes) -> dict:
    hlen = struct.unpack_from("<I", raw, 12)[0]
    return json.loads(lzma.decompress(raw[16 : 16 + hlen]))


def test_delta_rows_round_trip_and_pay(tmp_path, monkeypatch):
    qs = _state()
    path = str(tmp_path / "d.int6")
    info = A.write_artifact(path, qs, {})
    hdr = _header(open(path, "rb").read())
    streams = hdr["tensors"][-1]["streams"]
    assert streams["int8"].get("delta") == 1 and "delta" not in streams["int6"]
    emb = next(e for e in hdr["tensors"] if e["name"] == "tok_emb.weight")
    assert emb["refs"][1] == len(range(30, 200, 3))
    back, _ = A.read_artifact(path)
    for n, t in qs.tensors.items():
        assert torch.equal(back.tensors[n].q, t.q) and torch.equal(back.tensors[n].scale, t.scale)
    row = next(ln for ln in A.inspect_artifact(path).splitlines() if ln.startswith("tok_emb"))
    assert row.split()[-1] == str(len(range(30, 200, 3)))  # inspect shows the delta rows
    # the same state without delta rows: a bigger file, in the format of before
    monkeypatch.setattr(A, "plan_delta_rows", lambda q2, kind: (q2, np.zeros((0, 2), np.int64)))
    plain = A.write_artifact(str(tmp_path / "p.int6"), qs, {})
    assert "delta" not in _header(open(plain.path, "rb").read())["tensors"][-1]["streams"]["int8"]
    assert info.total_bytes < plain.total_bytes - 2000, (info.total_bytes, plain.total_bytes)
    assert torch.equal(A.read_artifact(plain.path)[0].tensors["tok_emb.weight"].q,
                       qs.tensors["tok_emb.weight"].q)


def test_without_near_copies_the_writer_keeps_the_old_format(tmp_path):
    path = str(tmp_path / "n.int6")
    A.write_artifact(path, _state(with_copies=False), {})
    hdr = _header(open(path, "rb").read())
    assert all("refs" not in e for e in hdr["tensors"])
    assert all("delta" not in s for s in hdr["tensors"][-1]["streams"].values())


def _rewrite_side(raw: bytes, edit) -> bytes:
    """The artifact with its side section's bytes changed by ``edit(bytearray, header)``, the
    section re-compressed and every offset and checksum redone: a crafted file."""
    hlen = struct.unpack_from("<I", raw, 12)[0]
    hdr = _header(raw)
    payload = raw[16 + hlen + 4 :]
    blobs = {s["name"]: payload[s["offset"] : s["offset"] + s["nbytes"]] for s in hdr["sections"]}
    side = bytearray(lzma.decompress(blobs["side"]))
    edit(side, hdr)
    blobs["side"] = lzma.compress(bytes(side))
    at = 0
    for s in hdr["sections"]:
        s.update(offset=at, nbytes=len(blobs[s["name"]]), crc32=zlib.crc32(blobs[s["name"]]))
        at += s["nbytes"]
    header = lzma.compress(json.dumps(hdr).encode())
    prefix = raw[:8] + struct.pack("<II", A.ARTIFACT_VERSION, len(header)) + header
    body = b"".join(blobs[s["name"]] for s in hdr["sections"])
    return prefix + struct.pack("<I", zlib.crc32(prefix)) + body


def _emb(h):
    return next(e for e in h["tensors"] if e["name"] == "tok_emb.weight")


def _set_pair(k, row, ref):
    def edit(side, h):
        at = _emb(h)["refs"][0] + 8 * k
        side[at : at + 8] = struct.pack("<ii", row, ref)
    return edit


def test_crafted_delta_fields_give_one_line(tmp_path):
    good = str(tmp_path / "good.int6")
    A.write_artifact(good, _state(), {})
    raw = open(good, "rb").read()
    header_edits = [
        ("refs='x'", lambda h: _emb(h).update(refs="x")),
        ("refs=[0]", lambda h: _emb(h).update(refs=[0])),
        ("count 0", lambda h: _emb(h).update(refs=[_emb(h)["refs"][0], 0])),
        ("count = rows", lambda h: _emb(h).update(refs=[_emb(h)["refs"][0], 200])),
        ("count - 1", lambda h: _emb(h).update(refs=[_emb(h)["refs"][0], _emb(h)["refs"][1] - 1])),
        ("offset + 1", lambda h: _emb(h).update(refs=[_emb(h)["refs"][0] + 1, _emb(h)["refs"][1]])),
        ("refs dropped", lambda h: _emb(h).pop("refs")),
        ("stream delta dropped", lambda h: h["tensors"][-1]["streams"]["int8"].pop("delta")),
        ("stream delta 2", lambda h: h["tensors"][-1]["streams"]["int8"].update(delta=2)),
        ("refs on the int6 entry", lambda h: next(e for e in h["tensors"] if e.get("kind") ==
                                                  "int6").update(refs=[0, 1])),
    ]
    side_edits = [("pair row 0", _set_pair(0, 0, 0)), ("ref = row", _set_pair(0, 30, 30)),
                  ("ref after row", _set_pair(0, 30, 40)), ("rows repeat", _set_pair(1, 30, 2)),
                  ("row past the end", _set_pair(56, 200, 3)),
                  ("negative ref", _set_pair(0, 30, -1))]
    path = tmp_path / "m.int6"
    cases = [(label, _rewrite(raw, e)) for label, e in header_edits]
    cases += [(label, _rewrite_side(raw, e)) for label, e in side_edits]
    for label, data in cases:
        path.write_bytes(data)
        with pytest.raises(ProteusError) as e:
            A.read_artifact(str(path))
            pytest.fail(f"{label}: read without an error")
        assert "\n" not in str(e.value), label
    path.write_bytes(_rewrite_side(raw, lambda side, h: None))  # the helper alone: still loads
    assert torch.equal(A.read_artifact(str(path))[0].tensors["tok_emb.weight"].q,
                       _state().tensors["tok_emb.weight"].q)


@pytest.mark.parametrize("kind, draw", [("int8", "uniform"), ("int6", "normal")])
def test_unrelated_rows_never_become_delta_rows(kind, draw):
    # the nearest of 1,023 unrelated rows is a little closer than a typical one; that is not
    # similarity, and coding it as a residual would cost bits
    g = np.random.default_rng(4)
    qmax = {"int8": 127, "int6": 31}[kind]
    q = (g.integers(-qmax, qmax + 1, (1024, 256)) if draw == "uniform"
         else np.clip(np.round(g.normal(0, 3, (1024, 256))), -qmax, qmax).astype(np.int64))
    assert plan_delta_rows(q, kind)[1].shape == (0, 2)
