"""Static SASS of the kernels' main loops, compiled for a GPU without one: instructions per iteration.

    python -m kernels.sass [--kernel _w1_gemv_kernel] [--label BLOCK_N=16] [--use "120b gemv"] [--ops]

Where a kernel is bound by the instructions it issues per weight byte (the MoE's
decode-sized expert matmuls on an H200, BENCHMARKS.md "GPU"), the SASS of its
inner loop predicts its speed and can be read on a CPU machine: this compiles
each of kernels.aot's planned configurations (the launchers' own choices, tuned
files included) with Triton's bundled ptxas, disassembles the cubin with its
bundled cuobjdump, and reports the longest loop (the body of the longest
backward branch) with its instruction count and, with --ops, its opcode mix.
Divide by the weight bytes one iteration of a CTA covers to compare kernels.
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
        print(f"{lp.kernel} [{lp.config}] ({lp.uses}): loop {lp.instructions} instructions, {lp.total} in all")
        if a.ops:
            print("    " + ", ".join(f"{op} {n}" for op, n in lp.ops.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
