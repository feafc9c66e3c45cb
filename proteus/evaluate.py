"""Scoring: per-token model log-probabilities, plain and sliding-window bits per byte.

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

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from proteus.data import ByteLUT, bits_per_byte


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


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
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
    rank, world = _rank_world()
    wins = windows(n_targets, seq_len, stride)
    lo, hi = len(wins) * rank // world, len(wins) * (rank + 1) // world
    mine = wins[lo:hi]
    first = mine[0][2] if mine else n_targets + 1
    logps = []
    was_training = model.training
    model.eval()
    t0 = last = time.perf_counter()
    # Batch windows of equal length together (all but possibly the last are full length).
    i = 0
    while i < len(mine):
        length = mine[i][1] - mine[i][0]
        j = i
        while j < len(mine) and j - i < batch_seqs and mine[j][1] - mine[j][0] == length:
            j += 1
        batch = mine[i:j]
        x = torch.stack([tokens[s:e] for s, e, _ in batch]).to(device)
        y = torch.stack([tokens[s + 1 : e + 1] for s, e, _ in batch]).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=autocast):
            z = model.logits(x)
        logp_all = F.log_softmax(z.float(), dim=-1)
        lp = logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        for b, (s, _e, f) in enumerate(batch):
            k = f - 1 - s  # index within the window of the first scored target
            logps.append(lp[b, k:].double().cpu())
        i = j
        now = time.perf_counter()
        if progress and rank == 0 and now - last > 5.0:
            last = now
            done = sum(e - f + 1 for _, e, f in mine[:i])
            total = sum(e - f + 1 for _, e, f in mine)
            print(f"  eval {done}/{total} targets ({done / (now - t0):,.0f} tok/s)", flush=True)
    model.train(was_training)
    logp = torch.cat(logps) if logps else torch.zeros(0, dtype=torch.float64)
    if gather and world > 1:
        logp = _gather_ordered(logp)
        first = 1
    positions = torch.arange(first, first + logp.numel())
    nbytes = lut.target_bytes(tokens[positions - 1], tokens[positions])
    return TokenScores(first, logp, nbytes)


def _gather_ordered(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's 1-D tensor in rank order (ranks own consecutive ranges)."""
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.numel()], dtype=torch.int64))
    n = int(max(s.item() for s in sizes))
    padded = torch.zeros(n, dtype=t.dtype)
    padded[: t.numel()] = t
    parts = [torch.zeros(n, dtype=t.dtype) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


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
