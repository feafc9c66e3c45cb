"""One launcher for the tests and tools that run a worker script under torchrun (gloo, one CPU
thread per process unless told otherwise, no PROTEUS_* variables from the caller) and read each
rank's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(threads: int = 1) -> dict[str, str]:
    """The caller's environment without PROTEUS_* names, this tree first on the path,
    ``threads`` CPU threads per process (torchrun's own default is one)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = str(threads)
    return e


def torchrun(worker: str, nproc: int, args: list, out: str, timeout: float = 600,
             threads: int = 1) -> list[dict]:
    """Run ``tests/<worker> ARGS...`` under ``nproc`` processes of ``threads`` CPU threads;
    every rank's ``out/rank{i}.json`` (``out``: the folder the worker was told to write to). A
    failed run raises ``RuntimeError`` with the end of its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "tests", worker), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(threads),
                       timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{worker} under torchrun ({nproc} processes) exited "
                           f"{r.returncode}:\n{r.stderr[-4000:]}")
    return [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(nproc)]
