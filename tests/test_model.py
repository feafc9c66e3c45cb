"""The model: every flag builds and runs, causality, optimiser groups, Muon math."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from proteus.config import build_config
from proteus.model import GPT
from proteus.optim import Muon, newton_schulz5, split_params


def small_cfg(**over):
    return dataclasses.replace(build_config("smoke", environ={}).model, **over)


@pytest.mark.parametrize(
    "over",
    [
        {},
        dict(qk_norm=False, rope_dims=0, xsa_last_n=0),
        dict(bigram_buckets=0, value_embed_layers="", smear_gate=False),
        dict(resid_mix=False, unet_skips=False, ln_scale=False, logit_softcap=0.0),
        dict(tie_embeddings=False, num_layers=3, xsa_last_n=3, value_embed_layers="0,2"),
    ],
)
def test_every_flag_combination_trains_a_step(over):
    cfg = small_cfg(**over)
    m = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = m(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_model_is_causal():
    cfg = small_cfg()
    m = GPT(cfg).eval()
    # give zero-initialised projections some weight so every path carries signal
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randint(0, cfg.vocab_size, (1, 24))
    y = x.clone()
    y[0, 15:] = (y[0, 15:] + 1) % cfg.vocab_size
    a, b = m.logits(x), m.logits(y)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_softcap_bounds_logits():
    cfg = small_cfg(logit_softcap=5.0)
    m = GPT(cfg)
    with torch.no_grad():
        m.tok_emb.weight.mul_(1000)
    z = m.logits(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert z.abs().max() <= 5.0


def test_optimizer_groups_cover_all_params_once():
    m = GPT(small_cfg())
    g = split_params(m)
    ids = [id(p) for ps in g.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert all(p.dim() == 2 for p in g["matrix"])
    assert m.tok_emb.weight in g["embed"]
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(".attn." in names[id(p)] or ".mlp." in names[id(p)] or "proj" in names[id(p)]
               for p in g["matrix"])


def test_newton_schulz_orthogonalises():
    g = torch.randn(3, 64, 32, dtype=torch.float64)
    o = newton_schulz5(g, 5).double()
    s = torch.linalg.svdvals(o)
    # the quintic's fixed points spread singular values around 1 (roughly 0.7 .. 1.2)
    assert s.min() > 0.5 and s.max() < 1.3
    # batched == one at a time
    for i in range(3):
        assert torch.allclose(o[i], newton_schulz5(g[i], 5).double())


def test_newton_schulz_in_bf16_orthogonalises_too():
    g = torch.randn(4, 128, 64)
    o = newton_schulz5(g, 5, torch.bfloat16)
    assert o.dtype == g.dtype  # computed in bf16, returned in the parameter's dtype
    s = torch.linalg.svdvals(o.double())
    assert s.min() > 0.5 and s.max() < 1.3
    ref = newton_schulz5(g, 5, torch.float32)
    assert (o - ref).norm() / ref.norm() < 0.05  # the same update up to bf16 rounding


def test_muon_ns_dtype_reaches_the_update():
    torch.manual_seed(0)
    g = torch.randn(16, 8)
    out = {}
    for prec in ("fp32", "bf16"):
        w = torch.nn.Parameter(torch.zeros(16, 8))
        w.grad = g.clone()
        Muon([w], lr=1.0, momentum=0.0, ns_dtype=prec).step()
        dt = torch.bfloat16 if prec == "bf16" else torch.float32
        assert torch.equal(w.detach(), -(16 / 8) ** 0.5 * newton_schulz5(g, 5, dt))
        out[prec] = w.detach().clone()
    assert not torch.equal(out["fp32"], out["bf16"])


def test_muon_update_matches_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    w0 = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.9, ns_steps=5, weight_decay=0.5)
    g = torch.randn(8, 4)
    w.grad = g.clone()
    opt.step()
    buf = g  # first step: B = G
    upd = newton_schulz5(g + 0.9 * buf, 5)
    expect = w0 * (1 - 0.1 * 0.5) - 0.1 * (8 / 4) ** 0.5 * upd
    assert torch.allclose(w.detach(), expect, atol=1e-6)


@pytest.mark.parametrize("cap", [30.0, 2.0])
def test_fused_softcap_cross_entropy_matches_autograd(cap):
    from proteus.model import SoftcapCrossEntropy

    z = (torch.randn(64, 50, dtype=torch.float64) * 10).requires_grad_()
    y = torch.randint(0, 50, (64,))
    ref = torch.nn.functional.cross_entropy(cap * torch.tanh(z / cap), y)
    (g_ref,) = torch.autograd.grad(ref, z)
    ours = SoftcapCrossEntropy.apply(z, y, cap)
    (g,) = torch.autograd.grad(ours * 3.0, z)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g, 3.0 * g_ref, rtol=1e-10, atol=1e-12)


def test_every_parameter_gets_gradient_after_one_step():
    # zero-initialised factor pairs (table x projection) must not both be zero, or neither learns
    cfg = small_cfg()
    m = GPT(cfg)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    for _ in range(3):  # the longest zero-init chain (attn proj -> ve proj -> ve table) is 3
        opt.zero_grad()
        m(x, x).backward()
        opt.step()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
