"""What kernels.tune sweeps: inputs at a model's shapes, candidate configs, and the sm_90 compile check.

Inputs are built on any device: on "meta" they are the shapes alone, which is
how a compile worker records a candidate's launch (kernels._triton.recording)
and binds it exactly as the GPU run will (kernels.aot).
"""

import torch

PAGE = 16  # engine.core's default KV block
# tried on the phase-1 leaders (their base: the defaults' 3 and 2; linear's 3)
MOE_STAGES, ATTN_STAGES, LINEAR_STAGES = (2, 4), (1, 3), (4, 6)
GEMV_STEP_BYTES = (32, 64, 128, 256, 512, 1024)  # kernels.moe_gemv's BLOCK_KB: a row's weight bytes a K step
L2PF = ({"L2PF": True},)  # phase 2 of the MoE tiles and the linears: each program's weights bulk-prefetched to L2


def tail_extras(cfg) -> tuple[dict, ...]:
    """Phase 2 of W2 at one token, where the combine is W2's tail (kernels.moe_combine): its chunks a pass
    (TAIL_G), 2 up to the whole row. The default, a chunk a pass, is 6 dependent L2 rounds at 2,880 columns
    (3 of sums, 3 of norm reads) on the step's critical path; the whole row is one round, but took the tuned
    120b gemv W2 from 56 registers to 168 (kernels.aot): the measurement decides."""
    from .moe_combine import row_chunks
    return tuple({"TAIL_G": g} for g in (2, 4, 8, 16) if g <= row_chunks(cfg.hidden_size))


def _gen(device, seed: int):
    return None if torch.device(device).type == "meta" else torch.Generator(device).manual_seed(seed)


def _u8(shape, lo, hi, device, g):
    if g is None:
        return torch.empty(shape, dtype=torch.uint8, device=device)
    return torch.randint(lo, hi, shape, dtype=torch.uint8, device=device, generator=g)


def _randn(shape, dtype, device, g, std=1.0):
    if g is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return (torch.randn(shape, device=device, generator=g) * std).to(dtype)


def moe_weights(cfg, dtype, device, seed: int = 0) -> tuple:
    """(w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2): random bytes hit every E2M1 code;
    scales 2**-6..-3 keep outputs O(1)."""
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    g = _gen(device, seed)
    return (_u8((E, 2 * I, H // 32, 16), 0, 256, device, g), _u8((E, 2 * I, H // 32), 121, 125, device, g),
            _randn((E, 2 * I), dtype, device, g, 0.1), _u8((E, H, I // 32, 16), 0, 256, device, g),
            _u8((E, H, I // 32), 121, 125, device, g), _randn((E, H), dtype, device, g, 0.1))


def moe_tokens(cfg, n: int, dtype, device, seed: int = 1) -> tuple:
    """(x, (idx, weights)): each token's top-k experts drawn uniformly without repeats."""
    H, E, k = cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok
    g = _gen(device, seed)
    if g is None:
        return torch.empty(n, H, dtype=dtype, device=device), (
            torch.empty(n, k, dtype=torch.long, device=device), torch.empty(n, k, dtype=dtype, device=device))
    idx = torch.rand(n, E, device=device, generator=g).topk(k, dim=1).indices
    w = torch.softmax(torch.randn(n, k, device=device, generator=g), -1).to(dtype)
    return _randn((n, H), dtype, device, g), (idx, w)


def attn_inputs(cfg, n: int, decode: bool, window, context: int, dtype, device, seed: int = 2):
    """-> (paged_attention args, kwargs). decode: n sequences of one new token at `context`, as a decode
    step's model calls it (PagedMetadata.rotate_and_attend): q, k and v views of one qkv projection's rows,
    not yet rotated, the launch rotating them and writing the step's k and v into the cache (ROPE), so the
    tuner compiles and times what is served. Else one n-token prefill chunk from position 0 (its rotary is
    a launch of its own). Tables are shuffled blocks, as after churn."""
    Hq, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    B, ctx, N = (n, context, n) if decode else (1, n, n)
    width = -(-ctx // PAGE)
    pool = B * width + 1
    g = _gen(device, seed)
    kc, vc = (_randn((pool, PAGE, K, D), dtype, device, g) for _ in range(2))
    if g is None:
        table = torch.empty(B, width, dtype=torch.long, device=device)
        qs, ctxs = (torch.empty(m, dtype=torch.long, device=device) for m in (B + 1, B))
    else:
        table = (torch.randperm(pool - 1, device=device, generator=g) + 1).view(B, width)
        qs = torch.arange(B + 1, device=device) * (N // B)
        ctxs = torch.full((B,), ctx, dtype=torch.long, device=device)
    if decode:
        qkv = _randn((N, (Hq + 2 * K) * D), dtype, device, g)  # models.layers.QKVLinear's output
        q, kn, vn = (t.view(N, -1, D) for t in qkv.split([Hq * D, K * D, K * D], dim=-1))
        angle = _randn((N, D // 2), torch.float32, device, g, 100.0)
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        slots = torch.empty(N, dtype=torch.long, device=device)  # each sequence's newest position's slot
        if g is not None:
            slots = table[:, (ctx - 1) // PAGE] * PAGE + (ctx - 1) % PAGE
        rope = dict(rope=(kn, vn, cos, sin, slots))
    else:
        q, rope = _randn((N, Hq, D), dtype, device, g), {}
    sinks = _randn((Hq,), dtype, device, g)
    return (q, kc, vc, table, qs, ctxs, sinks, window, D ** -0.5), dict(max_query_len=1 if decode else N, **rope)


def _attn_call(family: str, cfg, n: int, window, context: int, dtype, device):
    """paged_attention and its reference: with `rope`, kernels.rope's reference writes the step's rows
    into copies of the caches first (the launch writes the same values into the caches themselves)."""
    from .attention import paged_attention, paged_attention_reference
    from .rope import rope_into_cache_reference
    args, kw = attn_inputs(cfg, n, family == "attn_decode", window, context, dtype, device)

    def reference():
        if "rope" not in kw:
            return paged_attention_reference(*args)
        q, kc, vc, *rest = args
        kc, vc = kc.clone(), vc.clone()
        q = rope_into_cache_reference(q, *kw["rope"][:4], kc, vc, kw["rope"][4])
        return paged_attention_reference(q, kc, vc, *rest)
    return paged_attention, args, kw, reference


def moe_block_ms(cfg, n: int) -> list[int]:
    """BLOCK_M worth trying: from half the default's up to the first tile that holds a busy expert's rows.

    Busy, not average: an expert's rows vary about their mean m (~Poisson under uniform routing, wider
    when skewed), so at a 512-sequence decode (120b: m = 16) about 4 experts in 10 get 17-30 rows, and at
    BLOCK_M 16 those take two tiles: each tile streams and upcasts the expert's weights again (the upcast
    bounds these kernels, BENCHMARKS.md "GPU"). So the sweep reaches the first tile of m + 2 sqrt(m) rows
    or more (512: 16 and 32; 1,024: up to 64) and the measurement decides."""
    from .moe_configs import default_config
    per_expert = n * cfg.num_experts_per_tok / cfg.num_local_experts
    d = default_config(n * cfg.num_experts_per_tok, cfg.num_local_experts, False)["BLOCK_M"]
    busy = per_expert + 2 * per_expert ** 0.5
    gemv = [1] if per_expert <= 1 else []  # about one pair per expert: single-pair tiles (kernels.moe_gemv)
    return gemv + [b for b in (16, 32, 64, 128, 256) if b == d or (d // 2 <= b and (b <= 16 or b // 2 < busy))]


def acc_cap(bm: int) -> int:
    """fp32 accumulators a thread may hold. Decode tiles (BLOCK_M < 64) stream weights: 64 leaves registers
    for the loads in flight. Prefill tiles are compute: the upcast of a weight tile is paid once per BLOCK_M
    rows, and Hopper's GEMMs run 128 a thread (a 64 x 256 wgmma tile a warpgroup); kernels.aot compiles
    such tiles for sm_90 without spills (120b W1 M256 N64 K64 w8, W2 M256 N128 K64 w8), and the compile
    check drops those that spill."""
    return 128 if bm >= 64 else 64


def moe_candidates(kernel: str, bm: int, rs: bool = False) -> list[dict]:
    """Phase 1 for moe_w1 / moe_w2 at one BLOCK_M, at the default's 3 stages.

    Small M is a weight stream: wider BLOCK_K (more bytes per row per load) and
    narrower BLOCK_N (more programs over the SMs) are the levers; large M is
    compute: wider N. Bounds: decoded weight values per thread (w1 decodes two
    tiles, gate and linear) 16..128, accumulators <= 64, so the set stays ~20
    and the register file is not hopeless (acc_cap: twice that for prefill tiles); the compile check decides
    the rest."""
    tiles = 2 if kernel == "moe_w1" else 1
    cap = acc_cap(bm)
    if rs:  # kernels.moe_rs: operand rows a program (W1: 2 per column) x scale blocks a K step; a warpgroup
        # (4 warps) takes 64-row MMAs, so rows >= 16 * warps; accumulators rows x BLOCK_M <= acc_cap a thread.
        # Even steps pair the blocks into K=64 MMAs; 6 divides gpt-oss's 90 blocks (fewer instructions a
        # byte, more registers), 2 any even count
        return [dict(RS=True, BLOCK_M=bm, BLOCK_N=rows // tiles, NSUB=ns, num_warps=w, num_stages=3)
                for rows in (64, 128, 256) for ns in (2, 6) for w in (4, 8)
                if rows >= 16 * w and rows * bm / (32 * w) <= cap]
    if bm == 1:  # kernels.moe_gemv: rows per program x bytes per K step; a thread takes 1-8 16-byte blocks
        # At batch 1 every program is resident at once, so the weight bytes in flight are pairs x rows x
        # BLOCK_KB whatever BLOCK_N and the warps: session 27's 128-byte steps held 2.9 MB (W1's 5,760 rows)
        # and 1.5 MB (W2's 2,880) and ran at 1.8 and 1.0 TB/s, ~1.5 us a step either way (Little's law);
        # an H200's ~4 TB/s wants ~6 MB in flight, so steps run to 1 KB (a 1,440-byte row in two)
        return [dict(GEMV=True, BLOCK_M=1, BLOCK_N=bn, BLOCK_KB=kb, num_warps=w, num_stages=2)
                for bn in (8, 16, 32, 64, 128) for kb in GEMV_STEP_BYTES for w in (2, 4, 8)
                if 16 <= tiles * bn * kb / (32 * w) <= 128]  # weight bytes a thread holds per K step
    # a decode step's few 16-row tiles leave SMs idle (0.85 waves at batch 1, BENCHMARKS.md "GPU"):
    # the same tiles split over K (SPLIT_K), a few shapes at 2 and 4 splits
    out = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3, SPLIT_K=s)
           for bn in (32, 64) for bk in (64, 128) for s in (2, 4)] if bm == 16 else []
    for bn in (16, 32, 64, 128, 256):
        if (bm >= 64 and bn < 32) or (bm < 64 and bn > 128):
            continue
        for bk in (64, 128, 256, 512):
            for w in (4, 8):
                per_thread, acc = tiles * bn * bk / (32 * w), tiles * bm * bn / (32 * w)
                if 16 <= per_thread <= 128 and acc <= cap:
                    out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=3))
    return out


DQ_MIN_BLOCK_M = 128  # the dequantized-weight tiles are tried from here: a step with ~128+ rows an expert


def dq_candidates(kernel: str, bm: int) -> list[dict]:
    """kernels.moe's MMA tiles over the bf16 scratch (kernels.moe_dq): the MMA sweep's tiles with K steps of
    64 or 128 (128 or 256 bytes of a bf16 row, a GEMM's usual step; wider ones mostly fail the shared-memory
    check at these BLOCK_M)."""
    return [dict(c, DQ=True) for c in moe_candidates(kernel, bm) if c["BLOCK_K"] <= 128]


def attn_candidates(decode: bool, cfg, n: int, window) -> list[dict]:
    """Phase 1 at the default's 2 stages. Decode: key block and warps x key-range splits, splits only
    while B*K*splits <= 2048 programs (~16 per SM; beyond, the merge costs more than it spreads) and
    at most 4 under a sliding window (~128 keys); a decode tile is one token x G heads, so BLOCK_M is
    the default's. At batch 1 a split's keys are a chain of dependent block loads (session 27: 8.7 us a
    layer at 8 splits, 64 programs on 132 SMs), so up to 32 (256 programs, 64 keys each at --context 2048;
    210 registers at 2 warps, kernels.aot). Prefill: 8 or 16 query tokens x G heads per tile."""
    K, G = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    if decode:
        bm = max(16, 1 << (G - 1).bit_length())
        splits = [s for s in (1, 2, 4, 8, 16, 32)
                  if s == 1 or (n * K * s <= 2048 and (window is None or s <= 4))]
        return [dict(BLOCK_M=bm, BLOCK_N=bn, NUM_SPLITS=s, num_warps=w, num_stages=2)
                for s in splits for bn in (32, 64, 128) for w in (2, 4)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, NUM_SPLITS=1, num_warps=w, num_stages=2)
            for bm in (8 * G, 16 * G) if bm >= 16 for bn in (32, 64, 128) for w in (4, 8)]


def dry_candidates(kernel: str, default: dict) -> list[dict]:
    """Two per kernel under the interpreter: the default and one other small tile."""
    alt = dict(BLOCK_N=8) if default.get("GEMV") else {"linear": dict(BLOCK_N=32),
        "moe_w1": dict(BLOCK_N=16), "moe_w2": dict(BLOCK_N=16),
        "attn_decode": dict(BLOCK_N=32, NUM_SPLITS=2), "attn_prefill": dict(BLOCK_M=32, BLOCK_N=32),
        "gate": dict(BLOCK_H=max(16, default.get("BLOCK_H", 32) // 2))}[kernel]
    return [dict(default), {**default, **alt}]


LINEARS = ("qkv", "o", "router", "unembed")  # a decode step's dense linears (one process: no TP shards)


def linear_shape(cfg, which: str) -> tuple[int, int, bool]:
    """-> (out features N, in features K, has bias) of one of LINEARS at a model's shapes."""
    H, D, Hq, K = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    return {"qkv": ((Hq + 2 * K) * D, H, True), "o": (H, Hq * D, True), "router": (cfg.num_local_experts, H, True),
            "unembed": (cfg.vocab_size, H, False)}[which]


def linear_candidates(n: int) -> list[dict]:
    """Phase 1 at 3 stages: output features per program x K per step; a stage's weight tile 4-64 KB. Then
    split-K (2-8 programs a tile, in one launch), for the linears with too few features to fill the SMs
    (the router's 128: 8 programs of 16); a split of K=2880 in 8 is 3 steps of 128, so 6 of 64. At one row
    also the GEMV tiles (kernels.linear): session 27's batch-1 trace had cuBLAS's qkv at ~2.9 TB/s and the
    o projection at ~2.5, against the unembedding's ~4.3 (the MMA tiles, 201,088 rows). 16-64 fp32
    products a thread (kernels.aot: 89 registers at 8 x 512 with 4 warps, 157 at 32 x 512 with 8, no
    spills), and a few split over K."""
    out = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=3)
           for bn in (16, 32, 64, 128) for bk in (64, 128, 256, 512) for w in (4, 8)
           if 4096 <= bn * bk * 2 <= 65536 and (w == 4 or bn * bk >= 8192)] + [
        dict(BLOCK_N=bn, BLOCK_K=64 if s == 8 else 128, SPLIT_K=s, num_warps=4, num_stages=3)
        for bn in (16, 32, 64) for s in (2, 4, 8)]
    if n == 1:
        out += [dict(GEMV=True, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=3)
                for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8)
                if 16 <= bn * bk / (32 * w) <= 64] + [
            dict(GEMV=True, BLOCK_N=bn, BLOCK_K=256, SPLIT_K=s, num_warps=4, num_stages=3)
            for bn in (8, 16) for s in (2, 4)]
    return out


def gate_candidates(cfg) -> list[dict]:
    """kernels.moe_gate: experts a program x features a pass x warps, <= 128 router weights a thread; the
    one-pass rows (BLOCK_H >= H) and session 27's layout (1,024-feature passes, ~32 programs a token)."""
    H, E = cfg.hidden_size, cfg.num_local_experts
    one = 1 << (H - 1).bit_length()
    out = [dict(EB=eb, BLOCK_H=bh, num_warps=w) for bh in sorted({1024, 2048, one}) for eb in (1, 2, 4, 8)
           for w in (4, 8) if eb <= max(1, E // 16) and eb * bh // (32 * w) <= 128]
    old = dict(EB=max(1, E // 32), BLOCK_H=1024, num_warps=4)
    return out if old in out else [old, *out]


def gate_inputs(cfg, n: int, dtype, device, seed: int = 4) -> tuple:
    """(o, residual, norm weight, router weight, router bias) of n decode rows, a model's shapes."""
    H, E = cfg.hidden_size, cfg.num_local_experts
    g = _gen(device, seed)
    o, r = _randn((n, H), dtype, device, g), _randn((n, H), dtype, device, g)
    nw = torch.rand(H, generator=g, device=device) + 0.5  # models.layers.RMSNorm keeps it in fp32
    return o, r, nw, _randn((E, H), dtype, device, g, H ** -0.5), _randn((E,), dtype, device, g, 0.1)


def _local_or_skip(E: int, device) -> torch.Tensor:
    """The map a one-process model's MoE passes (models.layers.MoE.local_or_skip): every expert here, then
    id E (a graph's padding rows) -> none."""
    return torch.cat([torch.arange(E, device=device), torch.full((1,), -1, device=device)])


def _gate_call(cfg, n: int, dtype, device):
    """The gate as a decode step's model calls it (MoE.forward_block -> moe_block_mxfp4): with the expert
    map, the load counter and the graph's row mask (its padding dropped), at the BLOCK_M and activations
    (x16) of the MoE plan this batch runs (kernels.tune forces the expert configs the launchers pick), so
    the tuner compiles and times the served specialization. Checked: its norm and logits against torch's,
    and its routing and alignment against route and align of its own logits (a tie a rounding apart may
    fall either way), a mismatch adding 1e6 to the reference's last value."""
    import torch.nn.functional as F

    from .moe_configs import step_plan
    from .moe_gate import X16_IN_ALIGN, align, gate_triton
    from .rmsnorm import rmsnorm_reference
    from .route import route_reference
    o, r, nw, rw, rb = gate_inputs(cfg, n, dtype, device)
    k, E, I = cfg.num_experts_per_tok, cfg.num_local_experts, cfg.intermediate_size
    g2l, load = _local_or_skip(E, device), torch.zeros(E, dtype=torch.long, device=device)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    last = {}

    def launcher():
        plan = step_plan(o, n, E, I, k, None)
        last["block_m"] = plan.block_m
        g = last["g"] = gate_triton(o, r, nw, 1e-5, rw, rb, k, E, plan.block_m, g2l, load, mask, True,
                                    x16=plan.gemv and n <= X16_IN_ALIGN)
        return torch.cat([g.h.flatten(), g.logits.flatten(), g.h.new_zeros(1)])

    def reference():
        h, _ = rmsnorm_reference(o, nw, 1e-5, r)
        g = last["g"]
        idx, w = route_reference(g.logits, k)
        bad = int((g.idx.long() != idx).sum())
        bad += int((g.aligned[0] != align(idx, g2l, E, last["block_m"])[0]).sum())
        bad += int(((g.weights - w.float().flatten()).abs() > 1e-2).sum())
        return torch.cat([h.flatten(), F.linear(h, rw, rb).flatten(), h.new_full((1,), 1e6 * bad)])
    return launcher, (), {}, reference


def _moe_served(*args, **kw) -> torch.Tensor:
    """moe_mxfp4's (sum, its norm) as one tensor, for the check."""
    from .moe import moe_mxfp4
    return torch.cat(moe_mxfp4(*args, **kw))


def _moe_call(cfg, n: int, dtype, device, weights):
    """moe_mxfp4 as one process's model calls it (models.layers.MoE): the residual added and the next
    RMSNorm taken in the combine, so W2's combine tail (kernels.moe_combine) is compiled and timed as
    served. Checked: the sum and its norm. The residual is small beside the MoE's O(1) output, so the
    relative check stays about as tight on the experts' sum as without it."""
    from .moe import moe_reference
    from .rmsnorm import rmsnorm_reference
    x, (idx, w) = moe_tokens(cfg, n, dtype, device)
    ws = weights if weights is not None else moe_weights(cfg, dtype, device)
    E, H = cfg.num_local_experts, cfg.hidden_size
    g2l = _local_or_skip(E, device)
    g = _gen(device, 5)
    res = _randn((n, H), dtype, device, g, 0.25)
    nw = torch.empty(H, device=device) if g is None else torch.rand(H, generator=g, device=device) + 0.5
    norm = (nw, cfg.rms_norm_eps)

    def reference():
        out = res + moe_reference(x, idx, w, *ws, global_to_local=g2l)
        return torch.cat([out, rmsnorm_reference(out, *norm)])
    return (_moe_served, (x, (idx, w), *ws), dict(top_k=cfg.num_experts_per_tok, global_to_local=g2l, residual=res,
                                                  norm=norm), reference)


def make_call(family: str, cfg, n: int, window, context: int, dtype, device, weights=None, linear: str | None = None):
    """-> (launcher, args, kwargs, reference): launcher(*args, **kwargs) is this family's launch at batch n
    (under whatever tuned.forced / capturing the caller set); reference() is the torch result."""
    if family == "linear":
        from .linear import linear as launcher, linear_reference
        N, K, bias = linear_shape(cfg, linear)
        g = _gen(device, 3)
        x, w = _randn((n, K), dtype, device, g), _randn((N, K), dtype, device, g, K ** -0.5)
        b = _randn((N,), dtype, device, g, 0.1) if bias else None
        return launcher, (x, w, b), {}, lambda: linear_reference(x, w, b)
    if family == "gate":
        return _gate_call(cfg, n, dtype, device)
    if family == "moe":
        return _moe_call(cfg, n, dtype, device, weights)
    return _attn_call(family, cfg, n, window, context, dtype, device)


def compile_job(job: dict) -> list[dict]:
    """In a compile worker (no TRITON_INTERPRET): record the candidate's launch on meta tensors, compile the
    kernels in job["check"] for sm_<arch> and return kernels.aot's Usage of each, as dicts."""
    import dataclasses

    from models.checkpoint import PRESETS

    from . import _triton, aot, tuned
    try:
        fn, args, kw, _ = make_call(job["family"], PRESETS[job["model"]], job["n"], job["window"], job["context"],
                                    getattr(torch, job["dtype"]), "meta", linear=job.get("linear"))
        with tuned.forced(job["forced"]), _triton.recording() as launches:
            fn(*args, **kw)
        mine = [ln for ln in launches if ln[0].__name__ in job["check"]]
        compiles = aot.bind([("tune x", mine)], job["arch"])
        return [dataclasses.asdict(aot.compile_config(c, job["arch"])) for c in compiles]
    except Exception as e:  # noqa: BLE001 - a candidate the launcher or binder rejects is skipped, not fatal
        return [dict(kernel=",".join(job["check"]), config=repr(job["forced"]), uses="",
                     error=f"{type(e).__name__}: {e}"[:300])]
