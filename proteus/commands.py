"""The commands' bodies: each loads what it needs, runs the library, prints, returns an exit code.

``proteus.cli`` parses the arguments and imports this module only for the commands that need
it (see the comment in ``cli._dispatch``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from proteus import data as D
from proteus.artifact import ARTIFACT_LIMIT, inspect_artifact, write_artifact
from proteus.checkpoint import load_model, load_train_state, newest_intact_state, save_checkpoint
from proteus.config import EvalConfig, RunConfig
from proteus.data import bits_per_byte
from proteus.device import pick_device
from proteus.dist import (
    PeerError,
    close_process_group,
    collective_timeout,
    env_rank,
    setup_dist,
)
from proteus.errors import ConfigError, ProteusError, RunInterrupted
from proteus.eval import (
    EvalResult,
    check_ttt_fits,
    eval_window,
    evaluate,
    format_bpb,
    load_eval_tokens,
    make_plan,
)
from proteus.eval.cache import run_audit
from proteus.eval.fit import cache_params_dict, fit_cache_params, held_out_files
from proteus.eval.plan import CACHE_MODES, ngram_config
from proteus.eval.scoring import exact_sum, score_tokens
from proteus.eval.ttt_audit import run_ttt_audit
from proteus.files import atomic_write_json
from proteus.fingerprint import fingerprint, reference_fingerprints, refuse_overlaps
from proteus.gptq import QuantChoices, quantize_with_calibration
from proteus.model import GPT
from proteus.options import eval_overrides, resume_config
from proteus.pack import pack, source_bytes
from proteus.record_compat import load_record_state_dict
from proteus.run import (
    check_inputs,
    discard_run_dir,
    find_resume,
    open_run_dir,
    read_run_config,
    run,
)
from proteus.submit import (
    TOLERANCE_BPB,
    artifact_provenance,
    baseline_values,
    claimed_scores,
    format_summary,
    load_run,
    summarize,
    write_records,
)
from proteus.tilt import fit_tilt, longest_match_hints, tilt_logprobs
from proteus.train import StopSignal


def main_train(cfg: RunConfig, resume: tuple[Path, dict | None] | None = None,
               seeds: list[int] | None = None, baseline: list[str] | None = None) -> int:
    """``proteus train``: the run (or one run per seed), then the run directories and the budget
    verdict. ``resume``: (run directory, training state or None) of the run to continue.
    ``seeds``: run the same configuration once per seed, one after another, and summarise them
    (mean, spread, and a one-sided Welch test against ``baseline``). SIGTERM and SIGINT save a
    resumable state and end with one line saying how to continue."""
    check_inputs(cfg)
    base_values = baseline_values(baseline) if baseline else None  # bad input before any work
    base = cfg.train.run_name or f"{cfg.train.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfgs = [cfg] if not seeds else [seed_config(cfg, s, base) for s in seeds]
    device = pick_device(cfg.train)
    setup_dist(collective_timeout(cfg.train), device.type)  # the group outlives run()
    failed, done = True, []
    with StopSignal() as stop:
        try:
            for c in cfgs:
                run_dir = None
                try:
                    run_dir = open_run_dir(c, resume[0] if resume else None)
                    done.append((run_dir, run(c, run_dir, resume=resume[1] if resume else None,
                                              stop=stop)))
                except RunInterrupted as e:
                    if run_dir is None:
                        raise
                    raise RunInterrupted(f"{e}; continue with: proteus train --resume {run_dir}",
                                         e.signum) from None
                except PeerError as e:
                    if run_dir is None:
                        raise
                    raise PeerError(f"{e}; continue with: proteus train --resume "
                                    f"{run_dir}") from None
                except (ProteusError, MemoryError, RuntimeError) as e:
                    # a refused run (bad input, out of memory) leaves no directory behind
                    if run_dir is not None and not resume and env_rank() == 0 and (
                            not isinstance(e, ProteusError) or e.exit_code == 2
                            or "memory" in str(e)):
                        discard_run_dir(run_dir)
                    raise
            failed = False
        finally:
            close_process_group(failed)
    if env_rank() != 0:
        return 0
    code = 0
    for run_dir, results in done:
        print(f"run directory: {run_dir}")
        art = results.get("artifact")
        if art and not art.get("within_limit", True):
            print(f"BUDGET CHECK FAILED: {art['total_bytes']:,} bytes > {ARTIFACT_LIMIT:,}",
                  file=sys.stderr)
            code = 1
    if seeds:
        s = summarize([claimed_scores(load_run(d)) for d, _ in done], base_values)
        path = done[0][0].parent / f"{base}-seeds.json"
        atomic_write_json(path, s)
        print(format_summary(s))
        print(f"seed summary: {path}")
    return code


def seed_config(cfg: RunConfig, seed: int, base: str) -> RunConfig:
    """``cfg`` for one seed of a multi-seed run: its own seed and run directory ``base-seedS``."""
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, seed=seed, run_name=f"{base}-seed{seed}"))


def main_submit(run_dirs: list[str], out: str, name: str, author: str, github_id: str,
                blurb: str, baseline: list[str] | None,
                tolerance: float = TOLERANCE_BPB) -> int:
    """``proteus submit``: check the seeds' run directories (sealed files, the artifact they
    are bound to, every score recomputed from it) and the rules, then write the records
    folder; every broken rule is one line naming the seed and the number (exit 2)."""
    dest = Path(out)
    if os.path.lexists(dest):
        raise ConfigError(f"{dest} already exists; pass a new --out folder")
    runs = [load_run(p) for p in run_dirs]
    base = baseline_values(baseline, tolerance) if baseline else None
    folder, failures = write_records(runs, dest, name=name, author=author, github_id=github_id,
                                     blurb=blurb, baseline=base, tolerance=tolerance)
    if failures:
        for line in failures:
            print(f"proteus: rule failed: {line}", file=sys.stderr)
        return 2
    print(format_summary(summarize(runs, base)))
    print(f"records folder: {folder} (README.md, submission.json, train_gpt.py, one log per seed)")
    return 0


def main_resume(path: str, cli: dict) -> int:
    """``proteus train --resume RUN_DIR``: the run's own config (from its newest intact
    training state, else its sealed config.json), with only the options that do not change
    what is trained. A damaged newest state is skipped for the newest intact one, with a line
    saying so; a state file named explicitly is that one or nothing."""
    run_dir, state_path = find_resume(path)
    saved = read_run_config(run_dir)  # sealed: an edited config.json is refused
    if Path(path).is_file():
        state = load_train_state(state_path)
    else:
        state, skipped = newest_intact_state(run_dir)
        for line in skipped:  # the run's own "resumed from" line names the state it takes
            print(f"proteus: {line}", file=sys.stderr)
    cfg = resume_config(state["config"] if state else saved, cli, where=f"run {run_dir}")
    return main_train(cfg, resume=(run_dir, state))


def main_eval(path: str, cli: dict, like_run: bool = False, json_path: str | None = None
              ) -> int:
    """``proteus eval``: plain bpb, and the sliding window, the n-gram cache and TTT as the
    options ask (``like_run``: as the run that made ``path`` evaluated it), then the audit;
    ``json_path``: every number, at full precision, in a JSON file."""
    rank, world = setup_dist()
    failed = True
    try:
        code = _eval(path, cli, rank, world, like_run, json_path)
        failed = False
    finally:
        close_process_group(failed)
    return code


def eval_config(cfg: RunConfig, cli: dict, like_run: bool, default_audit: str = "") -> RunConfig:
    """``cfg`` (a checkpoint's or an artifact's) with the evaluation an evaluation command runs:
    the options given over the defaults (``proteus eval --help``'s), or with ``like_run`` over
    the run's own saved evaluation config (its stride, cache, TTT, validation tokens...).
    ``default_audit``: the audit level when none is given (``proteus audit``: full)."""
    base = cfg.eval if like_run else EvalConfig()
    if default_audit and "eval.audit" not in cli:
        base = dataclasses.replace(base, audit=default_audit)
    return dataclasses.replace(cfg, eval=eval_overrides(base, cli))


def _eval(path: str, cli: dict, rank: int, world: int, like_run: bool = False,
          json_path: str | None = None) -> int:
    say = print if rank == 0 else (lambda *a, **k: None)
    model, cfg, info = load_model(path, cli.get("train.kernels"))
    cfg = eval_config(cfg, cli, like_run)
    ec = cfg.eval
    vocab = cfg.model.vocab_size
    val_files = cli.get("train.val_files") or cfg.train.val_files or D.bundled_val_glob(vocab)
    lut = D.tokenizer_lut(cfg.train.tokenizer, cfg.model.vocab_size)
    tokens, first = load_eval_tokens(val_files, ec, cfg.model.vocab_size)
    plan = make_plan(cfg)  # a bad cache parameter file fails before any work
    if ec.ttt and ec.ttt_mode == "chunked":
        check_ttt_fits(ec, tokens.numel() - 1, plan.seq, model)
    say(f"proteus eval: {path} ({info['source']}), kernels={model.ops.name}, "
        f"{tokens.numel() - 1:,} targets (validation tokens {first:,}.."
        f"{first + tokens.numel() - 1:,}), window {plan.seq}, {world} process(es)")
    if info["source"] == "artifact" and rank == 0:
        say(f"  {artifact_provenance(path)}")
    if info.get("float_bpb") is not None:
        say(f"  bpb before quantisation (recorded at training, in the file's header): "
            f"{format_bpb(info['float_bpb'])}")
    r = evaluate(model, tokens, plan, lut=lut, progress=True)
    for line in summary_lines(r, plan.seq):
        say(line)
    if json_path and rank == 0:
        atomic_write_json(json_path, dict(
            path=path, source=info["source"], world=world, first_token=first,
            eval_config=dataclasses.asdict(ec), seconds=r.seconds, **r.summary()))
        say(f"  wrote {json_path} (every number at full precision)")
    if rank == 0 and r.audit_passed is False:
        failed = ", ".join(k for k, v in r.audit["checks"].items() if not v)
        print(f"proteus: the evaluation's audit failed ({failed}): the numbers above are not "
              "to be trusted", file=sys.stderr)
        return 1
    return 0


def summary_lines(r: EvalResult, seq: int) -> list[str]:
    """The evaluation's bpb side by side, with the seconds each method takes (scoring passes)
    and adds (the cache over the scores it blends)."""
    plain = r.plain
    rows = [(f"plain (windows of {seq})", plain["bpb"], f"{plain['seconds']:.1f}")]
    if r.sliding is not None:
        rows.append((f"sliding window, stride {r.sliding['stride']}", r.sliding["bpb"],
                     f"{r.sliding['seconds']:.1f}"))
    if r.tilt is not None:
        t = r.tilt
        rows.append((f"  + n-gram tilt (beta {t['beta']})", t["bpb_tilt"],
                     f"+{t['seconds']:.1f}"))
    if r.cache is not None:
        c = r.cache
        what = "  + tilt + n-gram cache" if c.get("over") == "tilt" else "  + n-gram cache"
        rows.append((what, c["bpb_cache"], f"+{c['seconds']:.1f}"))
    if r.ttt is not None:
        t = r.ttt
        phased = t.get("mode") == "phased"
        what = (f"phased TTT ({t['docs']} documents)" if phased
                else f"score-first TTT ({t['chunks']} chunks)")
        parts = ("documents", "global phases") if phased else ("scoring", "training")
        rows.append((what, t["bpb"],
                     f"{t['score_seconds'] + t['train_seconds']:.1f} ({parts[0]} "
                     f"{t['score_seconds']:.1f} + {parts[1]} {t['train_seconds']:.1f})"))
        if "cache" in t:
            rows.append(("  + n-gram cache", t["cache"]["bpb_cache"],
                         f"+{t['cache']['seconds']:.1f}"))
    out = ["  summary:                                 bpb     seconds"]
    out += [f"    {label:<36} {format_bpb(b)}  {secs}" for label, b, secs in rows]
    a = r.audit or {}
    if a.get("level", "none") != "none":
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[a["passed"]]
        out.append(f"    {'audit (' + a['level'] + ')':<36} {verdict:<6}  +{a['seconds']:.1f}")
    else:
        out.append("    audit                                skipped (--no-audit)")
    return out


def main_audit(path: str, cli: dict, like_run: bool = False) -> int:
    """``proteus audit``: our cache must pass, the record's hashed cache must be flagged; with
    ``--ttt`` also the score-first TTT audit (over the cache too when it is on). The
    evaluation config is ``proteus eval``'s (``like_run``: the run's), the level full."""
    model, cfg, _ = load_model(path, None)
    cfg = eval_config(cfg, cli, like_run, default_audit="full")
    if cfg.eval.audit == "none":
        raise ConfigError("proteus audit with --no-audit (audit none) audits nothing: drop it")
    ec = cfg.eval
    plan = make_plan(cfg)
    vocab = cfg.model.vocab_size
    ngram_config(ec, vocab)  # the cache it audits must fit the vocabulary's keys
    tokens, first = load_eval_tokens(cfg.train.val_files or D.bundled_val_glob(vocab), ec, vocab)
    if tokens.numel() < 4:
        raise D.DataError(f"the audit needs at least 4 validation tokens, got {tokens.numel()}")
    print(f"proteus audit: {path}, validation tokens {first:,}..{first + tokens.numel():,}")
    ok = run_audit(model, plan, tokens, hashed=True, chunks=(ec.ttt_chunk,) if ec.ttt else ())
    if ec.ttt:
        lut = D.tokenizer_lut(cfg.train.tokenizer, cfg.model.vocab_size)
        ok = run_ttt_audit(model, plan, tokens, lut) and ok
    return 0 if ok else 1


def main_tune_cache(path: str, cli: dict, tune_files: str = "", tune_tokens: int = 0,
                    out: str = "", iterations: int = 200) -> int:
    """``proteus tune-cache``: fit the cache's parameters on training tokens the checkpoint
    never trained on; write them (with what they were fitted on) as JSON."""
    model, cfg, _ = load_model(path, None)
    ec = eval_overrides(cfg.eval, cli)
    files = held_out_files(cfg, tune_files)
    refs = reference_fingerprints(cfg.train.train_files, cfg.train.val_files)
    overlaps = refuse_overlaps(files, refs, "cache parameters are fitted on held-out training "
                               "tokens only")
    tokens = _load_files(files, tune_tokens)
    lut = D.tokenizer_lut(cfg.train.tokenizer, cfg.model.vocab_size)
    seq = eval_window(dataclasses.replace(cfg, eval=ec))
    start = ngram_config(ec, cfg.model.vocab_size)
    print(f"proteus tune-cache: {path}, {tokens.numel() - 1:,} held-out training targets from "
          f"{', '.join(os.path.basename(f) for f in files)}, window {seq}, stride {ec.stride}")
    tilt = CACHE_MODES[ec.cache][1]  # the tilt too: its hints, scored beside the targets
    hints, orders = longest_match_hints(tokens, ec.tilt_order, 1) if tilt else (None, None)
    scores = score_tokens(model, tokens, lut, seq, ec.stride, ec.eval_batch_seqs, progress=True,
                          second=hints)
    logp, tcfg, tilt_meta = scores.logp, None, {}
    if tilt:  # β and the shortest match first; the cache's parameters over the tilted scores
        target = tokens[1:]
        tcfg, tried = fit_tilt(scores.logp, scores.logp_hint, target, hints[1:], orders[1:],
                               ec.tilt_order)
        hint = torch.where(orders[1:] >= tcfg.min_order, hints[1:], -1)
        tilted = tilt_logprobs(scores.logp, scores.logp_hint, target, hint, tcfg.beta)
        nb = int(scores.nbytes.sum())
        tilt_meta = dict(tilt_fit=dict(bpb_model=scores.bpb(),
                                       bpb_tilt=bits_per_byte(-exact_sum(tilted), nb),
                                       tried={str(m): dict(beta=b, nll=v)
                                              for m, (b, v) in tried.items()}))
        print(f"  tilt: beta {tcfg.beta}, min order {tcfg.min_order} (orders up to "
              f"{tcfg.max_order}); held-out bpb {format_bpb(scores.bpb())} -> "
              f"{format_bpb(tilt_meta['tilt_fit']['bpb_tilt'])} with the tilt")
        if ec.cache == "ngram+tilt":
            logp = tilted
    fitted, info = fit_cache_params(tokens, logp, scores.nbytes, start, iterations)
    dest = Path(out) if out else Path(path).with_name("cache_params.json")
    meta = dict(fitted_on=dict(checkpoint=path,
                               files=[os.path.basename(f) for f in files],
                               targets=info["targets"], bytes=info["bytes"], stride=ec.stride,
                               seq_len=seq, fingerprint=fingerprint(tokens).summary(),
                               refused_by_content=dict(
                                   {label: fp.summary() for label, fp in refs},
                                   overlaps={os.path.basename(f): o
                                             for f, o in overlaps.items()})),
                bpb=dict(model=info["bpb_model"], start=info["bpb_start"],
                         fitted=info["bpb_fitted"]),
                fitted_for=ec.cache, **tilt_meta)
    atomic_write_json(dest, cache_params_dict(fitted, cfg.model.vocab_size, tcfg, **meta))
    print(f"  held-out bpb: model {format_bpb(info['bpb_model'])}, with the starting parameters "
          f"{format_bpb(info['bpb_start'])}, fitted {format_bpb(info['bpb_fitted'])}")
    print(f"  weight {fitted.weight}, k {list(fitted.k[: fitted.order - 1])}, a "
          f"{list(fitted.a[: fitted.order - 1])}")
    if fitted.doc:
        print(f"  doc_weight {fitted.doc_weight}, doc_k {list(fitted.doc_k[: fitted.order - 1])}, "
              f"doc_a {list(fitted.doc_a[: fitted.order - 1])}")
    mode = ec.cache if ec.cache != "none" else "ngram"
    print(f"  wrote {dest} (use it with: proteus eval CKPT --cache {mode} --cache-params {dest})")
    return 0


def _load_files(files: list[str], limit: int) -> torch.Tensor:
    tokens = torch.cat([D.load_tokens(f, "tune") for f in files])
    return tokens[: limit + 1] if limit else tokens


def main_quantize(path: str, choices: QuantChoices, out: str, calib_files: str = "") -> int:
    """``proteus quantize``: a float checkpoint -> an artifact, with the quantiser ``choices``
    (GPTQ calibrates on ``calib_files``, default the checkpoint's training shards, refused by
    content when they overlap the validation tokens); prints sizes and seconds."""
    try:
        choices.validate()
    except ValueError as e:
        raise ConfigError(f"proteus quantize: {e}") from None
    if not out:
        raise ConfigError("proteus quantize: pass --out FILE for the artifact")
    model, cfg, info = load_model(path, None)
    if info["source"] == "artifact":
        raise ConfigError(f"{path} is already an artifact; quantize a float checkpoint "
                          "(model.ckpt)")
    files = D.resolve_files(calib_files or cfg.train.train_files or D.bundled_train_glob(),
                            "calibration")
    qs, rep = quantize_with_calibration(model, choices, files, cfg.train.seq_len,
                                        cfg.model.vocab_size, cfg.train.val_files)
    meta = {"run_config": cfg.to_dict(), "float_bpb": info.get("float_bpb"), "quantiser": rep}
    art = write_artifact(out, qs, meta)
    calib = rep.get("calibration")
    print(f"proteus quantize: {path} -> {out}: {art.total_bytes:,} bytes ({choices.method}, "
          f"int{choices.embed_bits} embeddings"
          + (f", LQER rank {choices.lqer_rank} on {', '.join(rep['lqer'])}" if rep["lqer"]
             else "") + ")")
    if calib:
        print(f"  calibration: {calib['tokens']:,} training tokens from "
              f"{', '.join(calib['files'])} in {calib['seconds']:.2f}s")
    print(f"  quantise: {rep['seconds']:.2f}s; evaluate it with: proteus eval {out}")
    return 0


def main_inspect(path: str) -> int:
    """``proteus artifact inspect``: sections, bits per value and the tensor table."""
    if not os.path.exists(path):
        raise ConfigError(f"artifact {path} not found")
    if not os.path.isfile(path):
        raise ConfigError(f"artifact {path} is not a file")
    print(inspect_artifact(path))
    return 0


def main_pack(out: str) -> int:
    """``proteus pack``: write the self-extracting script; print its size and the sources'."""
    text = pack()
    try:
        with open(out, "w") as f:
            f.write(text)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror}") from None
    print(f"{out}: {len(text.encode()):,} bytes (the modules training and evaluation import: "
          f"{source_bytes():,} bytes of source); run it as `python {out} train ...`")
    return 0


def main_import_record(path: str, out: str, cfg: RunConfig) -> int:
    """``proteus import-record``: the entry's state dict -> our ``model.ckpt``."""
    if not os.path.isfile(path):
        raise ConfigError(f"import-record: {path}: no such file")
    if os.path.exists(out):
        raise ConfigError(f"import-record: {out} exists; pick another --out or remove it")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same bad input
        raise ConfigError(f"import-record: {path} is not a torch state dict "
                          f"({str(e).strip().splitlines()[0][:120]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"import-record: {path} does not hold a state dict (name -> tensor)")
    model = GPT(cfg.model)
    model.load_state_dict(load_record_state_dict(sd, cfg.model))
    save_checkpoint(Path(out), model, cfg, {"imported_from": os.path.abspath(path)})
    print(f"import-record: {len(sd)} tensors of {path} -> {out} ({model.num_params():,} "
          f"parameters, preset {cfg.train.preset})")
    return 0
