"""Draw docs/gains.png from docs/gains.json: what the n-gram cache and score-first test-time
training gain, against the strength of the model they are applied to.

    pip install -e ".[plot]" && python docs/plot_gains.py

gains.json holds one row per checkpoint, as ``proteus eval`` printed them (see the report's
table in docs/ngram_cache.md): ``steps``, ``sliding`` (the model's bpb), and the bpb with the
cache (``cache``), with TTT (``ttt``) and with both (``both``) where measured.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows = json.loads((HERE / "gains.json").read_text())["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for key, label, marker in (("cache", "n-gram cache", "o"), ("ttt", "score-first TTT", "s"),
                               ("both", "both", "^")):
        pts = sorted((r["sliding"], r["sliding"] - r[key], r["steps"]) for r in rows
                     if r.get(key) is not None)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        if key == "cache":
            for x, y, steps in pts:
                ax.annotate(f"{steps:,} steps", (x, y), textcoords="offset points",
                            xytext=(4, 6), fontsize=7)
    ax.set_xlabel("model bpb, sliding window (lower = stronger)")
    ax.set_ylabel("gain in bpb")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Eval-time gains vs model strength (cpu-tiny, report tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "gains.png")


if __name__ == "__main__":
    main()
