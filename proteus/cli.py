"""``proteus`` command line: train, eval, audit, tune-cache, quantize, artifact inspect, kernels
report, bench, plot, pack.

The top of the layers: argument parsing, printing and exit codes. Every model/train/eval option
is generated from the config dataclasses (see ``proteus/config.py``). Bad input — unknown preset,
option or ``PROTEUS_*`` variable, a value outside its range, missing data or tokenizer,
mismatched vocabulary, a damaged checkpoint or artifact, an unwritable folder — prints one line
naming the thing and the fix, and exits with code 2 (no traceback). A run that cannot go on
(diverged, lost a peer, out of memory) prints one line and exits 1; SIGTERM/SIGINT print where
the run was saved and exit 128 + the signal. A closed stdout (``proteus ... | head``) is
ignored. Progress lines of the library (the ``proteus`` logger) are printed on rank 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import re
import sys
from pathlib import Path

import proteus
from proteus.errors import ConfigError, ProteusError, RunInterrupted
from proteus.options import add_config_arguments, build_config, command_env
from proteus.presets import PRESETS

DEFAULT_PRESET = "cpu-tiny"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 0.1:  # nan fails too
        raise argparse.ArgumentTypeError(f"expected a number of bpb in [0, 0.1], got {text!r}")
    return value


def _cli_values(ns: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(ns).items() if "." in k}


def _like_run_and_no_audit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--like-run", action="store_true",
                   help="start from the run's own saved evaluation config (its stride, cache, "
                   "TTT, validation tokens...) instead of the defaults below; options given "
                   "still apply")
    p.add_argument("--no-audit", dest="eval.audit", action="store_const", const="none",
                   default=None, help="skip the audit (said so in the output); same as "
                   "--audit none")


def version_text() -> str:
    """``proteus --version``: this package's version and where it was imported from (a clone
    that shadows the installed package shows here), with torch's and triton's versions."""
    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    where = Path(proteus.__file__).resolve().parent
    return (f"proteus {proteus.__version__} ({where}); torch {dist('torch')}, triton "
            f"{dist('triton')}, python {sys.version.split()[0]}")


class _Version(argparse.Action):
    """``--version``, printed as one unwrapped line (argparse's own action wraps it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


def _preset_asked(argv: list[str]) -> str:
    """The ``--preset`` of a ``train`` command line, looked at before parsing so that
    ``train --preset X --help`` can show X's values (unknown or absent: the default preset)."""
    name = None
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--preset="):
            name = a.split("=", 1)[1]
    return name if name in PRESETS else DEFAULT_PRESET


def _show_preset_values(parser: argparse.ArgumentParser, preset: str) -> None:
    """Each option's help gives the value ``preset`` sets (the dataclass default where the
    preset sets none), not the bare dataclass default, which is the h100 record's."""
    cfg = build_config(preset, environ={})
    for action in parser._actions:
        if "." not in (action.dest or "") or not action.help:
            continue
        section, name = action.dest.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        text = f"[{preset}: {value!r}".replace("%", "%%")
        # the config options' "[default X; range; env NAME]" (not e.g. --no-audit's own text)
        action.help = re.sub(r"\[default [^;\]]*", lambda _m, t=text: t, action.help, count=1)


def build_parser(preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    """The whole command line; ``preset``: whose values ``train --help`` shows."""
    p = _Parser(prog="proteus", description="PROTEUS: fused Triton kernels, GPT training and "
                "honest evaluation for the Parameter Golf workload.")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="print the version, where it is installed, torch's and triton's, exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a preset, evaluate it, write checkpoint + artifact",
                       description="Train, evaluate val bpb, write the run directory "
                       "(config.json, log.jsonl, model.ckpt, artifact, summary.json). Each "
                       f"option shows the value of the {preset} preset"
                       + (" (the default; `--preset NAME --help` shows another's)"
                          if preset == DEFAULT_PRESET else "")
                       + ": what a run with that preset and no other option uses.")
    t.add_argument("--preset", default=None,
                   help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a stopped run from its newest checkpoint (or from a "
                   "RUN_DIR/checkpoints/step-N.ckpt), with its own config")
    t.add_argument("--seeds", default=None, metavar="LIST|N",
                   help="run the configuration once per seed (e.g. 1337,42,2025; a single "
                   "number N means N seeds from --seed up) and print mean, spread and a Welch "
                   "test; run directories RUN_NAME-seedS and RUN_NAME-seeds.json")
    t.add_argument("--baseline", action="append", default=None, metavar="VALUES|RUN_DIR",
                   help="with --seeds: the previous best to test against, as bpb numbers "
                   "(1.2244,1.2250) or earlier run directories (repeatable)")
    t.add_argument("--no-audit", dest="eval.audit", action="store_const", const="none",
                   default=None, help="skip the evaluation's audit (said so in the output and "
                   "in summary.json); same as --audit none")
    add_config_arguments(t)
    _show_preset_values(t, preset)

    e = sub.add_parser("eval", help="re-evaluate a checkpoint or an int6 artifact",
                       description="Evaluate val bpb of a checkpoint (model.ckpt) or an int6 "
                       "artifact: with no options, plain bpb over every validation token and "
                       "the cheap audit; each heavier step is an option (--stride, --cache "
                       "ngram, --ttt, --audit full), or replay the run's own evaluation with "
                       "--like-run.")
    e.add_argument("path", help="model.ckpt or artifact file")
    _like_run_and_no_audit(e)
    e.add_argument("--json", default=None, metavar="FILE",
                   help="also write every reported number, at full precision, to FILE")
    add_config_arguments(e, sections=("eval",))
    e.add_argument("--kernels", dest="train.kernels", default=None, choices=("ref", "triton"),
                   help="ref or triton")
    e.add_argument("--val-files", dest="train.val_files", default=None,
                   help="glob of validation shards ('' = the bundled sample)")

    a = sub.add_parser("audit", help="audit the n-gram cache's distributions (sum to 1, causal)")
    a.add_argument("path", help="model.ckpt or artifact file")
    a.add_argument("--like-run", action="store_true",
                   help="audit the evaluation the run itself ran (its saved evaluation config) "
                   "instead of `proteus eval`'s defaults")
    add_config_arguments(a, sections=("eval",))


    tc = sub.add_parser("tune-cache", help="fit the n-gram cache's parameters on held-out "
                        "training tokens", description="Fit the cache's confidence parameters "
                        "on the scores of training tokens the checkpoint never trained on "
                        "(never on validation tokens) and write them as JSON, for "
                        "`proteus eval --cache-params`.")
    tc.add_argument("path", help="model.ckpt or artifact file")
    tc.add_argument("--tune-files", default="", help="glob of training shards the checkpoint "
                    "never trained on (default: the bundled train shards it did not train on)")
    tc.add_argument("--tune-tokens", type=int, default=0,
                    help="fit on the first N tokens of them (0 = all)")
    tc.add_argument("--out", default="", help="JSON file to write (default: cache_params.json "
                    "next to the checkpoint)")
    tc.add_argument("--iterations", type=int, default=200, help="L-BFGS iterations")
    add_config_arguments(tc, sections=("eval",))

    q = sub.add_parser("quantize", help="quantise a float checkpoint into an artifact (RTN or "
                       "GPTQ, LQER, int7/int8 embeddings)", description="Quantise model.ckpt "
                       "into an artifact. GPTQ calibrates on training tokens (never validation "
                       "tokens: refused by content).")
    q.add_argument("path", help="a float checkpoint (model.ckpt)")
    q.add_argument("--method", default="rtn", help="rtn or gptq (default rtn)")
    q.add_argument("--clip-sigmas", type=float, default=0.0, help="GPTQ's per-row clip in "
                   "standard deviations (0 = RTN's clip search, default)")
    q.add_argument("--lqer-rank", type=int, default=0, help="rank of the LQER correction (0 = "
                   "off)")
    q.add_argument("--lqer-top-k", type=int, default=3, help="int6 matrices (largest error "
                   "first) that get the LQER correction")
    q.add_argument("--embed-bits", type=int, default=8, help="7 or 8")
    q.add_argument("--calib-files", default="", help="glob of training shards for GPTQ's "
                   "calibration (default: the checkpoint's training shards)")
    q.add_argument("--calib-batches", type=int, default=16, help="calibration batches")
    q.add_argument("--calib-seqs", type=int, default=8, help="sequences per calibration batch")
    q.add_argument("--out", default="", help="the artifact to write")

    art = sub.add_parser("artifact", help="artifact tools")
    art_sub = art.add_subparsers(dest="artifact_command", metavar="ACTION", parser_class=_Parser)
    ins = art_sub.add_parser("inspect", help="print an artifact's tensor table and sizes")
    ins.add_argument("path")

    k = sub.add_parser("kernels", help="kernel tools")
    k_sub = k.add_subparsers(dest="kernels_command", metavar="ACTION", parser_class=_Parser)
    rep = k_sub.add_parser("report", help="compile every kernel for sm_90 (H100) and report "
                           "registers, spills, shared memory, wgmma and occupancy")
    rep.add_argument("--json", default=None, help="also write the rows to this JSON file")

    b = sub.add_parser("bench", help="check every kernel against its reference, then time it",
                       description="Check every provider (ours and the peers installed) against "
                       "the reference, time it, print the tables and write the JSON and CSV "
                       "records (p20/p50/p80, throughput, peak memory, device, versions, "
                       "commit, date). By default the quick subset: the kernels, without the "
                       "compiled providers (one torch.compile each) or the cpu-tiny training "
                       "step unless --provider/--benchmark names them; --full runs everything "
                       "(27 minutes on a loaded 2-core CPU). It prints its estimated "
                       "duration first and a line per benchmark, and keeps each record as it "
                       "is measured, so an interrupted run (Ctrl-C) writes what it measured.")
    b.add_argument("--full", action="store_true",
                   help="every benchmark: the compiled providers (ref-compile, "
                   "proteus-compile) and the cpu-tiny training step too")
    b.add_argument("--json", default="bench-results.json",
                   help="pytest-benchmark JSON output, with the records added")
    b.add_argument("--csv", default=None, help="CSV of the records (default: the JSON's name "
                   "with .csv)")
    b.add_argument("--benchmark", action="append", default=[], metavar="NAME",
                   help="run only these benchmarks (repeat or comma-separate): "
                   "xsa_attention, leaky_relu2, int6_matmul, softcapped_ce, ngram, train_step")
    b.add_argument("--provider", action="append", default=[], metavar="NAME",
                   help="time only these providers (repeat or comma-separate), e.g. "
                   "triton,sdpa-flash")
    b.add_argument("--plot", default=None, metavar="DIR",
                   help="draw one PNG (+ CSV) per benchmark family into DIR (needs matplotlib: "
                   "pip install 'proteus-kernels[plot]')")
    b.add_argument("--suite", choices=["h100"], default=None,
                   help="h100: the cuda tests, every kernel at its production shape with the "
                   "peers installed, one markdown table and the charts (into --plot DIR, "
                   "default bench-h100/); needs a CUDA GPU")
    b.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")

    pl = sub.add_parser("plot", help="draw a run's training loss, validation bpb and tokens/s",
                        description="Draw training loss, validation bpb and tokens/s against "
                        "step and wall time from RUN_DIR/log.jsonl (needs matplotlib).")
    pl.add_argument("run_dir", help="a run directory written by proteus train")
    pl.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/training.png)")

    sb = sub.add_parser("submit", help="check the challenge's rules over several seeds' runs and "
                        "write a records folder", description="Validate run directories of one "
                        "configuration (one per seed) against the challenge's rules and write "
                        "README.md, submission.json, train_gpt.py (the packed code) and one log "
                        "per seed into a new folder.")
    sb.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    sb.add_argument("--out", required=True, help="the records folder to create")
    sb.add_argument("--name", default="PROTEUS", help="the submission's name")
    sb.add_argument("--author", default="", help="author, for submission.json")
    sb.add_argument("--github-id", default="", help="GitHub id, for submission.json")
    sb.add_argument("--blurb", default="PROTEUS: fused Triton kernels, Muon, int6 rANS artifact.",
                    help="one-paragraph summary")
    sb.add_argument("--baseline", action="append", default=None, metavar="VALUES|RUN_DIR",
                    help="the previous best: bpb numbers or run directories (repeatable)")
    sb.add_argument("--tolerance", type=_tolerance, default=None, metavar="BPB",
                    help="how far a claimed score may be from the one submit recomputes from "
                    "the artifact (default 0.0001; every published number is the recomputed "
                    "one)")

    dt = sub.add_parser("data", help="data tools")
    dt_sub = dt.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    sv = dt_sub.add_parser("synth-val", help="write a validation stand-in of the challenge's "
                           "size from the bundled documents (for time and memory at scale)",
                           description="Splice pieces of the bundled documents into --docs "
                           "new documents (BOS first, real length distribution) and write them "
                           "as validation shards in --out; see docs/eval_scale.md for what "
                           "differs from the real set.")
    sv.add_argument("--docs", type=int, default=50_000, help="documents (the challenge: 50000)")
    sv.add_argument("--out", required=True, metavar="DIR", help="directory for the shards")
    sv.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pk = sub.add_parser("pack", help="write the code a submission ships: one compressed, "
                        "self-extracting script (python SCRIPT train ... runs like proteus)",
                        description="Pack the modules training and evaluation import into one "
                        "self-extracting script and print its size next to the sources'.")
    pk.add_argument("--out", default="proteus_packed.py", help="the script to write")
    ir = sub.add_parser("import-record", help="turn the pg-record entry's saved state dict "
                        "into a proteus model.ckpt",
                        description="Map a state dict saved by the pg-record entry's "
                        "train_gpt.py (its final_model.pt: 3-D weight banks) onto our layout "
                        "(docs/pg_record.md) and write it as a model.ckpt that `proteus eval` "
                        "reads. The model options must be the ones the entry was run with.")
    ir.add_argument("path", help="the entry's torch.save'd state dict")
    ir.add_argument("--out", default="model.ckpt", help="the checkpoint to write (refused if "
                    "it exists)")
    ir.add_argument("--preset", default="pg-record", help="the preset the model options start "
                    "from (default pg-record)")
    ir.add_argument("--tokenizer", dest="train.tokenizer", default=None,
                    help="the SentencePiece model the entry was trained with (recorded in the "
                    "checkpoint for eval; '' = the bundled one)")
    ir.add_argument("--val-files", dest="train.val_files", default=None,
                    help="glob of the validation shards eval reads by default")
    add_config_arguments(ir, sections=("model",))
    return p


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at each record (not the stream of the first call:
    a caller that swaps stdout, as pytest's capture does, must not leave us a closed file); a
    closed stdout (``| head``) silences the lines instead of a logging traceback on each."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            _drop_stdout()
            return
        super().handleError(record)


def _drop_stdout() -> None:
    """Point stdout at /dev/null: later writes (and the flush at exit) go nowhere quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def setup_logging() -> None:
    """Print the library's progress lines (the ``proteus`` logger) on rank 0, as they come."""
    logger = logging.getLogger("proteus")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    rank = os.environ.get("RANK", "0")
    logger.setLevel(logging.INFO if rank in ("", "0") else logging.WARNING)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_preset_asked(argv) if "train" in argv else DEFAULT_PRESET)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return _dispatch(parser, args)
    except ProteusError as e:  # bad input, a failed or interrupted run: one line
        kind = "" if isinstance(e, RunInterrupted) else "error: "
        print(f"proteus: {kind}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("proteus: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed by the reader: nothing left to say to it
        _drop_stdout()
        return 0
    except MemoryError:
        print("proteus: error: out of memory; use a smaller batch, model or --val-tokens",
              file=sys.stderr)
        return 1
    except RuntimeError as e:  # torch's out-of-memory errors, one line; others are bugs
        text = str(e)
        if "out of memory" not in text and "can't allocate memory" not in text:
            raise
        print(f"proteus: error: out of memory ({text.strip().splitlines()[0][:160]}); use a "
              "smaller batch, model or --val-tokens", file=sys.stderr)
        return 1


def _seeds(text: str | None, resume: str | None) -> list[int] | None:
    """``--seeds``: a comma-separated list of seeds, or a count (a single number)."""
    if text is None:
        return None
    if resume:
        raise ConfigError("--seeds starts new runs; --resume continues one: pass one of them")
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects seeds like 1337,42,2025 or a count, got "
                          f"{text!r}") from None
    if not values or ("," not in text and not 1 <= values[0] <= 100):
        raise ConfigError(f"--seeds expects seeds like 1337,42,2025 or a count in [1, 100], "
                          f"got {text!r}")
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return values


def _dispatch(parser, args) -> int:
    # Each subcommand imports what it runs only when it runs: `proteus --help` and the light
    # commands stay fast, and no command pays for another's imports (torch.compile, triton's
    # compiler). These are the only function-local imports of the package.
    if args.command == "train":
        seeds = _seeds(args.seeds, args.resume)
        if args.baseline and not seeds:
            raise ConfigError("--baseline goes with --seeds (a test needs several runs)")
        if args.resume:
            from proteus.commands import main_resume

            return main_resume(args.resume, {**_cli_values(args), "train.preset": args.preset})
        from proteus.commands import main_train

        cfg = build_config(DEFAULT_PRESET if args.preset is None else args.preset,
                           _cli_values(args))
        if seeds and len(seeds) == 1 and "," not in args.seeds:  # a count
            seeds = [cfg.train.seed + i for i in range(seeds[0])]
        return main_train(cfg, seeds=seeds, baseline=args.baseline)
    if args.command == "submit":
        from proteus.commands import main_submit

        extra = {} if args.tolerance is None else {"tolerance": args.tolerance}
        return main_submit(args.run_dirs, args.out, args.name, args.author, args.github_id,
                           args.blurb, args.baseline, **extra)
    if args.command is None:
        parser.print_help()
        return 2
    values = {**command_env(args.command), **{k: v for k, v in _cli_values(args).items()
                                               if v is not None}}
    if args.command in ("eval", "audit"):
        from proteus.commands import main_audit, main_eval

        if args.command == "eval":
            return main_eval(args.path, values, args.like_run, args.json)
        return main_audit(args.path, values, args.like_run)
    if args.command == "import-record":
        from proteus.commands import main_import_record

        return main_import_record(args.path, args.out, build_config(args.preset, values, {}))
    if args.command == "tune-cache":
        from proteus.commands import main_tune_cache

        if args.tune_tokens < 0 or args.iterations < 1:
            raise ConfigError("--tune-tokens must be >= 0 and --iterations >= 1")
        return main_tune_cache(args.path, values, args.tune_files, args.tune_tokens,
                               args.out, args.iterations)
    if args.command == "quantize":
        from proteus.commands import main_quantize
        from proteus.gptq import QuantChoices

        choices = QuantChoices(args.method, args.clip_sigmas, args.lqer_rank, args.lqer_top_k,
                               args.embed_bits, args.calib_batches, args.calib_seqs)
        return main_quantize(args.path, choices, args.out, args.calib_files)
    if args.command == "artifact" and args.artifact_command == "inspect":
        from proteus.commands import main_inspect

        return main_inspect(args.path)
    if args.command == "kernels" and args.kernels_command == "report":
        from proteus.bench import run_report

        return run_report(args.json)
    if args.command == "data":
        if args.data_command != "synth-val":
            raise ConfigError("data: name an action (synth-val; see proteus data --help)")
        from proteus.synth import synth_val

        rec = synth_val(args.out, args.docs, args.seed)
        print(f"proteus data synth-val: {rec['docs']:,} documents, {rec['tokens']:,} tokens in "
              f"{len(rec['shards'])} shard(s) under {args.out} (record: synth_val.json); "
              "spliced from the bundled sample: for time and memory, not for bpb")
        return 0
    if args.command == "pack":
        from proteus.commands import main_pack

        return main_pack(args.out)
    if args.command == "bench":
        from proteus.bench import run_bench, run_suite

        if args.suite:
            if args.benchmark or args.provider:
                raise ConfigError("--suite h100 runs every kernel with every peer installed; "
                                  "drop --benchmark/--provider, or drop --suite")
            return run_suite(args.suite, args.plot, args.pytest_args)
        return run_bench(args.json, args.pytest_args, benchmarks=args.benchmark,
                         providers=args.provider, plot_dir=args.plot, csv_path=args.csv,
                         full=args.full)
    if args.command == "plot":
        from proteus.plot import main_plot

        return main_plot(args.run_dir, args.out)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
