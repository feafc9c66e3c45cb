"""Score-first test-time training: windows per chunk, score before update, adapters, named
parameters, int6 artifacts, the audit (and mutations it must catch), bad input, 1 vs 2 ranks.

Tolerance, 1 vs 2 gloo processes: the two runs score every chunk with weights that differ only
by float summation order (each rank's half-batch gradient, summed by all-reduce, instead of one
full-batch gradient); the bpb agrees to 1e-6 relative (tests/_ttt_worker.py).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from _torchrun import torchrun  # tests/ is on the path (pytest prepends it)

import proteus.eval.ttt as T
from proteus import data as D
from proteus.checkpoint import load_model, save_checkpoint
from proteus.cli import main
from proteus.errors import ConfigError
from proteus.eval.blend import NgramConfig
from proteus.eval.scoring import score_windows, windows
from proteus.eval.ttt_audit import audit_ttt
from proteus.model import build_model
from proteus.options import build_config
from proteus.quant import quantize_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, STRIDE, CHUNK = 64, 32, 256


def _cfg(**eval_over):
    base = dict(stride=STRIDE, ttt_chunk=CHUNK, eval_batch_seqs=8, ttt_lr=0.01, ttt_params="lora")
    ev = {f"eval.{k}": v for k, v in {**base, **eval_over}.items()}
    return build_config("smoke", ev, environ={})


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg, "ref")


@pytest.fixture(scope="module")
def case():
    cfg = _cfg()
    tokens = D.load_tokens(D.bundled_val_glob(), "val", limit=4 * CHUNK + 1)
    lut = D.build_byte_lut(D.load_tokenizer(), 1024)
    return cfg, _model(cfg), tokens, lut


def test_chunk_windows_score_every_target_once_inside_one_chunk():
    for n, seq, stride, chunk in ((1000, 64, 32, 256), (1000, 64, 0, 128), (777, 50, 7, 100)):
        per_chunk = T.chunk_windows(n, seq, stride, chunk)
        scored = []
        for k, wins in enumerate(per_chunk):
            for s, e, f in wins:
                assert k * chunk < f <= e <= (k + 1) * chunk and e - s <= seq and s < f
                scored += range(f, e + 1)
        assert scored == list(range(1, n + 1))
        if chunk % seq == 0 and (stride == 0 or seq % stride == 0):  # nothing to split
            assert [w for c in per_chunk for w in c] == windows(n, seq, stride)


def test_first_chunk_is_scored_by_the_artifact_weights_then_the_model_learns(case):
    cfg, model, tokens, lut = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = T.ttt_score(model, tokens, lut, SEQ, cfg.eval)
    wins = T.chunk_windows(tokens.numel() - 1, SEQ, STRIDE, CHUNK)
    plain = score_windows(model, tokens, [w for c in wins for w in c], 8)
    # chunk 0: B = 0 adapters, scored before any step, bit for bit the plain model's scores
    assert torch.equal(r.scores.logp[:CHUNK], plain[:CHUNK])
    # later chunks: the steps changed the scores, and for the better on this untrained model
    assert not torch.equal(r.scores.logp[CHUNK:], plain[CHUNK:])
    assert r.scores.logp[CHUNK:].sum() > plain[CHUNK:].sum()
    assert r.chunks == 4 and r.trained_params > 0
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def test_named_parameters_train_only_what_they_name(case):
    cfg, model, tokens, lut = case
    ec = dataclasses.replace(cfg.eval, ttt_params="blocks.*.mlp_scale, skip_weights")
    m = _model(cfg)
    params = T.ttt_parameters(m, ec)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"blocks.0.mlp_scale", "blocks.1.mlp_scale", "skip_weights"}
    assert len(params) == 3
    r = T.ttt_score(model, tokens, lut, SEQ, ec)
    assert r.trained_params == sum(p.numel() for p in params)


def test_ttt_on_the_int6_artifact(case, tmp_path):
    from proteus.artifact import write_artifact

    cfg, model, tokens, lut = case
    path = str(tmp_path / "m.int6")
    write_artifact(path, quantize_state_dict(model.state_dict()), {"run_config": cfg.to_dict()})
    qmodel = load_model(path, "ref")[0]
    wins = [w for c in T.chunk_windows(tokens.numel() - 1, SEQ, STRIDE, CHUNK) for w in c]
    plain = score_windows(qmodel, tokens, wins, 8)  # through the packed int6 weights
    # LoRA beside the packed layers: chunk 0 exactly as the artifact scores it, then learning
    r = T.ttt_score(qmodel, tokens, lut, SEQ, cfg.eval)
    assert torch.equal(r.scores.logp[:CHUNK], plain[:CHUNK])
    assert r.scores.logp[CHUNK:].sum() > plain[CHUNK:].sum()
    # every parameter: the int6 layers become their exact dequantised matrices and train too
    ec = dataclasses.replace(cfg.eval, ttt_params="*", ttt_lr=0.003)
    r = T.ttt_score(qmodel, tokens, lut, SEQ, ec)
    assert torch.allclose(r.scores.logp[:CHUNK], plain[:CHUNK], rtol=0, atol=1e-5)
    assert r.scores.logp[CHUNK:].sum() > plain[CHUNK:].sum()
    assert r.trained_params > sum(p.numel() for p in qmodel.parameters())  # + block matrices


def test_audit_passes_score_first_ttt_with_the_cache(case):
    cfg, model, tokens, lut = case
    rep = audit_ttt(model, tokens, lut, SEQ, cfg.eval, NgramConfig())
    assert rep.passed, str(rep)
    assert rep.edits == [CHUNK // 2 + 1, CHUNK + 1, CHUNK + CHUNK // 2 + 1, 2 * CHUNK + 1]
    # the model scores from a float32 softmax: its rows sum to 1 within float32 rounding
    assert rep.changed and rep.cache_edits_ok and rep.cache_max_sum_error < 1e-6
    assert "PASS" in str(rep)


def test_audit_fails_ttt_that_trains_on_a_chunk_before_scoring_it(case, monkeypatch):
    cfg, model, tokens, lut = case
    real = T._train_chunk

    def ahead(model, params, opt, tokens, k, ec, *rest):  # steps on the chunk about to be scored
        if (k + 2) * ec.ttt_chunk <= tokens.numel() - 1:
            k += 1
        return real(model, params, opt, tokens, k, ec, *rest)

    monkeypatch.setattr(T, "_train_chunk", ahead)
    rep = audit_ttt(model, tokens, lut, SEQ, cfg.eval)
    assert not rep.passed and not rep.edits_ok and "FAIL" in str(rep)


def test_a_chunk_that_does_not_fit_and_missing_parameters_are_config_errors(case):
    cfg, model, tokens, lut = case
    for over, needle in ((dict(ttt_chunk=100), "not a multiple of the sequence length"),
                         (dict(ttt_chunk=4 * CHUNK), "single chunk"),
                         (dict(ttt_params="nothing.*"), "match no parameter")):
        with pytest.raises(ConfigError, match=needle):
            T.ttt_score(model, tokens, lut, SEQ, dataclasses.replace(cfg.eval, **over))
    with pytest.raises(ConfigError, match="ttt_lr"):
        _cfg(ttt_lr=0.0)


def _cli(*args):
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "proteus", *args], capture_output=True,
                          text=True, env=e, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, case):
    cfg, model, _, _ = case
    path = tmp_path_factory.mktemp("ttt") / "model.ckpt"
    save_checkpoint(path, model, cfg)
    return str(path)


def test_eval_and_audit_commands_with_ttt(ckpt):
    r = _cli("eval", ckpt, "--like-run", "--val-tokens", str(2 * CHUNK), "--ttt")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "with score-first TTT" in r.stdout
    assert "summary:" in r.stdout and "score-first TTT (2 chunks)" in r.stdout
    r = _cli("audit", ckpt, "--like-run", "--val-tokens", str(2 * CHUNK), "--ttt",
             "--audit-positions", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TTT audit: PASS" in r.stdout and "audit: PASS" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--ttt", "--ttt-chunk", "100"], "not a multiple of the sequence length"),
    (["--ttt", "--ttt-chunk", "8192"], "single chunk"),
    (["--ttt", "--ttt-params", "nope.*"], "match no parameter"),
    (["--cache", "ngram", "--cache-params", "/nope.json"], "cache parameters /nope.json"),
])
def test_bad_ttt_and_cache_input_is_one_line_exit_2(ckpt, monkeypatch, capsys, args, needle):
    for k in [k for k in os.environ if k.startswith("PROTEUS_")]:
        monkeypatch.delenv(k)
    # in-process: no 3 s of imports
    code = main(["eval", ckpt, "--like-run", "--val-tokens", "1024", *args])
    err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_ttt_bpb(ckpt, tmp_path):
    one = torchrun("_ttt_worker.py", 1, [ckpt, tmp_path / "one"], tmp_path / "one")
    two = torchrun("_ttt_worker.py", 2, [ckpt, tmp_path / "two"], tmp_path / "two")
    assert two[0]["world"] == 2 and two[0]["bpb"] == two[1]["bpb"]
    assert two[0]["digest"] == two[1]["digest"]  # the ranks end with the same weights
    assert two[0]["bpb"] == one[0]["bpb"]  # to the last bit (row groups, exact sums)
    assert two[0]["bpb_cache"] == one[0]["bpb_cache"]
    assert one[0]["bpb"] < one[0]["bpb_plain"]  # and the training did something
