"""Benchmark set-up shared by every kernel benchmark: check, then time, then put it on record.

Each benchmark checks its provider against the reference first (it fails on a mismatch) and
only then times it. Our providers are ``triton`` (our kernel), ``ref`` (the PyTorch reference,
eager) and ``ref-compile`` (the reference under ``torch.compile``); peers (PyTorch SDPA
backends, flash-attn, Liger-Kernel, torchao, ...) come from ``benchmarks/peers.py`` and are
*optional*: one that cannot be imported, or cannot run on this device or these inputs, is
skipped with a one-line reason (recorded, never a failure); one that runs and disagrees with
the reference fails like ours would.

Timing (``run_timed``): on CPU, ``rounds`` calls of the function, each one timed; on a GPU,
``rounds`` rounds of ``reps`` back-to-back calls (``reps`` chosen so a round takes about 2 ms),
each call timed with CUDA events and the stream synchronised once per round, so a 5 µs kernel
is not measured as a 20 µs launch-and-sync. ``extra_info`` gets the per-call p20/p50/p80 (s),
the number of samples, and the peak memory of the provider's first call and timed calls above
what was held before them (``MemoryPeak``: CUDA peak allocated on a GPU; on CPU the process's
resident set sampled every millisecond). On CPU the kernels run on Triton's interpreter at
small shapes: the timings prove the harness, not the kernel's speed. On a GPU the production
shapes are used and ``extra_info`` carries the bytes and FLOPs from which ``proteus bench``
derives GB/s, TFLOPS and % of the roofline.

Options (``proteus bench`` passes them): ``--providers a,b`` keeps only those providers;
``--skips-json FILE`` writes every skipped benchmark with its reason; ``--quick`` leaves out
the compiled providers (a fresh ``torch.compile`` each: most of a full run's time on a CPU)
and the cache scoring pass over the bundled validation tokens;
``--records-jsonl FILE`` appends each benchmark's record (pytest-benchmark's, without the raw
samples) or skip as soon as it finishes, so an interrupted run keeps what it measured;
``--progress-lines`` prints the estimated duration first, then one line per benchmark (status,
p50, elapsed, time left) instead of pytest's dots.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass

import pytest
import torch

import proteus.kernels  # noqa: F401  (selects compiled vs interpreter before kernel modules load)
from proteus.kernels._backend import kernel_device

ON_GPU = torch.cuda.is_available()
PROVIDERS = ["triton", "ref", "ref-compile"]
GPU_ROUND_S = 2e-3  # a GPU round: back-to-back calls for about this long, then one sync
MAX_REPS = 200


@pytest.fixture
def device() -> str:
    return kernel_device()


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Case:
    """One point of a benchmark family: ``family`` is what a chart draws (one line per
    provider against ``x``), ``shape`` names the point; the printed group is both."""

    family: str
    shape: str
    x_name: str = ""
    x: float | None = None

    @property
    def group(self) -> str:
        return f"{self.family} {self.shape}" if self.shape else self.family

    def describe(self, benchmark, provider: str, **info) -> None:
        benchmark.group = self.group
        benchmark.extra_info.update(provider=provider, family=self.family, shape=self.shape,
                                    x_name=self.x_name, x=self.x,
                                    device="cuda" if ON_GPU else "cpu", **info)

    def skip(self, benchmark, provider: str, reason: str, **info):
        """Skip a provider that cannot run here; the reason goes on record."""
        self.describe(benchmark, provider, **info)
        pytest.skip(reason)


def sweep(points, providers, main, compiled=("ref-compile",)):
    """(point, provider) pairs of a sweep: every provider at every point, except the compiled
    ones, which run only at ``main`` (each new shape is a new compile: minutes on a GPU)."""
    return [pytest.param(p, prov, id=f"{p}-{prov}") for p in points for prov in providers
            if p == main or prov not in compiled]


# ---------------------------------------------------------------------------------------------
# Memory


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


MEM_KIND = "cuda peak allocated" if ON_GPU else ("cpu peak RSS" if _rss() is not None else "")


class MemoryPeak:
    """Peak memory inside its ``with`` windows above what was held when the first one opened:
    ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the resident set size read from
    /proc/self/statm every millisecond by a thread (PyTorch's CPU allocator keeps freed blocks,
    so a provider's later calls often add nothing to what its first call took)."""

    def __init__(self):
        self.base: int | None = None
        self.peak = 0
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(1e-3):
            self._max = max(self._max, _rss() or 0)

    def __enter__(self):
        if ON_GPU:
            torch.cuda.synchronize()
            if self.base is None:
                self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        elif MEM_KIND:
            now = _rss() or 0
            self.base = now if self.base is None else self.base
            self._max = now
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if ON_GPU:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - self.base)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss() or 0)
            self.peak = max(self.peak, self._max - self.base)


# ---------------------------------------------------------------------------------------------
# Check, then time


def _quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _timed_rounds(benchmark, fn, rounds: int, warmup: int) -> tuple[list[float], int]:
    """Per-call times (s) of ``rounds`` timed rounds, and the calls per round."""
    samples: list[float] = []
    if not ON_GPU:
        def call():
            t0 = time.perf_counter()
            out = fn()
            samples.append(time.perf_counter() - t0)
            return out

        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
        return samples[warmup:] or samples, 1
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(1, min(MAX_REPS, int(GPU_ROUND_S / max(time.perf_counter() - t0, 1e-7))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]

    def round_():
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        samples.extend(s.elapsed_time(e) / 1e3 for s, e in events)

    benchmark.pedantic(round_, rounds=rounds, iterations=1, warmup_rounds=0)
    return samples, reps


def run_timed(benchmark, fn, *, group: str | None = None, provider: str,
              case: Case | None = None, rounds: int | None = None, warmup: int = 1,
              mem: MemoryPeak | None = None, **info) -> None:
    """Time ``fn`` (already checked by the caller) and put the result on record.

    ``case`` places the row in its family (for charts); a bare ``group`` makes a family of its
    own. ``info`` carries the work (``flops``, ``bytes``, ``tokens``, ``items``) and notes."""
    case = case or Case(family=group or benchmark.name, shape="")
    if group is not None and case.group != group:
        raise ValueError(f"run_timed: group {group!r} and case {case.group!r} disagree")
    case.describe(benchmark, provider, **info)
    mem = mem or MemoryPeak()
    with mem:
        samples, reps = _timed_rounds(benchmark, fn, rounds or (30 if ON_GPU else 3), warmup)
    benchmark.extra_info.update(
        p20=_quantile(samples, 0.2), p50=_quantile(samples, 0.5), p80=_quantile(samples, 0.8),
        samples=len(samples), reps=reps, mem_peak_bytes=mem.peak if MEM_KIND else None,
        mem_kind=MEM_KIND)


def check_then_time(benchmark, fn, check, *, case: Case, provider: str, optional: bool = False,
                    **kw) -> None:
    """Call ``fn`` once, ``check(out)`` it against the reference, then ``run_timed`` it.

    ``optional`` (peers): an exception from that first call skips the provider with its reason
    (the device or the inputs are not supported there); a failed check still fails."""
    mem = MemoryPeak()
    try:
        with mem:
            out = fn()
    except Exception as e:  # noqa: BLE001  (a peer's own error, whatever its type, is a skip)
        if not optional:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        case.skip(benchmark, provider, f"{provider} cannot run here: {type(e).__name__}: {first}")
    check(out)
    del out
    run_timed(benchmark, fn, case=case, provider=provider, mem=mem, **kw)


def provider_fn(provider: str, kernel, ref):
    """The function a provider times: our ``kernel``, the eager ``ref``, or ``ref`` under
    ``torch.compile`` (inductor on CPU and GPU alike; the compile caches are reset first, so
    each benchmark compiles afresh and no earlier shape counts against the recompile limit)."""
    if provider == "ref-compile":
        torch.compiler.reset()
        return torch.compile(ref, dynamic=False)
    return {"triton": kernel, "ref": ref}[provider]


# ---------------------------------------------------------------------------------------------
# Options and the record of skips


def pytest_addoption(parser):
    parser.addoption("--providers", default="",
                     help="comma-separated providers to keep (default: all)")
    parser.addoption("--skips-json", default="",
                     help="write the skipped benchmarks and their reasons to this JSON file")
    parser.addoption("--quick", action="store_true",
                     help="the quick subset: no compiled providers (each is a fresh "
                     "torch.compile) and no cache scoring pass, unless --providers names them")
    parser.addoption("--records-jsonl", default="",
                     help="append each benchmark's record (or its skip) to this file as soon "
                     "as it finishes, so an interrupted run keeps what it measured")
    parser.addoption("--progress-lines", action="store_true",
                     help="one line per finished benchmark (status, elapsed, time left) "
                     "instead of pytest's dots; the estimated duration before the first")


# Compiled providers: each is a fresh inductor compile, most of a full run's time on a CPU.
COMPILED = ("ref-compile", "proteus-compile")
# Benchmarks the quick subset leaves out as well: the cache scoring over the 1,040,297 bundled
# validation tokens (about a minute per provider on a 2-core CPU).
QUICK_LEAVES_OUT = ("test_bench_cache_scoring",)
# Estimated seconds per benchmark (check + time), for the duration printed before a run and
# the time left after each benchmark: compiled providers on any device; the cache scoring pass
# (numpy, on any device); others on a GPU; others on CPU per benchmark file (the Triton kernels
# on the interpreter). The CPU figures are one quick run's on this 2-core machine under a load
# average of 16 (2026-12-05: 77 benchmarks in 3m26s, 2m35s of it the cache scoring); the
# compiled ones from the full run of 2026-12-01 (27 min).
EST_COMPILED_S = 90.0
EST_GPU_S = 3.0
EST_BY_TEST_S = {"test_bench_cache_scoring": 50.0}
EST_CPU_S = {"xsa_attention": 2.0, "leaky_relu2": 0.5, "int6_matmul": 0.3, "ngram": 0.3,
             "train_step": 30.0}


def _provider(item) -> str | None:
    params = getattr(item, "callspec", None)
    if params is None:
        return None
    prov = params.params.get("provider")
    return prov if isinstance(prov, str) else None


def _is_compiled(item) -> bool:
    return _provider(item) in COMPILED


def estimate_s(item) -> float:
    """Estimated seconds of one benchmark item (see ``EST_*``)."""
    if _is_compiled(item):
        return EST_COMPILED_S
    if item.originalname in EST_BY_TEST_S:
        return EST_BY_TEST_S[item.originalname]
    if ON_GPU:
        return EST_GPU_S
    stem = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    return EST_CPU_S.get(stem.removeprefix("test_bench_"), 3.0)


def pytest_collection_modifyitems(config, items):
    keep = {p for p in config.getoption("--providers").split(",") if p}
    chosen, dropped = [], []
    for item in items:
        provider = _provider(item)
        named = provider in keep
        if keep and not named:
            dropped.append(item)
        elif config.getoption("--quick") and not named and (
                _is_compiled(item) or item.originalname in QUICK_LEAVES_OUT):
            dropped.append(item)
        else:
            chosen.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = chosen


_SKIPS: list[dict] = []


class _Progress:
    """The run's progress: items done, estimated seconds of those left, the outcome of each."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.total = 0
        self.est: dict[str, float] = {}
        self.done_est = 0.0
        self.done = 0
        self.outcome: dict[str, str] = {}


_PROGRESS = _Progress()


def _fmt(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def _say(config, text: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(text, flush=True)
    else:
        print(text, flush=True)


def pytest_collection_finish(session):
    items = session.items
    _PROGRESS.total = len(items)
    _PROGRESS.est = {it.nodeid: estimate_s(it) for it in items}
    _PROGRESS.t0 = time.monotonic()
    if session.config.getoption("--progress-lines"):
        est = sum(_PROGRESS.est.values())
        quick = (" (the quick subset: no compiled providers, no cache scoring; --full runs "
                 "everything)") if session.config.getoption("--quick") else ""
        _say(session.config, f"proteus bench: {len(items)} benchmarks{quick}, estimated "
             f"{_fmt(est)} on {'this GPU' if ON_GPU else 'CPU'}")


@pytest.hookimpl(hookwrapper=True)
def pytest_report_teststatus(report, config):
    outcome = yield
    if config.getoption("--progress-lines"):
        cat, _short, verbose = outcome.get_result()
        outcome.force_result((cat, "", verbose))  # our lines instead of pytest's dots


def _append_record(config, record: dict) -> None:
    path = config.getoption("--records-jsonl")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()


def _finished(item) -> None:
    """One benchmark done: its progress line (with --progress-lines)."""
    p = _PROGRESS
    p.done += 1
    p.done_est += p.est.get(item.nodeid, 0.0)
    if not item.config.getoption("--progress-lines"):
        return
    elapsed = time.monotonic() - p.t0
    left_est = max(0.0, sum(p.est.values()) - p.done_est)
    rate = elapsed / p.done_est if p.done_est > 0 else 1.0  # measured / estimated so far
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    status = p.outcome.get(item.nodeid, "?")
    if status == "ok" and bench is not None and "p50" in bench.extra_info:
        status = f"ok, p50 {bench.extra_info['p50'] * 1e3:.3f} ms"
    name = item.nodeid.split("::", 1)[-1]
    _say(item.config, f"[{p.done:3d}/{p.total}] {name}: {status}  (elapsed {_fmt(elapsed)}, "
         f"~{_fmt(left_est * rate)} left)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "teardown":
        _finished(item)
        return
    if rep.failed:
        _PROGRESS.outcome[item.nodeid] = f"FAILED ({rep.when})"
    elif rep.when == "call" and rep.passed:
        _PROGRESS.outcome[item.nodeid] = "ok"
        bench = item.funcargs.get("benchmark")
        if bench is not None and getattr(bench, "stats", None) is not None:
            _append_record(item.config, {"kind": "benchmark",
                                         **bench.stats.as_dict(include_data=False)})
    if not rep.skipped or call.when == "teardown":
        return
    longrepr = rep.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    info = dict(bench.extra_info) if bench is not None else {}
    params = item.callspec.params if hasattr(item, "callspec") else {}
    _SKIPS.append({"nodeid": item.nodeid, "group": getattr(bench, "group", None),
                   "reason": reason, **info,
                   "provider": info.get("provider") or params.get("provider")})
    short = reason if len(reason) <= 100 else reason[:97].rstrip() + "..."
    _PROGRESS.outcome[item.nodeid] = f"skipped ({short})"
    _append_record(item.config, {"kind": "skip", **_SKIPS[-1]})


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # a benchmark stopped by Ctrl-C has no samples, and pytest-benchmark's JSON writer (which
    # runs inside this wrapper) fails on one: keep those that measured something
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:
        bs.benchmarks[:] = [b for b in bs.benchmarks
                            if getattr(getattr(b, "stats", None), "data", None)]
    yield
    path = session.config.getoption("--skips-json")
    if path:
        with open(path, "w") as f:
            json.dump(_SKIPS, f, indent=1, default=str)
