"""Run under torchrun by test_integrity.py (and tools/integrity_table.py): evaluate a
checkpoint through ``proteus.eval.evaluate`` with plain windows, the sliding window, the n-gram
cache and score-first TTT (+ the cache), at a given batch size; write this rank's numbers.

usage: _eval_worker.py CKPT OUT_DIR BATCH_SEQS VAL_TOKENS STRIDE TTT_CHUNK"""

import dataclasses
import json
import os
import sys

import torch

from proteus import data as D
from proteus.checkpoint import load_model
from proteus.dist import close_process_group, setup_dist
from proteus.eval import evaluate, load_eval_tokens


def numbers(ckpt: str, batch: int, n: int, stride: int, chunk: int) -> dict:
    """The evaluation's numbers (bpb of each mode, tokens, bytes, seconds) in this process."""
    model, cfg, _ = load_model(ckpt, "ref")
    ec = dataclasses.replace(cfg.eval, val_tokens=n, stride=stride, eval_batch_seqs=batch,
                             cache="ngram", ngram_backend="numpy", ttt=True, ttt_chunk=chunk,
                             audit="none")
    cfg = dataclasses.replace(cfg, eval=ec)
    tokens, _ = load_eval_tokens(D.bundled_val_glob(), ec, cfg.model.vocab_size)
    r = evaluate(model, tokens, cfg)
    return {"plain": r.plain["bpb"], "plain loss": r.plain["loss"],
            "sliding": r.sliding["bpb"], "cache": r.cache["bpb_cache"],
            "ttt": r.ttt["bpb"], "ttt + cache": r.ttt["cache"]["bpb_cache"],
            "tokens": r.plain["tokens"], "bytes": r.plain["bytes"],
            "seconds": {"plain": r.plain["seconds"], "sliding": r.sliding["seconds"],
                        "ttt": r.ttt["score_seconds"] + r.ttt["train_seconds"],
                        "ttt_train": r.ttt["train_seconds"], "total": r.seconds}}


if __name__ == "__main__":
    ckpt, out, batch, n, stride, chunk = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    os.makedirs(out, exist_ok=True)
    rank, world = setup_dist()
    result = numbers(ckpt, batch, n, stride, chunk)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": world, "threads": torch.get_num_threads(), "batch": batch,
                   **result}, f)
    close_process_group()
