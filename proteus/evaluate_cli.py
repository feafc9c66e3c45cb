"""``proteus eval`` and ``proteus audit``: load a checkpoint or an int6 artifact and score it.

``eval`` prints the model's val bpb (plain, and sliding-window with ``--stride``) and, with
``--cache ngram``, the bpb with the honest n-gram cache, the difference, the cache's
throughput and the audit's verdict. ``audit`` runs only the audit. Both work under torchrun:
model scoring is split over ranks by windows, and the cache on each rank first counts every
token before its shard, so the result does not depend on the number of processes.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from proteus import data as D
from proteus.config import ConfigError, EvalConfig, RunConfig
from proteus.evaluate import TokenScores, evaluate_bpb, format_bpb, score_tokens
from proteus.model import GPT, build_model


def int6_model(cfg: RunConfig, qstate, kernels: str | None = None) -> GPT:
    """The model of ``cfg`` running on quantised weights (packed int6 linears, the rest
    dequantised), through the int6 kernel with ``--kernels triton``."""
    from proteus.quant import apply_int6

    kind = kernels or cfg.train.kernels
    return apply_int6(build_model(cfg, kind), qstate, use_kernel=(kind == "triton"))


def _is_artifact(path: str) -> bool:
    """A checkpoint is a zip (torch.save); anything else is handed to the artifact reader."""
    with open(path, "rb") as f:
        return f.read(4) != b"PK\x03\x04"


def load_model(path: str, kernels: str | None) -> tuple[GPT, RunConfig, dict]:
    """A model from ``model.ckpt`` or from an int6 artifact (through Int6Linear layers)."""
    from proteus.train import load_checkpoint

    if not os.path.exists(path):
        raise ConfigError(f"{path} not found; pass a run's model.ckpt or its artifact")
    if os.path.getsize(path) >= 8 and _is_artifact(path):
        from proteus.quant import read_artifact

        qstate, meta = read_artifact(path)
        cfg = RunConfig.from_dict(meta["run_config"])
        model = int6_model(cfg, qstate, kernels)
        return model, cfg, dict(source="artifact", float_bpb=meta.get("float_bpb"))
    cfg, state, extra = load_checkpoint(path)
    model = build_model(cfg, kernels)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"checkpoint {path} does not match its config: {e}") from None
    return model, cfg, dict(source="checkpoint", **extra)


def _eval_config(cfg: RunConfig, cli: dict) -> EvalConfig:
    over = {k.split(".", 1)[1]: v for k, v in cli.items()
            if k.startswith("eval.") and v is not None}
    import dataclasses

    ec = dataclasses.replace(cfg.eval, **over)
    ec.validate()
    return ec


def _setup_dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world


def model_logprobs_fn(model: GPT, seq_len: int, device="cpu"):
    """(tokens, positions) -> (n, V) log p_model(next token | tokens[:pos]) for the audit."""

    @torch.no_grad()
    def fn(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = []
        for pos in positions.tolist():
            ctx = tokens[max(0, pos - seq_len) : pos].to(device)
            z = model.logits(ctx[None])[0, -1].float()
            out.append(torch.log_softmax(z.double(), -1).cpu())
        return torch.stack(out)

    return fn


def cache_scores(scores: TokenScores, tokens: torch.Tensor, ec: EvalConfig, rank: int,
                 world: int) -> tuple[float, int, float]:
    """(sum of nll in nats, bytes, seconds) of the cache-blended scores over this rank's shard."""
    from proteus.ngram import NgramConfig, ngram_blend_logprobs

    n = scores.logp.numel()
    lo, hi = 1 + n * rank // world, 1 + n * (rank + 1) // world
    backend = ec.ngram_backend
    if backend == "auto":
        backend = "triton" if torch.cuda.is_available() else "numpy"
    t0 = time.perf_counter()
    lp = ngram_blend_logprobs(tokens, lo, hi, scores.logp[lo - 1 : hi - 1],
                              NgramConfig(order=ec.ngram_order, doc=ec.ngram_doc),
                              backend=backend)
    seconds = time.perf_counter() - t0
    nll = -lp.double().sum().item()
    nbytes = int(scores.nbytes[lo - 1 : hi - 1].sum())
    return nll, nbytes, seconds


def _reduce(*values: float) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def run_audit(model, cfg, ec, tokens, say, hashed: bool = False) -> bool:
    """Audit our cache (must pass) and, with ``hashed``, the original record's scheme (must be
    flagged). Returns True when the verdicts are as they must be."""
    from proteus.ngram import HashedTwoTableCache, NgramConfig, audit

    seq = ec.eval_seq_len or cfg.train.seq_len
    n = tokens.numel()
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(2, n - 1, (ec.audit_positions,), generator=g).sort().values
    fn = model_logprobs_fn(model, seq)
    rep = audit(tokens, positions, fn, NgramConfig(order=ec.ngram_order, doc=ec.ngram_doc))
    say(f"  audit: {rep}")
    ok = rep.passed
    if hashed:
        bad = audit(tokens, positions, fn, scheme=HashedTwoTableCache(order=ec.ngram_order))
        say(f"  audit of the negative example: {bad}")
        if bad.passed:
            say("  the audit did not flag the hashed two-table scheme: the audit is broken")
        ok = ok and not bad.passed
    return ok


def cache_report(model, cfg: RunConfig, ec: EvalConfig, tokens: torch.Tensor,
                 scores: TokenScores, say, rank: int = 0, world: int = 1) -> dict:
    """bpb with the n-gram cache next to the model's own, cache throughput, audit verdict."""
    nll, nbytes, secs = cache_scores(scores, tokens, ec, rank, world)
    nll, nbytes, secs = _reduce(nll, nbytes, secs)
    base = scores.bpb()
    with_cache = nll / math.log(2) / nbytes
    tps = (tokens.numel() - 1) / max(secs / world, 1e-9)
    say(f"  val bpb {format_bpb(with_cache)} with the n-gram cache (order {ec.ngram_order}); "
        f"without {format_bpb(base)}; difference {with_cache - base:+.4f}")
    say(f"  cache throughput {tps:,.0f} tokens/s ({ec.ngram_backend} backend)")
    out = dict(bpb_model=base, bpb_cache=with_cache, gain=base - with_cache, tokens_per_s=tps)
    if rank == 0:
        out["audit_passed"] = run_audit(model, cfg, ec, tokens, say)
    return out


def sliding_and_cache(model, cfg: RunConfig, ec: EvalConfig, tokens: torch.Tensor, lut,
                      seq: int, say, rank: int = 0, world: int = 1, device="cpu",
                      autocast: bool = False, progress: bool = False) -> dict:
    """One scoring pass for the sliding-window bpb (``ec.stride``) and the n-gram cache
    (``ec.cache == "ngram"``); returns ``val_sliding`` and ``cache`` for those that ran."""
    out: dict = {}
    if not (ec.stride or ec.cache == "ngram"):
        return out
    scores = score_tokens(model, tokens, lut, seq, ec.stride, ec.eval_batch_seqs, device,
                          autocast, progress=progress)
    if ec.stride:
        out["val_sliding"] = dict(bpb=scores.bpb(), stride=ec.stride, seq_len=seq)
        say(f"  val bpb {format_bpb(scores.bpb())} (sliding window {seq}, stride {ec.stride})")
    if ec.cache == "ngram":
        out["cache"] = cache_report(model, cfg, ec, tokens, scores, say, rank, world)
    return out


def main_eval(path: str, cli: dict) -> int:
    from proteus.train import close_process_group

    rank, world = _setup_dist()
    code = _eval(path, cli, rank, world)
    if world > 1:  # not after an error: a peer may still be inside a collective
        close_process_group()
    return code


def _eval(path: str, cli: dict, rank: int, world: int) -> int:
    say = print if rank == 0 else (lambda *a, **k: None)
    model, cfg, info = load_model(path, cli.get("train.kernels"))
    ec = _eval_config(cfg, cli)
    val_files = cli.get("train.val_files") or cfg.train.val_files or D.bundled_val_glob()
    sp = D.load_tokenizer(cfg.train.tokenizer)
    lut = D.build_byte_lut(sp, cfg.model.vocab_size)
    tokens = D.load_tokens(val_files, "val", limit=ec.val_tokens + 1 if ec.val_tokens else 0)
    seq = ec.eval_seq_len or cfg.train.seq_len
    say(f"proteus eval: {path} ({info['source']}), kernels={model.ops.name}, "
        f"{tokens.numel() - 1:,} targets, window {seq}, {world} process(es)")
    if info.get("float_bpb") is not None:
        say(f"  bpb before quantisation (recorded at training): {format_bpb(info['float_bpb'])}")
    r = evaluate_bpb(model, tokens, lut, seq, 0, ec.eval_batch_seqs)
    say(f"  val bpb {format_bpb(r['bpb'])} (plain, loss {r['loss']:.4f})")
    rep = sliding_and_cache(model, cfg, ec, tokens, lut, seq, say, rank, world)
    if rank == 0 and "cache" in rep and not rep["cache"]["audit_passed"]:
        return 1
    return 0


def main_audit(path: str, cli: dict) -> int:
    model, cfg, _ = load_model(path, None)
    ec = _eval_config(cfg, cli)
    tokens = D.load_tokens(cfg.train.val_files or D.bundled_val_glob(), "val",
                           limit=ec.val_tokens + 1 if ec.val_tokens else 0)
    print(f"proteus audit: {path}, {ec.audit_positions} positions of {tokens.numel():,} tokens")
    return 0 if run_audit(model, cfg, ec, tokens, print, hashed=True) else 1
