"""Charts: one PNG per benchmark family (``proteus bench --plot DIR``) and a run's training
curves (``proteus plot RUN_DIR``).

matplotlib is optional (``pip install 'proteus-kernels[plot]'``): this module imports without
it, and asking for a chart without it is a one-line error (``ConfigError``, exit code 2). Only
matplotlib's object API and its Agg canvas are used (no pyplot, no global backend state).

Benchmark charts follow FlashAttention's and Liger-Kernel's benchmark pages: throughput
(TFLOPS, else GB/s, else tokens/s or ops/s) against the family's x (sequence length, M, keys),
one line per provider, ours drawn thicker, with the CSV of the plotted points beside the PNG.
On a GPU the roofline of the device (``proteus.bench.PEAKS``) is a dashed line: for each x,
min(peak FLOP/s, bytes/s x FLOPs per byte of our kernel's work). A family measured at one
point only is drawn as bars. On CPU the title says that the Triton kernels ran on the
interpreter. Skipped providers are listed under the chart with their reasons.

Run charts: training loss, validation bpb and tokens/s against step (left) and training wall
time (right), from ``log.jsonl`` (``step``, ``val`` and ``final`` records; one step record per
step). A log from before every step had a record (one record per ``log_every`` steps) takes
the loss of every step from the run's ``summary.json``. Series of 50 points or fewer are drawn
with markers, so a short run's panels show its points.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from proteus.errors import ConfigError
from proteus.files import InputError, atomic_write, parse_json, read_bounded, read_json

try:  # optional: the package and every command but the charts work without it
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

CPU_NOTE = "CPU: the Triton kernels ran on Triton's interpreter (times prove the harness only)"
OURS = "triton"


def require_matplotlib(what: str = "charts") -> None:
    if Figure is None:
        raise ConfigError(f"{what} need matplotlib, which is not installed: "
                          "pip install 'proteus-kernels[plot]' (or pip install matplotlib)")


def prepare_dir(path: str | os.PathLike, charts: bool = True) -> Path:
    """The output directory, created if needed and checked writable (before any long run);
    ``charts``: matplotlib must be there too."""
    if charts:
        require_matplotlib()
    out = Path(path)
    probe = out / f".proteus-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write charts to {out}: {e.strerror or e}") from None
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "benchmark"


def _save(fig, path: Path, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# Benchmark families


def families(recs: list[dict]) -> dict[str, list[dict]]:
    """Records by family, in the order they first appear."""
    out: dict[str, list[dict]] = {}
    for r in recs:
        out.setdefault(r["family"], []).append(r)
    return out


def _roofline_line(rows: list[dict], metric: str, roofline) -> list[tuple[float, float]]:
    """(x, attainable throughput in ``metric`` units) from our kernel's work at each x."""
    _, pf, pb = roofline
    pts = []
    for r in rows:
        info = r.get("_info", {})
        if r["provider"] != OURS or r["status"] != "ok" or r.get("x") is None:
            continue
        if metric == "TFLOPS" and "flops" in info:
            ai = info["flops"] / info["bytes"] if info.get("bytes") else float("inf")
            pts.append((r["x"], min(pf, pb * ai) / 1e12))
        elif metric == "GB/s":
            pts.append((r["x"], pb / 1e9))
    return sorted(pts)


def bench_figure(family: str, rows: list[dict], env: dict, roofline=None):
    """The chart of one family (a matplotlib Figure): one line (or bar) per provider;
    ``roofline`` (name, FLOP/s, bytes/s) adds the device's roofline as a dashed line."""
    require_matplotlib()
    ok = [r for r in rows if r["status"] == "ok" and r.get("throughput") is not None]
    metric = next((r["metric"] for r in ok if r["provider"] == OURS), None) or (
        ok[0]["metric"] if ok else "")
    ok = [r for r in ok if r["metric"] == metric]
    fig = Figure(figsize=(7.2, 4.4), layout="constrained")
    ax = fig.add_subplot()
    xs = sorted({r["x"] for r in ok if r.get("x") is not None})
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    if len(xs) >= 2:
        for p in providers:
            pts = sorted((r["x"], r["throughput"]) for r in ok if r["provider"] == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p,
                    linewidth=2.6 if p == OURS else 1.4, zorder=3 if p == OURS else 2)
        roof = _roofline_line(rows, metric, roofline) if roofline else []
        if roof:
            ax.plot([x for x, _ in roof], [y for _, y in roof], linestyle="--", color="0.3",
                    label=f"{roofline[0]} roofline")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{int(x):,}" for x in xs])
        x_name = next((r["x_name"] for r in ok if r.get("x_name")), "")
        ax.set_xlabel(x_name)
    else:
        vals = [next(r["throughput"] for r in ok if r["provider"] == p) for p in providers]
        ax.barh(providers, vals, color=["C0" if p == OURS else "C7" for p in providers])
        ax.invert_yaxis()
        ax.set_xlabel(metric)
    values = [r["throughput"] for r in ok if r["throughput"] > 0]
    if values and max(values) / min(values) > 50:  # the interpreter is ~1000x off: log scale
        (ax.set_yscale if len(xs) >= 2 else ax.set_xscale)("log")
    if len(xs) >= 2:
        ax.set_ylabel(metric)
        ax.legend(fontsize=8, loc="best")
    ax.grid(True, alpha=0.3)
    title = f"{family} — {env.get('device', '')}"
    if env.get("device_kind") != "cuda" and OURS in providers:
        title += f"\n{CPU_NOTE}"
    ax.set_title(title, fontsize=9)
    skipped: dict[str, str] = {}  # one line per provider (its reason is the same at each x)
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault(r["provider"], r["reason"])
    foot = [f"torch {env.get('torch', '')}, triton {env.get('triton', '')}, "
            f"commit {str(env.get('commit', ''))[:12]}, {env.get('date', '')}"]
    foot += [f"skipped {p}: {why[:100]}" + ("…" if len(why) > 100 else "")
             for p, why in sorted(skipped.items())[:6]]
    fig.text(0.01, 0.0, "\n".join(foot), fontsize=6, va="bottom", color="0.35")
    bottom = 0.02 + 0.018 * len(foot)
    fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))
    return fig


def bench_charts(recs: list[dict], env: dict, out_dir: Path, roofline=None) -> list[Path]:
    """One PNG per family, and the CSV of its points beside it; returns the PNG paths."""
    require_matplotlib()
    paths = []
    for family, rows in families(recs).items():
        if not any(r["status"] == "ok" for r in rows):
            continue
        stem = out_dir / _slug(family)
        _save(bench_figure(family, rows, env, roofline), stem.with_suffix(".png"))
        _write_points(stem.with_suffix(".csv"), rows)
        paths.append(stem.with_suffix(".png"))
    return paths


def _write_points(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["family", "provider", "x_name", "x", "metric", "throughput", "p50_ms",
                "status", "reason"])
    for r in rows:
        w.writerow([r["family"], r["provider"], r.get("x_name", ""), r.get("x"),
                    r.get("metric", ""), r.get("throughput"), r.get("p50_ms"), r["status"],
                    r.get("reason", "")])
    atomic_write(path, buf.getvalue().encode())


# ---------------------------------------------------------------------------------------------
# A run's training curves


MAX_LOG_BYTES = 1 << 30
_NUM, _OPT = (int, float), (int, float, type(None))
# the fields of each record kind the figure reads: name -> (types, required)
RECORD_FIELDS = {
    "step": {"step": ((int,), True), "train_s": (_NUM, True), "loss": (_NUM, True),
             "tok_s": (_NUM, True)},
    "val": {"step": ((int,), True), "bpb": (_NUM, True), "train_s": (_NUM, False)},
    "config": {"params": ((int,), False), "world": ((int,), False), "config": ((dict,), False)},
    "final": {"val": ((dict,), False), "steps": ((int,), False),
              "train_seconds": (_NUM, False), "final_weights": ((str,), False)},
}


def _check_record(rec: dict, kind: str, where: str) -> None:
    """Each field the figure reads has its type (a bool is not a number), or one line."""
    for name, (kinds, required) in RECORD_FIELDS[kind].items():
        if name not in rec:
            if required:
                raise ConfigError(f"{where}: the {kind} record has no {name!r}; is the file a "
                                  "run's log?")
            continue
        v = rec[name]
        if not isinstance(v, kinds) or isinstance(v, bool):
            raise ConfigError(f"{where}: {kind} record field {name!r} is {str(v)[:40]!r}, not "
                              f"{'/'.join(k.__name__ for k in kinds)}")
    if kind == "final" and "val" in rec and not isinstance(rec["val"].get("bpb", 0.0), _OPT):
        raise ConfigError(f"{where}: final record field 'val.bpb' is not a number")
    if kind == "config":
        c = rec.get("config", {})
        t = c.get("train", {}) if isinstance(c, dict) else None
        if not isinstance(t, dict) or not isinstance(t.get("preset", ""), str):
            raise ConfigError(f"{where}: config record field 'config.train.preset' is not text")


def read_run_log(run_dir: str | os.PathLike) -> dict:
    """``log.jsonl``'s records by kind: config (dict), step / val (lists), final (dict)."""
    path = Path(run_dir) / "log.jsonl"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run directory {run_dir} not found")
    if not os.path.lexists(path):
        raise ConfigError(f"no log.jsonl in {run_dir}: pass a run directory written by "
                          "`proteus train`")
    out: dict = {"config": {}, "step": [], "val": [], "final": {}}
    try:
        raw = read_bounded(path, "run log", MAX_LOG_BYTES)
    except InputError as e:
        raise ConfigError(str(e)) from None
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = parse_json(line, f"{path}:{n}")
        except InputError as e:
            raise ConfigError(f"{e}; is the file a run's log?") from None
        kind = rec.get("event") if isinstance(rec, dict) else None
        if isinstance(kind, str):
            if kind in RECORD_FIELDS:
                _check_record(rec, kind, f"{path}:{n}")
            if kind in ("step", "val"):
                out[kind].append(rec)
            elif kind in ("config", "final"):
                out[kind] = rec
    if not out["step"]:
        raise ConfigError(f"{path} has no step records (the run logged nothing yet?)")
    out["losses"] = _summary_losses(Path(run_dir))
    return out


def _summary_losses(run_dir: Path) -> list[float]:
    """Every step's loss from ``summary.json`` (a finished run's), for logs written before
    each step had its own record; [] when there is none or it is unreadable."""
    try:
        losses = read_json(Path(run_dir) / "summary.json", "run summary").get("losses") or []
        return [float(x) for x in losses]
    except (InputError, ValueError, TypeError, AttributeError):
        return []


def _loss_points(log: dict) -> tuple[list[int], list[float], list[float]]:
    """(step, training seconds, loss) of every step: the step records, or, where they are
    sparser than ``summary.json``'s losses (an older log), those losses at their steps with
    the time interpolated from the step records."""
    steps, losses = log["step"], log.get("losses") or []
    if len(losses) > len(steps):
        final = log.get("final") or {}
        known = list(steps)
        if final.get("train_seconds") and final.get("steps", 0) > steps[-1]["step"]:
            known.append({"step": final["steps"], "train_s": final["train_seconds"]})
        st = list(range(1, len(losses) + 1))
        return st, [_wall_at(known, s) for s in st], losses
    return [s["step"] for s in steps], [s["train_s"] for s in steps], [s["loss"] for s in steps]


def _wall_at(steps: list[dict], step: int) -> float:
    """Training seconds at ``step``, interpolated between the logged steps (logs written
    before val records carried ``train_s``)."""
    pts = [(s["step"], s["train_s"]) for s in steps]
    if step <= pts[0][0]:
        return pts[0][1] * step / max(pts[0][0], 1)
    for (s0, t0), (s1, t1) in zip(pts, pts[1:], strict=False):
        if s0 <= step <= s1:
            return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
    return pts[-1][1]


def run_figure(log: dict, title: str = ""):
    """Loss, validation bpb and tokens/s against step and against training wall time."""
    require_matplotlib()
    steps = log["step"]
    vals = log["val"]
    final = log["final"]
    fig = Figure(figsize=(10, 8.4), layout="constrained")
    axes = fig.subplots(3, 2)
    st = [s["step"] for s in steps]
    wall = [s["train_s"] for s in steps]
    vst = [v["step"] for v in vals]
    vwall = [v.get("train_s", _wall_at(steps, v["step"])) for v in vals]
    vbpb = [v["bpb"] for v in vals]
    fin = final.get("val", {}).get("bpb") if final else None
    lst, lwall, loss = _loss_points(log)
    # a short run's few points: markers, so a panel of 1-2 points is not an empty frame
    few = dict(marker="o", markersize=3) if len(st) <= 50 else {}
    few_loss = dict(marker="o", markersize=3) if len(lst) <= 50 else {}
    for col, (xs, vx, lx, label) in enumerate(((st, vst, lst, "step"),
                                               (wall, vwall, lwall, "training wall time (s)"))):
        ax = axes[0][col]
        ax.plot(lx, loss, linewidth=1.0, **few_loss)
        ax.set_ylabel("training loss (nats)")
        ax = axes[1][col]
        if vals:
            ax.plot(vx, vbpb, marker="o", label="validation (during training)")
        if fin is not None:
            fx = final.get("steps", st[-1]) if col == 0 else final.get("train_seconds", wall[-1])
            ax.plot([fx], [fin], marker="*", markersize=12, linestyle="none", color="C3",
                    label=f"final {fin:.4f} ({final.get('final_weights', 'final')} weights)")
        ax.set_ylabel("validation bpb")
        if vals or fin is not None:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no validation records", ha="center", va="center",
                    transform=ax.transAxes)
        ax = axes[2][col]
        ax.plot(xs, [s["tok_s"] for s in steps], linewidth=1.0, color="C2", **few)
        ax.set_ylabel("tokens/s")
        ax.set_xlabel(label)
        for row in axes:
            row[col].grid(True, alpha=0.3)
    cfg = log["config"]
    params = cfg.get("params")
    preset = cfg.get("config", {}).get("train", {}).get("preset", "")
    head = title or "run"
    extra = ", ".join(x for x in (f"preset {preset}" if preset else "",
                                  f"{params:,} parameters" if params else "",
                                  f"{cfg.get('world', 1)} process(es)" if cfg else "") if x)
    fig.suptitle(f"{head}" + (f" — {extra}" if extra else ""), fontsize=10)
    return fig


def main_plot(run_dir: str, out: str | None = None) -> int:
    """``proteus plot RUN_DIR``: draw the run's curves to RUN_DIR/training.png (or ``out``)."""
    require_matplotlib("proteus plot")
    log = read_run_log(run_dir)
    path = Path(out) if out else Path(run_dir) / "training.png"
    prepare_dir(path.parent)
    _save(run_figure(log, Path(run_dir).resolve().name), path, dpi=80)
    n_val = len(log["val"]) + (1 if log["final"].get("val") else 0)
    extra = (f" (the loss of {len(log['losses'])} steps from summary.json)"
             if len(log["losses"]) > len(log["step"]) else "")
    print(f"proteus plot: {len(log['step'])} step records{extra}, {n_val} validation points "
          f"-> {path}")
    return 0
