"""The n-gram cache as an evaluation step: its blended bpb over a pass's scores (each rank
blends its own shard; the cache first counts every token before the shard, so the result does
not depend on the number of processes) and the audit run on a model."""

from __future__ import annotations

import logging
import math
import time

import torch

from proteus.dist import reduce_sum
from proteus.eval.blend import NgramConfig, ngram_blend_logprobs
from proteus.eval.cache_audit import audit, audit_positions
from proteus.eval.hashed import HashedTwoTableCache
from proteus.eval.plan import EvalPlan
from proteus.eval.scoring import TokenScores, format_bpb, model_logprobs_fn
from proteus.model import GPT

log = logging.getLogger(__name__)


def cache_scores(scores: TokenScores, tokens: torch.Tensor, ncfg: NgramConfig, backend: str,
                 rank: int, world: int) -> tuple[float, int, float]:
    """(sum of nll in nats, bytes, seconds) of the cache-blended scores over this rank's shard."""
    n = scores.logp.numel()
    lo, hi = 1 + n * rank // world, 1 + n * (rank + 1) // world
    t0 = time.perf_counter()
    lp = ngram_blend_logprobs(tokens, lo, hi, scores.logp[lo - 1 : hi - 1], ncfg,
                              backend=backend)
    seconds = time.perf_counter() - t0
    nll = -lp.double().sum().item()
    nbytes = int(scores.nbytes[lo - 1 : hi - 1].sum())
    return nll, nbytes, seconds


def run_audit(model: GPT, plan: EvalPlan, tokens: torch.Tensor, hashed: bool = False,
              chunks: tuple[int, ...] = ()) -> bool:
    """Audit our cache (must pass) and, with ``hashed``, the original record's scheme (must be
    flagged). Returns True when the verdicts are as they must be. The positions are every kind
    of ``audit_positions`` (``chunks``: extra chunk sizes whose edges to visit). A plan without
    the cache (``proteus audit`` without ``--cache ngram``) audits the cache it would use."""
    ec, ncfg = plan.ec, plan.ncfg
    positions = audit_positions(tokens, ncfg, ec.audit_positions, chunks)
    fn = model_logprobs_fn(model, plan.seq)
    rep = audit(tokens, positions, fn, ncfg, backend=plan.backend)
    log.info(f"  audit: {rep}")
    ok = rep.passed
    if hashed:
        bad = audit(tokens, positions, fn, scheme=HashedTwoTableCache(order=ec.ngram_order))
        log.info(f"  audit of the negative example: {bad}")
        if bad.passed:
            log.warning("  the audit did not flag the hashed two-table scheme: the audit is broken")
        ok = ok and not bad.passed
    return ok


def cache_report(model: GPT, plan: EvalPlan, tokens: torch.Tensor, scores: TokenScores,
                 rank: int = 0, world: int = 1, with_audit: bool = True,
                 what: str = "the n-gram cache") -> dict:
    """bpb with the n-gram cache next to the model's own (``scores``), the cache's seconds and
    throughput, and (``with_audit``) the audit's verdict."""
    nll, nbytes, secs = cache_scores(scores, tokens, plan.ncfg, plan.backend, rank, world)
    nll, nbytes, secs = reduce_sum(nll, nbytes, secs)
    base = scores.bpb()
    with_cache = nll / math.log(2) / nbytes
    tps = (tokens.numel() - 1) / max(secs / world, 1e-9)
    if not plan.quiet:
        log.info(f"  val bpb {format_bpb(with_cache)} with {what} (order {plan.ncfg.order}); "
                 f"without {format_bpb(base)}; difference {with_cache - base:+.4f}")
        log.info(f"  cache throughput {tps:,.0f} tokens/s ({plan.backend} backend)")
    out = dict(bpb_model=base, bpb_cache=with_cache, gain=base - with_cache, tokens_per_s=tps,
               seconds=secs / world)
    if rank == 0 and with_audit:
        t0 = time.perf_counter()
        out["audit_passed"] = run_audit(model, plan, tokens)
        out["audit_seconds"] = time.perf_counter() - t0
    return out
