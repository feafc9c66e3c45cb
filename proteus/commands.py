"""The commands' bodies: each loads what it needs, runs the library, prints, returns an exit code.

``proteus.cli`` parses the arguments and imports this module only for the commands that need
it (see the comment in ``cli._dispatch``).
"""

from __future__ import annotations

import os
import sys

from proteus import data as D
from proteus.artifact import ARTIFACT_LIMIT, inspect_artifact
from proteus.checkpoint import load_model
from proteus.config import ConfigError, RunConfig, eval_overrides
from proteus.dist import close_process_group, env_rank, setup_dist
from proteus.evaluate import evaluate_bpb, format_bpb, run_audit, sliding_and_cache
from proteus.pack import pack, source_bytes
from proteus.run import make_run_dir, run


def main_train(cfg: RunConfig) -> int:
    """``proteus train``: the run, then the run directory and the budget verdict."""
    run_dir = make_run_dir(cfg)
    results = run(cfg, run_dir)
    if env_rank() == 0:
        print(f"run directory: {run_dir}")
        art = results.get("artifact")
        if art and not art.get("within_limit", True):
            print(f"BUDGET CHECK FAILED: {art['total_bytes']:,} bytes > {ARTIFACT_LIMIT:,}",
                  file=sys.stderr)
            return 1
    return 0


def main_eval(path: str, cli: dict) -> int:
    """``proteus eval``: plain bpb, and sliding window / n-gram cache as the options ask."""
    rank, world = setup_dist()
    code = _eval(path, cli, rank, world)
    if world > 1:  # not after an error: a peer may still be inside a collective
        close_process_group()
    return code


def _eval(path: str, cli: dict, rank: int, world: int) -> int:
    say = print if rank == 0 else (lambda *a, **k: None)
    model, cfg, info = load_model(path, cli.get("train.kernels"))
    ec = eval_overrides(cfg.eval, cli)
    val_files = cli.get("train.val_files") or cfg.train.val_files or D.bundled_val_glob()
    lut = D.build_byte_lut(D.load_tokenizer(cfg.train.tokenizer), cfg.model.vocab_size)
    tokens = D.load_tokens(val_files, "val", limit=ec.val_tokens + 1 if ec.val_tokens else 0)
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
                           limit=ec.val_tokens + 1 if ec.val_tokens else 0)
    print(f"proteus audit: {path}, {ec.audit_positions} positions of {tokens.numel():,} tokens")
    return 0 if run_audit(model, cfg, ec, tokens, hashed=True) else 1


def main_inspect(path: str) -> int:
    """``proteus artifact inspect``: sections, bits per value and the tensor table."""
    if not os.path.exists(path):
        raise ConfigError(f"artifact {path} not found")
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
