"""Run under torchrun by test_distributed.py: train the smoke preset, write this rank's results."""

import json
import os
import sys

from proteus.config import build_config
from proteus.train import train

out = sys.argv[1]
cfg = build_config("smoke", {"train.iterations": 5, "train.warmup_steps": 1,
                             "train.batch_tokens": 512, "train.seq_len": 64}, environ={})
res = train(cfg, run_dir=None, quiet=True)
rank = int(os.environ.get("RANK", "0"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"losses": res["losses"], "digest": res["param_digest"], "bpb": res["val"]["bpb"],
               "world": res["world"]}, f)
