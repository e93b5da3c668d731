"""Static SASS of the kernels' main loops, compiled for a GPU without one: instructions per iteration.

    python -m kernels.sass [--kernel _w1_gemv_kernel] [--label BLOCK_N=16] [--use "120b gemv"] [--ops]

Where a kernel is bound by the instructions it issues per weight byte (the MoE's
decode-sized expert matmuls on an H200, BENCHMARKS.md "GPU"), the SASS of its
inner loop predicts its speed and can be read on a CPU machine: this compiles
each of kernels.aot's planned configurations (the launchers' own choices, tuned
files included) with Triton's bundled ptxas, disassembles the cubin with its
bundled cuobjdump, and reports the longest loop (the body of the longest
backward branch) with its instruction count and, with --ops, its opcode mix.
For the expert matmuls' tensor-core tiles it also gives warp-instructions per
1K MACs and, for sm_90, that issue time over the tensor cores' time for the
same MACs: above 1, the loop is bound by the instructions it issues. For the
single-pair (gemv) tiles it gives warp-instructions per weight byte and, for
sm_90, the share of the SMs' issue rate that streaming at copy bandwidth takes.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)")
_BRANCH = re.compile(r"(?:@!?U?P\w+\s+)?BRA\s+(?:`?\(?\.L_x_\d+\)?\s*)?0x([0-9a-f]+)")


@dataclass
class Loop:
    kernel: str
    config: str
    uses: str
    instructions: int
    total: int
    ops: collections.Counter


def instructions(sass: str) -> list[tuple[int, str]]:
    """cuobjdump -sass text -> [(address, instruction text)]."""
    out = []
    for ln in sass.splitlines():
        m = _LINE.match(ln)
        if m:
            out.append((int(m.group(1), 16), m.group(2).split(";")[0].strip()))
    return out


def longest_loop(ins: list[tuple[int, str]]) -> list[str]:
    """The body (target .. branch, inclusive) of the backward branch spanning the most instructions, among
    loops that store nothing to global memory where there are any: a main loop accumulates in registers,
    while a longer loop of stores is an epilogue's (kernels.moe_combine's tail: a row at a time)."""
    spans = []
    for addr, text in ins:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            spans.append((not any(opcode(t) == "STG" for t in body), addr - lo, body))
    return max(spans, key=lambda s: s[:2])[2] if spans else []


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def disassemble(cubin: bytes) -> str:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


# The expert matmuls' tiled loops (tensor cores): a CTA's MACs per iteration from the tile constants. W1's tile
# holds 2 BLOCK_N columns (gate and linear); the rs tiles step NSUB 32-value blocks of K.
_MMA_TILES = {"_w1_kernel": 2, "_w2_kernel": 1, "_w1_rs_kernel": 2, "_w2_rs_kernel": 1}
ISSUE_PER_CYCLE = 4  # warp-instructions an SM issues a cycle (4 schedulers)
TENSOR_MACS_PER_CYCLE = {90: 2048}  # dense bf16 MACs an SM's tensor cores do a cycle (H100/H200: 989 TFLOP/s)


def _constants(config: str) -> dict[str, str]:
    """A config label's NAME=value pairs (kernels.aot.Config.label)."""
    return dict(kv.split("=", 1) for kv in config.split() if "=" in kv)


def macs_per_iteration(kernel: str, config: str) -> int | None:
    """MACs one CTA does in an iteration of an expert matmul's main loop, from its config label; None for
    other kernels."""
    if kernel not in _MMA_TILES:
        return None
    c = _constants(config)
    k = 32 * int(c["NSUB"]) if "NSUB" in c else int(c["BLOCK_K"])
    return int(c["BLOCK_M"]) * _MMA_TILES[kernel] * int(c["BLOCK_N"]) * k


def _warps(config: str) -> int | None:
    return next((int(t[1:]) for t in config.split() if re.fullmatch(r"w\d+", t)), None)


def per_kmac(lp: Loop) -> float | None:
    """Warp-instructions the loop issues per 1,000 MACs (its instructions a thread, times its warps)."""
    macs, warps = macs_per_iteration(lp.kernel, lp.config), _warps(lp.config)
    return None if not macs or warps is None else 1000 * lp.instructions * warps / macs


# The single-pair (decode) expert tiles stream weights without tensor cores: what bounds them is bytes in flight
# or the instructions a byte costs. A CTA's K step reads BLOCK_KB bytes of each of its rows (W1: 2 BLOCK_N rows).
_GEMV_TILES = {"_w1_gemv_kernel": 2, "_w2_gemv_kernel": 1}
# weight bytes an SM receives a cycle at copy bandwidth: the H200's ~4.3 TB/s (session 27's unembedding stream,
# BENCHMARKS.md "GPU, second round") over 132 SMs at 1.98 GHz
COPY_BYTES_PER_CYCLE = {90: 16.5}


def bytes_per_iteration(kernel: str, config: str) -> int | None:
    """Weight bytes one CTA reads in an iteration of a single-pair expert tile's K loop; None for others."""
    if kernel not in _GEMV_TILES:
        return None
    c = _constants(config)
    return _GEMV_TILES[kernel] * int(c["BLOCK_N"]) * int(c["BLOCK_KB"])


def per_byte(lp: Loop) -> float | None:
    """Warp-instructions the loop issues per weight byte."""
    n, warps = bytes_per_iteration(lp.kernel, lp.config), _warps(lp.config)
    return None if not n or warps is None else lp.instructions * warps / n


def loops(kernel: str | None = None, label: str | None = None, use: str | None = None, arch: int = 90) -> list[Loop]:
    import triton
    from triton.backends.compiler import GPUTarget

    from . import aot
    out = []
    for c in aot.plan(arch):
        if (kernel and c.kernel != kernel) or (label and label not in c.label) or (use and not any(
                use in u for u in c.uses)):
            continue
        k = triton.compile(c.src, target=GPUTarget("cuda", arch, 32), options=c.options.__dict__)
        ins = instructions(disassemble(k.asm["cubin"]))
        body = longest_loop(ins)
        out.append(Loop(c.kernel, c.label, aot._uses(c.uses), len(body), len(ins),
                        collections.Counter(opcode(t) for t in body)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", help="only this kernel (e.g. _w1_gemv_kernel)")
    p.add_argument("--label", help="only configs whose label contains this (e.g. BLOCK_N=16)")
    p.add_argument("--use", help="only configs a step label contains this (e.g. '120b gemv d1')")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--ops", action="store_true", help="the loop's opcode mix")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.sass: unset TRITON_INTERPRET (it compiles for the GPU)", file=sys.stderr)
        return 2
    found = loops(a.kernel, a.label, a.use, a.arch)
    if not found:
        print("kernels.sass: no planned configuration matches (see python -m kernels.aot)", file=sys.stderr)
        return 2
    for lp in found:
        line = f"{lp.kernel} [{lp.config}] ({lp.uses}): loop {lp.instructions} instructions, {lp.total} in all"
        k = per_kmac(lp)
        if k is not None:
            line += f"; {k:.2f} warp-instructions per 1K MACs"
            if a.arch in TENSOR_MACS_PER_CYCLE:  # issue cycles over the tensor cores' cycles for the same MACs
                line += f" ({k / ISSUE_PER_CYCLE * TENSOR_MACS_PER_CYCLE[a.arch] / 1000:.2f}x the tensor cores' time)"
        b = per_byte(lp)
        if b is not None:
            line += f"; {b:.3f} warp-instructions per weight byte"
            if a.arch in COPY_BYTES_PER_CYCLE:  # the share of the SMs' issue slots copy bandwidth would take
                share = b * COPY_BYTES_PER_CYCLE[a.arch] / ISSUE_PER_CYCLE
                line += f" ({share:.0%} of the issue rate at copy bandwidth)"
        print(line)
        if a.ops:
            print("    " + ", ".join(f"{op} {n}" for op, n in lp.ops.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
