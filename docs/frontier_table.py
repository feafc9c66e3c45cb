"""The table of docs/frontier_eval.md: every evaluation method on the report range of a model.

    nice -n 5 python docs/frontier_table.py /work/models/tiny3k/model.ckpt \\
        /work/models/tiny3k-sp8192/model.ckpt --out docs/frontier_eval_table.json

For each checkpoint, ``proteus eval --like-run`` (the run's own evaluation: its validation
tokens, window, stride and TTT settings, so the untouched report range of its preset), with
``--json`` for the numbers at full precision, three times:

* ``--cache ngram+tilt``: plain, sliding, the tilt over the sliding scores, the cache over the
  tilted scores;
* ``--cache ngram``: the cache alone over the sliding scores;
* ``--cache ngram --ttt --stride 0``: chunked score-first TTT, and the cache over its scores;

and, when ``proteus eval`` has phased TTT (``--ttt-phases``), phased TTT with the cache; else
those rows say "pending". A method's seconds are those of the passes it needs (the sliding
pass, plus the tilt's hints and closed form, plus the cache's blend), from the same run; each
run's whole seconds (with its audit) are in the JSON. At a vocabulary of 8192 the cache runs
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
    "phased": ["--cache", "ngram", "--ttt", "--stride", "0", "--ttt-phases", "3"],
}


def _proteus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proteus", *args], capture_output=True,
                          text=True)


def _vocab(ckpt: str) -> int:
    cfg = json.load(open(os.path.join(os.path.dirname(ckpt), "config.json")))
    return int(cfg["model"]["vocab_size"])


def run_model(ckpt: str, tmp: str, phased: bool) -> dict:
    extra = ["--ngram-order", "4"] if _vocab(ckpt) > 1024 else []
    out = {}
    for name, args in RUNS.items():
        if name == "phased" and not phased:
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


def rows(res: dict) -> list[tuple[str, float | None, float | None]]:
    """(method, bpb, eval seconds) from one model's runs."""
    a, b, c = res["tilt"], res["cache"], res["ttt"]
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
           ("chunked TTT", c["ttt"]["bpb"], c["ttt"]["seconds"]),
           ("chunked TTT + n-gram cache", c["ttt"]["cache"]["bpb_cache"],
            c["ttt"]["seconds"] + c["ttt"]["cache"]["seconds"])]
    p = res.get("phased")
    if p is None:
        out += [("phased TTT", None, None), ("phased TTT + n-gram cache", None, None)]
    else:
        out += [("phased TTT", p["ttt"]["bpb"], p["ttt"]["seconds"]),
                ("phased TTT + n-gram cache", p["ttt"]["cache"]["bpb_cache"],
                 p["ttt"]["seconds"] + p["ttt"]["cache"]["seconds"])]
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
    ap.add_argument("--table", default="", help="render the table of a --out file, run nothing")
    args = ap.parse_args()
    if args.table:
        print(table(json.load(open(args.table))))
        return 0
    phased = "--ttt-phases" in _proteus("eval", "--help").stdout
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.checkpoints:
            print(f"{ckpt} ...", file=sys.stderr)
            sub = os.path.join(tmp, str(len(results)))
            os.makedirs(sub)
            results[ckpt] = run_model(ckpt, sub, phased)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
