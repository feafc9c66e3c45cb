"""The n-gram cache as an evaluation step: its blended bpb over a pass's scores (each rank
blends its own shard; the cache first counts every token before the shard, so the result does
not depend on the number of processes) and the audit run on a model."""

from __future__ import annotations

import logging
import time

import torch

from proteus.data import bits_per_byte
from proteus.device import one_thread
from proteus.dist import gather_ordered, reduce_sum
from proteus.eval.blend import NgramConfig, ngram_blend_logprobs
from proteus.eval.cache_audit import AUDIT_WORLDS, MAX_BOS_POSITIONS, audit, audit_positions
from proteus.eval.hashed import HashedTwoTableCache
from proteus.eval.plan import EvalPlan
from proteus.eval.scoring import TokenScores, exact_sum, format_bpb, model_logprobs_fn
from proteus.model import GPT
from proteus.tilt import tilted_logprobs_fn

log = logging.getLogger(__name__)


def cache_logprobs(scores: TokenScores, tokens: torch.Tensor, ncfg: NgramConfig, backend: str,
                   rank: int, world: int) -> tuple[torch.Tensor, float]:
    """(log p under the blend of this rank's shard of targets, seconds it took). The blend runs
    with one CPU thread (``one_thread``): an elementwise op split over threads may round an
    element differently, so the scores would depend on the thread count."""
    n = scores.logp.numel()
    lo, hi = 1 + n * rank // world, 1 + n * (rank + 1) // world
    t0 = time.perf_counter()
    with one_thread():
        lp = ngram_blend_logprobs(tokens, lo, hi, scores.logp[lo - 1 : hi - 1], ncfg,
                                  backend=backend)
    return lp.double().cpu(), time.perf_counter() - t0


def cache_scores(scores: TokenScores, tokens: torch.Tensor, ncfg: NgramConfig, backend: str,
                 rank: int, world: int) -> tuple[float, int, float]:
    """(sum of nll in nats, bytes, seconds) of the cache-blended scores over this rank's shard."""
    n = scores.logp.numel()
    lo, hi = 1 + n * rank // world, 1 + n * (rank + 1) // world
    lp, seconds = cache_logprobs(scores, tokens, ncfg, backend, rank, world)
    return -exact_sum(lp), int(scores.nbytes[lo - 1 : hi - 1].sum()), seconds


# What each audit level visits. cheap: a few positions of each kind, the whole distribution
# of the fast scorer at the earliest one (its cost grows with the position), two edited
# streams, the split over 2 ranks; full: up to 256 BOS targets, 4 positions of each other kind,
# ``audit_positions`` random ones, 6 whole distributions (the earliest of each kind), 8 edited
# streams, the splits over 2, 3 and 8 ranks.
AUDIT_LEVELS = {
    "cheap": dict(max_bos=4, per_class=1, n_random=4, materialise=1, edits=2, worlds=(2,),
                  earliest=True),
    "full": dict(max_bos=MAX_BOS_POSITIONS, per_class=4, n_random=None, materialise=6,
                 edits=8, worlds=AUDIT_WORLDS, earliest=False),
}


def cache_model_fn(fn, plan: EvalPlan):
    """The distribution the cache blends over, as a ``(tokens, positions) -> (n, V)`` function:
    the model's (``fn``), tilted towards the hints under ``--cache ngram+tilt``."""
    return tilted_logprobs_fn(fn, plan.tcfg) if plan.tilt else fn


def run_audit(model: GPT, plan: EvalPlan, tokens: torch.Tensor, hashed: bool = False,
              chunks: tuple[int, ...] = (), level: str | None = None) -> bool:
    """Audit our cache (must pass) and, with ``hashed``, the original record's scheme (must be
    flagged). Returns True when the verdicts are as they must be. The positions are every kind
    of ``audit_positions`` (``chunks``: extra chunk sizes whose edges to visit), as many as
    ``level`` (default: the plan's ``eval.audit``) asks (``AUDIT_LEVELS``).
    A plan without the cache (``proteus audit`` without ``--cache ngram``) audits the cache it
    would use. Under ``--cache ngram+tilt`` the model's rows are tilted towards each position's
    hint first (``tilted_logprobs_fn``): the audit checks the composition."""
    ec, ncfg = plan.ec, plan.ncfg
    level = level or ec.audit
    lv = AUDIT_LEVELS[level]
    n_random = ec.audit_positions if lv["n_random"] is None else min(lv["n_random"],
                                                                     ec.audit_positions)
    positions = audit_positions(tokens, ncfg, n_random, chunks, worlds=lv["worlds"],
                                per_class=lv["per_class"], max_bos=lv["max_bos"])
    base = model_logprobs_fn(model, plan.seq)
    fn = cache_model_fn(base, plan)
    rep = audit(tokens, positions, fn, ncfg, backend=plan.backend,
                materialise=lv["materialise"], edits=lv["edits"], worlds=lv["worlds"],
                earliest=lv["earliest"])
    log.info(f"  audit: {rep} [{level} audit]")
    ok = rep.passed
    if hashed:
        bad = audit(tokens, positions, base, scheme=HashedTwoTableCache(order=ec.ngram_order))
        log.info(f"  audit of the negative example: {bad}")
        if bad.passed:
            log.warning("  the audit did not flag the hashed two-table scheme: the audit is broken")
        ok = ok and not bad.passed
    return ok


def cache_report(plan: EvalPlan, tokens: torch.Tensor, scores: TokenScores, rank: int = 0,
                 world: int = 1, what: str = "the n-gram cache") -> tuple[dict, torch.Tensor]:
    """bpb with the n-gram cache next to the model's own (``scores``), the cache's seconds and
    throughput, and every target's blended log-probability (gathered from every rank and
    summed exactly, so the number does not depend on the number of processes)."""
    lp, secs = cache_logprobs(scores, tokens, plan.ncfg, plan.backend, rank, world)
    if world > 1:  # every rank holds every target's blended score: one exact sum, any split
        lp = gather_ordered(lp)
        secs = reduce_sum(secs)[0]
    base = scores.bpb()
    with_cache = bits_per_byte(-exact_sum(lp), int(scores.nbytes.sum()))
    tps = (tokens.numel() - 1) / max(secs / world, 1e-9)
    if not plan.quiet:
        log.info(f"  val bpb {format_bpb(with_cache)} with {what} (order {plan.ncfg.order}); "
                 f"without {format_bpb(base)}; difference {with_cache - base:+.4f}")
        log.info(f"  cache throughput {tps:,.0f} tokens/s ({plan.backend} backend)")
    return dict(bpb_model=base, bpb_cache=with_cache, gain=base - with_cache, tokens_per_s=tps,
                seconds=secs / world), lp
