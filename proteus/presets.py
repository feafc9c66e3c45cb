"""The presets: named overrides on top of the config dataclasses' defaults, per section.

Plain data (``{preset: {"model" | "train" | "eval": {field: value}}}``), so that
``proteus/config.py`` can check a preset name and ``proteus/options.py`` can build a config
from one without either importing the other's layer. A run is ``preset -> PROTEUS_*
environment -> command-line flags``, later layers winning (:func:`proteus.options.build_config`).
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    # SPEC's reference model and the seed-era record's schedule (Muon with the classic
    # Newton-Schulz, 3500 warm-down steps, EMA 0.997): kept to reproduce that record
    "h100-seed": {
        "model": {},
        "train": dict(
            seq_len=2048,
            batch_tokens=786432,
            micro_batch_seqs=48,
            iterations=20000,
            max_wallclock_s=600.0,
            warmdown_steps=3500,
            val_every=1000,
            kernels="triton",
            compile=True,
            device="cuda",
            log_every=50,
        ),
        "eval": dict(stride=64, eval_batch_seqs=32, artifact_eval="full"),
    },
    # A small model that learns real text in about three minutes on two CPU cores.
    "cpu-tiny": {
        "model": dict(
            num_layers=4,
            model_dim=128,
            num_heads=4,
            num_kv_heads=2,
            rope_dims=8,
            xsa_last_n=2,
            bigram_buckets=2048,
            bigram_dim=64,
            value_embed_layers="2,3",
            value_embed_dim=64,
        ),
        "train": dict(
            seq_len=256,
            batch_tokens=2048,
            iterations=100000,
            max_wallclock_s=170.0,
            warmup_steps=3,
            lr_warmup_steps=0,
            warmdown_steps=1200,
            matrix_lr=0.04,
            embed_lr=0.02,
            scalar_lr=0.04,
            muon_momentum=0.95,
            muon_momentum_start=0.85,
            muon_momentum_warmup=300,
            muon_wd=0.0,
            adam_wd=0.0,
            ema_decay=0.0,
            swa_every=0,
            compile=True,
            # bf16 where the CPU has native bf16 (AMX/AVX512-BF16), fp32 where it would be
            # emulated (AVX2-only hosts: ~17x slower per step); see proteus/device.py
            autocast_bf16="auto",
            muon_ns_dtype="auto",
            device="cpu",
            log_every=100,
        ),
        # ttt_*: chosen on held-out training tokens (docs/ttt.md, "Choosing the settings")
        "eval": dict(val_tokens=131072, eval_batch_seqs=32, stride=64, cache="ngram",
                     ttt_chunk=4096),
    },
    # Seconds, for tests and smoke runs: proves the plumbing, learns little.
    "smoke": {
        "model": dict(
            num_layers=2,
            model_dim=64,
            num_heads=2,
            num_kv_heads=1,
            rope_dims=8,
            xsa_last_n=1,
            bigram_buckets=256,
            bigram_dim=32,
            value_embed_layers="1",
            value_embed_dim=32,
        ),
        "train": dict(
            seq_len=64,
            batch_tokens=512,
            iterations=6,
            max_wallclock_s=60.0,
            warmup_steps=1,
            warmdown_steps=3,
            swa_every=2,
            swa_lr_below=0.9,
            ema_decay=0.9,
            device="cpu",
            log_every=1,
        ),
        "eval": dict(val_tokens=4096, eval_batch_seqs=8, ttt_chunk=1024),
    },
}

# cpu-tiny on the bundled SP8192 CaseOps sample (the record entries' tokenizer, the same
# documents): the vocabulary selects the bundled tokenizer and shards (proteus/data.py)
PRESETS["cpu-tiny-sp8192"] = {
    "model": {**PRESETS["cpu-tiny"]["model"], "vocab_size": 8192},
    "train": dict(PRESETS["cpu-tiny"]["train"]),
    # no n-gram cache: its packed keys hold 10-bit token ids (vocabularies up to 1024)
    "eval": {**PRESETS["cpu-tiny"]["eval"], "cache": "none"},
}

# The best legal entry of the challenge (records/track_10min_16mb/2026-04-27_SP8192_LQER_
# SparseGate_BOSSmearFix_9HpStack_1.0611, val bpb 1.0611): its README's command, as our options
# (docs/pg_record.md maps each one). 35,945,671 parameters.
PRESETS["pg-record"] = {
    "model": dict(
        vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4,
        mlp_mult=4.0, mlp_slope=0.5, qk_norm=True, q_gain_init=5.0, rope_dims=16,
        rope_base=10000.0, rope_yarn_len=0, xsa_last_n=11, bigram_buckets=0,
        value_embed_layers="", smear_gate=True, smear_window=12, resid_mix=True,
        unet_skips=True, skip_gates=True, ln_scale=True, logit_softcap=30.0,
        tie_embeddings=True, attn_docs=True, attn_gate_window=12, attn_gate_scale=0.5,
        init_orthogonal=True,
        parallel_from=8, parallel_final="mean", recur_first=3, recur_last=5, recur_extra=2,
    ),
    "train": dict(
        seq_len=2048, batch_tokens=786432, micro_batch_seqs=48, iterations=20000,
        max_wallclock_s=599.5,  # the entry's 600 s less its 0.5 s GPTQ reserve
        warmup_steps=20, lr_warmup_steps=0, warmdown_frac=0.85, min_lr=0.1,
        recur_at_frac=0.35, matrix_lr=0.026, embed_lr=0.03, scalar_lr=0.02,
        muon_momentum=0.97, muon_momentum_start=0.92, muon_momentum_warmup=1500,
        muon_ns_steps=5, muon_ns_coeffs="polar-express", muon_row_norm=True, muon_wd=0.095,
        adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-8, adam_wd=0.085, scalar_wd=0.02,
        grad_clip=0.3, ema_decay=0.9965, swa_every=0, val_every=0, kernels="triton",
        compile=True, device="cuda", log_every=50,
    ),
    "eval": dict(stride=64, eval_batch_seqs=32, artifact_eval="full"),
}

# The challenge's scale (8 GPUs, 600 s, 786k-token batches of 2048-token sequences) with SPEC's
# reference model (vocabulary 1024) trained the way pg-record trains: Polar-Express Muon with
# row normalisation, the fractional warm-down to a 0.1 floor, EMA 0.9965, the entry's decays
PRESETS["h100"] = {
    "model": {},
    "train": {**PRESETS["pg-record"]["train"], "max_wallclock_s": 600.0, "val_every": 1000,
              "recur_at_frac": 0.0},  # SPEC's model has no loop
    "eval": dict(PRESETS["h100-seed"]["eval"]),
}
