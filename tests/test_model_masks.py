"""The model's document masks (``attn_docs``) and sliding window (``attn_window``): what they
isolate, on both op bundles, and that evaluation of a saved model uses the training masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from proteus.checkpoint import load_model, save_checkpoint
from proteus.data import BOS_ID
from proteus.errors import ConfigError
from proteus.model import GPT
from proteus.options import build_config

pytestmark = pytest.mark.interpret


def _model(kernels="ref", **over):
    cfg = build_config("smoke", environ={})
    torch.manual_seed(0)
    m = GPT(dataclasses.replace(cfg.model, **over), kernels)
    for p in m.parameters():  # zero-initialised projections would hide a leak
        torch.nn.init.normal_(p, std=0.1)
    return m, cfg


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 1024, (2, 64), generator=g)
    x[:, 30] = BOS_ID
    x[1, 50] = BOS_ID
    return x


@pytest.mark.parametrize("kernels", ["ref", "triton"])
def test_nothing_before_a_bos_reaches_the_document(kernels):
    m, _ = _model(kernels, attn_docs=True)
    x = _tokens()
    changed = x.clone()
    changed[:, :30] = torch.randint(2, 1024, (2, 30))
    with torch.no_grad():
        a, b = m.logits(x), m.logits(changed)
    assert torch.equal(a[:, 30:], b[:, 30:])  # attention, SmearGate and BigramHash all reset
    assert not torch.equal(a[:, :30], b[:, :30])
    plain, _ = _model(kernels)
    with torch.no_grad():
        assert not torch.equal(plain.logits(x)[:, 30:], plain.logits(changed)[:, 30:])


@pytest.mark.parametrize("kernels", ["ref", "triton"])
def test_window_bounds_how_far_back_attention_reaches(kernels):
    # One attention layer and no token-mixing extras: logits at t depend on tokens > t - N.
    m, _ = _model(kernels, attn_window=8, num_layers=1, xsa_last_n=0, value_embed_layers="",
                  bigram_buckets=0, smear_gate=False, unet_skips=False)
    x = _tokens()
    changed = x.clone()
    changed[:, 20] = (x[:, 20] + 1) % 1024
    with torch.no_grad():
        a, b = m.logits(x), m.logits(changed)
    assert torch.equal(a[:, 28:], b[:, 28:]) and torch.equal(a[:, :20], b[:, :20])
    assert not torch.equal(a[:, 20:28], b[:, 20:28])


def test_ref_and_triton_agree_with_masks():
    ref, _ = _model("ref", attn_docs=True, attn_window=20)
    tri, _ = _model("triton", attn_docs=True, attn_window=20)
    x = _tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(tri.logits(x), ref.logits(x), rtol=1e-4, atol=1e-4)


def test_attention_mask_options():
    m, _ = _model(attn_docs=True, attn_window=16)
    mask, starts = m.attention_mask(_tokens())
    assert mask["window_size"] == (15, 0)
    assert mask["doc_ids"][0, 29:32].tolist() == [0, 1, 1] and starts[0, 30]
    plain, _ = _model()
    assert plain.attention_mask(_tokens()) == ({}, None)


def test_a_saved_model_evaluates_with_the_masks_it_was_trained_with(tmp_path):
    m, cfg = _model(attn_docs=True, attn_window=24)
    run_cfg = dataclasses.replace(cfg, model=m.cfg)
    save_checkpoint(tmp_path / "model.ckpt", m, run_cfg)
    loaded, lcfg, _ = load_model(str(tmp_path / "model.ckpt"), "ref")
    assert lcfg.model.attn_docs and lcfg.model.attn_window == 24
    x = _tokens(2)
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), m.logits(x))


def test_config_checks_the_window():
    with pytest.raises(ConfigError,
                       match=r"attn_window .*expected an integer in \[0, 2\*\*30\], got -4"):
        build_config("smoke", {"model.attn_window": -4}, environ={})
    cfg = build_config("smoke", environ={"PROTEUS_ATTN_DOCS": "true", "PROTEUS_ATTN_WINDOW": "64"})
    assert cfg.model.attn_docs and cfg.model.attn_window == 64
