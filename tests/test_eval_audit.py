"""The evaluation's audit (proteus/eval/audit.py) catches each class of bug in the code that
produces the number: each is broken on purpose here, and the audit that ``evaluate`` runs
must fail (and pass on the unbroken code, with the same data)."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

import proteus.eval.audit as A
import proteus.eval.blend as B
import proteus.eval.scoring as S
import proteus.eval.ttt as T
from proteus import data as D
from proteus.eval import evaluate
from proteus.model import build_model
from proteus.options import build_config

SEQ, STRIDE, CHUNK = 64, 32, 256


@pytest.fixture(scope="module")
def case():
    cfg = build_config("smoke", {"eval.ttt_lr": 0.01, "eval.ttt_params": "lora"}, environ={})
    torch.manual_seed(0)
    model = build_model(cfg, "ref")
    tokens = D.load_tokens(D.bundled_val_glob(), "val", limit=3 * CHUNK + 1)
    lut = D.build_byte_lut(D.load_tokenizer(), 1024)
    return cfg, model, tokens, lut


def _run(case, **over) -> dict:
    cfg, model, tokens, lut = case
    ev = dict(stride=STRIDE, eval_batch_seqs=4, audit="cheap", audit_positions=2,
              ngram_backend="numpy")
    ec = dataclasses.replace(cfg.eval, **{**ev, **over})
    return evaluate(model, tokens, dataclasses.replace(cfg, eval=ec), lut=lut).audit


@pytest.mark.slow
def test_the_audit_passes_the_unbroken_evaluation(case):
    a = _run(case, cache="ngram", ttt=True, ttt_chunk=CHUNK)
    assert a["passed"] is True and a["level"] == "cheap", a
    assert set(a["checks"]) == {"windows", "targets", "bytes", "sums", "cache causal", "cache",
                                "ttt causal"}


def test_the_audit_passes_plain_and_sliding(case):
    a = _run(case)
    assert a["passed"] is True and set(a["checks"]) == {"windows", "targets", "bytes", "sums"}


def test_a_target_scored_twice_or_skipped(case, monkeypatch):
    real = S.windows

    def overlapping(n, seq, stride):  # the last window scores one target early: one target
        w = real(n, seq, stride)     # twice, the last one never (sliding windows only)
        s, e, f = w[-1]
        return w[:-1] + [(s, e - 1, f - 1)] if f - 1 > s else w

    monkeypatch.setattr(S, "windows", overlapping)
    a = _run(case)
    assert a["passed"] is False and not a["checks"]["windows"]


def test_a_target_scored_at_the_wrong_place(case, monkeypatch):
    real = S._score_batch

    def shifted(model, tokens, batch, *args, **kwargs):  # windows one token early
        return real(model, tokens, [(max(s - 1, 0), e - 1 if s else e, f) for s, e, f in batch],
                    *args, **kwargs)

    monkeypatch.setattr(S, "_score_batch", shifted)
    a = _run(case)
    assert a["passed"] is False and not a["checks"]["targets"], a


def test_a_wrong_byte_table(case, monkeypatch):
    real = D.ByteLUT.target_bytes

    def no_spaces(self, prev, target):  # forgets the leading spaces
        return self.base_bytes[target] + 0 * real(self, prev, target)

    monkeypatch.setattr(D.ByteLUT, "target_bytes", no_spaces)
    a = _run(case)
    assert a["passed"] is False and not a["checks"]["bytes"], a


def test_a_sum_that_drops_a_record(case, monkeypatch):
    # a reduction that loses one rank's last record (here: the last target)
    real = S.TokenScores.bpb
    monkeypatch.setattr(S.TokenScores, "bpb", lambda self: real(
        S.TokenScores(self.first, self.logp[:-1], self.nbytes)))
    a = _run(case)
    assert a["passed"] is False and not a["checks"]["sums"], a
    monkeypatch.setattr(S.TokenScores, "bpb", real)
    exact = S.exact_sum
    monkeypatch.setattr(S, "exact_sum", lambda v: exact(v) * (1 + 2**-52))  # one ulp off
    a = _run(case)
    assert a["passed"] is False and not a["checks"]["sums"], a


@pytest.mark.slow
def test_a_cache_that_reads_its_target(case, monkeypatch):
    real = B._counts

    def ahead(tokens, end, order, backend, chunk, doc_start=None, bits=10):
        c, d = real(tokens, end, order, backend, chunk, doc_start, bits)
        c.occ[..., :-1] = c.occ[..., 1:].clone()  # each position reads the next one's counts
        return c, d

    monkeypatch.setattr(B, "_counts", ahead)
    a = _run(case, cache="ngram")
    assert a["passed"] is False and not a["checks"]["cache causal"], a


@pytest.mark.slow
def test_ttt_that_trains_on_a_chunk_before_scoring_it(case, monkeypatch):
    # the leak that escaped the old audit: the first target of the next chunk trained on
    real = T._train_chunk

    def ahead(model, params, opt, tokens, k, *args):
        real(model, params, opt, tokens, k + 1 if (k + 2) * CHUNK < tokens.numel() else k,
             *args)

    monkeypatch.setattr(T, "_train_chunk", ahead)
    a = _run(case, ttt=True, ttt_chunk=CHUNK)
    assert a["passed"] is False and not a["checks"]["ttt causal"], a


def test_exact_total_is_the_exact_sum():
    g = torch.Generator().manual_seed(0)
    v = -torch.rand(10000, generator=g, dtype=torch.float64) * torch.logspace(-8, 3, 10000,
                                                                              dtype=torch.float64)
    assert A.exact_total(v) == S.exact_sum(v)
    assert A.exact_total(torch.tensor([1e16, 1.0, -1e16])) == 1.0


def test_exact_sum_fed_in_parts_is_fsum_of_every_value():
    # exact_sum feeds fsum 65,536 values at a time (bounded memory at 62 M targets): the sum is
    # still the correctly rounded one, across part boundaries too
    g = torch.Generator().manual_seed(1)
    v = (torch.rand(200_001, generator=g, dtype=torch.float64) - 0.5) * torch.logspace(
        -10, 16, 200_001, dtype=torch.float64)
    v[65_535], v[65_536] = 1e16, -1e16  # a cancellation that straddles a part boundary
    v[65_537] = 1.0
    assert S.exact_sum(v) == math.fsum(v.tolist())
    assert S.exact_sum(v.reshape(1, -1)) == math.fsum(v.tolist())


def test_eval_with_no_options_scores_plain_only_and_like_run_replays_the_run():
    from proteus.cli import _cli_values, build_parser
    from proteus.commands import eval_config

    run = build_config("cpu-tiny", environ={})  # the run: stride 64, the cache, 131,072 tokens
    assert run.eval.stride and run.eval.cache == "ngram"
    ec = eval_config(run, {}, like_run=False).eval
    assert (ec.stride, ec.cache, ec.ttt, ec.val_tokens, ec.audit) == (0, "none", False, 0,
                                                                        "cheap")
    assert eval_config(run, {}, like_run=True).eval == run.eval
    given = {"eval.stride": 32, "eval.audit": "full"}
    assert eval_config(run, given, like_run=True).eval.stride == 32
    assert eval_config(run, {}, like_run=False, default_audit="full").eval.audit == "full"
    args = build_parser().parse_args(["eval", "x.ckpt", "--no-audit", "--like-run"])
    assert _cli_values(args)["eval.audit"] == "none" and args.like_run
    args = build_parser().parse_args(["train", "--no-audit"])
    assert _cli_values(args)["eval.audit"] == "none"


def test_the_default_eval_command_exits_1_with_one_line_when_its_audit_fails(tmp_path, capsys,
                                                                             monkeypatch):
    # `proteus eval` with no options (plain windows and the cheap audit), on a byte table that
    # forgets leading spaces: the numbers are printed, then one line on stderr, exit 1
    from proteus.checkpoint import save_checkpoint
    from proteus.cli import main

    for k in [k for k in os.environ if k.startswith("PROTEUS_")]:
        monkeypatch.delenv(k)
    cfg = build_config("smoke", environ={})
    torch.manual_seed(0)
    ckpt = tmp_path / "model.ckpt"
    save_checkpoint(ckpt, build_model(cfg, "ref"), cfg)
    assert main(["eval", str(ckpt), "--val-tokens", "512"]) == 0
    capsys.readouterr()
    real = D.ByteLUT.target_bytes
    monkeypatch.setattr(D.ByteLUT, "target_bytes",
                        lambda self, prev, target: self.base_bytes[target] + 0 * real(
                            self, prev, target))
    assert main(["eval", str(ckpt), "--val-tokens", "512"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the evaluation's audit failed (bytes)" in err[0], err


def test_row_sum_tolerance_holds_float32_rows_and_not_a_broken_one():
    """The TTT audits' bound on |sum p - 1| for a float32 row: soft-capped logits of size 30 at
    V = 8192 stay inside it (they left 1e-6, the old bound, at up to 5.1e-6 on the SP8192
    model); a row whose mass is off by 1e-4 does not."""
    from proteus.eval.scoring import row_sum_tolerance

    g = torch.Generator().manual_seed(0)
    tol = row_sum_tolerance(30.0, 8192)
    worst = 0.0
    for _ in range(20):
        z = 30.0 * torch.tanh(4.0 * torch.randn(8192, generator=g) / 30.0)
        lp = torch.log_softmax(z.float(), -1)
        worst = max(worst, abs(lp.double().exp().sum().item() - 1.0))
        assert abs((lp.double().exp() * (1 + 1e-4)).sum().item() - 1.0) > tol
    assert worst <= tol
    assert row_sum_tolerance(30.0, 1024) < tol < 1e-4


def test_a_scorer_that_returns_too_few_scores_leaves_no_uninitialised_value(monkeypatch):
    """score_windows writes in place; a batch that returns fewer scores than its windows say
    must come out as it came (what the audit counts), never as a hole of torch.empty."""
    real = S._score_batch
    given = []

    def short(*args, **kwargs):
        out = [lp[:-1] for lp in real(*args, **kwargs)]  # every window drops its last target
        given.extend(out)
        return out

    monkeypatch.setattr(S, "_score_batch", short)
    model = build_model(build_config("smoke", environ={}))
    tokens = torch.randint(0, 1024, (600,), generator=torch.Generator().manual_seed(0))
    got = S.score_windows(model, tokens, S.windows(599, 64, 0), batch_seqs=3)
    # the batches run side by side, so ``given`` is in any order: compare as multisets
    assert torch.equal(got.sort().values, torch.cat(given).sort().values)
