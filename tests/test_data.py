"""Shard format, per-rank loader, byte LUT and bits per byte."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from proteus import data as D


@pytest.fixture(scope="module")
def sp():
    return D.load_tokenizer()


@pytest.fixture(scope="module")
def lut(sp):
    return D.build_byte_lut(sp, 1024)


def test_bundled_shards_have_valid_headers():
    for path in D.resolve_files(D.bundled_val_glob(), "val") + D.resolve_files(
        D.bundled_train_glob(), "train"
    ):
        n = D.read_shard_header(path)
        assert n > 100_000
        toks = D.load_shard(path)
        assert toks.size == n and toks[0] == D.BOS_ID and toks.max() < 1024


def test_val_byte_count_matches_provenance(lut):
    # data/README.md: the 1,040,297 target tokens of the val shard hold 2,504,867 bytes.
    val = D.load_tokens(D.bundled_val_glob(), "val")
    assert val.numel() == 1_040_298
    assert int(lut.target_bytes(val[:-1], val[1:]).sum()) == 2_504_867


@pytest.mark.parametrize(
    "text",
    ["Hello world", "The quick brown fox jumps over the lazy dog.", "naïve café — 東京 2024!",
     "  spaces\tand\nnewlines  ", "emoji 🙂 and math ∑"],
)
def test_byte_count_of_known_text_equals_utf8_length(sp, lut, text):
    # A document is BOS + pieces; the bytes of its targets must be exactly the text's UTF-8
    # length after the tokenizer's normalisation (decode(encode(text))).
    ids = [D.BOS_ID] + sp.encode(text)
    t = torch.tensor(ids)
    counted = int(lut.target_bytes(t[:-1], t[1:]).sum())
    assert counted == len(sp.decode(ids[1:]).encode("utf-8"))


def test_bits_per_byte_formula():
    # 2 tokens, 3 bytes, mean loss ln(2) nats -> 2 bits / 3 bytes
    assert D.bits_per_byte(2 * math.log(2), 3) == pytest.approx(2 / 3)


def _write(path, tokens):
    D.write_shard(path, np.asarray(tokens, dtype=np.uint16))
    return str(path)


def test_truncated_shard_is_a_clear_error(tmp_path):
    p = _write(tmp_path / "s.bin", np.arange(100))
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:-10])
    with pytest.raises(D.DataError, match=r"s\.bin.*(corrupt|truncated)"):
        D.load_shard(p)
    open(p, "wb").write(raw[:100])
    with pytest.raises(D.DataError, match="truncated"):
        D.read_shard_header(p)


def test_wrong_magic_and_version_are_clear_errors(tmp_path):
    p = _write(tmp_path / "s.bin", np.arange(10))
    raw = bytearray(open(p, "rb").read())
    bad = raw.copy()
    bad[0:4] = (1234).to_bytes(4, "little")
    open(p, "wb").write(bad)
    with pytest.raises(D.DataError, match="magic 1234"):
        D.load_shard(p)
    bad = raw.copy()
    bad[4:8] = (7).to_bytes(4, "little")
    open(p, "wb").write(bad)
    with pytest.raises(D.DataError, match="version 7"):
        D.load_shard(p)


def test_missing_files_and_tokenizer_are_clear_errors(tmp_path):
    with pytest.raises(D.DataError, match="no train shards match"):
        D.TokenStream(str(tmp_path / "nothing_*.bin"))
    with pytest.raises(D.DataError, match="tokenizer .* not found"):
        D.load_tokenizer(str(tmp_path / "missing.model"))


def test_vocab_mismatch_is_a_clear_error(sp):
    with pytest.raises(D.DataError, match="vocab_size 2048 does not match"):
        D.build_byte_lut(sp, 2048)


def test_ranks_get_disjoint_slices_whose_union_is_the_single_process_batch(tmp_path):
    p = _write(tmp_path / "a.bin", np.arange(1000) % 60000)
    _write(tmp_path / "b.bin", 10000 + np.arange(777))
    pattern = str(tmp_path / "*.bin")
    one = D.TokenStream(pattern)
    ranks = [D.TokenStream(pattern, rank=r, world=4) for r in range(4)]
    for _ in range(5):  # crosses the shard boundary and wraps around
        x1, y1 = one.next_batch(256, 16)
        parts = [s.next_batch(256, 16) for s in ranks]
        assert torch.equal(torch.cat([x for x, _ in parts]), x1)
        assert torch.equal(torch.cat([y for _, y in parts]), y1)
        flat = [set(x.flatten().tolist()) for x, _ in parts]
        for i in range(4):
            for j in range(i + 1, 4):
                assert not flat[i] & flat[j]
    assert p


def test_batch_not_divisible_is_a_clear_error(tmp_path):
    _write(tmp_path / "a.bin", np.arange(1000))
    s = D.TokenStream(str(tmp_path / "a.bin"), rank=0, world=3)
    with pytest.raises(D.DataError, match="does not split into 3 ranks"):
        s.next_batch(256, 16)


def test_unigram_baseline_is_sane(lut):
    val = D.load_tokens(D.bundled_val_glob(), "val", limit=20001)
    train = D.load_tokens(D.bundled_train_glob(), "train", limit=200000)
    u = D.unigram_bpb(train, val, lut)
    assert 2.5 < u < 5.0
