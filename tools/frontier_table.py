"""The table of docs/frontier_eval.md: every evaluation method on the report range of a model.

    nice -n 5 python tools/frontier_table.py /work/models/tiny3k/model.ckpt \\
        /work/models/tiny3k-sp8192/model.ckpt --out docs/frontier_eval_table.json

(or one checkpoint per run, each with its own ``--out``, and ``--table A.json B.json`` to
print them side by side).

For each checkpoint, ``proteus eval --like-run`` (the run's own evaluation: its validation
tokens, window, stride and TTT settings, so the untouched report range of its preset), with
``--json`` for the numbers at full precision, three times:

* ``--cache ngram+tilt``: plain, sliding, the tilt over the sliding scores, the cache over the
  tilted scores;
* ``--cache ngram``: the cache alone over the sliding scores;
* ``--cache ngram --ttt --stride 0``: chunked score-first TTT, and the cache over its scores;

and, when ``proteus eval`` has phased TTT (``--ttt-mode phased``, its default options), phased
TTT with the cache; else those rows say "pending". ``--runs phased --add FILE`` adds the phased
runs to an earlier ``--out`` file (what a later merge of phased TTT needs, nothing rerun). A
method's seconds are those of the passes it needs (the sliding pass, plus the tilt's hints and
closed form, plus the cache's blend), from the same run; each run's whole seconds (with its
audit) are in the JSON. At a vocabulary of 8192 the cache runs
at order 4, the highest its keys hold (proteus/kernels/_keys.py). Prints the markdown table;
writes every run's JSON into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RUNS = {
    "tilt": ["--cache", "ngram+tilt"],
    "cache": ["--cache", "ngram"],
    "ttt": ["--cache", "ngram", "--ttt", "--stride", "0"],
    "phased": ["--cache", "ngram", "--ttt", "--ttt-mode", "phased", "--stride", "0"],
}


def _proteus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proteus", *args], capture_output=True,
                          text=True)


def _vocab(ckpt: str) -> int:
    cfg = json.load(open(os.path.join(os.path.dirname(ckpt), "config.json")))
    return int(cfg["model"]["vocab_size"])


def run_model(ckpt: str, tmp: str, phased: bool, runs: list[str]) -> dict:
    extra = ["--ngram-order", "4"] if _vocab(ckpt) > 1024 else []
    out = {}
    for name, args in RUNS.items():
        if (name == "phased" and not phased) or name not in runs:
            continue
        path = os.path.join(tmp, f"{name}.json")
        t0 = time.perf_counter()
        r = _proteus("eval", ckpt, "--like-run", *args, *extra, "--json", path)
        if r.returncode != 0:
            raise SystemExit(f"proteus eval {ckpt} {' '.join(args)} failed:\n{r.stderr[-3000:]}")
        out[name] = json.load(open(path))
        out[name]["wall_seconds"] = time.perf_counter() - t0
        print(f"  {name}: {out[name]['wall_seconds']:.0f} s", file=sys.stderr)
    return out


def _ttt_seconds(t: dict) -> float:
    """Seconds of a TTT pass: scoring plus training (its record's own split)."""
    return t["seconds"] if "seconds" in t else t["score_seconds"] + t["train_seconds"]


def rows(res: dict) -> list[tuple[str, float | None, float | None]]:
    """(method, bpb, eval seconds) from one model's runs."""
    a, b, c = res["tilt"], res["cache"], res.get("ttt")
    last = a.get("val_sliding") or a["val"]  # the pass the caches blend over
    slide = last["seconds"]
    out = [("plain", a["val"]["bpb"], a["val"]["seconds"]),
           (f"sliding (stride {last['stride']})", last["bpb"], slide),
           ("n-gram cache", b["cache"]["bpb_cache"],
            (b.get("val_sliding") or b["val"])["seconds"] + b["cache"]["seconds"]),
           (f"tilt (beta {a['tilt']['beta']})", a["tilt"]["bpb_tilt"],
            slide + a["tilt"]["seconds"]),
           ("n-gram + tilt", a["cache"]["bpb_cache"],
            slide + a["tilt"]["seconds"] + a["cache"]["seconds"]),
           ]
    if c is None:  # not run (--runs without ttt)
        out += [("chunked TTT", None, None), ("chunked TTT + n-gram cache", None, None)]
    else:
        out += [("chunked TTT", c["ttt"]["bpb"], _ttt_seconds(c["ttt"])),
                ("chunked TTT + n-gram cache", c["ttt"]["cache"]["bpb_cache"],
                 _ttt_seconds(c["ttt"]) + c["ttt"]["cache"]["seconds"])]
    p = res.get("phased")
    if p is None:
        out += [("phased TTT", None, None), ("phased TTT + n-gram cache", None, None)]
    else:
        out += [("phased TTT", p["ttt"]["bpb"], _ttt_seconds(p["ttt"])),
                ("phased TTT + n-gram cache", p["ttt"]["cache"]["bpb_cache"],
                 _ttt_seconds(p["ttt"]) + p["ttt"]["cache"]["seconds"])]
    return out


def table(results: dict[str, dict]) -> str:
    names = list(results)
    head = "| method | " + " | ".join(f"{os.path.basename(os.path.dirname(n))} bpb | s"
                                       for n in names) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(names)]
    per = [rows(results[n]) for n in names]
    for i, (label, _, _) in enumerate(per[0]):
        cells = []
        for r in per:
            bpb, sec = r[i][1], r[i][2]
            cells += ["pending", ""] if bpb is None else [f"{bpb:.4f}", f"{sec:.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--out", default="", help="JSON file for every run's numbers")
    ap.add_argument("--table", nargs="+", default=[], help="render the table of --out files "
                    "(one or more, side by side), run nothing")
    ap.add_argument("--runs", default=",".join(RUNS), help="which runs (default: all)")
    ap.add_argument("--add", default="", help="a --out file whose runs these join")
    args = ap.parse_args()
    if args.table:
        merged = {}
        for f in args.table:
            merged.update(json.load(open(f)))
        print(table(merged))
        return 0
    phased = "--ttt-mode" in _proteus("eval", "--help").stdout
    runs = [r for r in args.runs.split(",") if r]
    if not set(runs) <= set(RUNS):
        raise SystemExit(f"--runs: choose from {','.join(RUNS)}")
    results = json.load(open(args.add)) if args.add else {}
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.checkpoints:
            print(f"{ckpt} ...", file=sys.stderr)
            sub = os.path.join(tmp, os.path.basename(os.path.dirname(ckpt)))
            os.makedirs(sub)
            results.setdefault(ckpt, {}).update(run_model(ckpt, sub, phased, runs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
