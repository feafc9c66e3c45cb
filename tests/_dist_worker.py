"""Run under torchrun by test_distributed.py: train the smoke preset (with its run directory:
checkpoint, int6 artifact and the artifact's evaluation), then score the n-gram cache over a
fixed stand-in model, and write this rank's results."""

import json
import os
import sys
from pathlib import Path

import torch

from proteus import data as D
from proteus.config import build_config
from proteus.dist import close_process_group, reduce_sum, setup_dist
from proteus.eval.cache import cache_scores
from proteus.eval.plan import ngram_config
from proteus.eval.scoring import TokenScores
from proteus.run import run

out = sys.argv[1]
autocast = sys.argv[2] if len(sys.argv) > 2 else "off"  # bf16 autocast forced on or off
rank, world = setup_dist()  # the group outlives run(), which leaves it to its creator
# no wall-clock cap: a time-aware warm-down would give the 1- and 2-process runs different LRs
cfg = build_config("smoke", {"train.iterations": 5, "train.warmup_steps": 1,
                             "train.batch_tokens": 512, "train.seq_len": 64,
                             "train.max_wallclock_s": 0.0,
                             "train.autocast_bf16": autocast}, environ={})
run_dir = os.path.join(out, "run")  # rank 0 writes checkpoint and artifact; all ranks evaluate it
os.makedirs(run_dir, exist_ok=True)
res = run(cfg, run_dir=Path(run_dir))

# The cache on this rank's shard of 20k real tokens; the stand-in model's log-probabilities are
# a fixed function of the previous token, so only the split over processes varies between runs.
tokens = D.load_tokens(D.bundled_val_glob(), "val", limit=20001)
z = torch.sin(torch.arange(1024, dtype=torch.float64)[None] * (tokens[:-1, None] + 1) * 0.37)
logp = torch.log_softmax(3.0 * z, -1).gather(1, tokens[1:, None])[:, 0]
lut = D.build_byte_lut(D.load_tokenizer(), 1024)
scores = TokenScores(1, logp, lut.target_bytes(tokens[:-1], tokens[1:]))
ncfg = ngram_config(cfg.eval, cfg.model.vocab_size)
nll, nbytes, _ = reduce_sum(*cache_scores(scores, tokens, ncfg, "numpy", rank, world))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"losses": res["losses"], "digest": res["param_digest"], "bpb": res["val"]["bpb"],
               "world": res["world"], "int6_bpb": res["artifact"]["quantized_bpb"],
               "cache_nll": nll, "cache_bytes": nbytes}, f)
close_process_group()  # this script created the group (run() leaves it to its creator)
