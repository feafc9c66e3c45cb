"""A bpb that is a pure function of (model, tokens, evaluation config): the same number to the
last bit for 1 and 2 processes and for different batch sizes, for plain windows, the sliding
window, the n-gram cache and score-first TTT (+ the cache). ``docs/integrity.md`` has the
whole table (batch sizes x 1/2/3/8 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _eval_worker import numbers  # tests/ is on the path (pytest prepends it)

from proteus.checkpoint import save_checkpoint
from proteus.config import build_config
from proteus.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPB = ("plain", "plain loss", "sliding", "cache", "ttt", "ttt + cache", "tokens", "bytes")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = build_config("smoke", {"eval.ttt_lr": 0.01, "eval.ttt_params": "lora"}, environ={})
    path = tmp_path_factory.mktemp("integrity") / "model.ckpt"
    torch.manual_seed(0)
    save_checkpoint(path, build_model(cfg, "ref"), cfg)
    return str(path)


def torchrun(nproc: int, out: str, ckpt: str, batch: int, tokens: int = 1024,
             stride: int = 32, chunk: int = 256) -> list[dict]:
    """Every rank's numbers from ``tests/_eval_worker.py`` under ``nproc`` gloo processes."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "tests", "_eval_worker.py"), ckpt,
           out, str(batch), str(tokens), str(stride), str(chunk)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(nproc)]


def test_one_and_two_processes_and_any_batch_size_give_the_same_bits(ckpt, tmp_path):
    # one process here (batches of 3 windows), two under torchrun (batches of 8), each with one
    # CPU thread as torchrun gives its workers: TTT's backward sums differently with another
    # thread count (docs/integrity.md)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = numbers(ckpt, 3, 1024, 32, 256)
    finally:
        torch.set_num_threads(threads)
    two = torchrun(2, str(tmp_path / "two"), ckpt, batch=8)
    assert two[0]["world"] == 2
    for key in BPB:
        assert one[key] == two[0][key] == two[1][key], key  # every bit, every rank
    assert one["ttt"] < one["plain"]  # the training did something
