"""The pg-record entry's state dict layout (3-D banks) mapped onto ours, on a synthetic state
dict built here in the entry's layout."""

from __future__ import annotations

import os

import pytest
import torch

from proteus.checkpoint import load_model
from proteus.cli import main
from proteus.config import ProteusError, build_config
from proteus.model import GPT, Rotary
from proteus.record_compat import load_record_state_dict, to_record_state_dict

OVER = {"model.vocab_size": 64, "model.model_dim": 64, "model.num_heads": 2,
        "model.num_kv_heads": 1, "model.num_layers": 11}


def _cfg():
    return build_config("pg-record", OVER, environ={}).model


def entry_state_dict(mc, seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under the entry's names and shapes."""
    g = torch.Generator().manual_seed(seed)
    n, d, hd = mc.num_layers, mc.model_dim, mc.head_dim
    kvd, hid = mc.num_kv_heads * hd, mc.mlp_hidden
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"tok_emb.weight": r(mc.vocab_size, d), "qo_bank": r(2 * n, d, d),
          "kv_bank": r(2 * n, kvd, d), "mlp_up_bank": r(n, hid, d),
          "mlp_down_bank": r(n, d, hid), "skip_weights": r(8, d), "skip_gates": r(8, d),
          "parallel_post_lambdas": r(n, 2, 2), "parallel_resid_lambdas": r(n, 2),
          "smear_gate.weight": r(1, 12), "smear_lambda": r(1)}
    for i in range(n):
        b = f"blocks.{i}."
        sd.update({b + "attn_scale": r(d), b + "mlp_scale": r(d), b + "resid_mix": r(2, d),
                   b + "attn.q_gain": r(mc.num_heads), b + "attn.attn_gate_w": r(
                       mc.num_heads, 12)})
    return sd


def test_banks_land_on_our_matrices():
    mc = _cfg()
    sd = entry_state_dict(mc)
    ours = load_record_state_dict(sd, mc)
    GPT(mc).load_state_dict(ours)  # strict: every tensor present, every shape right
    n, hd, r = mc.num_layers, mc.head_dim, mc.rope_dims
    assert torch.equal(ours["blocks.3.attn.proj.weight"], sd["qo_bank"][n + 3])
    assert torch.equal(ours["blocks.3.attn.c_v.weight"], sd["kv_bank"][n + 3])
    assert torch.equal(ours["blocks.4.mlp.fc.weight"], sd["mlp_up_bank"][4])
    assert torch.equal(ours["blocks.4.mlp.proj.weight"], sd["mlp_down_bank"][4])
    assert torch.equal(ours["lane_post"], sd["parallel_post_lambdas"])
    assert torch.equal(ours["smear.lam"], sd["smear_lambda"])
    assert torch.equal(ours["blocks.2.attn.gate_w"], sd["blocks.2.attn.attn_gate_w"])
    # query rows: the halves of each head's rotated dims exchanged, the rest as is
    q, src = ours["blocks.1.attn.c_q.weight"], sd["qo_bank"][1]
    for h in range(mc.num_heads):
        o = h * hd
        assert torch.equal(q[o: o + r // 2], src[o + r // 2: o + r])
        assert torch.equal(q[o + r // 2: o + r], src[o: o + r // 2])
        assert torch.equal(q[o + r: o + hd], src[o + r: o + hd])


def test_round_trip_is_exact():
    mc = _cfg()
    sd = entry_state_dict(mc, seed=1)
    back = to_record_state_dict(load_record_state_dict(sd, mc), mc)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_the_swap_turns_the_entrys_rotation_into_ours():
    """Scores q·k of the entry's RoPE (the pair turned by -θ) with its weights equal ours (+θ)
    with the mapped weights, in float64."""
    mc = _cfg()
    sd = {k: v.double() for k, v in entry_state_dict(mc, seed=2).items()}
    ours = load_record_state_dict(sd, mc)
    t, hd, r = 9, mc.head_dim, mc.rope_dims
    x = torch.randn(1, t, mc.model_dim, dtype=torch.float64)
    half = r // 2
    theta = torch.arange(t, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, r, 2, dtype=torch.float64) / r)
    c, s = theta.cos()[None, :, None], theta.sin()[None, :, None]

    def entry_rope(v):
        a, b = v[..., :half], v[..., half:r]
        return torch.cat((a * c + b * s, -a * s + b * c, v[..., r:]), -1)

    rot = Rotary(r, 10000.0)
    cos, sin = (z.double() for z in rot.cos_sin(t, x.device))
    q_e = entry_rope((x @ sd["qo_bank"][0].T).view(1, t, -1, hd))
    k_e = entry_rope((x @ sd["kv_bank"][0].T).view(1, t, -1, hd))
    q_o = rot.apply((x @ ours["blocks.0.attn.c_q.weight"].T).view(1, t, -1, hd), cos, sin)
    k_o = rot.apply((x @ ours["blocks.0.attn.c_k.weight"].T).view(1, t, -1, hd), cos, sin)
    s_e = torch.einsum("bihd,bjd->bhij", q_e, k_e[:, :, 0])
    s_o = torch.einsum("bihd,bjd->bhij", q_o, k_o[:, :, 0])
    torch.testing.assert_close(s_o, s_e, rtol=4e-6, atol=1e-6)  # the cos/sin table is fp32
    # without the swap the scores differ (the map is needed)
    q_n = rot.apply((x @ sd["qo_bank"][0].T).view(1, t, -1, hd), cos, sin)
    k_n = rot.apply((x @ sd["kv_bank"][0].T).view(1, t, -1, hd), cos, sin)
    assert (torch.einsum("bihd,bjd->bhij", q_n, k_n[:, :, 0]) - s_e).abs().max() > 1e-2


@pytest.mark.parametrize("damage,needle", [
    (lambda sd: sd.pop("kv_bank"), "no tensor 'kv_bank'"),
    (lambda sd: sd.update(qo_bank=sd["qo_bank"][:4]), "too few matrices"),
    (lambda sd: sd.update(skip_gates=sd["skip_gates"][:, :3]), "skip_gates would get shape"),
])
def test_a_state_dict_that_does_not_fit_is_one_clear_error(damage, needle):
    mc = _cfg()
    sd = entry_state_dict(mc)
    damage(sd)
    with pytest.raises(ProteusError, match=needle) as e:
        load_record_state_dict(sd, mc)
    assert "\n" not in str(e.value)


def test_a_config_with_parts_the_entry_lacks_is_refused():
    mc = build_config("pg-record", {**OVER, "model.bigram_buckets": 64}, environ={}).model
    with pytest.raises(ProteusError, match="no counterpart"):
        load_record_state_dict(entry_state_dict(mc), mc)


SMALL = ["--vocab-size", "64", "--model-dim", "64", "--num-heads", "2", "--num-kv-heads", "1"]


def test_import_record_writes_a_checkpoint_eval_reads(tmp_path, capsys, monkeypatch):
    for k in [k for k in os.environ if k.startswith("PROTEUS_")]:
        monkeypatch.delenv(k)
    mc = _cfg()
    sd = {k: v.bfloat16() for k, v in entry_state_dict(mc, seed=5).items()}  # as it trains
    torch.save(sd, tmp_path / "final_model.pt")
    out = tmp_path / "model.ckpt"
    assert main(["import-record", str(tmp_path / "final_model.pt"), "--out", str(out),
                 *SMALL, "--val-files", "/data/val_*.bin"]) == 0
    assert "-> " in capsys.readouterr().out
    model, cfg, _ = load_model(str(out), "ref")
    assert cfg.train.preset == "pg-record" and cfg.model == mc
    assert cfg.train.val_files == "/data/val_*.bin"
    want = load_record_state_dict(sd, mc)
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("case", ["missing", "not_torch", "wrong_model", "exists"])
def test_import_record_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, case):
    for k in [k for k in os.environ if k.startswith("PROTEUS_")]:
        monkeypatch.delenv(k)
    src, out = tmp_path / "final_model.pt", tmp_path / "model.ckpt"
    args = SMALL
    if case == "not_torch":
        src.write_text("not a state dict")
    elif case in ("wrong_model", "exists"):
        torch.save(entry_state_dict(_cfg()), src)
        args = SMALL if case == "exists" else [*SMALL[:-2], "--num-kv-heads", "2"]
    if case == "exists":
        out.write_bytes(b"keep me")
    code = main(["import-record", str(src), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert out.exists() == (case == "exists")
    if case == "exists":
        assert out.read_bytes() == b"keep me"
