"""Every knob in one place: frozen dataclasses, presets, and the CLI/env layer generated from them.

Three concerns, one dataclass each: :class:`ModelConfig` (the network), :class:`TrainConfig`
(optimiser, schedule, data, run) and :class:`EvalConfig` (scoring, n-gram cache). A run is
``preset -> PROTEUS_* environment -> command-line flags``, later layers winning. Flag and
variable names are derived from field names (``model_dim`` -> ``--model-dim`` and
``PROTEUS_MODEL_DIM``), so documentation and parsing cannot drift apart. An unknown
``PROTEUS_*`` variable is an error, not a silent no-op.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from proteus.kernels._keys import MAX_ORDER

NGRAM_BACKENDS = ("numpy", "triton", "ref")  # how the n-gram cache counts (proteus.ngram)


class ProteusError(ValueError):
    """Bad input a user can fix (an option, a file, a checkpoint): the command line prints the
    message on one line and exits with code 2."""


class ConfigError(ProteusError):
    """A bad preset, option or value."""


@dataclass(frozen=True)
class ModelConfig:
    """The GPT of SPEC.md's model table. Each row of the table is a field; defaults = the record."""

    vocab_size: int = field(
        default=1024, metadata={"help": "vocabulary size (must match the tokenizer)"}
    )
    num_layers: int = field(default=11, metadata={"help": "transformer blocks"})
    model_dim: int = field(default=512, metadata={"help": "residual width"})
    num_heads: int = field(default=8, metadata={"help": "query heads"})
    num_kv_heads: int = field(
        default=4, metadata={"help": "key/value heads (GQA); divides num_heads"}
    )
    mlp_mult: float = field(default=3.0, metadata={"help": "MLP hidden = mlp_mult * model_dim"})
    mlp_slope: float = field(
        default=0.9, metadata={"help": "LeakyReLU slope of the squared activation"}
    )
    qk_norm: bool = field(default=True, metadata={"help": "RMS-normalise q and k per head"})
    q_gain_init: float = field(default=1.5, metadata={"help": "initial learnable per-head q gain"})
    rope_dims: int = field(default=16, metadata={"help": "head dims that get RoPE (partial RoPE)"})
    rope_base: float = field(default=10000.0, metadata={"help": "RoPE base"})
    xsa_last_n: int = field(default=4, metadata={"help": "XSA on the last N blocks (0 = off)"})
    bigram_buckets: int = field(default=2048, metadata={"help": "BigramHash buckets (0 = off)"})
    bigram_dim: int = field(default=128, metadata={"help": "BigramHash embedding width"})
    value_embed_layers: str = field(
        default="9,10",
        metadata={"help": "comma-separated blocks that get value embeddings ('' = off)"},
    )
    value_embed_dim: int = field(default=128, metadata={"help": "value-embedding width"})
    smear_gate: bool = field(
        default=True, metadata={"help": "SmearGate: mix in previous token's embedding"}
    )
    resid_mix: bool = field(default=True, metadata={"help": "per-block learned mix of x with x0"})
    unet_skips: bool = field(
        default=True, metadata={"help": "U-Net skips: first half into second half"}
    )
    ln_scale: bool = field(default=True, metadata={"help": "scale block inputs by 1/sqrt(layer+1)"})
    logit_softcap: float = field(
        default=30.0, metadata={"help": "softcap*tanh(z/softcap) (0 = off)"}
    )
    tie_embeddings: bool = field(default=True, metadata={"help": "tie input and output embeddings"})

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def value_embed_set(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.value_embed_layers.split(",") if s.strip())

    def validate(self) -> None:
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
        bad = [i for i in self.value_embed_set if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"value_embed_layers {bad} out of range for {self.num_layers} layers")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, data and run settings (SPEC.md's optimiser and schedule rows)."""

    preset: str = field(default="cpu-tiny", metadata={"help": "preset the run starts from"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    train_files: str = field(
        default="", metadata={"help": "glob of training shards ('' = the bundled sample)"}
    )
    val_files: str = field(
        default="", metadata={"help": "glob of validation shards ('' = the bundled sample)"}
    )
    tokenizer: str = field(default="", metadata={"help": "SentencePiece model ('' = bundled)"})
    seq_len: int = field(default=2048, metadata={"help": "training sequence length"})
    batch_tokens: int = field(default=786432, metadata={"help": "global tokens per optimiser step"})
    micro_batch_seqs: int = field(
        default=0, metadata={"help": "sequences per forward on each rank (0 = whole step at once)"}
    )
    iterations: int = field(default=20000, metadata={"help": "maximum optimiser steps"})
    max_wallclock_s: float = field(
        default=600.0, metadata={"help": "hard training time cap in seconds (0 = none)"}
    )
    warmup_steps: int = field(
        default=20, metadata={"help": "warm-up steps whose model/optimiser state is discarded"}
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear LR ramp-up steps"})
    warmdown_steps: int = field(
        default=3500,
        metadata={"help": "linear LR warm-down over the last N steps (wall-clock aware)"},
    )
    matrix_lr: float = field(
        default=0.025, metadata={"help": "Muon learning rate (block matrices)"}
    )
    embed_lr: float = field(default=0.035, metadata={"help": "AdamW LR for (tied) embeddings"})
    scalar_lr: float = field(default=0.025, metadata={"help": "AdamW LR for scalars/vectors"})
    muon_momentum: float = field(default=0.99, metadata={"help": "Muon momentum after warm-up"})
    muon_momentum_start: float = field(default=0.92, metadata={"help": "Muon momentum at step 0"})
    muon_momentum_warmup: int = field(
        default=1500, metadata={"help": "Muon momentum warm-up steps"}
    )
    muon_ns_steps: int = field(default=5, metadata={"help": "Newton-Schulz iterations"})
    muon_ns_dtype: str = field(default="auto", metadata={
        "help": "Newton-Schulz precision: auto (bf16 where bf16 is native, else fp32), bf16 "
                "or fp32"})
    muon_wd: float = field(default=0.04, metadata={"help": "Muon decoupled weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    adam_wd: float = field(default=0.04, metadata={"help": "AdamW weight decay (embeddings)"})
    grad_clip: float = field(default=0.3, metadata={"help": "global grad-norm clip (0 = off)"})
    ema_decay: float = field(default=0.997, metadata={"help": "EMA of weights (0 = off)"})
    swa_every: int = field(default=50, metadata={"help": "SWA snapshot period in steps (0 = off)"})
    swa_lr_below: float = field(
        default=0.2, metadata={"help": "SWA starts once the LR scale falls below this"}
    )
    val_every: int = field(default=0, metadata={"help": "validate every N steps (0 = only at end)"})
    kernels: str = field(default="ref", metadata={"help": "hot ops: ref (PyTorch) or triton"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    autocast_bf16: str = field(
        default="auto", metadata={"help": "bf16 autocast: auto (on CUDA and on CPUs with native "
                                  "bf16: AMX/AVX512-BF16), on, off"}
    )
    attn_fp32: str = field(
        default="auto", metadata={"help": "attention in fp32 under bf16 autocast: auto (on CPU, "
                                  "where torch's bf16 attention backward is ~2x slower), on, off"}
    )
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = all cores)"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of run directories"})
    run_name: str = field(default="", metadata={"help": "run directory name ('' = preset+time)"})
    log_every: int = field(default=10, metadata={"help": "progress line every N steps"})

    def validate(self) -> None:
        if self.kernels not in ("ref", "triton"):
            raise ConfigError(f"kernels must be 'ref' or 'triton', got {self.kernels!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.autocast_bf16 not in ("auto", "on", "off"):
            raise ConfigError(f"autocast_bf16 must be auto, on or off, got {self.autocast_bf16!r}")
        if self.attn_fp32 not in ("auto", "on", "off"):
            raise ConfigError(f"attn_fp32 must be auto, on or off, got {self.attn_fp32!r}")
        if self.muon_ns_dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(
                f"muon_ns_dtype must be auto, bf16 or fp32, got {self.muon_ns_dtype!r}")
        if self.seq_len <= 0 or self.batch_tokens <= 0:
            raise ConfigError("seq_len and batch_tokens must be positive")
        if self.batch_tokens % self.seq_len:
            raise ConfigError(
                f"seq_len {self.seq_len} does not divide batch_tokens {self.batch_tokens}; "
                "make batch_tokens a multiple of seq_len"
            )


@dataclass(frozen=True)
class EvalConfig:
    """Scoring: plain and sliding-window bpb, and the honest n-gram cache."""

    val_tokens: int = field(
        default=0, metadata={"help": "score the first N validation tokens (0 = all)"}
    )
    val_start: int = field(default=0, metadata={
        "help": "skip the validation tokens before this one: the scored stream starts at the "
                "first document start (BOS) at or after it"})
    eval_seq_len: int = field(default=0, metadata={"help": "eval window (0 = training seq_len)"})
    stride: int = field(
        default=0, metadata={"help": "sliding-window stride (0 = plain non-overlapping eval only)"}
    )
    eval_batch_seqs: int = field(default=16, metadata={"help": "windows per eval forward"})
    cache: str = field(default="none", metadata={"help": "eval cache: none or ngram"})
    ngram_order: int = field(default=5, metadata={"help": "highest n-gram order of the cache"})
    ngram_doc: bool = field(default=True, metadata={
        "help": "also mix in n-gram counts of the current document alone (after the last BOS)"})
    ngram_backend: str = field(
        default="auto", metadata={"help": "cache counts: auto, numpy, triton or ref"}
    )
    cache_params: str = field(default="", metadata={
        "help": "n-gram cache parameters: a JSON file written by `proteus tune-cache` ('' = the "
                "shipped ones)"})
    audit_positions: int = field(default=32, metadata={
        "help": "random positions the audit samples (besides BOS targets, first tokens after "
                "BOS, chunk and shard edges and repeated contexts, which it always visits)"})
    ttt: bool = field(default=False, metadata={
        "help": "score-first test-time training: score each chunk of the stream, then train on "
                "it (one pass, nothing rescored)"})
    ttt_chunk: int = field(default=32768, metadata={
        "help": "targets per test-time-training chunk (a multiple of the sequence length)"})
    ttt_steps: int = field(default=1, metadata={
        "help": "optimiser steps on each chunk after it is scored (each over the whole chunk)"})
    ttt_lr: float = field(default=0.001, metadata={"help": "test-time-training learning rate "
                                                   "(Adam)"})
    ttt_params: str = field(default="*", metadata={
        "help": "what test-time training updates: 'lora' (adapters on the attention and MLP "
                "projections) or comma-separated parameter-name patterns, e.g. 'blocks.*.mlp.*' "
                "('*': every parameter)"})
    ttt_rank: int = field(default=4, metadata={"help": "rank of the LoRA adapters"})

    def validate(self) -> None:
        if self.cache not in ("none", "ngram"):
            raise ConfigError(f"cache must be 'none' or 'ngram', got {self.cache!r}")
        if self.stride < 0 or self.val_tokens < 0:
            raise ConfigError("stride and val_tokens must be >= 0")
        if not 2 <= self.ngram_order <= MAX_ORDER:
            raise ConfigError(
                f"ngram_order must be in [2, {MAX_ORDER}] (10-bit tokens in 64-bit keys), "
                f"got {self.ngram_order}"
            )
        if self.ngram_backend not in ("auto", *NGRAM_BACKENDS):
            raise ConfigError(
                f"ngram_backend must be one of auto, {', '.join(NGRAM_BACKENDS)}; "
                f"got {self.ngram_backend!r}"
            )
        if self.audit_positions < 1:
            raise ConfigError("audit_positions must be >= 1")
        if self.val_start < 0:
            raise ConfigError(f"val_start must be >= 0, got {self.val_start}")
        if self.ttt_chunk < 1 or self.ttt_steps < 1 or self.ttt_rank < 1:
            raise ConfigError(f"ttt_chunk, ttt_steps and ttt_rank must be >= 1, got "
                              f"{self.ttt_chunk}, {self.ttt_steps}, {self.ttt_rank}")
        if not self.ttt_lr > 0:
            raise ConfigError(f"ttt_lr must be > 0, got {self.ttt_lr}")
        if not [p for p in self.ttt_params.split(",") if p.strip()]:
            raise ConfigError("ttt_params must be 'lora' or parameter-name patterns, got ''")


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
    def from_dict(d: Mapping) -> RunConfig:
        try:
            return RunConfig(
                model=ModelConfig(**d.get("model", {})),
                train=TrainConfig(**d.get("train", {})),
                eval=EvalConfig(**d.get("eval", {})),
            )
        except TypeError as e:
            raise ConfigError(f"config does not match this version of proteus: {e}") from None


# Presets: overrides on top of the defaults, per section.
PRESETS: dict[str, dict[str, dict]] = {
    # The record of SPEC.md: 8 GPUs, 600 s, 786k-token batches of 2048-token sequences.
    "h100": {
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
        "eval": dict(stride=64, eval_batch_seqs=32),
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
        # ttt_*: chosen on held-out training tokens (README, "Score-first test-time training")
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

SECTIONS = {"model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def _field_type(cls, f) -> type:
    return typing.get_type_hints(cls)[f.name]


def _parse_value(kind: type, raw: str, where: str):
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean (true/false), got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {raw!r}") from None


def _all_fields():
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield section, cls, f


def add_config_arguments(parser: argparse.ArgumentParser, sections=("model", "train", "eval")):
    """One ``--flag`` per config field (default None: 'not given'), grouped by section."""
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} options ({cls.__name__})")
        for f in fields(cls):
            if section == "train" and f.name == "preset":
                continue
            kind = _field_type(cls, f)
            flag = "--" + f.name.replace("_", "-")
            env = "PROTEUS_" + f.name.upper()
            default = f.default
            helptext = f"{f.metadata.get('help', '')} [default {default!r}; env {env}]"
            if kind is bool:  # a bare --flag means true
                group.add_argument(
                    flag,
                    dest=f"{section}.{f.name}",
                    default=None,
                    nargs="?",
                    const=True,
                    type=lambda s, n=flag: _parse_value(bool, s, n),
                    metavar="BOOL",
                    help=helptext,
                )
            else:
                group.add_argument(
                    flag,
                    dest=f"{section}.{f.name}",
                    default=None,
                    type=lambda s, k=kind, n=flag: _parse_value(k, s, n),
                    metavar=kind.__name__.upper(),
                    help=helptext,
                )


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, dict]:
    """``PROTEUS_*`` variables as section overrides; unknown names are an error."""
    environ = os.environ if environ is None else environ
    known = {"PROTEUS_" + f.name.upper(): (section, cls, f) for section, cls, f in _all_fields()}
    out: dict[str, dict] = {s: {} for s in SECTIONS}
    for name, raw in environ.items():
        if not name.startswith("PROTEUS_"):
            continue
        if name not in known:
            raise ConfigError(
                f"unknown environment variable {name}; PROTEUS_* names must be config options "
                "(see `proteus train --help`); unset it"
            )
        section, cls, f = known[name]
        out[section][f.name] = _parse_value(_field_type(cls, f), raw, name)
    return out


def eval_overrides(ec: EvalConfig, cli: Mapping[str, object]) -> EvalConfig:
    """``ec`` with the ``eval.*`` values given on the command line, validated (the evaluation
    commands start from the config a checkpoint or artifact was trained with)."""
    over = {k.split(".", 1)[1]: v for k, v in cli.items()
            if k.startswith("eval.") and v is not None}
    out = dataclasses.replace(ec, **over)
    out.validate()
    return out


def build_config(
    preset: str, cli: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> RunConfig:
    """preset -> PROTEUS_* environment -> CLI flags (``{"section.field": value}``), validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    layers = {s: dict(PRESETS[preset].get(s, {})) for s in SECTIONS}
    layers["train"]["preset"] = preset
    for section, values in env_overrides(environ).items():
        layers[section].update(values)
    for key, value in (cli or {}).items():
        if value is None:
            continue
        section, name = key.split(".", 1)
        layers[section][name] = value
    cfg = RunConfig(
        model=ModelConfig(**layers["model"]),
        train=TrainConfig(**layers["train"]),
        eval=EvalConfig(**layers["eval"]),
    )
    cfg.validate()
    return cfg
