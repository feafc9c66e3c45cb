"""The end of a training run: quantise, write the artifact, check the 16,000,000-byte budget.

The budget counts code bytes + artifact bytes (decimal). Code bytes are the Python sources
that a submission would ship: every ``.py`` file of the ``proteus`` and ``kernels`` packages.
The run also evaluates the quantised model (through the same path ``proteus eval`` uses on the
artifact) so the bpb cost of quantisation is reported next to the float model's.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACT_LIMIT = 16_000_000
ARTIFACT_NAME = "model.int6"


def code_bytes() -> int:
    import kernels
    import proteus

    total = 0
    for pkg in (proteus, kernels):
        root = Path(pkg.__file__).parent
        for path in root.rglob("*.py"):
            total += path.stat().st_size
    return total


def write_run_artifact(model, cfg, run_dir: Path, say, val=None, lut=None, float_bpb=None,
                       rank: int = 0) -> dict:
    """Quantise ``model``, write ``run_dir/model.int6``, report sizes and the budget check.

    Under torch.distributed every rank calls this: rank 0 writes the file, and the quantised
    model's evaluation is shared by all ranks (rank 0 reads the artifact back from disk, the
    others rebuild the same quantised weights in memory: ranks hold bit-identical weights and
    quantisation is deterministic)."""
    from proteus.quant import quantize_state_dict, write_artifact

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    qstate = quantize_state_dict(state)
    path = Path(run_dir) / ARTIFACT_NAME
    out: dict = dict(path=str(path))
    if rank == 0:
        meta = {"run_config": cfg.to_dict(), "float_bpb": float_bpb}
        out.update(_sizes(write_artifact(str(path), qstate, meta), qstate, say))
    if val is not None and lut is not None:
        from proteus.evaluate import evaluate_bpb
        from proteus.evaluate_cli import int6_model, load_model

        qmodel = load_model(str(path), cfg.train.kernels)[0] if rank == 0 else int6_model(
            cfg, qstate)
        r = evaluate_bpb(qmodel, val, lut, cfg.eval.eval_seq_len or cfg.train.seq_len, 0,
                         cfg.eval.eval_batch_seqs)
        out["quantized_bpb"] = r["bpb"]
        if float_bpb is not None:
            say(f"  int6 round trip: val bpb {r['bpb']:.4f} (float {float_bpb:.4f}, "
                f"{r['bpb'] - float_bpb:+.4f})")
    return out


def _sizes(info, qstate, say) -> dict:
    """Sizes of the file ``write_artifact`` wrote (its ``ArtifactInfo``), against the budget
    and the LZMA baseline."""
    from proteus.quant import lzma_baseline_bytes, value_coding_report

    art = info.total_bytes
    lzma = lzma_baseline_bytes(qstate)
    code = code_bytes()
    total = art + code
    out = dict(artifact_bytes=art, lzma_baseline_bytes=lzma,
               ratio_vs_lzma=art / lzma if lzma else None, code_bytes=code, total_bytes=total,
               limit=ARTIFACT_LIMIT, within_limit=total <= ARTIFACT_LIMIT)
    say(f"artifact {info.path}: {art:,} bytes ({art / lzma:.3f}x the {lzma:,}-byte LZMA-over-int8 "
        f"baseline) + code {code:,} = {total:,} of {ARTIFACT_LIMIT:,} bytes: "
        f"{'OK' if out['within_limit'] else 'OVER BUDGET'}")
    out["values"] = value_coding_report(qstate, info)
    for kind, r in out["values"].items():
        say(f"  {kind} values: rANS {r['rans_bytes']:,} bytes = "
            f"{r['rans_bytes'] / r['lzma_bytes']:.3f}x LZMA over one byte per value "
            f"({r['lzma_bytes']:,}); order-0 entropy {r['order0_bytes']:,.0f}")
    return out
