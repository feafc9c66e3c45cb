"""Muon over several steps against a plain implementation of the published update, and the
optimiser groups built from a config.

The reference is written the way the modded-nanogpt / Parameter Golf record code writes it, one
matrix at a time in float64: Nesterov momentum (B <- mu B + G, U <- G + mu B), the quintic
Newton-Schulz iteration on U / ||U||_F (transposed when tall), decoupled weight decay, and the
update scaled by sqrt(max(1, rows / cols)).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from proteus.config import build_config
from proteus.model import GPT
from proteus.optim import Muon, build_optimizers, newton_schulz5, ns_torch_dtype, split_params


def plain_newton_schulz5(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    x = x / (x.norm() + 1e-7)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class PlainMuon:
    def __init__(self, params, wd):
        self.params, self.wd = params, wd
        self.bufs = [torch.zeros_like(p, dtype=torch.float64) for p in params]

    def step(self, grads, lr, mu):
        for p, g, buf in zip(self.params, grads, self.bufs, strict=True):
            g = g.double()
            buf.mul_(mu).add_(g)
            u = g + mu * buf  # Nesterov
            o = plain_newton_schulz5(u)
            p.mul_(1 - lr * self.wd)
            p.add_(o, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (6, 6), (3, 2, 5)])
def test_newton_schulz_equals_the_plain_iteration(shape):
    g = torch.randn(shape)
    got = newton_schulz5(g, 5, torch.float32)
    if g.dim() == 3:
        want = torch.stack([plain_newton_schulz5(m) for m in g])
    else:
        want = plain_newton_schulz5(g)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    assert got.shape == g.shape and got.dtype == g.dtype


def test_muon_follows_the_published_update_over_several_steps():
    shapes = [(8, 4), (4, 8), (8, 4), (6, 6), (16, 4), (12, 8)]  # (12, 8): scale sqrt(1.5)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().double().clone() for p in params]
    start = [r.clone() for r in ref]
    opt = Muon(params, lr=0.05, momentum=0.8, ns_steps=5, weight_decay=0.1, ns_dtype="fp32")
    plain = PlainMuon(ref, wd=0.1)
    g = torch.Generator().manual_seed(1)
    # the training loop changes lr and momentum in the group between steps
    for lr, mu in [(0.05, 0.8), (0.04, 0.85), (0.03, 0.9), (0.02, 0.95), (0.01, 0.95)]:
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lr, mu
        opt.step()
        plain.step(grads, lr, mu)
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.detach().double(), r, rtol=0, atol=2e-5)
    # the steps moved the weights well beyond the tolerance
    assert min((p.detach().double() - w0).abs().max() for p, w0 in zip(
        params, start, strict=True)) > 0.05


def test_muon_skips_parameters_without_gradient():
    w, frozen = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    w.grad = torch.randn(4, 4)
    Muon([w, frozen], lr=0.1, momentum=0.9, ns_dtype="fp32").step()
    assert torch.equal(frozen.detach(), torch.ones(4, 4)) and not torch.equal(w, frozen)


def test_ns_dtype_names():
    cpu = torch.device("cpu")
    assert ns_torch_dtype("fp32", cpu) == torch.float32
    assert ns_torch_dtype("bf16", cpu) == torch.bfloat16
    assert ns_torch_dtype("auto", cpu) in (torch.float32, torch.bfloat16)


def test_optimizer_groups_from_the_config():
    cfg = build_config("smoke", environ={})
    tc = dataclasses.replace(cfg.train, matrix_lr=0.011, embed_lr=0.022, scalar_lr=0.033,
                             muon_momentum_start=0.8, muon_ns_steps=4, muon_wd=0.05,
                             adam_beta1=0.7, adam_beta2=0.8, adam_wd=0.06)
    model = GPT(cfg.model)
    groups = split_params(model)
    muon, adam = build_optimizers(model, tc)
    (mg,) = muon.param_groups
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.AdamW)
    assert (mg["lr"], mg["base_lr"], mg["momentum"], mg["ns_steps"], mg["weight_decay"]) == (
        0.011, 0.011, 0.8, 4, 0.05)
    assert [id(p) for p in mg["params"]] == [id(p) for p in groups["matrix"]]
    embed, scalar = adam.param_groups
    assert (embed["lr"], embed["base_lr"], embed["weight_decay"]) == (0.022, 0.022, 0.06)
    assert (scalar["lr"], scalar["base_lr"], scalar["weight_decay"]) == (0.033, 0.033, 0.0)
    assert [id(p) for p in embed["params"]] == [id(p) for p in groups["embed"]]
    assert [id(p) for p in scalar["params"]] == [id(p) for p in groups["scalar"]]
    assert embed["betas"] == (0.7, 0.8) and embed["eps"] == 1e-10
    # every parameter once; matrices are the blocks' and projections' 2-D weights
    assert sorted(map(id, model.parameters())) == sorted(
        id(p) for ps in groups.values() for p in ps)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["embed"]} >= {"tok_emb.weight"}
    assert all(p.dim() == 2 for p in groups["matrix"])
    assert all(not n.startswith("tok_emb") for n in map(names.get, map(id, groups["matrix"])))


def test_untied_head_is_an_embedding_group_parameter():
    cfg = build_config("smoke", environ={})
    model = GPT(dataclasses.replace(cfg.model, tie_embeddings=False))
    groups = split_params(model)
    assert model.lm_head is not None
    assert any(p is model.lm_head.weight for p in groups["embed"])
    assert not any(p is model.lm_head.weight for p in groups["matrix"])


def test_groups_take_a_shared_parameter_once_and_every_other_one():
    class Child(torch.nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.shared = shared  # registered here too, before a parameter of its own
            self.own = torch.nn.Parameter(torch.ones(3))

    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Parameter(torch.ones(2))
            self.child = Child(self.shared)

    m = Parent()
    groups = split_params(m)
    assert sorted(map(id, groups["scalar"])) == sorted([id(m.shared), id(m.child.own)])


# ---------------------------------------------------------------------------------------------
# The pg-record entry's Muon: Polar-Express coefficients and row normalisation

# Amsel et al., "The Polar Express" (2025), 5 iterations, as published (and used by the entry)
PE = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def plain_polar_express(g: torch.Tensor, steps: int) -> torch.Tensor:
    x = g.double() / (g.double().norm() + 1e-7)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for k in range(steps):
        a, b, c = PE[min(k, 4)]
        s = x @ x.T
        x = a * x + b * s @ x + c * s @ s @ x
    return x.T if tall else x


@pytest.mark.parametrize("steps", [5, 7])
@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (3, 6, 5)])
def test_polar_express_equals_the_plain_iteration(shape, steps):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    got = newton_schulz5(g, steps, torch.float32, coeffs="polar-express")
    mats = g if g.dim() == 3 else g[None]
    want = torch.stack([plain_polar_express(m, steps) for m in mats]).view(got.shape)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    classic = newton_schulz5(g, steps, torch.float32)
    assert (classic - got).abs().max() > 1e-2  # a different iteration (this test can fail)


def test_polar_express_orthogonalises_closer_than_classic():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sv = {c: torch.linalg.svdvals(newton_schulz5(g, 5, torch.float64, c))
          for c in ("classic", "polar-express")}
    assert (sv["polar-express"] - 1).abs().max() < (sv["classic"] - 1).abs().max()


def test_muon_row_norm_follows_the_plain_update():
    """Rows of W as stored (a tall matrix's too) at unit norm before Newton-Schulz."""
    shapes = [(8, 4), (4, 8), (6, 6)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().double().clone() for p in params]
    opt = Muon(params, lr=0.05, momentum=0.9, ns_dtype="fp32", ns_coeffs="polar-express",
               row_norm=True, weight_decay=0.1)
    bufs = [torch.zeros_like(r) for r in ref]
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        grads = [torch.randn(s, generator=g) * torch.rand(s[0], 1, generator=g) * 10
                 for s in shapes]  # rows of very different sizes
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        opt.step()
        for r, gr, buf in zip(ref, grads, bufs, strict=True):
            buf.mul_(0.9).add_(gr.double())
            u = gr.double() + 0.9 * buf
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-7)
            r.mul_(1 - 0.05 * 0.1).add_(plain_polar_express(u, 5),
                                        alpha=-0.05 * max(1.0, r.size(0) / r.size(1)) ** 0.5)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach().double(), r, rtol=0, atol=3e-5)


def test_adam_eps_and_scalar_weight_decay_reach_the_groups():
    cfg = build_config("pg-record", {"model.vocab_size": 64, "model.model_dim": 32,
                                     "model.num_heads": 2, "model.num_kv_heads": 1,
                                     "model.num_layers": 11}, environ={})
    model = GPT(cfg.model)
    muon, adam = build_optimizers(model, cfg.train)
    assert adam.defaults["eps"] == 1e-8 and adam.defaults["betas"] == (0.9, 0.99)
    embed, scalar = adam.param_groups
    assert (embed["weight_decay"], embed["lr"]) == (0.085, 0.03)
    assert (scalar["weight_decay"], scalar["lr"]) == (0.02, 0.02)
    g = muon.param_groups[0]
    assert (g["ns_coeffs"], g["row_norm"], g["weight_decay"], g["lr"]) == (
        "polar-express", True, 0.095, 0.026)
    # the gates, mixes and lambdas are AdamW scalars, never Muon matrices
    scalars = {id(p) for p in scalar["params"]}
    for name in ("skip_gates", "lane_post", "lane_resid", "smear.weight", "smear.lam",
                 "blocks.0.attn.gate_w"):
        assert id(model.get_parameter(name)) in scalars, name
