"""The bit-identity table of docs/integrity.md: one checkpoint evaluated (plain, sliding, the
n-gram cache, score-first TTT and TTT + cache) with several batch sizes under 1, 2, 3 and 8
gloo processes (torchrun, one thread each); prints a markdown table of every number with all
its digits, and whether each column is one number.

usage: python tools/integrity_table.py CKPT [--tokens 8192] [--stride 64] [--chunk 2048]
       [--batches 1,5,32] [--worlds 1,2,3,8] [--json OUT]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("plain", "sliding", "cache", "ttt", "ttt + cache")


def run(ckpt: str, world: int, batch: int, tokens: int, stride: int, chunk: int) -> dict:
    out = tempfile.mkdtemp(prefix="integrity-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", os.path.join(ROOT, "tests", "_eval_worker.py"), ckpt,
           out, str(batch), str(tokens), str(stride), str(chunk)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    ranks = [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(world)]
    if any(rk[k] != ranks[0][k] for rk in ranks for k in KEYS):
        raise SystemExit(f"ranks disagree at world {world}, batch {batch}")
    return ranks[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--batches", default="1,5,32")
    p.add_argument("--worlds", default="1,2,3,8")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for world in map(int, a.worlds.split(",")):
        for batch in map(int, a.batches.split(",")):
            r = run(a.ckpt, world, batch, a.tokens, a.stride, a.chunk)
            rows.append(r)
            print(f"world {world} batch {batch}: " + ", ".join(f"{k} {r[k]!r}" for k in KEYS),
                  file=sys.stderr, flush=True)
    print("| processes | batch | " + " | ".join(KEYS) + " | seconds (total) |")
    print("|---|---|" + "---|" * len(KEYS) + "---|")
    for r in rows:
        print(f"| {r['world']} | {r['batch']} | " + " | ".join(repr(r[k]) for k in KEYS)
              + f" | {r['seconds']['total']:.1f} |")
    same = {k: len({r[k] for r in rows}) == 1 for k in KEYS}
    print("\none number per column: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                  for k, v in same.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
