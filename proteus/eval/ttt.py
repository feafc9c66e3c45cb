"""Legal score-first test-time training (TTT), and its audit.

The validation stream's targets are split into chunks of ``ttt_chunk``; chunk k holds targets
``kC+1 .. (k+1)C``. One pass, left to right::

    for each chunk k:
        score every target of chunk k with the current weights        (the scores are final)
        if a chunk follows: take ``ttt_steps`` optimiser steps on chunk k's tokens

so a target's score depends on the artifact and on tokens before it only (the weights that
score chunk k were trained on chunks < k), each target is scored exactly once, and nothing is
rescored after an update: the rules for eval-time adaptation (causal, a full normalised
distribution from the model's softmax, score before update, a single pass). The scoring windows
are the evaluation's own (sliding with ``stride``, or plain), a window whose scored targets
cross a chunk boundary cut in two. Training rows are chunk k's targets as whole sequences of
the window length (so ``ttt_chunk`` is a multiple of it); the last chunk is never trained on
(no score would use it).

What trains (``ttt_params``): ``lora`` puts a rank-``ttt_rank`` adapter ``W + B A`` (B starts
at zero, so the first chunk is scored by the artifact's own weights, bit for bit) on every
block's attention (q, k, v, output) and MLP (up, down) projections; otherwise comma-separated
``fnmatch`` patterns name the parameters to train (e.g. ``blocks.*.mlp_scale,skip_weights``),
everything else frozen. The optimiser is Adam, one for the whole pass. On an int6 artifact the
LoRA adapters sit beside the packed int6 layers (``LoRAInt6``: the int6 path runs forward and,
through its backward with respect to x, backward), so the first chunk is scored exactly as the
artifact scores it; named parameters train over the dequantised weights (the exact int6
values as fp32 matrices, ``Linear(Q·s)``), which makes the block matrices nameable.

Under torchrun each chunk's windows are split over the ranks and the scores gathered; a
chunk's training rows fall into at most 8 fixed groups, the ranks share the groups, every rank
receives every group's gradient and adds them in group order (``_train_chunk``), so every rank
takes the identical step, and 1, 2, 3 or 8 processes take the same step to the last bit. After
every chunk the ranks compare a sha256 digest of the trained parameters and stop with an error
if any differs.

The audit (``proteus/eval/ttt_audit.py``, ``proteus audit CKPT --ttt``): rerun the whole pass
with every token from an edit point on replaced (the first target of chunk i+1 for each i, and
points inside a chunk) and require every score before the edit point to stay bit-identical, the
n-gram cache's blended scores too when the cache is on; at chunk edges, BOS targets and random
positions the scorer's full distribution over the vocabulary (captured from the very forward
that scored the target) must sum to 1 and hold the scored value, and with the cache the blended
distribution must sum to 1 and hold the blended score.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from proteus.config import EvalConfig
from proteus.data import ByteLUT
from proteus.device import map_one_thread, one_thread
from proteus.dist import gather_ordered, rank_world
from proteus.errors import ConfigError
from proteus.eval.scoring import (
    TokenScores,
    format_bpb,
    score_windows,
    token_scores,
    windows,
)
from proteus.kernels import dequantize_int6
from proteus.model import GPT, Linear, runs_interpreted_kernels
from proteus.quant import Int6Linear

log = logging.getLogger(__name__)

LORA_TARGETS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")


class LoRA(nn.Module):
    """``W -> W + B A`` as a parametrisation of a weight (out, in): A (rank, in) starts small
    and random (seeded, so every rank starts from the same adapter), B (out, rank) at zero."""

    def __init__(self, out_features: int, in_features: int, rank: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(rank, in_features, generator=g) / math.sqrt(in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.b @ self.a).to(w.dtype)


class LoRAInt6(nn.Module):
    """An int6 layer of an artifact with an adapter beside it: ``int6(x) + (x Aᵀ) Bᵀ``. The
    packed weights stay as they are (the int6 path, with its backward with respect to x, runs
    forward and backward); with B = 0 the output is the int6 layer's, bit for bit."""

    quantized = True  # the model routes a quantised layer by its output, not its weight

    def __init__(self, base: Int6Linear, rank: int, seed: int):
        super().__init__()
        self.base = base
        self.lora = LoRA(base.out_features, base.in_features, rank, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo = self.lora
        return self.base(x) + (x @ lo.a.t().to(x.dtype)) @ lo.b.t().to(x.dtype)


def dequantize_linears(model: nn.Module) -> int:
    """Replace every ``Int6Linear`` of ``model`` by a frozen linear layer holding its exact
    dequantised weight (so named parameter patterns can train the block matrices of an
    artifact); returns how many."""
    swaps = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Int6Linear)]
    modules = dict(model.named_modules())
    for name, mod in swaps:
        parent_name, _, child = name.rpartition(".")
        bias = mod.bias is not None
        lin = (nn.Linear(mod.in_features, mod.out_features) if bias
               else Linear(mod.in_features, mod.out_features))
        with torch.no_grad():
            lin.weight.copy_(dequantize_int6(mod.packed, mod.scale))
            if bias:
                lin.bias.copy_(mod.bias)
        lin.to(mod.packed.device)
        setattr(modules[parent_name] if parent_name else model, child, lin)
    return len(swaps)


def ttt_parameters(model: GPT, ec: EvalConfig) -> list[nn.Parameter]:
    """Make ``model`` ready for test-time training as ``ec`` asks and return what trains:
    LoRA adapters (``lora``; beside an artifact's int6 layers, which stay packed) or the
    parameters matching ``ec.ttt_params`` (an artifact's int6 layers dequantised first, so its
    block matrices can be named); everything else is frozen. Raises ``ConfigError`` when the
    model lacks what was asked for."""
    spec = ec.ttt_params.strip()
    if spec != "lora":
        dequantize_linears(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if spec == "lora":
        out = []
        for i, block in enumerate(getattr(model, "blocks", [])):
            for j, target in enumerate(LORA_TARGETS):
                parent_name, _, child = target.rpartition(".")
                parent = block.get_submodule(parent_name)
                mod = getattr(parent, child)
                seed = 1000 * i + j
                if isinstance(mod, Int6Linear):
                    wrapped = LoRAInt6(mod, ec.ttt_rank, seed).to(mod.packed.device)
                    setattr(parent, child, wrapped)
                    lora = wrapped.lora
                elif isinstance(getattr(mod, "weight", None), torch.Tensor):
                    lora = LoRA(*mod.weight.shape, ec.ttt_rank, seed).to(mod.weight.device)
                    parametrize.register_parametrization(mod, "weight", lora)
                else:
                    raise ConfigError(f"ttt_params lora: block {i}'s {target} has no weight to "
                                      "adapt; name parameters to train with --ttt-params")
                out += [lora.a, lora.b]
        if not out:
            raise ConfigError("ttt_params lora: the model has no blocks to adapt")
        return out
    patterns = [s.strip() for s in spec.split(",") if s.strip()]
    named = dict(model.named_parameters())
    out = [p for name, p in named.items() if any(fnmatch.fnmatch(name, pat) for pat in patterns)]
    if not out:
        raise ConfigError(f"ttt_params {spec!r} match no parameter of this model (names look "
                          f"like {', '.join(list(named)[:4])}, ...); use 'lora' or a pattern "
                          "that matches")
    for p in out:
        p.requires_grad_(True)
    return out


def chunk_windows(n_targets: int, seq_len: int, stride: int, chunk: int
                  ) -> list[list[tuple[int, int, int]]]:
    """The evaluation's windows (see ``scoring.windows``) grouped by the chunk of their scored
    targets; a window whose targets cross a chunk boundary is cut in two at the boundary (both
    pieces start where the window starts, so every target keeps the context it has without
    test-time training)."""
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(-(-n_targets // chunk))]
    for s, e, f in windows(n_targets, seq_len, stride):
        while f <= e:
            k = (f - 1) // chunk
            last = min(e, (k + 1) * chunk)
            out[k].append((s, last, f))
            f = last + 1
    return out


def check_ttt_fits(ec: EvalConfig, n_targets: int, seq_len: int, model: GPT | None = None
                   ) -> None:
    """A chunk size that does not fit the evaluation, or (given the ``model``) parameters to
    train that it lacks, is a ``ConfigError`` (one line, exit 2), before any work is done."""
    if model is not None:
        ttt_parameters(copy.deepcopy(model), ec)
    c = ec.ttt_chunk
    if c % seq_len:
        raise ConfigError(f"ttt_chunk {c} is not a multiple of the sequence length {seq_len}: "
                          "each chunk trains on whole sequences; pick a multiple")
    if c >= n_targets:
        raise ConfigError(f"ttt_chunk {c} leaves the {n_targets:,} targets in a single chunk, so "
                          "no step would ever change a score; pick a smaller chunk")


def _digest(params: list[torch.Tensor]) -> int:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def _check_ranks_agree(params: list[torch.Tensor], chunk: int, world: int) -> None:
    if world == 1:
        return
    digests = gather_ordered(torch.tensor([_digest(params)], dtype=torch.int64))
    if not bool((digests == digests[0]).all()):
        raise RuntimeError(f"test-time training: the ranks hold different weights after chunk "
                           f"{chunk} (digests {digests.tolist()})")


TTT_GROUPS = 8  # a chunk's rows are split into at most this many groups, for any world size


def row_groups(rows: int) -> list[tuple[int, int]]:
    """The fixed groups [lo, hi) of a chunk's ``rows``: at most ``TTT_GROUPS``, as equal as can
    be. They depend on ``rows`` only, never on the number of processes."""
    g = min(rows, TTT_GROUPS)
    return [(rows * i // g, rows * (i + 1) // g) for i in range(g)]


def _group_grad(model: GPT, params: list[nn.Parameter], tokens: torch.Tensor, lo: int, hi: int,
                rows: int, seq: int, device, autocast: bool) -> torch.Tensor:
    """The gradient of rows [lo, hi)'s mean loss, weighted by their share of the ``rows``
    (``tokens`` starts at the chunk's first row), flattened, float32 on the CPU."""
    span = tokens[lo * seq : hi * seq + 1].to(device)
    x, y = span[:-1].view(hi - lo, seq), span[1:].view(hi - lo, seq)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                        enabled=autocast):
        loss = model(x, y)
    grads = torch.autograd.grad(loss * ((hi - lo) / rows), params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                      for g, p in zip(grads, params, strict=True)])


def _train_chunk(model: GPT, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                 tokens: torch.Tensor, k: int, ec: EvalConfig, seq: int, device, autocast: bool,
                 rank: int, world: int) -> None:
    """``ec.ttt_steps`` steps on chunk k's targets (rows of ``seq``). The rows fall into fixed
    groups (``row_groups``); the ranks share the groups, each group's gradient (of its rows'
    mean loss, weighted by its share of the rows) is computed alone, every rank receives every
    group's gradient, and they are added in group order. So the step, to the last bit, is the
    same for 1, 2, 3 or 8 processes: what changes with the world size is only who computes
    which group. On the CPU each group's gradient is computed on one thread (the groups run
    side by side, ``map_one_thread``) and the sum and the optimiser step run on one thread, so
    the step is also the same for any number of threads per process."""
    c = ec.ttt_chunk
    rows = c // seq
    chunk = tokens[k * c : (k + 1) * c + 1]
    groups = row_groups(rows)
    mine = groups[len(groups) * rank // world : len(groups) * (rank + 1) // world]
    was_training = model.training
    model.train()
    for _ in range(ec.ttt_steps):
        grads = map_one_thread(
            lambda g: _group_grad(model, params, chunk, *g, rows, seq, device, autocast),
            mine, device, side_by_side=not runs_interpreted_kernels(model))
        with one_thread():
            flat = torch.cat(grads) if grads else torch.zeros(0)
            if world > 1:
                flat = gather_ordered(flat)
            per_group = flat.view(len(groups), -1)
            total = per_group[0].clone()
            for g in per_group[1:]:  # group order: the same additions on every rank, any world
                total += g
            offset = 0
            for p in params:
                p.grad = total[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype)
                offset += p.numel()
            opt.step()
    model.train(was_training)


@dataclass
class TTTResult:
    scores: TokenScores  # every target, on every rank
    chunks: int
    score_seconds: float
    train_seconds: float
    trained_params: int  # number of values the steps update
    digest: int  # of the trained parameters after the last step (the same on every rank)


def ttt_score(model: GPT, tokens: torch.Tensor, lut: ByteLUT, seq: int, ec: EvalConfig,
              device="cpu", autocast: bool = False,
              capture: dict[int, torch.Tensor | None] | None = None,
              progress: bool = False) -> TTTResult:
    """Score every target of ``tokens`` with score-first test-time training (module docstring).
    ``model`` itself is not changed (the pass trains a copy). ``capture`` (target -> None)
    receives the full log-probability row of each of its targets, from the forward that scored
    it (on the rank that scored it)."""
    n_targets = tokens.numel() - 1
    check_ttt_fits(ec, n_targets, seq)
    model = copy.deepcopy(model)
    params = ttt_parameters(model, ec)
    opt = torch.optim.Adam(params, lr=ec.ttt_lr)
    rank, world = rank_world()
    chunks = chunk_windows(n_targets, seq, ec.stride, ec.ttt_chunk)
    logps, score_s, train_s = [], 0.0, 0.0
    last = time.perf_counter()
    for k, wins in enumerate(chunks):
        t0 = time.perf_counter()
        mine = wins[len(wins) * rank // world : len(wins) * (rank + 1) // world]
        lp = score_windows(model, tokens, mine, ec.eval_batch_seqs, device, autocast, capture)
        logps.append(gather_ordered(lp) if world > 1 else lp)
        t1 = time.perf_counter()
        score_s += t1 - t0
        if k + 1 < len(chunks):  # the last chunk's tokens would train nothing that is scored
            _train_chunk(model, params, opt, tokens, k, ec, seq, device, autocast, rank, world)
            _check_ranks_agree(params, k, world)
            train_s += time.perf_counter() - t1
        if progress and rank == 0 and (time.perf_counter() - last > 10.0 or k + 1 == len(chunks)):
            last = time.perf_counter()
            done = sum(x.numel() for x in logps)
            log.info(f"  ttt chunk {k + 1}/{len(chunks)}: {done:,} targets scored, bpb so far "
                     f"{format_bpb(token_scores(1, torch.cat(logps), tokens, lut).bpb())}")
    scores = token_scores(1, torch.cat(logps), tokens, lut)
    return TTTResult(scores, len(chunks), score_s, train_s, sum(p.numel() for p in params),
                     _digest(params))


def ttt_report(model: GPT, ec: EvalConfig, tokens: torch.Tensor, lut: ByteLUT, seq: int,
               device="cpu", autocast: bool = False, progress: bool = False,
               quiet: bool = False) -> tuple[dict, TokenScores]:
    """bpb with score-first test-time training, the seconds it takes, and its per-token scores
    (the n-gram cache blends over them when it is on)."""
    r = ttt_score(model, tokens, lut, seq, ec, device, autocast, progress=progress)
    out = dict(bpb=r.scores.bpb(), chunks=r.chunks, chunk=ec.ttt_chunk, steps=ec.ttt_steps,
               lr=ec.ttt_lr, params=ec.ttt_params, trained_params=r.trained_params,
               score_seconds=r.score_seconds, train_seconds=r.train_seconds)
    if not quiet:
        log.info(f"  val bpb {format_bpb(out['bpb'])} with score-first TTT ({ec.ttt_params}, "
                 f"{r.chunks} chunks of {ec.ttt_chunk}, {ec.ttt_steps} step(s) each, lr "
                 f"{ec.ttt_lr}; scoring {r.score_seconds:.1f} s, training "
                 f"{r.train_seconds:.1f} s)")
    return out, r.scores
