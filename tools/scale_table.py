"""The per-part scale table of docs/eval_scale.md: one checkpoint evaluated through
``proteus.eval.evaluate`` (plain, sliding, the n-gram cache, chunked score-first TTT and its
cache, the audit) under 1, 2 and 8 gloo processes (torchrun, one thread each); per part and
world, the targets per second (the slowest rank's seconds) and each rank's peak resident
memory during the part.

Each rank wraps the evaluator's steps (``score_tokens`` twice: plain then sliding;
``cache_report`` twice: after sliding and after TTT; ``ttt_report``; the audit): before a step
it resets the process's peak resident set (``/proc/self/clear_refs``, Linux), after it reads
``VmHWM`` and the wall seconds. A rank's peak during a step includes what it already held
(the model, the tokens, earlier scores): it is what that rank needs to run the step.

usage: python tools/scale_table.py CKPT [--tokens 16384] [--worlds 1,2,8] [--stride 64]
       [--ttt-chunk 2048] [--val-files GLOB] [--json OUT] [--plot PNG]"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("plain", "sliding", "cache", "ttt", "ttt + cache", "audit")


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(ckpt: str, out: str, tokens_n: int, stride: int, chunk: int, val_files: str) -> None:
    import proteus.eval.pipeline as P
    from proteus import data as D
    from proteus.checkpoint import load_model
    from proteus.dist import close_process_group, setup_dist
    from proteus.eval import evaluate, load_eval_tokens

    rank, world = setup_dist()
    parts: list[dict] = []

    def timed(fn, names):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _reset_peak()
            t0 = time.perf_counter()
            r = fn(*args, **kwargs)
            parts.append(dict(part=names[min(len([p for p in parts if p["part"] in names]),
                                             len(names) - 1)],
                              seconds=time.perf_counter() - t0, peak_mib=_peak_mib()))
            return r
        return wrapper

    P.score_tokens = timed(P.score_tokens, ("plain", "sliding"))
    P.cache_report = timed(P.cache_report, ("cache", "ttt + cache"))
    P.ttt_report = timed(P.ttt_report, ("ttt",))
    P._audit = timed(P._audit, ("audit",))
    model, cfg, _ = load_model(ckpt, "ref")
    ec = dataclasses.replace(cfg.eval, val_tokens=tokens_n, stride=stride, cache="ngram",
                             ngram_backend="numpy", ttt=True, ttt_chunk=chunk, audit="cheap")
    cfg = dataclasses.replace(cfg, eval=ec)
    tokens, _ = load_eval_tokens(val_files or D.bundled_val_glob(cfg.model.vocab_size), ec,
                                 cfg.model.vocab_size)
    r = evaluate(model, tokens, cfg)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, world=world, targets=r.plain["tokens"], parts=parts,
                       audit_passed=r.audit_passed), f)
    close_process_group()


def run(ckpt: str, world: int, tokens_n: int, stride: int, chunk: int, val_files: str) -> list:
    out = tempfile.mkdtemp(prefix="scale-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", os.path.abspath(__file__), "--worker", out, ckpt,
           "--tokens", str(tokens_n), "--stride", str(stride), "--ttt-chunk", str(chunk),
           "--val-files", val_files]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(world)]


def rows(results: dict[int, list]) -> list[dict]:
    """Per part and world: targets/s over the slowest rank's seconds, each rank's peak."""
    out = []
    for part in PARTS:
        for world, ranks in results.items():
            got = [next(p for p in rk["parts"] if p["part"] == part) for rk in ranks
                   if any(p["part"] == part for p in rk["parts"])]
            if not got:
                continue
            secs = max(p["seconds"] for p in got)
            out.append(dict(part=part, world=world, seconds=secs,
                            targets_per_s=ranks[0]["targets"] / secs,
                            peak_mib=[round(p["peak_mib"], 1) for p in got],
                            ranks_running=len(got)))
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| part | processes | seconds (slowest rank) | targets/s | peak RSS per rank "
             "(MiB, rank 0 first) |", "|---|---|---|---|---|"]
    for r in table:
        peaks = ", ".join(f"{p:.0f}" for p in r["peak_mib"])
        lines.append(f"| {r['part']} | {r['world']} | {r['seconds']:.1f} | "
                     f"{r['targets_per_s']:,.0f} | {peaks} |")
    return "\n".join(lines)


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for part in PARTS:
        pts = [r for r in table if r["part"] == part]
        if pts:
            w = [r["world"] for r in pts]
            a.plot(w, [r["targets_per_s"] for r in pts], "o-", label=part)
            b.plot(w, [max(r["peak_mib"]) for r in pts], "o-", label=part)
    for ax, name in ((a, "targets/s (slowest rank)"), (b, "peak RSS of the largest rank (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("gloo processes (2 CPU cores)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--worlds", default="1,2,8")
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--ttt-chunk", type=int, default=2048)
    p.add_argument("--val-files", default="")
    p.add_argument("--json", default="")
    p.add_argument("--plot", default="")
    p.add_argument("--worker", default="")
    a = p.parse_args()
    if a.worker:
        return worker(a.ckpt, a.worker, a.tokens, a.stride, a.ttt_chunk, a.val_files)
    results = {}
    for w in map(int, a.worlds.split(",")):
        t0 = time.perf_counter()
        results[w] = run(a.ckpt, w, a.tokens, a.stride, a.ttt_chunk, a.val_files)
        print(f"world {w}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    table = rows(results)
    print(markdown(table))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), rows=table, raw=results), f, indent=1)
    if a.plot:
        plot(table, a.plot)


if __name__ == "__main__":
    main()
