"""The token-only n-gram tilt: exact longest-match hints (against a brute-force search), a
normalised tilt, a hint that never reads its target, and the fit of β."""

from __future__ import annotations

import math

import pytest
import torch

from proteus.tilt import (
    TiltConfig,
    fit_beta,
    fit_tilt,
    hint_at,
    longest_match_hints,
    tilt_distribution,
    tilt_logprobs,
)


def _brute_hints(tok: list[int], max_order: int, min_order: int) -> tuple[list[int], list[int]]:
    n = len(tok)
    hint, order = [-1] * n, [0] * n
    for t in range(1, n):
        for k in range(min(max_order, t), min_order - 1, -1):
            ctx = tok[t - k : t]
            found = next((j for j in range(t - k - 1, -1, -1) if tok[j : j + k] == ctx), None)
            if found is not None:
                hint[t], order[t] = tok[found + k], k
                break
    return hint, order


@pytest.mark.parametrize("vocab, n, max_order, min_order", [
    (2, 200, 16, 1), (3, 300, 5, 2), (5, 257, 16, 1), (50, 120, 16, 3), (4, 64, 7, 7)])
def test_hints_are_the_longest_most_recent_earlier_match(vocab, n, max_order, min_order):
    g = torch.Generator().manual_seed(vocab * 1000 + n)
    tok = torch.randint(0, vocab, (n,), generator=g)
    tok[100:140] = tok[10:50].clone() if n > 140 else tok[100:140]  # a long repeat
    hint, order = longest_match_hints(tok, max_order, min_order)
    want_h, want_o = _brute_hints(tok.tolist(), max_order, min_order)
    assert hint.tolist() == want_h
    assert order.tolist() == want_o


def test_a_hint_depends_only_on_earlier_tokens():
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 4, (400,), generator=g)
    hint, _ = longest_match_hints(tok)
    for t in (1, 17, 200, 399):
        edited = tok.clone()
        edited[t:] = torch.randint(0, 4, (400 - t,), generator=g)
        assert longest_match_hints(edited)[0][: t + 1].tolist() == hint[: t + 1].tolist()


def test_no_collisions_at_high_order_on_a_large_vocabulary():
    # two contexts of 16 tokens that share 15: only an exact comparison tells them apart
    base = list(range(1000, 1016))
    other = list(range(1000, 1015)) + [7]
    tok = torch.tensor(base + [1] + other + [2] + other + [9])
    hint, order = longest_match_hints(tok)
    assert hint[-1] == 2 and order[-1] == 16  # "other" again: followed by 2 last time


@pytest.mark.parametrize("beta", [0.0, 0.7, 3.0])
def test_the_tilted_distribution_is_normalised_and_matches_the_scorer(beta):
    g = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(8192, generator=g, dtype=torch.float64), -1)
    for h in (-1, 0, 4321):
        p = tilt_distribution(logp, h, beta)
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
        for a in (0, 4321, 17):
            got = tilt_logprobs(logp[a : a + 1], logp[max(h, 0) : max(h, 0) + 1],
                                torch.tensor([a]), torch.tensor([h]), beta)
            assert float(got) == pytest.approx(math.log(float(p[a])), rel=1e-12, abs=1e-12)


def test_fit_beta_finds_the_minimum_of_the_tilted_nll():
    g = torch.Generator().manual_seed(3)
    n = 2000
    lt = torch.log(torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.01)
    lh = torch.log(torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.01)
    target = torch.randint(0, 10, (n,), generator=g)
    hint = torch.where(torch.rand(n, generator=g) < 0.4, target, (target + 1) % 10)
    lh = torch.where(hint == target, lt, lh)  # the model's log-prob of the hint, where it hits
    beta = fit_beta(lt, lh, target, hint)
    grid = torch.linspace(0, 8, 801).tolist()
    best = min(grid, key=lambda b: -float(tilt_logprobs(lt, lh, target, hint, b).sum()))
    assert beta == pytest.approx(best, abs=0.02) and beta > 0


@pytest.mark.parametrize("kw, msg", [(dict(max_order=17), "max_order"),
                                     (dict(min_order=0), "min_order"),
                                     (dict(beta=-1.0), "beta"),
                                     (dict(beta=float("nan")), "beta")])
def test_bad_parameters_are_one_clear_error(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TiltConfig(**kw).validate()


# ---------------------------------------------------------------------------------------------
# The tilt as an evaluation step: `--cache tilt`


@pytest.fixture(scope="module")
def tilt_eval():
    from proteus import data as D
    from proteus.eval import evaluate, make_plan
    from proteus.model import build_model
    from proteus.options import build_config

    cfg = build_config("smoke", {"eval.cache": "tilt", "eval.stride": 32, "eval.tilt_beta": 1.5,
                                 "eval.audit": "cheap"}, environ={})
    torch.manual_seed(0)
    model = build_model(cfg, "ref")
    tokens = D.load_tokens(D.bundled_val_glob(), "val", limit=1025)
    lut = D.tokenizer_lut("", 1024)
    return model, tokens, lut, make_plan(cfg), evaluate(model, tokens, make_plan(cfg), lut=lut)


def test_tilt_step_is_the_closed_form_over_the_sliding_pass(tilt_eval):
    from proteus.eval.scoring import exact_sum, score_tokens

    model, tokens, lut, plan, res = tilt_eval
    hints, _ = longest_match_hints(tokens)
    s = score_tokens(model, tokens, lut, plan.seq, plan.stride, 8)
    full = score_tokens(model, tokens, lut, plan.seq, plan.stride, 8, second=hints)
    assert torch.equal(full.logp, s.logp)  # the second column does not disturb the first
    pos = torch.arange(1, tokens.numel())
    want = tilt_logprobs(s.logp, full.logp_hint, tokens[pos], hints[pos], 1.5)
    nbytes = int(s.nbytes.sum())
    assert res.tilt["bpb_tilt"] == -exact_sum(want) / math.log(2) / nbytes
    assert res.tilt["bpb_model"] == res.sliding["bpb"]
    assert res.audit["checks"]["tilt"] is True
    assert "tilt" in res.summary() and res.tilt["hinted"] > 0.5


def test_hint_log_probs_are_the_model_rows_at_the_hint(tilt_eval):
    from proteus.eval.scoring import score_tokens

    model, tokens, lut, plan, _ = tilt_eval
    hints, _ = longest_match_hints(tokens)
    got = score_tokens(model, tokens[:129], lut, 64, 0, 8, second=hints[:129])
    with torch.no_grad():
        z = model.logits(tokens[:64][None])[0].float()
    rows = torch.log_softmax(z, -1).double()
    for j in range(1, 65):  # targets of the first plain window
        h = int(hints[j])
        want = float(rows[j - 1, h]) if h >= 0 else -math.inf
        assert float(got.logp_hint[j - 1]) == pytest.approx(want, abs=1e-6)


def test_tilt_audit_fails_a_hint_that_reads_its_target(tilt_eval, monkeypatch):
    from proteus.eval import tilt_step

    model, tokens, _, plan, _ = tilt_eval
    hints, _ = longest_match_hints(tokens)
    leaky = hints.clone()
    leaky[1:] = tokens[1:]  # a "hint" that is the target itself: perfect, and illegal
    assert tilt_step.tilt_audit(model, plan, tokens, hints)
    assert not tilt_step.tilt_audit(model, plan, tokens, leaky)


def test_hint_at_is_the_scorers_hint_by_another_route():
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, 3, (300,), generator=g)
    tok[150:200] = tok[20:70].clone()
    for mx, mn in ((16, 1), (5, 2), (7, 7)):
        hint, _ = longest_match_hints(tok, mx, mn)
        assert [hint_at(tok, t, mx, mn) for t in range(300)] == hint.tolist()


def test_fit_tilt_picks_the_min_order_with_the_lowest_nll():
    g = torch.Generator().manual_seed(6)
    n = 3000
    order = torch.randint(1, 9, (n,), generator=g)
    target = torch.randint(0, 10, (n,), generator=g)
    # long matches are right, short ones are noise: dropping matches shorter than 4 pays
    right = torch.rand(n, generator=g) < torch.where(order >= 4, 0.9, 0.02)
    hint = torch.where(right, target, (target + 1) % 10)
    lt = torch.full((n,), math.log(0.1), dtype=torch.float64)
    lh = lt.clone()
    cfg, tried = fit_tilt(lt, lh, target, hint, order)
    assert cfg.min_order == 4 and cfg.beta > 1.0
    assert tried[4][1] < min(v[1] for m, v in tried.items() if m != 4)


# ---------------------------------------------------------------------------------------------
# `--cache ngram+tilt`: the cache blended over the tilted model, one normalisation


@pytest.fixture(scope="module")
def both_eval(tilt_eval):
    from proteus.eval import evaluate, make_plan
    from proteus.options import build_config

    model, tokens, lut, _, _ = tilt_eval
    cfg = build_config("smoke", {"eval.cache": "ngram+tilt", "eval.stride": 32,
                                 "eval.tilt_beta": 1.5, "eval.audit": "cheap"}, environ={})
    plan = make_plan(cfg)
    return plan, evaluate(model, tokens, plan, lut=lut)


def test_ngram_plus_tilt_is_the_blend_over_the_tilted_scores(tilt_eval, both_eval):
    from proteus.eval.blend import ngram_blend_logprobs
    from proteus.eval.scoring import exact_sum, score_tokens

    model, tokens, lut, _, res_tilt = tilt_eval
    plan, res = both_eval
    assert plan.cache and plan.tilt
    hints, _ = longest_match_hints(tokens)
    s = score_tokens(model, tokens, lut, plan.seq, plan.stride, 8, second=hints)
    pos = torch.arange(1, tokens.numel())
    tilted = tilt_logprobs(s.logp, s.logp_hint, tokens[pos], hints[pos], 1.5)
    lp = ngram_blend_logprobs(tokens, 1, tokens.numel(), tilted, plan.ncfg)
    want = -exact_sum(lp) / math.log(2) / int(s.nbytes.sum())
    assert res.cache["bpb_cache"] == want
    assert res.cache["bpb_tilt"] == res.tilt["bpb_tilt"] == res_tilt.tilt["bpb_tilt"]
    assert res.cache["over"] == "tilt" and res.cache["bpb_model"] == res.sliding["bpb"]
    assert res.cache["bpb_cache"] < res.tilt["bpb_tilt"]  # the cache adds to the tilt here
    assert res.audit["passed"] is True
    assert {"cache", "cache causal", "tilt", "sums"} <= set(res.audit["checks"])
    assert "smoke + tilt + cache" in res.scores("smoke")


def test_the_audit_fails_a_composition_with_a_wrong_z(tilt_eval, both_eval, monkeypatch):
    import proteus.tilt as tilt_mod
    from proteus.eval import cache as cache_step
    from proteus.eval import tilt_step
    from proteus.eval.audit import check_cache_causal
    from proteus.eval.cache_audit import audit
    from proteus.eval.scoring import model_logprobs_fn

    model, tokens, _, _, _ = tilt_eval
    plan, res = both_eval
    assert res.audit["checks"]["cache"] and res.audit["checks"]["cache causal"]

    def no_z(logp, hint, beta):  # the tilt without its normalisation
        p = logp.double().exp()
        if hint >= 0:
            p = p.clone()
            p[hint] *= math.exp(beta)
        return p

    monkeypatch.setattr(tilt_step, "tilt_distribution", no_z)
    monkeypatch.setattr(tilt_mod, "tilt_distribution", no_z)
    # the cache's audit over the rows the evaluation's audit tilts (run_audit's model function)
    hints = longest_match_hints(tokens)[0]
    pos = [t for t in range(200, 400) if hints[t] >= 0][:2]
    fn = cache_step.cache_model_fn(model_logprobs_fn(model, plan.seq), plan)
    rep = audit(tokens, {"random": pos}, fn, plan.ncfg, materialise=1, edits=1, worlds=(2,))
    assert not rep.passed and rep.max_sum_error > 1e-6, str(rep)
    assert not check_cache_causal(model, plan, tokens, 1)
    assert not tilt_step.tilt_audit(model, plan, tokens, longest_match_hints(tokens)[0])
