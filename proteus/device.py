"""The run's device and precision: which device, how many CPU threads, and where bf16 pays.

bf16 is the fast path on a CUDA GPU and on CPUs with native bf16 matrix instructions (AMX or
AVX512-BF16); on other CPUs (AVX2 only, e.g. many AMD EPYC hosts) PyTorch emulates bf16
matmuls and a bf16 step is several times slower than fp32 (cpu-tiny: ~3.4 s vs ~0.2 s per step
measured on such a host), so ``auto`` picks fp32 there.

CPU threads and the last bit: with several intra-op threads a torch op splits its work by the
thread count, so a matmul with a long inner dimension (a weight gradient), a full sum, or an
elementwise op whose split lands inside a vector (sigmoid at 3 threads) rounds differently with
1, 2 or 3 threads. ``one_thread`` runs a block with one intra-op thread; ``map_one_thread``
runs independent pieces of work (batches of windows, groups of rows) each on one thread, as
many at a time as the process had threads, and returns them in order: every piece's arithmetic
is a single-threaded run's, whatever the thread count, and the cores stay busy.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import TypeVar

import torch

from proteus.dist import local_rank
from proteus.errors import ConfigError


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix products run natively: CUDA, or a CPU with AMX/AVX512-BF16."""
    if device.type == "cuda":
        return True
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())


def pick_device(tc) -> torch.device:
    """The run's device (``--device``), with the process's thread count, deterministic
    algorithms (``--deterministic``) and CUDA device set."""
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.deterministic:
        # cuBLAS is deterministic only with a fixed workspace (torch refuses matmuls without)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but no CUDA GPU is visible; use --device cpu")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def use_autocast(tc, device: torch.device) -> bool:
    """bf16 autocast: ``on``/``off`` as asked; ``auto`` where bf16 is native (see above)."""
    if tc.autocast_bf16 == "on":
        return True
    if tc.autocast_bf16 == "off":
        return False
    return native_bf16(device)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on ``device`` (free GPU memory; the kernel's
    MemAvailable on Linux), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(nbytes: int, device: torch.device, what: str) -> None:
    """Refuse, with one line, work that needs more memory than ``device`` has available (a
    config or a crafted file asking for terabytes), before anything is allocated."""
    avail = available_memory(device)
    if avail is not None and nbytes > avail:
        raise ConfigError(f"{what} needs {nbytes / 2**30:,.1f} GiB of memory; the "
                          f"{device.type} has {avail / 2**30:,.1f} GiB available")


def device_name(device: torch.device) -> str:
    """The hardware a run used, as its log records it (the challenge's limits are for 8xH100)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return f"CPU {model or platform.processor() or platform.machine()} " \
           f"({torch.get_num_threads()} threads)"


_T = TypeVar("_T")
_R = TypeVar("_R")
_replaced = threading.local()  # per Python thread: the thread counts one_thread() replaced


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads set to one for the block (and restored after it), so every op
    in it rounds as a single-threaded run does. Nests; ``cpu_threads`` still tells the count
    from before the outermost block."""
    stack = _replaced.__dict__.setdefault("stack", [])
    stack.append(torch.get_num_threads())
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(stack.pop())


def cpu_threads() -> int:
    """The CPU threads this Python thread may use: torch's count before the outermost
    ``one_thread`` block it is in (its current count outside one)."""
    stack = _replaced.__dict__.get("stack")
    return stack[0] if stack else torch.get_num_threads()


def map_one_thread(fn: Callable[[_T], _R], items: Iterable[_T],
                   device: str | torch.device = "cpu",
                   each: Callable[[_R], None] | None = None,
                   side_by_side: bool = True) -> list[_R]:
    """``[fn(item) for item in items]``, each call with one intra-op thread, up to
    ``cpu_threads()`` calls at a time (Python threads; torch releases the GIL in its ops). The
    results are a single-threaded run's to the last bit, whatever the thread count. ``each``
    is called with every result in order, on this thread, as it arrives (progress). Grad mode is
    carried into the calls; ``fn`` sets up anything else thread-local (autocast). On a CUDA
    ``device`` the calls run in turn on this thread, its thread count untouched (the CPU
    threads do not enter a GPU's arithmetic). ``side_by_side=False``: in turn, each still on
    one thread (for work that is not thread-safe: Triton's interpreter)."""
    items = list(items)
    cpu = torch.device(device).type == "cpu"
    workers = min(cpu_threads(), len(items)) if cpu and side_by_side else 1
    grad = torch.is_grad_enabled()

    def call(item: _T) -> _R:
        torch.set_num_threads(1)  # this thread's own OpenMP count, before its first op
        with torch.set_grad_enabled(grad):
            return fn(item)

    out: list[_R] = []
    with one_thread() if cpu else nullcontext(), \
            ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        for r in pool.map(call, items) if pool else map(fn, items):
            out.append(r)
            if each is not None:
                each(r)
    return out
