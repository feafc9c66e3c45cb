"""Run under torchrun by test_ttt.py: score-first TTT (and the n-gram cache over it) of a
checkpoint on 1,024 validation targets; write this rank's bpb and the digest of its weights
after the last step."""

import json
import os
import sys

from proteus import data as D
from proteus.checkpoint import load_model
from proteus.dist import close_process_group, setup_dist
from proteus.eval import make_plan
from proteus.eval.cache import cache_report
from proteus.eval.scoring import score_tokens
from proteus.eval.ttt import ttt_score

ckpt, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
rank, world = setup_dist()
model, cfg, _ = load_model(ckpt, "ref")
tokens = D.load_tokens(D.bundled_val_glob(), "val", limit=1025)
lut = D.build_byte_lut(D.load_tokenizer(), 1024)
seq = cfg.train.seq_len
r = ttt_score(model, tokens, lut, seq, cfg.eval)
cache, _ = cache_report(make_plan(cfg), tokens, r.scores, rank, world)
plain = score_tokens(model, tokens, lut, seq, cfg.eval.stride).bpb()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"world": world, "bpb": r.scores.bpb(), "bpb_cache": cache["bpb_cache"],
               "bpb_plain": plain, "digest": r.digest}, f)
close_process_group()
