"""The evaluation's own audit: does the number ``evaluate`` reports follow from the model, the
tokens and the evaluation config, through the code that computed it? Run by ``evaluate``
itself (``eval.audit``: cheap by default, full for ``proteus audit``) on the per-token records
of the very passes that produced the numbers. Each check re-derives one thing independently:

* ``windows``: the windows of each pass score every target 1..N exactly once, in order, each
  with the context the spec gives it (plain: ``s = L ⌊(j-1)/L⌋``; sliding: the first window
  scores 1..L, then windows of L tokens ending S further each, clipped at N);
* ``targets``: sampled targets rescored alone (one window of one row, built from the formula
  above) hold the recorded log-probability (|difference| <= 1e-5 nats: a batch of one may
  round differently from a batch of many on some devices) and the recorded byte count;
* ``bytes``: the byte table re-derived from the tokenizer's pieces (a piece's text with "▁" as
  a space, ``<0xNN>`` one byte, control/unknown/unused none, a leading space dropped after
  those) gives every target's recorded bytes and the reported total;
* ``sums``: every reported bpb equals the exact sum of its per-token records (integer
  arithmetic on the float64 values' mantissas, not ``math.fsum``) over the reported bytes:
  a rank counted twice, a record dropped from a reduction, a partial sum are all caught;
* ``causal``: for every cache mode and for TTT, the full predicted distribution at sampled
  positions t is unchanged when x_t and every later token change (the cache's own fast
  scorer over all V candidates; TTT's whole pass rerun on the edited stream, its rows
  captured from the forward that scored t).
"""

from __future__ import annotations

import logging
import math
import re
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

import proteus.eval.scoring as scoring  # its windows as the passes call them
from proteus import data as D
from proteus.caseops import OPERATORS as CASEOPS_OPERATORS
from proteus.device import map_one_thread
from proteus.dist import reduce_sum
from proteus.eval.blend import ngram_blend_logprobs
from proteus.eval.cache import cache_model_fn
from proteus.eval.cache_audit import edit_after
from proteus.eval.plan import EvalPlan
from proteus.eval.scoring import TokenScores, model_logprobs_fn
from proteus.eval.ttt import ttt_score
from proteus.eval.ttt_phased import audit_phased
from proteus.model import runs_interpreted_kernels
from proteus.tilt import longest_match_hints

log = logging.getLogger(__name__)

# How much each level looks at: sampled targets rescored, cache positions whose whole
# distribution is compared on an edited stream, TTT chunks rerun and edit points in them.
LEVELS = {"cheap": dict(targets=8, cache_positions=1, ttt_chunks=2, ttt_edits=1),
          "full": dict(targets=64, cache_positions=4, ttt_chunks=3, ttt_edits=3)}
TARGET_TOL = 1e-5  # nats: a rescored target against its record


def expected_start(j: torch.Tensor, n_targets: int, seq: int, stride: int) -> torch.Tensor:
    """The first input token of the window that must score target j (the spec, from
    scratch)."""
    if stride <= 0 or stride >= seq:
        return (j - 1) // seq * seq
    k = torch.clamp((j - seq + stride - 1) // stride, min=0)  # windows after the first
    end = torch.clamp(seq + k * stride, max=n_targets)
    return torch.where(j <= seq, torch.zeros_like(j), end - seq).clamp(min=0)


def check_windows(n_targets: int, seq: int, stride: int) -> bool:
    """Every target scored once, in order, by the window the spec gives it."""
    wins = scoring.windows(n_targets, seq, stride)
    owner = torch.full((n_targets + 1,), -1, dtype=torch.int64)
    seen = torch.zeros(n_targets + 1, dtype=torch.int64)
    for s, e, f in wins:
        if not (0 <= s < f <= e <= n_targets and e - s <= seq):
            return False
        seen[f : e + 1] += 1
        owner[f : e + 1] = s
    j = torch.arange(1, n_targets + 1)
    flat = [j for _, e, f in wins for j in range(f, e + 1)]
    return (bool((seen[1:] == 1).all()) and flat == list(range(1, n_targets + 1))
            and torch.equal(owner[1:], expected_start(j, n_targets, seq, stride)))


def derived_byte_table(sp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes of each piece's text, starts with a space, is a boundary) from the pieces."""
    n = sp.vocab_size()
    base, space, boundary = np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, bool)
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            base[i] = 1
        else:
            text = piece.replace("\u2581", " ")
            space[i] = text.startswith(" ")
            base[i] = len(text.encode("utf-8")) - int(space[i])
    return base, space, boundary


def check_bytes(sp, tokens: torch.Tensor, records: dict[str, TokenScores], total: int) -> bool:
    """Every record's bytes and the total from the re-derived table. For a CaseOps tokenizer
    (every operator piece present, ``proteus.caseops``) an operator costs no bytes, unless it
    follows ESC (the last operator), where it is a literal piece of text."""
    base, space, boundary = derived_byte_table(sp)
    tok = tokens.cpu().numpy().astype(np.int64)
    prev, tgt = tok[:-1], tok[1:]
    want = base[tgt] + (space[tgt] & ~boundary[prev])
    ids = [sp.piece_to_id(o) for o in CASEOPS_OPERATORS]
    if all(sp.id_to_piece(i) == o for i, o in zip(ids, CASEOPS_OPERATORS, strict=True)):
        op = np.zeros(base.size, bool)
        op[ids] = True
        want = np.where(op[tgt], 0, want)
        want = np.where(prev == ids[-1], base[tgt], want)
    ok = int(want.sum()) == total
    for s in records.values():
        ok = ok and np.array_equal(s.nbytes.numpy(), want[s.first - 1 : s.first - 1
                                                           + s.nbytes.numel()])
    return ok


def exact_total(values: torch.Tensor) -> float:
    """The sum of float64 ``values``, correctly rounded, by integer arithmetic: each value is
    mantissa · 2^exponent (numpy's frexp, 53-bit integer mantissas); the mantissas of each
    exponent are added as Python integers and the exact total is rounded once."""
    m, e = np.frexp(values.double().numpy())
    mant = (m * 2.0**53).astype(np.int64)
    total = Fraction(0)
    for ex in np.unique(e):
        ints = mant[e == ex]
        s = sum(int(x) for x in np.add.reduceat(ints, np.arange(0, ints.size, 512)))
        total += Fraction(s) * Fraction(2) ** (int(ex) - 53)
    return float(total)


def check_sums(reported: dict[str, float], records: dict[str, torch.Tensor],
               nbytes: int) -> bool:
    return all(reported[k] == -exact_total(records[k]) / math.log(2) / nbytes
               for k in reported)


def _sample(n_targets: int, k: int, seq: int, stride: int, seed: int = 0) -> list[int]:
    """The first and last targets, window edges, and random ones: up to ``k``."""
    g = torch.Generator().manual_seed(seed)
    edges = [1, n_targets, min(seq, n_targets), min(seq + 1, n_targets)]
    if 0 < stride < seq:
        edges += [min(seq + stride, n_targets), min(seq + stride + 1, n_targets)]
    rand = torch.randint(1, n_targets + 1, (max(k - len(edges), 0),), generator=g).tolist()
    return sorted(set(edges + rand))


@torch.no_grad()
def check_targets(model, tokens: torch.Tensor, scores: TokenScores, seq: int, stride: int,
                  lut: D.ByteLUT, k: int, device, autocast: bool) -> bool:
    n = tokens.numel() - 1
    if scores.first != 1 or scores.logp.numel() != n or scores.nbytes.numel() != n:
        return False  # not one record per target
    js = _sample(n, k, seq, stride)
    starts = expected_start(torch.tensor(js), n, seq, stride).tolist()
    was = model.training
    model.eval()

    def rescore(js_: tuple[int, int]) -> float:  # target j alone in the window starting at s
        j, s = js_
        x = tokens[s : min(s + seq, n)].to(device)[None]
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=autocast):
            z = model.logits(x)
        return F.log_softmax(z.float(), -1)[0, j - 1 - s, int(tokens[j])].double().item()

    lps = map_one_thread(rescore, zip(js, starts, strict=True), device,
                         side_by_side=not runs_interpreted_kernels(model))
    model.train(was)
    ok = True
    for j, lp in zip(js, lps, strict=True):
        rec = scores.logp[j - scores.first].item()
        want_b = int(lut.target_bytes(tokens[j - 1 : j], tokens[j : j + 1])[0])
        ok = ok and abs(lp - rec) <= TARGET_TOL and int(scores.nbytes[j - scores.first]) == want_b
    return ok


TAIL = 64  # tokens after t in the streams of the cache's causality check


def distribution_with_tail(tokens: torch.Tensor, t: int, row: torch.Tensor, plan: EvalPlan
                           ) -> torch.Tensor:
    """The cache's distribution at t as the evaluation's own scorer gives it: the blend run
    over streams x_<t, v, x_t+1 .. x_t+TAIL for every candidate v (the tokens after t are in
    the streams, as they are when the whole stream is scored), with the model's (or TTT's)
    ``row``; (V,) float64."""
    v = row.numel()
    end = min(tokens.numel(), t + 1 + TAIL)
    group = max(1, (1 << 22) // end)
    base = tokens[:end].cpu().to(torch.int64)
    tail = torch.full((end - t - 1,), -math.log(v), dtype=torch.float64)
    out = []
    for lo in range(0, v, group):
        cand = torch.arange(lo, min(v, lo + group))
        streams = base.repeat(cand.numel(), 1)
        streams[:, t] = cand
        lp = torch.cat((row[cand].double()[:, None], tail.expand(cand.numel(), -1)), 1)
        out.append(ngram_blend_logprobs(streams, t, end, lp, plan.ncfg, plan.backend)[:, 0])
    return torch.cat(out).exp()


def check_cache_causal(model, plan: EvalPlan, tokens: torch.Tensor, k: int,
                       rows: dict[int, torch.Tensor] | None = None) -> bool:
    """At ``k`` early positions where the cache is at work (cheapest: this costs V · t), the
    blend over the model's (or TTT's, ``rows``) distribution must not move when x_t and
    everything after it change (under ``--cache ngram+tilt`` the model's row is tilted
    towards the hint found in each stream: the composition must not move either)."""
    n = tokens.numel()
    g = torch.Generator().manual_seed(7)
    fn = cache_model_fn(model_logprobs_fn(model, plan.seq), plan)
    ts = sorted(rows)[:k] if rows else list(range(min(64, n - 2), n - 1, max(1, n // 8)))[:k]
    if plan.tilt and not rows:  # move each to the next position with a hint: the tilt at work
        hinted = torch.nonzero(longest_match_hints(tokens, plan.tcfg.max_order,
                                                   plan.tcfg.min_order)[0][: n - 1] >= 0)[:, 0]
        ts = list(dict.fromkeys(int(hinted[torch.searchsorted(hinted, t).clamp(
            max=hinted.numel() - 1)]) if hinted.numel() else t for t in ts))
    ok = True
    for t in ts:
        other = edit_after(tokens, t + 1, g, plan.cfg.model.vocab_size)  # x_t: every candidate
        row = rows[t] if rows else fn(tokens, torch.tensor([t]))[0]
        row2 = rows[t] if rows else fn(other, torch.tensor([t]))[0]
        p1 = distribution_with_tail(tokens, t, row, plan)
        p2 = distribution_with_tail(other, t, row2, plan)
        ok = ok and torch.equal(p1, p2) and abs(p1.sum().item() - 1.0) <= 1e-6
    return ok


def check_ttt_causal(model, plan: EvalPlan, tokens: torch.Tensor, lut: D.ByteLUT,
                     chunks: int, edits: int, cache_k: int, device, autocast: bool
                     ) -> bool:
    """TTT rerun on its first ``chunks`` chunks, and again with x_t and every later token
    changed, for edit points t at chunk starts (where a pass that trains before it scores
    leaks) and inside a chunk: the distribution at t, captured from the forward that scored
    it, must be the same in both. Every rank takes part (the passes are shared); each compares
    the rows it scored, and the verdict is every rank's."""
    ec = plan.ec
    if ec.ttt_mode == "phased":  # its own edit points: chunk edges, documents, the phase
        rep = audit_phased(model, tokens, lut, plan.seq, ec, device, autocast, 2 * edits)
        return reduce_sum(float(not rep.passed))[0] == 0
    c = ec.ttt_chunk
    prefix = tokens[: min(chunks * c + 1, tokens.numel())]
    n_ch = -(-(prefix.numel() - 1) // c)
    points = [k * c + 1 for k in range(1, n_ch)] + [c // 2 + 1]
    points = list(dict.fromkeys(t for t in points if 1 <= t < prefix.numel()))[:edits]
    cap = dict.fromkeys(points)
    ttt_score(model, prefix, lut, plan.seq, ec, device, autocast, cap)
    g = torch.Generator().manual_seed(11)
    ok = True
    for t in points:
        other = edit_after(prefix, t, g, lut.vocab_size)
        cap2 = {t: None}
        ttt_score(model, other, lut, plan.seq, ec, device, autocast, cap2)
        if cap[t] is not None:  # this rank scored t
            ok = ok and torch.equal(cap[t], cap2[t])
    rows = {t: r for t, r in cap.items() if r is not None}
    if plan.cache and cache_k and rows:
        ok = ok and check_cache_causal(model, plan, prefix, cache_k, rows)
    return reduce_sum(float(not ok))[0] == 0
