"""Phased per-document LoRA TTT (proteus/eval/ttt_phased.py): the document schedule, score
before update, a fresh adapter per document (a document's numbers do not depend on its
batch-mates or the batch size), the batched adapters against a per-document float64 reference,
the global phase, the audit (and the mutation it must catch), the commands, 1 vs 2 processes.

Error bound (batched fp32 vs the float64 reference, Adam's eps raised to 1e-2 so that a step is
a smooth function of the gradient): every score within 2x the error of the same reference run
in float32, plus 1e-6 nats (the flash-attention rule). Measured here: 9.95e-4 vs 9.95e-4 nats.

Bit-identity across batch sizes and batch-mates holds with the default 2 threads (the test
fails, as it should, when the fixed shapes of ``_DocBatch._forward`` are undone).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import proteus.eval.ttt_phased as P
from proteus import data as D
from proteus.artifact import write_artifact
from proteus.checkpoint import load_model, save_checkpoint
from proteus.cli import main
from proteus.errors import ConfigError
from proteus.model import build_model
from proteus.options import build_config
from proteus.quant import quantize_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, CHUNK = 32, 8
BOS_AT = (40, 96, 130, 150)  # documents of 40, 56, 34, 20 and 30 targets


def _cfg(**eval_over):
    base = dict(ttt=True, ttt_mode="phased", ttt_doc_chunk=CHUNK, ttt_docs=2, ttt_rank=8,
                ttt_lr=0.001, ttt_phases="", ttt_global_chunk=32)
    return build_config("smoke", {f"eval.{k}": v for k, v in {**base, **eval_over}.items()},
                        environ={})


def _stream(n=180):
    tokens = D.load_tokens(D.bundled_val_glob(), "val", limit=n + 1).clone()
    tokens[1:][tokens[1:] == D.BOS_ID] = 2
    tokens[list(BOS_AT)] = D.BOS_ID
    return tokens


@pytest.fixture(scope="module")
def case():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg, "ref")
    lut = D.build_byte_lut(D.load_tokenizer(), 1024)
    return cfg, model, _stream(), lut


@pytest.fixture(scope="module")
def int6(case, tmp_path_factory):
    cfg, model, _, _ = case
    path = str(tmp_path_factory.mktemp("phased") / "m.int6")
    write_artifact(path, quantize_state_dict(model.state_dict()), {"run_config": cfg.to_dict()})
    return load_model(path, "ref")[0]


def test_documents_phases_and_batches_cover_every_target_once():
    t = _stream()
    docs = P.documents(t)
    assert docs == [(0, 40), (40, 96), (96, 130), (130, 150), (150, 180)]
    assert [j for s, e in docs for j in range(s + 1, e + 1)] == list(range(1, 181))
    assert P.segments(5, [2, 4, 9]) == [(0, 2), (2, 4), (4, 5)]  # a phase past the end: none
    assert P.batches(2, 7, 2) == [(2, 4), (4, 6), (6, 7)]
    t2 = t.clone()
    t2[0] = 5  # a stream that does not start at BOS: its first document starts at 0 anyway
    assert P.documents(t2) == docs


def test_first_chunk_is_the_artifacts_score_then_each_document_learns(case, int6):
    cfg, _, tokens, lut = case
    before = {k: v.clone() for k, v in int6.state_dict().items()}
    r = P.phased_score(int6, tokens, lut, SEQ, cfg.eval)
    assert r.docs == 5 and r.phases == [] and r.global_steps == 0
    with torch.no_grad():
        for s, _e in P.documents(tokens):  # chunk 0: the packed int6 layers, B = 0
            z = int6.logits(tokens[s : s + CHUNK][None])[0]
            ref = F.log_softmax(z.float(), -1).gather(-1, tokens[s + 1 : s + CHUNK + 1, None])
            assert torch.equal(r.scores.logp[s : s + CHUNK], ref[:, 0].double())
    plain = torch.cat([_plain(int6, tokens, s, e) for s, e in P.documents(tokens)])
    later = torch.ones(180, dtype=torch.bool)
    for s, _ in P.documents(tokens):
        later[s : s + CHUNK] = False
    assert r.scores.logp[later].sum() > plain[later].sum() + 0.5  # the adapters learned
    for k, v in int6.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def _plain(model, tokens, s, e):
    """The document's targets scored with the base model, windows as the pass takes them."""
    out = []
    with torch.no_grad():
        for c0 in range(0, e - s, CHUNK):
            end = min(c0 + CHUNK, e - s)
            lo = max(0, c0 + CHUNK - SEQ)
            z = model.logits(tokens[s + lo : s + end][None])[0]
            lp = F.log_softmax(z.float(), -1).gather(-1, tokens[s + lo + 1 : s + end + 1, None])
            out.append(lp[c0 - lo :, 0].double())
    return torch.cat(out)


def test_a_documents_scores_do_not_depend_on_its_batch_or_position(case):
    cfg, model, tokens, lut = case
    base = P.phased_score(model, tokens, lut, SEQ, cfg.eval).scores.logp
    for k in (1, 3, 5):  # alone, with other batch-mates, all at once
        ec = dataclasses.replace(cfg.eval, ttt_docs=k)
        assert torch.equal(P.phased_score(model, tokens, lut, SEQ, ec).scores.logp, base), k
    # document 2 alone in a stream of its own: the adapter is reset, nothing carries over
    s, e = P.documents(tokens)[2]
    alone = P.phased_score(model, tokens[s : e + 1], lut, SEQ, cfg.eval).scores.logp
    assert torch.equal(alone, base[s:e])


def _reference(model, tokens, ec, dtype):
    """Per document, one at a time, in ``dtype``: the adapters as weight parametrisations
    ``W + (α/r) B A`` (the head's on the logits), AdamW on each document's own tensors."""
    model = copy.deepcopy(model).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    a0 = P.initial_a(P.wrap_model(copy.deepcopy(model)), ec.ttt_rank)
    scale, r = P.LORA_ALPHA / ec.ttt_rank, ec.ttt_rank
    out = []
    for s, e in P.documents(tokens):
        m = copy.deepcopy(model)
        params, head = [], None
        for key, a in a0.items():
            a = a.to(dtype).clone().requires_grad_(True)
            if key == "head":
                b = torch.zeros(m.cfg.vocab_size, r, dtype=dtype, requires_grad=True)
                head = (a, b)
            else:
                i, name = key.split(".")
                lin = m.blocks[int(i)].get_submodule(P.PROJECTIONS[name])
                b = torch.zeros(lin.weight.shape[0], r, dtype=dtype, requires_grad=True)
                parametrize.register_parametrization(lin, "weight", _Delta(a, b, scale))
            params += [a, b]
        opt = torch.optim.AdamW(params, lr=ec.ttt_lr, betas=(ec.ttt_beta1, ec.ttt_beta2),
                                eps=P.ADAM_EPS, weight_decay=ec.ttt_wd)
        n = e - s
        for c0 in range(0, n, CHUNK):
            end = min(c0 + CHUNK, n)
            lo = max(0, c0 + CHUNK - SEQ)
            h = m._features(tokens[s + lo : s + end][None])[0]
            a, b = head
            z = F.linear(h, m.tok_emb.weight) + scale * (h @ a.t()) @ b.t()
            z = m.cfg.logit_softcap * torch.tanh(z / m.cfg.logit_softcap)
            lp = torch.log_softmax(z, -1).gather(-1, tokens[s + lo + 1 : s + end + 1, None])
            lp = lp[c0 - lo :, 0]
            out.append(lp.detach().double())
            if end < n:
                opt.zero_grad()
                (-lp.mean()).backward()
                opt.step()
    return torch.cat(out)


class _Delta(torch.nn.Module):
    def __init__(self, a, b, scale):
        super().__init__()
        self.a, self.b, self.scale = a, b, scale

    def forward(self, w):
        return w + self.scale * self.b @ self.a


def test_batched_adapters_match_a_per_document_float64_reference(case, monkeypatch):
    cfg, model, tokens, lut = case
    # Adam with eps 1e-10 moves each value by ~lr * sign(gradient), and the sign of a
    # near-zero gradient is rounding noise: float32 and float64 part ways by whole steps. A
    # larger eps makes the step a smooth function of the gradient, so the runs can agree.
    monkeypatch.setattr(P, "ADAM_EPS", 1e-2)
    ec = dataclasses.replace(cfg.eval, ttt_docs=3, ttt_lr=0.003)
    got = P.phased_score(model, tokens, lut, SEQ, ec).scores.logp
    ref64 = _reference(model, tokens, ec, torch.float64)
    ref32 = _reference(model, tokens, ec, torch.float32)
    err, err32 = (got - ref64).abs().max().item(), (ref32 - ref64).abs().max().item()
    assert err <= 2 * err32 + 1e-6, (err, err32)
    assert (got - _reference(model, tokens, dataclasses.replace(ec, ttt_lr=0.03),
                             torch.float64)).abs().max() > 1e-3  # the check can tell


def test_a_global_phase_changes_only_what_follows_it(case, int6):
    cfg, _, tokens, lut = case
    none = P.phased_score(int6, tokens, lut, SEQ, cfg.eval)
    ec = dataclasses.replace(cfg.eval, ttt_phases="2,4")
    two = P.phased_score(int6, tokens, lut, SEQ, ec)
    assert two.phases == [2, 4] and two.global_steps == 2 + 4  # 96, 150 targets: 3, 5 chunks
    cut = P.documents(tokens)[2][0]  # the first target of document 2 is cut + 1
    assert torch.equal(two.scores.logp[:cut], none.scores.logp[:cut])
    assert (two.scores.logp[cut:] - none.scores.logp[cut:]).abs().min() > 0


def test_audit_passes_phased_ttt(case):
    cfg, model, tokens, lut = case
    rep = P.audit_phased(model, tokens, lut, SEQ, dataclasses.replace(cfg.eval, ttt_phases="2"),
                         max_edits=4)
    assert rep.passed, str(rep)
    assert rep.edits == [41, 45, 49, 97] and rep.docs == 4 and rep.phases == [2]
    assert rep.changed and rep.max_sum_error < 1e-6 and "PASS" in str(rep)


def test_audit_fails_phased_ttt_that_trains_on_a_chunk_before_scoring_it(case, monkeypatch):
    cfg, model, tokens, lut = case
    real = P._DocBatch.score

    def ahead(self, ci):  # a step on chunk ci's targets, then chunk ci scored
        real(self, ci)
        self.step(ci)
        real(self, ci)

    monkeypatch.setattr(P._DocBatch, "score", ahead)
    rep = P.audit_phased(model, tokens, lut, SEQ, cfg.eval, max_edits=2)
    assert not rep.passed and not rep.edits_ok and "FAIL" in str(rep)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, case):
    cfg, model, _, _ = case
    path = tmp_path_factory.mktemp("phased_ckpt") / "model.ckpt"
    save_checkpoint(path, model, cfg)
    return str(path)


PHASED = ["--ttt", "--ttt-mode", "phased", "--ttt-doc-chunk", "64", "--ttt-docs", "2",
          "--ttt-rank", "2", "--ttt-phases", "1", "--ttt-global-chunk", "128"]


def test_eval_and_audit_commands_with_phased_ttt(ckpt, clean_env, capsys, tmp_path):
    out = str(tmp_path / "r.json")
    code = main(["eval", ckpt, "--like-run", "--val-tokens", "600", "--audit", "none", *PHASED,
                 "--json", out])
    assert code == 0, capsys.readouterr().err[-2000:]
    text = capsys.readouterr().out
    assert "with phased TTT" in text and "phased TTT (" in text
    rec = json.load(open(out))
    assert rec["ttt"]["mode"] == "phased" and rec["ttt"]["phases"] == [1]
    assert rec["eval_config"]["ttt_mode"] == "phased" and rec["eval_config"]["ttt_docs"] == 2
    code = main(["audit", ckpt, "--like-run", "--val-tokens", "600", *PHASED,
                 "--audit-positions", "1"])
    text = capsys.readouterr().out
    assert code == 0 and "TTT audit: PASS (phased TTT" in text, text[-2000:]


@pytest.mark.parametrize("args, needle", [
    (["--ttt-phases", "5,3"], "ttt_phases"),
    (["--ttt-lora-targets", "q,x"], "ttt_lora_targets"),
    (["--ttt-mode", "staged"], "--ttt-mode"),
    (["--ttt-doc-chunk", "0"], "--ttt-doc-chunk"),
])
def test_bad_phased_input_is_one_line_exit_2(ckpt, clean_env, capsys, args, needle):
    try:
        code = main(["eval", ckpt, "--like-run", "--val-tokens", "200", "--ttt", *args])
    except SystemExit as e:  # the parser's own checks (types, ranges, choices)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_phase_and_target_strings_are_checked_where_the_pass_reads_them(case):
    cfg, model, tokens, lut = case
    for over, needle in ((dict(ttt_phases="0"), "ttt_phases"), (dict(ttt_phases="a"), "ttt_phases"),
                         (dict(ttt_lora_targets="q,q"), "ttt_lora_targets")):
        with pytest.raises(ConfigError, match=needle):
            P.phased_score(model, tokens, lut, SEQ, dataclasses.replace(cfg.eval, **over))


def _cli(*args):
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_phased_bpb(ckpt, tmp_path):
    worker = os.path.join(ROOT, "tests", "_ttt_phased_worker.py")
    res = []
    for n in (1, 2):
        out = str(tmp_path / f"w{n}")
        r = _cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                 worker, ckpt, out)
        assert r.returncode == 0, r.stderr[-4000:]
        res.append([json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(n)])
    one, two = res
    assert two[0]["world"] == 2 and two[0]["logp"] == two[1]["logp"]
    assert two[0]["logp"] == one[0]["logp"] and two[0]["bpb"] == one[0]["bpb"]  # bit for bit
    assert one[0]["phases"] == [2]


@pytest.mark.slow
def test_train_with_phased_ttt_writes_it_to_the_summary(tmp_path):
    r = _cli("-m", "proteus", "train", "--preset", "smoke", "--out-dir", str(tmp_path),
             "--run-name", "p", "--iterations", "2", "--val-tokens", "600", "--artifact-eval",
             "full", *PHASED)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(tmp_path / "p" / "summary.json"))
    assert summary["ttt"]["mode"] == "phased" and summary["ttt"]["phases"] == [1]
    assert "phased TTT" in r.stdout and summary["audit"]["passed"]
    config = json.load(open(tmp_path / "p" / "config.json"))
    assert config["eval"]["ttt_mode"] == "phased" and config["eval"]["ttt_doc_chunk"] == 64
