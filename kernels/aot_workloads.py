"""What kernels.aot compiles: the launches each step shape makes, recorded from the launchers
(`workloads`: one sliding and one full layer per model, decode batch, prefill chunk, expert-parallel
rank, fp8 cache, forced tile paths, linears, sampler) or from the whole model on the meta device
(`model_launches`, which tests check `workloads` against)."""

import torch

from . import _triton

MODELS = ("gpt-oss-20b", "gpt-oss-120b")
DECODE_BATCHES = (1, 8, 64, 256)
PREFILL_CHUNK = 8192
BLOCK_SIZE = 16  # engine.core's default KV block
DECODE_CONTEXT = 4096  # only the divisibility of derived arguments depends on it
LINEAR_SAMPLE = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
# and split-K, for the few-feature linears at batch 1 (the router, o-proj), where it is compiled too
LINEAR_SPLIT_SAMPLE = dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=4)
# a prefill chunk's widest MMA expert tiles (kernels._tune_cases.acc_cap): each weight tile's upcast serves 256 rows
MOE_PREFILL_SAMPLE = {"moe_w1": dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
                      "moe_w2": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)}


def step_launches(cfg, n_seqs: int, q_len: int, context: int, ep: int = 1, attn_dp: bool = False,
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
        E, rows, top = ((E, N, k) if ep == 1 else (E // ep, gathered, k) if static_ep
                        else (E // ep, max(1, N * k // ep), 1))
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
            out.append((f"{short} d{b}", step_launches(PRESETS[name], b, 1, DECODE_CONTEXT)))
        out.append((f"{short} p{PREFILL_CHUNK}", step_launches(PRESETS[name], 1, PREFILL_CHUNK, PREFILL_CHUNK)))
    # decode attention splits its keys by batch (kernels.attention._default_config, or the tuned file's nearest
    # bucket): the CUDA-graph buckets whose split count the batches above do not reach (16: 2 splits)
    from .cuda_graphs import DEFAULT_BUCKETS
    def attn(step):
        return [ln for ln in step if ln[0].__name__ == "_attn_kernel"]
    for name in MODELS:
        short = name.removeprefix("gpt-oss-")
        seen = {ln[2]["NUM_SPLITS"] for use, step in out if use.startswith(f"{short} d") for ln in attn(step)}
        for b in (b for b in DEFAULT_BUCKETS if b not in DECODE_BATCHES):
            launches = attn(step_launches(PRESETS[name], b, 1, DECODE_CONTEXT))
            if not {ln[2]["NUM_SPLITS"] for ln in launches} <= seen:
                out.append((f"{short} attn d{b}", launches))
                seen |= {ln[2]["NUM_SPLITS"] for ln in launches}
    for b in DECODE_BATCHES:  # 120b over 8 expert-parallel ranks (helm/gptoss/values-120b-ep8.yaml)
        out.append((f"120b ep8 d{b}", step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT, ep=8)))
    out.append((f"120b ep8 p{PREFILL_CHUNK}", step_launches(PRESETS["gpt-oss-120b"], 1, PREFILL_CHUNK,
                                                            PREFILL_CHUNK, ep=8)))
    for b in DECODE_BATCHES:  # ... with attention data parallelism (the preset's mode): b sequences per rank
        out.append((f"120b ep8 dp d{b}", step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT, ep=8,
                                                        attn_dp=True)))
        # and in groups of 2 TP ranks: b sequences per group, each rank half the heads and half the rows
        out.append((f"120b tp2 ep8 dp d{b}", step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT, ep=8,
                                                            attn_dp=True, tp=2)))
    for b in (1, 64, 0):  # an fp8 KV cache (EngineConfig.kv_cache_dtype): its stores and reads
        step = (step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT, kv_dtype=torch.float8_e4m3fn) if b
                else step_launches(PRESETS["gpt-oss-120b"], 1, PREFILL_CHUNK, PREFILL_CHUNK,
                                    kv_dtype=torch.float8_e4m3fn))
        out.append(("120b kv8 " + (f"d{b}" if b else f"p{PREFILL_CHUNK}"),
                    [ln for ln in step if ln[0].__name__ in ("_attn_kernel", "_rope_kernel")]))
    from . import moe_configs, moe_gemv, tuned
    # the single-pair expert tiles (kernels.moe_gemv) kernels.tune may pick for decode: at batch 1, and at 32
    # (120b's one pair per expert; past X16_IN_ALIGN rows the fp16 activations take a launch of their own)
    for name, b in (("gpt-oss-20b", 1), ("gpt-oss-120b", 1), ("gpt-oss-120b", 32)):
        with tuned.forced(moe_configs.gemv_configs()):
            step = step_launches(PRESETS[name], b, 1, DECODE_CONTEXT)
        gemv_only = [ln for ln in step if ln[0].__name__ in ("_align_kernel", "_gate_kernel", *moe_gemv._KERNELS)]
        out.append((f"{name.removeprefix('gpt-oss-')} gemv d{b}", gemv_only))
    with tuned.forced({k: dict(c, L2PF=True) for k, c in moe_configs.gemv_configs().items()}):  # ... prefetching
        step = step_launches(PRESETS["gpt-oss-120b"], 1, 1, DECODE_CONTEXT)
    out.append(("120b gemv l2pf d1", [ln for ln in step if ln[0].__name__ in ("_w1_gemv_kernel", "_w2_gemv_kernel")]))
    # the MMA tiles split over K (SPLIT_K) kernels.tune may pick for a decode step's few tiles: at batch 1
    # (W2's slabs summed by its combine tail) and 8 (by the combine launch)
    for b in (1, 8):
        with tuned.forced(moe_configs.split_configs()):
            step = step_launches(PRESETS["gpt-oss-120b"], b, 1, DECODE_CONTEXT)
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
            step = (step_launches(PRESETS[name], b, 1, DECODE_CONTEXT) if b else
                    step_launches(PRESETS[name], 1, PREFILL_CHUNK, PREFILL_CHUNK))
        rs_only = [ln for ln in step if ln[0].__name__ in moe_rs._KERNELS]
        out.append((f"{name.removeprefix('gpt-oss-')} rs{bm} " + (f"d{b}" if b else f"p{PREFILL_CHUNK}"), rs_only))
    # the compute-sized MMA tiles kernels.tune tries for a prefill chunk (acc_cap: 128 accumulators a thread)
    with tuned.forced(MOE_PREFILL_SAMPLE):
        step = step_launches(PRESETS["gpt-oss-120b"], 1, PREFILL_CHUNK, PREFILL_CHUNK)
    out.append((f"120b mma256 p{PREFILL_CHUNK}", [ln for ln in step if ln[0].__name__ in ("_w1_kernel", "_w2_kernel")]))
    # ... and the MMA tiles over weights decoded once a step (kernels.moe_dq), with the decode
    with tuned.forced(moe_configs.dq_configs()):
        step = step_launches(PRESETS["gpt-oss-120b"], 1, PREFILL_CHUNK, PREFILL_CHUNK)
    out.append((f"120b dq p{PREFILL_CHUNK}", [ln for ln in step if ln[0].__name__ in (
        "_dequant_kernel", "_w1_kernel", "_w2_kernel")]))
    # the MMA and rs tiles with their rows bulk-prefetched (L2PF: kernels.tune's phase 2 tries it)
    d64 = moe_configs.default_config(64 * 4, 128, False)
    for tag, configs in (("mma", {k: dict(d64, L2PF=True) for k in ("moe_w1", "moe_w2")}),
                         ("rs", {k: dict(c, L2PF=True) for k, c in moe_configs.rs_configs(block_m=16).items()})):
        with tuned.forced(configs):
            step = step_launches(PRESETS["gpt-oss-120b"], 64, 1, DECODE_CONTEXT)
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
