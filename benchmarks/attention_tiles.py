"""Tiles the XSA attention kernels compute under document masks, at the production shape.

``python -m benchmarks.attention_tiles`` (from the repository root) takes rows of T = 2048
consecutive tokens of the bundled validation sample (documents start at BOS), counts the tiles
the kernels' loop bounds visit with documents masked (``mask_tiles``: the kernels' own loop
arithmetic, tested against the kernels' tile counters and a brute-force count) and without
(plain causal), and turns both into FLOPs and a roofline time for B=8, H=8, KV=4, D=64 in bf16
on an H100 (989 TFLOPS dense; attention at this shape is compute-bound). The first 8 rows are
one production batch; all full rows of the sample give the spread.
"""

from __future__ import annotations

import argparse
import statistics

from proteus.data import bundled_val_glob, load_tokens
from proteus.kernels.xsa_attention import attention_mask, doc_ids_from_bos, mask_tiles

B, H, T, D = 8, 8, 2048, 64
FWD_BLOCKS, BWD_BLOCKS = (128, 64), (64, 64)  # the sm_90 configs (kernels._blocks, d <= 64)
H100_TFLOPS = 989.0


def batch_report(ids, window: int = -1) -> dict:
    """Tile counts, fractions and roofline times for the rows of ``ids`` (B, T)."""
    f = mask_tiles(T, window=window, doc_ids=ids, block_m=FWD_BLOCKS[0], block_n=FWD_BLOCKS[1])
    bw = mask_tiles(T, window=window, doc_ids=ids, block_m=BWD_BLOCKS[0], block_n=BWD_BLOCKS[1])
    fm, fn = FWD_BLOCKS
    bm, bn = BWD_BLOCKS
    # per head: forward 2 dots, dK/dV 4 dots, dQ 3 dots, each 2·bm·bn·D FLOPs
    fwd = (4 * fm * fn * D * H * f["fwd"], 4 * fm * fn * D * H * f["causal_fwd"])
    bwd = ((8 + 6) * bm * bn * D * H * bw["fwd"], (8 + 6) * bm * bn * D * H * bw["causal_fwd"])
    us = lambda flops: flops / (H100_TFLOPS * 1e12) * 1e6  # noqa: E731
    visible = attention_mask(T, window, ids).sum().item() / (ids.shape[0] * T * (T + 1) / 2)
    return dict(visible=visible,
        docs=int(ids.max(dim=1).values.sum() - ids.min(dim=1).values.sum() + ids.shape[0]),
        fwd_fraction=f["fwd"] / f["causal_fwd"], bwd_fraction=bw["fwd"] / bw["causal_fwd"],
        fwd_us=us(fwd[0]), fwd_causal_us=us(fwd[1]),
        step_us=us(fwd[0] + bwd[0]), step_causal_us=us(fwd[1] + bwd[1]),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.attention_tiles",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=int, default=-1, help="also a window of N keys (-1: none)")
    args = ap.parse_args(argv)
    window = args.window - 1 if args.window > 0 else -1
    tokens = load_tokens(bundled_val_glob(), "val")
    rows = tokens[: tokens.numel() // T * T].view(-1, T)
    first = batch_report(doc_ids_from_bos(rows[:B]), window)
    batches = [batch_report(doc_ids_from_bos(rows[i:i + B]), window)
               for i in range(0, rows.shape[0] - B + 1, B)]
    print(f"B={B} H={H} KV=4 T={T} D={D} bf16, documents of the bundled validation sample"
          + (f", window {args.window}" if window >= 0 else ""))
    print("| batch | documents | visible pairs vs causal | fwd tiles vs causal "
          "| bwd tiles vs causal | fwd roofline | fwd+bwd roofline |")
    print("|---|---|---|---|---|---|---|")
    print(f"| first 8 rows | {first['docs']} | {first['visible']:.3f} "
          f"| {first['fwd_fraction']:.3f} "
          f"| {first['bwd_fraction']:.3f} | {first['fwd_us']:.1f} µs vs "
          f"{first['fwd_causal_us']:.1f} | {first['step_us']:.1f} µs vs "
          f"{first['step_causal_us']:.1f} |")
    fr = [b["fwd_fraction"] for b in batches]
    st = [b["step_us"] for b in batches]
    print(f"| all {len(batches)} batches of the sample, mean (min-max) | "
          f"{statistics.mean(b['docs'] for b in batches):.1f} "
          f"| {statistics.mean(b['visible'] for b in batches):.3f} "
          f"| {statistics.mean(fr):.3f} ({min(fr):.3f}-{max(fr):.3f}) | "
          f"{statistics.mean(b['bwd_fraction'] for b in batches):.3f} | "
          f"{statistics.mean(b['fwd_us'] for b in batches):.1f} µs vs "
          f"{first['fwd_causal_us']:.1f} | {statistics.mean(st):.1f} µs "
          f"({min(st):.1f}-{max(st):.1f}) vs {first['step_causal_us']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
