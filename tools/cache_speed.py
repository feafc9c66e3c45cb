"""The n-gram cache's speed before and after a change, side by side in one process: the
record's hashed scorer (the baseline), ``proteus/eval/stream_counts.py`` as it was at REV
(loaded from git as a second module) and as it is now; 3 rounds, interleaved; wall and CPU
seconds (the CPU seconds are steadier on a shared machine). Checks that both give the same
scores before timing. Prints a markdown table.

usage: python tools/cache_speed.py [REV] (default d451691, main before issue 30's speed-up)"""

import importlib.util
import os
import statistics as st
import subprocess
import sys
import tempfile
import time

import torch

from proteus import data as D
from proteus.eval import blend as bl
from proteus.eval.blend import NgramConfig, ngram_blend_logprobs
from proteus.eval.hashed import hashed_numpy_cache_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_at(rev: str):
    """``proteus/eval/stream_counts.py`` as it was at ``rev``, imported as a second module."""
    old = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:proteus/eval/stream_counts.py"],
                         capture_output=True, text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "stream_counts_before.py")
    with open(path, "w") as f:
        f.write(old)
    spec = importlib.util.spec_from_file_location("stream_counts_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    before = module_at(sys.argv[1] if len(sys.argv) > 1 else "d451691")
    now = bl.stream_counts, bl.mix_numpy
    tokens = D.load_tokens(D.bundled_val_glob(), "val")
    n = tokens.numel() - 1
    logp = torch.full((n,), -4.0, dtype=torch.float64)

    def blend(cfg, old=False):
        if old:
            bl.stream_counts, bl.mix_numpy = before.stream_counts, before.mix_numpy
        try:
            return ngram_blend_logprobs(tokens, 1, n + 1, logp, cfg)
        finally:
            bl.stream_counts, bl.mix_numpy = now

    runs = {"hashed-record": lambda: hashed_numpy_cache_logprobs(tokens.numpy(), logp.numpy()),
            "before numpy": lambda: blend(NgramConfig(), old=True),
            "before numpy-history-only": lambda: blend(NgramConfig(doc=False), old=True),
            "numpy": lambda: blend(NgramConfig()),
            "numpy-history-only": lambda: blend(NgramConfig(doc=False))}
    if not torch.equal(runs["before numpy"](), runs["numpy"]()):
        raise SystemExit("the scores before and now differ")
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for _ in range(3):
        for k, f in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    print(f"{n:,} targets; torch threads {torch.get_num_threads()}")
    print("| provider | wall p50 (min-max) | CPU p50 | vs hashed, wall | vs hashed, CPU |")
    print("|---|---|---|---|---|")
    hw, hc = st.median(wall["hashed-record"]), st.median(cpu["hashed-record"])
    for k in runs:
        w, c = st.median(wall[k]), st.median(cpu[k])
        print(f"| {k} | {w:.2f} s ({min(wall[k]):.2f}-{max(wall[k]):.2f}) | {c:.2f} s | "
              f"{hw / w:.2f}x | {hc / c:.2f}x |")


if __name__ == "__main__":
    main()
