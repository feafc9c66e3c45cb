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

It returns what it trained (the model holding its final weights, and the run's statistics);
evaluation, the checkpoint and the artifact are the run's business (``proteus.run``).

Data parallelism: every rank reads its own slice of each global batch, gradients are summed
with one all-reduce and divided by the world size, and every rank applies the identical
update, so ranks hold bit-identical weights without broadcasting them.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from proteus import data as D
from proteus.checkpoint import JsonLog
from proteus.config import ConfigError, RunConfig
from proteus.device import pick_device, use_autocast
from proteus.dist import Dist
from proteus.evaluate import evaluate_bpb, format_bpb
from proteus.model import GPT, build_model
from proteus.optim import build_optimizers

log = logging.getLogger(__name__)


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
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


@dataclass
class Trained:
    """What :func:`train` returns: the model holding its final weights, where it ran, and the
    run's statistics (steps, tokens, losses, weight digest, ...)."""

    model: GPT
    device: torch.device
    autocast: bool
    stats: dict = field(default_factory=dict)


def train(cfg: RunConfig, *, dd: Dist | None = None, device: torch.device | None = None,
          val: torch.Tensor | None = None, lut: D.ByteLUT | None = None,
          jlog: JsonLog | None = None) -> Trained:
    """Train ``cfg`` and return the model with its final weights (SWA, EMA or raw).

    ``dd``/``device``: the process group and device of the caller (created here when not
    given; a group created here is closed here). ``val``/``lut`` are needed only for periodic
    validation (``val_every``); ``jlog`` receives the config and step records."""
    device = device or pick_device(cfg.train)
    own_dd = dd is None
    dd = dd or Dist(device.type)
    try:
        return _train(cfg, dd, device, val, lut, jlog or JsonLog(None))
    finally:
        if own_dd:
            dd.close()


def _train(cfg: RunConfig, dd: Dist, device: torch.device, val, lut, jlog: JsonLog) -> Trained:
    tc, ec = cfg.train, cfg.eval
    torch.manual_seed(tc.seed)
    autocast = use_autocast(tc, device)

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
    if tc.val_every and (val is None or lut is None):
        raise ValueError("train: val_every needs the validation tokens and byte table (val, lut)")

    model = build_model(cfg).to(device)
    run_model = torch.compile(model, dynamic=False) if tc.compile else model
    optimizers = build_optimizers(model, tc)
    params = [p for p in model.parameters()]

    log.info(f"proteus train: preset {tc.preset}, {model.num_params():,} parameters, "
             f"{dd.world} process(es) on {device.type}, kernels={tc.kernels}, "
             f"bf16 autocast={'on' if autocast else 'off'}")
    log.info(f"  batch {tc.batch_tokens:,} tokens = {dd.world} x {seqs_per_rank} x "
             f"{tc.seq_len} (micro-batch {micro}); cap {tc.max_wallclock_s:.0f}s / "
             f"{tc.iterations} steps")
    jlog.write(event="config", config=cfg.to_dict(), world=dd.world, params=model.num_params())

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
        total = dd.mean(total)  # the global-batch loss, as one process would see it
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
        stream_state = stream.state()
        t0 = time.perf_counter()
        for i in range(tc.warmup_steps):
            train_step(i, 1.0)
        model.load_state_dict(init_model)
        for o, s in zip(optimizers, init_opt, strict=True):
            o.load_state_dict(s)
        stream.restore(stream_state)
        log.info(f"  warm-up: {tc.warmup_steps} steps in {time.perf_counter() - t0:.1f}s "
                 "(discarded)")

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
            log.info(f"step {step:6d}  loss {last_loss:.4f}  lr x{scale:.3f}  "
                     f"{tok_s:,.0f} tok/s  {step_ms:.0f} ms/step  elapsed {_fmt_time(train_s)}  "
                     f"eta {_fmt_time(eta)}")
            jlog.write(event="step", step=step, loss=last_loss, lr_scale=scale, tok_s=tok_s,
                       step_ms=step_ms, train_s=train_s)
        if tc.val_every and step % tc.val_every == 0:
            r = evaluate_bpb(model, val, lut, tc.seq_len, 0, ec.eval_batch_seqs, device, autocast)
            log.info(f"  val @ step {step}: bpb {format_bpb(r['bpb'])} loss {r['loss']:.4f}")
            jlog.write(event="val", step=step, train_s=train_s, **r)
        if tc.max_wallclock_s > 0 and train_s >= tc.max_wallclock_s:
            stop_reason = "wallclock"
            break

    final_state, which = averages.final_state(model)
    model.load_state_dict(final_state)
    tokens_seen = step * tc.batch_tokens
    log.info(f"training done: {step} steps, {tokens_seen:,} tokens in {_fmt_time(train_s)} "
             f"({tokens_seen / max(train_s, 1e-9):,.0f} tok/s), stopped by {stop_reason}; "
             f"final weights: {which}")
    stats = dict(steps=step, train_seconds=train_s, tokens=tokens_seen,
                 tokens_per_s=tokens_seen / max(train_s, 1e-9), final_loss=last_loss,
                 final_weights=which, stop_reason=stop_reason, world=dd.world,
                 losses=losses, param_digest=param_digest(model))
    return Trained(model, device, autocast, stats)
