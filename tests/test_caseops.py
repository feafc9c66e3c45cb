"""CaseOps and the bundled SP8192 sample: the transform is lossless, and every document's tokens
are charged exactly the UTF-8 bytes of its original text.

The original texts come from the bundled SP1024 validation shard: its tokenizer round-trips all
901 complete documents exactly (proteus/data/README.md), so no file outside the package is read.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from proteus import data as D
from proteus.caseops import (
    ALLCAPS,
    CAPNEXT,
    ESC,
    TITLE,
    CaseOpsError,
    decode_caseops,
    encode_caseops,
    token_bytes,
)
from proteus.eval import evaluate, make_plan
from proteus.model import build_model
from proteus.options import build_config
from proteus.train import train

CASES = {
    "hello world": "hello world",
    "Hello World": f"{TITLE}hello {TITLE}world",
    "USA and A": f"{ALLCAPS}usa and {TITLE}a",
    "iPhone McDonald ABc": f"i{CAPNEXT}phone {TITLE}mc{CAPNEXT}donald {TITLE}a{CAPNEXT}bc",
    "x9Y_zZ": f"x9{TITLE}y_z{CAPNEXT}z",
    f"lit{TITLE}{ESC}": f"lit{ESC}{TITLE}{ESC}{ESC}",
    "Été ÉTÉ": f"Été É{TITLE}tÉ",  # only ASCII letters are transformed: runs "t" and "T"
}


@pytest.mark.parametrize("text, want", CASES.items(), ids=range(len(CASES)))
def test_encode_is_the_documented_rule_and_decodes_back(text, want):
    assert encode_caseops(text) == want
    assert decode_caseops(want) == text


@pytest.mark.parametrize("bad", [f"{TITLE}", f"{ALLCAPS}a", f"a{CAPNEXT}", f"{CAPNEXT}ab",
                                 f"{ESC}x", "Ab", f"{TITLE}a{CAPNEXT}b{CAPNEXT}c{TITLE}",
                                 f"{ALLCAPS}a{CAPNEXT}b", f"{TITLE}ab{ALLCAPS}"])
def test_malformed_strings_are_refused(bad):
    with pytest.raises(CaseOpsError, match="caseops"):
        decode_caseops(bad)


def test_random_strings_round_trip():
    g = np.random.default_rng(0)
    alphabet = list("aZbY é\n\t.") + [TITLE, ALLCAPS, CAPNEXT, ESC]
    for _ in range(500):
        s = "".join(g.choice(alphabet, size=int(g.integers(0, 30))))
        assert decode_caseops(encode_caseops(s)) == s


def _docs(tokens: torch.Tensor) -> list[torch.Tensor]:
    """The complete documents of a stream (each from its BOS to the next BOS)."""
    bos = torch.nonzero(tokens == D.BOS_ID)[:, 0].tolist()
    return [tokens[a:b] for a, b in zip(bos, bos[1:], strict=False)]


@pytest.fixture(scope="module")
def sp8192_val():
    return (D.load_tokens(D.bundled_val_glob(8192), "val"),
            D.load_byte_sidecar(D.bundled_val_glob(8192)), D.load_tokenizer("", 8192))


@pytest.fixture(scope="module")
def texts():
    sp = D.load_tokenizer()
    tok = D.load_tokens(D.bundled_val_glob(), "val")
    return [sp.decode(d[1:].tolist()) for d in _docs(tok)]  # the last, cut document left out


def test_bundle_is_the_same_documents_and_bytes_are_their_utf8_length(sp8192_val, texts):
    tok, nbytes, sp = sp8192_val
    assert nbytes is not None and nbytes.shape == tok.shape
    starts = torch.nonzero(tok == D.BOS_ID)[:, 0].tolist() + [tok.numel()]
    assert len(starts) - 1 == len(texts) == 901
    for k, (a, b) in enumerate(zip(starts, starts[1:], strict=False)):
        text = texts[k]
        assert tok[a + 1 : b].tolist() == sp.encode(encode_caseops(text)), k
        assert nbytes[a] == 0  # BOS
        assert int(nbytes[a + 1 : b].sum()) == len(text.encode("utf-8")), k
    # over the whole stream: the same bytes as SP1024 scores (its byte table, BOS excluded)
    sp1024 = D.load_tokens(D.bundled_val_glob(), "val")
    end = int(torch.nonzero(sp1024 == D.BOS_ID)[901, 0])
    lut = D.build_byte_lut(D.load_tokenizer(), 1024)
    assert int(nbytes.sum()) == int(lut.target_bytes(sp1024[: end - 1], sp1024[1:end]).sum())


def test_byte_table_of_a_caseops_tokenizer_charges_operators_nothing(sp8192_val):
    tok, nbytes, sp = sp8192_val
    lut = D.build_byte_lut(sp, 8192)
    ids = {c: sp.PieceToId(c) for c in (TITLE, ALLCAPS, CAPNEXT, ESC)}
    word = sp.PieceToId("▁the")
    prev = torch.tensor([word, word, ids[ESC], ids[ESC], word])
    tgt = torch.tensor([ids[TITLE], ids[ESC], ids[TITLE], ids[ESC], word])
    assert lut.target_bytes(prev, tgt).tolist() == [0, 0, 3, 3, 4]
    # per document, the table and the sidecar agree (they may split a character's bytes
    # differently between its byte-fallback tokens, never the document's total)
    starts = torch.nonzero(tok == D.BOS_ID)[:, 0].tolist() + [tok.numel()]
    per_token = torch.cat([torch.zeros(1, dtype=torch.int64), lut.target_bytes(tok[:-1], tok[1:])])
    for a, b in zip(starts, starts[1:], strict=False):
        assert int(per_token[a + 1 : b].sum()) == int(nbytes[a + 1 : b].sum())


def test_token_bytes_add_up_to_the_text_including_dropped_whitespace(sp8192_val):
    pytest.importorskip("google.protobuf", reason="the tokenizer's piece spans need protobuf")
    sp = sp8192_val[2]
    for text in ["  Leading and  double\n\nspaces \n", "é ü McDonald's", f"x{ESC}{TITLE}Y"]:
        ids, counts = token_bytes(sp, text)
        assert ids == sp.encode(encode_caseops(text))
        assert int(counts.sum()) == len(text.encode("utf-8"))
        assert (counts >= 0).all()


def test_globs_never_read_a_byte_sidecar_as_tokens(tmp_path):
    D.write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 5, 6], np.uint16))
    D.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.array([0, 2, 3], np.uint16))
    pattern = str(tmp_path / "fineweb_val_*.bin")
    assert D.load_tokens(pattern, "val").tolist() == [1, 5, 6]
    assert D.load_byte_sidecar(pattern).tolist() == [0, 2, 3]
    assert D.load_byte_sidecar(pattern, limit=2).tolist() == [0, 2]


def test_sidecars_are_all_or_none_and_count_their_shard(tmp_path):
    D.write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 5, 6], np.uint16))
    assert D.load_byte_sidecar(str(tmp_path / "fineweb_val_*.bin")) is None
    D.write_shard(tmp_path / "fineweb_val_000001.bin", np.array([1, 7], np.uint16))
    D.write_shard(tmp_path / "fineweb_val_bytes_000001.bin", np.array([0, 2], np.uint16))
    with pytest.raises(D.DataError, match="no byte sidecar"):
        D.load_byte_sidecar(str(tmp_path / "fineweb_val_*.bin"))
    D.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.array([0, 2], np.uint16))
    with pytest.raises(D.DataError, match="counts 2 tokens"):
        D.load_byte_sidecar(str(tmp_path / "fineweb_val_*.bin"))


def test_no_bundled_data_for_other_vocabularies_is_one_clear_error():
    with pytest.raises(D.DataError, match="no bundled data for a vocabulary of 4096"):
        D.bundled_val_glob(4096)


def test_evaluator_charges_an_sp8192_range_of_whole_documents_their_text_bytes(sp8192_val,
                                                                              texts):
    # the evaluator's own path (windows, byte table) over the first 5 documents, BOS excluded
    tok = sp8192_val[0]
    starts = torch.nonzero(tok == D.BOS_ID)[:, 0].tolist()
    cfg = build_config("smoke", {"model.vocab_size": 8192, "eval.audit": "none"}, environ={})
    lut = D.tokenizer_lut("", 8192)
    r = evaluate(build_model(cfg, "ref"), tok[: starts[5]], make_plan(cfg), lut=lut)
    assert r.plain["bytes"] == sum(len(t.encode("utf-8")) for t in texts[:5])


def test_the_sp8192_preset_trains_on_the_bundled_caseops_sample():
    cfg = build_config("cpu-tiny-sp8192", {"train.iterations": 1, "train.compile": False,
                                           "train.max_wallclock_s": 0, "train.batch_tokens": 128,
                                           "train.seq_len": 64},
                       environ={})
    assert cfg.model.vocab_size == 8192 and cfg.train.tokenizer == ""
    losses = train(cfg).stats["losses"]
    assert len(losses) == 1 and abs(losses[0] - math.log(8192)) < 1.0  # 8192-way, near uniform


def test_the_ngram_cache_runs_on_sp8192_and_refuses_orders_its_keys_cannot_hold(sp8192_val):
    """13-bit token ids: orders up to 4 (the preset's), order 5 is one ConfigError line."""
    from proteus.errors import ConfigError

    preset = build_config("cpu-tiny-sp8192", environ={})
    assert (preset.eval.cache, preset.eval.ngram_order) == ("ngram", 4)
    from proteus.eval.cache_audit import audit

    tok = sp8192_val[0][:300]
    cfg = build_config("smoke", {"model.vocab_size": 8192, "eval.cache": "ngram",
                                 "eval.ngram_order": 4, "eval.audit": "none"}, environ={})
    plan = make_plan(cfg)
    assert plan.ncfg.id_bits == 13
    torch.manual_seed(0)
    r = evaluate(build_model(cfg, "ref"), tok, plan, lut=D.tokenizer_lut("", 8192))
    assert r.cache["bpb_cache"] < r.cache["bpb_model"]  # an untrained model: repeats pay
    # the cache's audit over the whole 8192-token vocabulary (a fixed model: the audit's cost)
    rows = torch.log_softmax(torch.randn(8192, generator=torch.Generator().manual_seed(1),
                                         dtype=torch.float64), -1)
    rep = audit(tok, {"random": [13, 21]}, lambda t, pos: rows.expand(pos.numel(), -1),
                plan.ncfg, materialise=1, edits=1, worlds=(2,), earliest=True)
    assert rep.passed and rep.consistent and rep.max_sum_error < 1e-9, str(rep)
    bad = build_config("smoke", {"model.vocab_size": 8192, "eval.cache": "ngram"}, environ={})
    with pytest.raises(ConfigError, match=r"order must be in \[2, 4\] at a vocabulary of up to "
                                          r"8192 .*got 5 \(--ngram-order\)$"):
        make_plan(bad)
    make_plan(build_config("smoke", {"model.vocab_size": 8192}, environ={}))  # no cache: fine


def test_the_report_range_costs_the_same_bytes_by_table_and_by_sidecar(sp8192_val):
    """The evaluator charges bytes from the tokenizer's table; over the range the
    cpu-tiny-sp8192 preset reports (its val_tokens from the first document), that total equals
    the byte sidecar's (the original text's UTF-8 bytes, BOS excluded), so a bpb from either is
    the same number."""
    from proteus.eval import load_eval_tokens

    cfg = build_config("cpu-tiny-sp8192", environ={})
    tok, first = load_eval_tokens(D.bundled_val_glob(8192), cfg.eval, 8192)
    assert tok.numel() == cfg.eval.val_tokens + 1
    side = sp8192_val[1][first + 1 : first + tok.numel()]  # the bytes of each target
    lut = D.tokenizer_lut("", 8192)
    assert int(lut.target_bytes(tok[:-1], tok[1:]).sum()) == int(side.sum())
