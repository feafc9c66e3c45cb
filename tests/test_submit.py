"""Records folders: the rules, the seed summary and the folder's files, on synthetic run
directories (their numbers are ours to choose, so every rule can be broken on purpose)."""

from __future__ import annotations

import json
import math

import pytest

from proteus.options import build_config
from proteus.pack import packed_code_bytes
from proteus.submit import (
    SubmitError,
    baseline_values,
    check_same_config,
    load_run,
    rule_failures,
    summarize,
    write_records,
)


def _run(tmp_path, seed, *, score=2.0, art=700_000, train_s=100.0, eval_s=50.0, audit=True,
         sliding=True, name=None, **cfg_over):
    d = tmp_path / (name or f"run{seed}")
    d.mkdir()
    cfg = build_config("smoke", {"train.seed": seed, "train.run_name": d.name,
                                 **cfg_over}, environ={}).to_dict()
    summary = dict(
        steps=10, train_seconds=train_s, eval_seconds=eval_s, hardware="1x cpu",
        val=dict(bpb=score + 0.01, loss=1.5, tokens=1000, bytes=2400),
        cache=dict(bpb_cache=score - 0.2, audit_passed=audit),
        artifact=dict(path=str(d / "model.int6"), artifact_bytes=art, total_bytes=art + 1,
                      quantized_bpb=score + 0.011, scores={"int6 sliding": score}))
    if sliding:
        summary["val_sliding"] = dict(bpb=score, stride=64)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "log.jsonl").write_text('{"event": "config"}\n')
    (d / "train.log").write_text("step 1 loss 6.9\n")
    return d


def test_a_good_submission_is_written(tmp_path):
    runs = [load_run(_run(tmp_path, s, score=v)) for s, v in ((1, 2.0), (2, 2.02), (3, 1.98))]
    out, failures = write_records(runs, tmp_path / "rec", name="t", author="a", github_id="g",
                                  blurb="b", baseline=[2.3, 2.31, 2.29])
    assert failures == []
    for f in ("README.md", "submission.json", "train_gpt.py", "train_seed1.log",
              "train_seed3.jsonl"):
        assert (out / f).is_file(), f
    sub = json.loads((out / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(2.0) and sub["seeds"] == [1, 2, 3]
    assert sub["bytes_code"] == packed_code_bytes() == (out / "train_gpt.py").stat().st_size
    assert sub["bytes_total"] == 700_000 + sub["bytes_code"]
    readme = (out / "README.md").read_text()
    assert "mean 2.0000" in readme and "p = " in readme


@pytest.mark.parametrize("over, needle", [
    (dict(art=15_990_000), "bytes > 16,000,000"),
    (dict(train_s=600.5), "training took 600.5 s > 600 s"),
    (dict(eval_s=601.0), "evaluation took 601.0 s > 600 s"),
    (dict(eval_s=None), "no evaluation wall time"),
    (dict(audit=False), "audit did not pass"),
    (dict(sliding=False), "overlap check"),
])
def test_each_rule_fails_alone_naming_the_seed(tmp_path, over, needle):
    good = load_run(_run(tmp_path, 1))
    bad = load_run(_run(tmp_path, 7, **over))
    failures = rule_failures([good, bad], 50_000)
    assert len(failures) == 1 and failures[0].startswith("seed 7:") and needle in failures[0]
    out, f2 = write_records([good, bad], tmp_path / "rec", name="t", author="a", github_id="g",
                            blurb="b")
    assert f2 and not out.exists()  # nothing written


def test_mixed_configurations_and_repeated_seeds_are_refused(tmp_path):
    a = load_run(_run(tmp_path, 1))
    b = load_run(_run(tmp_path, 2, **{"train.matrix_lr": 0.5}))
    with pytest.raises(SubmitError, match="different configurations.*train.matrix_lr"):
        check_same_config([a, b])
    c = load_run(_run(tmp_path, 1, name="again"))
    with pytest.raises(SubmitError, match="repeat a seed"):
        check_same_config([a, c])


def test_incomplete_run_and_bad_baseline_are_one_line(tmp_path):
    d = _run(tmp_path, 1)
    (d / "summary.json").unlink()
    with pytest.raises(SubmitError, match="incomplete: no summary.json"):
        load_run(d)
    with pytest.raises(SubmitError, match="at least 2 values"):
        baseline_values(["1.2"])
    with pytest.raises(SubmitError, match="neither a number nor a run directory"):
        baseline_values(["1.2,abc"])
    assert baseline_values(["1.2,1.3", str(_run(tmp_path, 5, score=1.5))]) == \
        [1.2, 1.3, 1.5]


def test_summary_mean_spread_and_welch(tmp_path):
    runs = [load_run(_run(tmp_path, s, score=v)) for s, v in ((1, 2.0), (2, 2.1))]
    s = summarize(runs, [2.5, 2.6, 2.4])
    assert s["mean"] == pytest.approx(2.05)
    assert s["std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))
    assert 0 < s["welch"]["p"] < 0.05
    # 0.005 nats per token at 1000 tokens / 2400 bytes
    assert s["welch_record"]["margin_bpb"] == pytest.approx(0.005 / math.log(2) * 1000 / 2400)
    assert s["welch_record"]["p"] > s["welch"]["p"]


def test_seeds_then_submit_end_to_end(tmp_path, capsys, monkeypatch):
    """Two smoke seeds through `proteus train --seeds`, then `proteus submit` of their runs."""
    from proteus import cli

    for k in [k for k in __import__("os").environ if k.startswith("PROTEUS_")]:
        monkeypatch.delenv(k)
    out = tmp_path / "runs"
    args = ["train", "--preset", "smoke", "--seeds", "7,8", "--iterations", "2",
            "--warmup-steps", "0", "--val-tokens", "1024", "--stride", "32", "--out-dir",
            str(out), "--run-name", "s", "--baseline", "9.9,9.8"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "mean " in text and "one-sided Welch" in text
    summary = json.loads((out / "s-seeds.json").read_text())
    assert [r["seed"] for r in summary["seeds"]] == [7, 8]
    for s in (7, 8):
        d = out / f"s-seed{s}"
        assert (d / "train.log").read_text().count("step") >= 2
        assert json.loads((d / "summary.json").read_text())["eval_seconds"] > 0
    rec = tmp_path / "rec"
    assert cli.main(["submit", str(out / "s-seed7"), str(out / "s-seed8"), "--out",
                     str(rec)]) == 0
    assert (rec / "train_seed8.log").is_file() and (rec / "train_gpt.py").is_file()
    # a rule broken on purpose: a 1-second evaluation limit is not the challenge's, so break
    # the budget instead by claiming a huge artifact for one seed
    s8 = out / "s-seed8" / "summary.json"
    d = json.loads(s8.read_text())
    d["artifact"]["artifact_bytes"] = 16_000_000
    s8.write_text(json.dumps(d))
    capsys.readouterr()
    assert cli.main(["submit", str(out / "s-seed7"), str(out / "s-seed8"), "--out",
                     str(tmp_path / "rec2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed 8" in err[0] and "> 16,000,000" in err[0]
    assert not (tmp_path / "rec2").exists()


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "smoke", "--seeds", "abc"], "--seeds expects"),
    (["train", "--preset", "smoke", "--seeds", "0"], "count in [1, 100]"),
    (["train", "--preset", "smoke", "--seeds", "1,1"], "distinct"),
    (["train", "--preset", "smoke", "--baseline", "1.2,1.3"], "--baseline goes with --seeds"),
    (["train", "--preset", "smoke", "--seeds", "1,2", "--baseline", "1.2"], "at least 2 values"),
    (["submit", "/nope", "--out", "/tmp/never"], "incomplete"),
])
def test_bad_seed_and_submit_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    from proteus import cli

    argv = argv + (["--out-dir", str(tmp_path)] if argv[0] == "train" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.iterdir())
