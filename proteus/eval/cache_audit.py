"""The n-gram cache's audit: the reference distribution against the fast scorer, at positions
of every kind where a fast path could go wrong (see ``audit``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import proteus.eval.stream_counts as streamed
from proteus.data import BOS_ID
from proteus.eval.blend import NgramConfig, cache_distribution, ngram_blend_logprobs
from proteus.eval.hashed import HashedTwoTableCache
from proteus.eval.progress import Progress

# ---------------------------------------------------------------------------------------------
# The audit

AUDIT_CLASSES = ("bos_target", "after_bos", "chunk_edge", "shard_edge", "repeated_context",
                 "random")
AUDIT_WORLDS = (2, 3, 8)  # the splits over ranks whose shard edges the audit visits
MATERIALISE_ELEMENTS = 1 << 22  # tokens per batch when scoring every candidate of a position
MAX_BOS_POSITIONS = 256  # BOS targets are rare (~1 per 1,150 tokens here): audit all of them


def _spread(cands: torch.Tensor, k: int) -> list[int]:
    """Up to ``k`` of the sorted candidates, evenly spaced, the first and the last included."""
    cands = cands.unique()
    if cands.numel() <= k:
        return cands.tolist()
    return cands[torch.linspace(0, cands.numel() - 1, k).round().long()].unique().tolist()


def audit_positions(tokens: torch.Tensor, cfg: NgramConfig, n_random: int,
                    chunks: tuple[int, ...] = (), worlds: tuple[int, ...] = AUDIT_WORLDS,
                    per_class: int = 4, seed: int = 0, max_bos: int = MAX_BOS_POSITIONS
                    ) -> dict[str, list[int]]:
    """Target positions t (1 <= t < len) of every kind where a fast path could go wrong:
    ``bos_target`` (x_t is BOS), ``after_bos`` (x_{t-1} is BOS: an empty document),
    ``chunk_edge`` (the last and first targets of the device table's chunks and of any extra
    ``chunks``, e.g. test-time training's), ``shard_edge`` (the last and first targets of each
    rank's shard for ``worlds`` processes), ``repeated_context`` (the highest order's context
    seen at least twice before) and ``random``: every BOS target (up to ``max_bos``, spread
    over the stream), up to ``per_class`` of the other kinds (``n_random`` random ones)."""
    n = tokens.numel()
    if n < 2:
        raise ValueError(f"audit_positions: need at least 2 tokens, got {n}")
    tok = tokens.cpu().to(torch.int64)
    out = {"bos_target": _spread(torch.nonzero(tok[1:] == BOS_ID)[:, 0] + 1, max_bos),
           "after_bos": _spread(torch.nonzero(tok[:-1] == BOS_ID)[:, 0] + 1, per_class)}
    edges = []
    for c in (cfg.chunk, *chunks):
        for k in _spread(torch.arange(c, max(c, n), c), per_class):
            edges += [k - 1, k, k + 1]
    out["chunk_edge"] = sorted({t for t in edges if 1 <= t < n})
    shard = []
    for w in worlds:
        for r in range(1, w):
            lo = 1 + (n - 1) * r // w
            shard += [lo - 1, lo]
    out["shard_edge"] = sorted({t for t in shard if 1 <= t < n})
    # the order-N context count of each target, streamed (memory of the distinct n-grams;
    # called through the module: the audit's choice of positions is not the scorer under test)
    rep = []
    for cc in streamed.stream_counts(tok, 1, n, cfg.order, doc=False, bits=cfg.id_bits):
        rep.append(np.flatnonzero(cc.ctx[cfg.order - 2] >= 2) + cc.lo)
        if per_class == 1 and rep[-1].size:
            break  # one of a kind: _spread keeps the first, so the rest is not counted
    out["repeated_context"] = _spread(torch.from_numpy(np.concatenate(rep)), per_class)
    g = torch.Generator().manual_seed(seed)
    out["random"] = sorted(set(torch.randint(1, n, (n_random,), generator=g).tolist()))
    return out


def fast_distribution(tokens: torch.Tensor, t: int, model_logp: torch.Tensor,
                      cfg: NgramConfig, backend: str = "numpy", start: int = 1) -> torch.Tensor:
    """The fast scorer's own distribution at t: ``ngram_blend_logprobs`` run on the stream
    x_<t, v for every candidate v of the vocabulary (a batch of streams, as a shard [start,
    t+1)), with the model's log-probability ``model_logp[v]`` of each; (V,) float64."""
    v = model_logp.numel()
    if not 1 <= start <= t < tokens.numel():
        raise ValueError(f"fast_distribution: need 1 <= start <= t < {tokens.numel()}, got "
                         f"start {start}, t {t}")
    group = max(1, MATERIALISE_ELEMENTS // (t + 1))
    prefix = tokens[: t + 1].cpu().to(torch.int64)
    fill = torch.full((t - start,), -math.log(v), dtype=torch.float64)
    out = []
    for lo in range(0, v, group):
        cand = torch.arange(lo, min(v, lo + group))
        streams = prefix.repeat(cand.numel(), 1)
        streams[:, t] = cand
        lp = torch.cat((fill.expand(cand.numel(), -1), model_logp[cand].double()[:, None]), 1)
        out.append(ngram_blend_logprobs(streams, start, t + 1, lp, cfg, backend)[:, -1])
    return torch.cat(out).exp()


def context_seen(tok: np.ndarray, t: int, doc: bool) -> bool:
    """Has target t's order-2 context (x_{t-1}) occurred before, so the counts of every order
    may be at work at t? With ``doc``, in its document too (what follows the last BOS before
    t-1: no document's past holds a BOS, so a BOS context is never seen there). The same as
    the streamed counts' ``ctx[0] > 0`` (and ``doc_ctx[0] > 0``) at t, by one scan of x_<t-1
    (tests/test_ngram.py compares)."""
    c, lo = tok[t - 1], 0
    if doc:
        bos = np.flatnonzero(tok[: t - 1] == BOS_ID)
        lo = int(bos[-1]) + 1 if bos.size else 0
    return bool((tok[lo : t - 1] == c).any())


def yes_no(x: bool | None) -> str:
    """An audit check's verdict as the reports print it."""
    return "n/a" if x is None else "yes" if x else "NO"


@dataclass
class AuditReport:
    passed: bool
    scheme: str
    positions: int
    max_sum_error: float
    min_prob: float
    max_sum: float
    causal: bool
    consistent: bool | None  # the fast scores equal the reference at every position (None: n/a)
    classes: dict[str, int] = field(default_factory=dict)  # positions audited per kind
    materialised: int = 0  # positions where the fast scorer's whole distribution was compared
    fast_max_error: float | None = None  # max relative |p_fast - p_ref| over those
    fast_max_sum_error: float | None = None  # max |sum p_fast - 1| over those
    edits: int = 0  # edited streams (every token from a point on) whose earlier scores held
    edits_ok: bool | None = None
    splits_ok: bool | None = None  # the scores split over ``worlds`` shards equal the whole
    worlds: tuple[int, ...] = AUDIT_WORLDS

    def __str__(self) -> str:
        verdict, yn = "PASS" if self.passed else "FAIL", yes_no
        kinds = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.classes.items() if v)
        text = (f"{verdict} ({self.scheme}, {self.positions} positions"
                f"{': ' + kinds if kinds else ''}): max |sum p - 1| = {self.max_sum_error:.2e}, "
                f"largest sum {self.max_sum:.6g}, min p = {self.min_prob:.2e}, "
                f"causal={yn(self.causal)}, fast scores match the reference="
                f"{yn(self.consistent)}")
        if self.materialised:
            text += (f"; the fast scorer's own distribution at {self.materialised} positions: "
                     f"max rel |p_fast - p_ref| = {self.fast_max_error:.1e}, max |sum - 1| = "
                     f"{self.fast_max_sum_error:.1e}")
        if self.edits_ok is not None:
            text += (f"; {self.edits} edited streams, earlier scores bit-identical="
                     f"{yn(self.edits_ok)}; split over {'/'.join(map(str, self.worlds))} "
                     f"shards identical={yn(self.splits_ok)}")
        return text


def edit_after(tokens: torch.Tensor, e: int, g: torch.Generator, vocab: int) -> torch.Tensor:
    """``tokens`` with every token from e on replaced at random (every 61st by a BOS, so the
    edited part holds document starts too)."""
    other = tokens.clone()
    other[e:] = torch.randint(0, vocab, (tokens.numel() - e,), generator=g)
    other[e::61] = BOS_ID
    return other


def _shards(n: int, world: int) -> list[tuple[int, int]]:
    """The target ranges [lo, hi) that ``world`` ranks score (as the evaluator splits them)."""
    return [(1 + (n - 1) * r // world, 1 + (n - 1) * (r + 1) // world) for r in range(world)]


def audit(tokens: torch.Tensor, positions: torch.Tensor | dict[str, list[int]],
          model_logprobs_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          cfg: NgramConfig = NgramConfig(), scheme: HashedTwoTableCache | None = None,  # noqa: B008
          tol: float = 1e-6, backend: str = "numpy", materialise: int = 6,
          edits: int = 8, worlds: tuple[int, ...] = AUDIT_WORLDS,
          earliest: bool = False) -> AuditReport:
    """Audit the cache at ``positions`` (a tensor, or the classes of ``audit_positions``).

    1. Reference: materialise p_t over the vocabulary by direct scans of x_<t
       (``cache_distribution``); its sum must be 1 within ``tol``, p >= 0, and p_t must not move
       when the target and every later token change.
    2. The fast scorer (``ngram_blend_logprobs`` on ``backend``, the whole stream in one call,
       as one process scores it) must give each audited target exactly the reference's
       p_t(x_t) (relative 1e-9).
    3. Its whole distribution: at ``materialise`` positions (the earliest of each class first,
       where scoring all V candidates is cheapest), every candidate target v is scored through
       the fast path (``fast_distribution``, alternately as a shard starting at t); it must
       equal the reference's p_t(v) for every v and sum to 1.
    4. ``edits`` times, every token from an audited position e on is replaced (BOS included)
       and the whole stream rescored: every score of a target before e must stay bit-identical.
    5. Split into 2, 3 and 8 shards (as that many ranks score it), the scores must equal the
       whole stream's bit for bit.

    With ``scheme`` (the record's hashed cache) only step 1 applies: it has no fast scorer of
    ours to compare."""
    classes = positions if isinstance(positions, dict) else None
    pos_t = (torch.tensor(sorted({t for v in classes.values() for t in v}), dtype=torch.int64)
             if classes is not None else positions.to(torch.int64))
    n = tokens.numel()
    if pos_t.numel() == 0 or int(pos_t.min()) < 1 or int(pos_t.max()) >= n:
        raise ValueError(f"audit: need at least one position, each in [1, {n})")
    model_lp = model_logprobs_fn(tokens, pos_t).double()
    vocab = model_lp.shape[1]
    at = {t: i for i, t in enumerate(pos_t.tolist())}

    def dist(toks, t, lp):
        return scheme.distribution(toks, t, lp) if scheme else cache_distribution(toks, t, lp, cfg)

    sums, mins, causal = [], [], True
    refs = []
    g = torch.Generator().manual_seed(1234)
    bar = Progress("audit: reference distributions", pos_t.numel(), unit="positions")
    for i, t in enumerate(pos_t.tolist()):
        bar.tick(i)
        p = dist(tokens, t, model_lp[i])
        refs.append(p)
        sums.append(p.sum().item())
        mins.append(p.min().item())
        other = tokens.clone()  # change the target and every later token: p_t must not move
        other[t:] = torch.randint(0, vocab, (n - t,), generator=g)
        lp2 = model_logprobs_fn(other, torch.tensor([t]))[0].double()
        if not torch.equal(dist(other, t, lp2), p):
            causal = False
    err = max(abs(s - 1.0) for s in sums)
    counts = {k: len(v) for k, v in classes.items()} if classes else {}
    rep = AuditReport(False, "", len(sums), err, min(mins), max(sums), causal, None, counts)
    if scheme is not None:
        rep.scheme = "hashed two-table cache (the original record)"
        rep.passed = err <= tol and min(mins) >= 0.0 and causal
        return rep
    rep.scheme = f"ngram order {cfg.order}, {backend} scorer"

    # 2. the fast scores of the whole stream; the model's input at an audited target is the
    # reference's, elsewhere a constant (the blend of a target reads its own model score only)
    stream_lp = torch.full((n - 1,), -math.log(vocab), dtype=torch.float64)
    tgt = tokens[pos_t].long()
    stream_lp[pos_t - 1] = model_lp[torch.arange(pos_t.numel()), tgt]
    fast = ngram_blend_logprobs(tokens, 1, n, stream_lp, cfg, backend)
    want = torch.stack([refs[i][int(tokens[t])] for t, i in at.items()])
    got = fast[pos_t - 1].exp()
    rep.consistent = bool(torch.all((got - want).abs() <= 1e-9 * want + 1e-15))

    # 3. the fast scorer's whole distribution: of each class first the earliest position
    # whose context both count kinds have seen (where every part of the blend is at work)
    tok = tokens.cpu().numpy()
    busy = {t: context_seen(tok, t, cfg.doc) for t in pos_t.tolist()}
    lists = list(classes.values()) if classes else []
    by_time = sorted(pos_t.tolist(), key=lambda t: (not busy[t], t))
    order = by_time if earliest else [
        min([t for t in v if busy[t]] or v) for v in lists if v] + by_time
    chosen = list(dict.fromkeys(order))[:materialise]
    f_err, f_sum = 0.0, 0.0
    bar = Progress("audit: the fast scorer's whole distribution", len(chosen), unit="positions")
    for j, t in enumerate(chosen):
        bar.tick(j)
        pf = fast_distribution(tokens, t, model_lp[at[t]], cfg, backend,
                               start=t if j % 2 else 1)
        pr = refs[at[t]]
        f_err = max(f_err, ((pf - pr).abs() / pr.clamp(min=1e-300)).max().item())
        f_sum = max(f_sum, abs(pf.sum().item() - 1.0))
    rep.materialised, rep.fast_max_error, rep.fast_max_sum_error = len(chosen), f_err, f_sum

    # 4. edit every token from e on: the scores of targets before e must not move
    e_pts = list(dict.fromkeys([min(v) for v in lists if v] + pos_t.tolist()))[:edits]
    ok = True
    bar = Progress("audit: edited streams", len(e_pts), unit="streams")
    for i, e in enumerate(e_pts):
        bar.tick(i)
        other = edit_after(tokens, e, g, vocab)
        lp2 = stream_lp.clone()
        lp2[e - 1 :] -= 0.5  # the model's scores of the changed targets change too
        got2 = ngram_blend_logprobs(other, 1, n, lp2, cfg, backend)
        ok = ok and torch.equal(got2[: e - 1], fast[: e - 1])
    rep.edits, rep.edits_ok = len(e_pts), ok

    # 5. the same scores from the shards that 2, 3 and 8 ranks would score
    rep.splits_ok = all(
        torch.equal(torch.cat([ngram_blend_logprobs(tokens, lo, hi, stream_lp[lo - 1 : hi - 1],
                                                    cfg, backend)
                               for lo, hi in _shards(n, w)]), fast)
        for w in worlds)
    rep.worlds = worlds
    rep.passed = (err <= tol and min(mins) >= 0.0 and causal and rep.consistent
                  and f_err <= 1e-9 and f_sum <= tol and ok and rep.splits_ok)
    return rep
