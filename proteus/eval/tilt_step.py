"""The token-only n-gram tilt (proteus/tilt.py) as an evaluation step, and its audit.

The hints come from the token stream alone (each from the tokens before its target), so they
are computed once for the whole stream before scoring; the last scoring pass (sliding when there
is a stride, else plain) also gathers the model's log-probability of each hint, and the tilted
bpb follows in closed form. Every rank holds the whole stream's hints (they cost one int64 per
token) and the gathered scores, so the number does not depend on the number of processes.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from proteus.data import bits_per_byte
from proteus.eval.plan import EvalPlan
from proteus.eval.scoring import TokenScores, exact_sum, format_bpb, model_logprobs_fn
from proteus.tilt import longest_match_hints, tilt_distribution, tilt_logprobs

log = logging.getLogger(__name__)


def tilt_hints(plan: EvalPlan, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(the hint of every position of ``tokens``, seconds it took)."""
    t0 = time.perf_counter()
    hints, _ = longest_match_hints(tokens, plan.ec.tilt_order, plan.ec.tilt_min_order)
    return hints, time.perf_counter() - t0


def tilt_report(plan: EvalPlan, tokens: torch.Tensor, scores: TokenScores,
                hints: torch.Tensor, hint_seconds: float) -> dict:
    """The tilted bpb over ``scores`` (a pass scored with ``second=hints``) and what it took."""
    if scores.logp_hint is None:
        raise ValueError("tilt: the pass was scored without the hints (second=hints)")
    t0 = time.perf_counter()
    pos = torch.arange(scores.first, scores.first + scores.logp.numel())
    target, hint = tokens[pos], hints[pos]
    lp = tilt_logprobs(scores.logp, scores.logp_hint, target, hint, plan.ec.tilt_beta)
    nbytes = int(scores.nbytes.sum())
    out = dict(bpb_model=scores.bpb(), bpb_tilt=bits_per_byte(-exact_sum(lp), nbytes),
               hinted=float((hint >= 0).double().mean()),
               hit_rate=float((hint == target).double().mean()), beta=plan.ec.tilt_beta,
               order=plan.ec.tilt_order, min_order=plan.ec.tilt_min_order,
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
    beta = plan.ec.tilt_beta
    for t, row in zip(picks, rows, strict=True):
        for _ in range(n_edits):
            edited = tokens.clone()
            edited[t:] = torch.randint(0, vocab, (n - t,), generator=g)
            h2, _ = longest_match_hints(edited[: t + 1], plan.ec.tilt_order,
                                        plan.ec.tilt_min_order)
            ok &= int(h2[t]) == int(hints[t])
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
