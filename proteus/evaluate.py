"""Evaluation: per-token model log-probabilities, plain and sliding-window bits per byte, the
n-gram cache's scores and report, and the cache audit run on a model.

Targets are positions ``j = 1 .. N`` of a token stream ``x_0 .. x_N``: target ``x_j`` is scored
with context ``x_<j`` (what the model sees of it depends on the window).

* Plain: non-overlapping windows of ``L`` tokens; window ``w`` feeds ``x[wL : wL+L]`` and
  scores targets ``wL+1 .. wL+L``. Early positions of each window see little context.
* Sliding (``stride`` S < L): window ``k`` feeds ``x[kS : kS+L]`` and scores only its last S
  targets (the first window scores all L), so every target is scored once, with at least
  ``L - S`` tokens of context once the stream is long enough.

Work is split over ranks by whole windows, in order, so each rank owns one contiguous range of
targets; per-token results are gathered in position order, and totals are reduced in float64.
The cache on each rank first counts every token before its shard, so its result does not
depend on the number of processes either. Functions return their results; progress and result
lines go to the ``proteus`` logger (the command line prints them on rank 0).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from proteus import data as D
from proteus.config import EvalConfig, RunConfig
from proteus.data import ByteLUT, bits_per_byte
from proteus.dist import gather_ordered, rank_world, reduce_sum
from proteus.model import GPT
from proteus.ngram import (
    HashedTwoTableCache,
    NgramConfig,
    audit,
    audit_positions,
    load_cache_params,
    ngram_blend_logprobs,
)

log = logging.getLogger(__name__)


@dataclass
class TokenScores:
    """Per-target results for targets ``first .. first + n - 1`` (positions in the stream)."""

    first: int
    logp: torch.Tensor  # float64 (n,): log p_model(target)
    nbytes: torch.Tensor  # int64 (n,)

    def bpb(self) -> float:
        return bits_per_byte(-self.logp.sum().item(), int(self.nbytes.sum()))


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
                 autocast: bool, capture: dict[int, torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
    """log p(target) of the scored targets of each window of ``batch`` (windows of one length),
    float64 on the CPU. ``capture`` (target -> None) receives the full log-probability row over
    the vocabulary of each of its targets that this batch scores."""
    x = torch.stack([tokens[s:e] for s, e, _ in batch]).to(device)
    y = torch.stack([tokens[s + 1 : e + 1] for s, e, _ in batch]).to(device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                        enabled=autocast):
        z = model.logits(x)
    logp_all = F.log_softmax(z.float(), dim=-1)
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


@torch.no_grad()
def score_windows(model, tokens: torch.Tensor, wins: list[tuple[int, int, int]],
                  batch_seqs: int = 16, device: str | torch.device = "cpu",
                  autocast: bool = False, capture: dict[int, torch.Tensor] | None = None,
                  progress: bool = False) -> torch.Tensor:
    """log p(target) of every scored target of ``wins`` (see :func:`windows`), in order, float64.
    Windows of equal length are batched together, ``batch_seqs`` at a time."""
    logps = []
    was_training = model.training
    model.eval()
    t0 = last = time.perf_counter()
    i = 0
    while i < len(wins):
        length = wins[i][1] - wins[i][0]
        j = i
        while j < len(wins) and j - i < batch_seqs and wins[j][1] - wins[j][0] == length:
            j += 1
        logps += _score_batch(model, tokens, wins[i:j], device, autocast, capture)
        i = j
        now = time.perf_counter()
        if progress and now - last > 5.0:
            last = now
            done = sum(e - f + 1 for _, e, f in wins[:i])
            total = sum(e - f + 1 for _, e, f in wins)
            log.info(f"  eval {done}/{total} targets ({done / (now - t0):,.0f} tok/s)")
    model.train(was_training)
    return torch.cat(logps) if logps else torch.zeros(0, dtype=torch.float64)


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
) -> TokenScores:
    """Score every target of ``tokens`` (1-D int64, BOS first) with the model.

    With ``gather`` the full per-token arrays are returned on every rank; without it each rank
    returns only its own contiguous range.
    """
    n_targets = tokens.numel() - 1
    if n_targets < 1:
        raise ValueError("score_tokens: need at least 2 tokens")
    rank, world = rank_world()
    wins = windows(n_targets, seq_len, stride)
    mine = wins[len(wins) * rank // world : len(wins) * (rank + 1) // world]
    first = mine[0][2] if mine else n_targets + 1
    logp = score_windows(model, tokens, mine, batch_seqs, device, autocast,
                         progress=progress and rank == 0)
    if gather and world > 1:
        logp = gather_ordered(logp)
        first = 1
    return token_scores(first, logp, tokens, lut)


def token_scores(first: int, logp: torch.Tensor, tokens: torch.Tensor, lut: ByteLUT
                 ) -> TokenScores:
    """``TokenScores`` of targets ``first ..`` with their byte counts."""
    positions = torch.arange(first, first + logp.numel())
    return TokenScores(first, logp, lut.target_bytes(tokens[positions - 1], tokens[positions]))


def evaluate_bpb(model, tokens, lut, seq_len, stride=0, batch_seqs=16, device="cpu",
                 autocast=False, progress=False) -> dict:
    """Model-only bpb (and loss) over all targets of ``tokens``."""
    t0 = time.perf_counter()
    s = score_tokens(model, tokens, lut, seq_len, stride, batch_seqs, device, autocast, progress)
    n = s.logp.numel()
    return dict(
        bpb=s.bpb(),
        loss=-s.logp.sum().item() / n,
        tokens=n,
        bytes=int(s.nbytes.sum()),
        seconds=time.perf_counter() - t0,
        stride=stride,
        seq_len=seq_len,
    )


def format_bpb(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4f}"


def model_logprobs_fn(model: GPT, seq_len: int, device="cpu"):
    """(tokens, positions) -> (n, V) log p_model(next token | tokens[:pos]) for the audit, each
    from one window of the last ``seq_len`` tokens. Rows are remembered by their window's
    content (the audits ask for the same windows more than once)."""
    memo: dict[bytes, torch.Tensor] = {}

    @torch.no_grad()
    def fn(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = []
        for pos in positions.tolist():
            ctx = tokens[max(0, pos - seq_len) : pos]
            key = ctx.to(torch.int64).numpy().tobytes()
            if key not in memo:
                z = model.logits(ctx.to(device)[None])[0, -1].float()
                memo[key] = torch.log_softmax(z.double(), -1).cpu()
            out.append(memo[key])
        return torch.stack(out)

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


def _digest_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def held_out_files(cfg: RunConfig, pattern: str = "") -> list[str]:
    """Training shards that the checkpoint of ``cfg`` never trained on, for fitting eval-time
    parameters: the shards of ``pattern``, or by default the bundled train shards it did not
    train on. Shards are compared by content (sha256), not by path. A shard it trained on or a
    validation shard is refused (``DataError``), and so is a checkpoint that trained on every
    bundled shard when no ``pattern`` is given."""
    train_glob = cfg.train.train_files or D.bundled_train_glob(cfg.model.vocab_size)
    try:
        trained = {_digest_file(f) for f in D.resolve_files(train_glob, "train")}
    except D.DataError:
        raise D.DataError(f"cannot tell which shards the checkpoint trained on: its train_files "
                          f"{train_glob!r} match nothing here") from None
    val_glob = cfg.train.val_files or D.bundled_val_glob(cfg.model.vocab_size)
    val = {_digest_file(f) for f in D.resolve_files(val_glob,
                                                    "val")}
    if not pattern:
        files = [f for f in D.resolve_files(D.bundled_train_glob(cfg.model.vocab_size), "train")
                 if _digest_file(f) not in trained]
        if not files:
            raise D.DataError("the checkpoint trained on every bundled train shard, so none is "
                              "held out: train with --train-files leaving one out (e.g. "
                              "'proteus/data/fineweb_train_00000[02].bin') or pass --tune-files")
        return files
    files = D.resolve_files(pattern, "tune")
    for f in files:
        h = _digest_file(f)
        if h in val:
            raise D.DataError(f"{f} is a validation shard: cache parameters are fitted on "
                              "training tokens only")
        if h in trained:
            raise D.DataError(f"{f} is a shard the checkpoint trained on ({train_glob!r}); pass "
                              "shards it never saw")
    return files


def ngram_config(ec: EvalConfig, vocab_size: int) -> NgramConfig:
    """The cache's parameters: the shipped ones, or the file of ``ec.cache_params`` (checked
    against the evaluation's order, document switch and vocabulary)."""
    if ec.cache_params:
        return load_cache_params(ec.cache_params, ec.ngram_order, ec.ngram_doc, vocab_size)
    return NgramConfig(order=ec.ngram_order, doc=ec.ngram_doc)


def ngram_backend(ec: EvalConfig) -> str:
    if ec.ngram_backend == "auto":
        return "triton" if torch.cuda.is_available() else "numpy"
    return ec.ngram_backend


def cache_scores(scores: TokenScores, tokens: torch.Tensor, ec: EvalConfig, rank: int,
                 world: int, ncfg: NgramConfig | None = None) -> tuple[float, int, float]:
    """(sum of nll in nats, bytes, seconds) of the cache-blended scores over this rank's shard."""
    n = scores.logp.numel()
    lo, hi = 1 + n * rank // world, 1 + n * (rank + 1) // world
    ncfg = ncfg or NgramConfig(order=ec.ngram_order, doc=ec.ngram_doc)
    t0 = time.perf_counter()
    lp = ngram_blend_logprobs(tokens, lo, hi, scores.logp[lo - 1 : hi - 1], ncfg,
                              backend=ngram_backend(ec))
    seconds = time.perf_counter() - t0
    nll = -lp.double().sum().item()
    nbytes = int(scores.nbytes[lo - 1 : hi - 1].sum())
    return nll, nbytes, seconds


def run_audit(model: GPT, cfg: RunConfig, ec: EvalConfig, tokens: torch.Tensor,
              hashed: bool = False, chunks: tuple[int, ...] = ()) -> bool:
    """Audit our cache (must pass) and, with ``hashed``, the original record's scheme (must be
    flagged). Returns True when the verdicts are as they must be. The positions are every kind
    of ``audit_positions`` (``chunks``: extra chunk sizes whose edges to visit)."""
    seq = ec.eval_seq_len or cfg.train.seq_len
    ncfg = ngram_config(ec, cfg.model.vocab_size)
    positions = audit_positions(tokens, ncfg, ec.audit_positions, chunks)
    fn = model_logprobs_fn(model, seq)
    backend = ngram_backend(ec)
    rep = audit(tokens, positions, fn, ncfg, backend=backend)
    log.info(f"  audit: {rep}")
    ok = rep.passed
    if hashed:
        bad = audit(tokens, positions, fn, scheme=HashedTwoTableCache(order=ec.ngram_order))
        log.info(f"  audit of the negative example: {bad}")
        if bad.passed:
            log.warning("  the audit did not flag the hashed two-table scheme: the audit is broken")
        ok = ok and not bad.passed
    return ok


def cache_report(model: GPT, cfg: RunConfig, ec: EvalConfig, tokens: torch.Tensor,
                 scores: TokenScores, rank: int = 0, world: int = 1, with_audit: bool = True,
                 what: str = "the n-gram cache") -> dict:
    """bpb with the n-gram cache next to the model's own (``scores``), the cache's seconds and
    throughput, and (``with_audit``) the audit's verdict."""
    ncfg = ngram_config(ec, cfg.model.vocab_size)
    nll, nbytes, secs = cache_scores(scores, tokens, ec, rank, world, ncfg)
    nll, nbytes, secs = reduce_sum(nll, nbytes, secs)
    base = scores.bpb()
    with_cache = nll / math.log(2) / nbytes
    tps = (tokens.numel() - 1) / max(secs / world, 1e-9)
    log.info(f"  val bpb {format_bpb(with_cache)} with {what} (order {ec.ngram_order}); "
             f"without {format_bpb(base)}; difference {with_cache - base:+.4f}")
    log.info(f"  cache throughput {tps:,.0f} tokens/s ({ngram_backend(ec)} backend)")
    out = dict(bpb_model=base, bpb_cache=with_cache, gain=base - with_cache, tokens_per_s=tps,
               seconds=secs / world)
    if rank == 0 and with_audit:
        t0 = time.perf_counter()
        out["audit_passed"] = run_audit(model, cfg, ec, tokens)
        out["audit_seconds"] = time.perf_counter() - t0
    return out


def sliding_and_cache(model: GPT, cfg: RunConfig, ec: EvalConfig, tokens: torch.Tensor, lut,
                      seq: int, rank: int = 0, world: int = 1, device="cpu",
                      autocast: bool = False, progress: bool = False) -> dict:
    """One scoring pass for the sliding-window bpb (``ec.stride``) and the n-gram cache
    (``ec.cache == "ngram"``); returns ``val_sliding`` and ``cache`` for those that ran."""
    out: dict = {}
    if not (ec.stride or ec.cache == "ngram"):
        return out
    t0 = time.perf_counter()
    scores = score_tokens(model, tokens, lut, seq, ec.stride, ec.eval_batch_seqs, device,
                          autocast, progress=progress)
    if ec.stride:
        out["val_sliding"] = dict(bpb=scores.bpb(), stride=ec.stride, seq_len=seq,
                                  seconds=time.perf_counter() - t0)
        log.info(f"  val bpb {format_bpb(scores.bpb())} (sliding window {seq}, stride {ec.stride})")
    if ec.cache == "ngram":
        out["cache"] = cache_report(model, cfg, ec, tokens, scores, rank, world)
    return out
