"""Compile every Triton kernel for a GPU ahead of time, without one, and report its resources.

    python -m kernels.aot [--arch 90]

The interpreter tests accept code the real compiler rejects and say nothing
about register spills or shared memory. This compiles each kernel for the
target (Triton bundles ptxas) at every configuration its launcher picks for
gpt-oss-20b and -120b at decode batches 1, 8, 64, 256 (and decode attention's split count at every
CUDA-graph bucket) and an 8192-token prefill chunk (and 120b as one rank of 8 expert-parallel ones: replicated
attention, attention DP, attention DP in TP groups of 2), and checks: it compiles, ptxas spills nothing, the shared
memory fits one block on the target, and ptxas keeps its wgmma asynchronous (no C7515 "serialized"
report: each MMA then waits for the one before, found in every tensor-core MoE kernel under Triton 3.6
until kernels.moe_rs._settle).

The launches (kernels.aot_workloads) are not described by hand but recorded from the launchers
themselves, run on meta tensors (kernels._triton.recording), and bound by Triton's own
launch binder, so constexprs, num_warps/num_stages, dtypes and argument
specialisation (alignment, divisibility by 16) are the ones a GPU run compiles,
measured configs included (kernels.tuned: this machine's GPU's file, or the one
GPTOSS_KERNEL_CONFIGS names).
`_pack_args` and `create_function_from_signature` are Triton internals with the same
signatures in 3.6 (the GPU image's) and 3.9; the options JITFunction.run adds
before binding differ, and `bind` feature-detects them.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from . import _triton
from .aot_workloads import workloads

# largest dynamic shared memory one block may opt into, by compute capability
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
MAX_REGS = 255
KV_CACHE_ARGS = ("k_ptr", "v_ptr", "ko_ptr", "vo_ptr")  # the attention and rotary kernels' KV pool pointers


@dataclass
class Config:
    """One distinct compilation: what triton.compile gets, and which step shapes launch it."""
    kernel: str
    src: object  # triton.compiler.ASTSource
    options: object  # the backend's options dataclass
    uses: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        names = self.src.fn.arg_names
        # floats (SwiGLU limit/alpha) are model constants, not tile choices
        cex = [f"{names[i[0]]}={v}" for i, v in self.src.constants.items() if not isinstance(v, float)]
        # integer arguments the launch could not specialise as multiples of 16 (a separate compilation),
        # leaving out those never specialised (kernels._triton.no_specialize)
        never = set(getattr(self.src.fn, "do_not_specialize", ()))
        odd = [f"{n}%16" for i, n in enumerate(names) if self.src.signature[n] in ("i32", "i64")
               and i not in never and n not in never
               and not any(a[0] == "tt.divisibility" for a in self.src.attrs.get((i,), []))]
        # an fp8 KV pool reaches the kernels as its bytes (models.attention.as_bytes): a compilation of its own
        kv8 = ["KV=fp8"] if any(self.src.signature.get(n) == "*u8" for n in KV_CACHE_ARGS) else []
        return " ".join(cex + odd + kv8 + [f"w{self.options.num_warps}", f"s{self.options.num_stages}"])


@dataclass(frozen=True)
class Usage:
    kernel: str
    config: str
    uses: str
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    num_warps: int = 0
    num_stages: int = 0
    error: str | None = None
    serialized: str | None = None  # ptxas C7515: why it serialized the kernel's wgmma (each waited for in turn)
    pdl: str | None = None  # a PDL launch's SASS touching global memory before its griddepcontrol.wait (or none)
    tf32: bool = False  # an fp32 tl.dot left at the GPU's default tf32 (10-bit mantissas; the interpreter's is fp32)

    def problems(self, arch: int) -> list[str]:
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded")
        if self.smem > SMEM_LIMIT[arch]:
            out.append(f"shared memory {self.smem} B > {SMEM_LIMIT[arch]} B")
        if self.regs > MAX_REGS:
            out.append(f"{self.regs} registers > {MAX_REGS}")
        if self.serialized:
            out.append(f"wgmma serialized: {self.serialized}")
        if self.pdl:
            out.append(f"PDL: {self.pdl}")
        if self.tf32:
            out.append("tf32 dot (input_precision='ieee' keeps fp32)")
        return out


def _compiled_copies(module) -> dict:
    """Compiler-jitted copies of the module's kernels and helpers, in a globals dict of their own.

    Not the module's own: under TRITON_INTERPRET those are interpreted
    functions, and kernels resolve helpers through their globals."""
    from triton.runtime.jit import JITFunction
    g = dict(vars(module))
    for n in module._KERNELS:
        f = getattr(g[n], "fn", g[n])
        c = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
        c.__annotations__, c.__kwdefaults__, c.__qualname__ = f.__annotations__, f.__kwdefaults__, f.__qualname__
        c.__module__, c.__doc__ = f.__module__, f.__doc__
        g[n] = c
    for n in module._KERNELS:
        g[n] = JITFunction(g[n], do_not_specialize=_triton.no_specialize(g, n))
    return g


def plan(arch: int = 90) -> list[Config]:
    """Distinct compilations over all workloads, in first-use order."""
    return bind(workloads(), arch)


def bind(uses: list, arch: int = 90) -> list[Config]:
    """[(use label, recorded launches)] -> their distinct compilations, in first-use order."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    # the options JITFunction.run adds before binding
    run_opts = dict(debug=knobs.runtime.debug, instrumentation_mode=knobs.compilation.instrumentation_mode)
    # Triton 3.9 added the FP sanitizer's option (and its knob); 3.6 has neither
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        run_opts["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    copies, configs = {}, {}
    for use, launches in uses:
        for fn, args, kwargs in launches:
            mod = sys.modules[fn.__module__]
            if mod not in copies:
                copies[mod] = _compiled_copies(mod)
            jf = copies[mod][fn.__name__]
            kw = dict(kwargs, **run_opts)
            # as launched with GPTOSS_PDL=1 (kernels.pdl; off by default): the stricter build, whose wait is checked
            if arch >= 90 and _triton.takes_pdl(fn) and "PDL" not in kw:
                kw.update(PDL=True, launch_pdl=True)
            bound, spec, opts = create_function_from_signature(jf.signature, jf.params, backend)(*args, **kw)
            options, sig, cex, attrs = jf._pack_args(backend, kw, bound, spec, opts)
            key = (fn.__name__, repr(sig), repr(cex), repr(attrs), repr(options))
            if key not in configs:
                configs[key] = Config(fn.__name__, ASTSource(jf, sig, cex, attrs), options)
            if use not in configs[key].uses:
                configs[key].uses.append(use)
    return list(configs.values())


def _ptxas_log(backend, ptx: str, options, arch: int) -> str:
    """ptxas -v's report, from Triton's own ptxas step (same flags), which the compile cache may have skipped."""
    from triton import knobs
    buf = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(buf):
        knobs.nvidia.dump_ptxas_log = True
        backend.make_cubin(ptx, {}, options, arch)
    return buf.getvalue()


def _num(pattern: str, text: str) -> int:
    return sum(int(m) for m in re.findall(pattern, text))


def compile_config(c: Config, arch: int = 90) -> Usage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    target = GPUTarget("cuda", arch, 32)
    base = dict(kernel=c.kernel, config=c.label, uses=_uses(c.uses))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # ptxas failures print the PTX; keep stdout for --json
            k = triton.compile(c.src, target=target, options=c.options.__dict__)
        log = _ptxas_log(make_backend(target), k.asm["ptx"], c.options, arch)
    except Exception as e:  # noqa: BLE001 - any compiler failure is the finding
        msg = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [""]
        where = f"{msg[0]} ... " if len(msg) > 1 else ""  # a CompilationError's first line is where, its last what
        return Usage(**base, error=f"{type(e).__name__}: {where}{msg[-1]}"[:500])
    return Usage(**base, regs=_num(r"Used (\d+) registers", log), spill_stores=_num(r"(\d+) bytes spill stores", log),
                 spill_loads=_num(r"(\d+) bytes spill loads", log), smem=k.metadata.shared,
                 num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages, serialized=_serialized(log),
                 pdl=_pdl_order(k.asm["cubin"]) if getattr(c.options, "launch_pdl", False) else None,
                 tf32=".tf32" in k.asm["ptx"])


# SASS opcodes that reach global memory; shared memory is the CTA's own, no hazard with another grid, and
# UBLKPF (cp.async.bulk.prefetch.L2: kernels.pdl.l2_prefetch of weights) brings nothing back
_GLOBAL_OPS = {"LDG", "STG", "LD", "ST", "ATOM", "ATOMG", "RED", "REDG", "LDGSTS", "UTMALDG", "UTMASTG", "UBLKCP",
               "UTMAPF", "CCTL"}


def _pdl_order(cubin: bytes) -> str | None:
    """A kernel launched with PDL starts while the previous one runs: nothing may reach global memory
    before its griddepcontrol.wait (SASS ACQBULK; kernels.pdl). -> what breaks that, or None."""
    from . import sass
    return pdl_order([sass.opcode(t) for _, t in sass.instructions(sass.disassemble(cubin))])


def pdl_order(ops: list[str]) -> str | None:
    """_pdl_order on a kernel's SASS opcodes, in program order."""
    if "ACQBULK" not in ops:
        return "no griddepcontrol.wait (ACQBULK) in its SASS"
    early = [o for o in ops[:ops.index("ACQBULK")] if o in _GLOBAL_OPS]
    return f"{', '.join(early)} before griddepcontrol.wait" if early else None


def _serialized(log: str) -> str | None:
    """ptxas's reason for serializing wgmma (C7515, "Potential Performance Loss"), if it did."""
    m = re.search(r"wgmma\.mma_async instructions are serialized due to (.*?)(?: in the function|$)", log, re.M)
    return m.group(1) if m else None


def _uses(uses: list[str]) -> str:
    """["20b d1", "20b d8", "120b d1", "120b d8"] -> "20b,120b: d1 d8"."""
    by_model: dict[str, list[str]] = {}
    for u in uses:
        m, step = u.split(" ", 1)
        by_model.setdefault(m, []).append(step)
    groups: dict[tuple, list[str]] = {}
    for m, steps in by_model.items():
        groups.setdefault(tuple(steps), []).append(m)
    return "; ".join(f"{','.join(ms)}: {' '.join(steps)}" for steps, ms in groups.items())


def _compiler_usable() -> bool:
    # triton.language's own jitted helpers (tl.sum, tl.sigmoid, ...) are interpreted for good
    # when triton was first imported under TRITON_INTERPRET=1, as the test suite does
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    return isinstance(tl.sum, JITFunction)


def check(arch: int = 90, shard: tuple[int, int] = (0, 1)) -> list[Usage]:
    """Usage of every planned compilation (of shard (k, n): every n-th from the k-th), in plan order.
    The whole plan compiles in fresh processes, one per core (up to 4) each compiling a shard, since
    ptxas and Triton's frontend are single-threaded and the compilations independent; a shard (or a
    single core) compiles here, unless this process interprets Triton (TRITON_INTERPRET=1)."""
    k, n = shard
    jobs = max(1, min(os.cpu_count() or 1, 4))
    if n > 1 or (jobs == 1 and _compiler_usable()):  # main() refuses a shard in an interpreting process
        return [compile_config(c, arch) for c in plan(arch)[k::n]]
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-m", "kernels.aot", "--arch", str(arch), "--json",
                               "--shard", f"{j}/{jobs}"], env=env, cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for j in range(jobs)]
    shards = []
    for proc in procs:
        out, err = proc.communicate()
        if not out.strip():
            raise RuntimeError(f"kernels.aot subprocess failed ({proc.returncode}):\n{err[-4000:]}")
        shards.append([Usage(**u) for u in json.loads(out.strip().splitlines()[-1])])
    rows: list = [None] * sum(map(len, shards))
    for j, part in enumerate(shards):
        rows[j::jobs] = part
    return rows


def table(rows: list[Usage], arch: int = 90) -> str:
    head = ("kernel", "config", "used by", "regs", "spill st/ld B", "smem B", "status")
    body = [(u.kernel, u.config, u.uses, str(u.regs), f"{u.spill_stores}/{u.spill_loads}", str(u.smem),
             "; ".join(u.problems(arch)) or "ok") for u in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT),
                   help="compute capability (90 = H100/H200)")
    p.add_argument("--json", action="store_true", help="print the usages as JSON instead of a table")
    p.add_argument("--shard", default="0/1", metavar="K/N", help="compile only every N-th from the K-th")
    a = p.parse_args(argv)
    try:
        k, n = map(int, a.shard.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        p.error(f"--shard: expected K/N with 0 <= K < N, got {a.shard!r}")
    if n > 1 and not _compiler_usable():
        p.error("--shard: a shard compiles in this process, which interprets Triton: unset TRITON_INTERPRET")
    rows = check(a.arch, (k, n))
    bad = [u for u in rows if u.problems(a.arch)]
    if a.json:
        print(json.dumps([dataclasses.asdict(u) for u in rows]))
        return 1 if bad else 0
    print(table(rows, a.arch))
    print(f"\nsm_{a.arch}: {len(rows)} compilations, {len(bad)} with problems "
          f"(shared memory limit {SMEM_LIMIT[a.arch]} B, {MAX_REGS} registers)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
