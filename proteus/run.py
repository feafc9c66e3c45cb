"""The run, top to bottom: train, then evaluate, then write the checkpoint and the artifact.

    set up      device, process group, tokenizer and byte table, validation tokens
    train       proteus.train.train: the loop; returns the model with its final weights
    evaluate    plain bpb, sliding-window bpb, the n-gram cache and its audit, score-first
                test-time training (``--ttt``)
    save        model.ckpt; the int6 artifact (quantise, write, evaluate the quantised model)
                and the 16,000,000-byte budget check; summary.json

The budget counts code bytes + artifact bytes (decimal). Code bytes are what a submission ships:
the packed, self-extracting script of the modules training and evaluation import
(``proteus.pack``). Functions return their results; progress lines go to the ``proteus`` logger.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from proteus import data as D
from proteus.artifact import (
    ARTIFACT_LIMIT,
    ArtifactInfo,
    lzma_baseline_bytes,
    value_coding_report,
    write_artifact,
)
from proteus.checkpoint import (
    JsonLog,
    atomic_write_json,
    int6_model,
    load_model,
    save_checkpoint,
)
from proteus.config import ConfigError, RunConfig
from proteus.device import pick_device
from proteus.dist import Dist, env_rank
from proteus.evaluate import evaluate_bpb, format_bpb, load_eval_tokens, sliding_and_cache
from proteus.model import GPT, build_model
from proteus.pack import packed_code_bytes
from proteus.quant import QuantizedState, quantize_state_dict
from proteus.train import train
from proteus.ttt import check_ttt_fits, ttt_report

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model.int6"


def make_run_dir(cfg: RunConfig) -> Path:
    """``out_dir/run_name`` (default ``preset-time``), created on rank 0 with ``config.json``."""
    tc = cfg.train
    name = tc.run_name or f"{tc.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(tc.out_dir) / name
    if env_rank() == 0:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create run directory {path}: {e.strerror}") from None
        atomic_write_json(path / "config.json", cfg.to_dict())
    return path


def run(cfg: RunConfig, run_dir: Path | None = None) -> dict:
    """Train, evaluate, save; return the results (``summary.json``'s content)."""
    tc, mc, ec = cfg.train, cfg.model, cfg.eval
    device = pick_device(tc)
    dd = Dist(device.type)
    jlog = JsonLog(run_dir / "log.jsonl" if (run_dir and dd.main) else None)
    try:
        # Data and tokenizer first: bad paths fail before any work.
        lut = D.build_byte_lut(D.load_tokenizer(tc.tokenizer), mc.vocab_size)
        val, _ = load_eval_tokens(tc.val_files or D.bundled_val_glob(), ec)
        if ec.ttt:
            check_ttt_fits(ec, val.numel() - 1, ec.eval_seq_len or tc.seq_len,
                           build_model(cfg, "ref"))

        trained = train(cfg, dd=dd, device=device, val=val, lut=lut, jlog=jlog)
        model, results = trained.model, dict(trained.stats)

        seq = ec.eval_seq_len or tc.seq_len
        if dd.main:
            train_tokens = D.load_tokens(tc.train_files or D.bundled_train_glob(), "train")
            results["unigram_bpb"] = D.unigram_bpb(train_tokens, val, lut)
        log.info(f"evaluating on {val.numel() - 1:,} validation tokens ...")
        r = evaluate_bpb(model, val, lut, seq, 0, ec.eval_batch_seqs, device, trained.autocast,
                         progress=True)
        results["val"] = r
        log.info(f"  val bpb {format_bpb(r['bpb'])} (loss {r['loss']:.4f}, window {seq}, plain)"
                 + (f"; unigram baseline {format_bpb(results['unigram_bpb'])}"
                    if dd.main else ""))
        results.update(sliding_and_cache(model, cfg, ec, val, lut, seq, dd.rank, dd.world,
                                         device, trained.autocast, progress=True))
        if ec.ttt:
            results["ttt"] = ttt_report(model, cfg, ec, val, lut, seq, dd.rank, dd.world, device,
                                        trained.autocast, progress=True)
        jlog.write(event="final", **results)

        if run_dir:
            if dd.main:
                save_checkpoint(run_dir / "model.ckpt", model, cfg, dict(results=results))
                results["checkpoint"] = str(run_dir / "model.ckpt")
            # every rank takes part: the quantised model's evaluation is shared across ranks
            results["artifact"] = write_run_artifact(model, cfg, run_dir, val, lut,
                                                     results["val"]["bpb"], rank=dd.rank)
            if dd.main:
                atomic_write_json(run_dir / "summary.json", results)
        return results
    finally:
        jlog.close()
        dd.close()


# ---------------------------------------------------------------------------------------------
# The run's artifact


def write_run_artifact(model: GPT, cfg: RunConfig, run_dir: Path, val: torch.Tensor | None = None,
                       lut: D.ByteLUT | None = None, float_bpb: float | None = None,
                       rank: int = 0) -> dict:
    """Quantise ``model``, write ``run_dir/model.int6``, report sizes and the budget check.

    Under torch.distributed every rank calls this: rank 0 writes the file, and the quantised
    model's evaluation is shared by all ranks (rank 0 reads the artifact back from disk, the
    others rebuild the same quantised weights in memory: ranks hold bit-identical weights and
    quantisation is deterministic)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    qstate = quantize_state_dict(state)
    path = Path(run_dir) / ARTIFACT_NAME
    out: dict = dict(path=str(path))
    if rank == 0:
        meta = {"run_config": cfg.to_dict(), "float_bpb": float_bpb}
        out.update(_sizes(write_artifact(str(path), qstate, meta), qstate))
    if val is not None and lut is not None:
        qmodel = load_model(str(path), cfg.train.kernels)[0] if rank == 0 else int6_model(
            cfg, qstate)
        r = evaluate_bpb(qmodel, val, lut, cfg.eval.eval_seq_len or cfg.train.seq_len, 0,
                         cfg.eval.eval_batch_seqs)
        out["quantized_bpb"] = r["bpb"]
        if float_bpb is not None:
            log.info(f"  int6 round trip: val bpb {r['bpb']:.4f} (float {float_bpb:.4f}, "
                     f"{r['bpb'] - float_bpb:+.4f})")
    return out


def _sizes(info: ArtifactInfo, qstate: QuantizedState) -> dict:
    """Sizes of the file ``write_artifact`` wrote, against the budget and the LZMA baseline."""
    art = info.total_bytes
    lzma = lzma_baseline_bytes(qstate)
    code = packed_code_bytes()
    total = art + code
    out = dict(artifact_bytes=art, lzma_baseline_bytes=lzma,
               ratio_vs_lzma=art / lzma if lzma else None, code_bytes=code, total_bytes=total,
               limit=ARTIFACT_LIMIT, within_limit=total <= ARTIFACT_LIMIT)
    log.info(f"artifact {info.path}: {art:,} bytes ({art / lzma:.3f}x the {lzma:,}-byte "
             f"LZMA-over-int8 baseline) + code {code:,} = {total:,} of {ARTIFACT_LIMIT:,} bytes: "
             f"{'OK' if out['within_limit'] else 'OVER BUDGET'}")
    out["values"] = value_coding_report(qstate, info)
    for kind, r in out["values"].items():
        log.info(f"  {kind} values: rANS {r['rans_bytes']:,} bytes = "
                 f"{r['rans_bytes'] / r['lzma_bytes']:.3f}x LZMA over one byte per value "
                 f"({r['lzma_bytes']:,}); order-0 entropy {r['order0_bytes']:,.0f}")
    return out
