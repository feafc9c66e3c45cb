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

Nothing a run directory claims is taken on trust where it can be recomputed (docs/hardening.md):

* ``summary.json`` and ``config.json`` are sealed (``proteus.files.seal_json``); the summary's
  seal binds it to the SHA-256 and size of ``model.int6`` and to the config the run evaluated
  with, so an edited summary, or one next to another artifact, is refused;
* the artifact's bytes are counted from the file, and its config is read from its own header;
* every score in the folder is recomputed here from ``model.int6`` (:func:`rescore`: plain,
  sliding window, n-gram cache with its audit, score-first TTT, as the config asks), and a
  claimed score further than ``tolerance`` from it is refused: the folder never holds a
  claimed number, only a recomputed one. What cannot be recomputed (wall times, hardware,
  steps) is held by the seal;
* files are read bounded and never through a symbolic link; a run's files are its own.

The score of a seed is the best legal number measured on its artifact (:func:`seed_score`); the
summary gives each seed, the mean, the sample standard deviation, and a one-sided Welch t-test
against a baseline (numbers, or earlier run directories, rescored the same way).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from proteus import data as D
from proteus.artifact import ARTIFACT_LIMIT, artifact_meta
from proteus.checkpoint import load_model
from proteus.config import RunConfig
from proteus.device import use_autocast
from proteus.errors import ConfigError
from proteus.eval import evaluate, load_eval_tokens, make_plan
from proteus.files import (
    InputError,
    atomic_write,
    atomic_write_json,
    json_digest,
    read_bounded,
    read_sealed_json,
)
from proteus.pack import pack
from proteus.run import (
    ARTIFACT_NAME,
    MAX_ARTIFACT_READ,
    SUMMARY_NAME,
    SUMMARY_SEAL,
    TRAIN_LOG,
    read_run_config,
)
from proteus.stats import mean, stdev, welch_one_sided

TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0
RECORD_MARGIN_NATS = 0.005  # the challenge's bar for a new record (at p < 0.01)
TOLERANCE_BPB = 1e-4  # claimed vs recomputed score: the same artifact on another device/threads
MAX_LOG_BYTES = 256 << 20
# fields of a run's config that may differ between the seeds of one submission
PER_RUN_FIELDS = {("train", "seed"), ("train", "run_name"), ("train", "out_dir")}


class SubmitError(ConfigError):
    """Runs that cannot make one submission (incomplete, forged or damaged, mixed
    configurations, bad baseline)."""


@dataclass
class SeedRun:
    """A finished run directory: its config (from the artifact's own header), its sealed
    summary (types checked), the artifact's size and SHA-256 counted from the file, and the
    scores :func:`rescore` recomputed (None until then)."""

    path: Path
    config: dict
    summary: dict
    artifact_bytes: int
    artifact_sha256: str = ""
    scores: dict | None = field(default=None)

    @property
    def seed(self) -> int:
        return int(self.config["train"]["seed"])


_NUM = (int, float)
# summary.json fields submit reads: (path, allowed types, required)
SUMMARY_FIELDS = [
    (("steps",), (int,), False), (("train_seconds",), _NUM + (type(None),), False),
    (("eval_seconds",), _NUM + (type(None),), False), (("hardware",), (str,), False),
    (("val",), (dict,), True), (("val", "bpb"), _NUM, True), (("val", "loss"), _NUM, True),
    (("val", "tokens"), (int,), True), (("val", "bytes"), (int,), True),
    (("val_sliding",), (dict,), False), (("val_sliding", "bpb"), _NUM, False),
    (("val_sliding", "stride"), (int,), False),
    (("cache",), (dict,), False), (("cache", "bpb_cache"), _NUM, False),
    (("cache", "audit_passed"), (bool, type(None)), False),
    (("ttt",), (dict,), False), (("ttt", "bpb"), _NUM, False),
    (("artifact",), (dict,), True), (("artifact", "quantized_bpb"), _NUM, True),
    (("artifact", "scores"), (dict,), True),
]


def check_summary_types(summary: dict, where: str) -> None:
    """Every field submit reads has its type (a bool is not a number), or one line naming it."""
    for keys, kinds, required in SUMMARY_FIELDS:
        node, ok = summary, True
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                ok = False
                break
            node = node[k]
        if not ok:
            if required:
                raise SubmitError(f"{where}: field {'.'.join(keys)} is missing")
            continue
        if not isinstance(node, kinds) or (isinstance(node, bool) and bool not in kinds):
            want = "/".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise SubmitError(f"{where}: field {'.'.join(keys)} must be {want}, got "
                              f"{str(node)[:40]!r}")
        if isinstance(node, float) and not math.isfinite(node):
            raise SubmitError(f"{where}: field {'.'.join(keys)} is {node}, not a finite number")
    for k, v in summary["artifact"]["scores"].items():
        if not isinstance(v, _NUM) or isinstance(v, bool) or not math.isfinite(v):
            raise SubmitError(f"{where}: score {str(k)[:40]!r} must be a finite number, got "
                              f"{str(v)[:40]!r}")


def load_run(path: str | Path) -> SeedRun:
    """A finished run directory, every file checked (sealed, bound together, bounded reads, no
    symbolic links), or one line why not. Scores are not recomputed here: :func:`rescore`."""
    path = Path(path)
    names = ("config.json", SUMMARY_NAME, ARTIFACT_NAME)
    missing = [n for n in names if not os.path.lexists(path / n)]
    if missing:
        raise SubmitError(f"run directory {path} is incomplete: no {', '.join(missing)} "
                          "(only a finished `proteus train` run can be submitted)")
    try:
        run_cfg = read_run_config(path)
        summary, binds = read_sealed_json(path / SUMMARY_NAME, SUMMARY_SEAL, "run summary")
        raw = read_bounded(path / ARTIFACT_NAME, "artifact", MAX_ARTIFACT_READ, follow=False)
    except (InputError, ConfigError) as e:
        raise SubmitError(f"run directory {path}: {e}") from None
    check_summary_types(summary, f"run summary {path / SUMMARY_NAME}")
    digest = hashlib.sha256(raw).hexdigest()
    if binds.get("artifact_sha256") != digest or binds.get("artifact_bytes") != len(raw):
        raise SubmitError(f"run directory {path}: {ARTIFACT_NAME} is not the artifact its "
                          f"{SUMMARY_NAME} was sealed with (SHA-256 or size differ); refused")
    cfg = RunConfig.from_dict(artifact_meta(str(path / ARTIFACT_NAME), raw).get("run_config"),
                              where=f"artifact {path / ARTIFACT_NAME}")
    if binds.get("config_sha256") != json_digest(cfg.to_dict()):
        raise SubmitError(f"run directory {path}: {SUMMARY_NAME} was sealed for another "
                          f"config than the one in {ARTIFACT_NAME}; refused")
    if cfg.model != run_cfg.model or cfg.train.seed != run_cfg.train.seed:
        raise SubmitError(f"run directory {path}: {ARTIFACT_NAME} holds another model or seed "
                          "than its config.json; refused")
    return SeedRun(path, cfg.to_dict(), summary, len(raw), digest)


def artifact_provenance(path: str | Path) -> str:
    """One line on what vouches for an artifact's header (the config and the float bpb that
    ``proteus eval`` prints): its SHA-256, and whether the sealed ``summary.json`` of its run,
    next to it, was written for exactly these bytes. The header's crc32 only detects damage;
    this ties the header to the run that wrote it."""
    path = Path(path)
    digest = hashlib.sha256(read_bounded(path, "artifact", MAX_ARTIFACT_READ)).hexdigest()
    summary = path.with_name(SUMMARY_NAME)
    try:
        _, binds = read_sealed_json(summary, SUMMARY_SEAL, "run summary")
    except InputError:
        binds = {}
    if binds.get("artifact_sha256") == digest:
        return (f"artifact SHA-256 {digest[:16]}...: the file its run's sealed {summary} was "
                "written for (its header's numbers are that run's)")
    return (f"artifact SHA-256 {digest[:16]}...: no sealed {SUMMARY_NAME} of its run vouches "
            "for it; the numbers in its header are the file's own claim, not verified")


def rescore(r: SeedRun, device: torch.device | None = None) -> dict:
    """Recompute every score of the run's artifact, as its config asks: ``int6 plain``, and
    ``int6 sliding S``, ``int6 + cache`` (with the audit), ``int6 TTT`` (``+ cache``) where the
    config has a stride, the cache, TTT (the whole plan, whatever ``artifact_eval`` the run
    used). Returns the scores and the plain evaluation's loss, tokens and bytes."""
    cfg = RunConfig.from_dict(r.config)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = "triton" if device.type == "cuda" and cfg.train.kernels == "triton" else "ref"
    model, _, _ = load_model(str(r.path / ARTIFACT_NAME), kernels)
    model = model.to(device)
    tc, vocab = cfg.train, cfg.model.vocab_size
    val, _ = load_eval_tokens(tc.val_files or D.bundled_val_glob(vocab), cfg.eval, vocab)
    lut = D.tokenizer_lut(tc.tokenizer, vocab)
    res = evaluate(model, val, make_plan(cfg), lut=lut, device=device,
                   autocast=use_autocast(tc, device))
    plain = res.plain
    return dict(scores=res.scores("int6"), loss=plain["loss"], tokens=plain["tokens"],
                bytes=plain["bytes"], stride=(res.sliding or {}).get("stride"),
                audit=res.audit_passed if res.cache is not None else None)


def verify_scores(r: SeedRun, tolerance: float = TOLERANCE_BPB,
                  device: torch.device | None = None) -> None:
    """Recompute the run's scores (:func:`rescore`) and refuse, in one line naming the seed,
    a claimed score that is not recomputed or is further than ``tolerance`` bpb from it."""
    rec = rescore(r, device)
    art = r.summary["artifact"]
    claims = [("int6 plain", art["quantized_bpb"]), *sorted(art["scores"].items())]
    for kind, claimed in claims:
        if kind not in rec["scores"]:
            raise SubmitError(f"seed {r.seed} ({r.path}): claims a score {kind!r} that its "
                              "artifact's config does not produce; refused")
        got = rec["scores"][kind]
        if not abs(claimed - got) <= tolerance:
            raise SubmitError(f"seed {r.seed} ({r.path}): claims {kind} {claimed:.6f} bpb, its "
                              f"artifact scores {got:.6f} (more than {tolerance:g} apart); "
                              "refused")
    r.scores = rec


def claimed_scores(r: SeedRun) -> SeedRun:
    """``r`` with the scores its own sealed summary claims (for the summary `proteus train
    --seeds` prints right after it computed them; a records folder always uses
    :func:`verify_scores`)."""
    art = r.summary["artifact"]
    cache = r.summary.get("cache") or {}
    r.scores = dict(scores={**art["scores"], "int6 plain": art["quantized_bpb"]},
                    loss=r.summary["val"]["loss"], tokens=r.summary["val"]["tokens"],
                    bytes=r.summary["val"]["bytes"],
                    stride=(r.summary.get("val_sliding") or {}).get("stride"),
                    audit=art.get("audit_passed", cache.get("audit_passed")))
    return r


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


def seed_score(r: SeedRun) -> tuple[float, str]:
    """(bpb, what it is): the lowest number recomputed on the seed's int6 artifact."""
    if r.scores is None:
        raise SubmitError(f"seed {r.seed}: its scores were not recomputed")
    return min((v, k) for k, v in r.scores["scores"].items())


def numbers(r: SeedRun) -> dict:
    """Everything the folder reports for one seed: scores recomputed on its artifact, sizes
    counted from its files, wall times from its sealed summary."""
    bpb, kind = seed_score(r)
    s, sc = r.summary, r.scores["scores"]
    stride = r.scores.get("stride")
    pick = lambda *keys: next((sc[k] for k in keys if k in sc), None)  # noqa: E731
    return dict(
        seed=r.seed, score=bpb, score_kind=kind, bpb_plain=sc.get("int6 plain"),
        bpb_sliding=sc.get(f"int6 sliding {stride}") if stride else None, stride=stride,
        bpb_cache=pick("int6 + cache"), bpb_ttt=pick("int6 TTT"), audit=r.scores.get("audit"),
        artifact_bytes=r.artifact_bytes, steps=s.get("steps"),
        train_seconds=s.get("train_seconds"), eval_seconds=s.get("eval_seconds"),
        hardware=s.get("hardware", "unknown"),
        tokens_per_byte=r.scores["tokens"] / r.scores["bytes"] if r.scores.get("bytes") else None,
        loss=r.scores.get("loss"))


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


def baseline_values(spec: list[str], tolerance: float = TOLERANCE_BPB) -> list[float]:
    """A baseline: numbers (``1.2244,1.2250``) and/or earlier run directories (checked and
    rescored like the submission's own)."""
    values: list[float] = []
    for item in spec:
        for part in (p for p in item.split(",") if p.strip()):
            p = Path(part.strip())
            if p.is_dir():
                r = load_run(p)
                verify_scores(r, tolerance)
                values.append(seed_score(r)[0])
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
                  blurb: str, baseline: list[float] | None = None,
                  tolerance: float = TOLERANCE_BPB) -> tuple[Path, list[str]]:
    """Check the runs (same config, every score recomputed and matching its claim) and write
    the folder; returns (folder, rule failures). With any failure nothing is written; the
    folder appears whole or not at all (written as ``.NAME.tmpPID``, then renamed)."""
    check_same_config(runs)
    logs = {}
    for r in runs:  # read before anything is written: a refused log leaves nothing behind
        for src, dest in ((TRAIN_LOG, f"train_seed{r.seed}.log"),
                          ("log.jsonl", f"train_seed{r.seed}.jsonl")):
            if src == TRAIN_LOG and not os.path.lexists(r.path / src):
                continue
            try:
                logs[dest] = read_bounded(r.path / src, "training log", MAX_LOG_BYTES,
                                          follow=False)
            except InputError as e:
                raise SubmitError(f"seed {r.seed}: {e}") from None
    for r in runs:
        if r.scores is None:
            verify_scores(r, tolerance)
    script = pack()
    code_bytes = len(script.encode())
    failures = rule_failures(runs, code_bytes)
    if failures:
        return out, failures
    s = summarize(runs, baseline)
    best = min(s["seeds"], key=lambda x: x["score"])
    sub = dict(author=author, github_id=github_id, name=name, blurb=blurb,
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               val_loss=best["loss"], val_bpb=s["mean"],
               bytes_total=max(r["artifact_bytes"] for r in s["seeds"]) + code_bytes,
               bytes_code=code_bytes, seeds=[r["seed"] for r in s["seeds"]],
               val_bpb_per_seed=[r["score"] for r in s["seeds"]], val_bpb_std=s["std"])
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise SubmitError(f"cannot create {out}: {e.strerror or e}") from None
    try:
        atomic_write(tmp / "train_gpt.py", script.encode())
        for dest, raw in logs.items():
            atomic_write(tmp / dest, raw)
        atomic_write_json(tmp / "submission.json", sub)
        atomic_write_json(tmp / "summary.json", s)
        atomic_write(tmp / "README.md", _readme(runs, s, sub).encode())
        try:
            os.rename(tmp, out)
        except OSError as e:
            raise SubmitError(f"cannot create {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out, []


def _readme(runs: list[SeedRun], s: dict, sub: dict) -> str:
    cfg = runs[0].config
    seeds = ",".join(str(r.seed) for r in runs)
    return f"""# {sub['name']}

{sub['blurb']}

## Results

{format_summary(s)}

Every score above was recomputed by `proteus submit` from each seed's `model.int6` (the int6
artifact a submission ships): plain windows, the sliding window, the n-gram cache (with its
audit) and score-first TTT as the configuration asks. Wall times are as each run logged them.

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
