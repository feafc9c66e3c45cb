"""The one place an evaluation is sequenced: ``evaluate(model, tokens, config) -> EvalResult``.

The steps, each as the plan (``proteus/eval/plan.py``) asks:

1. plain: non-overlapping windows (always);
2. one scoring pass with the sliding window (``stride``), whose per-token scores give the
   sliding bpb and, with the cache on, the n-gram cache's blended bpb over them (with stride 0
   the plain pass's scores are reused: they are the same numbers); the cache's audit on rank 0;
3. score-first test-time training (chunked, or phased per document), and the cache blended
   over its scores.

``proteus eval``, the run's evaluation, the run's artifact evaluation and training's periodic
validation all call ``evaluate``; nothing else calls the steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

import proteus.eval.audit as A
from proteus import data as D
from proteus.config import RunConfig
from proteus.data import ByteLUT
from proteus.device import one_thread
from proteus.dist import rank_world, reduce_sum
from proteus.eval.cache import cache_report, run_audit
from proteus.eval.plan import EvalPlan, make_plan
from proteus.eval.scoring import TokenScores, exact_sum, format_bpb, score_tokens
from proteus.eval.tilt_step import tilt_audit, tilt_hints, tilt_report, tilted_scores
from proteus.eval.ttt import ttt_report
from proteus.eval.ttt_phased import phased_report

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Every number one evaluation produced. ``plain`` and ``sliding`` (with a stride): bpb,
    loss, tokens, bytes, seconds, stride, seq_len.
    ``cache``: bpb_model, bpb_cache, gain, tokens_per_s, seconds, and on rank 0
    audit_passed, audit_seconds (with the cache); under ``--cache ngram+tilt`` also
    ``over`` = "tilt" and ``bpb_tilt`` (what the cache blended over). ``tilt``: bpb_model,
    bpb_tilt, beta, orders, hit rate, seconds (with the tilt). ``ttt``: bpb, chunks,
    seconds, ... and its own ``cache`` (with TTT: over TTT's own scores, never tilted).
    ``audit``: level, passed, seconds, checks. ``seconds``: the whole evaluation."""

    plain: dict
    sliding: dict | None = None
    cache: dict | None = None
    ttt: dict | None = None
    audit: dict | None = None
    tilt: dict | None = None
    seconds: float = 0.0

    @property
    def audit_passed(self) -> bool | None:
        """The audit's verdict (None: it did not run here)."""
        return None if self.audit is None else self.audit["passed"]

    def summary(self) -> dict:
        """The run summary's keys: ``val``, and ``val_sliding``, ``cache``, ``ttt`` for the
        steps that ran."""
        out = {"val": self.plain}
        for key, value in (("val_sliding", self.sliding), ("cache", self.cache),
                           ("ttt", self.ttt), ("audit", self.audit), ("tilt", self.tilt)):
            if value is not None:
                out[key] = value
        return out

    def scores(self, prefix: str) -> dict[str, float]:
        """Each step's bpb under a name (``prefix plain``, ``prefix sliding S``, ``prefix +
        cache``, ``prefix TTT``, ``prefix TTT + cache``): what a submission may claim."""
        out = {f"{prefix} plain": self.plain["bpb"]}
        if self.sliding is not None:
            out[f"{prefix} sliding {self.sliding['stride']}"] = self.sliding["bpb"]
        if self.tilt is not None:
            out[f"{prefix} + tilt"] = self.tilt["bpb_tilt"]
        if self.cache is not None:
            over = " + tilt" if self.cache.get("over") == "tilt" else ""
            out[f"{prefix}{over} + cache"] = self.cache["bpb_cache"]
        if self.ttt is not None:
            out[f"{prefix} TTT"] = self.ttt["bpb"]
            if "cache" in self.ttt:
                out[f"{prefix} TTT + cache"] = self.ttt["cache"]["bpb_cache"]
        return out


def _pass_numbers(scores: TokenScores, seq: int, stride: int, seconds: float) -> dict:
    n = scores.logp.numel()
    return dict(bpb=scores.bpb(), loss=-exact_sum(scores.logp) / n, tokens=n,
                bytes=int(scores.nbytes.sum()), seconds=seconds, stride=stride, seq_len=seq)


def evaluate(model, tokens: torch.Tensor, config: RunConfig | EvalPlan, *,
             lut: ByteLUT | None = None, device: str | torch.device = "cpu",
             autocast: bool = False, progress: bool = False) -> EvalResult:
    """Evaluate ``model`` on every target of ``tokens`` (1-D int64, BOS first) as ``config``
    asks (a ``RunConfig``, or the ``EvalPlan`` made from one). ``lut``: the tokenizer's byte
    table (read from ``config``'s tokenizer when not given). Under torch.distributed every rank
    calls this and every rank gets the same numbers (the audit runs on rank 0)."""
    plan = config if isinstance(config, EvalPlan) else make_plan(config)
    cfg, ec, seq = plan.cfg, plan.ec, plan.seq
    if lut is None:
        vocab = cfg.model.vocab_size
        lut = D.tokenizer_lut(cfg.train.tokenizer, vocab)
    rank, world = rank_world()
    t0 = time.perf_counter()
    hints, hint_seconds = tilt_hints(plan, tokens) if plan.tilt else (None, 0.0)
    scores = score_tokens(model, tokens, lut, seq, 0, ec.eval_batch_seqs, device, autocast,
                          progress, second=None if plan.stride else hints)
    plain = _pass_numbers(scores, seq, 0, time.perf_counter() - t0)
    if not plan.quiet:
        log.info(f"  val bpb {format_bpb(plain['bpb'])} (loss {plain['loss']:.4f}, window {seq}, "
                 "plain)")
    res = EvalResult(plain)
    records = {"plain": scores}  # the per-token records the audit re-derives the numbers from
    if plan.stride:
        t1 = time.perf_counter()
        scores = score_tokens(model, tokens, lut, seq, plan.stride, ec.eval_batch_seqs, device,
                              autocast, progress=progress, second=hints)
        res.sliding = _pass_numbers(scores, seq, plan.stride, time.perf_counter() - t1)
        records["sliding"] = scores
        if not plan.quiet:
            log.info(f"  val bpb {format_bpb(scores.bpb())} (sliding window {seq}, stride "
                     f"{plan.stride})")
    blended = {}
    if plan.tilt:
        res.tilt = tilt_report(plan, tokens, scores, hints, hint_seconds)
    if plan.cache and plan.tilt:  # the cache over the tilted model (tilt_step's docstring)
        res.cache, blended["cache"] = cache_report(
            plan, tokens, tilted_scores(plan, tokens, scores, hints), rank, world,
            what="the tilt + the n-gram cache")
        res.cache.update(bpb_tilt=res.cache["bpb_model"], bpb_model=scores.bpb(), over="tilt")
        res.cache["gain"] = res.cache["bpb_model"] - res.cache["bpb_cache"]
    elif plan.cache:
        res.cache, blended["cache"] = cache_report(plan, tokens, scores, rank, world)
    if plan.ttt:
        report = phased_report if ec.ttt_mode == "phased" else ttt_report
        res.ttt, records["ttt"] = report(model, ec, tokens, lut, seq, device, autocast,
                                         progress=progress, quiet=plan.quiet)
        if plan.cache:
            res.ttt["cache"], blended["ttt + cache"] = cache_report(
                plan, tokens, records["ttt"], rank, world, what="TTT + the n-gram cache")
    res.audit = _audit(model, plan, tokens, lut, res, records, blended, rank, device, autocast,
                       hints)
    res.seconds = time.perf_counter() - t0
    return res


def _audit(model, plan: EvalPlan, tokens: torch.Tensor, lut: ByteLUT, res: EvalResult,
           records: dict[str, TokenScores], blended: dict[str, torch.Tensor], rank: int, device,
           autocast: bool, hints: torch.Tensor | None = None) -> dict:
    """The audit the plan asks for (``proteus/eval/audit.py``): ``level``, ``passed``,
    ``seconds`` and each check's verdict. TTT's check runs on every rank (its passes are
    shared), the others on rank 0; every rank learns the verdict."""
    if plan.audit == "none":
        if plan.ec.audit == "none" and not plan.quiet:
            log.info("  audit skipped (--no-audit): the numbers above are not audited")
        return dict(level="none", passed=None, seconds=0.0, checks={})
    t0 = time.perf_counter()
    # the audit is many small ops, where threads wait on each other more than they work (its
    # cache checks: 14 s at 2 threads against 0.5 s at 1 on a loaded 2-core machine); the
    # windows it rescores still run side by side, one thread each (map_one_thread)
    with one_thread():
        checks = _checks(model, plan, tokens, lut, res, records, blended, rank, device,
                         autocast, hints)
    bad = [k for k, v in checks.items() if not v]
    passed = reduce_sum(float(len(bad)))[0] == 0
    out = dict(level=plan.audit, passed=passed, seconds=time.perf_counter() - t0, checks=checks)
    if not plan.quiet:
        log.info(f"  evaluation audit ({plan.audit}): {'PASS' if passed else 'FAIL'} ("
                 + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items())
                 + f"; {out['seconds']:.1f} s)")
    if res.cache is not None and rank == 0:
        res.cache["audit_passed"] = checks["cache"] and passed
        res.cache["audit_seconds"] = out["seconds"]
    return out


def _checks(model, plan: EvalPlan, tokens: torch.Tensor, lut: ByteLUT, res: EvalResult,
            records: dict[str, TokenScores], blended: dict[str, torch.Tensor], rank: int, device,
            autocast: bool, hints: torch.Tensor | None) -> dict[str, bool]:
    """Each check of the audit the plan asks for, and its verdict on this rank."""
    lv = A.LEVELS[plan.audit]
    checks: dict[str, bool] = {}
    if plan.ttt:
        checks["ttt causal"] = A.check_ttt_causal(
            model, plan, tokens, lut, lv["ttt_chunks"], lv["ttt_edits"],
            lv["cache_positions"], device, autocast)
    if rank == 0:
        n, seq = tokens.numel() - 1, plan.seq
        checks["windows"] = A.check_windows(n, seq, 0) and A.check_windows(n, seq, plan.stride)
        checks["targets"] = all(
            A.check_targets(model, tokens, s, seq, plan.stride if k == "sliding" else 0, lut,
                            lv["targets"], device, autocast)
            for k, s in records.items() if k != "ttt")
        sp = D.load_tokenizer(plan.cfg.train.tokenizer, plan.cfg.model.vocab_size)
        checks["bytes"] = A.check_bytes(sp, tokens, records, res.plain["bytes"])
        reported = {k: v["bpb"] for k, v in (("plain", res.plain), ("sliding", res.sliding),
                                               ("ttt", res.ttt)) if v is not None}
        reported.update({k: d["bpb_cache"] for k, d in (
            ("cache", res.cache), ("ttt + cache", (res.ttt or {}).get("cache"))) if d})
        sums = {k: s.logp for k, s in records.items()} | blended
        checks["sums"] = A.check_sums(reported, sums, res.plain["bytes"])
        if plan.cache:
            checks["cache causal"] = A.check_cache_causal(model, plan, tokens,
                                                          lv["cache_positions"])
            checks["cache"] = run_audit(model, plan, tokens)
        if plan.tilt:
            full = plan.audit == "full"
            checks["tilt"] = tilt_audit(model, plan, tokens, hints, 16 if full else 4,
                                        8 if full else 2)
    return checks
