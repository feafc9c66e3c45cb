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


class FakeSP:
    """A SentencePiece-like vocabulary with one piece of every kind the byte rule names."""

    PIECES = ["<unk>", "<s>", "<0xE2>", "\u2581the", "cat", "\u2581", "\u00e9",
              "\u2581\u6771\u4eac", "<unused>", "a\u2581"]
    KIND = {0: "unknown", 1: "control", 2: "byte", 8: "unused"}

    def vocab_size(self):
        return len(self.PIECES)

    def IdToPiece(self, i):  # noqa: N802 (sentencepiece's names)
        return self.PIECES[i]

    def IsControl(self, i):  # noqa: N802
        return self.KIND.get(i) == "control"

    def IsUnknown(self, i):  # noqa: N802
        return self.KIND.get(i) == "unknown"

    def IsUnused(self, i):  # noqa: N802
        return self.KIND.get(i) == "unused"

    def IsByte(self, i):  # noqa: N802
        return self.KIND.get(i) == "byte"


def test_byte_rule_on_synthetic_pieces():
    lut = D.build_byte_lut(FakeSP())
    # UTF-8 bytes without a leading "▁"; byte tokens 1; boundary tokens 0; an inner "▁" counts
    # its 3 bytes
    assert lut.base_bytes.tolist() == [0, 0, 1, 3, 3, 0, 2, 6, 0, 4]
    assert lut.has_space.tolist() == [False, False, False, True, False, True, False, True,
                                      False, False]
    assert lut.is_boundary.tolist() == [True, True, False, False, False, False, False, False,
                                        True, False]
    pairs = {  # (previous, target): bytes of the target
        (1, 3): 3,  # "▁the" right after BOS (a control token): no byte for the space
        (4, 3): 4,  # "▁the" after "cat": the space is a byte
        (0, 7): 6,  # after <unk> (a boundary token): no space byte
        (8, 5): 0,  # a lone "▁" after an unused token: nothing
        (4, 5): 1,  # a lone "▁" after a piece: the space
        (2, 3): 4,  # after a byte token (not a boundary): the space counts
        (3, 2): 1,  # a byte token: one byte
        (3, 6): 2,  # "é": two bytes
        (6, 9): 4,  # "a▁": the "▁" is not leading
        (3, 1): 0, (3, 0): 0, (1, 1): 0, (3, 8): 0,  # boundary targets carry no bytes
    }
    prev = torch.tensor([a for a, _ in pairs])
    tgt = torch.tensor([b for _, b in pairs])
    assert lut.target_bytes(prev, tgt).tolist() == list(pairs.values())
    assert lut.vocab_size == 10


def test_byte_rule_after_bos_with_the_real_tokenizer(sp, lut):
    # the bundled shards never put a leading-space piece right after BOS; the rule must still
    # drop the space byte there, and count it after an ordinary piece
    the = sp.PieceToId("\u2581the")
    assert sp.IdToPiece(the) == "\u2581the" and sp.IsControl(D.BOS_ID)
    word = sp.PieceToId("ing")
    assert sp.IdToPiece(word) == "ing"
    got = lut.target_bytes(torch.tensor([D.BOS_ID, word, the]), torch.tensor([the, the, the]))
    assert got.tolist() == [3, 4, 4]


def test_bits_per_byte_formula():
    # 2 tokens, 3 bytes, mean loss ln(2) nats -> 2 bits / 3 bytes
    assert D.bits_per_byte(2 * math.log(2), 3) == pytest.approx(2 / 3)


def _write(path, tokens):
    D.write_shard(path, np.asarray(tokens, dtype=np.uint16))
    return str(path)


def test_shard_round_trip_at_the_edges_of_its_format(tmp_path):
    # an empty shard is a header alone; ids use the whole uint16 range; the header is 256 ints
    p = _write(tmp_path / "e.bin", np.zeros(0))
    assert D.read_shard_header(p) == 0 and D.load_shard(p).size == 0
    toks = np.array([0, 1, 65535, 1024, 7], dtype=np.uint16)
    p = _write(tmp_path / "s.bin", toks)
    raw = open(p, "rb").read()
    assert len(raw) == 1024 + 10
    assert np.frombuffer(raw[:12], "<i4").tolist() == [20240520, 1, 5] and not any(raw[12:1024])
    assert np.array_equal(D.load_shard(p), toks)
    with pytest.raises(D.DataError, match="uint16"):
        D.write_shard(tmp_path / "bad.bin", np.array([65536]))
    with pytest.raises(D.DataError, match="uint16"):
        D.write_shard(tmp_path / "bad.bin", np.array([-1, 3]))
    _write(tmp_path / "t.bin", np.arange(50))
    both = str(tmp_path / "[st].bin")
    assert D.load_tokens(both, "val").tolist() == toks.tolist() + list(range(50))
    assert D.load_tokens(both, "val", limit=7).tolist() == toks.tolist() + [0, 1]
    assert D.load_tokens(both, "val", limit=3).tolist() == [0, 1, 65535]


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
    _write(tmp_path / "a.bin", np.arange(1000))
    _write(tmp_path / "b.bin", 10000 + np.arange(777))
    stream = np.concatenate([np.arange(1000), 10000 + np.arange(777)])  # 1777 tokens, cyclic
    pattern = str(tmp_path / "*.bin")
    one = D.TokenStream(pattern)
    ranks = [D.TokenStream(pattern, rank=r, world=4) for r in range(4)]
    for step in range(8):  # 8 x 257 tokens: crosses the shard boundary and wraps around
        span = torch.from_numpy(stream[(step * 257 + np.arange(257)) % 1777])
        x1, y1 = one.next_batch(256, 16)
        assert torch.equal(x1, span[:-1].view(16, 16)) and torch.equal(y1, span[1:].view(16, 16))
        parts = [s.next_batch(256, 16) for s in ranks]
        for r, (x, y) in enumerate(parts):  # rank r: the r-th quarter, and its next token
            assert torch.equal(x.flatten(), span[64 * r : 64 * r + 64])
            assert torch.equal(y.flatten(), span[64 * r + 1 : 64 * r + 65])
        assert torch.equal(torch.cat([x for x, _ in parts]), x1)
        assert torch.equal(torch.cat([y for _, y in parts]), y1)
    state = one.state()  # restore: the same batch again
    a = one.next_batch(256, 16)
    one.restore(state)
    b = one.next_batch(256, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    fresh = D.TokenStream(pattern)  # back to the start, from another shard
    start = fresh.state()
    for _ in range(5):
        fresh.next_batch(256, 16)
    fresh.restore(start)
    assert torch.equal(fresh.next_batch(256, 16)[0].flatten(), torch.arange(256))


def test_batch_not_divisible_is_a_clear_error(tmp_path):
    _write(tmp_path / "a.bin", np.arange(1000))
    s = D.TokenStream(str(tmp_path / "a.bin"), rank=0, world=3)
    with pytest.raises(D.DataError, match="does not split into 3 ranks"):
        s.next_batch(256, 16)


def test_unigram_bpb_by_hand():
    # train [0, 0, 1] -> add-one counts (3, 2, 1) / 6; val [1, 0, 2] scores targets 0 and 2:
    # -ln(3/6) - ln(1/6) nats over 1 + 3 bytes
    lut = D.ByteLUT(torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.bool),
                    torch.zeros(3, dtype=torch.bool))
    got = D.unigram_bpb(torch.tensor([0, 0, 1]), torch.tensor([1, 0, 2]), lut)
    assert got == pytest.approx((1 + math.log2(6)) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="no bytes"):
        D.bits_per_byte(1.0, 0)
    assert D.bits_per_byte(math.log(2), 1) == pytest.approx(1.0)


def test_unreadable_shard_and_tokenizer_are_clear_errors(tmp_path):
    with pytest.raises(D.DataError, match="cannot read shard"):
        D.read_shard_header(tmp_path / "missing.bin")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(D.DataError, match="could not be loaded"):
        D.load_tokenizer(str(bad))


def test_unigram_baseline_is_sane(lut):
    val = D.load_tokens(D.bundled_val_glob(), "val", limit=20001)
    train = D.load_tokens(D.bundled_train_glob(), "train", limit=200000)
    u = D.unigram_bpb(train, val, lut)
    assert 2.5 < u < 5.0
