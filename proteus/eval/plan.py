"""What one evaluation does, decided once: the window, the passes, the cache's parameters (its
file read once, here) and the counting backend. ``evaluate`` takes a plan or builds one from a
``RunConfig``; a bad parameter file fails when the plan is made, before any work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from proteus.config import EvalConfig, RunConfig
from proteus.errors import ConfigError
from proteus.eval.blend import NgramConfig
from proteus.eval.fit import load_cache_params, load_tilt_params
from proteus.eval.scoring import eval_window
from proteus.tilt import TiltConfig

CACHE_MODES = {"none": (False, False), "ngram": (True, False), "tilt": (False, True),
               "ngram+tilt": (True, True)}  # --cache: (the n-gram cache, the tilt)


def ngram_config(ec: EvalConfig, vocab_size: int, check: bool = True) -> NgramConfig:
    """The cache's parameters: the shipped ones, or the file of ``ec.cache_params`` (checked
    against the evaluation's order, document switch and vocabulary). ``check``: refuse an
    order the vocabulary's keys cannot hold (``ConfigError``); without, such a config is
    returned as it is (an evaluation without the cache never uses it)."""
    if ec.cache_params:
        return load_cache_params(ec.cache_params, ec.ngram_order, ec.ngram_doc, vocab_size)
    cfg = NgramConfig(order=ec.ngram_order, doc=ec.ngram_doc,
                      id_bits=NgramConfig.bits_for(vocab_size))
    try:
        if check:
            cfg.validate()
    except ValueError as e:  # e.g. order 5 at vocab 8192: one line, exit 2
        raise ConfigError(f"{e} (--ngram-order)") from None
    return cfg


def tilt_config(ec: EvalConfig) -> TiltConfig:
    """The tilt's parameters: those fitted into ``ec.cache_params`` by `proteus tune-cache`
    when the file has them (they win over --tilt-beta/--tilt-min-order), else the options."""
    fitted = load_tilt_params(ec.cache_params, ec.tilt_order) if ec.cache_params else None
    return fitted or TiltConfig(beta=ec.tilt_beta, max_order=ec.tilt_order,
                                min_order=ec.tilt_min_order)


def ngram_backend(ec: EvalConfig) -> str:
    if ec.ngram_backend == "auto":
        return "triton" if torch.cuda.is_available() else "numpy"
    return ec.ngram_backend


@dataclass(frozen=True)
class EvalPlan:
    """One evaluation's steps. ``plain`` always runs; ``stride`` > 0 adds the sliding-window
    pass; ``cache`` blends the n-gram cache (parameters ``ncfg``, counted by ``backend``) over
    that pass's scores (and over TTT's); ``tilt`` tilts that pass's scores towards the hints
    (parameters ``tcfg``; with ``cache`` too, the cache blends over the tilted scores:
    ``proteus/eval/tilt_step.py`` says why in that order); ``ttt`` adds score-first test-time
    training; ``audit`` (none, cheap or full) audits what ran, on rank 0. ``quiet``: no result
    lines (training's periodic validation prints its own)."""

    cfg: RunConfig
    seq: int
    stride: int
    cache: bool
    ncfg: NgramConfig
    backend: str
    ttt: bool
    audit: str
    quiet: bool = False
    tilt: bool = False  # the token-only n-gram tilt over the last pass (proteus/tilt.py)
    tcfg: TiltConfig = TiltConfig()

    @property
    def ec(self) -> EvalConfig:
        return self.cfg.eval

    def plain_only(self) -> EvalPlan:
        return dataclasses.replace(self, stride=0, cache=False, ttt=False, audit="none",
                                   tilt=False)


def make_plan(cfg: RunConfig) -> EvalPlan:
    """The plan ``cfg.eval`` asks for (the cache's parameter file, when one is given, read and
    checked here, whether or not the cache is on)."""
    ec = cfg.eval
    cache, tilt = CACHE_MODES[ec.cache]
    return EvalPlan(cfg=cfg, seq=eval_window(cfg), stride=ec.stride, cache=cache,
                    ncfg=ngram_config(ec, cfg.model.vocab_size, check=cache),
                    backend=ngram_backend(ec),
                    ttt=ec.ttt, audit=ec.audit, tilt=tilt, tcfg=tilt_config(ec))


def validation_plan(cfg: RunConfig) -> EvalPlan:
    """Training's periodic validation: plain windows of the training sequence length, no
    result lines (the loop prints its own)."""
    ec = cfg.eval
    return EvalPlan(cfg=cfg, seq=cfg.train.seq_len, stride=0, cache=False,
                    ncfg=NgramConfig(order=ec.ngram_order, doc=ec.ngram_doc,
                                     id_bits=NgramConfig.bits_for(cfg.model.vocab_size)),
                    backend=ngram_backend(ec), ttt=False, audit="none", quiet=True)
