"""Records folders: the rules, the seed summary and the folder's files; and ``submit`` trusting
nothing it can recompute (issue 29): forged, edited, swapped, mistyped, nested and symlinked
run directories are refused in one line, and a folder only ever holds recomputed numbers.

Finished run directories are made without training (a seeded smoke model, its real int6
artifact scored on 256 validation tokens, a sealed summary), once per module; the rules are
checked on in-memory runs whose numbers are ours to choose.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from proteus import data as D
from proteus.cli import main
from proteus.eval import load_eval_tokens
from proteus.files import SEAL_KEY, atomic_write_json, seal_json
from proteus.model import build_model
from proteus.options import build_config
from proteus.pack import packed_code_bytes
from proteus.run import open_run_dir, write_run_artifact, write_summary
from proteus.submit import (
    SeedRun,
    SubmitError,
    baseline_values,
    check_same_config,
    load_run,
    rule_failures,
    summarize,
    write_records,
)


def finished_run(parent: Path, seed: int, name: str | None = None, **over) -> Path:
    """A run directory as `proteus train` leaves it, from an untrained seeded smoke model."""
    cfg = build_config("smoke", {"train.seed": seed, "train.run_name": name or f"run{seed}",
                                 "train.out_dir": str(parent), "eval.val_tokens": 256,
                                 "eval.stride": 32, **over}, environ={})
    d = open_run_dir(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg, "ref")
    val, _ = load_eval_tokens(D.bundled_val_glob(), cfg.eval, cfg.model.vocab_size)
    lut = D.build_byte_lut(D.load_tokenizer(""), cfg.model.vocab_size)
    art = write_run_artifact(model, cfg, d, val, lut, 9.0)
    summary = dict(steps=10, train_seconds=100.0, eval_seconds=50.0, hardware="1x cpu",
                   val=dict(bpb=9.0, loss=6.0, tokens=1023, bytes=2400),
                   val_sliding=dict(bpb=9.0, stride=32), artifact=art)
    write_summary(d, summary, cfg)
    (d / "log.jsonl").write_text('{"event": "config"}\n')
    (d / "train.log").write_text(f"step 1 loss 6.9 (seed {seed})\n")
    return d


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("runs")
    for seed in (1, 2):
        finished_run(parent, seed)
    return parent


@pytest.fixture
def runs(runs_dir, tmp_path) -> Path:
    """A private copy of the module's two finished runs (run1, run2), to damage."""
    dest = tmp_path / "runs"
    shutil.copytree(runs_dir, dest, symlinks=True)
    return dest


def _submit(capsys, argv) -> tuple[int, list[str]]:
    code = main(["submit", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.strip().splitlines()


def _refused(capsys, runs_dir: Path, names, needle: str, out: Path) -> None:
    code, err = _submit(capsys, [*(str(runs_dir / n) for n in names), "--out", str(out)])
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not os.path.lexists(out) and not list(out.parent.glob(f".{out.name}.tmp*"))


def _edit_summary(run: Path, edit, reseal: bool) -> None:
    """Change summary.json: by hand (the seal left as it was) or as a forger who recomputes the
    seal (the binds kept)."""
    path = run / "summary.json"
    d = json.loads(path.read_text())
    seal = d.pop(SEAL_KEY)
    edit(d)
    atomic_write_json(path, seal_json(d, seal["format"], seal["binds"]) if reseal
                      else {**d, SEAL_KEY: seal})


# ---------------------------------------------------------------------------------------------
# A good submission: every number recomputed


def test_a_good_submission_is_written_from_recomputed_numbers(runs, tmp_path, capsys):
    out = tmp_path / "rec"
    code, err = _submit(capsys, [str(runs / f"run{s}") for s in (1, 2)]
                        + ["--out", str(out), "--baseline", "9.3,9.31,9.29"])
    assert code == 0, err
    for f in ("README.md", "submission.json", "train_gpt.py", "train_seed1.log",
              "train_seed2.jsonl"):
        assert (out / f).is_file(), f
    sub = json.loads((out / "submission.json").read_text())
    claimed = [json.loads((runs / f"run{s}" / "summary.json").read_text())["artifact"]
               for s in (1, 2)]
    art_bytes = [(runs / f"run{s}" / "model.int6").stat().st_size for s in (1, 2)]
    assert sub["seeds"] == [1, 2]
    assert sub["bytes_code"] == packed_code_bytes() == (out / "train_gpt.py").stat().st_size
    assert sub["bytes_total"] == max(art_bytes) + sub["bytes_code"]
    s = json.loads((out / "summary.json").read_text())
    for row, c, v in zip(s["seeds"], claimed, sub["val_bpb_per_seed"], strict=True):
        # recomputed: the plain score agrees with the run's own, and the sliding window (which
        # the run did not score on its artifact) was computed by submit
        assert abs(row["bpb_plain"] - c["quantized_bpb"]) <= 1e-4
        assert row["bpb_sliding"] is not None and "int6 sliding 32" not in c["scores"]
        assert v == row["score"] == min(row["bpb_plain"], row["bpb_sliding"])
    readme = (out / "README.md").read_text()
    assert "recomputed by `proteus submit`" in readme and "p = " in readme
    assert (out / "train_seed2.log").read_text() == "step 1 loss 6.9 (seed 2)\n"


# ---------------------------------------------------------------------------------------------
# Forgery: a forged summary never reaches a records folder


def test_a_hand_edited_summary_is_refused(runs, tmp_path, capsys):
    """The issue's case: quantized_bpb 0.9 and artifact_bytes 1 written by hand."""
    def edit(d):
        d["artifact"]["quantized_bpb"] = 0.9
        d["artifact"]["artifact_bytes"] = 1
    _edit_summary(runs / "run2", edit, reseal=False)
    _refused(capsys, runs, ["run1", "run2"], "was changed after it was written", tmp_path / "r")


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["artifact"].update(quantized_bpb=0.9), "claims int6 plain 0.900000 bpb"),
    (lambda d: d["artifact"]["scores"].update({"int6 plain": 0.9}), "claims int6 plain"),
    (lambda d: d["artifact"]["scores"].update({"int6 magic": 0.1}),
     "claims a score 'int6 magic' that its artifact's config does not produce"),
])
def test_a_resealed_forged_score_is_recomputed_and_refused(runs, tmp_path, capsys, edit,
                                                           needle):
    _edit_summary(runs / "run2", edit, reseal=True)
    _refused(capsys, runs, ["run2", "run1"], needle, tmp_path / "r")


def test_claimed_bytes_are_never_used(runs, tmp_path, capsys):
    """A forger who reseals a smaller artifact size gets the file's own size in the folder."""
    _edit_summary(runs / "run1", lambda d: d["artifact"].update(artifact_bytes=1,
                                                               total_bytes=2), reseal=True)
    out = tmp_path / "rec"
    code, err = _submit(capsys, [str(runs / "run1"), "--out", str(out)])
    assert code == 0, err
    sub = json.loads((out / "submission.json").read_text())
    assert sub["bytes_total"] == (runs / "run1" / "model.int6").stat().st_size + \
        sub["bytes_code"]


def test_a_swapped_or_changed_artifact_is_refused(runs, tmp_path, capsys):
    shutil.copyfile(runs / "run1" / "model.int6", runs / "run2" / "model.int6")
    _refused(capsys, runs, ["run2"], "model.int6 is not the artifact its summary.json was "
             "sealed with", tmp_path / "r")
    # a forger who also reseals the binds for the swapped artifact: the artifact's own config
    # (seed 1) is not the run's (seed 2)
    d = json.loads((runs / "run2" / "summary.json").read_text())
    d1 = json.loads((runs / "run1" / "summary.json").read_text())
    seal = d.pop(SEAL_KEY)
    atomic_write_json(runs / "run2" / "summary.json", seal_json(d, seal["format"],
                                                                d1[SEAL_KEY]["binds"]))
    _refused(capsys, runs, ["run2"], "holds another model or seed than its config.json",
             tmp_path / "r")


def test_random_summary_mutations_never_change_a_number(runs_dir, tmp_path):
    """200 random byte edits of a summary.json: each is refused in one line, or (an edit that
    leaves the same JSON, such as whitespace) reads back the very same summary."""
    src = runs_dir / "run1"
    original = load_run(src).summary
    raw = (src / "summary.json").read_bytes()
    d = tmp_path / "run1"
    shutil.copytree(src, d)
    rng = random.Random(29)
    refused = 0
    for _ in range(200):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        (d / "summary.json").write_bytes(bytes(b))
        try:
            assert load_run(d).summary == original
        except SubmitError as e:
            assert "\n" not in str(e)
            refused += 1
    assert refused >= 190


@pytest.mark.parametrize("where, value, needle", [
    ("config", "abc", "seed"), ("config", None, "seed"), ("config", [1], "seed"),
    ("summary", 5, "field artifact must be dict"),
    ("summary", {"quantized_bpb": "0.9", "scores": {}}, "field artifact.quantized_bpb"),
    ("summary", {"quantized_bpb": 0.9, "scores": {"int6 plain": True}}, "score 'int6 plain'"),
    ("summary", {"quantized_bpb": float("nan"), "scores": {}}, "not a finite number"),
])
def test_mistyped_fields_are_one_line(runs, tmp_path, capsys, where, value, needle):
    """The issue's tracebacks: a seed of "abc"/null/[1], ``{"artifact": 5}``; resealed, so
    the type check itself is what refuses them."""
    run = runs / "run1"
    if where == "config":
        path = run / "config.json"
        d = json.loads(path.read_text())
        seal = d.pop(SEAL_KEY)
        d["train"]["seed"] = value
        atomic_write_json(path, seal_json(d, seal["format"], seal["binds"]))
    else:
        _edit_summary(run, lambda d: d.update(artifact=value), reseal=True)
    _refused(capsys, runs, ["run1"], needle, tmp_path / "r")


def test_deep_and_huge_summaries_are_one_line(runs, tmp_path, capsys):
    path = runs / "run1" / "summary.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    _refused(capsys, runs, ["run1"], "nests 200000 levels deep", tmp_path / "r")
    with open(path, "wb") as f:
        f.truncate(17 << 20)
    _refused(capsys, runs, ["run1"], "over the 16.0 MiB limit", tmp_path / "r")


# ---------------------------------------------------------------------------------------------
# Symbolic links: submit reads only the run's own files


@pytest.mark.parametrize("name", ["train.log", "log.jsonl", "summary.json", "model.int6",
                                  "config.json"])
def test_symlinks_in_a_run_are_refused(runs, tmp_path, capsys, name):
    secret = tmp_path / "secret.txt"
    real = runs / "run1" / name
    secret.write_bytes(real.read_bytes() if name != "train.log" else b"the secret\n")
    real.unlink()
    real.symlink_to(secret)
    _refused(capsys, runs, ["run1"], "is a symbolic link", tmp_path / "r")


def test_an_existing_out_path_is_never_written_through(runs, tmp_path, capsys):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "elsewhere")
    code, err = _submit(capsys, [str(runs / "run1"), "--out", str(link)])
    assert code == 2 and "already exists" in err[0]
    assert not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------------------------------------
# The rules, the summary and the baseline (in-memory runs: their numbers are ours to choose)


def _seed_run(seed, *, score=2.0, art=700_000, train_s=100.0, eval_s=50.0, audit=True,
              sliding=True, **cfg_over) -> SeedRun:
    cfg = build_config("smoke", {"train.seed": seed, **cfg_over}, environ={}).to_dict()
    scores = {"int6 plain": score + 0.01, "int6 + cache": score - 0.2}
    if sliding:
        scores["int6 sliding 64"] = score
    summary = dict(steps=10, train_seconds=train_s, eval_seconds=eval_s, hardware="1x cpu")
    return SeedRun(Path(f"run{seed}"), cfg, summary, art, "0" * 64,
                   dict(scores=scores, loss=1.5, tokens=1000, bytes=2400,
                        stride=64 if sliding else None, audit=audit))


@pytest.mark.parametrize("over, needle", [
    (dict(art=15_990_000), "bytes > 16,000,000"),
    (dict(train_s=600.5), "training took 600.5 s > 600 s"),
    (dict(eval_s=601.0), "evaluation took 601.0 s > 600 s"),
    (dict(eval_s=None), "no evaluation wall time"),
    (dict(audit=False), "audit did not pass"),
    (dict(sliding=False), "overlap check"),
])
def test_each_rule_fails_alone_naming_the_seed(tmp_path, over, needle):
    good, bad = _seed_run(1), _seed_run(7, **over)
    for r in (good, bad):
        r.path = tmp_path / r.path
        r.path.mkdir()
        (r.path / "log.jsonl").write_text("{}\n")
    failures = rule_failures([good, bad], 50_000)
    assert len(failures) == 1 and failures[0].startswith("seed 7:") and needle in failures[0]
    out, f2 = write_records([good, bad], tmp_path / "rec", name="t", author="a", github_id="g",
                            blurb="b")
    assert f2 and not out.exists()  # nothing written


def test_mixed_configurations_and_repeated_seeds_are_refused():
    with pytest.raises(SubmitError, match="different configurations.*train.matrix_lr"):
        check_same_config([_seed_run(1), _seed_run(2, **{"train.matrix_lr": 0.5})])
    with pytest.raises(SubmitError, match="repeat a seed"):
        check_same_config([_seed_run(1), _seed_run(1)])


def test_incomplete_run_and_bad_baseline_are_one_line(runs):
    (runs / "run1" / "summary.json").unlink()
    with pytest.raises(SubmitError, match="incomplete: no summary.json"):
        load_run(runs / "run1")
    with pytest.raises(SubmitError, match="at least 2 values"):
        baseline_values(["1.2"])
    with pytest.raises(SubmitError, match="neither a number nor a run directory"):
        baseline_values(["1.2,abc"])
    values = baseline_values(["1.2,1.3", str(runs / "run2")])  # a run dir: rescored
    assert values[:2] == [1.2, 1.3] and 1.0 < values[2] < 20


def test_summary_mean_spread_and_welch():
    runs = [_seed_run(s, score=v) for s, v in ((1, 2.0), (2, 2.1))]
    s = summarize(runs, [2.5, 2.6, 2.4])
    assert s["mean"] == pytest.approx(2.05 - 0.2)  # the cache is each seed's best
    assert s["std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))
    assert 0 < s["welch"]["p"] < 0.05
    # 0.005 nats per token at 1000 tokens / 2400 bytes
    assert s["welch_record"]["margin_bpb"] == pytest.approx(0.005 / math.log(2) * 1000 / 2400)
    assert s["welch_record"]["p"] > s["welch"]["p"]


def test_seeds_then_submit_end_to_end(tmp_path, capsys, monkeypatch):
    """Two smoke seeds through `proteus train --seeds`, then `proteus submit` of their runs."""
    for k in [k for k in os.environ if k.startswith("PROTEUS_")]:
        monkeypatch.delenv(k)
    out = tmp_path / "runs"
    args = ["train", "--preset", "smoke", "--seeds", "7,8", "--iterations", "2",
            "--warmup-steps", "0", "--val-tokens", "1024", "--stride", "32", "--out-dir",
            str(out), "--run-name", "s", "--baseline", "9.9,9.8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "mean " in text and "one-sided Welch" in text
    summary = json.loads((out / "s-seeds.json").read_text())
    assert [r["seed"] for r in summary["seeds"]] == [7, 8]
    for s in (7, 8):
        d = out / f"s-seed{s}"
        assert (d / "train.log").read_text().count("step") >= 2
        assert json.loads((d / "summary.json").read_text())["eval_seconds"] > 0
    rec = tmp_path / "rec"
    assert main(["submit", str(out / "s-seed7"), str(out / "s-seed8"), "--out",
                 str(rec)]) == 0
    assert (rec / "train_seed8.log").is_file() and (rec / "train_gpt.py").is_file()
    # the budget broken by a claim: a hand edit is refused before any rule is looked at
    s8 = out / "s-seed8" / "summary.json"
    d = json.loads(s8.read_text())
    d["artifact"]["artifact_bytes"] = 16_000_000
    s8.write_text(json.dumps(d))
    capsys.readouterr()
    assert main(["submit", str(out / "s-seed7"), str(out / "s-seed8"), "--out",
                 str(tmp_path / "rec2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s-seed8" in err[0] and "changed after it was written" in err[0]
    assert not (tmp_path / "rec2").exists()


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "smoke", "--seeds", "abc"], "--seeds expects"),
    (["train", "--preset", "smoke", "--seeds", "0"], "count in [1, 100]"),
    (["train", "--preset", "smoke", "--seeds", "1,1"], "distinct"),
    (["train", "--preset", "smoke", "--baseline", "1.2,1.3"], "--baseline goes with --seeds"),
    (["train", "--preset", "smoke", "--seeds", "1,2", "--baseline", "1.2"], "at least 2 values"),
    (["submit", "/nope", "--out", "/tmp/never"], "incomplete"),
    (["submit", "/nope", "--out", "/tmp/never", "--tolerance", "nan"], "--tolerance"),
])
def test_bad_seed_and_submit_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    argv = argv + (["--out-dir", str(tmp_path)] if argv[0] == "train" else [])
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.iterdir())
