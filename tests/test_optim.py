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

from proteus.model import GPT
from proteus.optim import Muon, build_optimizers, newton_schulz5, ns_torch_dtype, split_params
from proteus.options import build_config


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
