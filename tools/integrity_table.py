"""The bit-identity table of docs/integrity.md: one checkpoint evaluated (plain, sliding, the
n-gram cache, score-first TTT and TTT + cache) with several batch sizes under 1, 2, 3 and 8
gloo processes (torchrun) of 1 or more CPU threads each; prints a markdown table of every number
with all its digits, and whether each column is one number.

usage: python tools/integrity_table.py CKPT [--tokens 8192] [--stride 64] [--chunk 2048]
       [--batches 1,5,32] [--worlds 1,2,3,8] [--threads 1,2] [--json OUT]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from _torchrun import torchrun  # noqa: E402  (the tests' launcher: one copy)

KEYS = ("plain", "sliding", "cache", "ttt", "ttt + cache")


def run(ckpt: str, world: int, threads: int, batch: int, tokens: int, stride: int, chunk: int
        ) -> dict:
    out = tempfile.mkdtemp(prefix="integrity-")
    try:
        ranks = torchrun("_eval_worker.py", world, [ckpt, out, batch, tokens, stride, chunk],
                         out, timeout=3600, threads=threads)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    if any(rk[k] != ranks[0][k] for rk in ranks for k in KEYS):
        raise SystemExit(f"ranks disagree at world {world}, threads {threads}, batch {batch}")
    return ranks[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--batches", default="1,5,32")
    p.add_argument("--worlds", default="1,2,3,8")
    p.add_argument("--threads", default="1,2", help="CPU threads per process")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for world in map(int, a.worlds.split(",")):
        for threads in map(int, a.threads.split(",")):
            for batch in map(int, a.batches.split(",")):
                r = run(a.ckpt, world, threads, batch, a.tokens, a.stride, a.chunk)
                rows.append(r)
                print(f"world {world} threads {threads} batch {batch}: "
                      + ", ".join(f"{k} {r[k]!r}" for k in KEYS), file=sys.stderr, flush=True)
    print("| processes | threads | batch | " + " | ".join(KEYS) + " | seconds (total) |")
    print("|---|---|---|" + "---|" * len(KEYS) + "---|")
    for r in rows:
        print(f"| {r['world']} | {r['threads']} | {r['batch']} | "
              + " | ".join(repr(r[k]) for k in KEYS) + f" | {r['seconds']['total']:.1f} |")
    same = {k: len({r[k] for r in rows}) == 1 for k in KEYS}
    print("\none number per column: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                  for k, v in same.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
