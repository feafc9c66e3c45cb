"""The n-gram cache: exact counts on every backend, order-exact scoring, normalisation, audit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import proteus.eval.blend as blend_mod
import proteus.eval.cache_audit as audit_mod
import proteus.eval.stream_counts as ngc
from proteus import data as D
from proteus.errors import ConfigError
from proteus.eval.blend import NgramConfig, cache_distribution, ngram_blend_logprobs
from proteus.eval.cache_audit import AUDIT_CLASSES, audit, audit_positions, fast_distribution
from proteus.eval.counts import doc_counts, doc_counts_ref, earlier_counts, earlier_counts_numpy
from proteus.eval.fit import cache_params_dict, fit_cache_params, load_cache_params
from proteus.eval.hashed import HashedTwoTableCache, hashed_numpy_cache_logprobs

V = 1024


def _streams():
    g = torch.Generator().manual_seed(3)
    real = D.load_tokens(D.bundled_val_glob(), "val", limit=3000)
    return {
        "random": torch.randint(0, V, (1500,), generator=g),
        "small-alphabet": torch.randint(0, 3, (1500,), generator=g),
        "one-token": torch.full((700,), 5),
        "periodic": torch.arange(1200) % 7,
        "real": real,
        "short": torch.tensor([4, 4]),
    }


def _model_logp(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in model: log p(v | x_<t) depends on the previous token only."""
    out = []
    for t in positions.tolist():
        prev = int(tokens[t - 1])
        z = torch.sin(torch.arange(V, dtype=torch.float64) * (prev + 1) * 0.37) * 3.0
        out.append(torch.log_softmax(z, -1))
    return torch.stack(out)


@pytest.mark.parametrize("name", list(_streams()))
@pytest.mark.parametrize("order", [2, 5, 6])
def test_numpy_counts_equal_the_reference(name, order):
    tok = _streams()[name]
    ref = earlier_counts(tok, tok.numel(), order, "ref")
    fast = earlier_counts(tok, tok.numel(), order, "numpy")
    assert torch.equal(ref.occ, fast.occ)
    assert torch.equal(ref.types, fast.types)


_DEFAULT_RUN = {(1, "real"), (37, "random")}  # a few seconds each on the interpreter


@pytest.mark.interpret
@pytest.mark.parametrize("chunk, name", [
    pytest.param(c, n, marks=() if c == 4096 or (c, n) in _DEFAULT_RUN else pytest.mark.slow)
    for c in (1, 37, 4096) for n in ("random", "small-alphabet", "one-token", "real", "short")])
def test_device_table_counts_equal_the_reference(chunk, name):
    tok = _streams()[name][: 60 if chunk == 1 else 900]  # chunk 1: one launch per position
    ref = earlier_counts(tok, tok.numel(), 5, "ref")
    dev = earlier_counts(tok, tok.numel(), 5, "triton", chunk=chunk)
    assert torch.equal(ref.occ, dev.occ.cpu())
    assert torch.equal(ref.types, dev.types.cpu())


@pytest.mark.parametrize("name", ["small-alphabet", "real", "one-token", "periodic", "short"])
@pytest.mark.parametrize("order", [2, 5, 6])
def test_document_counts_equal_the_reference(name, order):
    tok = _streams()[name]
    n = tok.numel()
    # shards that begin anywhere in a document
    for start in sorted({1, min(2, n), max(1, n // 3), n - 1, n}):
        ref = doc_counts_ref(tok, start, n, order)
        fast = doc_counts(tok, start, n, order)
        whole, shared = earlier_counts_numpy(tok, n, order, doc_start=start)  # one set of sorts
        for got in (fast, shared):
            for a, b in ((ref.tgt, got.tgt), (ref.ctx, got.ctx), (ref.types, got.types)):
                assert torch.equal(a, b)
        plain = earlier_counts_numpy(tok, n, order)
        assert torch.equal(whole.occ, plain.occ) and torch.equal(whole.types, plain.types)


def test_document_counts_see_only_the_current_document():
    bos = D.BOS_ID
    tok = torch.tensor([bos, 7, 8, 9, 7, 8, bos, 7, 8, 9, 7, 8])
    n = tok.numel()
    glob = earlier_counts(tok, n, 3)
    doc = doc_counts(tok, 1, n, 3)
    t = 9  # the second document's "7 8 9": seen once before, but in the first document
    assert glob.occ[2, t] == 1 and doc.tgt[1, t - 1] == 0 and doc.ctx[1, t - 1] == 0
    t = 11  # "7 8" repeats inside the second document
    assert doc.tgt[0, t - 1] == 1 and doc.ctx[0, t - 1] == 1 and doc.types[0, t - 1] == 1
    assert glob.occ[1, t] == 3 and glob.occ[0, t - 1] == 3  # the whole history: 3 of 3
    # the document of t is decided by x_<t: a BOS arriving at t changes nothing at t ...
    other = tok.clone()
    other[4] = bos
    a, b = doc_counts(tok, 1, n, 3), doc_counts(other, 1, n, 3)
    assert torch.equal(a.ctx[:, 3], b.ctx[:, 3]) and torch.equal(a.types[:, 3], b.types[:, 3])
    # ... and the position after it starts from an empty document
    assert b.ctx[:, 4].sum() == 0 and b.tgt[:, 4].sum() == 0


def test_document_counts_add_to_the_gain():
    tok, _, lp = _real_case(2500)
    assert int((tok == D.BOS_ID).sum()) >= 2  # several documents in the sample
    with_doc = ngram_blend_logprobs(tok, 1, tok.numel(), lp, NgramConfig())
    without = ngram_blend_logprobs(tok, 1, tok.numel(), lp, NgramConfig(doc=False))
    assert with_doc.sum() > without.sum()


@pytest.mark.interpret
def test_blend_on_the_device_backend_equals_the_numpy_backend():
    tok = _streams()["real"][:700]
    lp = _model_logp(tok, torch.arange(1, 700)).gather(1, tok[1:, None])[:, 0]
    cfg = NgramConfig(chunk=128)
    for a, b in ((1, 700), (300, 700)):  # a shard that begins inside a document, too
        dev = ngram_blend_logprobs(tok, a, b, lp[a - 1 : b - 1], cfg, backend="triton")
        assert torch.equal(dev, ngram_blend_logprobs(tok, a, b, lp[a - 1 : b - 1], cfg))


def _real_case(n=2500):
    tok = D.load_tokens(D.bundled_val_glob(), "val", limit=n)
    lp_all = _model_logp(tok, torch.arange(1, n))
    lp = lp_all.gather(1, tok[1:, None])[:, 0]
    return tok, lp_all, lp


def test_scores_do_not_depend_on_shards_chunks_or_backend():
    tok, _, lp = _real_case()
    n = tok.numel()
    cfg = NgramConfig()
    whole = ngram_blend_logprobs(tok, 1, n, lp, cfg)
    for cuts in ([1, 700, n], [1, 2, 1234, 2000, n]):
        parts = [ngram_blend_logprobs(tok, a, b, lp[a - 1 : b - 1], cfg)
                 for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(ngram_blend_logprobs(tok, 1, n, lp, cfg, backend="ref"), whole)


def test_changing_a_future_token_never_changes_an_earlier_score():
    tok, _, lp = _real_case()
    n = tok.numel()
    base = ngram_blend_logprobs(tok, 1, n, lp, NgramConfig(order=6))
    for t in (5, 800, n - 2):
        other = tok.clone()
        other[t:] = (other[t:] * 31 + 7) % V
        lp2 = lp.clone()
        lp2[t - 1 :] = -3.0  # the model's scores of the changed targets change too
        got = ngram_blend_logprobs(other, 1, n, lp2, NgramConfig(order=6))
        assert torch.equal(got[: t - 1], base[: t - 1])  # targets before t
        assert not torch.equal(got, base)


def test_fast_scores_equal_the_slow_per_token_reference():
    tok, lp_all, lp = _real_case(1200)
    cfg = NgramConfig()
    fast = ngram_blend_logprobs(tok, 1, tok.numel(), lp, cfg)
    for t in range(1, tok.numel(), 37):
        p = cache_distribution(tok, t, lp_all[t - 1], cfg)
        assert math.isclose(p[int(tok[t])].item(), fast[t - 1].exp().item(), rel_tol=1e-12)


def test_fast_scores_equal_the_slow_reference_at_every_position_of_many_short_documents():
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, 3, (400,), generator=g)  # BOS (id 1) is a third of the stream
    lp_all = _model_logp(tok, torch.arange(1, tok.numel()))
    lp = lp_all.gather(1, tok[1:, None])[:, 0]
    cfg = NgramConfig(order=4)
    fast = ngram_blend_logprobs(tok, 1, tok.numel(), lp, cfg)
    for t in range(1, tok.numel()):
        p = cache_distribution(tok, t, lp_all[t - 1], cfg)
        assert math.isclose(p[int(tok[t])].item(), fast[t - 1].exp().item(), rel_tol=1e-12)


def test_distribution_is_normalised_and_non_negative():
    tok, lp_all, _ = _real_case(1500)
    for t in (1, 3, 500, 1499):
        p = cache_distribution(tok, t, lp_all[t - 1], NgramConfig(order=6))
        assert abs(p.sum().item() - 1.0) < 1e-12
        assert p.min().item() >= 0.0


def test_cache_helps_on_real_text():
    tok, _, lp = _real_case(2500)
    with_cache = ngram_blend_logprobs(tok, 1, tok.numel(), lp)
    assert with_cache.shape == lp.shape and with_cache.dtype == torch.float64
    assert torch.isfinite(with_cache).all() and (with_cache <= 0).all()
    # in bits per byte of the real text: the gain is at least 0.02 bits per byte
    lut = D.build_byte_lut(D.load_tokenizer(), V)
    nbytes = int(lut.target_bytes(tok[:-1], tok[1:]).sum())
    gain = (with_cache.sum() - lp.sum()).item() / math.log(2) / nbytes
    assert gain > 0.02


def test_audit_passes_ours_and_flags_the_hashed_scheme():
    tok, _, _ = _real_case(3000)
    positions = audit_positions(tok, NgramConfig(chunk=512), n_random=4, per_class=2)
    assert all(positions[k] for k in AUDIT_CLASSES), positions  # every kind is present
    assert all(tok[t - 1] == D.BOS_ID for t in positions["after_bos"])
    assert all(tok[t] == D.BOS_ID for t in positions["bos_target"])
    ours = audit(tok, positions, _model_logp, NgramConfig(chunk=512), materialise=3, edits=4)
    assert ours.passed and ours.causal and ours.consistent
    assert ours.max_sum_error < 1e-12 and ours.fast_max_sum_error < 1e-12
    assert ours.materialised == 3 and ours.edits_ok and ours.splits_ok
    bad = audit(tok, positions, _model_logp, scheme=HashedTwoTableCache())
    assert not bad.passed
    assert bad.max_sum > 2.0  # the record's "distribution" sums far above one
    assert "FAIL" in str(bad) and "PASS" in str(ours)


def _stream_from_counts(tokens, start, end, order, doc=True, chunk=None, bits=10):
    """The one-stream fast path (``stream_counts``) made of ``blend_mod._counts``, so that a
    bug a test injects there reaches every fast score."""
    c, d = blend_mod._counts(torch.as_tensor(tokens), end, order, "numpy", 4096,
                             start if doc else None, bits)
    o = order
    cc = ngc.ChunkCounts(start, end, c.occ[1:o, start:end].numpy(),
                         c.occ[: o - 1, start - 1 : end - 1].numpy(),
                         c.types[: o - 1, start:end].numpy())
    if doc:
        cc.doc_tgt, cc.doc_ctx, cc.doc_types = d.tgt.numpy(), d.ctx.numpy(), d.types.numpy()
    if end > start:
        yield cc


def _bos_target_starts_a_document(monkeypatch):
    """The review's fast-path bug: a BOS *target* is taken as the start of a new document, so
    the document counts of that target are empty (sum of p = 1.00074 on the review's model)."""
    real = blend_mod._counts

    def buggy(tokens, end, order, backend, chunk, doc_start=None, bits=10):
        c, d = real(tokens, end, order, backend, chunk, doc_start, bits)
        if d is not None:
            bos = tokens[..., doc_start:end] == D.BOS_ID
            for a in (d.tgt, d.ctx, d.types):
                a[:, bos] = 0
        return c, d

    monkeypatch.setattr(blend_mod, "_counts", buggy)
    monkeypatch.setattr(blend_mod, "stream_counts", _stream_from_counts)


def test_audit_fails_the_bos_target_bug(monkeypatch):
    tok, _, _ = _real_case(2500)
    cfg = NgramConfig()
    positions = audit_positions(tok, cfg, n_random=1, per_class=1, worlds=(2,))
    _bos_target_starts_a_document(monkeypatch)  # (without it this audit passes: test above)
    rep = audit(tok, positions, _model_logp, cfg, materialise=2, edits=1)
    assert not rep.passed and "FAIL" in str(rep)
    assert rep.consistent is False  # the BOS targets' fast scores differ from the reference
    assert rep.fast_max_sum_error > 1e-6  # and p_fast(BOS) breaks the sum everywhere
    # the old audit's blind spot: random positions only, the actual target only
    far = torch.tensor([t for t in range(700, 2400, 157) if tok[t] != D.BOS_ID])
    blind = audit(tok, far, _model_logp, cfg, materialise=0, edits=0)
    assert blind.consistent and blind.max_sum_error < 1e-12
    # ... which the fast scorer's own distribution at any one of those positions closes
    assert not audit(tok, far, _model_logp, cfg, materialise=1, edits=0).passed


def test_audit_catches_a_fast_path_that_reads_the_next_position(monkeypatch):
    tok, _, _ = _real_case(1500)
    real = blend_mod._counts

    def ahead(tokens, end, order, backend, chunk, doc_start=None, bits=10):
        c, d = real(tokens, end, order, backend, chunk, doc_start, bits)
        c.occ[..., :-1] = c.occ[..., 1:].clone()  # each position reads the next one's counts
        return c, d

    monkeypatch.setattr(blend_mod, "_counts", ahead)
    monkeypatch.setattr(blend_mod, "stream_counts", _stream_from_counts)
    cfg = NgramConfig()
    rep = audit(tok, audit_positions(tok, cfg, n_random=4, per_class=2), _model_logp, cfg,
                materialise=1, edits=4)
    assert not rep.passed and rep.edits_ok is False


def test_batched_streams_are_scored_as_each_alone():
    g = torch.Generator().manual_seed(11)
    real = D.load_tokens(D.bundled_val_glob(), "val", limit=900)
    streams = torch.stack([real, real.flip(0), torch.randint(0, 4, (900,), generator=g),
                           torch.full((900,), D.BOS_ID)])
    lp = -torch.rand(4, 700, generator=g, dtype=torch.float64) * 5
    for backend in ("numpy", "ref"):
        for cfg in (NgramConfig(), NgramConfig(order=3, doc=False)):
            both = ngram_blend_logprobs(streams, 200, 900, lp, cfg, backend)
            for i in range(4):
                alone = ngram_blend_logprobs(streams[i], 200, 900, lp[i], cfg, backend)
                assert torch.equal(both[i], alone)


def test_fast_distribution_equals_the_reference_at_every_kind_of_position():
    tok, lp_all, _ = _real_case(1200)
    cfg = NgramConfig(order=4)
    positions = audit_positions(tok, cfg, n_random=1, per_class=1, worlds=(3,))
    for i, t in enumerate(sorted({v[0] for v in positions.values() if v})):
        ref = cache_distribution(tok, t, lp_all[t - 1], cfg)
        for start in ((1, t) if i == 0 else (1 + t % 2 * (t - 1),)):
            fast = fast_distribution(tok, t, lp_all[t - 1], cfg, start=start)
            assert torch.allclose(fast, ref, rtol=1e-12, atol=0), t
            assert abs(fast.sum().item() - 1.0) < 1e-12


def test_audit_catches_a_peeking_cache(monkeypatch):
    """Break causality on purpose: the audit must say so."""
    tok, _, _ = _real_case(1000)
    real = audit_mod.cache_distribution

    def peeking(tokens, t, model_logp, cfg):
        p = real(tokens, t, model_logp, cfg)
        q = torch.zeros_like(p)
        q[int(tokens[t])] = 1.0  # looks at the target
        return 0.5 * p + 0.5 * q

    monkeypatch.setattr(audit_mod, "cache_distribution", peeking)
    rep = audit_mod.audit(tok, torch.tensor([100, 700]), _model_logp, NgramConfig())
    assert not rep.passed and not rep.causal


class _Scheme:
    """A cache scheme for the audit: p_t from the model's distribution, changed by ``fn``."""

    def __init__(self, fn):
        self.fn = fn

    def distribution(self, tokens, t, model_logp):
        return self.fn(tokens, t, model_logp.double().exp())


def _peeking(tokens, t, p):  # normalised and non-negative, but it looks at the target
    q = torch.zeros_like(p)
    q[int(tokens[t])] = 1.0
    return 0.5 * p + 0.5 * q


def _negative(tokens, t, p):  # sums to one, causal, one probability below zero
    p = p.clone()
    p[0] += p[1] + 0.01
    p[1] = -0.01
    return p


@pytest.mark.parametrize("fn, passed, causal, bad_sum, negative", [
    (lambda tokens, t, p: p, True, True, False, False),  # the model alone: a valid scheme
    (_peeking, False, False, False, False),
    (lambda tokens, t, p: p * (1 + 1e-4), False, True, True, False),
    (lambda tokens, t, p: p * (1 + 5e-7), True, True, False, False),  # within the 1e-6 tolerance
    (_negative, False, True, False, True),
])
def test_audit_fails_for_each_condition_alone(fn, passed, causal, bad_sum, negative):
    tok, _, _ = _real_case(800)
    rep = audit(tok, torch.tensor([3, 100, 700, 798]), _model_logp, scheme=_Scheme(fn))
    assert rep.passed is passed and rep.causal is causal
    assert (rep.max_sum_error > 1e-6) is bad_sum and (rep.min_prob < 0) is negative
    assert ("PASS" if passed else "FAIL") in str(rep) and rep.positions == 4


def test_audit_fails_when_the_fast_scorer_disagrees_with_the_distribution(monkeypatch):
    tok, _, _ = _real_case(800)
    real = audit_mod.ngram_blend_logprobs
    monkeypatch.setattr(audit_mod, "ngram_blend_logprobs", lambda *a, **k: real(*a, **k) + 1e-6)
    rep = audit_mod.audit(tok, torch.tensor([100, 700]), _model_logp, NgramConfig())
    assert not rep.passed and rep.consistent is False
    assert rep.causal and rep.max_sum_error < 1e-12 and rep.min_prob >= 0


def test_audit_refuses_positions_outside_the_stream():
    tok = torch.arange(10)
    for bad in (torch.tensor([0, 3]), torch.tensor([10]), torch.tensor([], dtype=torch.int64)):
        with pytest.raises(ValueError, match="audit"):
            audit(tok, bad, _model_logp)


def test_hashed_baseline_scores_every_target():
    tok, _, lp = _real_case(3000)
    out = hashed_numpy_cache_logprobs(tok.numpy(), lp.numpy(), buckets=1 << 12)
    assert out.shape == (tok.numel() - 1,) and np.isfinite(out).all()


def test_hashed_baseline_is_the_record_scheme_of_the_audit():
    # the speed baseline, updating its tables after every token (chunk 1), scores each target
    # as the audit's reimplementation does: 0.8 p_model + 0.2 min(1, full / ctx) at the highest
    # order whose hashed context count is >= 2 (and 0.8 p_model where there is none)
    tok, lp_all, lp = _real_case(1500)
    buckets = 1 << 10
    fast = np.exp(hashed_numpy_cache_logprobs(tok.numpy(), lp.numpy(), buckets=buckets, chunk=1))
    chunked = hashed_numpy_cache_logprobs(tok.numpy(), lp.numpy(), buckets=buckets, chunk=64)
    scheme = HashedTwoTableCache(order=5, buckets=buckets)
    hits = 0
    for t in range(2, 1500, 23):
        dist = scheme.distribution(tok, t, lp_all[t - 1])
        p = dist[int(tok[t])].item()
        pm = math.exp(lp[t - 1].item())
        # "no order with a context count >= 2" is told structurally: the scheme then returns the
        # model's distribution itself, the same torch.exp of the same row (bit-equal on any CPU).
        # Comparing against math.exp instead depends on the libm: SLEEF's vectorised exp on
        # AVX-512 and glibc's differ by 1 ulp, which made a non-hit look like a hit.
        if torch.equal(dist, lp_all[t - 1].double().exp()):
            assert fast[t - 1] == pytest.approx(0.8 * pm, rel=1e-9)
        else:
            hits += 1
            assert fast[t - 1] == pytest.approx(p, rel=1e-9)
    assert hits > 30
    # chunks of 64: a target inside a chunk does not see the chunk's earlier tokens
    assert not np.allclose(chunked, np.log(fast)) and chunked[0] == pytest.approx(np.log(fast[0]))


def test_bad_input_is_a_clear_error():
    tok = torch.randint(0, V, (100,))
    lp = torch.zeros(99)
    with pytest.raises(ValueError, match="order"):
        ngram_blend_logprobs(tok, 1, 100, lp, NgramConfig(order=7))
    with pytest.raises(ValueError, match="start"):
        ngram_blend_logprobs(tok, 0, 100, torch.zeros(100))
    with pytest.raises(ValueError, match="model_logp_target"):
        ngram_blend_logprobs(tok, 1, 100, torch.zeros(5))
    with pytest.raises(ValueError, match="token ids"):
        earlier_counts(torch.tensor([1, 2000, 3]), 3, 3)
    with pytest.raises(ValueError, match="backend"):
        earlier_counts(tok, 100, 3, "cuda-magic")
    with pytest.raises(ValueError, match="1-D integer"):
        earlier_counts(tok.float(), 100, 3)
    for bad in (dict(weight=1.5), dict(doc_weight=0.0), dict(k=(1.0, 2.0)),
                dict(doc_a=(1.0, -1.0, 1.0, 1.0, 1.0)), dict(doc_k=(0.0,) * 5)):
        with pytest.raises(ValueError, match="ngram"):
            NgramConfig(**bad).validate()


def test_blend_by_hand():
    # tokens 5 6 5 7 5 6 (no BOS: the document is the whole stream), a uniform model, order 3,
    # parameters given here (whole history: weight 0.95, k = 100, 28; a = 1.1, 1.35;
    # document: weight 1, k = 11, 3.3; a = 1.03, 1.75). λ = w · ctx / (ctx + k · types^a).
    cfg = NgramConfig(order=3, weight=0.95, k=(100.0, 28.0, 19.0, 10.0, 10.0),
                      a=(1.1, 1.35, 1.95, 2.25, 2.25), doc_weight=1.0,
                      doc_k=(11.0, 3.3, 4.3, 7.4, 7.4), doc_a=(1.03, 1.75, 2.6, 1.03, 1.03))
    tok = torch.tensor([5, 6, 5, 7, 5, 6])
    u = 1 / 1024
    lu = torch.tensor(math.log(u), dtype=torch.float64)
    got = ngram_blend_logprobs(tok, 1, 6, lu.repeat(5), cfg)

    def step(p, lam, q):
        return (1 - lam) * p + lam * q

    want = [u, u]  # t=1, 2: no context seen before
    # t=3 (7 after 5): "5" was followed once, by 6: ctx 1, count 0, 1 type; "6 5" never seen
    want.append(step(step(u, 0.95 / 101, 0.0), 1 / 12, 0.0))
    # t=4 (5 after 7): "7" never seen before
    want.append(u)
    # t=5 (6 after 5): "5" followed by 6 and 7 (ctx 2, count 1, 2 types); "7 5" never seen
    lam, dlam = 0.95 * 2 / (2 + 100 * 2**1.1), 2 / (2 + 11 * 2**1.03)
    want.append(step(step(u, lam, 0.5), dlam, 0.5))
    torch.testing.assert_close(got.exp(), torch.tensor(want, dtype=torch.float64), rtol=1e-14,
                               atol=0)
    # order 3 at work: 5 6 5 6 5 -> at t=4 (5 after "5 6"), "6" and "5 6" were each followed
    # once, by 5
    got = ngram_blend_logprobs(torch.tensor([5, 6, 5, 6, 5]), 4, 5, lu.reshape(1), cfg)
    p = step(step(u, 0.95 / 101, 1.0), 0.95 / 29, 1.0)
    p = step(step(p, 1 / 12, 1.0), 1 / 4.3, 1.0)
    assert got.exp().item() == pytest.approx(p, rel=1e-14)


def test_order_six_repeats_the_tuned_order_five_parameters():
    # the parameters were fitted for n <= 5; NgramConfig's docs say the n = 6 entries repeat n = 5
    cfg = NgramConfig()
    for name in ("k", "a", "doc_k", "doc_a"):
        v = getattr(cfg, name)
        assert len(v) == 5 and v[4] == v[3], name


def test_each_order_uses_its_own_confidence_parameters():
    # λ_n = weight · ctx / (ctx + k_n · max(types, 1)^a_n), row n-2 with the n-th parameters
    cfg = NgramConfig(weight=0.5, k=(1.0, 2.0, 3.0, 4.0, 5.0), a=(0.0, 1.0, 2.0, 0.5, 1.0))
    ctx = torch.tensor([[3], [3], [3], [3], [0]])
    types = torch.tensor([[2], [2], [0], [4], [7]])
    lam = cfg.lambdas(ctx, types)[:, 0]
    want = [0.5 * 3 / (3 + 1), 0.5 * 3 / (3 + 2 * 2), 0.5 * 3 / (3 + 3), 0.5 * 3 / (3 + 4 * 2),
            0.0]
    assert torch.allclose(lam, torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)
    doc = NgramConfig(doc_weight=1.0, doc_k=(2.0,) * 5, doc_a=(1.0,) * 5)
    assert doc.lambdas(ctx, types, doc=True)[0, 0] == 3 / (3 + 2 * 2)


def test_stable_sort_fast_path_equals_torchs_stable_sort():
    from proteus.eval.counts import _stable_sort

    g = torch.Generator().manual_seed(9)
    for key in (torch.randint(-50, 50, (5000,), generator=g),  # duplicates, negatives: fast path
                torch.randint(0, 1 << 62, (300,), generator=g) * torch.tensor([1, -1]).repeat(150),
                torch.zeros(0, dtype=torch.int64)):  # too wide for the fast path; empty
        sk, srt = _stable_sort(key)
        rk, rs = torch.sort(key, stable=True)
        assert torch.equal(sk, rk) and torch.equal(srt, rs)


def test_the_eval_switch_turns_the_document_counts_off():
    import dataclasses

    from proteus.eval.cache import cache_scores
    from proteus.eval.plan import ngram_config
    from proteus.eval.scoring import TokenScores
    from proteus.options import build_config

    tok, _, lp = _real_case(2000)
    scores = TokenScores(1, lp, torch.ones(lp.numel(), dtype=torch.int64))
    ec = build_config("cpu-tiny", environ={}).eval
    on, _, _ = cache_scores(scores, tok, ngram_config(ec, V), "numpy", 0, 1)
    off, _, _ = cache_scores(scores, tok, ngram_config(dataclasses.replace(ec, ngram_doc=False),
                                                       V), "numpy", 0, 1)
    doc = -ngram_blend_logprobs(tok, 1, tok.numel(), lp, NgramConfig()).sum().item()
    hist = -ngram_blend_logprobs(tok, 1, tok.numel(), lp, NgramConfig(doc=False)).sum().item()
    assert on == pytest.approx(doc, rel=1e-12) and off == pytest.approx(hist, rel=1e-12)
    assert on < off


def test_fit_lowers_the_bpb_it_fits_and_reports_the_real_blend():
    tok, _, lp = _real_case(6000)
    nbytes = torch.ones(lp.numel(), dtype=torch.int64) * 3
    start = NgramConfig(k=(50.0,) * 5, a=(1.0,) * 5, doc_k=(50.0,) * 5, doc_a=(1.0,) * 5)
    fitted, info = fit_cache_params(tok, lp, nbytes, start, iterations=30)
    assert info["bpb_fitted"] < info["bpb_start"] - 0.01 < info["bpb_model"]
    real = -ngram_blend_logprobs(tok, 1, tok.numel(), lp, fitted).sum().item()
    assert info["bpb_fitted"] == pytest.approx(real / math.log(2) / nbytes.sum().item(),
                                               rel=1e-12)
    for v in (fitted.weight, *fitted.k, *fitted.doc_a):
        assert v == float(f"{v:.4g}")  # shipped as 4 significant digits
    assert fitted.k[4] == fitted.k[3] and fitted.a[4] == fitted.a[3]  # order 6 repeats order 5


def test_cache_params_file_round_trips_and_refuses_what_does_not_fit(tmp_path):
    import json

    cfg = NgramConfig(weight=0.9, k=(1.0, 2.0, 3.0, 4.0, 4.0))
    f = tmp_path / "p.json"
    f.write_text(json.dumps(cache_params_dict(cfg, 1024, fitted_on={"files": ["x"]})))
    assert load_cache_params(str(f), 5, True, 1024) == cfg
    for args, needle in (((6, True, 1024), "order 5"), ((5, False, 1024), "doc True"),
                         ((5, True, 2048), "vocab_size 1024")):
        with pytest.raises(ConfigError, match=needle):
            load_cache_params(str(f), *args)
    bad = tmp_path / "bad.json"
    for text, needle in (("{", "not JSON"), ('{"format": "x"}', "format tag"),
                         (json.dumps({**cache_params_dict(cfg, 1024), "k": [1.0]}), "damaged")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            load_cache_params(str(bad), 5, True, 1024)
    with pytest.raises(ConfigError, match="tune-cache"):
        load_cache_params(str(tmp_path / "none.json"), 5, True, 1024)


def test_the_shipped_parameters_are_the_tune_cache_record():
    import os

    record = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                          "cache_params_cpu_tiny.json")
    assert load_cache_params(record, 5, True, V) == NgramConfig()


@pytest.mark.parametrize("doc", [False, True])
def test_context_seen_is_the_streamed_order_2_context_count(doc):
    # the audit picks its busiest positions by one scan at each (not a pass over the stream);
    # it must say what the streamed counts say, at every target of a stream with documents
    tok = D.load_tokens(D.bundled_val_glob(), "val", limit=6001)
    tok[[0, 700, 701, 2500]] = D.BOS_ID  # an empty document, a BOS target, a BOS context
    n = tok.numel()
    ccs = list(ngc.stream_counts(tok, 1, n, 3, doc=doc, chunk=2048))
    busy = np.concatenate([c.ctx[0] > 0 for c in ccs])
    if doc:
        busy &= np.concatenate([c.doc_ctx[0] > 0 for c in ccs])
    x = tok.numpy()
    got = np.array([audit_mod.context_seen(x, t, doc) for t in range(1, n)])
    assert np.array_equal(got, busy)
    assert 0 < busy.sum() < n - 1  # both kinds of position are there


def test_one_repeated_context_position_is_the_first_one():
    # the cheap audit takes one position of each kind and stops counting at the first chunk
    # that has a repeated context: the same position as the whole stream's count gives
    tok = D.load_tokens(D.bundled_val_glob(), "val", limit=140_001)
    cfg = NgramConfig()
    rep = np.concatenate([np.flatnonzero(cc.ctx[cfg.order - 2] >= 2) + cc.lo
                          for cc in ngc.stream_counts(tok, 1, tok.numel(), cfg.order, doc=False)])
    assert rep.size > 2 and rep[-1] > ngc.CHUNK  # candidates beyond the first chunk too
    one = audit_positions(tok, cfg, n_random=1, per_class=1, worlds=(2,))
    assert one["repeated_context"] == [int(rep[0])]
    two = audit_positions(tok, cfg, n_random=1, per_class=2, worlds=(2,))
    assert two["repeated_context"] == [int(rep[0]), int(rep[-1])]
