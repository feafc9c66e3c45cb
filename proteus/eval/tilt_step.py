"""The token-only n-gram tilt (proteus/tilt.py) as an evaluation step, and its audit.

The hints come from the token stream alone (each from the tokens before its target), so they
are computed once for the whole stream before scoring; the last scoring pass (sliding when there
is a stride, else plain) also gathers the model's log-probability of each hint, and the tilted
bpb follows in closed form. Every rank holds the whole stream's hints (they cost one int64 per
token) and the gathered scores, so the number does not depend on the number of processes.

``--cache ngram+tilt`` composes the two with one normalisation, the tilt inside::

    p(v) = (1 - λ) p'(v) + λ p_cache(v),   p'(v) = e^{β·[v = h]} p_model(v) / Z,
    Z = 1 + p_model(h)(e^β − 1)

(λ and p_cache the cache's, ``proteus/eval/blend.py``, run over p' instead of p_model). The
tilt's Z is the only division; the cache's recursion is a chain of convex combinations of
distributions over the whole vocabulary, so p sums to one because p' does. Why this order
rather than tilting the blend: Z needs the probability of the hint under the distribution
being tilted. Under the model that is one gathered log-probability per position (the scoring
pass already returns it); under the blend it would need every order's count of (context,
hint) as well, a second count lookup per position that the streamed counts do not give. And
the tilt corrects the model, which knows nothing of repetitions; the cache then trusts its
counts exactly as much as its fitted λ says, whatever the model below it is. `proteus
tune-cache` fits in the same order: β (and the shortest match) on the model's scores, then the
cache's parameters over the tilted scores. The audit checks the composition as the cache's
audit checks the cache, with the model's rows tilted towards each position's hint
(``proteus.tilt.tilted_logprobs_fn``): the full distribution over the vocabulary sums to one,
the fast scores equal it, and it does not move when the target or any later token changes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from proteus.data import bits_per_byte
from proteus.eval.plan import EvalPlan
from proteus.eval.scoring import TokenScores, exact_sum, format_bpb, model_logprobs_fn
from proteus.tilt import hint_at, longest_match_hints, tilt_distribution, tilt_logprobs

log = logging.getLogger(__name__)


def tilt_hints(plan: EvalPlan, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(the hint of every position of ``tokens``, seconds it took)."""
    t0 = time.perf_counter()
    hints, _ = longest_match_hints(tokens, plan.tcfg.max_order, plan.tcfg.min_order)
    return hints, time.perf_counter() - t0


def tilted_scores(plan: EvalPlan, tokens: torch.Tensor, scores: TokenScores,
                  hints: torch.Tensor) -> TokenScores:
    """``scores`` with each target's log-probability tilted towards its hint (closed form):
    what ``--cache ngram+tilt`` blends the cache over."""
    if scores.logp_hint is None:
        raise ValueError("tilt: the pass was scored without the hints (second=hints)")
    pos = torch.arange(scores.first, scores.first + scores.logp.numel())
    lp = tilt_logprobs(scores.logp, scores.logp_hint, tokens[pos], hints[pos], plan.tcfg.beta)
    return dataclasses.replace(scores, logp=lp, logp_hint=None)


def tilt_report(plan: EvalPlan, tokens: torch.Tensor, scores: TokenScores,
                hints: torch.Tensor, hint_seconds: float) -> dict:
    """The tilted bpb over ``scores`` (a pass scored with ``second=hints``) and what it took."""
    if scores.logp_hint is None:
        raise ValueError("tilt: the pass was scored without the hints (second=hints)")
    t0 = time.perf_counter()
    pos = torch.arange(scores.first, scores.first + scores.logp.numel())
    target, hint = tokens[pos], hints[pos]
    tc = plan.tcfg
    lp = tilt_logprobs(scores.logp, scores.logp_hint, target, hint, tc.beta)
    nbytes = int(scores.nbytes.sum())
    out = dict(bpb_model=scores.bpb(), bpb_tilt=bits_per_byte(-exact_sum(lp), nbytes),
               hinted=float((hint >= 0).double().mean()),
               hit_rate=float((hint == target).double().mean()), beta=tc.beta,
               order=tc.max_order, min_order=tc.min_order,
               hint_seconds=hint_seconds, seconds=hint_seconds + time.perf_counter() - t0)
    out["gain"] = out["bpb_model"] - out["bpb_tilt"]
    if not plan.quiet:
        log.info(f"  val bpb {format_bpb(out['bpb_tilt'])} with the n-gram tilt (beta "
                 f"{out['beta']}, orders {out['min_order']}..{out['order']}: "
                 f"{out['hit_rate']:.1%} of targets are their hint; gain {out['gain']:+.4f}; "
                 f"hints {hint_seconds:.1f} s)")
    return out


def tilt_audit(model, plan: EvalPlan, tokens: torch.Tensor, hints: torch.Tensor,
               n_positions: int = 4, n_edits: int = 2, seed: int = 0) -> bool:
    """At sampled positions t: the hint does not change when x_t or any later token changes,
    the tilted distribution over the whole vocabulary sums to one, and the closed form the
    scorer uses equals the full distribution at the target. True when all hold."""
    n = tokens.numel()
    if n < 3:
        return True
    g = torch.Generator().manual_seed(seed)
    hinted = torch.nonzero(hints[1:] >= 0)[:, 0] + 1
    pool = hinted if hinted.numel() else torch.arange(1, n)
    picks = pool[torch.randperm(pool.numel(), generator=g)[:n_positions]].tolist()
    rows = model_logprobs_fn(model, plan.seq)(tokens, torch.tensor(picks))
    vocab = rows.shape[1]
    ok = True
    tc = plan.tcfg
    beta = tc.beta
    for t, row in zip(picks, rows, strict=True):
        for _ in range(n_edits):
            edited = tokens.clone()
            edited[t:] = torch.randint(0, vocab, (n - t,), generator=g)
            h2, _ = longest_match_hints(edited[: t + 1], tc.max_order, tc.min_order)
            ok &= int(h2[t]) == int(hints[t])
        ok &= hint_at(tokens, t, tc.max_order, tc.min_order) == int(hints[t])
        h = int(hints[t])
        p = tilt_distribution(row, h, beta)
        ok &= abs(float(p.sum()) - 1.0) <= 1e-9
        x = int(tokens[t])
        closed = tilt_logprobs(row[x : x + 1], row[max(h, 0) : max(h, 0) + 1],
                               torch.tensor([x]), torch.tensor([h]), beta)
        ok &= math.isclose(float(closed), math.log(float(p[x])), rel_tol=1e-9, abs_tol=1e-12)
    if not plan.quiet:
        log.info(f"  tilt audit: {'PASS' if ok else 'FAIL'} ({len(picks)} positions: hints "
                 "blind to the target and later tokens, normalised over the vocabulary)")
    return bool(ok)
