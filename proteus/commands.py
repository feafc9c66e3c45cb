"""The commands' bodies: each loads what it needs, runs the library, prints, returns an exit code.

``proteus.cli`` parses the arguments and imports this module only for the commands that need
it (see the comment in ``cli._dispatch``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from proteus import data as D
from proteus.artifact import ARTIFACT_LIMIT, inspect_artifact
from proteus.checkpoint import load_model, load_train_state
from proteus.config import ConfigError, RunConfig, RunInterrupted, eval_overrides, resume_config
from proteus.device import pick_device
from proteus.dist import close_process_group, collective_timeout, env_rank, setup_dist
from proteus.evaluate import evaluate_bpb, format_bpb, run_audit, sliding_and_cache
from proteus.pack import pack, source_bytes
from proteus.run import check_inputs, find_resume, open_run_dir, run
from proteus.train import StopSignal


def main_train(cfg: RunConfig, resume: tuple[Path, dict | None] | None = None) -> int:
    """``proteus train``: the run, then the run directory and the budget verdict. ``resume``:
    (run directory, training state or None) of the run to continue. SIGTERM and SIGINT save a
    resumable state and end with one line saying how to continue."""
    check_inputs(cfg)
    device = pick_device(cfg.train)
    setup_dist(collective_timeout(cfg.train), device.type)  # the group outlives run()
    failed, run_dir = True, None
    with StopSignal() as stop:
        try:
            run_dir = open_run_dir(cfg, resume[0] if resume else None)
            results = run(cfg, run_dir, resume=resume[1] if resume else None, stop=stop)
            failed = False
        except RunInterrupted as e:
            if run_dir is None:
                raise
            raise RunInterrupted(f"{e}; continue with: proteus train --resume {run_dir}",
                                 e.signum) from None
        finally:
            close_process_group(failed)
    if env_rank() == 0:
        print(f"run directory: {run_dir}")
        art = results.get("artifact")
        if art and not art.get("within_limit", True):
            print(f"BUDGET CHECK FAILED: {art['total_bytes']:,} bytes > {ARTIFACT_LIMIT:,}",
                  file=sys.stderr)
            return 1
    return 0


def main_resume(path: str, cli: dict) -> int:
    """``proteus train --resume RUN_DIR``: the run's own config (from its newest training
    state, else its config.json), with only the options that do not change what is trained."""
    run_dir, state_path = find_resume(path)
    state = load_train_state(state_path) if state_path else None
    saved = state["config"] if state else _run_config(run_dir)
    cfg = resume_config(saved, cli, where=f"run {run_dir}")
    return main_train(cfg, resume=(run_dir, state))


def _run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    return RunConfig.from_dict(d, where=str(path))


def main_eval(path: str, cli: dict) -> int:
    """``proteus eval``: plain bpb, and sliding window / n-gram cache as the options ask."""
    rank, world = setup_dist()
    failed = True
    try:
        code = _eval(path, cli, rank, world)
        failed = False
    finally:
        close_process_group(failed)
    return code


def _eval(path: str, cli: dict, rank: int, world: int) -> int:
    say = print if rank == 0 else (lambda *a, **k: None)
    model, cfg, info = load_model(path, cli.get("train.kernels"))
    ec = eval_overrides(cfg.eval, cli)
    val_files = cli.get("train.val_files") or cfg.train.val_files or D.bundled_val_glob()
    lut = D.build_byte_lut(D.load_tokenizer(cfg.train.tokenizer), cfg.model.vocab_size)
    tokens = D.load_tokens(val_files, "val", limit=ec.val_tokens + 1 if ec.val_tokens else 0,
                           vocab_size=cfg.model.vocab_size)
    if tokens.numel() < 2:
        raise D.DataError("the validation shards hold fewer than 2 tokens; nothing to score")
    seq = ec.eval_seq_len or cfg.train.seq_len
    say(f"proteus eval: {path} ({info['source']}), kernels={model.ops.name}, "
        f"{tokens.numel() - 1:,} targets, window {seq}, {world} process(es)")
    if info.get("float_bpb") is not None:
        say(f"  bpb before quantisation (recorded at training): {format_bpb(info['float_bpb'])}")
    r = evaluate_bpb(model, tokens, lut, seq, 0, ec.eval_batch_seqs)
    say(f"  val bpb {format_bpb(r['bpb'])} (plain, loss {r['loss']:.4f})")
    rep = sliding_and_cache(model, cfg, ec, tokens, lut, seq, rank, world)
    if rank == 0 and "cache" in rep and not rep["cache"]["audit_passed"]:
        return 1
    return 0


def main_audit(path: str, cli: dict) -> int:
    """``proteus audit``: our cache must pass, the record's hashed cache must be flagged."""
    model, cfg, _ = load_model(path, None)
    ec = eval_overrides(cfg.eval, cli)
    tokens = D.load_tokens(cfg.train.val_files or D.bundled_val_glob(), "val",
                           limit=ec.val_tokens + 1 if ec.val_tokens else 0,
                           vocab_size=cfg.model.vocab_size)
    if tokens.numel() < 4:
        raise D.DataError(f"the audit needs at least 4 validation tokens, got {tokens.numel()}")
    print(f"proteus audit: {path}, {ec.audit_positions} positions of {tokens.numel():,} tokens")
    return 0 if run_audit(model, cfg, ec, tokens, hashed=True) else 1


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
