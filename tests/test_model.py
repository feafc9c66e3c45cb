"""The model: every flag builds and runs, causality, optimiser groups, Muon math."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from _kernel_checks import assert_within_2x_torch_error

from proteus.model import GPT
from proteus.ops import get_ops
from proteus.optim import Muon, newton_schulz5, split_params
from proteus.options import build_config


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
    g = torch.randn(8, 16)
    out = {}
    for prec in ("fp32", "bf16"):
        w = torch.nn.Parameter(torch.zeros(8, 16))
        w.grad = g.clone()
        Muon([w], lr=1.0, momentum=0.0, ns_dtype=prec).step()
        dt = torch.bfloat16 if prec == "bf16" else torch.float32
        assert torch.equal(w.detach(), -newton_schulz5(g, 5, dt))
        out[prec] = w.detach().clone()
    assert not torch.equal(out["fp32"], out["bf16"])


def test_muon_batches_a_matrix_with_its_transpose_shape():
    # (12, 4) is orthogonalised as its (4, 12) transpose, in one call with the (4, 12) matrix;
    # each must get the update it gets alone, with its own shape scale
    torch.manual_seed(0)
    shapes = [(12, 4), (4, 12), (12, 4)]
    grads = [torch.randn(s) for s in shapes]
    together = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for w, g in zip(together, grads, strict=True):
        w.grad = g.clone()
    opt = Muon(together, lr=0.5, momentum=0.9)
    opt.step()
    assert len(opt.state) == 1  # one batched group
    for w, g in zip(together, grads, strict=True):
        alone = torch.nn.Parameter(torch.zeros(g.shape))
        alone.grad = g.clone()
        Muon([alone], lr=0.5, momentum=0.9).step()
        torch.testing.assert_close(w.detach(), alone.detach(), rtol=1e-5, atol=1e-6)
        assert w.shape == g.shape


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


@pytest.mark.parametrize("cap, n", [(30.0, 1061), (2.0, 1061), (0.0, 1061), (30.0, 9000)])
def test_fused_head_cross_entropy_matches_autograd(cap, n):
    from proteus.model import HEAD_CHUNK_ROWS, HEAD_MAX_CHUNKS, _head_chunks, head_cross_entropy

    # 1061: two chunks of HEAD_CHUNK_ROWS and a remainder; 9000: HEAD_MAX_CHUNKS larger chunks
    assert HEAD_CHUNK_ROWS == 512 and HEAD_MAX_CHUNKS == 16
    assert len(_head_chunks(1061)) == 3 and len(_head_chunks(9000)) == 16
    x = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(50, 16, dtype=torch.float64) * 3).requires_grad_()
    y = torch.randint(0, 50, (n,))
    z = torch.nn.functional.linear(x, w)
    ref = torch.nn.functional.cross_entropy(cap * torch.tanh(z / cap) if cap else z, y)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w))
    ours = head_cross_entropy(x, w, y, cap)
    gx, gw = torch.autograd.grad(ours * 3.0, (x, w))
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gx, 3.0 * gx_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gw, 3.0 * gw_ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the loss-only path
        assert torch.allclose(head_cross_entropy(x, w, y, cap), ref, rtol=1e-12, atol=1e-12)
    (gw_only,) = torch.autograd.grad(head_cross_entropy(x.detach(), w, y, cap), w)
    assert torch.allclose(gw_only, gw_ref, rtol=1e-10, atol=1e-12)


def test_fused_head_under_autocast_matches_unfused():
    # bf16 matmul (as F.linear under autocast), fp32 soft-cap and log-sum-exp: same loss and
    # gradients as the unfused graph to bf16 rounding
    from proteus.model import head_cross_entropy

    x = torch.randn(300, 32, requires_grad=True)
    w = (torch.randn(64, 32) * 0.3).requires_grad_()
    y = torch.randint(0, 64, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.nn.functional.linear(x, w).float()
        ref = torch.nn.functional.cross_entropy(30 * torch.tanh(z / 30), y)
        ours = head_cross_entropy(x, w, y, 30.0)
    assert ours.dtype == torch.float32
    g_ref = torch.autograd.grad(ref, (x, w))
    g = torch.autograd.grad(ours, (x, w))
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(g, g_ref, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("shape", [(3, 5, 32), (2, 7, 6, 128)])
def test_rms_norm_matches_torch_and_its_gradient(shape):
    from proteus.model import rms_norm

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.float64)
    ref = torch.nn.functional.rms_norm(x, (shape[-1],))
    ours = rms_norm(x)
    (g_ref,) = torch.autograd.grad(ref, x, dy)
    (g,) = torch.autograd.grad(ours, x, dy)
    assert torch.allclose(ours, ref, rtol=1e-13, atol=1e-13)
    assert torch.allclose(g, g_ref, rtol=1e-11, atol=1e-12)
    x32 = x.detach().float()  # fp32: same values as torch's; bf16 in -> bf16 out
    torch.testing.assert_close(rms_norm(x32), torch.nn.functional.rms_norm(x32, (shape[-1],)))
    xb = x32.bfloat16()
    assert rms_norm(xb).dtype == torch.bfloat16
    torch.testing.assert_close(rms_norm(xb), torch.nn.functional.rms_norm(xb, (shape[-1],)))


@pytest.mark.parametrize("dims", [8, 32])
def test_rotary_gradient_is_the_inverse_rotation(dims):
    from proteus.model import Rotary, _rotate

    rot = Rotary(dims, 10000.0)
    cos, sin = (c.double() for c in rot.cos_sin(9, torch.device("cpu")))
    x = torch.randn(2, 9, 3, 32, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    ours = rot.apply(x, cos, sin)
    ref = _rotate(x, cos, sin, dims)  # plain autograd through slices and cat
    assert torch.equal(ours, ref)
    (g,) = torch.autograd.grad(ours, x, dy)
    (g_ref,) = torch.autograd.grad(ref, x, dy)
    assert torch.allclose(g, g_ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode, autocast, expect", [
    ("auto", True, torch.float32), ("off", True, torch.bfloat16), ("on", True, torch.float32),
    ("auto", False, torch.float32), ("on", False, torch.float32)])
def test_attention_precision_switch(mode, autocast, expect):
    cfg = small_cfg()
    m = GPT(cfg)
    seen = []
    attention = m.ops.attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return attention(q, k, v, **kw)

    m.set_attention_fp32(mode)
    m.ops = dataclasses.replace(m.ops, attention=spy)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = m(x, x)
    loss.backward()
    assert seen, "attention was not called"
    for q_dt, k_dt, v_dt, autocast_inside in seen:
        if expect == torch.float32:  # upcast, with autocast off (it would cast back to bf16)
            assert (q_dt, k_dt, v_dt, autocast_inside) == (torch.float32,) * 3 + (False,)
        else:  # left to autocast: bf16 SDPA
            assert autocast_inside and k_dt == v_dt == torch.bfloat16
    with pytest.raises(ValueError, match="auto, on or off"):
        m.set_attention_fp32("yes")


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


@pytest.mark.interpret
def test_mlp_on_the_triton_kernel_under_autocast_matches_the_reference():
    # the model casts its fp32 weights to x's dtype and leaves the rest to the op's autocast
    # rule: with --kernels triton the MLP must give what --kernels ref gives, dtype included
    # (before the rule, the backward died in Triton on bf16 x fp32 operands)
    cfg = small_cfg()
    mlp = GPT(cfg).blocks[0].mlp
    torch.nn.init.normal_(mlp.proj.weight, std=0.05)  # zero-initialised in the model
    x = torch.randn(2, 16, cfg.model_dim)
    out = {}
    for kind in ("ref", "triton"):
        mlp.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mlp(x, get_ops(kind))
        y.float().square().sum().backward()
        out[kind] = [y.detach()] + [p.grad.clone() for p in (mlp.fc.weight, mlp.proj.weight)]
    mlp64 = copy.deepcopy(mlp).double()
    y64 = mlp64(x.double(), get_ops("ref"))
    y64.square().sum().backward()
    ref64 = [y64.detach(), mlp64.fc.weight.grad, mlp64.proj.weight.grad]
    assert out["triton"][0].dtype == out["ref"][0].dtype == torch.bfloat16
    for name, a, b, r in zip(("y", "dW_fc", "dW_proj"), out["triton"], out["ref"], ref64,
                             strict=True):
        assert a.dtype == b.dtype
        assert_within_2x_torch_error(name, a, b, r)
