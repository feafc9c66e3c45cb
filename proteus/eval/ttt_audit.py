"""The audit of score-first test-time training (``proteus audit CKPT --ttt``); see
``proteus/eval/ttt.py``'s docstring."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from proteus import data as D
from proteus.config import EvalConfig
from proteus.data import ByteLUT
from proteus.eval.blend import NgramConfig, cache_distribution, ngram_blend_logprobs
from proteus.eval.cache_audit import edit_after, yes_no
from proteus.eval.plan import EvalPlan, ngram_backend
from proteus.eval.scoring import row_sum_tolerance
from proteus.eval.ttt import check_ttt_fits, ttt_score
from proteus.eval.ttt_phased import audit_phased
from proteus.model import GPT

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The audit


@dataclass
class TTTAuditReport:
    passed: bool
    chunks: int
    edits: list[int]  # edit points: every token from each on was replaced, one rerun each
    edits_ok: bool  # every score before each edit point stayed bit-identical
    changed: bool  # and each edit did change a later score (the check is not vacuous)
    positions: int  # where the full distribution was captured
    max_sum_error: float  # of the model's distribution there
    consistent: bool  # the captured distribution holds the scored value, bit for bit
    cache_max_sum_error: float | None = None  # of the blended distribution there
    cache_consistent: bool | None = None  # the blended score is that distribution's value
    cache_edits_ok: bool | None = None

    def __str__(self) -> str:
        yn = yes_no
        parts = [f"{'PASS' if self.passed else 'FAIL'} (score-first TTT, {self.chunks} chunks, "
                 f"edits from targets {', '.join(f'{e:,}' for e in self.edits)}): every earlier "
                 f"score bit-identical={yn(self.edits_ok)}, later scores changed="
                 f"{yn(self.changed)}",
                 f"at {self.positions} positions max |sum p - 1| = {self.max_sum_error:.1e}, "
                 f"scores match the distribution={yn(self.consistent)}"]
        if self.cache_consistent is not None:
            parts.append(f"with the n-gram cache: earlier blended scores bit-identical="
                         f"{yn(self.cache_edits_ok)}, max |sum p - 1| = "
                         f"{self.cache_max_sum_error:.1e}, scores match="
                         f"{yn(self.cache_consistent)}")
        return "; ".join(parts)


def audit_ttt(model: GPT, tokens: torch.Tensor, lut: ByteLUT, seq: int, ec: EvalConfig,
              ncfg: NgramConfig | None = None, n_chunks: int = 3, device="cpu",
              autocast: bool = False, tol: float | None = None, seed: int = 0) -> TTTAuditReport:
    """Audit score-first TTT (and the n-gram cache over its scores, with ``ncfg``) on the
    first ``n_chunks`` chunks of ``tokens`` (see the module docstring)."""
    c = ec.ttt_chunk
    tokens = tokens[: n_chunks * c + 1]
    n = tokens.numel()
    check_ttt_fits(ec, n - 1, seq)
    g = torch.Generator().manual_seed(seed)
    n_ch = -(-(n - 1) // c)
    edges = [t for k in range(1, n_ch) for t in (k * c, k * c + 1)]
    bos = (torch.nonzero(tokens[1:] == D.BOS_ID)[:, 0] + 1).tolist()[:3]
    rand = torch.randint(1, n, (4,), generator=g).tolist()
    positions = sorted({t for t in (*edges, *bos, *rand) if 1 <= t < n})
    capture: dict[int, torch.Tensor | None] = dict.fromkeys(positions)
    base = ttt_score(model, tokens, lut, seq, ec, device, autocast, capture).scores.logp
    backend = ngram_backend(ec)
    blended = ngram_blend_logprobs(tokens, 1, n, base, ncfg, backend) if ncfg else None

    # edits: from the first target of each later chunk, and from the middle of the first two
    mids = {k * c + c // 2 + 1 for k in range(min(2, n_ch))}
    edits = sorted({k * c + 1 for k in range(1, n_ch)} | {e for e in mids if e < n})
    edits_ok, changed, cache_ok = True, True, True
    for e in edits:
        other = edit_after(tokens, e, g, lut.vocab_size)
        got = ttt_score(model, other, lut, seq, ec, device, autocast).scores.logp
        edits_ok = edits_ok and torch.equal(got[: e - 1], base[: e - 1])
        changed = changed and not torch.equal(got[e - 1 :], base[e - 1 :])
        if ncfg is not None:
            b2 = ngram_blend_logprobs(other, 1, n, got, ncfg, backend)
            cache_ok = cache_ok and torch.equal(b2[: e - 1], blended[: e - 1])

    sum_err, consistent = 0.0, True
    c_err, c_cons = 0.0, True
    for t in positions:
        row = capture[t]
        tgt = int(tokens[t])
        sum_err = max(sum_err, abs(row.exp().sum().item() - 1.0))
        consistent = consistent and row[tgt].item() == base[t - 1].item()
        if ncfg is not None:
            p = cache_distribution(tokens, t, row, ncfg)
            c_err = max(c_err, abs(p.sum().item() - 1.0))
            c_cons = c_cons and math.isclose(p[tgt].item(), blended[t - 1].exp().item(),
                                             rel_tol=1e-9, abs_tol=1e-15)
    rep = TTTAuditReport(False, n_ch, edits, edits_ok, changed, len(positions),
                         sum_err, consistent)
    if tol is None:
        tol = row_sum_tolerance(model.cfg.logit_softcap, lut.vocab_size)
    passed = edits_ok and changed and sum_err <= tol and consistent
    if ncfg is not None:
        rep.cache_max_sum_error, rep.cache_consistent, rep.cache_edits_ok = c_err, c_cons, cache_ok
        passed = passed and c_err <= tol and c_cons and cache_ok
    rep.passed = passed
    return rep


def run_ttt_audit(model: GPT, plan: EvalPlan, tokens: torch.Tensor, lut: ByteLUT) -> bool:
    """``proteus audit --ttt``: the TTT audit (with the cache when the plan has it)."""
    if plan.ec.ttt_mode == "phased":
        rep = audit_phased(model, tokens, lut, plan.seq, plan.ec)
    else:
        rep = audit_ttt(model, tokens, lut, plan.seq, plan.ec, plan.ncfg if plan.cache else None)
    log.info(f"  TTT audit: {rep}")
    return rep.passed
