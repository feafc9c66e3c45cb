"""Quantisers, the artifact format (safe, exact, compact) and evaluation through int6 weights."""

from __future__ import annotations

import errno
import os
import pickle
import zlib

import numpy as np
import pytest
import torch

from proteus import artifact as A
from proteus import quant as Q
from proteus.files import OutputError
from proteus.kernels.int6_matmul import pack_int6, unpack_int6


def _trained_like_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        for name, shape in (("attn.c_q", (64, 64)), ("mlp.fc", (192, 64)), ("mlp.proj", (64, 192))):
            rows = torch.randn(shape[0], 1, generator=g).abs() + 0.2
            cols = torch.randn(1, shape[1], generator=g).abs() + 0.2
            w = torch.distributions.StudentT(4.0).sample(shape) * rows * cols * 0.02
            sd[f"blocks.{i}.{name}.weight"] = w
        sd[f"blocks.{i}.attn_scale"] = torch.ones(64)
    sd["tok_emb.weight"] = torch.randn(1024, 64, generator=g) * 0.05
    sd["smear.gate"] = torch.zeros(64)
    sd["bigram.proj.weight"] = torch.randn(64, 32, generator=g)
    return sd


def test_rules_follow_the_spec():
    sd = _trained_like_state()
    assert Q.tensor_kind("blocks.0.mlp.fc.weight", sd["blocks.0.mlp.fc.weight"]) == "int6"
    assert Q.tensor_kind("tok_emb.weight", sd["tok_emb.weight"]) == "int8"
    assert Q.tensor_kind("bigram.proj.weight", sd["bigram.proj.weight"]) == "fp16"
    assert Q.tensor_kind("blocks.0.attn_scale", sd["blocks.0.attn_scale"]) == "fp32"


def test_quantizer_range_scale_and_sqnr():
    w = torch.randn(32, 128) * torch.linspace(0.1, 2, 32)[:, None]
    q, s = Q.quantize_rows(w, 31)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert q.abs().max() <= 31
    w_hat = q.float() * s.float()[:, None]
    assert Q.sqnr_db(w, w_hat) > 25  # int6 on Gaussian rows: ~30 dB
    # the per-row clip search never does worse than clipping at the row max
    q1, s1 = Q.quantize_rows(w, 31, percentiles=(1.0,))
    err = ((w_hat - w) ** 2).sum(1)
    err1 = ((q1.float() * s1.float()[:, None] - w) ** 2).sum(1)
    assert torch.all(err <= err1 + 1e-12)


def test_quantise_pack_unpack_dequantise_bit_exact():
    sd = _trained_like_state()
    qs = Q.quantize_state_dict(sd)
    for _name, t in qs.tensors.items():
        if t.kind == "int6":
            packed = pack_int6(t.q)
            via_kernel_format = unpack_int6(packed).float() * t.scale.float()[:, None]
            assert torch.equal(via_kernel_format, t.dequantize())


def test_artifact_round_trip_is_exact(tmp_path):
    sd = _trained_like_state()
    qs = Q.quantize_state_dict(sd)
    path = str(tmp_path / "m.int6")
    A.write_artifact(path, qs, {"note": "x"})
    back, meta = A.read_artifact(path)
    assert meta == {"note": "x"}
    for name, t in qs.tensors.items():
        b = back.tensors[name]
        assert b.kind == t.kind and tuple(b.shape) == tuple(t.shape)
        if t.kind in ("int6", "int8"):
            assert torch.equal(b.q, t.q) and torch.equal(b.scale, t.scale)
        else:
            assert torch.equal(b.data, t.data)


def test_rans_round_trip_edge_cases():
    rng = np.random.default_rng(0)
    for n in (1, 5, 4097, 70_000):
        sym = rng.integers(0, 64, n)
        sym[: n // 2] = 31  # skewed
        ctx = rng.integers(0, 3, n)
        counts = np.zeros((3, 64), np.int64)
        np.add.at(counts, (ctx, sym), 1)
        freqs = np.stack([A._freq_table(c) if c.sum() else np.eye(64, dtype=np.int64)[0] *
                          (1 << A.PROB_BITS) for c in counts])
        blob, lanes = A.rans_encode(sym, ctx, freqs)
        assert np.array_equal(A.rans_decode(blob, n, ctx, freqs, lanes), sym)


def test_artifact_beats_lzma_on_trained_like_weights(tmp_path):
    qs = Q.quantize_state_dict(_trained_like_state())
    info = A.write_artifact(str(tmp_path / "m.int6"), qs, {})
    assert info.total_bytes < A.lzma_baseline_bytes(qs)
    rep = A.value_coding_report(qs, info)
    n6 = sum(int(np.prod(t.shape)) for t in qs.tensors.values() if t.kind == "int6")
    assert rep["int6"]["values"] == n6
    r = rep["int6"]
    # the context model codes below the order-0 floor of independent symbols, and LZMA doesn't
    assert r["rans_bytes"] < r["order0_bytes"] < r["lzma_bytes"]


@pytest.fixture
def artifact(tmp_path):
    qs = Q.quantize_state_dict(_trained_like_state())
    path = str(tmp_path / "m.int6")
    A.write_artifact(path, qs, {"a": 1})
    return path


def _mutate(path, fn):
    raw = bytearray(open(path, "rb").read())
    open(path, "wb").write(bytes(fn(raw)))


def test_truncated_file(artifact):
    _mutate(artifact, lambda r: r[: len(r) - 100])
    with pytest.raises(Q.ArtifactError, match="truncated"):
        A.read_artifact(artifact)
    _mutate(artifact, lambda r: r[:10])
    with pytest.raises(Q.ArtifactError, match="truncated"):
        A.read_artifact(artifact)


def test_wrong_magic(artifact):
    _mutate(artifact, lambda r: b"NOTMAGIC" + r[8:])
    with pytest.raises(Q.ArtifactError, match="wrong magic"):
        A.read_artifact(artifact)


def _with_version(r: bytearray, version: int, reseal: bool) -> bytes:
    """``r`` with another version field; ``reseal``: its header checksum redone, as a writer
    of that version would have written it."""
    r = bytes(r[:8] + version.to_bytes(4, "little") + r[12:])
    if not reseal:
        return r
    end = 16 + int.from_bytes(r[12:16], "little")
    return r[:end] + zlib.crc32(r[:end]).to_bytes(4, "little") + r[end + 4 :]


def test_future_version_asks_for_an_upgrade(artifact):
    _mutate(artifact, lambda r: _with_version(r, 99, reseal=True))
    with pytest.raises(Q.ArtifactError, match="version 99, newer.*upgrade"):
        A.read_artifact(artifact)


@pytest.mark.parametrize("version", [0, 3, 99, 2**31 + 2])
def test_damaged_version_field_is_not_called_newer(artifact, version):
    _mutate(artifact, lambda r: _with_version(r, version, reseal=False))
    with pytest.raises(Q.ArtifactError, match="version field is damaged") as e:
        A.read_artifact(artifact)
    assert "upgrade" not in str(e.value)


def test_version_1_is_still_read_and_checked(artifact):
    """Version 1 files (checksum over the header only) load; a 1 written into a version 2
    file is damage, caught by the checksum."""
    raw = open(artifact, "rb").read()
    end = 16 + int.from_bytes(raw[12:16], "little")
    v1 = _with_version(bytearray(raw), 1, reseal=False)
    v1 = v1[:end] + zlib.crc32(v1[16:end]).to_bytes(4, "little") + v1[end + 4 :]
    open(artifact, "wb").write(v1)
    qs, meta = A.read_artifact(artifact)
    assert meta == {"a": 1} and "tok_emb.weight" in qs.tensors
    open(artifact, "wb").write(_with_version(bytearray(raw), 1, reseal=False))
    with pytest.raises(Q.ArtifactError, match="header checksum mismatch"):
        A.read_artifact(artifact)


def test_checksum_mismatch(artifact):
    def flip(r):
        r[-5] ^= 0xFF
        return r
    _mutate(artifact, flip)
    with pytest.raises(Q.ArtifactError, match="checksum mismatch"):
        A.read_artifact(artifact)


def test_shape_disagreeing_with_config(artifact):
    with pytest.raises(Q.ArtifactError, match="expects"):
        A.read_artifact(artifact, expected_shapes={"tok_emb.weight": (1024, 128)})
    with pytest.raises(Q.ArtifactError, match="missing"):
        A.read_artifact(artifact, expected_shapes={"nope.weight": (1,)})


def test_pickle_and_torch_files_are_refused_without_unpickling(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: called.append(1))
    p1 = tmp_path / "evil.pkl"
    p1.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(Q.ArtifactError, match="pickle"):
        A.read_artifact(str(p1))
    p2 = tmp_path / "model.pt"
    torch.save({"x": torch.ones(2)}, p2)
    with pytest.raises(Q.ArtifactError, match="zip/torch.save"):
        A.read_artifact(str(p2))
    assert not called


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    qs = Q.quantize_state_dict(_trained_like_state())
    path = str(tmp_path / "m.int6")
    A.write_artifact(path, qs, {"v": 1})
    before = open(path, "rb").read()
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OutputError, match=r"cannot write .*m\.int6: No space left on device"):
        A.write_artifact(path, qs, {"v": 2})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["m.int6"]


def test_inspect_lists_tensors_and_sections(artifact):
    text = A.inspect_artifact(artifact)
    assert "section int6" in text and "bits/value" in text and "tok_emb.weight" in text
