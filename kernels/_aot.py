"""H100 readiness without a GPU: compile kernels ahead of time for sm_90 and read the result.

Each kernel module exposes ``sm90_specs() -> list[AotSpec]``: its production launch(es)
described with real (CPU) argument tensors of the production shape and dtype, so the
compile mirrors what the GPU JIT would specialise (ints equal to 1 become constexprs,
ints divisible by 16 and 16-byte-aligned pointers get ``tt.divisibility=16``).

For every spec we run ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (which emits
sm_90a), re-run the bundled ``ptxas -v`` on the PTX for registers and spills (the driver
normally fills these in at load time, and there is none here), disassemble the cubin
with ``cuobjdump -sass`` to count instructions (HGMMA = wgmma, LDGSTS = cp.async,
UTMALDG = TMA, LDL/STL = local memory) and compute the occupancy the resources allow.

This module must run with ``TRITON_INTERPRET=0`` (``python -m proteus.kernels._aot``); the
``proteus kernels report`` command and the tests start it in a subprocess for that reason.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from ._common import AotSpec

H100_SMEM_PER_BLOCK = 232448  # 227 KB: the most dynamic shared memory one block may use
H100_SMEM_PER_SM = 233472  # 228 KB per SM
H100_REGS_PER_SM = 65536
H100_MAX_WARPS_PER_SM = 64
H100_MAX_BLOCKS_PER_SM = 32

KERNEL_MODULES = (
    "proteus.kernels.leaky_relu2",
    "proteus.kernels.xsa_attention",
    "proteus.kernels.int6_matmul",
    "proteus.kernels.ngram_table",
    "proteus.kernels.softcapped_ce",
)

_SASS_OP = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", re.M)


def _jit_fn(kernel):
    fn = kernel
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise RuntimeError(
                f"{kernel!r} is not a compiled Triton kernel: run the report with "
                "TRITON_INTERPRET=0 (python -m proteus.kernels._aot)"
            )
        fn = fn.fn
    return fn


def occupancy(regs: int, smem: int, num_warps: int) -> dict:
    """Resident blocks and warps per H100 SM allowed by registers, shared memory and warps."""
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256  # allocated per warp in 256s
    by_regs = H100_REGS_PER_SM // (regs_per_warp * num_warps)
    by_smem = H100_SMEM_PER_SM // (smem + 1024) if smem else H100_MAX_BLOCKS_PER_SM
    by_warps = H100_MAX_WARPS_PER_SM // num_warps
    blocks = max(0, min(by_regs, by_smem, by_warps, H100_MAX_BLOCKS_PER_SM))
    limiter = min(
        ("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps), key=lambda x: x[1]
    )[0]
    return dict(
        blocks_per_sm=blocks,
        warps_per_sm=blocks * num_warps,
        occupancy=blocks * num_warps / H100_MAX_WARPS_PER_SM,
        limiter=limiter,
    )


def compile_spec(spec: AotSpec, arch: int = 90) -> dict:
    """Compile one spec for sm_{arch}; return the resource and instruction summary."""
    fn = _jit_fn(spec.fn)
    bound = {**dict(zip(fn.arg_names, spec.args, strict=False)), **spec.kwargs}
    missing = [p.name for p in fn.params if p.name not in bound]
    if missing:
        raise ValueError(f"{spec.kernel}: launch arguments missing for {missing}")
    signature, constexprs, div16 = {}, {}, []
    for p in fn.params:
        value = bound[p.name]
        if p.is_constexpr:
            constexprs[p.name] = value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize, True)
        if ty == "constexpr":
            constexprs[p.name] = value
        else:
            signature[p.name] = ty
            if key == "D":
                div16.append(p.name)
    sig = {a: "constexpr" if a in constexprs else signature[a] for a in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, a in enumerate(fn.arg_names)
        if sig[a].startswith("*") or a in div16
    }
    opts = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
    ck = triton.compile(
        ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=opts
    )
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(ck.asm["ptx"])
        with open(f"{d}/k.cubin", "wb") as f:
            f.write(ck.asm["cubin"])

        def run(*cmd):
            return subprocess.run(cmd, capture_output=True, text=True, check=True)

        fmad = [] if ck.metadata.enable_fp_fusion else ["--fmad=false"]
        log = run(
            get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
            f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", *fmad,
            f"{d}/k.ptx", "-o", f"{d}/k.o",
        ).stderr
        sass = run(f"{bindir}/cuobjdump", "-sass", f"{d}/k.cubin").stdout
        res = run(f"{bindir}/cuobjdump", "-res-usage", f"{d}/k.cubin").stdout

    def grab(pattern: str, text: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    ops = _SASS_OP.findall(sass)

    def count(*prefixes: str) -> int:
        return sum(o.startswith(prefixes) for o in ops)

    regs = grab(r"REG:(\d+)", res)
    smem = int(ck.metadata.shared)
    out = dict(
        kernel=spec.kernel,
        shape=spec.shape,
        config=_config_text(spec),
        regs=regs,
        spill_stores=grab(r"(\d+) bytes spill stores", log),
        spill_loads=grab(r"(\d+) bytes spill loads", log),
        smem=smem,
        smem_ok=smem <= H100_SMEM_PER_BLOCK,
        matrix=spec.matrix,
        wgmma=count("HGMMA") > 0,
        n_hgmma=count("HGMMA"),
        n_hmma=count("HMMA"),
        n_cp_async=count("LDGSTS"),
        n_tma=count("UTMALDG", "UTMASTG"),
        n_ldg128=sum(o.startswith("LDG.") and o.endswith(".128") for o in ops),
        n_local=count("LDL", "STL"),
        n_atomic=count("ATOM", "RED"),
        n_ffma=count("FFMA"),
        n_sass=len(ops),
        num_warps=spec.num_warps,
    )
    out.update(occupancy(regs, smem, spec.num_warps))
    return out


def _config_text(spec: AotSpec) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in spec.kwargs.items() if k.isupper())
    return f"{blocks} w{spec.num_warps} s{spec.num_stages}".strip()


def collect_specs(modules=KERNEL_MODULES) -> list[AotSpec]:
    specs = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # that kernel is not part of this build
            raise
        if hasattr(mod, "sm90_specs"):
            specs.extend(mod.sm90_specs())
    return specs


def problems(row: dict) -> list[str]:
    """What makes a production config unfit for an H100 (a test fails on any)."""
    out = []
    if row.get("error"):
        out.append(f"compile failed: {row['error']}")
        return out
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']}/{row['spill_loads']} B")
    if not row["smem_ok"]:
        out.append(f"shared memory {row['smem']} B > {H100_SMEM_PER_BLOCK} B")
    if row["matrix"] and not row["wgmma"]:
        out.append("matrix path has no wgmma (HGMMA)")
    return out


def format_table(rows: list[dict]) -> str:
    head = (
        "| kernel | production shape | config | regs | spills st/ld B | smem B | wgmma "
        "| occupancy (warps/SM) | verdict |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['shape']} | | | | | | | FAIL: {r['error']} |")
            continue
        wg = f"yes ({r['n_hgmma']} HGMMA)" if r["wgmma"] else ("no" if r["matrix"] else "n/a")
        bad = problems(r)
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['config']} | {r['regs']} "
            f"| {r['spill_stores']}/{r['spill_loads']} | {r['smem']} | {wg} "
            f"| {r['warps_per_sm']}/64 ({r['limiter']}) "
            f"| {'FAIL: ' + '; '.join(bad) if bad else 'ok'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proteus.kernels._aot",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object per config")
    ap.add_argument("--only", default="", help="comma-separated kernel name prefixes")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("proteus.kernels._aot: run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "0"
    only = [s for s in args.only.split(",") if s]
    rows = []
    for spec in collect_specs():
        if only and not any(spec.kernel.startswith(o) for o in only):
            continue
        try:
            row = compile_spec(spec)
        except Exception as e:  # report the failure as a row; the caller decides
            row = dict(kernel=spec.kernel, shape=spec.shape, error=f"{type(e).__name__}: {e}")
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"compiled {row['kernel']}", file=sys.stderr, flush=True)
    if not args.json:
        print(format_table(rows))
    return 1 if any(problems(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
