"""Every knob in one place: one frozen dataclass per concern, each field with its help and range.

Three concerns, one dataclass each: :class:`ModelConfig` (the network), :class:`TrainConfig`
(optimiser, schedule, data, run) and :class:`EvalConfig` (scoring, n-gram cache), gathered in
:class:`RunConfig`. A field's metadata (``help``, ``range`` or ``choices``, ``resume``) is the
single source of its documentation and its checks: :func:`check_fields` validates a value
against it here, and ``proteus/options.py`` generates the command-line flags and ``PROTEUS_*``
variables from it (``model_dim`` -> ``--model-dim`` and ``PROTEUS_MODEL_DIM``), so
documentation and parsing cannot drift apart. The presets are in ``proteus/presets.py``, the
error classes in ``proteus/errors.py``.

Importing this module imports neither torch nor Triton nor the kernels (``proteus --help`` and
config checks stay fast).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from proteus.errors import ConfigError, ProteusError, RunFailed, RunInterrupted
from proteus.presets import PRESETS

# the error classes and the presets are re-exported: they are imported from here by code that
# predates proteus/errors.py and proteus/presets.py
__all__ = ["NGRAM_BACKENDS", "MAX_ORDER", "ModelConfig", "TrainConfig", "EvalConfig", "RunConfig",
           "SECTIONS", "check_fields", "ConfigError", "ProteusError", "RunFailed",
           "RunInterrupted", "PRESETS"]

NGRAM_BACKENDS = ("numpy", "triton", "ref")  # how the n-gram cache counts (proteus.eval.counts)
# The longest n-gram the n-gram table's 64-bit key holds (proteus.kernels.MAX_ORDER; stated
# here so that reading a config does not import the kernels; tests/test_config.py checks both
# agree).
MAX_ORDER = 6


@dataclass(frozen=True)
class ModelConfig:
    """The GPT: one field per architectural choice; the defaults are the challenge's record
    submission (11 blocks of width 512, 8 query / 4 KV heads, MLP 3x with LeakyReLU(0.9)², XSA
    on the last 4 blocks, BigramHash, value embeddings on blocks 9 and 10)."""

    vocab_size: int = field(
        default=1024, metadata={"help": "vocabulary size (must match the tokenizer)",
                                "range": "[2, 65536]"}  # shards hold uint16 token ids
    )
    num_layers: int = field(default=11, metadata={"help": "transformer blocks",
                                                  "range": "[1, 1024]"})
    model_dim: int = field(default=512, metadata={"help": "residual width", "range": "[1, 65536]"})
    num_heads: int = field(default=8, metadata={"help": "query heads", "range": "[1, 4096]"})
    num_kv_heads: int = field(
        default=4, metadata={"help": "key/value heads (GQA); divides num_heads",
                             "range": "[1, 4096]"}
    )
    mlp_mult: float = field(default=3.0, metadata={"help": "MLP hidden = mlp_mult * model_dim",
                                                   "range": "(0, 1024]"})
    mlp_slope: float = field(
        default=0.9, metadata={"help": "LeakyReLU slope of the squared activation",
                               "range": "[-1000, 1000]"}
    )
    qk_norm: bool = field(default=True, metadata={"help": "RMS-normalise q and k per head"})
    q_gain_init: float = field(default=1.5, metadata={"help": "initial learnable per-head q gain",
                                                      "range": "[-1000, 1000]"})
    rope_dims: int = field(default=16, metadata={"help": "head dims that get RoPE (partial RoPE)",
                                                 "range": "[0, 65536]"})
    rope_base: float = field(default=10000.0, metadata={"help": "RoPE base", "range": "[1, 1e12]"})
    xsa_last_n: int = field(default=4, metadata={"help": "XSA on the last N blocks (0 = off)",
                                                 "range": "[0, 1024]"})
    bigram_buckets: int = field(default=2048, metadata={"help": "BigramHash buckets (0 = off)",
                                                        "range": "[0, 2**24]"})
    bigram_dim: int = field(default=128, metadata={"help": "BigramHash embedding width",
                                                   "range": "[1, 65536]"})
    value_embed_layers: str = field(
        default="9,10",
        metadata={"help": "comma-separated blocks that get value embeddings ('' = off)",
                  "range": "block indices in [0, num_layers), each once"},
    )
    value_embed_dim: int = field(default=128, metadata={"help": "value-embedding width",
                                                        "range": "[1, 65536]"})
    smear_gate: bool = field(
        default=True, metadata={"help": "SmearGate: mix in previous token's embedding"}
    )
    resid_mix: bool = field(default=True, metadata={"help": "per-block learned mix of x with x0"})
    unet_skips: bool = field(
        default=True, metadata={"help": "U-Net skips: first half into second half"}
    )
    ln_scale: bool = field(default=True, metadata={"help": "scale block inputs by 1/sqrt(layer+1)"})
    logit_softcap: float = field(
        default=30.0, metadata={"help": "softcap*tanh(z/softcap) (0 = off)", "range": "[0, 1e6]"}
    )
    tie_embeddings: bool = field(default=True, metadata={"help": "tie input and output embeddings"})
    attn_docs: bool = field(default=False, metadata={
        "help": "documents start at BOS and see nothing before it: attention masked per "
                "document, SmearGate and BigramHash do not reach across a BOS"})
    attn_window: int = field(
        default=0, metadata={"help": "causal sliding window of N keys per query (0 = all)",
                             "range": "[0, 2**30]"}
    )
    # --- the pg-record entry's components (docs/pg_record.md); each off by default ---
    rope_yarn_len: int = field(default=0, metadata={
        "help": "YaRN/NTK RoPE stretch: a sequence of T > N positions uses base "
                "* (T/N)^(d/(d-2)), d = rope_dims (0 = off)", "range": "[0, 2**30]"})
    skip_gates: bool = field(default=False, metadata={
        "help": "gate each U-Net skip: x = lerp(w*skip, x, sigmoid(g)), g per channel"})
    smear_window: int = field(default=0, metadata={
        "help": "SmearGate form: 0 = per-channel lerp after the norm; N = x_t += lam * "
                "sigmoid(w . x_t[:N]) * x_(t-1) on the raw embedding (pg-record)",
        "range": "[0, 65536]"})
    attn_gate_window: int = field(default=0, metadata={
        "help": "sparse attention output gate: head h's output * sigmoid(scale * w_h . "
                "x[:N]) (0 = off)", "range": "[0, 65536]"})
    attn_gate_scale: float = field(default=1.0, metadata={
        "help": "scale inside the sparse attention gate's sigmoid", "range": "[-1e6, 1e6]"})
    parallel_from: int = field(default=0, metadata={
        "help": "2-lane parallel decoder from block N: attention reads lane 0, the MLP lane "
                "1, learned mixes write both (0 = off)", "range": "[0, 1024]"})
    parallel_final: str = field(default="mean", metadata={
        "help": "the parallel decoder's output: mean of the lanes, the attention lane or the "
                "MLP lane", "choices": ("mean", "attn", "mlp")})
    init_orthogonal: bool = field(default=False, metadata={
        "help": "initialise the q, k, v and MLP up projections as (semi-)orthogonal matrices "
                "(default: PyTorch's Linear init)"})
    recur_first: int = field(default=0, metadata={
        "help": "depth recurrence: first block of the looped span", "range": "[0, 1023]"})
    recur_last: int = field(default=0, metadata={
        "help": "depth recurrence: last block of the looped span (inclusive)",
        "range": "[0, 1023]"})
    recur_extra: int = field(default=0, metadata={
        "help": "depth recurrence: extra passes through blocks recur_first..recur_last "
                "(0 = off); on from train.recur_at_frac", "range": "[0, 64]"})

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def value_embed_set(self) -> tuple[int, ...]:
        parts = [s.strip() for s in self.value_embed_layers.split(",") if s.strip()]
        try:
            return tuple(int(s) for s in parts)
        except ValueError:
            raise ConfigError(
                f"value_embed_layers {self.value_embed_layers!r} (--value-embed-layers) must be "
                "comma-separated block indices, e.g. '9,10', or '' for none"
            ) from None

    def validate(self) -> None:
        check_fields(self)
        if self.model_dim % self.num_heads:
            raise ConfigError(
                f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}; "
                "pick a multiple"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads}; GQA needs each KV head shared by a whole group"
            )
        if self.rope_dims % 2 or not 0 <= self.rope_dims <= self.head_dim:
            raise ConfigError(
                f"rope_dims {self.rope_dims} must be even and within the head dim {self.head_dim}"
            )
        if not 0 <= self.xsa_last_n <= self.num_layers:
            raise ConfigError(f"xsa_last_n {self.xsa_last_n} must be in [0, {self.num_layers}]")
        if self.mlp_hidden < 1:
            raise ConfigError(
                f"mlp_mult {self.mlp_mult} gives an MLP of {self.mlp_hidden} hidden units at "
                f"model_dim {self.model_dim}; it needs at least 1"
            )
        layers = self.value_embed_set
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(
                f"value_embed_layers {bad} out of range for {self.num_layers} layers: block "
                f"indices are 0..{self.num_layers - 1}"
            )
        if len(set(layers)) != len(layers):
            raise ConfigError(f"value_embed_layers {self.value_embed_layers!r} names a block twice")
        if self.recur_extra and not self.recur_first <= self.recur_last < self.num_layers:
            raise ConfigError(
                f"recur_first {self.recur_first} .. recur_last {self.recur_last} must be blocks "
                f"in order within 0..{self.num_layers - 1}")
        if self.parallel_from >= self.num_layers:
            raise ConfigError(f"parallel_from {self.parallel_from} must be below num_layers "
                              f"{self.num_layers} (0 = off)")
        for name in ("smear_window", "attn_gate_window"):
            if getattr(self, name) > self.model_dim:
                raise ConfigError(f"{name} {getattr(self, name)} exceeds model_dim "
                                  f"{self.model_dim}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, data and run settings; the defaults are the record's (Muon + AdamW,
    786,432-token batches of 2048-token sequences, warm-down over the last 3,500 steps, 600 s)."""

    preset: str = field(default="cpu-tiny", metadata={"help": "preset the run starts from",
                                                      "range": "a preset name"})
    seed: int = field(default=1337, metadata={"help": "random seed", "range": "[0, 2**63-1]"})
    train_files: str = field(
        default="", metadata={"help": "glob of training shards ('' = the bundled sample)",
                              "range": "a path glob"}
    )
    val_files: str = field(
        default="", metadata={"help": "glob of validation shards ('' = the bundled sample)",
                              "range": "a path glob"}
    )
    tokenizer: str = field(default="", metadata={"help": "SentencePiece model ('' = bundled)",
                                                 "range": "a file path"})
    seq_len: int = field(default=2048, metadata={"help": "training sequence length",
                                                 "range": "[1, 2**20]"})
    batch_tokens: int = field(default=786432, metadata={"help": "global tokens per optimiser step",
                                                        "range": "[1, 2**36]"})
    micro_batch_seqs: int = field(
        default=0, metadata={"help": "sequences per forward on each rank (0 = whole step at once)",
                             "range": "[0, 2**30]"}
    )
    iterations: int = field(default=20000, metadata={"help": "maximum optimiser steps",
                                                     "range": "[1, 2**40]"})
    max_wallclock_s: float = field(
        default=600.0, metadata={"help": "hard training time cap in seconds (0 = none)",
                                 "range": "[0, 1e8]"}
    )
    warmup_steps: int = field(
        default=20, metadata={"help": "warm-up steps whose model/optimiser state is discarded",
                              "range": "[0, 1000000]"}
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear LR ramp-up steps",
                                                      "range": "[0, 2**40]"})
    warmdown_steps: int = field(
        default=3500,
        metadata={"help": "linear LR warm-down over the last N steps (wall-clock aware)",
                  "range": "[0, 2**40]"},
    )
    warmdown_frac: float = field(default=0.0, metadata={
        "help": "warm-down over the last fraction of training (of the steps, or of the "
                "wall-clock cap when one is set; 0 = warmdown_steps instead)",
        "range": "[0, 1]"})
    min_lr: float = field(default=0.0, metadata={
        "help": "floor of the LR scale during the warm-down", "range": "[0, 1]"})
    recur_at_frac: float = field(default=0.0, metadata={
        "help": "training fraction (as warmdown_frac's) from which depth recurrence is on",
        "range": "[0, 1]"})
    matrix_lr: float = field(
        default=0.025, metadata={"help": "Muon learning rate (block matrices)", "range": "[0, 1e6]"}
    )
    embed_lr: float = field(default=0.035, metadata={"help": "AdamW LR for (tied) embeddings",
                                                     "range": "[0, 1e6]"})
    scalar_lr: float = field(default=0.025, metadata={"help": "AdamW LR for scalars/vectors",
                                                      "range": "[0, 1e6]"})
    muon_momentum: float = field(default=0.99, metadata={"help": "Muon momentum after warm-up",
                                                         "range": "[0, 1)"})
    muon_momentum_start: float = field(default=0.92, metadata={"help": "Muon momentum at step 0",
                                                               "range": "[0, 1)"})
    muon_momentum_warmup: int = field(
        default=1500, metadata={"help": "Muon momentum warm-up steps", "range": "[0, 2**40]"}
    )
    muon_ns_steps: int = field(default=5, metadata={"help": "Newton-Schulz iterations",
                                                    "range": "[1, 100]"})
    muon_ns_dtype: str = field(default="auto", metadata={
        "help": "Newton-Schulz precision: auto (bf16 where bf16 is native, else fp32), bf16 "
                "or fp32", "choices": ("auto", "bf16", "fp32")})
    muon_ns_coeffs: str = field(default="classic", metadata={
        "help": "Newton-Schulz coefficients: classic (one quintic) or polar-express "
                "(per-iteration minimax tuples)", "choices": ("classic", "polar-express")})
    muon_row_norm: bool = field(default=False, metadata={
        "help": "normalise each row of the Muon update before Newton-Schulz"})
    muon_wd: float = field(default=0.04, metadata={"help": "Muon decoupled weight decay",
                                                   "range": "[0, 1e6]"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1", "range": "[0, 1)"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2", "range": "[0, 1)"})
    adam_wd: float = field(default=0.04, metadata={"help": "AdamW weight decay (embeddings)",
                                                   "range": "[0, 1e6]"})
    adam_eps: float = field(default=1e-10, metadata={"help": "AdamW epsilon",
                                                     "range": "(0, 1]"})
    scalar_wd: float = field(default=0.0, metadata={"help": "AdamW weight decay (scalars, "
                                                    "gates, mixes)", "range": "[0, 1e6]"})
    grad_clip: float = field(default=0.3, metadata={"help": "global grad-norm clip (0 = off)",
                                                    "range": "[0, 1e12]"})
    ema_decay: float = field(default=0.997, metadata={"help": "EMA of weights (0 = off)",
                                                      "range": "[0, 1)"})
    swa_every: int = field(default=50, metadata={"help": "SWA snapshot period in steps (0 = off)",
                                                 "range": "[0, 2**40]"})
    swa_lr_below: float = field(
        default=0.2, metadata={"help": "SWA starts once the LR scale falls below this",
                               "range": "[0, 1e6]"}
    )
    val_every: int = field(default=0, metadata={"help": "validate every N steps (0 = only at end)",
                                                "range": "[0, 2**40]", "resume": True})
    kernels: str = field(default="ref", metadata={"help": "hot ops: ref (PyTorch) or triton",
                                                  "choices": ("ref", "triton"), "resume": True})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model",
                                                   "resume": True})
    deterministic: bool = field(default=False, metadata={
        "help": "torch.use_deterministic_algorithms: compiled runs (and their resumes) "
                "bit-reproducible; inductor's CPU scatter-adds race across threads without it",
        "resume": True})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda",
                                                  "choices": ("auto", "cpu", "cuda"),
                                                  "resume": True})
    autocast_bf16: str = field(
        default="auto", metadata={"help": "bf16 autocast: auto (on CUDA and on CPUs with native "
                                  "bf16: AMX/AVX512-BF16), on, off",
                                  "choices": ("auto", "on", "off")}
    )
    attn_fp32: str = field(
        default="auto", metadata={"help": "attention in fp32 under bf16 autocast: auto (on CPU, "
                                  "where torch's bf16 attention backward is ~2x slower), on, off",
                                  "choices": ("auto", "on", "off")}
    )
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = all cores)",
                                              "range": "[0, 65536]", "resume": True})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of run directories",
                                                   "range": "a folder path", "resume": True})
    run_name: str = field(default="", metadata={
        "help": "run directory name ('' = preset+time; an existing one is refused)",
        "range": "a folder name", "resume": True})
    log_every: int = field(default=10, metadata={"help": "progress line every N steps",
                                                 "range": "[1, 2**40]", "resume": True})
    checkpoint_every: int = field(default=0, metadata={
        "help": "resumable checkpoint every N steps (0 = off)", "range": "[0, 2**40]",
        "resume": True})
    checkpoint_every_s: float = field(default=600.0, metadata={
        "help": "resumable checkpoint every N seconds of training (0 = off)",
        "range": "[0, 1e8]", "resume": True})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "resumable checkpoints kept in the run directory (the newest)",
        "range": "[1, 100000]", "resume": True})
    dist_timeout_s: float = field(default=0.0, metadata={
        "help": "seconds a collective may wait for a peer before every rank stops (0 = the "
                "time cap max_wallclock_s, at least 120, at most 1800; 1800 without a cap)",
        "range": "[0, 1e6]", "resume": True})
    # the artifact's quantiser (proteus.gptq; `proteus quantize` takes the same choices)
    quant_method: str = field(default="rtn", metadata={
        "help": "int6 quantiser of the artifact: rtn (round to nearest) or gptq (calibrated on "
                "training tokens)", "choices": ("rtn", "gptq"), "resume": True})
    quant_clip_sigmas: float = field(default=0.0, metadata={
        "help": "GPTQ's per-row clip in standard deviations (0 = RTN's clip search)",
        "range": "[0, 64]", "resume": True})
    quant_calib_batches: int = field(default=16, metadata={
        "help": "GPTQ calibration batches (of the training batch's sequences)",
        "range": "[1, 4096]", "resume": True})
    lqer_rank: int = field(default=0, metadata={
        "help": "LQER: rank of the int8 low-rank correction of the quantisation error (0 = off)",
        "range": "[0, 64]", "resume": True})
    lqer_top_k: int = field(default=3, metadata={
        "help": "LQER: how many int6 matrices (largest error first) get the correction",
        "range": "[1, 4096]", "resume": True})
    embed_bits: int = field(default=8, metadata={
        "help": "bits of the artifact's embeddings (7 or 8)", "range": "[7, 8]",
        "resume": True})

    def validate(self) -> None:
        check_fields(self)
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of "
                              f"{', '.join(PRESETS)}")
        if self.batch_tokens % self.seq_len:
            raise ConfigError(
                f"seq_len {self.seq_len} does not divide batch_tokens {self.batch_tokens}; "
                "make batch_tokens a multiple of seq_len"
            )
        if self.micro_batch_seqs > self.batch_tokens // self.seq_len:
            raise ConfigError(
                f"micro_batch_seqs {self.micro_batch_seqs} is more than the "
                f"{self.batch_tokens // self.seq_len} sequences of a step"
            )
        if not self.out_dir.strip():
            raise ConfigError("out_dir (--out-dir) is empty; pass a folder for run directories")
        if self.run_name and (self.run_name in (".", "..") or "/" in self.run_name
                              or os.sep in self.run_name or not self.run_name.isprintable()
                              or self.run_name != self.run_name.strip()):
            raise ConfigError(f"run_name {self.run_name!r} (--run-name) must be a plain folder "
                              "name (no path separators, control characters, or spaces at "
                              "either end); put the parent folder in --out-dir")


@dataclass(frozen=True)
class EvalConfig:
    """Scoring: plain and sliding-window bpb, and the honest n-gram cache."""

    val_tokens: int = field(
        default=0, metadata={"help": "score the first N validation tokens (0 = all)",
                             "range": "[0, 2**48]"}
    )
    val_start: int = field(default=0, metadata={
        "help": "skip the validation tokens before this one: the scored stream starts at the "
                "first document start (BOS) at or after it", "range": "[0, 2**48]"})
    eval_seq_len: int = field(default=0, metadata={"help": "eval window (0 = training seq_len)",
                                                   "range": "[0, 2**20]"})
    stride: int = field(
        default=0, metadata={"help": "sliding-window stride (0 = plain non-overlapping eval only)",
                             "range": "[0, 2**20]"}
    )
    eval_batch_seqs: int = field(default=16, metadata={"help": "windows per eval forward",
                                                       "range": "[1, 2**20]"})
    cache: str = field(default="none", metadata={
        "help": "eval cache: none, ngram (the exact normalised n-gram cache) or tilt (the "
                "token-only n-gram tilt, proteus/tilt.py)", "choices": ("none", "ngram", "tilt")})
    tilt_beta: float = field(default=1.0, metadata={
        "help": "the tilt's strength beta (p'(h) ~ e^beta p(h) for the hint h)",
        "range": "[0, 20]"})
    tilt_order: int = field(default=16, metadata={
        "help": "the tilt's longest context match, in tokens", "range": "[1, 16]"})
    tilt_min_order: int = field(default=1, metadata={
        "help": "the tilt's shortest context match: no hint below it", "range": "[1, 16]"})
    ngram_order: int = field(default=5, metadata={"help": "highest n-gram order of the cache",
                                                  "range": f"[2, {MAX_ORDER}]"})
    ngram_doc: bool = field(default=True, metadata={
        "help": "also mix in n-gram counts of the current document alone (after the last BOS)"})
    ngram_backend: str = field(
        default="auto", metadata={"help": "cache counts: auto, numpy, triton or ref",
                                  "choices": ("auto", *NGRAM_BACKENDS)}
    )
    cache_params: str = field(default="", metadata={
        "help": "n-gram cache parameters: a JSON file written by `proteus tune-cache` ('' = the "
                "shipped ones)", "range": "a file path"})
    audit_positions: int = field(default=32, metadata={
        "help": "random positions the audit samples (besides BOS targets, first tokens after "
                "BOS, chunk and shard edges and repeated contexts, which it always visits)",
        "range": "[1, 10000000]"})
    audit: str = field(default="cheap", metadata={
        "help": "the audit an evaluation runs: cheap (a few positions of each kind; at most ~10% "
                "of the evaluation's time), full (every kind of position, many edits: "
                "`proteus audit`'s default) or none (skipped, and said so)",
        "choices": ("none", "cheap", "full")})
    artifact_eval: str = field(default="plain", metadata={
        "help": "how the run scores its int6 artifact: plain (non-overlapping windows), or full "
                "(also the sliding window, the cache and TTT as configured: the numbers a "
                "submission claims)", "choices": ("plain", "full")})
    ttt: bool = field(default=False, metadata={
        "help": "score-first test-time training: score each chunk of the stream, then train on "
                "it (one pass, nothing rescored)"})
    ttt_chunk: int = field(default=32768, metadata={
        "help": "targets per test-time-training chunk (a multiple of the sequence length)",
        "range": "[1, 2**30]"})
    ttt_steps: int = field(default=1, metadata={
        "help": "optimiser steps on each chunk after it is scored (each over the whole chunk)",
        "range": "[1, 100000]"})
    ttt_lr: float = field(default=0.001, metadata={"help": "test-time-training learning rate "
                                                   "(Adam)", "range": "(0, 100]"})
    ttt_params: str = field(default="*", metadata={
        "help": "what test-time training updates: 'lora' (adapters on the attention and MLP "
                "projections) or comma-separated parameter-name patterns, e.g. 'blocks.*.mlp.*' "
                "('*': every parameter)", "range": "lora or name patterns"})
    ttt_rank: int = field(default=4, metadata={"help": "rank of the LoRA adapters",
                                               "range": "[1, 4096]"})
    ttt_mode: str = field(default="chunked", metadata={
        "help": "TTT schedule: chunked (one adapter over the stream, chunks of ttt_chunk) or "
                "phased (per-document LoRA, global phases; docs/ttt.md)",
        "choices": ("chunked", "phased")})
    ttt_phases: str = field(default="", metadata={
        "help": "phased: cumulative document counts after which the base weights are adapted "
                "on the scored documents (the entry's 833,1666,2500; '' = none)",
        "range": "increasing document counts"})
    ttt_doc_chunk: int = field(default=48, metadata={
        "help": "phased: targets per document chunk (each scored, then trained on)",
        "range": "[1, 2**20]"})
    ttt_lora_targets: str = field(default="q,k,v,o,up,down,head", metadata={
        "help": "phased: the projections that get a per-document adapter",
        "range": "names from q,k,v,o,up,down,head"})
    ttt_beta1: float = field(default=0.0, metadata={
        "help": "phased: AdamW beta1", "range": "[0, 1)"})
    ttt_beta2: float = field(default=0.99, metadata={
        "help": "phased: AdamW beta2", "range": "[0, 1)"})
    ttt_wd: float = field(default=0.5, metadata={
        "help": "phased: AdamW weight decay", "range": "[0, 1e6]"})
    ttt_docs: int = field(default=64, metadata={
        "help": "phased: documents per batch", "range": "[1, 2**20]"})
    ttt_global_lr: float = field(default=0.001, metadata={
        "help": "phased: SGD learning rate of a global phase (cosine over its chunks)",
        "range": "(0, 100]"})
    ttt_global_chunk: int = field(default=32768, metadata={
        "help": "phased: targets per SGD step of a global phase", "range": "[1, 2**30]"})

    def validate(self) -> None:
        check_fields(self)
        if self.val_tokens == 1:
            raise ConfigError("val_tokens 1 (--val-tokens) scores nothing: pass 0 (all) or at "
                              "least 2 (a context token and a target)")
        if not [p for p in self.ttt_params.split(",") if p.strip()]:
            raise ConfigError("ttt_params (--ttt-params) must be 'lora' or parameter-name "
                              "patterns, got ''")
        check_phased(self)
        if self.tilt_min_order > self.tilt_order:
            raise ConfigError(f"tilt_min_order {self.tilt_min_order} (--tilt-min-order) is above "
                              f"tilt_order {self.tilt_order} (--tilt-order)")


def check_phased(ec: EvalConfig) -> None:
    """The phased-TTT strings (proteus/eval/ttt_phased.py): increasing positive document
    counts, known projections."""
    phases = [p.strip() for p in ec.ttt_phases.split(",") if p.strip()]
    counts = [int(p) if p.isdigit() else 0 for p in phases]
    if any(c <= 0 for c in counts) or counts != sorted(set(counts)):
        raise ConfigError(f"ttt_phases (--ttt-phases) {ec.ttt_phases!r}: expected increasing "
                          "positive document counts, e.g. 833,1666,2500 ('' = no global phase)")
    names = [p.strip() for p in ec.ttt_lora_targets.split(",") if p.strip()]
    known = ("q", "k", "v", "o", "up", "down", "head")
    if not names or len(set(names)) != len(names) or set(names) - set(known):
        raise ConfigError(f"ttt_lora_targets (--ttt-lora-targets) {ec.ttt_lora_targets!r}: "
                          f"expected distinct names from {','.join(known)}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.eval.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Mapping, where: str = "config") -> RunConfig:
        """A validated config from its ``to_dict`` form (``where`` names the source in errors:
        a checkpoint, an artifact, a run's config.json)."""
        if not isinstance(d, Mapping) or not all(isinstance(d.get(s, {}), Mapping)
                                                  for s in SECTIONS):
            raise ConfigError(f"{where}: the config is not a mapping of sections "
                              f"({', '.join(SECTIONS)}); the file is damaged or not proteus's")
        extra = sorted(set(d) - set(SECTIONS))
        if extra:
            raise ConfigError(f"{where}: unknown config sections {extra}")
        try:
            cfg = RunConfig(**{s: cls(**d.get(s, {})) for s, cls in SECTIONS.items()})
        except TypeError as e:
            raise ConfigError(
                f"{where}: config does not match this version of proteus: {e}") from None
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{where}: invalid config: {e}") from None
        return cfg


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


@functools.cache
def _type_hints(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _field_type(cls, f) -> type:
    return _type_hints(cls)[f.name]


def _number(text: str) -> int | float:
    text = text.strip()
    if text.startswith("2**"):  # "2**40", "2**63-1"
        exp, _, minus = text[3:].partition("-")
        return 2 ** int(exp) - int(minus or 0)
    return float(text) if any(c in text for c in ".e") else int(text)


def _interval(spec: str) -> tuple[int | float, int | float, bool, bool] | None:
    """``"[lo, hi)"`` -> (lo, hi, lo open, hi open); a descriptive range (``"a path glob"``)
    -> None."""
    if not spec or spec[0] not in "[(":
        return None
    lo, hi = spec[1:-1].split(",")
    return _number(lo), _number(hi), spec[0] == "(", spec[-1] == ")"


_KIND_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a finite number",
               str: "a string"}


def _field_problem(kind: type, f, value) -> str | None:
    """Why ``value`` is not allowed in field ``f`` (of type ``kind``): "expected ..., got ...",
    or None when it is allowed."""
    meta = f.metadata
    choices, interval = meta.get("choices"), _interval(meta.get("range", ""))
    expected = _KIND_NAMES[kind]
    if choices:
        expected = "one of " + ", ".join(choices)
    elif interval:
        expected += " in " + meta["range"]
    ok_type = {bool: lambda v: isinstance(v, bool),
               int: lambda v: isinstance(v, int) and not isinstance(v, bool),
               float: lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v)),
               str: lambda v: isinstance(v, str)}[kind]
    if not ok_type(value):
        return f"expected {expected}, got {value!r}"
    if choices and value not in choices:
        return f"expected {expected}, got {value!r}"
    if interval:
        lo, hi, lo_open, hi_open = interval
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            return f"expected {expected}, got {value!r}"
    return None


def _names(f) -> str:
    return f"--{f.name.replace('_', '-')} / PROTEUS_{f.name.upper()}"


def check_fields(obj) -> None:
    """Each field of a config dataclass against its type, choices and range (field metadata),
    with an error that names the option, what it expects and what it got."""
    cls = type(obj)
    for f in fields(cls):
        problem = _field_problem(_field_type(cls, f), f, getattr(obj, f.name))
        if problem:
            raise ConfigError(f"{f.name} ({_names(f)}): {problem}")

