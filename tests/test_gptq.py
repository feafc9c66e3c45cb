"""GPTQ, LQER and int7 embeddings: the quantiser, the drop-in layer, the artifact fields (with
crafted headers), `proteus quantize` and the train options."""

from __future__ import annotations

import json
import lzma
import os
import struct
import subprocess

import pytest
import torch
from test_checkpoint import _rewrite  # a crafted header: edited JSON, checksums redone
from torch import nn

from proteus import artifact as A
from proteus.checkpoint import load_model, save_checkpoint
from proteus.config import ProteusError, build_config
from proteus.gptq import QuantChoices, collect_hessians, quantize_model
from proteus.kernels.gptq import gptq_quantize, lqer_factors, sigma_scale
from proteus.kernels.int6_matmul import Int6Linear, replace_linear_int6
from proteus.model import build_model
from proteus.quant import quantize_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL = os.path.join(ROOT, "proteus", "data", "fineweb_val_000000.bin")


def _problem(out=64, inp=128, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    mix = torch.randn(inp, inp, generator=g) * 0.2 + torch.eye(inp)
    x = torch.randn(n, inp, generator=g) @ mix  # correlated inputs: where GPTQ pays
    return w, x


def _out_err(x, w, w_hat):
    return float(((x @ (w - w_hat).T) ** 2).sum())


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """No correlation between inputs: nothing to compensate, so GPTQ rounds each weight to the
    nearest step (bit for bit)."""
    w, _ = _problem()
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5)
    q, s = gptq_quantize(w, h, 31, 4.0)
    assert torch.equal(s, sigma_scale(w, 31, 4.0))
    rtn = torch.round(w / s.float()[:, None]).clamp(-31, 31).to(torch.int8)
    assert torch.equal(q, rtn)


@pytest.mark.parametrize("out, inp, block", [(64, 128, 128), (33, 52, 16), (1, 8, 3)])
def test_gptq_cuts_the_output_error_of_rtn_with_the_same_scales(out, inp, block):
    w, x = _problem(out, inp)
    h = x.T @ x
    q, s = gptq_quantize(w, h, 31, 3.0, block=block)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 31 and s.dtype == torch.float16
    rtn = torch.round(w / s.float()[:, None]).clamp(-31, 31)
    e_gptq = _out_err(x, w, q.float() * s.float()[:, None])
    e_rtn = _out_err(x, w, rtn * s.float()[:, None])
    assert e_gptq < 0.75 * e_rtn, (e_gptq, e_rtn)


def test_gptq_rejects_bad_inputs_with_one_line():
    w, x = _problem()
    with pytest.raises(ValueError, match=r"hessian must be \(128, 128\)"):
        gptq_quantize(w, torch.eye(64))
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(w, torch.full((128, 128), float("nan")))
    with pytest.raises(ValueError, match="clip_sigmas > 0 or scale"):
        gptq_quantize(w, torch.eye(128), clip_sigmas=None)
    lin = nn.Linear(128, 64)
    with pytest.raises(ValueError, match="needs hessian"):
        Int6Linear.from_linear(lin, method="gptq")
    with pytest.raises(ValueError, match="method must be"):
        Int6Linear.from_linear(lin, method="awq")
    with pytest.raises(ValueError, match="lqer factors must be"):
        Int6Linear.from_quantized(torch.zeros(64, 128, dtype=torch.int8), torch.ones(64),
                                  lqer=(torch.zeros(64, 2), torch.zeros(3, 128)))


def test_int6_linear_gptq_and_lqer_drop_in():
    w, x = _problem()
    lin = nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(w)
    ref = lin(x)
    rtn = Int6Linear.from_linear(lin, use_kernel=False)
    gptq = Int6Linear.from_linear(lin, use_kernel=False, method="gptq", hessian=x.T @ x)
    both = Int6Linear.from_linear(lin, use_kernel=False, method="gptq", hessian=x.T @ x,
                                  lqer_rank=4)
    err = {k: float(((m(x) - ref) ** 2).sum().detach()) for k, m in
           (("rtn", rtn), ("gptq", gptq), ("both", both))}
    assert err["gptq"] < 0.75 * err["rtn"] and err["both"] < err["gptq"], err
    assert gptq.bias is lin.bias and both.lqer_a.shape == (64, 4) and "lqer_rank=4" in repr(both)
    # forward = the int6 layer + the low-rank term, exactly
    plain = Int6Linear(both.packed, both.scale, both.bias, use_kernel=False)
    want = plain(x) + (x @ both.lqer_b.T) @ both.lqer_a.T
    assert torch.allclose(both(x), want, rtol=0, atol=1e-6)


def test_replace_linear_int6_calibrates_each_layer_on_its_own_inputs():
    torch.manual_seed(0)
    _, x = _problem(n=512)
    net = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 32))
    ref = net(x).detach()
    import copy

    rtn = replace_linear_int6(copy.deepcopy(net), use_kernel=False)
    cal = replace_linear_int6(copy.deepcopy(net), use_kernel=False,
                              calibration=[x[:256], x[256:]])
    assert all(isinstance(m, Int6Linear) for m in (cal[0], cal[2]))
    e_rtn = float(((rtn(x) - ref) ** 2).sum())
    e_cal = float(((cal(x) - ref) ** 2).sum())
    assert e_cal < e_rtn, (e_cal, e_rtn)


def test_lqer_factors_are_the_best_low_rank_approximation():
    e = torch.randn(40, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, b = lqer_factors(e, 3)
    sv = torch.linalg.svdvals(e)
    resid = float(torch.linalg.matrix_norm(e.float() - a @ b) ** 2)
    assert abs(resid - float((sv[3:] ** 2).sum())) < 1e-3 * resid


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("gq")
    cfg = build_config("smoke", {}, environ={})
    torch.manual_seed(0)
    model = build_model(cfg, "ref")
    with torch.no_grad():  # trained-like spread (zero-init projections would quantise to 0)
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("blocks."):
                p.normal_(0, 0.05)
    save_checkpoint(str(d / "model.ckpt"), model, cfg)
    return d, cfg, model


def test_gptq_lqer_int7_artifact_round_trips_and_old_kinds_still_load(smoke, tmp_path):
    _, cfg, model = smoke
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (2, 64), generator=g) for _ in range(3)]
    hess = collect_hessians(model, batches)
    assert set(hess) == {n + ".weight" for n, m in model.named_modules()
                         if isinstance(m, nn.Linear) and n.startswith("blocks.")}
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if "c_q" in n)
    qs, rep = quantize_model(model, QuantChoices("gptq", 0.0, 2, 2, 7), hess)
    assert len(rep["lqer"]) == 2 and any(t.kind == "int7" for t in qs.tensors.values())
    path = str(tmp_path / "m.int6")
    A.write_artifact(path, qs, {"run_config": cfg.to_dict()})
    back, _ = A.read_artifact(path)
    for name, t in qs.tensors.items():
        b = back.tensors[name]
        assert b.kind == t.kind and torch.equal(b.dequantize(), t.dequantize()), name
        assert (b.lqer is None) == (t.lqer is None)
    m2 = load_model(path, "ref")[0]
    idx = batches[0]
    want = model.logits(idx)
    got = m2.logits(idx)
    assert float((got - want).abs().max().detach()) < 0.5  # quantised, not broken
    text = A.inspect_artifact(path)
    assert "int7" in text and "#lqer_a" in text
    # an RTN int8 artifact (today's format) still loads
    old = str(tmp_path / "old.int6")
    A.write_artifact(old, quantize_state_dict({k: v.detach() for k, v in
                                               model.state_dict().items()}),
                     {"run_config": cfg.to_dict()})
    assert load_model(old, "ref")[0] is not None


def _lqer_edits():
    def entry(h, suffix):
        return next(t for t in h["tensors"] if t["name"].endswith(suffix))

    def base(h):
        return next(t for t in h["tensors"] if t["name"] == entry(h, "#lqer_a")["lqer_of"])

    edits = []
    for v in [None, 5, "blocks.0.mlp.fc.weight#lqer_a", "nope", "tok_emb.weight"]:
        edits.append((f"lqer_of={v!r}", lambda h, v=v: entry(h, "#lqer_a").update(lqer_of=v)))
    for v in [[1, 1], [3], [0, 0]]:
        edits.append((f"a.shape={v}", lambda h, v=v: entry(h, "#lqer_a").update(shape=v)))
    edits += [
        ("a kind int6", lambda h: entry(h, "#lqer_a").update(kind="int6")),
        ("b orphan", lambda h: entry(h, "#lqer_b").pop("lqer_of")),
        ("b renamed", lambda h: entry(h, "#lqer_b").update(name="x#lqer_b")),
        ("base kind fp16", lambda h: base(h).update(kind="fp16")),
        ("int7 kind on int8", lambda h: next(t for t in h["tensors"]
                                             if t.get("kind") == "int7").update(kind="int8")),
        ("int7 stream lanes", lambda h: h["tensors"][-1]["streams"]["int7"].update(lanes=0)),
        ("int7 stream n", lambda h: h["tensors"][-1]["streams"]["int7"].update(n=-1)),
        ("int7 ml", lambda h: next(t for t in h["tensors"]
                                   if t.get("kind") == "int7").update(ml=500)),
    ]
    return edits


def test_crafted_lqer_and_int7_fields_give_one_line(smoke, tmp_path):
    _, cfg, model = smoke
    g = torch.Generator().manual_seed(1)
    hess = collect_hessians(model, [torch.randint(0, cfg.model.vocab_size, (2, 32),
                                                  generator=g)])
    qs, _ = quantize_model(model, QuantChoices("gptq", 0.0, 2, 1, 7), hess)
    good = str(tmp_path / "good.int6")
    A.write_artifact(good, qs, {"run_config": cfg.to_dict()})
    raw = open(good, "rb").read()
    path = tmp_path / "m.int6"
    for label, edit in _lqer_edits():
        path.write_bytes(_rewrite(raw, edit))
        with pytest.raises(ProteusError) as e:
            load_model(str(path), "ref")
        assert "\n" not in str(e.value), label


def _cli(capsys, *args):
    from proteus.cli import main

    code = main(list(args))
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, cap.out, cap.err)


def test_quantize_command_writes_a_gptq_artifact_and_refuses_validation_tokens(smoke, tmp_path,
                                                                               capsys):
    d, _, _ = smoke
    out = tmp_path / "q.int6"
    r = _cli(capsys, "quantize", str(d / "model.ckpt"), "--method", "gptq", "--lqer-rank", "2",
             "--embed-bits", "7", "--calib-batches", "2", "--calib-seqs", "2", "--out", str(out),
             "--calib-files", os.path.join(ROOT, "proteus", "data", "fineweb_train_000002.bin"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "calibration: 256 training tokens" in r.stdout and "LQER rank 2" in r.stdout
    meta = A.read_artifact(str(out))[1]
    assert meta["quantiser"]["method"] == "gptq" and len(meta["quantiser"]["lqer"]) == 3
    r = _cli(capsys, "quantize", str(d / "model.ckpt"), "--method", "gptq", "--calib-files", VAL,
             "--out", str(tmp_path / "bad.int6"))
    assert r.returncode == 2 and "overlaps the validation tokens" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad.int6").exists()


@pytest.mark.parametrize("args, needle", [
    (["--method", "awq"], "method must be one of"), (["--embed-bits", "6"], "embed bits must be 7"),
    (["--lqer-rank", "-1"], "lqer rank"), (["--clip-sigmas", "0.1"], "clip sigmas"),
    (["--calib-batches", "0"], "calibration batches"), ([], "pass --out FILE")])
def test_quantize_bad_values_are_one_line(args, needle, tmp_path, capsys):
    from proteus.cli import main

    out = ["--out", str(tmp_path / "x.int6")] if args else []
    assert main(["quantize", str(tmp_path / "missing.ckpt"), *args, *out]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.int6").exists()


def test_train_options_choose_the_run_artifacts_quantiser(smoke, tmp_path):
    from proteus.run import write_run_artifact

    _, _, model = smoke
    cfg = build_config("smoke", {"train.quant_method": "gptq", "train.lqer_rank": 2,
                                 "train.lqer_top_k": 1, "train.embed_bits": 7,
                                 "train.quant_calib_batches": 2}, environ={})
    out = write_run_artifact(model, cfg, tmp_path)
    qs, meta = A.read_artifact(out["path"])
    q = meta["quantiser"]
    assert q["method"] == "gptq" and q["embed_bits"] == 7 and len(q["lqer"]) == 1
    assert q["calibration"]["tokens"] == 2 * 512
    assert q["calibration"]["files"] == ["fineweb_train_000000.bin"]  # only what was read
    assert sum(t.lqer is not None for t in qs.tensors.values()) == 1
    assert any(t.kind == "int7" for t in qs.tensors.values())
    with pytest.raises(ProteusError, match="quant_method .*expected one of rtn, gptq"):
        build_config("smoke", {"train.quant_method": "awq"}, environ={})


def _grouping_state(same: bool):
    """Two roles with the same mean |q| per row and column (so the same contexts) but
    different value distributions: two-point ±4 against a spread over 0..8."""
    from proteus.quant import QTensor, QuantizedState

    g = torch.Generator().manual_seed(5)
    sign = torch.randint(0, 2, (256, 256), generator=g) * 2 - 1
    a = (4 * sign).to(torch.int8)
    b = a.clone() if same else ((torch.randint(0, 2, (256, 256), generator=g) * 8) * sign)
    qs = QuantizedState()
    for i, q in enumerate((a, b, a, b)):
        role = ("attn.c_q", "mlp.fc")[i % 2]
        qs.tensors[f"blocks.{i // 2}.{role}.weight"] = QTensor(
            "int6", (256, 256), q=q.to(torch.int8), scale=torch.ones(256).half())
    return qs


def test_tables_are_grouped_by_role_only_where_it_pays(tmp_path):
    for same in (True, False):
        qs = _grouping_state(same)
        path = str(tmp_path / f"g{same}.int6")
        A.write_artifact(path, qs, {})
        raw = open(path, "rb").read()
        hlen = struct.unpack_from("<I", raw, 12)[0]
        hdr = json.loads(lzma.decompress(raw[16 : 16 + hlen]))
        stream = hdr["tensors"][-1]["streams"]["int6"]
        assert ("groups" in stream) == (not same), stream
        back, _ = A.read_artifact(path)
        for n, t in qs.tensors.items():
            assert torch.equal(back.tensors[n].q, t.q)
    # crafted group fields: one line each
    path = tmp_path / "m.int6"
    raw = open(str(tmp_path / "gFalse.int6"), "rb").read()
    for label, edit in [
        ("groups=0", lambda h: h["tensors"][-1]["streams"]["int6"].update(groups=0)),
        ("groups=300", lambda h: h["tensors"][-1]["streams"]["int6"].update(groups=300)),
        ("groups=1", lambda h: h["tensors"][-1]["streams"]["int6"].update(groups=1)),
        ("group=2", lambda h: h["tensors"][0].update(group=2)),
        ("group=-1", lambda h: h["tensors"][0].update(group=-1)),
        ("group='x'", lambda h: h["tensors"][0].update(group="x")),
    ]:
        path.write_bytes(_rewrite(raw, edit))
        with pytest.raises(ProteusError) as e:
            A.read_artifact(str(path))
        assert "\n" not in str(e.value), label
