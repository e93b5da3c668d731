"""Compile every Triton kernel for a GPU ahead of time, without one, and report its resources.

    python -m kernels.aot [--arch 90]

The interpreter tests accept code the real compiler rejects and say nothing
about register spills or shared memory. This compiles each kernel for the
target (Triton bundles ptxas) at every configuration its launcher picks for
gpt-oss-20b and -120b at decode batches 1, 8, 64, 256 and an 8192-token
prefill chunk (and 120b as one rank of 8 expert-parallel ones: replicated
attention, attention DP, attention DP in TP groups of 2), and checks: it compiles, ptxas spills nothing, the shared
memory fits one block on the target, and ptxas keeps its wgmma asynchronous (no C7515 "serialized"
report: each MMA then waits for the one before, found in every tensor-core MoE kernel under Triton 3.6
until kernels.moe_rs._settle).

The launches are not described here but recorded from the launchers themselves,
run on meta tensors (kernels._triton.recording), and bound by Triton's own
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

import torch

from . import _triton

MODELS = ("gpt-oss-20b", "gpt-oss-120b")
DECODE_BATCHES = (1, 8, 64, 256)
PREFILL_CHUNK = 8192
BLOCK_SIZE = 16  # engine.core's default KV block
DECODE_CONTEXT = 4096  # only the divisibility of derived arguments depends on it
# largest dynamic shared memory one block may opt into, by compute capability
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
MAX_REGS = 255
KV_CACHE_ARGS = ("k_ptr", "v_ptr", "ko_ptr", "vo_ptr")  # the attention and rotary kernels' KV pool pointers
LINEAR_SAMPLE = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
# and split-K, for the few-feature linears at batch 1 (the router, o-proj), where it is compiled too
LINEAR_SPLIT_SAMPLE = dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=4)
# a prefill chunk's widest MMA expert tiles (kernels._tune_cases.acc_cap): each weight tile's upcast serves 256 rows
MOE_PREFILL_SAMPLE = {"moe_w1": dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
                      "moe_w2": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)}


def _step_launches(cfg, n_seqs: int, q_len: int, context: int, ep: int = 1, attn_dp: bool = False,
                   tp: int = 1, kv_dtype=torch.bfloat16) -> list:
    """What one sliding + one full layer launch on CUDA: both norms, rotary, attention, MoE. With ep > 1, the
    MoE as one expert-parallel rank runs it (models.layers.MoE): a decode step (a CUDA graph) combines
    by all-reduce, so the rank runs all N tokens' top-k through its E/ep experts with an expert map;
    a prefill step's all-to-all brings it the rows routed to it (N*k/ep expected), one expert per
    row (top_k=1, MoE.run_experts). attn_dp: each attention group holds its own n_seqs, and a decode
    step's MoE gathers the EP group's tokens: each rank takes a 1/tp share of its group's rows, so it
    routes and runs ep x ceil(N / tp) rows. tp: the rank's attention heads are 1/tp of the model's.
    kv_dtype: the KV pools' (EngineConfig.kv_cache_dtype "fp8": torch.float8_e4m3fn)."""
    from . import attention, moe, rmsnorm, rope
    H, I, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    Hq, K, D = cfg.num_attention_heads // tp, max(1, cfg.num_key_value_heads // tp), cfg.head_dim
    N = n_seqs * q_len
    bf16, meta = torch.bfloat16, dict(device="meta")
    x = torch.empty(N, H, dtype=bf16, **meta)
    width = -(-context // BLOCK_SIZE)
    pool = n_seqs * width + 1
    cache = torch.empty(pool, BLOCK_SIZE, K, D, dtype=kv_dtype, **meta)
    # the engine builds these from Python ints: int64
    table = torch.empty(n_seqs, width, dtype=torch.long, **meta)
    qs, ctx = torch.empty(n_seqs + 1, dtype=torch.long, **meta), torch.empty(n_seqs, dtype=torch.long, **meta)
    with _triton.recording() as launches:
        norm_w = torch.empty(H, **meta)  # models.layers.RMSNorm keeps it in fp32
        rmsnorm.rmsnorm_triton(x, norm_w, cfg.rms_norm_eps)
        rmsnorm.rmsnorm_triton(x, norm_w, cfg.rms_norm_eps, residual=x)
        # q, k: views of the fused qkv projection's output (models.layers.QKVLinear); cos/sin in the model dtype
        qkv = torch.empty(N, (Hq + 2 * K) * D, dtype=bf16, **meta)
        qv, kv, _ = qkv.split([Hq * D, K * D, K * D], dim=-1)
        cos_sin = torch.empty(N, D // 2, dtype=bf16, **meta)
        vv = qkv[:, (Hq + K) * D:].view(-1, K, D)  # rotated into the cache with v (PagedMetadata.rope_into_cache)
        slots = torch.empty(N, dtype=torch.long, **meta)
        # a decode step rotates and writes the cache in the attention's launch (PagedMetadata.rotate_and_attend)
        rope_in = (kv.view(-1, K, D), vv, cos_sin, cos_sin, slots) if q_len == 1 else None
        if rope_in is None:
            rope.rope_into_cache_triton(qv.view(-1, Hq, D), kv.view(-1, K, D), vv, cos_sin, cos_sin, cache, cache,
                                        slots)
        rope.rope_triton(qv.view(-1, Hq, D), kv.view(-1, K, D), cos_sin, cos_sin)  # dense forwards (model.logits)
        q = qv.view(-1, Hq, D) if rope_in is not None else torch.empty(N, Hq, D, dtype=bf16, **meta)
        sinks = torch.empty(Hq, dtype=bf16, **meta)
        for window in (cfg.sliding_window, None):
            attention.paged_attention(q, cache, cache, table, qs, ctx, sinks, window, D ** -0.5,
                                      max_query_len=q_len, rope=rope_in)
        u8 = dict(dtype=torch.uint8, **meta)
        static_ep = ep > 1 and q_len == 1
        gathered = -(-N // tp) * ep if static_ep and attn_dp else N
        E, rows, top = (E, N, k) if ep == 1 else (E // ep, gathered, k) if static_ep else (E // ep, max(1, N * k // ep), 1)
        experts = (torch.empty(E, 2 * I, H // 32, 16, **u8), torch.empty(E, 2 * I, H // 32, **u8),
                   torch.empty(E, 2 * I, dtype=bf16, **meta), torch.empty(E, H, I // 32, 16, **u8),
                   torch.empty(E, H, I // 32, **u8), torch.empty(E, H, dtype=bf16, **meta))
        routing = (torch.empty(rows, top, dtype=torch.long, **meta), torch.empty(rows, top, dtype=bf16, **meta))
        from . import route  # every rank routes its own tokens over all experts
        route_logits = torch.empty(gathered, cfg.num_local_experts, dtype=bf16, **meta)
        load = torch.empty(cfg.num_local_experts, dtype=torch.long, **meta)
        gate = ep == 1 and q_len == 1 and N <= moe.GATE_MAX_ROWS  # Block.forward through MoE.forward_block
        if q_len == 1:  # a decode graph masks its padding rows, which route to no expert
            mask = torch.empty(gathered, dtype=torch.bool, **meta)
            if not gate:
                route.route_triton(route_logits, k, load, mask, drop_masked=True)
            if static_ep:  # under the all-reduce only rank 0 counts the load: the others route without
                route.route_triton(route_logits, k, None, mask, drop_masked=True)
        else:  # a prefill (and the warm-up's) has no padding rows: no mask
            route.route_triton(route_logits, k, load)
        # the expert map (MoE.local_or_skip: padding rows' id E -> none) but in an EP prefill's all-to-all
        g2l = torch.empty(cfg.num_local_experts + 1, dtype=torch.long, **meta) if ep == 1 or static_ep else None
        xm = torch.empty(rows, H, dtype=bf16, **meta)
        # one process adds the residual and applies the next norm in the combine (EP ranks: a fused
        # rmsnorm with residual after the exchange, launched above)
        if gate:  # the add, MLP norm, router, routing and align in one launch (kernels.moe_gate)
            router_w, router_b = torch.empty(E, H, dtype=bf16, **meta), torch.empty(E, dtype=bf16, **meta)
            moe.moe_block_mxfp4(xm, xm, (norm_w, cfg.rms_norm_eps), router_w, router_b, *experts, top_k=top,
                                global_to_local=g2l, load=load, token_mask=mask, drop_masked=True,
                                norm=(norm_w, cfg.rms_norm_eps))
        else:
            moe.moe_mxfp4(xm, routing, *experts, top_k=top, global_to_local=g2l,
                          **(dict(residual=xm, norm=(norm_w, cfg.rms_norm_eps)) if ep == 1 else {}))
    return launches


def workloads():
    """-> [(use label, launches)] for every model and step shape covered."""
    from models.checkpoint import PRESETS
    out = []
    for name in MODELS:
        short = name.removeprefix("gpt-oss-")
        for b in DECODE_BATCHES:
            out.append((f"{short} d{b}", _step_launches(PRESETS[name], b, 1, DECODE_CONTEXT)))
        out.append((f"{short} p{PREFILL_CHUNK}", _step_launches(PRESETS[name], 1, PREFILL_CHUNK, PREFILL_CHUNK)))
    for b in DECODE_BATCHES:  # 120b over 8 expert-parallel ranks (helm/gptoss/values-120b-ep8.yaml)
        out.append((f"120b ep8 d{b}", _step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT, ep=8)))
    out.append((f"120b ep8 p{PREFILL_CHUNK}", _step_launches(PRESETS["gpt-oss-120b"], 1, PREFILL_CHUNK,
                                                            PREFILL_CHUNK, ep=8)))
    for b in DECODE_BATCHES:  # ... with attention data parallelism (the preset's mode): b sequences per rank
        out.append((f"120b ep8 dp d{b}", _step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT, ep=8,
                                                        attn_dp=True)))
        # and in groups of 2 TP ranks: b sequences per group, each rank half the heads and half the rows
        out.append((f"120b tp2 ep8 dp d{b}", _step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT, ep=8,
                                                            attn_dp=True, tp=2)))
    for b in (1, 64, 0):  # an fp8 KV cache (EngineConfig.kv_cache_dtype): its stores and reads
        step = (_step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT, kv_dtype=torch.float8_e4m3fn) if b
                else _step_launches(PRESETS["gpt-oss-120b"], 1, PREFILL_CHUNK, PREFILL_CHUNK,
                                    kv_dtype=torch.float8_e4m3fn))
        out.append(("120b kv8 " + (f"d{b}" if b else f"p{PREFILL_CHUNK}"),
                    [ln for ln in step if ln[0].__name__ in ("_attn_kernel", "_rope_kernel")]))
    from . import moe_configs, moe_gemv, tuned
    # the single-pair expert tiles (kernels.moe_gemv) kernels.tune may pick for decode: at batch 1, and at 32
    # (120b's one pair per expert; past X16_IN_ALIGN rows the fp16 activations take a launch of their own)
    for name, b in (("gpt-oss-20b", 1), ("gpt-oss-120b", 1), ("gpt-oss-120b", 32)):
        with tuned.forced(moe_configs.gemv_configs()):
            step = _step_launches(PRESETS[name], b, 1, DECODE_CONTEXT)
        gemv_only = [ln for ln in step if ln[0].__name__ in ("_align_kernel", "_gate_kernel", *moe_gemv._KERNELS)]
        out.append((f"{name.removeprefix('gpt-oss-')} gemv d{b}", gemv_only))
    with tuned.forced({k: dict(c, L2PF=True) for k, c in moe_configs.gemv_configs().items()}):  # ... prefetching
        step = _step_launches(PRESETS["gpt-oss-120b"], 1, 1, DECODE_CONTEXT)
    out.append(("120b gemv l2pf d1", [ln for ln in step if ln[0].__name__ in ("_w1_gemv_kernel", "_w2_gemv_kernel")]))
    # the MMA tiles split over K (SPLIT_K) kernels.tune may pick for a decode step's few tiles: at batch 1
    # (W2's slabs summed by its combine tail) and 8 (by the combine launch)
    for b in (1, 8):
        with tuned.forced(moe_configs.split_configs()):
            step = _step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT)
        out.append((f"120b split d{b}", [ln for ln in step if ln[0].__name__ in (
            "_w1_kernel", "_w2_kernel", "_combine_kernel")]))
    # kernels.moe_rs's tiles (weights as the MMA's register operand) kernels.tune may pick for larger steps
    from . import moe_rs
    for name, b, bm in (("gpt-oss-20b", 64, 16), ("gpt-oss-120b", 64, 16), ("gpt-oss-120b", 256, 16),
                        ("gpt-oss-120b", 256, 32), ("gpt-oss-120b", 0, 64), ("gpt-oss-120b", 0, 128)):
        # b 0: a prefill chunk; BLOCK_M 128 as two warpgroups (its accumulators would not fit one)
        configs = moe_configs.rs_configs(block_m=bm)
        if bm > 64:
            configs = {k: dict(c, num_warps=8) for k, c in configs.items()}
        with tuned.forced(configs):
            step = (_step_launches(PRESETS[name], b, 1, DECODE_CONTEXT) if b else
                    _step_launches(PRESETS[name], 1, PREFILL_CHUNK, PREFILL_CHUNK))
        rs_only = [ln for ln in step if ln[0].__name__ in moe_rs._KERNELS]
        out.append((f"{name.removeprefix('gpt-oss-')} rs{bm} " + (f"d{b}" if b else f"p{PREFILL_CHUNK}"), rs_only))
    # the compute-sized MMA tiles kernels.tune tries for a prefill chunk (acc_cap: 128 accumulators a thread)
    with tuned.forced(MOE_PREFILL_SAMPLE):
        step = _step_launches(PRESETS["gpt-oss-120b"], 1, PREFILL_CHUNK, PREFILL_CHUNK)
    out.append((f"120b mma256 p{PREFILL_CHUNK}", [ln for ln in step if ln[0].__name__ in ("_w1_kernel", "_w2_kernel")]))
    # the MMA and rs tiles with their rows bulk-prefetched (L2PF: kernels.tune's phase 2 tries it)
    d64 = moe_configs.default_config(64 * 4, 128, False)
    for tag, configs in (("mma", {k: dict(d64, L2PF=True) for k in ("moe_w1", "moe_w2")}),
                         ("rs", {k: dict(c, L2PF=True) for k, c in moe_configs.rs_configs(block_m=16).items()})):
        with tuned.forced(configs):
            step = _step_launches(PRESETS["gpt-oss-120b"], 64, 1, DECODE_CONTEXT)
        out.append((f"120b {tag} l2pf d64", [ln for ln in step if ln[0].__name__ in (
            "_w1_kernel", "_w2_kernel", "_w1_rs_kernel", "_w2_rs_kernel")]))
    from . import _tune_cases as cases, linear as lin  # the decode linears, where kernels.tune wrote an entry
    for b in DECODE_BATCHES:
        if b > lin.MAX_ROWS:
            continue
        with _triton.recording() as launches:
            for name in MODELS:
                for which in cases.LINEARS:
                    N, K, bias = cases.linear_shape(PRESETS[name], which)
                    x, w = (torch.empty(*shape, dtype=torch.bfloat16, device="meta") for shape in ((b, K), (N, K)))
                    bb = torch.empty(N, dtype=torch.bfloat16, device="meta") if bias else None
                    # a representative tile where this GPU has no entry (the candidates' middle)
                    with tuned.forced({} if lin.config_for(x, w, bb) else {"linear": LINEAR_SAMPLE}):
                        lin.linear(x, w, bb)
                    if b == 1 and which in ("router", "o"):
                        with tuned.forced({"linear": LINEAR_SPLIT_SAMPLE}):
                            lin.linear(x, w, bb)
                    if b == 1 and which == "qkv":  # and its rows bulk-prefetched before the PDL wait
                        with tuned.forced({"linear": dict(LINEAR_SAMPLE, L2PF=True)}):
                            lin.linear(x, w, bb)
        out.append((f"linear d{b}", launches))
    from . import sample  # the sampler's temperature-only rows: fp32 logits over the vocabulary
    V = PRESETS["gpt-oss-120b"].vocab_size
    for b in DECODE_BATCHES:
        with _triton.recording() as launches:
            sample.sample_triton(torch.empty(b, V, device="meta"), torch.empty(b, device="meta"),
                                 torch.empty(b, dtype=torch.long, device="meta"))
        out.append((f"sample b{b}", launches))
    return out


def model_launches(preset: str, batches=DECODE_BATCHES, prefill: int = PREFILL_CHUNK, ep: int = 1,
                   attn_dp: bool = False, tp: int = 1) -> list:
    """-> [(use label, launches)] recorded from the model itself (not the launchers called by hand), on
    the meta device with GPTOSS_KERNELS=triton: a decode graph forward per batch and an eager prefill,
    at full size. What a GPU run of one process launches, to check `workloads()` against. ep > 1: the
    decode graphs of EP rank 1 of `ep` (its experts, collectives standing in as identities; not rank 0,
    which alone counts the expert load under the all-reduce: rank 0 launches what one process does); its
    prefill exchanges sizes on the host, which meta cannot, so it is left out. attn_dp: that rank
    under attention data parallelism (its own tokens; the MoE gathers the group's). tp > 1: rank 1 is
    TP rank 1 (half the heads, the second share of the group's rows), loaded as a worker loads it."""
    from engine.executor import CacheSpec, LocalExecutor, empty_step, null_step, pad_decode_step, run_step
    from models import load_model
    from models.checkpoint import RandomCheckpoint
    with _triton.environ(GPTOSS_KERNELS="triton", TRITON_INTERPRET="1"):  # meta counts as a GPU; nothing runs
        from parallel.comm import StandInComm
        from parallel.layout import resolve_layout, shard_spec
        from parallel.worker import expert_copies
        ckpt = RandomCheckpoint(preset, "mxfp4", device="meta")
        layout = resolve_layout(ckpt.config, tp, ep, attn_dp=attn_dp)
        me = layout[1 if len(layout) > 1 else 0]
        m = load_model(ckpt, torch.bfloat16, "meta", keep_mxfp4=True, shard=shard_spec(me),
                       comm=StandInComm.of(me) if len(layout) > 1 else None, expert_copies=expert_copies(layout))
        groups = tuple("sliding" if m.config.window(i) else "full" for i in range(m.config.num_hidden_layers))
        ex = LocalExecutor(m, CacheSpec(BLOCK_SIZE, {"full": 8192, "sliding": 2048}, groups), cuda_graphs=False)
        short = preset.removeprefix("gpt-oss-") + "".join(f" {n}{v}" for n, v in (("tp", tp), ("ep", ep)) if v > 1)
        short, uses = short + (" dp" if attn_dp else ""), []
        for b in batches:
            inputs, _ = ex._graph_inputs(pad_decode_step(empty_step(ex.spec.blocks), b, ex.graph_width, BLOCK_SIZE,
                                                         full_width=True), b)
            with _triton.recording() as launches:
                ex._graph_forward(inputs)
            uses.append((f"{short} d{b}", launches))
        if ep == 1 and tp == 1:
            with _triton.recording() as launches:
                run_step(m, ex.cache, ex.spec, null_step(prefill, ex.spec))  # a real prefill: no mask
            uses.append((f"{short} p{prefill}", launches))
        return uses


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
            if arch >= 90 and _triton.takes_pdl(fn) and "PDL" not in kw:  # as launched on Hopper (kernels.pdl)
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
                 pdl=_pdl_order(k.asm["cubin"]) if getattr(c.options, "launch_pdl", False) else None)


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


def check(arch: int = 90) -> list[Usage]:
    """Usage of every planned compilation, in plan order; in a fresh process if this one interprets."""
    if _compiler_usable():
        return [compile_config(c, arch) for c in plan(arch)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "kernels.aot", "--arch", str(arch), "--json"], env=env,
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if not r.stdout.strip():
        raise RuntimeError(f"kernels.aot subprocess failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return [Usage(**u) for u in json.loads(r.stdout.strip().splitlines()[-1])]


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
    a = p.parse_args(argv)
    rows = check(a.arch)
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
