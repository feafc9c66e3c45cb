"""The pg-record entry's model components, each against the independent float64 formulation of
tests/_record_ref.py, and the preset's exact parameter count.

Bound: our model in float64 against the reference in float64 agrees to 1e-9 on the final hidden
states, except for one fp32 step we keep on purpose: the RoPE cos/sin table is computed in
fp32 (as in training), which bounds the difference by ~|x|·2^-24·T ≈ 1e-6 at these sizes; the
tests use 2e-6 where RoPE is on.
"""

from __future__ import annotations

import dataclasses

import _record_ref as R
import pytest
import torch

from proteus.config import ModelConfig, build_config
from proteus.model import GPT, rms_norm

BASE = dict(vocab_size=64, num_layers=6, model_dim=32, num_heads=2, num_kv_heads=1,
            rope_dims=8, xsa_last_n=0, bigram_buckets=0, value_embed_layers="",
            smear_gate=False, mlp_mult=2.0)
T = 12

# name -> (options turned on, options of the same model with it off, or None where the
# component changes shapes)
COMPONENTS = {
    "xsa_on_all_blocks": (dict(xsa_last_n=6), dict(xsa_last_n=0)),
    "qk_gain_init_5": (dict(q_gain_init=5.0), None),
    "partial_rope_8_of_16": (dict(rope_dims=8), dict(rope_dims=16)),
    "rope_yarn_stretch": (dict(rope_yarn_len=8), dict(rope_yarn_len=0)),
    "mlp_4x": (dict(mlp_mult=4.0), None),
    "skip_gates": (dict(skip_gates=True), dict(skip_gates=False)),
    "parallel_lanes_mean": (dict(parallel_from=4), dict(parallel_from=0)),
    "parallel_lanes_final_attn": (dict(parallel_from=4, parallel_final="attn"),
                                  dict(parallel_from=4, parallel_final="mean")),
    "parallel_lanes_final_mlp": (dict(parallel_from=4, parallel_final="mlp"),
                                 dict(parallel_from=4, parallel_final="mean")),
    "depth_recurrence": (dict(recur_first=1, recur_last=2, recur_extra=2),
                         dict(recur_first=1, recur_last=2, recur_extra=0)),
    "sparse_attn_gate": (dict(attn_gate_window=6, attn_gate_scale=0.5),
                         dict(attn_gate_window=6, attn_gate_scale=0.0)),
    "smear_window_bos_fixed": (dict(smear_gate=True, smear_window=6), None),
    "smear_lerp_bos_fixed": (dict(smear_gate=True), None),
    "everything": (dict(xsa_last_n=6, q_gain_init=5.0, mlp_mult=4.0, skip_gates=True,
                        parallel_from=4, recur_first=1, recur_last=2, recur_extra=2,
                        attn_gate_window=6, attn_gate_scale=0.5, smear_gate=True,
                        smear_window=6, attn_docs=True, mlp_slope=0.5), None),
}


def _tokens():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(2, 64, (2, T), generator=g)
    idx[0, 5] = R.BOS  # a document start inside the sequence: the smear must not cross it
    idx[1, 0] = R.BOS
    return idx


def _model(**over):
    mc = ModelConfig(**{**BASE, **over})
    torch.manual_seed(0)
    m = GPT(mc, "ref").double()
    with torch.no_grad():  # every tensor non-trivial, zero-initialised ones included
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() < 2 or "lane" in name else 0.2))
    return m, mc


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_component_matches_the_float64_formulation(name):
    on, off = COMPONENTS[name]
    m, mc = _model(**on)
    idx = _tokens()
    tol = 2e-6 if mc.rope_dims else 1e-9
    states = (False, True) if mc.recur_extra else (True,)
    for rec in states:
        m.set_recurrence(rec)
        got = m._features(idx)
        want = R.features(m.state_dict(), mc, idx, recurring=rec)
        assert (got - want).abs().max().item() < tol, (name, rec)
        if off is not None and rec:  # the component changes the function (this test can fail)
            mc_off = dataclasses.replace(mc, **off)
            other = R.features(m.state_dict(), mc_off, idx, recurring=rec)
            assert (other - want).abs().max().item() > 1e3 * tol, (name, rec)


def test_recurrence_changes_the_function_and_defaults_on():
    m, mc = _model(recur_first=1, recur_last=2, recur_extra=2)
    assert m.recurring  # a built (or loaded) model evaluates with its recurrence
    idx = _tokens()
    on = m._features(idx)
    m.set_recurrence(False)
    assert (m._features(idx) - on).abs().max() > 1e-3
    assert m.block_plan(True) == ([0, 1, 2, 1, 2], [1, 2, 3, 4, 5])
    assert m.block_plan(False) == ([0, 1, 2], [3, 4, 5])


def test_smear_masks_a_document_start_without_attn_docs():
    """BOS fix: the token at a BOS gets nothing from the previous document, with attention
    masking on or off; elsewhere the smear does mix in the previous token."""
    for window in (0, 6):
        m, mc = _model(smear_gate=True, smear_window=window)
        assert not mc.attn_docs
        idx = _tokens()
        emb = m.tok_emb.weight[idx]
        if window:
            out = m.smear(emb, idx == R.BOS)
        else:
            emb = rms_norm(emb)
            out = m.smear(emb, idx == R.BOS)
        # the BOS at position 5 is smeared as if it began the sequence (no previous token)
        alone = m.smear(emb[:, 5:], (idx == R.BOS)[:, 5:])
        assert torch.equal(out[0, 5], alone[0, 0])
        starts = torch.zeros_like(idx, dtype=torch.bool)  # without the mask it would differ
        assert (m.smear(emb, starts)[0, 5] - out[0, 5]).abs().max() > 1e-3


def test_pg_record_preset_has_the_entrys_parameter_count():
    cfg = build_config("pg-record", environ={})
    with torch.device("meta"):
        m = GPT(cfg.model)
    assert m.num_params() == 35_945_671
    assert m.bigram is None and m.ve is None
    assert cfg.model.vocab_size == 8192 and cfg.train.ema_decay == 0.9965


def test_parameter_shapes_of_the_components():
    m, mc = _model(**COMPONENTS["everything"][0])
    sd = m.state_dict()
    assert sd["blocks.0.mlp.fc.weight"].shape == (128, 32)  # 4x
    assert sd["blocks.0.attn.gate_w"].shape == (2, 6)
    assert sd["smear.weight"].shape == (1, 6) and sd["smear.lam"].shape == (1,)
    # recurrence (0 1 2 1 2 1 2 3 4 5): 10 passes, 5 encoder outputs for 5 decoder passes
    assert sd["skip_weights"].shape == sd["skip_gates"].shape == (5, 32)
    assert sd["lane_post"].shape == (6, 2, 2) and sd["lane_resid"].shape == (6, 2)
    fresh = GPT(mc)
    assert torch.all(fresh.blocks[0].attn.gate_w == 0)
    assert torch.all(fresh.lane_resid == 1.1) and torch.all(fresh.lane_post == 1.0)
    assert torch.all(fresh.skip_gates == 0) and torch.all(fresh.smear.lam == 0)


def test_orthogonal_init_of_the_input_projections():
    torch.manual_seed(0)
    m = GPT(ModelConfig(**{**BASE, "init_orthogonal": True}))
    for lin in (m.blocks[1].attn.c_q, m.blocks[1].attn.c_k, m.blocks[1].mlp.fc):
        w = lin.weight.double()
        gram = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
        torch.testing.assert_close(gram, torch.eye(gram.size(0), dtype=torch.float64),
                                   rtol=0, atol=1e-5)
    assert torch.all(m.blocks[1].attn.proj.weight == 0)  # output projections stay zero
    plain = GPT(ModelConfig(**BASE)).blocks[1].attn.c_q.weight.double()
    assert (plain @ plain.T - torch.eye(32, dtype=torch.float64)).abs().max() > 0.1
