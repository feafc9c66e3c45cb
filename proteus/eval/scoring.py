"""Scoring a token stream with a model: per-token log-probabilities over plain and
sliding windows, bits per byte, and the validation stream an evaluation scores.

Targets are positions ``j = 1 .. N`` of a token stream ``x_0 .. x_N``: target ``x_j`` is scored
with context ``x_<j`` (what the model sees of it depends on the window).

* Plain: non-overlapping windows of ``L`` tokens; window ``w`` feeds ``x[wL : wL+L]`` and
  scores targets ``wL+1 .. wL+L``. Early positions of each window see little context.
* Sliding (``stride`` S < L): window ``k`` feeds ``x[kS : kS+L]`` and scores only its last S
  targets (the first window scores all L), so every target is scored once, with at least
  ``L - S`` tokens of context once the stream is long enough.

Work is split over ranks by whole windows, in order, so each rank owns one contiguous range of
targets; per-token results are gathered in position order, and totals are reduced in float64.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from proteus import data as D
from proteus.config import EvalConfig, RunConfig
from proteus.data import ByteLUT, bits_per_byte
from proteus.device import map_one_thread
from proteus.dist import gather_ordered, rank_world
from proteus.eval.progress import Progress
from proteus.model import GPT, runs_interpreted_kernels

log = logging.getLogger(__name__)


def eval_window(cfg: RunConfig) -> int:
    """The evaluation's window: ``eval.eval_seq_len``, or the training sequence length."""
    return cfg.eval.eval_seq_len or cfg.train.seq_len

@dataclass
class TokenScores:
    """Per-target results for targets ``first .. first + n - 1`` (positions in the stream)."""

    first: int
    logp: torch.Tensor  # float64 (n,): log p_model(target)
    nbytes: torch.Tensor  # int64 (n,)
    logp_hint: torch.Tensor | None = None  # float64 (n,): log p_model(hint), when asked for

    def bpb(self) -> float:
        return bits_per_byte(-exact_sum(self.logp), int(self.nbytes.sum()))


def row_sum_tolerance(logit_softcap: float, vocab: int) -> float:
    """How far sum(exp(log p)) over one float32 row of the model's log-probabilities may sit
    from 1 with nothing wrong: each log p = z - lse carries the rounding of z and of lse, about
    2^-24 of their size (|z| <= the soft-cap, |lse| <= cap + ln V), which scales the row's mass
    by up to 2^-24 (2 cap + ln V); x8 for the exp and the sum. At cap 30: 1.6e-5 at V = 1024,
    3.3e-5 at V = 8192; a broken normalisation is off by far more (the record's hashed cache:
    1.6e3). Without a soft-cap, 30 stands in for the logits' size."""
    cap = logit_softcap if logit_softcap > 0 else 30.0
    return 8 * 2.0 ** -24 * (2 * cap + math.log(vocab) + 1)


def exact_sum(values: torch.Tensor) -> float:
    """The sum of ``values`` correctly rounded to float64 (``math.fsum``): the same number in
    any order, so a total does not depend on how the records were split, batched or gathered
    (~0.1 s per million values). The values go to ``fsum`` 65,536 at a time (its sum is exact
    whatever it is fed in): a list of every value as Python floats would take 32 bytes each."""
    return math.fsum(itertools.chain.from_iterable(
        part.tolist() for part in values.double().reshape(-1).split(1 << 16)))


def windows(n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(input_start, input_end, first_scored_target) for every window, in order.

    A window feeds tokens ``[input_start, input_end)`` and scores targets
    ``first_scored_target .. input_end`` (target j = token j predicted from tokens < j).
    """
    if stride <= 0 or stride >= seq_len:
        return [(s, min(s + seq_len, n_targets), s + 1) for s in range(0, n_targets, seq_len)]
    out = [(0, min(seq_len, n_targets), 1)]
    end = out[0][1]
    while end < n_targets:
        new_end = min(end + stride, n_targets)
        start = max(0, new_end - seq_len)
        out.append((start, new_end, end + 1))
        end = new_end
    return out


def _score_batch(model, tokens: torch.Tensor, batch: list[tuple[int, int, int]], device,
                 autocast: bool, capture: dict[int, torch.Tensor] | None = None,
                 second: torch.Tensor | None = None) -> list[torch.Tensor]:
    """log p(target) of the scored targets of each window of ``batch`` (windows of one length),
    float64 on the CPU. ``capture`` (target -> None) receives the full log-probability row over
    the vocabulary of each of its targets that this batch scores. ``second`` (a token per
    stream position, -1 for none): each result is then (n, 2), the second column the
    log-probability of that token at the target's place (-inf where there is none)."""
    x = torch.stack([tokens[s:e] for s, e, _ in batch]).to(device)
    y = torch.stack([tokens[s + 1 : e + 1] for s, e, _ in batch]).to(device)
    if second is not None:  # the target and the second token, gathered from the same row
        y2 = torch.stack([second[s + 1 : e + 1] for s, e, _ in batch]).to(device)
        y = torch.stack([y, y2.clamp(min=0)], -1)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                        enabled=autocast):
        z = model.logits(x)
    logp_all = F.log_softmax(z.float(), dim=-1)
    if second is not None:
        lp = logp_all.gather(-1, y)
        lp[..., 1] = torch.where(y2 >= 0, lp[..., 1], torch.full_like(lp[..., 1], -math.inf))
    else:
        lp = logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    out = []
    for b, (s, e, f) in enumerate(batch):
        k = f - 1 - s  # index within the window of the first scored target
        out.append(lp[b, k:].double().cpu())
        if capture:
            for j in range(f, e + 1):
                if j in capture:
                    capture[j] = logp_all[b, j - 1 - s].double().cpu()
    return out


def window_batches(wins: list[tuple[int, int, int]], batch_seqs: int
                   ) -> list[list[tuple[int, int, int]]]:
    """``wins`` cut, in order, into batches of up to ``batch_seqs`` windows of one length."""
    out: list[list[tuple[int, int, int]]] = []
    for w in wins:
        if out and len(out[-1]) < batch_seqs and out[-1][0][1] - out[-1][0][0] == w[1] - w[0]:
            out[-1].append(w)
        else:
            out.append([w])
    return out


@torch.no_grad()
def score_windows(model, tokens: torch.Tensor, wins: list[tuple[int, int, int]],
                  batch_seqs: int = 16, device: str | torch.device = "cpu",
                  autocast: bool = False, capture: dict[int, torch.Tensor] | None = None,
                  progress: bool = False, second: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target) of every scored target of ``wins`` (see :func:`windows`), in order, float64
    ((n, 2) with ``second``: see :func:`_score_batch`). Windows of equal length are batched
    together, ``batch_seqs`` at a time. On the CPU each batch runs on one thread, as many at
    once as there are threads (``proteus.device.map_one_thread``): the scores are the same to
    the last bit for any thread count."""
    was_training = model.training
    model.eval()
    batches = window_batches(wins, batch_seqs)
    firsts = [0]  # where each batch's scores start in ``out``
    for b in batches:
        firsts.append(firsts[-1] + sum(e - f + 1 for _, e, f in b))
    # written in place, window after window (a list of per-window tensors and their
    # concatenation held the scores twice, in thousands of small allocations); the batches
    # write disjoint ranges, so side by side is safe
    out = torch.empty((firsts[-1], 2) if second is not None else firsts[-1],
                      dtype=torch.float64)
    bar = Progress("scoring", firsts[-1], enabled=progress, unit="targets")
    done = 0
    odd: dict[int, torch.Tensor] = {}  # batches whose scores are not the count their windows say

    def score(k: int) -> int:
        got = list(_score_batch(model, tokens, batches[k], device, autocast, capture, second))
        n = sum(lp.shape[0] for lp in got)
        if n != firsts[k + 1] - firsts[k]:  # a broken scorer: its records go out as they came,
            odd[k] = torch.cat(got) if got else out[:0]  # for the audit to count, no hole left
            return n
        pos = firsts[k]
        for lp in got:
            out[pos : pos + lp.shape[0]] = lp
            pos += lp.shape[0]
        return n

    def tick(n: int) -> None:
        nonlocal done
        done += n
        bar.tick(done)

    map_one_thread(score, range(len(batches)), device, each=tick,
                   side_by_side=not runs_interpreted_kernels(model))
    model.train(was_training)
    if odd:
        return torch.cat([odd.get(k, out[firsts[k] : firsts[k + 1]]) for k in range(len(batches))])
    return out


def score_tokens(
    model,
    tokens: torch.Tensor,
    lut: ByteLUT,
    seq_len: int,
    stride: int = 0,
    batch_seqs: int = 16,
    device: str | torch.device = "cpu",
    autocast: bool = False,
    progress: bool = False,
    gather: bool = True,
    second: torch.Tensor | None = None,
) -> TokenScores:
    """Score every target of ``tokens`` (1-D int64, BOS first) with the model.

    With ``gather`` the full per-token arrays are returned on every rank; without it each rank
    returns only its own contiguous range. ``second`` (a token per position of ``tokens``, -1
    for none) also scores that token at each target's place: ``TokenScores.logp_hint``.
    """
    n_targets = tokens.numel() - 1
    if n_targets < 1:
        raise ValueError("score_tokens: need at least 2 tokens")
    rank, world = rank_world()
    wins = windows(n_targets, seq_len, stride)
    mine = wins[len(wins) * rank // world : len(wins) * (rank + 1) // world]
    first = mine[0][2] if mine else n_targets + 1
    logp = score_windows(model, tokens, mine, batch_seqs, device, autocast,
                         progress=progress and rank == 0, second=second)
    logp_hint = None
    if second is not None:
        logp, logp_hint = logp[:, 0].contiguous(), logp[:, 1].contiguous()
    if gather and world > 1:
        logp = gather_ordered(logp)
        logp_hint = gather_ordered(logp_hint) if logp_hint is not None else None
        first = 1
    out = token_scores(first, logp, tokens, lut)
    out.logp_hint = logp_hint
    return out


def token_scores(first: int, logp: torch.Tensor, tokens: torch.Tensor, lut: ByteLUT
                 ) -> TokenScores:
    """``TokenScores`` of targets ``first ..`` with their byte counts."""
    n = logp.numel()  # targets first .. first + n - 1: slices, not copies by position
    return TokenScores(first, logp, lut.target_bytes(tokens[first - 1 : first - 1 + n],
                                                     tokens[first : first + n]))


def format_bpb(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4f}"


def model_logprobs_fn(model: GPT, seq_len: int, device="cpu"):
    """(tokens, positions) -> (n, V) log p_model(next token | tokens[:pos]) for the audit, each
    from one window of the last ``seq_len`` tokens, alone (the windows it has not seen run one
    thread each, side by side: ``map_one_thread``). Rows are remembered by their window's
    content (the audits ask for the same windows more than once)."""
    memo: dict[bytes, torch.Tensor] = {}

    def row(ctx: torch.Tensor) -> torch.Tensor:
        z = model.logits(ctx.to(device)[None])[0, -1].float()
        return torch.log_softmax(z.double(), -1).cpu()

    @torch.no_grad()
    def fn(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ctxs = [tokens[max(0, pos - seq_len) : pos] for pos in positions.tolist()]
        keys = [ctx.to(torch.int64).numpy().tobytes() for ctx in ctxs]
        new = {k: c for k, c in zip(keys, ctxs, strict=True) if k not in memo}
        rows = map_one_thread(row, new.values(), device,
                              side_by_side=not runs_interpreted_kernels(model))
        memo.update(zip(new, rows, strict=True))
        return torch.stack([memo[k] for k in keys])

    return fn


def load_eval_tokens(pattern: str, ec: EvalConfig, vocab_size: int | None = None
                     ) -> tuple[torch.Tensor, int]:
    """The validation stream an evaluation scores and the index of its first token: from the
    first document start (BOS) at or after ``ec.val_start``, ``ec.val_tokens`` targets (0 =
    to the end of the shards); token ids checked against ``vocab_size`` when given."""
    limit = ec.val_tokens + 1 if ec.val_tokens else 0
    tokens = D.load_tokens(pattern, "val", limit=0 if ec.val_start else limit,
                           vocab_size=vocab_size)
    first = 0
    if ec.val_start:
        bos = torch.nonzero(tokens[ec.val_start :] == D.BOS_ID)
        if not bos.numel():
            raise D.DataError(f"no document starts at or after val_start {ec.val_start:,} "
                              f"(the validation shards hold {tokens.numel():,} tokens)")
        first = ec.val_start + int(bos[0])
        tokens = tokens[first : first + limit] if limit else tokens[first:]
    if tokens.numel() < 2:
        raise D.DataError(f"the validation stream from token {first:,} has {tokens.numel()} "
                          "token(s); an evaluation needs at least 2")
    return tokens, first


