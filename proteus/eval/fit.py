"""Fitting the n-gram cache's parameters (``proteus tune-cache``), the file that carries them,
and the held-out shards they may be fitted on (never validation tokens, never tokens the
checkpoint trained on)."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from proteus import data as D
from proteus.config import RunConfig
from proteus.errors import ConfigError
from proteus.eval.blend import NgramConfig, ngram_blend_logprobs
from proteus.eval.counts import _counts
from proteus.files import InputError, read_json
from proteus.kernels import MAX_ORDER
from proteus.tilt import TiltConfig

# ---------------------------------------------------------------------------------------------
# Fitting the parameters (``proteus tune-cache``) and the file that carries them

CACHE_PARAMS_FORMAT = "proteus-cache-params-1"
_FIELDS = ("weight", "k", "a", "doc_weight", "doc_k", "doc_a")


def cache_params_dict(cfg: NgramConfig, vocab_size: int, tilt: TiltConfig | None = None,
                      **meta) -> dict:
    """The JSON form of ``cfg``'s parameters, with what they fit (order, vocabulary), and the
    tilt's fitted ``beta``/``order``/``min_order`` under ``"tilt"`` when ``tilt`` is given."""
    out = {"format": CACHE_PARAMS_FORMAT, "order": cfg.order, "doc": cfg.doc,
           "vocab_size": vocab_size}
    out.update({f: list(v) if isinstance(v, tuple) else v
                for f in _FIELDS for v in [getattr(cfg, f)]})
    if tilt is not None:
        out["tilt"] = dict(beta=tilt.beta, order=tilt.max_order, min_order=tilt.min_order)
    out.update(meta)
    return out


def load_tilt_params(path: str, order: int) -> TiltConfig | None:
    """The tilt's fitted parameters from a :func:`cache_params_dict` file (None when it has
    none), refused (``ConfigError``, one line) when fitted for another longest match."""
    d = read_json(path, "cache parameters", 1 << 20)
    t = d.get("tilt") if isinstance(d, dict) else None
    if t is None:
        return None
    try:
        cfg = TiltConfig(beta=float(t["beta"]), max_order=int(t["order"]),
                         min_order=int(t["min_order"]))
        cfg.validate()
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"cache parameters {path} have a damaged tilt entry: "
                          f"{str(e)[:120]}") from None
    if cfg.max_order != order:
        raise ConfigError(f"cache parameters {path} fitted the tilt for tilt_order "
                          f"{cfg.max_order}, this evaluation has {order}; refit with `proteus "
                          "tune-cache --tilt-order` or drop --cache-params")
    return cfg


def load_cache_params(path: str, order: int, doc: bool, vocab_size: int) -> NgramConfig:
    """An ``NgramConfig`` from a file of :func:`cache_params_dict`, refused (``ConfigError``,
    one line) when it does not fit the evaluation: another order, document switch or
    vocabulary, or not such a file at all."""
    try:
        d = read_json(path, "cache parameters", 1 << 20)
    except InputError as e:
        raise ConfigError(f"{e}; pass a file written by `proteus tune-cache`") from None
    if not isinstance(d, dict) or d.get("format") != CACHE_PARAMS_FORMAT:
        raise ConfigError(f"cache parameters {path} are not a `proteus tune-cache` file "
                          f"(format tag {CACHE_PARAMS_FORMAT!r} missing)")
    for key, want in (("order", order), ("doc", doc), ("vocab_size", vocab_size)):
        if d.get(key) != want:
            raise ConfigError(f"cache parameters {path} were fitted for {key} {d.get(key)!r}, "
                              f"this evaluation has {want!r}; refit with `proteus tune-cache` "
                              "for this model and cache, or drop --cache-params")
    try:
        cfg = NgramConfig(order=order, doc=doc, id_bits=NgramConfig.bits_for(vocab_size), **{
            f: tuple(float(x) for x in d[f]) if isinstance(d[f], list) else float(d[f])
            for f in _FIELDS})
        cfg.validate()
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"cache parameters {path} are damaged: {str(e)[:120]}") from None
    return cfg


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def fit_cache_params(tokens: torch.Tensor, model_logp_target: torch.Tensor,
                     nbytes: torch.Tensor, cfg: NgramConfig = NgramConfig(),  # noqa: B008 (frozen)
                     iterations: int = 200) -> tuple[NgramConfig, dict]:
    """Fit ``cfg``'s confidence parameters (``weight``, ``k_n``, ``a_n`` for n = 2..order, and
    the document-level ones) to the targets [1, len) of ``tokens``: minimise the bits per byte
    of the blend, counts held fixed, by L-BFGS in float64 over unconstrained forms (weight =
    sigmoid, k and a = exp). The result is rounded to 4 significant digits; entries of orders
    above ``cfg.order`` repeat the highest fitted one. Returns it with the bits per byte of the
    model alone, of the blend with ``cfg`` and with the fitted parameters, each computed by
    ``ngram_blend_logprobs`` itself (not by the fit's copy of the blend)."""
    cfg.validate()
    n = tokens.numel()
    if model_logp_target.shape != (n - 1,) or nbytes.shape != (n - 1,):
        raise ValueError(f"fit_cache_params: model_logp_target and nbytes must have one entry per "
                         f"target ({n - 1}), got {tuple(model_logp_target.shape)} and "
                         f"{tuple(nbytes.shape)}")
    o = cfg.order
    c, d = _counts(tokens, n, o, "numpy", cfg.chunk, 1 if cfg.doc else None, cfg.id_bits)
    parts = [(c.occ[1:o, 1:n].double(), c.occ[: o - 1, : n - 1].double(), c.types[: o - 1, 1:n])]
    if d is not None:
        parts.append((d.tgt.double(), d.ctx.double(), d.types))
    kinds = [(parts[0], ("weight", "k", "a"))]
    if d is not None:
        kinds.append((parts[1], ("doc_weight", "doc_k", "doc_a")))
    p_model = model_logp_target.double().exp()
    scale = 1.0 / (math.log(2) * float(nbytes.sum()))

    def unpack(theta):
        out, i = [], 0
        for _ in kinds:
            out.append((torch.sigmoid(theta[i]), theta[i + 1 : i + o].exp(),
                        theta[i + o : i + 2 * o - 1].exp()))
            i += 2 * o - 1
        return out

    def bpb(theta):
        p = p_model
        for ((c_tgt, c_ctx, types), _), (w, k, a) in zip(kinds, unpack(theta), strict=True):
            tt = types.clamp(min=1).double()
            for j in range(o - 1):
                lam = w * c_ctx[j] / (c_ctx[j] + k[j] * tt[j] ** a[j])
                p = p + lam * (c_tgt[j] / c_ctx[j].clamp(min=1) - p)
        return -torch.log(p).sum() * scale

    init = []
    for _, (fw, fk, fa) in kinds:
        w = min(getattr(cfg, fw), 0.999)
        init += [math.log(w / (1 - w)), *(math.log(x) for x in getattr(cfg, fk)[: o - 1]),
                 *(math.log(max(x, 1e-3)) for x in getattr(cfg, fa)[: o - 1])]
    theta = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=iterations, tolerance_grad=1e-10,
                            tolerance_change=1e-13, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = bpb(theta)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = {}
    for (_, names), (w, k, a) in zip(kinds, unpack(theta.detach()), strict=True):
        pad = MAX_ORDER - o  # orders above the fitted one repeat the highest fitted order
        fitted[names[0]] = _round(float(w))
        fitted[names[1]] = tuple(_round(float(x)) for x in (*k, *[k[-1]] * pad))
        fitted[names[2]] = tuple(_round(float(x)) for x in (*a, *[a[-1]] * pad))
    new = dataclasses.replace(cfg, **fitted)
    new.validate()

    def score(cf):
        return float(-ngram_blend_logprobs(tokens, 1, n, model_logp_target, cf).sum() * scale)

    info = dict(bpb_model=float(-model_logp_target.sum() * scale), bpb_start=score(cfg),
                bpb_fitted=score(new), targets=n - 1, bytes=int(nbytes.sum()))
    return new, info


def _digest_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def held_out_files(cfg: RunConfig, pattern: str = "") -> list[str]:
    """Training shards that the checkpoint of ``cfg`` never trained on, for fitting eval-time
    parameters: the shards of ``pattern``, or by default the bundled train shards it did not
    train on. Shards are compared by content (sha256), not by path. A shard it trained on or a
    validation shard is refused (``DataError``), and so is a checkpoint that trained on every
    bundled shard when no ``pattern`` is given."""
    vocab = cfg.model.vocab_size
    train_glob = cfg.train.train_files or D.bundled_train_glob(vocab)
    try:
        trained = {_digest_file(f) for f in D.resolve_files(train_glob, "train")}
    except D.DataError:
        raise D.DataError(f"cannot tell which shards the checkpoint trained on: its train_files "
                          f"{train_glob!r} match nothing here") from None
    val_glob = cfg.train.val_files or D.bundled_val_glob(vocab)
    val = {_digest_file(f) for f in D.resolve_files(val_glob, "val")}
    if not pattern:
        files = [f for f in D.resolve_files(D.bundled_train_glob(vocab), "train")
                 if _digest_file(f) not in trained]
        if not files:
            raise D.DataError("the checkpoint trained on every bundled train shard, so none is "
                              "held out: train with --train-files leaving one out (e.g. "
                              "'proteus/data/fineweb_train_00000[02].bin') or pass --tune-files")
        return files
    files = D.resolve_files(pattern, "tune")
    for f in files:
        h = _digest_file(f)
        if h in val:
            raise D.DataError(f"{f} is a validation shard: cache parameters are fitted on "
                              "training tokens only")
        if h in trained:
            raise D.DataError(f"{f} is a shard the checkpoint trained on ({train_glob!r}); pass "
                              "shards it never saw")
    return files

