"""Bits per byte, plain and sliding window, against references written out by hand.

The model here is a stand-in whose logits depend on the position inside its window and on the
token there, so a target scored by the wrong window, at the wrong place in it, twice, or not at
all changes the result. The byte table gives every token a different byte count, so a target
paired with the wrong bytes changes it too. Expected numbers are computed from the lists of
(target, position in its window) written out below, not from ``proteus.eval.scoring.windows``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import pytest
import torch

import proteus.eval.scoring as E
from proteus import data as D
from proteus.eval import EvalResult, evaluate, format_bpb, make_plan
from proteus.eval.blend import NgramConfig, ngram_blend_logprobs
from proteus.eval.cache import cache_report, cache_scores, run_audit
from proteus.eval.scoring import (
    TokenScores,
    model_logprobs_fn,
    score_tokens,
    windows,
)
from proteus.options import build_config

V = 8


def _config(seq: int = 0, **eval_values):
    """The smoke preset with the evaluation window ``seq`` (0: the training sequence length)
    and these evaluation options."""
    cfg = build_config("smoke", environ={})
    ec = dataclasses.replace(cfg.eval, eval_seq_len=seq, **eval_values)
    return dataclasses.replace(cfg, eval=ec)


def _evaluate(model, tokens, seq: int, stride: int = 0, autocast: bool = False,
              **eval_values) -> EvalResult:
    """The entry point, as the command line calls it, with the 8-token byte table."""
    return evaluate(model, tokens, _config(seq, stride=stride, **eval_values), lut=LUT,
                    autocast=autocast)


class PositionModel(torch.nn.Module):
    """logits[b, i, v] = (i + 1) * cos(v + x[b, i]) : a function of the window position i."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        i = torch.arange(x.shape[1], dtype=torch.float64)[None, :, None]
        v = torch.arange(V, dtype=torch.float64)[None, None, :]
        return ((i + 1) * torch.cos(v + x[..., None].double())).float()


def _expected_logp(tokens: torch.Tensor, where: list[int]) -> torch.Tensor:
    """log p of target j = 1..N when the model sees x_{j-1} at window position where[j-1]."""
    out = []
    for j, i in enumerate(where, start=1):
        z = (i + 1) * torch.cos(torch.arange(V, dtype=torch.float64) + float(tokens[j - 1]))
        out.append(torch.log_softmax(z.float(), -1)[int(tokens[j])].double())
    return torch.stack(out)


# A byte table where every token has its own count, two have a leading space and one (BOS,
# id 1) is a boundary token: bytes(prev, tgt) = BASE[tgt] + (SPACE[tgt] and not BOUNDARY[prev]).
BASE = [0, 1, 2, 3, 4, 5, 6, 7]
SPACE = [False, False, False, True, False, True, False, False]
BOUNDARY = [False, True, False, False, False, False, False, False]
LUT = D.ByteLUT(torch.tensor(BASE), torch.tensor(SPACE), torch.tensor(BOUNDARY))
TOKENS = torch.tensor([1, 3, 0, 5, 7, 2, 3, 6, 0, 3, 5])  # 10 targets


@pytest.fixture(autouse=True)
def _the_tokenizer_of_these_tests(monkeypatch):
    """The evaluation audit re-derives the byte table from the tokenizer's pieces: here the
    hand-made table above stands for the tokenizer."""
    import numpy as np

    import proteus.eval.audit as A

    table = (np.array(BASE), np.array(SPACE), np.array(BOUNDARY))
    monkeypatch.setattr(A, "derived_byte_table", lambda sp: table)


def _bytes(tokens):
    return [BASE[int(b)] + (SPACE[int(b)] and not BOUNDARY[int(a)])
            for a, b in zip(tokens[:-1], tokens[1:], strict=True)]


# Window position of each target 1..10 (len 4), written out from the rule "a window of L
# tokens every S tokens scores its last S targets, the first window all of its L":
WHERE = {
    # plain: windows [0,4) [4,8) [8,10): targets 1-4, 5-8, 9-10
    (4, 0): [0, 1, 2, 3, 0, 1, 2, 3, 0, 1],
    # stride 2: [0,4) scores 1-4; [2,6) scores 5,6; [4,8) 7,8; [6,10) 9,10
    (4, 2): [0, 1, 2, 3, 2, 3, 2, 3, 2, 3],
    # stride 3: [0,4) scores 1-4; [3,7) scores 5-7; [6,10) scores 8-10
    (4, 3): [0, 1, 2, 3, 1, 2, 3, 1, 2, 3],
    # stride 1: [0,4) scores 1-4, then one target per window at its last position
    (4, 1): [0, 1, 2, 3, 3, 3, 3, 3, 3, 3],
    # a stride as long as the window is the plain evaluation
    (4, 4): [0, 1, 2, 3, 0, 1, 2, 3, 0, 1],
    # window longer than the stream: one window
    (16, 5): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
}


@pytest.mark.parametrize("seq_len, stride", list(WHERE))
@pytest.mark.parametrize("batch_seqs", [1, 3, 16])
def test_every_target_is_scored_once_at_its_place_with_its_bytes(seq_len, stride, batch_seqs):
    s = score_tokens(PositionModel(), TOKENS, LUT, seq_len, stride, batch_seqs)
    assert s.first == 1
    want = _expected_logp(TOKENS, WHERE[seq_len, stride])
    assert s.logp.dtype == torch.float64 and s.logp.shape == (10,)
    torch.testing.assert_close(s.logp, want, rtol=1e-6, atol=1e-7)
    assert s.nbytes.tolist() == _bytes(TOKENS) == [3, 0, 6, 7, 2, 4, 6, 0, 4, 6]
    # bpb = total nats / ln 2 / total bytes
    assert s.bpb() == pytest.approx(-want.sum().item() / math.log(2) / 38, rel=1e-6)


def test_windows_cover_every_target_once_in_order():
    # targets scored by the window list, against the same rule counted out one by one
    for n, seq_len, stride in [(10, 4, 2), (9, 4, 3), (1, 4, 2), (100, 16, 5), (64, 8, 0),
                               (65, 8, 8), (33, 8, 7)]:
        wins = windows(n, seq_len, stride)
        scored = [t for _s, e, f in wins for t in range(f, e + 1)]
        assert scored == list(range(1, n + 1))
        for s, e, f in wins:
            assert 0 <= s < f <= e and e - s <= seq_len
        if 0 < stride < seq_len:  # every window but the first is full and scores <= stride
            assert all(e - s == seq_len or s == 0 for s, e, _ in wins)
            assert all(e - f + 1 <= stride for _, e, f in wins[1:])


def test_uniform_model_bpb_by_hand():
    # a uniform model over 8 tokens: 3 bits per target; 10 targets, 38 bytes -> 30 / 38 bits
    class Uniform(torch.nn.Module):
        def logits(self, x):
            return torch.zeros(*x.shape, V)

    for stride in (0, 2):
        res = _evaluate(Uniform(), TOKENS, 4, stride)
        r = res.sliding if stride else res.plain
        assert (res.sliding is None) == (stride == 0) and res.cache is None and res.ttt is None
        # log-softmax is taken in float32: -ln 8 to float32 rounding
        assert r["bpb"] == pytest.approx(30 / 38, rel=1e-7)
        assert r["loss"] == pytest.approx(math.log(8), rel=1e-7)
        assert (r["tokens"], r["bytes"], r["stride"], r["seq_len"]) == (10, 38, stride, 4)


def test_evaluate_reports_loss_tokens_and_bytes():
    r = _evaluate(PositionModel(), TOKENS, 4, 3).sliding
    want = _expected_logp(TOKENS, WHERE[4, 3])
    assert r["loss"] == pytest.approx(-want.mean().item(), rel=1e-6)
    assert r["bpb"] == pytest.approx(-want.sum().item() / math.log(2) / 38, rel=1e-6)
    assert (r["tokens"], r["bytes"]) == (10, 38)


def test_model_mode_is_restored_and_bad_input_refused():
    m = PositionModel().train()
    score_tokens(m, TOKENS, LUT, 4, 2)
    assert m.training
    m.eval()
    score_tokens(m, TOKENS, LUT, 4, 2)
    assert not m.training
    with pytest.raises(ValueError, match="score_tokens"):
        score_tokens(m, TOKENS[:1], LUT, 4, 2)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_each_rank_scores_its_own_contiguous_windows(monkeypatch, world):
    # without gathering, rank r of w returns the targets of windows [r n / w, (r + 1) n / w):
    # together, every target once, in order (4 windows at stride 2; with 5 ranks one has none)
    want = _expected_logp(TOKENS, WHERE[4, 2])
    got = []
    for r in range(world):
        monkeypatch.setattr(E, "rank_world", lambda r=r: (r, world))
        s = score_tokens(PositionModel(), TOKENS, LUT, 4, 2, gather=False)
        assert s.nbytes.tolist() == _bytes(TOKENS)[s.first - 1 : s.first - 1 + s.logp.numel()]
        if s.logp.numel() == 0:
            assert s.first == 11  # past the last target
        got.append((s.first, s.logp))
    firsts = [f for f, lp in got if lp.numel()]
    assert firsts == sorted(firsts) and firsts[0] == 1
    torch.testing.assert_close(torch.cat([lp for _, lp in got]), want, rtol=1e-6, atol=1e-7)


def test_ranks_gather_every_target_by_default(monkeypatch):
    # with more than one rank, score_tokens gathers the ranks' ranges (here: a stand-in for the
    # collective that returns what the two ranks would contribute) and returns all targets
    want = _expected_logp(TOKENS, WHERE[4, 2])
    sent = []

    def gather(t):
        sent.append(t.clone())
        return want

    monkeypatch.setattr(E, "rank_world", lambda: (1, 2))
    monkeypatch.setattr(E, "gather_ordered", gather)
    s = score_tokens(PositionModel(), TOKENS, LUT, 4, 2)
    assert len(sent) == 1 and torch.allclose(sent[0], want[6:])  # rank 1: windows 2, 3
    assert s.first == 1 and s.nbytes.tolist() == _bytes(TOKENS) and torch.equal(s.logp, want)


def test_plain_is_the_default():
    s = score_tokens(PositionModel(), TOKENS, LUT, 4)
    torch.testing.assert_close(s.logp, _expected_logp(TOKENS, WHERE[4, 0]))


def test_two_tokens_are_one_target():
    s = score_tokens(PositionModel(), TOKENS[:2], LUT, 4, 2)
    torch.testing.assert_close(s.logp, _expected_logp(TOKENS[:2], [0]))
    assert s.nbytes.tolist() == [3]


def test_model_logprobs_for_the_audit_see_the_last_window():
    # position p sees x[max(0, p - L) : p]: the last of those is at window position
    # min(p, L) - 1; the result is the full float64 log-distribution over the vocabulary
    fn = model_logprobs_fn(PositionModel(), 4)
    got = fn(TOKENS, torch.tensor([1, 3, 4, 7, 10]))
    assert got.shape == (5, V) and got.dtype == torch.float64
    for row, p, i in zip(got, [1, 3, 4, 7, 10], [0, 2, 3, 3, 3], strict=True):
        z = (i + 1) * torch.cos(torch.arange(V, dtype=torch.float64) + float(TOKENS[p - 1]))
        torch.testing.assert_close(row, torch.log_softmax(z.float().double(), -1))


def test_autocast_only_when_asked():
    seen = []

    class Spy(PositionModel):
        def logits(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().logits(x)

    _evaluate(Spy(), TOKENS, 4, 2)
    assert len(seen) >= 2 and not any(seen)  # the plain pass and the sliding one
    seen.clear()
    _evaluate(Spy(), TOKENS, 4, 2, autocast=True)
    assert len(seen) >= 2 and all(seen)


def test_format_bpb():
    assert format_bpb(float("nan")) == "nan" and format_bpb(1.234567) == "1.2346"


def test_sliding_bpb_of_the_eval_pass():
    out = _evaluate(PositionModel(), TOKENS, 4, 2).summary()
    want = _expected_logp(TOKENS, WHERE[4, 2])
    assert set(out) == {"val", "val_sliding", "audit"}
    assert out["val_sliding"]["bpb"] == pytest.approx(-want.sum().item() / math.log(2) / 38,
                                                      rel=1e-6)
    assert (out["val_sliding"]["stride"], out["val_sliding"]["seq_len"]) == (2, 4)
    assert set(_evaluate(PositionModel(), TOKENS, 4, 0).summary()) == {"val", "audit"}


# ---------------------------------------------------------------------------------------------
# The cache's bits per byte: the same targets, the same bytes, the blend's log-probabilities


def _real_scores(n=3000):
    tok = D.load_tokens(D.bundled_val_glob(), "val", limit=n)
    lut = D.build_byte_lut(D.load_tokenizer(), 1024)
    z = torch.sin(torch.arange(1024, dtype=torch.float64)[None] * (tok[:-1, None] + 1) * 0.37)
    lp = torch.log_softmax(3.0 * z, -1).gather(1, tok[1:, None])[:, 0]
    nbytes = lut.target_bytes(tok[:-1], tok[1:])
    return tok, TokenScores(1, lp, nbytes), lut


@pytest.mark.parametrize("world", [1, 2, 3])
def test_cache_bytes_are_the_scores_bytes_and_nll_is_the_blend(world):
    tok, scores, _ = _real_scores()
    ec = build_config("cpu-tiny", environ={}).eval
    ncfg = NgramConfig(order=ec.ngram_order, doc=ec.ngram_doc)
    blend = ngram_blend_logprobs(tok, 1, tok.numel(), scores.logp, ncfg)
    parts = [cache_scores(scores, tok, ncfg, "numpy", r, world) for r in range(world)]
    # every target's bytes counted once: the sum over ranks is the sum over all targets
    assert sum(b for _, b, _ in parts) == int(scores.nbytes.sum())
    assert sum(nll for nll, _, _ in parts) == pytest.approx(-blend.sum().item(), rel=1e-12)
    n = scores.logp.numel()
    for r, (nll, b, _) in enumerate(parts):  # each rank: its own contiguous range of targets
        lo, hi = n * r // world, n * (r + 1) // world
        assert b == int(scores.nbytes[lo:hi].sum())
        assert nll == pytest.approx(-blend[lo:hi].sum().item(), rel=1e-12)


def _small_case(n=1200):
    """Tokens of the 8-token vocabulary (BOS every ~50) scored by the position model."""
    g = torch.Generator().manual_seed(4)
    tok = torch.randint(2, V, (n,), generator=g)
    tok[::50] = 1
    return tok, score_tokens(PositionModel(), tok, LUT, 16)


def test_cache_report_numbers():
    tok, scores = _small_case()
    res = evaluate(PositionModel(), tok, _config(16, cache="ngram", audit_positions=3), lut=LUT)
    rep = res.cache
    blend = ngram_blend_logprobs(tok, 1, tok.numel(), scores.logp, NgramConfig())
    nbytes = int(scores.nbytes.sum())
    want_cache = -blend.sum().item() / math.log(2) / nbytes
    want_model = -scores.logp.sum().item() / math.log(2) / nbytes
    assert rep["bpb_cache"] == pytest.approx(want_cache, rel=1e-12)
    assert rep["bpb_model"] == pytest.approx(want_model, rel=1e-12)
    assert rep["gain"] == pytest.approx(want_model - want_cache, rel=1e-12)
    assert rep["gain"] > 0 and rep["audit_passed"] is True and rep["tokens_per_s"] > 0
    assert res.audit["level"] == "cheap" and res.audit_passed is True

def test_run_audit_audits_the_hashed_scheme_only_when_asked(caplog):
    tok, _ = _small_case(600)
    plan = make_plan(_config(audit_positions=2))
    # the handler goes on the module's logger itself: a command-line test earlier in the run
    # may have stopped the "proteus" logger from propagating to the root, where caplog listens
    logger = logging.getLogger("proteus.eval.cache")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="proteus.eval.cache"):
            assert run_audit(PositionModel(), plan, tok) is True
            assert "negative example" not in caplog.text and "audit: PASS" in caplog.text
            assert run_audit(PositionModel(), plan, tok, hashed=True) is True
            assert "negative example: FAIL" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)


def test_cache_throughput_and_the_cache_in_the_eval_pass(monkeypatch):
    # a clock that advances 0.25 s per reading: the cache scoring takes exactly 0.25 s
    tok, _ = _small_case(700)
    clock = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock) * 0.25)
    out = _evaluate(PositionModel(), tok, 16, 0, cache="ngram", audit_positions=2).summary()
    assert set(out) == {"val", "cache", "audit"}
    assert out["cache"]["tokens_per_s"] == pytest.approx(699 / 0.25)
    plain = out["val"]
    assert out["cache"]["bpb_model"] == pytest.approx(plain["bpb"], rel=1e-12)
    assert plain["seconds"] > 0


def test_cache_throughput_of_an_instant_scoring(monkeypatch):
    # a clock that does not move: the throughput is large and finite, not a division by zero
    tok, scores = _small_case(300)
    plan = make_plan(_config(cache="ngram", audit_positions=1))
    monkeypatch.setattr(time, "perf_counter", lambda: 5.0)
    assert cache_report(plan, tok, scores)[0]["tokens_per_s"] == 299 / 1e-9
