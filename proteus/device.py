"""The run's device and precision: which device, how many CPU threads, and where bf16 pays.

bf16 is the fast path on a CUDA GPU and on CPUs with native bf16 matrix instructions (AMX or
AVX512-BF16); on other CPUs (AVX2 only, e.g. many AMD EPYC hosts) PyTorch emulates bf16
matmuls and a bf16 step is several times slower than fp32 (cpu-tiny: ~3.4 s vs ~0.2 s per step
measured on such a host), so ``auto`` picks fp32 there.
"""

from __future__ import annotations

import os
import platform

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
