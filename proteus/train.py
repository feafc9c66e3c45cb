"""The training loop, top to bottom.

    set up (ranks, device, data, model, optimisers)
    warm-up: a few full steps, then restore the initial model and optimiser state
    loop until the step budget or the wall-clock cap:
        lr scale  = linear ramp-up, then linear warm-down over the last `warmdown_steps`,
                    where "steps left" is estimated from the measured step time and the
                    time left (wall-clock aware), so the LR reaches zero at the cap
        forward/backward (micro-batches), average gradients over ranks, clip, step
        EMA of weights; SWA snapshot every `swa_every` steps once lr scale < `swa_lr_below`
        progress line, JSON log record, periodic validation
    final weights = SWA mean if any snapshot, else EMA if on, else the raw weights
    evaluate (plain and sliding window), save checkpoint, quantise to the int6 artifact

Data parallelism: every rank reads its own slice of each global batch, gradients are summed
with one all-reduce and divided by the world size, and every rank applies the identical
update, so ranks hold bit-identical weights without broadcasting them.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from proteus import data as D
from proteus.config import ConfigError, RunConfig
from proteus.evaluate import evaluate_bpb, format_bpb
from proteus.model import GPT, build_model
from proteus.optim import build_optimizers

ARTIFACT_LIMIT = 16_000_000


# ---------------------------------------------------------------------------------------------
# Process set-up


class Dist:
    """Rank/world from torchrun's environment; gloo on CPU, nccl on CUDA."""

    def __init__(self, device_kind: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = self.enabled and not dist.is_initialized()
        if self.owns_group:  # a group the caller created is the caller's to destroy
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def close(self) -> None:
        if self.owns_group:
            close_process_group()


def close_process_group() -> None:
    """Tear down the default process group (if any) once every rank is done with it, then
    collect garbage while the interpreter is still whole: left to interpreter shutdown, the
    cyclic garbage of a gloo run aborted 5 of ~31 two-process runs on exit here ("terminate
    called without an active exception", after all output was written); with the collection,
    0 of 56."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while a peer still uses it
        dist.destroy_process_group()
    gc.collect()


def pick_device(tc) -> torch.device:
    if tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def use_autocast(tc, device: torch.device) -> bool:
    if tc.autocast_bf16 == "on":
        return True
    if tc.autocast_bf16 == "off":
        return False
    return device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# Files


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_checkpoint(path: Path, model: GPT, cfg: RunConfig, extra: dict | None = None) -> None:
    """Tensors and plain data only, so it loads with ``torch.load(weights_only=True)``."""
    import io

    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": "proteus-checkpoint-1", "config": cfg.to_dict(), "model": state,
                "extra": extra or {}}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str) -> tuple[RunConfig, dict[str, torch.Tensor], dict]:
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint {path} not found; pass the model.ckpt of a run directory")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); pass a model.ckpt written "
            "by `proteus train`"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != "proteus-checkpoint-1":
        raise ConfigError(f"checkpoint {path} is not a proteus checkpoint (format tag missing)")
    return RunConfig.from_dict(blob["config"]), blob["model"], blob.get("extra", {})


class JsonLog:
    def __init__(self, path: Path | None):
        self.f = open(path, "a", buffering=1) if path else None

    def write(self, **record) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.f:
            self.f.close()


# ---------------------------------------------------------------------------------------------
# Schedules and weight averaging


def lr_scale(step: int, tc, step_ms: float, elapsed_ms: float) -> float:
    """LR multiplier: linear ramp-up, then linear warm-down to 0 at the step or time budget."""
    ramp = min(1.0, (step + 1) / tc.lr_warmup_steps) if tc.lr_warmup_steps else 1.0
    if tc.warmdown_steps <= 0:
        return ramp
    steps_left = tc.iterations - step
    if tc.max_wallclock_s > 0 and step_ms > 0:
        time_left_ms = max(0.0, tc.max_wallclock_s * 1000.0 - elapsed_ms)
        steps_left = min(steps_left, time_left_ms / step_ms)
    return ramp * max(0.0, min(1.0, steps_left / tc.warmdown_steps))


def muon_momentum(step: int, tc) -> float:
    if tc.muon_momentum_warmup <= 0:
        return tc.muon_momentum
    frac = min(1.0, step / tc.muon_momentum_warmup)
    return (1 - frac) * tc.muon_momentum_start + frac * tc.muon_momentum


class WeightAverages:
    """EMA of the weights, and an SWA mean of snapshots (of the EMA when it is on)."""

    def __init__(self, model: GPT, tc):
        self.ema_decay = tc.ema_decay
        self.ema = (
            {k: v.detach().clone().float() for k, v in model.state_dict().items()}
            if tc.ema_decay > 0 else None
        )
        self.swa: dict[str, torch.Tensor] | None = None
        self.swa_count = 0

    @torch.no_grad()
    def update_ema(self, model: GPT) -> None:
        if self.ema is None:
            return
        d = self.ema_decay
        for k, v in model.state_dict().items():
            self.ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def snapshot(self, model: GPT) -> None:
        src = self.ema if self.ema is not None else {
            k: v.detach().float() for k, v in model.state_dict().items()
        }
        if self.swa is None:
            self.swa = {k: v.clone() for k, v in src.items()}
        else:
            for k, v in src.items():
                self.swa[k].add_(v)
        self.swa_count += 1

    def final_state(self, model: GPT) -> tuple[dict[str, torch.Tensor], str]:
        ref = model.state_dict()
        if self.swa is not None:
            return {k: (v / self.swa_count).to(ref[k].dtype) for k, v in self.swa.items()}, (
                f"swa({self.swa_count})"
            )
        if self.ema is not None:
            return {k: v.to(ref[k].dtype) for k, v in self.ema.items()}, "ema"
        return ref, "raw"


# ---------------------------------------------------------------------------------------------
# The run


def param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes: equal digests = bit-identical weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def train(cfg: RunConfig, run_dir: Path | None = None, quiet: bool = False) -> dict:
    tc, mc, ec = cfg.train, cfg.model, cfg.eval
    device = pick_device(tc)
    dd = Dist(device.type)
    say = (lambda *a: None) if (quiet or not dd.main) else (lambda *a: print(*a, flush=True))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(tc.seed)
    autocast = use_autocast(tc, device)

    # Data and tokenizer first: bad paths fail before any work.
    sp = D.load_tokenizer(tc.tokenizer)
    lut = D.build_byte_lut(sp, mc.vocab_size)
    stream = D.TokenStream(tc.train_files or D.bundled_train_glob(), dd.rank, dd.world)
    per_rank = tc.batch_tokens // dd.world
    if tc.batch_tokens % (dd.world * tc.seq_len):
        raise ConfigError(
            f"batch_tokens {tc.batch_tokens} must split into {dd.world} ranks x whole sequences "
            f"of seq_len {tc.seq_len}"
        )
    seqs_per_rank = per_rank // tc.seq_len
    micro = tc.micro_batch_seqs or seqs_per_rank
    if seqs_per_rank % micro:
        raise ConfigError(
            f"micro_batch_seqs {micro} does not divide the {seqs_per_rank} sequences per rank"
        )
    val = D.load_tokens(tc.val_files or D.bundled_val_glob(), "val",
                        limit=ec.val_tokens + 1 if ec.val_tokens else 0)

    model = build_model(cfg).to(device)
    run_model = torch.compile(model, dynamic=False) if tc.compile else model
    optimizers = build_optimizers(model, tc)
    params = [p for p in model.parameters()]

    log = JsonLog(run_dir / "log.jsonl" if (run_dir and dd.main) else None)
    say(f"proteus train: preset {tc.preset}, {model.num_params():,} parameters, "
        f"{dd.world} process(es) on {device.type}, kernels={tc.kernels}, "
        f"bf16 autocast={'on' if autocast else 'off'}")
    say(f"  batch {tc.batch_tokens:,} tokens = {dd.world} x {seqs_per_rank} x {tc.seq_len} "
        f"(micro-batch {micro}); cap {tc.max_wallclock_s:.0f}s / {tc.iterations} steps")
    if run_dir and dd.main:
        log.write(event="config", config=cfg.to_dict(), world=dd.world, params=model.num_params())

    def train_step(step: int, scale: float) -> float:
        mom = muon_momentum(step, tc)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
                if "momentum" in g:
                    g["momentum"] = mom
        x, y = stream.next_batch(tc.batch_tokens, tc.seq_len)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        total = 0.0
        n_micro = seqs_per_rank // micro
        for i in range(n_micro):
            xs, ys = x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = run_model(xs, ys)
            (loss / n_micro).backward()
            total += loss.detach().float().item() / n_micro
        dd.all_reduce_grads(params)
        if dd.enabled:  # report the global-batch loss, as one process would see it
            t = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(t)
            total = t.item() / dd.world
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return total

    # Warm-up (compile/allocator warm-up): run real steps, then throw their effects away.
    if tc.warmup_steps > 0:
        init_model = copy.deepcopy(model.state_dict())
        init_opt = [copy.deepcopy(o.state_dict()) for o in optimizers]
        stream_state = (stream._file_idx, stream._pos, stream._tokens)
        t0 = time.perf_counter()
        for i in range(tc.warmup_steps):
            train_step(i, 1.0)
        model.load_state_dict(init_model)
        for o, s in zip(optimizers, init_opt, strict=True):
            o.load_state_dict(s)
        stream._file_idx, stream._pos, stream._tokens = stream_state
        say(f"  warm-up: {tc.warmup_steps} steps in {time.perf_counter() - t0:.1f}s (discarded)")

    averages = WeightAverages(model, tc)
    step, train_s, step_ms, last_loss = 0, 0.0, 0.0, float("nan")
    stop_reason = "iterations"
    losses: list[float] = []
    while step < tc.iterations:
        scale = lr_scale(step, tc, step_ms, train_s * 1000.0)
        t0 = time.perf_counter()
        last_loss = train_step(step, scale)
        losses.append(last_loss)
        averages.update_ema(model)
        if tc.swa_every and scale < tc.swa_lr_below and (step + 1) % tc.swa_every == 0:
            averages.snapshot(model)
        dt = time.perf_counter() - t0
        train_s += dt
        step += 1
        # Smooth the step time used by the wall-clock-aware warm-down.
        step_ms = dt * 1000.0 if step_ms == 0 else 0.9 * step_ms + 0.1 * dt * 1000.0
        if not math.isfinite(last_loss):
            raise RuntimeError(f"training diverged: loss {last_loss} at step {step}")
        if step % tc.log_every == 0 or step == 1:
            tok_s = tc.batch_tokens / (step_ms / 1000.0)
            if tc.max_wallclock_s > 0:
                eta = max(0.0, tc.max_wallclock_s - train_s)
            else:
                eta = (tc.iterations - step) * step_ms / 1000
            say(f"step {step:6d}  loss {last_loss:.4f}  lr x{scale:.3f}  "
                f"{tok_s:,.0f} tok/s  {step_ms:.0f} ms/step  elapsed {_fmt_time(train_s)}  "
                f"eta {_fmt_time(eta)}")
            log.write(event="step", step=step, loss=last_loss, lr_scale=scale, tok_s=tok_s,
                      step_ms=step_ms, train_s=train_s)
        if tc.val_every and step % tc.val_every == 0:
            r = evaluate_bpb(model, val, lut, tc.seq_len, 0, ec.eval_batch_seqs, device, autocast)
            say(f"  val @ step {step}: bpb {format_bpb(r['bpb'])} loss {r['loss']:.4f}")
            log.write(event="val", step=step, **r)
        if tc.max_wallclock_s > 0 and train_s >= tc.max_wallclock_s:
            stop_reason = "wallclock"
            break

    final_state, which = averages.final_state(model)
    model.load_state_dict(final_state)
    tokens_seen = step * tc.batch_tokens
    say(f"training done: {step} steps, {tokens_seen:,} tokens in {_fmt_time(train_s)} "
        f"({tokens_seen / max(train_s, 1e-9):,.0f} tok/s), stopped by {stop_reason}; "
        f"final weights: {which}")

    seq = ec.eval_seq_len or tc.seq_len
    results = dict(steps=step, train_seconds=train_s, tokens=tokens_seen,
                   tokens_per_s=tokens_seen / max(train_s, 1e-9), final_loss=last_loss,
                   final_weights=which, stop_reason=stop_reason, world=dd.world,
                   losses=losses, param_digest=param_digest(model))
    if dd.main:
        train_tokens = D.load_tokens(tc.train_files or D.bundled_train_glob(), "train")
        results["unigram_bpb"] = D.unigram_bpb(train_tokens, val, lut)
    say(f"evaluating on {val.numel() - 1:,} validation tokens ...")
    r = evaluate_bpb(model, val, lut, seq, 0, ec.eval_batch_seqs, device, autocast, progress=True)
    results["val"] = r
    say(f"  val bpb {format_bpb(r['bpb'])} (loss {r['loss']:.4f}, window {seq}, plain)"
        + (f"; unigram baseline {format_bpb(results['unigram_bpb'])}" if dd.main else ""))
    from proteus.evaluate_cli import sliding_and_cache

    results.update(sliding_and_cache(model, cfg, ec, val, lut, seq, say, dd.rank, dd.world,
                                     device, autocast, progress=True))
    log.write(event="final", **{k: v for k, v in results.items()})

    if run_dir:
        if dd.main:
            save_checkpoint(run_dir / "model.ckpt", model, cfg, dict(results=results))
            results["checkpoint"] = str(run_dir / "model.ckpt")
        from proteus.artifact import write_run_artifact

        # every rank takes part: the quantised model's evaluation is shared across ranks
        results["artifact"] = write_run_artifact(model, cfg, run_dir, say, val, lut,
                                                 results["val"]["bpb"], rank=dd.rank)
        if dd.main:
            atomic_write_json(run_dir / "summary.json", results)
    log.close()
    dd.close()
    return results


def make_run_dir(cfg: RunConfig) -> Path:
    tc = cfg.train
    name = tc.run_name or f"{tc.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(tc.out_dir) / name
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create run directory {path}: {e.strerror}") from None
        atomic_write_json(path / "config.json", cfg.to_dict())
    return path


def main_train(cfg: RunConfig) -> int:
    run_dir = make_run_dir(cfg)
    results = train(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {run_dir}")
        art = results.get("artifact")
        if art and not art.get("within_limit", True):
            print(f"BUDGET CHECK FAILED: {art['total_bytes']:,} bytes > {ARTIFACT_LIMIT:,}",
                  file=sys.stderr)
            return 1
    return 0
