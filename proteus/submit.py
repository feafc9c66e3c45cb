"""Submission-ready results: several seeds summarised, and a records folder that passes the rules.

A claim in the challenge is a folder (``records/track_10min_16mb/<date>_<name>/``): a README with
the results and how to reproduce them, ``submission.json``, one training log per seed, and the
code (``train_gpt.py``: here the packed, self-extracting script of ``proteus.pack``). The rules
checked before a folder is written, each failure one line naming the seed and the number:

* artifact + code <= 16,000,000 bytes (decimal), per seed, with the packed script as the code;
* training wall time <= 600 s and evaluation wall time <= 600 s, as the run logged them (the
  hardware named in the log is reported next to them: the limits are for 8xH100);
* the n-gram cache audit passed, where the cache was used;
* the evaluation stride is stated, and the overlap check is there: the bpb at the sliding
  stride next to the bpb at stride = sequence length (non-overlapping windows), over the same
  targets, as the record this project grew from checked it.

The score of a seed is the best legal number the run measured on its own artifact
(:func:`seed_score`); the summary gives each seed, the mean, the sample standard deviation, and
a one-sided Welch t-test against a baseline (numbers, or earlier run directories).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from proteus.artifact import ARTIFACT_LIMIT
from proteus.errors import ConfigError
from proteus.files import atomic_write_json
from proteus.pack import pack
from proteus.stats import mean, stdev, welch_one_sided

TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0
RECORD_MARGIN_NATS = 0.005  # the challenge's bar for a new record (at p < 0.01)
# fields of a run's config that may differ between the seeds of one submission
PER_RUN_FIELDS = {("train", "seed"), ("train", "run_name"), ("train", "out_dir")}


class SubmitError(ConfigError):
    """Runs that cannot make one submission (incomplete, mixed configurations, bad baseline)."""


@dataclass
class SeedRun:
    path: Path
    config: dict
    summary: dict

    @property
    def seed(self) -> int:
        return int(self.config["train"]["seed"])


def load_run(path: str | Path) -> SeedRun:
    """A finished run directory (config.json, summary.json, the artifact), or one line why not."""
    path = Path(path)
    missing = [n for n in ("config.json", "summary.json") if not (path / n).is_file()]
    if missing:
        raise SubmitError(f"run directory {path} is incomplete: no {', '.join(missing)} "
                          "(only a finished `proteus train` run can be submitted)")
    try:
        config = json.loads((path / "config.json").read_text())
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise SubmitError(f"run directory {path}: unreadable config/summary ({e})") from None
    art = summary.get("artifact") or {}
    if not art.get("path") or "total_bytes" not in art:
        raise SubmitError(f"run directory {path} has no artifact in its summary (was it run "
                          "with an output directory?)")
    return SeedRun(path, config, summary)


def _strip_per_run(config: dict) -> dict:
    return {s: {k: v for k, v in fields.items() if (s, k) not in PER_RUN_FIELDS}
            for s, fields in config.items()}


def check_same_config(runs: list[SeedRun]) -> None:
    """All runs must be one configuration (seed, name and output folder aside)."""
    if not runs:
        raise SubmitError("no run directories given")
    first = _strip_per_run(runs[0].config)
    for r in runs[1:]:
        other = _strip_per_run(r.config)
        diff = sorted(f"{s}.{k}" for s in set(first) | set(other)
                      for k in set(first.get(s, {})) | set(other.get(s, {}))
                      if first.get(s, {}).get(k) != other.get(s, {}).get(k))
        if diff:
            raise SubmitError(f"runs {runs[0].path} and {r.path} have different configurations "
                              f"({', '.join(diff[:5])}); one submission is one configuration")
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SubmitError(f"the runs repeat a seed ({seeds}); each run must be its own seed")


def seed_score(summary: dict) -> tuple[float, str]:
    """(bpb, what it is): the lowest legal number the run measured on its int6 artifact."""
    art = summary.get("artifact") or {}
    options = [(v, k) for k, v in (art.get("scores") or {}).items() if isinstance(v, float)]
    if "quantized_bpb" in art:
        options.append((art["quantized_bpb"], "int6 plain"))
    if not options:
        raise SubmitError("the run's summary holds no score of its artifact")
    return min(options)


def numbers(r: SeedRun) -> dict:
    """Everything the folder reports for one seed."""
    s = r.summary
    art = s["artifact"]
    bpb, kind = seed_score(s)
    val = s.get("val") or {}
    return dict(
        seed=r.seed, score=bpb, score_kind=kind, bpb_plain=val.get("bpb"),
        bpb_sliding=(s.get("val_sliding") or {}).get("bpb"),
        stride=(s.get("val_sliding") or {}).get("stride"),
        bpb_cache=(s.get("cache") or {}).get("bpb_cache"),
        bpb_ttt=(s.get("ttt") or {}).get("bpb"),
        audit=(s.get("cache") or {}).get("audit_passed"),
        artifact_bytes=art.get("artifact_bytes"), steps=s.get("steps"),
        train_seconds=s.get("train_seconds"), eval_seconds=s.get("eval_seconds"),
        hardware=s.get("hardware", "unknown"), tokens_per_byte=_tokens_per_byte(val),
        loss=val.get("loss"))


def _tokens_per_byte(val: dict) -> float | None:
    return val["tokens"] / val["bytes"] if val.get("tokens") and val.get("bytes") else None


def rule_failures(runs: list[SeedRun], code_bytes: int) -> list[str]:
    """One line per broken rule, naming the seed and the number."""
    out = []
    for r in runs:
        n = numbers(r)
        tag = f"seed {n['seed']}"
        total = n["artifact_bytes"] + code_bytes
        if total > ARTIFACT_LIMIT:
            out.append(f"{tag}: artifact {n['artifact_bytes']:,} + code {code_bytes:,} = "
                       f"{total:,} bytes > {ARTIFACT_LIMIT:,}")
        for what, secs, limit in (("training", n["train_seconds"], TRAIN_LIMIT_S),
                                  ("evaluation", n["eval_seconds"], EVAL_LIMIT_S)):
            if secs is None:
                out.append(f"{tag}: the log has no {what} wall time")
            elif secs > limit:
                out.append(f"{tag}: {what} took {secs:.1f} s > {limit:.0f} s "
                           f"(on {n['hardware']})")
        if n["bpb_cache"] is not None and n["audit"] is not True:
            out.append(f"{tag}: the n-gram cache was used but its audit did not pass")
        if n["bpb_sliding"] is None or not n["stride"]:
            out.append(f"{tag}: no sliding-window evaluation (stride) in the log: the overlap "
                       "check needs the bpb at the stride next to the bpb at stride = seq len")
        elif n["bpb_plain"] is None:
            out.append(f"{tag}: no evaluation at stride = sequence length for the overlap check")
    return out


def baseline_values(spec: list[str]) -> list[float]:
    """A baseline: numbers (``1.2244,1.2250``) and/or earlier run directories."""
    values: list[float] = []
    for item in spec:
        for part in (p for p in item.split(",") if p.strip()):
            p = Path(part.strip())
            if p.is_dir():
                values.append(seed_score(load_run(p).summary)[0])
                continue
            try:
                values.append(float(part))
            except ValueError:
                raise SubmitError(f"baseline {part!r} is neither a number nor a run "
                                  "directory") from None
    if len(values) < 2:
        raise SubmitError(f"a baseline needs at least 2 values for the t-test, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise SubmitError(f"baseline values must be finite, got {values}")
    return values


def summarize(runs: list[SeedRun], baseline: list[float] | None = None) -> dict:
    """Per seed, mean, spread and (with a baseline) the one-sided Welch tests."""
    rows = [numbers(r) for r in runs]
    scores = [r["score"] for r in rows]
    out = dict(seeds=rows, mean=mean(scores), std=stdev(scores), n=len(scores))
    for key in ("bpb_plain", "bpb_sliding", "bpb_cache", "bpb_ttt"):
        vals = [r[key] for r in rows if r[key] is not None]
        if len(vals) == len(rows):
            out[f"mean_{key}"] = mean(vals)
            out[f"std_{key}"] = stdev(vals)
    if baseline is not None:
        tpb = [r["tokens_per_byte"] for r in rows if r["tokens_per_byte"]]
        # 0.005 nats per token in bits per byte: / ln 2, x tokens per byte
        margin = RECORD_MARGIN_NATS / math.log(2) * mean(tpb) if tpb else None
        out["baseline"] = dict(values=baseline, mean=mean(baseline), std=stdev(baseline))
        if len(scores) >= 2:
            w = welch_one_sided(scores, baseline)
            out["welch"] = dict(t=w.t, df=w.df, p=w.p)
            if margin is not None:
                wm = welch_one_sided(scores, baseline, margin)
                out["welch_record"] = dict(t=wm.t, df=wm.df, p=wm.p, margin_bpb=margin)
    return out


def format_summary(s: dict) -> str:
    lines = ["| seed | score (bpb) | what | plain | sliding | cache | train s | eval s |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda x, d=4: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
    for r in s["seeds"]:
        lines.append(f"| {r['seed']} | {f(r['score'])} | {r['score_kind']} | "
                     f"{f(r['bpb_plain'])} | {f(r['bpb_sliding'])} | {f(r['bpb_cache'])} | "
                     f"{f(r['train_seconds'], 1)} | {f(r['eval_seconds'], 1)} |")
    lines.append(f"\nmean {s['mean']:.4f} bpb, standard deviation {s['std']:.4f} over "
                 f"{s['n']} seed(s)")
    if "welch" in s:
        b = s["baseline"]
        lines.append(f"baseline mean {b['mean']:.4f} (sd {b['std']:.4f}, n={len(b['values'])}): "
                     f"one-sided Welch t = {s['welch']['t']:.3f}, df = {s['welch']['df']:.1f}, "
                     f"p = {s['welch']['p']:.3g} for mean < baseline")
        if "welch_record" in s:
            w = s["welch_record"]
            lines.append(f"  record bar (0.005 nats = {w['margin_bpb']:.4f} bpb): p = {w['p']:.3g}"
                         f" -> {'met' if w['p'] < 0.01 else 'not met'} at p < 0.01")
    return "\n".join(lines)


def write_records(runs: list[SeedRun], out: Path, *, name: str, author: str, github_id: str,
                  blurb: str, baseline: list[float] | None = None) -> tuple[Path, list[str]]:
    """Validate the runs and write the folder; returns (folder, rule failures). With any
    failure nothing is written."""
    check_same_config(runs)
    script = pack()
    code_bytes = len(script.encode())
    failures = rule_failures(runs, code_bytes)
    if failures:
        return out, failures
    s = summarize(runs, baseline)
    out.mkdir(parents=True, exist_ok=False)
    (out / "train_gpt.py").write_text(script)
    for r in runs:
        log = r.path / "train.log"
        if log.is_file():
            shutil.copyfile(log, out / f"train_seed{r.seed}.log")
        shutil.copyfile(r.path / "log.jsonl", out / f"train_seed{r.seed}.jsonl")
    best = min(s["seeds"], key=lambda x: x["score"])
    sub = dict(author=author, github_id=github_id, name=name, blurb=blurb,
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               val_loss=best["loss"], val_bpb=s["mean"],
               bytes_total=max(r["artifact_bytes"] for r in s["seeds"]) + code_bytes,
               bytes_code=code_bytes, seeds=[r["seed"] for r in s["seeds"]],
               val_bpb_per_seed=[r["score"] for r in s["seeds"]], val_bpb_std=s["std"])
    atomic_write_json(out / "submission.json", sub)
    atomic_write_json(out / "summary.json", s)
    (out / "README.md").write_text(_readme(runs, s, sub))
    return out, []


def _readme(runs: list[SeedRun], s: dict, sub: dict) -> str:
    cfg = runs[0].config
    seeds = ",".join(str(r.seed) for r in runs)
    return f"""# {sub['name']}

{sub['blurb']}

## Results

{format_summary(s)}

Code: `train_gpt.py` ({sub['bytes_code']:,} bytes, the packed PROTEUS modules; run it like
`proteus`). Largest artifact + code: {sub['bytes_total']:,} of {ARTIFACT_LIMIT:,} bytes.
Evaluation stride {s['seeds'][0]['stride']}; the overlap check puts the bpb at that stride
next to the bpb at stride = sequence length (plain) for every seed above.

## Reproduce

```bash
python train_gpt.py train --preset {cfg['train']['preset']} --seeds {seeds} \\
  --tokenizer PATH/fineweb_1024_bpe.model --train-files 'PATH/fineweb_train_*.bin' \\
  --val-files 'PATH/fineweb_val_*.bin'
```

(the other options as in each log's first record). Logs: `train_seed<N>.log` and
`train_seed<N>.jsonl` per seed.
"""
