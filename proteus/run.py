"""The run, top to bottom: train, then evaluate, then write the checkpoint and the artifact.

    set up      device, process group, tokenizer and byte table, validation tokens
    train       proteus.train.train: the loop (resumable checkpoints in run_dir/checkpoints/);
                returns the model with its final weights, checked finite
    save        model.ckpt, before any evaluation: an error or a signal during evaluation
                does not lose the trained model
    evaluate    plain bpb, sliding-window bpb, the n-gram cache and its audit, score-first
                test-time training (``--ttt``)
    save        the int6 artifact (quantise, write, evaluate the quantised model) and the
                16,000,000-byte budget check; summary.json last (a run directory with
                summary.json is a finished run)

Run directories never collide: :func:`open_run_dir` creates a fresh one (an existing
``--run-name`` is refused; a default name taken by another run in the same second gets a
suffix), and only a resumed run writes into an existing one.

The budget counts code bytes + artifact bytes (decimal). Code bytes are what a submission ships:
the packed, self-extracting script of the modules training and evaluation import
(``proteus.pack``). Functions return their results; progress lines go to the ``proteus`` logger.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
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
    STATE_DIR,
    JsonLog,
    clean_run_dir,
    int6_model,
    load_model,
    save_checkpoint,
    state_dir,
    state_paths,
    train_memory_bytes,
)
from proteus.config import RunConfig
from proteus.device import available_memory, device_name, pick_device
from proteus.dist import (
    Dist,
    broadcast_text,
    collective_timeout,
    env_world,
    heartbeat,
    local_rank,
    rank_world,
)
from proteus.errors import ConfigError, RunInterrupted
from proteus.eval import (
    EvalPlan,
    check_ttt_fits,
    evaluate,
    format_bpb,
    load_eval_tokens,
    make_plan,
)
from proteus.files import (
    InputError,
    OutputError,
    fsync_dir,
    json_digest,
    read_sealed_json,
    remove_stale_temps,
    sha256_file,
    stale_pid,
    write_sealed_json,
)
from proteus.gptq import quantize_with_calibration, run_choices
from proteus.model import GPT, build_model
from proteus.pack import packed_code_bytes
from proteus.quant import QuantizedState
from proteus.train import StopSignal, batch_layout, train

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model.int6"
TRAIN_LOG = "train.log"
MAX_ARTIFACT_READ = 1 << 30  # an artifact is read whole to hash it; the budget is 16 MB


SUMMARY_NAME = "summary.json"


def check_inputs(cfg: RunConfig) -> None:
    """The tokenizer (and its vocabulary size) and the shards' headers, before a run directory
    is made: a typo in a path costs no directory and no work."""
    tc = cfg.train
    check_memory(cfg, *batch_layout(tc, env_world()))
    vocab = cfg.model.vocab_size
    D.tokenizer_lut(tc.tokenizer, vocab)
    D.TokenStream(tc.train_files or D.bundled_train_glob(vocab))
    val = D.resolve_files(tc.val_files or D.bundled_val_glob(vocab), "val")
    if sum(D.read_shard_header(path) for path in val) < 2:
        raise D.DataError("the validation shards hold fewer than 2 tokens; nothing to score")
    make_plan(cfg)  # a bad cache parameter file fails before any training


def check_memory(cfg: RunConfig, seqs_per_rank: int, micro: int) -> None:
    """Refuse, in one line with the estimate and the limit, a run whose peak memory (a lower
    bound: :func:`~proteus.checkpoint.train_memory_bytes`) exceeds what its device has (on a
    CPU, shared by the ranks on this machine), before anything is allocated or created."""
    tc = cfg.train
    parts = train_memory_bytes(cfg, seqs_per_rank, micro)
    cuda = torch.cuda.is_available() and tc.device in ("auto", "cuda")
    device = torch.device("cuda", local_rank()) if cuda else torch.device("cpu")
    try:
        ranks = 1 if cuda else max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        ranks = 1
    need, avail = ranks * sum(parts.values()), available_memory(device)
    if avail is not None and need > avail:
        big = max(parts, key=parts.get)
        per = f"{ranks} ranks x {need // ranks / 2**30:,.1f} GiB, " if ranks > 1 else ""
        raise ConfigError(f"this run needs at least {need / 2**30:,.1f} GiB of memory ({per}most "
                          f"of it {big}); the {device.type} has {avail / 2**30:,.1f} GiB "
                          "available: use a smaller batch, micro-batch or model")


def open_run_dir(cfg: RunConfig, resume: str | Path | None = None) -> Path:
    """The run directory, the same on every rank (rank 0 decides, then tells the others).

    New run: ``out_dir/run_name`` must not exist (refused); the default name ``preset-time``
    gets a ``-2``, ``-3``... suffix if another run took it. It appears atomically with its
    sealed ``config.json`` (made as ``.NAME.tmpPID``, then renamed), so a killed start leaves
    no half-made directory under the name; one left by an older proteus (no config.json, nothing
    else in it) is reused, with a line saying so. Resumed run (``resume``: its directory): it
    must hold a sealed ``config.json`` and no ``summary.json``; temporary files of killed
    writes are deleted."""
    rank, _ = rank_world()
    text = ""
    if rank == 0:
        try:
            text = str(_resume_dir(Path(resume)) if resume else _new_run_dir(cfg))
        except (ConfigError, OutputError, InputError) as e:
            text = "\0" + str(e)  # every rank raises the same line, none waits for rank 0
    text = broadcast_text(text)
    if text.startswith("\0"):
        raise ConfigError(text[1:])
    return Path(text)


CONFIG_NAME = "config.json"
CONFIG_SEAL = "proteus-config-1"
SUMMARY_SEAL = "proteus-summary-1"
# what a run writes into its directory (its temporary files of killed writes are removed)
RUN_FILES = (CONFIG_NAME, SUMMARY_NAME, "model.ckpt", ARTIFACT_NAME)
_CREATING = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


def _half_made(path: Path) -> bool:
    """A directory that a killed start left under a run's name (an older proteus made the
    directory before its config.json): no config.json and nothing but temporary files."""
    if path.is_symlink() or not path.is_dir():
        return False
    return all(_CREATING.match(p.name) and p.is_file() and not p.is_symlink()
               for p in path.iterdir())


def _remove_creating(parent: Path, name: str) -> None:
    """Delete ``.NAME.tmpPID`` directories of starts that were killed (their process is gone)
    before the rename; only what a start puts there (config.json, its temporary file)."""
    for p in parent.glob(f".{glob.escape(name)}.tmp*"):
        m = _CREATING.match(p.name)
        if not (m and m["name"] == name and p.is_dir() and not p.is_symlink()):
            continue
        if not stale_pid(int(m["pid"])):
            continue
        inner = list(p.iterdir())
        if all(q.name == CONFIG_NAME or _CREATING.match(q.name) for q in inner):
            for q in inner:
                q.unlink(missing_ok=True)
            p.rmdir()


def _new_run_dir(cfg: RunConfig) -> Path:
    tc = cfg.train
    parent = Path(tc.out_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {parent}: {e.strerror or e}") from None
    base = tc.run_name or f"{tc.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 1000):
        path = parent / (base if i == 1 else f"{base}-{i}")
        if _half_made(path):
            write_sealed_json(path / CONFIG_NAME, cfg.to_dict(), CONFIG_SEAL)
            log.info(f"run directory {path} was left half-made by a killed run (no "
                     "config.json, nothing else in it): reusing it for this run")
            return path
        try:
            _remove_creating(parent, path.name)
            if _create_atomically(path, cfg):
                return path
        except OSError as e:
            raise OutputError(f"cannot create run directory {path}: {e.strerror or e}") from None
        if tc.run_name:
            raise ConfigError(f"run directory {path} already exists; pick another "
                              f"--run-name, or continue that run with --resume {path}")
    raise ConfigError(f"no free run directory name {base}-N in {parent}; pass --run-name")


def _create_atomically(path: Path, cfg: RunConfig) -> bool:
    """Make ``path`` with its sealed config.json in one rename; False if the name is taken."""
    if path.exists() or path.is_symlink():
        return False
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        write_sealed_json(tmp / CONFIG_NAME, cfg.to_dict(), CONFIG_SEAL)
        try:
            os.rename(tmp, path)  # atomic; refused if another run made a non-empty `path`
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                return False
            raise
        fsync_dir(path.parent)
        return True
    finally:
        if tmp.exists():
            (tmp / CONFIG_NAME).unlink(missing_ok=True)
            remove_stale_temps(tmp)
            tmp.rmdir()


def discard_run_dir(path: Path) -> bool:
    """Remove a new run's directory after its run was refused (bad input, too little memory)
    before it saved anything worth keeping: only the files a run writes at its start
    (config.json, log.jsonl, train.log, an empty checkpoints/). Returns whether it went."""
    if path.is_symlink() or not path.is_dir():
        return False
    start = {CONFIG_NAME, "log.jsonl", TRAIN_LOG, STATE_DIR}
    inner = list(path.iterdir())
    states = path / STATE_DIR
    if any(p.name not in start and not _CREATING.match(p.name) for p in inner) or (
            states.is_dir() and any(states.iterdir())):
        return False
    for p in inner:
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink(missing_ok=True)
    path.rmdir()
    return True


def _refuse_half_made(path: Path) -> None:
    if _half_made(path):
        raise ConfigError(f"--resume {path}: a half-made run directory (its start was killed "
                          "before config.json was written): nothing to resume; start the run "
                          f"again with --out-dir {path.parent} --run-name {path.name}, which "
                          "reuses it")


def _resume_dir(path: Path) -> Path:
    _refuse_half_made(path)
    if not path.is_dir() or not (path / CONFIG_NAME).exists():
        raise ConfigError(f"--resume {path}: not a run directory (no config.json in it)")
    if (path / SUMMARY_NAME).exists():
        raise ConfigError(f"--resume {path}: that run finished ({SUMMARY_NAME} is there); "
                          "start a new run")
    for name in (CONFIG_NAME, "log.jsonl", TRAIN_LOG):
        f = path / name
        if f.is_symlink() or (f.exists() and not f.is_file()):
            raise ConfigError(f"--resume {path}: {name} is "
                              f"{'a symbolic link' if f.is_symlink() else 'not a regular file'}"
                              "; a run writes only its own files")
    removed = clean_run_dir(path)
    if removed:
        log.info(f"removed {len(removed)} temporary file(s) of killed writes from {path}")
    return path


def read_run_config(run_dir: Path) -> RunConfig:
    """A run's sealed config.json (bounded read, no symbolic link; an edit is refused)."""
    path = Path(run_dir) / CONFIG_NAME
    body, _ = read_sealed_json(path, CONFIG_SEAL, "run config", 1 << 20)
    cfg = RunConfig.from_dict(body, where=str(path))
    if body != cfg.to_dict():
        # the seal holds, so proteus wrote it: an older version, from before these options.
        # A new option's default is the behaviour from before it existed; say which ones.
        # Every version wrote every section, and each release adds a few options to one:
        # a section without most of its fields was not written by proteus.
        want = cfg.to_dict()
        thin = [s for s, fields in want.items() if not isinstance(body.get(s), dict)
                or 2 * sum(k not in body[s] for k in fields) > len(fields)]
        if thin:
            raise ConfigError(f"{path}: the run's config lacks most of section(s) "
                              f"{', '.join(thin)}; it was not written by proteus")
        missing = sorted(f"{s}.{k}" for s, fields in want.items() for k in fields
                         if k not in body[s])
        log.info(f"{path} was written by an older proteus: {len(missing)} option(s) it did not "
                 f"have take their defaults ({', '.join(missing[:8])}"
                 f"{', ...' if len(missing) > 8 else ''})")
    return cfg


def write_summary(run_dir: Path, results: dict, cfg: RunConfig) -> None:
    """``summary.json``, sealed and bound to the artifact's SHA-256 and size (counted from the
    file) and to the run's config: ``proteus submit`` refuses an edited or mismatched one."""
    binds: dict = {"config_sha256": json_digest(cfg.to_dict())}
    art = Path(run_dir) / ARTIFACT_NAME
    if art.is_file():
        binds["artifact_sha256"], binds["artifact_bytes"] = sha256_file(
            art, "artifact", MAX_ARTIFACT_READ)
    write_sealed_json(Path(run_dir) / SUMMARY_NAME, results, SUMMARY_SEAL, binds)


def find_resume(path: str | Path) -> tuple[Path, Path | None]:
    """``--resume`` target -> (run directory, training state to load or None to start at step
    0). A run directory resumes from its newest state; a state file (``checkpoints/step-N.ckpt``
    of a run directory) from that one."""
    p = Path(path)
    if p.is_file() and p.parent.name == state_dir(".").name:
        return p.parent.parent, p
    if not p.is_dir():
        raise ConfigError(f"--resume {p}: not a run directory or a checkpoints/step-N.ckpt file")
    _refuse_half_made(p)
    states = state_paths(p)
    return p, (states[-1] if states else None)


def run(cfg: RunConfig, run_dir: Path | None = None, *, resume: str | Path | dict | None = None,
        stop: StopSignal | None = None) -> dict:
    """Train, save, evaluate; return the results (``summary.json``'s content). ``resume``: a
    training state (or its path) to continue from; ``stop``: the caller's SIGTERM/SIGINT
    handling (see :class:`~proteus.train.StopSignal`)."""
    tc, mc, ec = cfg.train, cfg.model, cfg.eval
    device = pick_device(tc)
    dd = Dist(device.type, collective_timeout(tc))
    jlog = JsonLog(run_dir / "log.jsonl" if (run_dir and dd.main) else None)
    text_log = _text_log(run_dir / TRAIN_LOG if (run_dir and dd.main) else None)
    failed, ckpt = True, None
    try:
        # Data and tokenizer first: bad paths fail before any work.
        lut = D.tokenizer_lut(tc.tokenizer, mc.vocab_size)
        val, _ = load_eval_tokens(tc.val_files or D.bundled_val_glob(mc.vocab_size), ec,
                                  mc.vocab_size)
        plan = make_plan(cfg)
        if ec.ttt and ec.ttt_mode == "chunked":
            check_ttt_fits(ec, val.numel() - 1, plan.seq, build_model(cfg, "ref"))

        trained = train(cfg, dd=dd, device=device, val=val, lut=lut, jlog=jlog,
                        run_dir=run_dir, resume=resume, stop=stop)
        model, results = trained.model, dict(trained.stats)
        if run_dir and dd.main:  # before evaluation: nothing after this loses the model
            ckpt = run_dir / "model.ckpt"
            save_checkpoint(ckpt, model, cfg, dict(training={
                k: v for k, v in results.items() if k != "losses"}))
            results["checkpoint"] = str(ckpt)
        heartbeat("evaluation")

        t_eval = time.perf_counter()
        results["hardware"] = f"{dd.world}x {device_name(device)}"
        log.info(f"evaluating on {val.numel() - 1:,} validation tokens ...")
        if dd.main:
            train_tokens = D.load_tokens(tc.train_files or D.bundled_train_glob(mc.vocab_size),
                                         "train",
                                         vocab_size=mc.vocab_size)
            results["unigram_bpb"] = D.unigram_bpb(train_tokens, val, lut)
            log.info(f"  unigram baseline bpb {format_bpb(results['unigram_bpb'])} (the "
                     "training tokens' unigram frequencies)")
        results.update(evaluate(model, val, plan, lut=lut, device=device,
                                autocast=trained.autocast, progress=True).summary())
        results["eval_seconds"] = time.perf_counter() - t_eval
        jlog.write(event="final", **results)

        if run_dir:
            heartbeat("the artifact")
            # every rank takes part: the quantised model's evaluation is shared across ranks
            results["artifact"] = write_run_artifact(
                model, cfg, run_dir, val, lut, results["val"]["bpb"], device=device,
                autocast=trained.autocast, plan=plan)
            results["eval_seconds"] += results["artifact"].get("eval_seconds", 0.0)
            if dd.main:
                write_summary(run_dir, results, cfg)
        failed = False
        return results
    except RunInterrupted as e:
        if ckpt is None:
            raise
        raise RunInterrupted(f"{e} after training: the trained model is saved in {ckpt} "
                             f"(evaluate it with `proteus eval {ckpt}`)", e.signum) from None
    finally:
        jlog.close()
        if text_log:
            logging.getLogger("proteus").removeHandler(text_log)
            text_log.close()
        dd.close(failed)


def _text_log(path: Path | None) -> logging.Handler | None:
    """The run's progress lines, also in ``train.log`` beside ``log.jsonl`` (the training log a
    submission ships; a resumed run appends to it)."""
    if path is None:
        return None
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("proteus")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:  # a library caller that configured nothing
        logger.setLevel(logging.INFO)
    return handler


# ---------------------------------------------------------------------------------------------
# The run's artifact


def write_run_artifact(model: GPT, cfg: RunConfig, run_dir: Path, val: torch.Tensor | None = None,
                       lut: D.ByteLUT | None = None, float_bpb: float | None = None,
                       device: torch.device | str = "cpu", autocast: bool = False,
                       plan: EvalPlan | None = None) -> dict:
    """Quantise ``model``, write ``run_dir/model.int6``, report sizes and the budget check, and
    score the artifact: plain windows, and with ``eval.artifact_eval = full`` also the sliding
    window, the n-gram cache and TTT as configured (``scores``: what a submission claims).
    ``plan``: the run's evaluation plan (made from ``cfg`` when not given).

    Under torch.distributed every rank calls this: rank 0 writes the file, and the quantised
    model's evaluation is shared by all ranks (rank 0 reads the artifact back from disk, the
    others rebuild the same quantised weights in memory: ranks hold bit-identical weights and
    quantisation is deterministic)."""
    rank, _ = rank_world()
    choices = run_choices(cfg.train)
    calib = D.resolve_files(cfg.train.train_files or D.bundled_train_glob(), "train")
    qstate, qreport = quantize_with_calibration(model, choices, calib, cfg.train.seq_len,
                                                cfg.model.vocab_size, cfg.train.val_files)
    if choices.method != "rtn" or choices.lqer_rank or choices.embed_bits != 8:
        log.info(f"  quantiser: {choices.method}, int{choices.embed_bits} embeddings, LQER on "
                 f"{len(qreport['lqer'])} matrices; {qreport['seconds']:.1f}s"
                 + (f" + calibration {qreport['calibration']['seconds']:.1f}s"
                    if "calibration" in qreport else ""))
    path = Path(run_dir) / ARTIFACT_NAME
    out: dict = dict(path=str(path))
    if rank == 0:
        meta = {"run_config": cfg.to_dict(), "float_bpb": float_bpb, "quantiser": qreport}
        out.update(_sizes(write_artifact(str(path), qstate, meta), qstate))
    if val is not None and lut is not None:
        plan, t0 = plan or make_plan(cfg), time.perf_counter()
        if cfg.eval.artifact_eval == "full":
            log.info("  the int6 artifact, evaluated as a submission claims it:")
        else:
            plan = plan.plain_only()
        qmodel = load_model(str(path), cfg.train.kernels)[0] if rank == 0 else int6_model(
            cfg, qstate)
        qmodel = qmodel.to(device)
        r = evaluate(qmodel, val, plan, lut=lut, device=device, autocast=autocast)
        out["quantized_bpb"] = r.plain["bpb"]
        out["scores"] = r.scores("int6")
        if r.cache is not None:
            out["audit_passed"] = r.audit_passed
        if float_bpb is not None:
            log.info(f"  int6 round trip: val bpb {r.plain['bpb']:.4f} (float {float_bpb:.4f}, "
                     f"{r.plain['bpb'] - float_bpb:+.4f})")
        out["eval_seconds"] = time.perf_counter() - t0
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
