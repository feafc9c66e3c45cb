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

Runs that survive (what a trainer left running overnight must do):

* Resumable checkpoints: every ``checkpoint_every`` steps and/or ``checkpoint_every_s``
  seconds, and when SIGTERM or SIGINT arrives (:class:`StopSignal`: the loop finishes its step,
  saves, and raises :class:`~proteus.config.RunInterrupted`), rank 0 writes a sealed training
  state to ``run_dir/checkpoints/``: weights, both optimisers' state (Muon momentum buffers,
  AdamW moments and step counts), EMA/SWA, the step, the elapsed budget, the smoothed step
  time the LR schedule reads, the losses, the data stream's position (and the shards it is
  a position in) and the RNG states. ``resume`` continues from one: the warm-up runs and is
  discarded as always (it compiles), then everything above is restored, so the resumed run
  takes the same steps on the same batches and ends bit-identical to one that never stopped
  (eager; compiled with ``deterministic``, since inductor's CPU scatter-adds race otherwise).
  The "elapsed budget" of the wall-clock cap is the time spent in training steps (warm-up,
  validation and checkpoint writes are not charged); steps lost to a kill are charged again
  when they are redone.
* Divergence: a non-finite loss or gradient norm stops the run before the optimiser applies
  it (every rank sees the same reduced values, so all stop together), with one line naming
  the step and the first non-finite weight or gradient; the final weights are checked too.
  Nothing is written for a diverged model.

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
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from proteus import data as D
from proteus.checkpoint import (
    JsonLog,
    expected_shapes,
    first_nonfinite,
    load_train_state,
    save_train_state,
)
from proteus.config import RunConfig
from proteus.device import pick_device, require_memory, use_autocast
from proteus.dist import Dist, collective_timeout, heartbeat, signal_note
from proteus.errors import ConfigError, RunFailed, RunInterrupted
from proteus.eval import evaluate, format_bpb, validation_plan
from proteus.model import GPT, build_model
from proteus.optim import (  # noqa: F401  (re-exported: the loop's schedules live with the optimisers)
    WeightAverages,
    build_optimizers,
    lr_scale,
    muon_momentum,
    train_frac,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Stopping: signals and divergence


class DivergedError(RunFailed):
    """A non-finite loss, gradient or weight: the run stops, nothing final is written."""


class StopSignal:
    """SIGTERM and SIGINT for the life of a run (a context manager; main thread only).

    Inside the training loop (``deferring``) the first signal asks the loop to stop after its
    current step, save a resumable checkpoint and raise :class:`RunInterrupted`; anywhere else,
    or a second signal, raises RunInterrupted at once. Previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.deferring = False
        self._old: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.deferring and self.signum is None:
            self.signum = signum  # the loop saves after this step
            return
        raise RunInterrupted(f"interrupted by {signal.Signals(signum).name}{signal_note()}",
                             signum)


def _first_nonfinite_tensor(model: GPT) -> str:
    named = dict(model.named_parameters())
    bad = first_nonfinite(named) or first_nonfinite(
        {f"gradient of {k}": p.grad for k, p in named.items() if p.grad is not None})
    if bad:
        return f"first non-finite tensor: {bad if bad.startswith('gradient') else 'weight ' + bad}"
    return "weights and gradients are finite (the loss or the gradient norm overflowed)"


# ---------------------------------------------------------------------------------------------
# Resumable training state


def rng_state() -> dict:
    return dict(cpu=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# Progress: a line at least this often (seconds), besides every `log_every` steps, so that no
# stretch of a run is silent for longer (compile warm-up, slow steps).
PROGRESS_EVERY_S = 10.0


def eta_s(step: int, iterations: int, step_ms: float, train_s: float,
          max_wallclock_s: float) -> float:
    """Training seconds left: the steps left at the smoothed step time, or the wall-clock cap's
    time left when that comes first (the run stops at whichever limit it reaches first)."""
    left = max(0, iterations - step) * step_ms / 1000.0
    if max_wallclock_s > 0:
        left = min(left, max_wallclock_s - train_s)
    return max(0.0, left)


class Quiet:
    """Says what the run is doing when one stretch (a compile, a slow step, a validation pass)
    has run for ``every_s`` seconds with nothing printed meanwhile: a thread calls :meth:`poll`
    once a second while the long call holds the loop. :meth:`doing` names the stretch now
    running; :meth:`said` marks a line printed."""

    def __init__(self, every_s: float | None = None, clock=time.monotonic):
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.clock = clock
        self.what, self.since = "", clock()
        self.last = self.since
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def doing(self, what: str) -> None:
        self.what, self.since = what, self.clock()

    def said(self) -> None:
        self.last = self.clock()

    def poll(self) -> str | None:
        now = self.clock()
        # only one long stretch: several short steps since the last line get the step line
        if not self.what or min(now - self.last, now - self.since) < self.every_s:
            return None
        line = f"  ... {self.what}: {_fmt_time(now - self.since)} so far"
        log.info(line)
        self.last = now
        return line

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.poll()

    def __enter__(self) -> Quiet:
        self._thread = threading.Thread(target=self._run, name="proteus-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Trained:
    """What :func:`train` returns: the model holding its final weights, where it ran, and the
    run's statistics (steps, tokens, losses, weight digest, ...)."""

    model: GPT
    device: torch.device
    autocast: bool
    stats: dict = field(default_factory=dict)


def batch_layout(tc, world: int) -> tuple[int, int]:
    """(sequences per rank per step, sequences per micro-batch) on ``world`` ranks."""
    if tc.batch_tokens % (world * tc.seq_len):
        raise ConfigError(
            f"batch_tokens {tc.batch_tokens} must split into {world} ranks x whole sequences "
            f"of seq_len {tc.seq_len}"
        )
    seqs_per_rank = tc.batch_tokens // world // tc.seq_len
    micro = tc.micro_batch_seqs or seqs_per_rank
    if seqs_per_rank % micro:
        raise ConfigError(
            f"micro_batch_seqs {micro} does not divide the {seqs_per_rank} sequences per rank"
        )
    return seqs_per_rank, micro


def train(cfg: RunConfig, *, dd: Dist | None = None, device: torch.device | None = None,
          val: torch.Tensor | None = None, lut: D.ByteLUT | None = None,
          jlog: JsonLog | None = None, run_dir: str | Path | None = None,
          resume: str | Path | dict | None = None, stop: StopSignal | None = None) -> Trained:
    """Train ``cfg`` and return the model with its final weights (SWA, EMA or raw).

    ``dd``/``device``: the process group and device of the caller (created here when not
    given; a group created here is closed here). ``val``/``lut`` are needed only for periodic
    validation (``val_every``); ``jlog`` receives the config and step records. ``run_dir``:
    where resumable training states go (``checkpoints/``; None: none are written).
    ``resume``: a training state (as :func:`~proteus.checkpoint.load_train_state` returns it,
    or its path) to continue from. ``stop``: the :class:`StopSignal` the caller
    installed (SIGTERM/SIGINT then save a state and raise RunInterrupted)."""
    device = device or pick_device(cfg.train)
    own_dd = dd is None
    dd = dd or Dist(device.type, collective_timeout(cfg.train))
    failed = True
    try:
        with Quiet() as quiet:  # a line when a compile or a slow step holds the loop
            out = _train(cfg, dd, device, val, lut, jlog or JsonLog(None),
                         Path(run_dir) if run_dir else None, resume, stop, quiet)
        failed = False
        return out
    finally:
        if own_dd:
            dd.close(failed)


def _train(cfg: RunConfig, dd: Dist, device: torch.device, val, lut, jlog: JsonLog,
           run_dir: Path | None, resume, stop: StopSignal | None,
           quiet: Quiet | None = None) -> Trained:
    loop = _Loop(cfg, dd, device, val, lut, jlog, run_dir, resume, stop, quiet or Quiet())
    loop.warm_up()
    loop.resume()
    loop.run()
    return loop.finish()


class _Loop:
    """One training run's state and its steps, in the order :func:`_train` calls them:
    set up, warm up (discarded), resume (when given a state), run the steps, finish."""

    def __init__(self, cfg: RunConfig, dd: Dist, device: torch.device, val, lut,
                 jlog: JsonLog, run_dir: Path | None, resume, stop: StopSignal | None,
                 quiet: Quiet):
        self.cfg, self.tc, self.quiet = cfg, cfg.train, quiet
        self.dd, self.device, self.val, self.lut = dd, device, val, lut
        self.jlog, self.run_dir, self.stop = jlog, run_dir, stop
        tc = self.tc
        torch.manual_seed(tc.seed)
        self.autocast = use_autocast(tc, device)

        vocab = cfg.model.vocab_size
        self.stream = D.TokenStream(tc.train_files or D.bundled_train_glob(vocab), dd.rank,
                                    dd.world, vocab)
        self.seqs_per_rank, self.micro = batch_layout(tc, dd.world)
        if tc.val_every and (val is None or lut is None):
            raise ValueError("train: val_every needs the validation tokens and byte table "
                             "(val, lut)")
        # a damaged file fails before any work
        self.state = (resume if isinstance(resume, dict) or resume is None
                      else load_train_state(resume))

        # weights, gradients, optimiser moments, EMA, SWA and the warm-up's copy: ~6 fp32 copies
        n_params = sum(math.prod(s) for s in expected_shapes(cfg).values())
        require_memory(24 * n_params, device, f"training the {n_params:,}-parameter model")
        self.model = build_model(cfg).to(device)
        self.run_model = torch.compile(self.model, dynamic=False) if tc.compile else self.model
        self.optimizers = build_optimizers(self.model, tc)
        self.params = [p for p in self.model.parameters()]

        log.info(f"proteus train: preset {tc.preset}, {self.model.num_params():,} parameters, "
                 f"{dd.world} process(es) on {device.type}, kernels={tc.kernels}, "
                 f"bf16 autocast={'on' if self.autocast else 'off'}")
        log.info(f"  batch {tc.batch_tokens:,} tokens = {dd.world} x {self.seqs_per_rank} x "
                 f"{tc.seq_len} (micro-batch {self.micro}); cap {tc.max_wallclock_s:.0f}s / "
                 f"{tc.iterations} steps")
        if self.state is None:
            jlog.write(event="config", config=cfg.to_dict(), world=dd.world,
                       params=self.model.num_params())
        self.last_saved: Path | None = None
        self.step, self.train_s, self.step_ms, self.last_loss = 0, 0.0, 0.0, float("nan")
        self.stop_reason = "iterations"
        self.losses: list[float] = []
        self.averages: WeightAverages | None = None

    def train_step(self, step: int, scale: float) -> tuple[float, bool]:
        """One optimiser step at LR multiplier ``scale``: (the global-batch loss, whether any
        rank was asked to stop). Raises DivergedError before a non-finite update is applied."""
        tc, dd, model, params = self.tc, self.dd, self.model, self.params
        mom = muon_momentum(step, tc)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
                if "momentum" in g:
                    g["momentum"] = mom
        total = self._forward_backward()
        dd.all_reduce_grads(params)
        # the global-batch loss, as one process would see it, and whether any rank was asked
        # to stop: one decision for all ranks
        stop = self.stop
        total, stopping = dd.mean_and_any(total, stop is not None and stop.signum is not None)
        norm = (torch.nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip > 0 else
                torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        if not (math.isfinite(total) and bool(torch.isfinite(norm))):
            # before the optimiser applies it: the weights stay those of the last good step
            what = f"loss {total}" if not math.isfinite(total) else f"gradient norm {norm}"
            last_saved = self.last_saved
            raise DivergedError(f"training diverged at step {step + 1}: {what}; "
                                f"{_first_nonfinite_tensor(model)}; nothing final written"
                                + (f" (last checkpoint: {last_saved})" if last_saved else ""))
        for opt in self.optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return total, stopping

    def _forward_backward(self) -> float:
        """This rank's share of the next batch, forward and backward in micro-batches; its
        mean loss (gradients accumulate in the parameters)."""
        tc, device, micro = self.tc, self.device, self.micro
        x, y = self.stream.next_batch(tc.batch_tokens, tc.seq_len)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        total = 0.0
        n_micro = self.seqs_per_rank // micro
        for i in range(n_micro):
            xs, ys = x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=self.autocast):
                loss = self.run_model(xs, ys)
            (loss / n_micro).backward()
            total += loss.detach().float().item() / n_micro
        return total

    def warm_up(self) -> None:
        """Compile/allocator warm-up: run real steps, then throw their effects away."""
        tc, model, optimizers, stream = self.tc, self.model, self.optimizers, self.stream
        if tc.warmup_steps > 0:
            heartbeat("warm-up")
            init_model = copy.deepcopy(model.state_dict())
            init_opt = [copy.deepcopy(o.state_dict()) for o in optimizers]
            stream_state = stream.state()
            t0 = time.perf_counter()
            log.info(f"  warm-up: {tc.warmup_steps} step(s), discarded"
                     + (" (the first compiles the model: minutes on a CPU)" if tc.compile else ""))
            self.quiet.said()
            for i in range(tc.warmup_steps):
                self.quiet.doing(f"warm-up step {i + 1}/{tc.warmup_steps}"
                                 + (" (compiling)" if tc.compile and i == 0 else ""))
                # the second half with depth recurrence on, so both graphs are compiled
                model.set_recurrence(2 * i >= tc.warmup_steps)
                self.train_step(i, 1.0)
            model.load_state_dict(init_model)
            for o, s in zip(optimizers, init_opt, strict=True):
                o.load_state_dict(s)
            stream.restore(stream_state)
            log.info(f"  warm-up: {tc.warmup_steps} steps in {time.perf_counter() - t0:.1f}s "
                     "(discarded)")
            self.quiet.said()
        # the averages start from the weights the warm-up put back
        self.averages = WeightAverages(model, tc)

    def resume(self) -> None:
        """Put a saved training state back (when the run was given one)."""
        state = self.state
        if state is None:
            return
        where = state.get("path", "a training state")
        self.step, self.train_s, self.step_ms, self.losses = _restore(
            state, self.model, self.optimizers, self.averages, self.stream, self.dd,
            self.device, where)
        self.last_loss = self.losses[-1] if self.losses else self.last_loss
        log.info(f"  resumed from {where}: step {self.step}, {_fmt_time(self.train_s)} of the "
                 "budget used")
        # the records of the steps after the state are written again from here: keep one copy
        self.jlog.drop_after(self.step)
        self.jlog.write(event="resume", step=self.step, path=where, world=self.dd.world)

    def run(self) -> None:
        """Steps until the step budget or the wall-clock cap (or a stop signal), then the end
        of training's resumable state."""
        tc, stop, state = self.tc, self.stop, self.state
        self.last_save_t = time.monotonic()
        if stop is not None:
            stop.deferring = True
        try:
            while self.step < tc.iterations:
                if tc.max_wallclock_s > 0 and self.train_s >= tc.max_wallclock_s:
                    self.stop_reason = "wallclock"
                    break
                scale, stopping = self.one_step()
                self.log_progress(scale)
                if stopping:
                    self.stop_now(self.save_state())
                if tc.val_every and self.step % tc.val_every == 0:
                    self.validate()
                self.maybe_checkpoint()
            # the end of training is a state too: a run killed during its evaluation resumes here
            if state is None or self.step > int(state["step"]):
                self.last_saved = self.save_state()
            # a signal during the last step: every rank learns of it, and the run stops here
            if self.dd.mean_and_any(0.0, stop is not None and stop.signum is not None)[1]:
                self.stop_now(self.last_saved or (self.save_state() if self.run_dir else None))
        finally:
            if stop is not None:
                stop.deferring = False

    def one_step(self) -> tuple[float, bool]:
        """A step of the loop: the LR schedule, the optimiser step, the weight averages and
        the clock; (the LR multiplier, whether to stop)."""
        tc, model, averages = self.tc, self.model, self.averages
        heartbeat(f"step {self.step + 1}")
        self.quiet.doing(f"step {self.step + 1}")
        scale = lr_scale(self.step, tc, self.step_ms, self.train_s * 1000.0)
        model.set_recurrence(train_frac(self.step, tc, self.train_s * 1000.0) >= tc.recur_at_frac)
        t0 = time.perf_counter()
        self.last_loss, stopping = self.train_step(self.step, scale)
        self.losses.append(self.last_loss)
        averages.update_ema(model)
        if tc.swa_every and scale < tc.swa_lr_below and (self.step + 1) % tc.swa_every == 0:
            averages.snapshot(model)
        dt = time.perf_counter() - t0
        self.train_s += dt
        self.step += 1
        # Smooth the step time used by the wall-clock-aware warm-down.
        self.step_ms = (dt * 1000.0 if self.step_ms == 0
                        else 0.9 * self.step_ms + 0.1 * dt * 1000.0)
        return scale, stopping

    def log_progress(self, scale: float) -> None:
        """Every step on record (the plot draws each one); on screen every ``log_every`` steps
        and at least every PROGRESS_EVERY_S seconds."""
        tc, step, step_ms, train_s = self.tc, self.step, self.step_ms, self.train_s
        quiet = self.quiet
        tok_s = tc.batch_tokens / (step_ms / 1000.0)
        self.jlog.write(event="step", step=step, loss=self.last_loss, lr_scale=scale,
                        tok_s=tok_s, step_ms=step_ms, train_s=train_s)
        if (step % tc.log_every == 0 or step == 1 or step == tc.iterations
                or time.monotonic() - quiet.last >= quiet.every_s):
            eta = eta_s(step, tc.iterations, step_ms, train_s, tc.max_wallclock_s)
            log.info(f"step {step:6d}  loss {self.last_loss:.4f}  lr x{scale:.3f}  "
                     f"{tok_s:,.0f} tok/s  {step_ms:.0f} ms/step  elapsed "
                     f"{_fmt_time(train_s)}  eta {_fmt_time(eta)}")
            quiet.said()

    def validate(self) -> None:
        """Periodic validation (``val_every``): plain bpb of the current weights."""
        step = self.step
        heartbeat(f"validation at step {step}")
        self.quiet.doing(f"validation at step {step}")
        r = evaluate(self.model, self.val, validation_plan(self.cfg), lut=self.lut,
                     device=self.device, autocast=self.autocast).plain
        log.info(f"  val @ step {step}: bpb {format_bpb(r['bpb'])} loss {r['loss']:.4f}")
        self.jlog.write(event="val", step=step, train_s=self.train_s, **r)

    def maybe_checkpoint(self) -> None:
        """A resumable state every ``checkpoint_every`` steps or ``checkpoint_every_s``
        seconds (not after the last step: :meth:`run` saves that one)."""
        tc, step = self.tc, self.step
        if self.run_dir is not None and step < tc.iterations and (
                (tc.checkpoint_every and step % tc.checkpoint_every == 0)
                or (tc.checkpoint_every_s
                    and time.monotonic() - self.last_save_t >= tc.checkpoint_every_s)):
            self.last_saved = self.save_state()
            self.last_save_t = time.monotonic()

    def save_state(self) -> Path | None:
        """Rank 0 writes the resumable training state; its path (the run directory on other
        ranks; None without a run directory)."""
        if self.run_dir is None:
            return None
        path, step, model, dd = None, self.step, self.model, self.dd
        if dd.main:
            heartbeat(f"saving a checkpoint after step {step}")
            path = save_train_state(self.run_dir, step, dict(
                config=self.cfg.to_dict(), step=step, train_s=self.train_s,
                step_ms=self.step_ms, losses=self.losses,
                model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                optimizers=[o.state_dict() for o in self.optimizers],
                averages=self.averages.state_dict(), stream=list(self.stream.state()),
                shards=self.stream.shards(), rng=rng_state(), world=dd.world),
                self.tc.keep_checkpoints)
            self.jlog.write(event="checkpoint", step=step, path=str(path))
        return path or Path(self.run_dir)

    def stop_now(self, path: Path | None) -> None:
        stop = self.stop
        signum = stop.signum if stop is not None and stop.signum else signal.SIGTERM
        self.dd.barrier()  # no rank exits (and has torchrun stop the others) mid-save
        raise RunInterrupted(
            f"stopped by {signal.Signals(signum).name}{signal_note()} after step {self.step}: "
            + (f"training state saved to {path}" if self.run_dir else "no run directory, "
               "nothing saved"), signum)

    def finish(self) -> Trained:
        """The final weights (SWA mean, else EMA, else raw) into the model, checked finite,
        and the run's statistics."""
        tc, model, step, train_s = self.tc, self.model, self.step, self.train_s
        model.set_recurrence(True)  # the trained model is evaluated with its recurrence
        final_state, which = self.averages.final_state(model)
        model.load_state_dict(final_state)
        bad = first_nonfinite(model.state_dict())
        if bad:
            raise DivergedError(f"training diverged: final weight {bad} ({which}) after step "
                                f"{step}; nothing final written")
        tokens_seen = step * tc.batch_tokens
        log.info(f"training done: {step} steps, {tokens_seen:,} tokens in {_fmt_time(train_s)} "
                 f"({tokens_seen / max(train_s, 1e-9):,.0f} tok/s), stopped by "
                 f"{self.stop_reason}; final weights: {which}")
        stats = dict(steps=step, train_seconds=train_s, tokens=tokens_seen,
                     tokens_per_s=tokens_seen / max(train_s, 1e-9), final_loss=self.last_loss,
                     final_weights=which, stop_reason=self.stop_reason, world=self.dd.world,
                     losses=self.losses, param_digest=param_digest(model))
        return Trained(model, self.device, self.autocast, stats)


def _restore(state: dict, model: GPT, optimizers, averages: WeightAverages,
             stream: D.TokenStream, dd: Dist, device: torch.device, path
             ) -> tuple[int, float, float, list[float]]:
    """Put a saved training state back: (step, train seconds, smoothed step ms, losses)."""
    if [tuple(s) for s in state["shards"]] != stream.shards():
        raise D.DataError(f"training state {path} was saved over other training shards "
                          f"({len(state['shards'])} shards) than --train-files gives now; resume "
                          "with the same data")
    try:
        model.load_state_dict(state["model"])
        for o, s in zip(optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        averages.load_state_dict(state["averages"], device)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"training state {path} does not match this run's model and "
                          f"optimisers: {str(e).splitlines()[0][:200]}") from None
    stream.restore(tuple(state["stream"]))
    set_rng_state(state["rng"])
    if state["world"] != dd.world:
        log.info(f"  (saved by {state['world']} process(es), resumed on {dd.world}: the same "
                 "batches, summed in another order, so not bit-identical)")
    return int(state["step"]), float(state["train_s"]), float(state["step_ms"]), \
        [float(x) for x in state["losses"]]
