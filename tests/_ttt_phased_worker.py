"""Run under torchrun by test_ttt_phased.py: phased TTT (one global phase) of a checkpoint on
the first 600 validation targets; write this rank's per-token scores and bpb."""

import dataclasses
import json
import os
import sys

from proteus import data as D
from proteus.checkpoint import load_model
from proteus.dist import close_process_group, setup_dist
from proteus.eval.ttt_phased import phased_score

ckpt, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
rank, world = setup_dist()
model, cfg, _ = load_model(ckpt, "ref")
tokens = D.load_tokens(D.bundled_val_glob(), "val", limit=601).clone()
tokens[[100, 180, 300, 380, 450]] = D.BOS_ID  # 6 documents: 3 batches of 2 before the phase
ec = dataclasses.replace(cfg.eval, ttt_mode="phased", ttt_doc_chunk=16, ttt_docs=1,
                         ttt_rank=2, ttt_phases="2", ttt_global_chunk=64)
lut = D.build_byte_lut(D.load_tokenizer(), 1024)
r = phased_score(model, tokens, lut, 32, ec)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"world": world, "bpb": r.scores.bpb(), "logp": r.scores.logp.tolist(),
               "phases": r.phases}, f)
close_process_group()
