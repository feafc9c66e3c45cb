"""Presets, the generated CLI/env layer, and bad-input errors."""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys

import pytest

from proteus.config import (
    MAX_ORDER,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    _field_problem,
    _field_type,
    _interval,
)
from proteus.errors import ConfigError
from proteus.options import add_config_arguments, build_config, env_overrides
from proteus.presets import PRESETS


def test_presets_build_and_validate():
    for name in PRESETS:
        cfg = build_config(name, environ={})
        assert cfg.train.preset == name
    s = build_config("h100-seed", environ={})
    # SPEC's reference model and the seed-era record's schedule
    assert (s.model.num_layers, s.model.model_dim, s.model.num_heads, s.model.num_kv_heads) == (
        11, 512, 8, 4)
    assert (s.model.rope_dims, s.model.xsa_last_n, s.model.mlp_hidden) == (16, 4, 1536)
    assert s.model.value_embed_set == (9, 10) and s.model.mlp_slope == 0.9
    assert (s.train.batch_tokens, s.train.seq_len, s.train.max_wallclock_s) == (786432, 2048, 600)
    assert (s.train.warmdown_steps, s.train.warmup_steps, s.train.ema_decay) == (3500, 20, 0.997)
    assert s.train.muon_ns_coeffs == "classic" and s.train.warmdown_frac == 0


def test_h100_is_spec_model_with_pg_record_training():
    h, s, r = (build_config(n, environ={}) for n in ("h100", "h100-seed", "pg-record"))
    assert h.model == s.model  # SPEC's reference model, vocabulary 1024
    differ = {f.name for f in dataclasses.fields(h.train)
              if getattr(h.train, f.name) != getattr(r.train, f.name)}
    # pg-record's 0.5 s GPTQ reserve, validation during training, and no loop to switch on
    assert differ == {"preset", "max_wallclock_s", "val_every", "recur_at_frac"}
    assert (h.train.muon_ns_coeffs, h.train.muon_row_norm, h.train.ema_decay) == (
        "polar-express", True, 0.9965)
    assert (h.train.warmdown_frac, h.train.min_lr, h.train.max_wallclock_s) == (0.85, 0.1, 600)


def test_layering_preset_env_cli():
    cfg = build_config("cpu-tiny", {"model.model_dim": 64}, environ={"PROTEUS_MODEL_DIM": "96",
                                                                     "PROTEUS_SEED": "7"})
    assert cfg.model.model_dim == 64 and cfg.train.seed == 7
    cfg = build_config("cpu-tiny", {}, environ={"PROTEUS_QK_NORM": "false"})
    assert cfg.model.qk_norm is False
    assert build_config("cpu-tiny", {}, environ={}).eval.ngram_doc is True
    cfg = build_config("cpu-tiny", {}, environ={"PROTEUS_NGRAM_DOC": "false"})
    assert cfg.eval.ngram_doc is False


def test_unknown_env_var_is_an_error():
    with pytest.raises(ConfigError, match="unknown environment variable PROTEUS_MODLE_DIM"):
        env_overrides({"PROTEUS_MODLE_DIM": "3"})


def test_bad_env_value_is_an_error():
    with pytest.raises(ConfigError, match="PROTEUS_SEQ_LEN: expected an integer"):
        env_overrides({"PROTEUS_SEQ_LEN": "long"})


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="unknown preset 'tiny'"):
        build_config("tiny", environ={})


def test_seq_len_not_dividing_batch_is_an_error():
    with pytest.raises(ConfigError, match="does not divide batch_tokens"):
        build_config("cpu-tiny", {"train.seq_len": 300}, environ={})


def test_model_validation_messages():
    with pytest.raises(ConfigError, match="num_heads 6 is not a multiple of num_kv_heads 4"):
        ModelConfig(num_heads=6, num_kv_heads=4, model_dim=384).validate()
    with pytest.raises(ConfigError, match="rope_dims"):
        ModelConfig(rope_dims=100).validate()


def test_model_accepts_the_ends_of_its_cross_field_ranges():
    # validation that is too strict is a bug too (mutants rejecting block 0 or 0 XSA blocks
    # survived the first mutation run); the values just outside are refused
    n, head_dim = 3, 16
    base = dict(num_layers=n, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=1,
                value_embed_layers="1")

    def model(**kw):
        return ModelConfig(**{**base, **kw})
    for ok in (dict(xsa_last_n=0), dict(xsa_last_n=n), dict(value_embed_layers=""),
               dict(value_embed_layers="0"), dict(value_embed_layers=f"0,{n - 1}"),
               dict(rope_dims=0), dict(rope_dims=head_dim)):
        model(**ok).validate()
    for bad, needle in ((dict(xsa_last_n=n + 1), "xsa_last_n"),
                        (dict(value_embed_layers=str(n)), "out of range"),
                        (dict(value_embed_layers="-1"), "value_embed_layers"),
                        (dict(rope_dims=head_dim + 2), "rope_dims")):
        with pytest.raises(ConfigError, match=needle):
            model(**bad).validate()


def test_every_numeric_field_accepts_the_closed_ends_of_its_range():
    # each field alone (cross-field rules are tested above); the open ends and the values just
    # outside are refused, so a bound checked with < for <= (or the other way) fails here
    checked = 0
    for cls in (ModelConfig, TrainConfig, type(RunConfig().eval)):
        for f in dataclasses.fields(cls):
            kind, iv = _field_type(cls, f), _interval(f.metadata.get("range", ""))
            if kind not in (int, float) or not iv:
                continue
            lo, hi, lo_open, hi_open = iv
            step = 1 if kind is int else max(abs(lo), abs(hi), 1.0) * 1e-9
            for end, is_open, outside in ((lo, lo_open, lo - step), (hi, hi_open, hi + step)):
                if kind is float and not math.isfinite(end):
                    continue
                assert (_field_problem(kind, f, kind(end)) is None) != is_open, (f.name, end)
                assert _field_problem(kind, f, kind(outside)) is not None, (f.name, outside)
            checked += 1
    assert checked > 40


def test_every_field_has_a_flag_with_help():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    text = p.format_help()
    for section in ("model", "train", "eval"):
        for f in getattr(RunConfig(), section).__dataclass_fields__:
            if f == "preset":
                continue
            assert "--" + f.replace("_", "-") in text, f


def test_config_roundtrip_dict():
    cfg = build_config("smoke", environ={})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults_are_the_reference_model_of_the_spec():
    # the record's model, optimiser and schedule (presets override them; these are the base)
    m, t = ModelConfig(), TrainConfig()
    assert (m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads) == (
        1024, 11, 512, 8, 4)
    assert (m.mlp_mult, m.mlp_slope, m.q_gain_init, m.rope_dims, m.rope_base) == (
        3.0, 0.9, 1.5, 16, 10000.0)
    assert (m.xsa_last_n, m.bigram_buckets, m.bigram_dim, m.value_embed_layers,
            m.value_embed_dim, m.logit_softcap) == (4, 2048, 128, "9,10", 128, 30.0)
    assert m.qk_norm and m.smear_gate and m.resid_mix and m.unet_skips and m.ln_scale
    assert m.tie_embeddings
    assert (t.muon_momentum, t.muon_momentum_start, t.muon_momentum_warmup, t.muon_ns_steps,
            t.muon_wd) == (0.99, 0.92, 1500, 5, 0.04)
    assert (t.adam_beta1, t.adam_beta2, t.adam_wd, t.embed_lr, t.scalar_lr, t.grad_clip) == (
        0.9, 0.95, 0.04, 0.035, 0.025, 0.3)
    assert (t.batch_tokens, t.seq_len, t.warmup_steps, t.warmdown_steps, t.max_wallclock_s) == (
        786432, 2048, 20, 3500, 600.0)
    assert (t.ema_decay, t.swa_every, t.swa_lr_below) == (0.997, 50, 0.2)


def test_reading_a_config_loads_neither_triton_nor_the_kernels():
    # a fresh process: `proteus --help` and config checks must not pay for Triton
    code = ("import sys, proteus.config, proteus.options, proteus.presets, proteus.errors; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' "
            "or m.startswith('proteus.kernels')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_the_config_and_the_kernels_agree_on_the_longest_ngram():
    import proteus.kernels as pk

    assert MAX_ORDER == pk.MAX_ORDER
    f = EvalConfig.__dataclass_fields__["ngram_order"]
    assert f.metadata["range"] == f"[2, {pk.MAX_ORDER}]"
