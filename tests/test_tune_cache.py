"""`proteus tune-cache`: fit on training shards the checkpoint never saw, never on validation
tokens; the file it writes drives `proteus eval --cache-params` and is refused where it does not
fit; and `--val-start` moves the scored stream to a document start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from proteus import data as D
from proteus.checkpoint import save_checkpoint
from proteus.eval import load_eval_tokens
from proteus.eval.fit import held_out_files
from proteus.model import build_model
from proteus.options import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = "proteus/data/fineweb_train_00000{}.bin"


def _cli(*args):
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "proteus", *args], capture_output=True,
                          text=True, env=e, cwd=ROOT, timeout=600)


def _ckpt(path, train_files: str) -> str:
    cfg = build_config("smoke", {"train.train_files": train_files}, environ={})
    torch.manual_seed(0)
    save_checkpoint(path, build_model(cfg, "ref"), cfg)
    return str(path)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A checkpoint that trained on shards 0 and 2: shard 1 is held out."""
    return _ckpt(tmp_path_factory.mktemp("tc") / "model.ckpt", SHARD.format("[02]"))


def test_held_out_files_are_the_shards_the_checkpoint_never_saw(held_out, tmp_path):
    cfg = build_config("smoke", {"train.train_files": SHARD.format("[02]")}, environ={})
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        files = held_out_files(cfg)
        assert [os.path.basename(f) for f in files] == ["fineweb_train_000001.bin"]
        # by content, not by name: a copy of a trained shard is still a trained shard
        copy = tmp_path / "renamed.bin"
        copy.write_bytes(open(SHARD.format(0), "rb").read())
        with pytest.raises(D.DataError, match="trained on"):
            held_out_files(cfg, str(copy))
        with pytest.raises(D.DataError, match="validation shard"):
            held_out_files(cfg, D.bundled_val_glob())
        with pytest.raises(D.DataError, match="every bundled train shard"):
            held_out_files(build_config("smoke", environ={}))
    finally:
        os.chdir(cwd)


def test_tune_cache_writes_parameters_that_eval_uses(held_out, tmp_path):
    out = tmp_path / "p.json"
    r = _cli("tune-cache", held_out, "--tune-tokens", "3000", "--iterations", "15", "--out",
             str(out), "--stride", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fineweb_train_000001.bin" in r.stdout and "held-out bpb" in r.stdout
    saved = json.loads(out.read_text())
    assert saved["fitted_on"]["files"] == ["fineweb_train_000001.bin"]
    assert saved["fitted_on"]["targets"] == 3000 and saved["order"] == 5
    assert saved["bpb"]["fitted"] <= saved["bpb"]["start"]
    r = _cli("eval", held_out, "--val-tokens", "1024", "--cache", "ngram", "--cache-params",
             str(out), "--audit-positions", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "with the n-gram cache" in r.stdout and "audit: PASS" in r.stdout
    r = _cli("eval", held_out, "--val-tokens", "1024", "--cache", "ngram", "--cache-params",
             str(out), "--ngram-order", "4")
    assert r.returncode == 2 and "fitted for order 5" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    pytest.param([], "every bundled train shard", marks=pytest.mark.slow),
    pytest.param(["--tune-files", "proteus/data/fineweb_val_*.bin"], "validation shard",
                 marks=pytest.mark.slow),
    (["--tune-files", SHARD.format(1)], "trained on"),
])
def test_tune_cache_refuses_trained_and_validation_tokens(tmp_path, args, needle):
    ckpt = _ckpt(tmp_path / "model.ckpt", "")  # trained on every bundled shard
    r = _cli("tune-cache", ckpt, *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_val_start_begins_at_the_next_document_start():
    ec = build_config("smoke", {"eval.val_start": 262144, "eval.val_tokens": 1000},
                      environ={}).eval
    tokens, first = load_eval_tokens(D.bundled_val_glob(), ec)
    whole = D.load_tokens(D.bundled_val_glob(), "val")
    assert first >= 262144 and whole[first] == D.BOS_ID
    assert not (whole[262144:first] == D.BOS_ID).any()  # the first document start at or after
    assert torch.equal(tokens, whole[first : first + 1001])
    with pytest.raises(D.DataError, match="no document starts"):
        load_eval_tokens(D.bundled_val_glob(), build_config(
            "smoke", {"eval.val_start": whole.numel() - 3}, environ={}).eval)


def test_tune_cache_fits_the_tilt_and_eval_uses_it(held_out, tmp_path, monkeypatch, capsys):
    """`--cache ngram+tilt`: β and the shortest match fitted on the held-out shard (the same
    refusals by content), written beside the cache's parameters, and taken by the plan."""
    from proteus.commands import main_tune_cache
    from proteus.eval import evaluate, make_plan

    monkeypatch.chdir(ROOT)
    out = tmp_path / "p.json"
    cli = {"eval.cache": "ngram+tilt", "eval.stride": 0, "eval.tilt_beta": 0.25}
    assert main_tune_cache(held_out, cli, "", 1500, str(out), 10) == 0
    assert "tilt: beta" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    t = saved["tilt"]
    assert saved["fitted_for"] == "ngram+tilt" and saved["fitted_on"]["targets"] == 1500
    assert t["order"] == 16 and t["min_order"] in (1, 2, 3, 4, 6, 8)
    tried = saved["tilt_fit"]["tried"]
    assert min(tried.values(), key=lambda v: v["nll"]) == tried[str(t["min_order"])]
    assert tried[str(t["min_order"])]["beta"] == t["beta"] != 0.25
    assert saved["tilt_fit"]["bpb_tilt"] <= saved["tilt_fit"]["bpb_model"]
    cfg = build_config("smoke", {"train.train_files": SHARD.format("[02]"),
                                 "eval.cache": "ngram+tilt", "eval.cache_params": str(out),
                                 "eval.tilt_beta": 0.25, "eval.audit": "none"}, environ={})
    plan = make_plan(cfg)
    assert (plan.tcfg.beta, plan.tcfg.min_order) == (t["beta"], t["min_order"])
    res = evaluate(build_model(cfg, "ref"), D.load_tokens(D.bundled_val_glob(), "val",
                                                          limit=300), plan)
    assert res.tilt["beta"] == t["beta"] and res.cache["over"] == "tilt"
    # the same refusals as the cache's fit: a validation shard is never fitted on
    with pytest.raises(D.DataError, match="validation shard"):
        main_tune_cache(held_out, cli, D.bundled_val_glob(), 2000, str(out), 10)
