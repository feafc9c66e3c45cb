"""The end of a training run: quantise, write the artifact, check the 16,000,000-byte budget.

The budget counts code bytes + artifact bytes (decimal). Code bytes are the Python sources
that a submission would ship: every ``.py`` file of the ``proteus`` and ``kernels`` packages.
The run also evaluates the quantised model (through the same path ``proteus eval`` uses on the
artifact) so the bpb cost of quantisation is reported next to the float model's.
"""

from __future__ import annotations

import os
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


def write_run_artifact(model, cfg, run_dir: Path, say, val=None, lut=None, float_bpb=None) -> dict:
    """Quantise ``model``, write ``run_dir/model.int6``, report sizes and the budget check."""
    from proteus.quant import lzma_baseline_bytes, quantize_state_dict, write_artifact

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    qstate = quantize_state_dict(state)
    meta = {"run_config": cfg.to_dict(), "float_bpb": float_bpb}
    path = Path(run_dir) / ARTIFACT_NAME
    write_artifact(str(path), qstate, meta)
    art = os.path.getsize(path)
    lzma = lzma_baseline_bytes(qstate)
    code = code_bytes()
    total = art + code
    out = dict(path=str(path), artifact_bytes=art, lzma_baseline_bytes=lzma,
               ratio_vs_lzma=art / lzma if lzma else None, code_bytes=code, total_bytes=total,
               limit=ARTIFACT_LIMIT, within_limit=total <= ARTIFACT_LIMIT)
    say(f"artifact {path}: {art:,} bytes ({art / lzma:.3f}x the {lzma:,}-byte LZMA-over-int8 "
        f"baseline) + code {code:,} = {total:,} of {ARTIFACT_LIMIT:,} bytes: "
        f"{'OK' if out['within_limit'] else 'OVER BUDGET'}")
    if val is not None and lut is not None:
        from proteus.evaluate import evaluate_bpb
        from proteus.evaluate_cli import load_model

        qmodel, _, _ = load_model(str(path), cfg.train.kernels)
        r = evaluate_bpb(qmodel, val, lut, cfg.eval.eval_seq_len or cfg.train.seq_len, 0,
                         cfg.eval.eval_batch_seqs)
        out["quantized_bpb"] = r["bpb"]
        if float_bpb is not None:
            say(f"  int6 round trip: val bpb {r['bpb']:.4f} (float {float_bpb:.4f}, "
                f"{r['bpb'] - float_bpb:+.4f})")
    return out
