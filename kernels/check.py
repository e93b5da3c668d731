"""Each Triton kernel against its torch reference at the real gpt-oss shapes, on the GPU.

    python -m kernels.check [--models gpt-oss-120b,gpt-oss-20b] [--tokens 1,8,64,256,2048]
    python -m kernels.check --dry-run     # tiny shapes on CPU under TRITON_INTERPRET=1, bf16 (what CI runs)

The kernel tests (tests/kernels) run under the interpreter on tiny shapes;
this runs the compiled kernels at the shapes the models use (2880 hidden,
128 or 32 experts, 64 query / 8 KV heads (attention, rotary), contexts past the 128-token window
and past many blocks). Inputs are bf16, as on the GPU. Each output is compared
with the reference computed in fp32 from the same inputs; the kernel passes
when its error is at most twice the bf16 reference's own error plus 1e-3 (of
the fp32 output's largest magnitude). The dry run's inputs are bf16 too: the
interpreter rounds to bf16 and multiplies bf16 as a GPU does (kernels._interp).
Exits 1 if any case fails. A case that raises fails alone;
on a GPU a device fault (an illegal address: the CUDA context is lost) fails its case and a fresh
process checks the rest (kernels.faults).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from models.attention import NULL_BLOCK, to_cache
from models.checkpoint import PRESETS

from . import faults
from ._cli import counts, presets


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def verdict(kernel_out, ref32, ref16) -> tuple[float, float, bool]:
    ek, e16 = rel_err(kernel_out, ref32), rel_err(ref16, ref32)
    return ek, e16, bool(math.isfinite(ek) and ek <= 2 * e16 + 1e-3)


def _experts(cfg, E: int, dev, gen):
    """Random MXFP4 experts at cfg's shapes -> (w1 blocks, w1 scales, b1, w2 blocks, w2 scales, b2), fp32 biases."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    s0 = 127 + round(math.log2(1 / (math.sqrt(H) * math.sqrt(68.5 / 8))))  # weights ~ 1/sqrt(fan-in)

    def mx(o, i):
        return (torch.randint(0, 256, (E, o, i // 32, 16), dtype=torch.uint8, device=dev, generator=gen),
                torch.randint(s0 - 1, s0 + 2, (E, o, i // 32), dtype=torch.uint8, device=dev, generator=gen))

    (w1b, w1s), (w2b, w2s) = mx(2 * I, H), mx(H, I)
    return (w1b, w1s, torch.randn(E, 2 * I, device=dev, generator=gen) * 0.05, w2b, w2s,
            torch.randn(E, H, device=dev, generator=gen) * 0.05)


def moe_case(cfg, n: int, dev, dtype, gen, ep: int = 1, gemv: bool = False, rs: bool = False, split: bool = False,
             dq: bool = False):
    """ep > 1: the rows form one expert-parallel rank runs (MoE.run_experts): its E/ep experts,
    n rows each routed to one of them with weight 1. split: the MMA tiles split over K (3 ways in the dry
    run's 2 K steps, one split empty; 4 on the GPU), whose last-split handoff only a GPU exercises.
    dq: the MMA tiles over weights decoded once (kernels.moe_dq), at their prefill-sized default tiles."""
    from . import moe
    E, H, k = cfg.num_local_experts // ep, cfg.hidden_size, cfg.num_experts_per_tok
    w1b, w1s, b1, w2b, w2s, b2 = _experts(cfg, E, dev, gen)
    x = torch.randn(n, H, device=dev, generator=gen)
    if ep == 1:
        idx, w = moe.route(torch.randn(n, E, device=dev, generator=gen), k, torch.float32)
    else:
        k = 1
        idx = torch.randint(0, E, (n, 1), device=dev, generator=gen)
        w = torch.ones(n, 1, device=dev)
    ref32 = moe.moe_reference(x, idx, w, w1b, w1s, b1, w2b, w2s, b2)
    xb, b1b, b2b, wb = x.to(dtype), b1.to(dtype), b2.to(dtype), w.to(dtype)
    ref16 = moe.moe_reference(xb, idx, wb, w1b, w1s, b1b, w2b, w2s, b2b)
    from . import moe_configs, tuned
    cpu = torch.device(dev).type == "cpu"
    forced = (moe_configs.gemv_configs(cpu) if gemv else moe_configs.rs_configs(cpu) if rs else
              moe_configs.split_configs(cpu, 3 if cpu else 4) if split else
              moe_configs.dq_configs(cpu, 16 if cpu else 128) if dq else {})
    with tuned.forced(forced):
        out = moe.moe_mxfp4(xb, (idx, wb), w1b, w1s, b1b, w2b, w2s, b2b, top_k=k)
    e, b, ok = verdict(out, ref32, ref16)
    if rs or split or dq:
        return e, b, ok
    if ep == 1:  # one process adds the residual in the combine (the unfused add's rounding), and the
        # next RMSNorm of that sum (what the model launches); the gemv tiles at one token also with W2's
        # combine tail holding the row (TAIL_G, clamped to the whole row), a handoff only a GPU runs for real
        from .rmsnorm import rmsnorm_reference
        # the gemv cases' own generator: the cases after them draw what they drew before these checks
        g = torch.Generator(device=dev).manual_seed(n) if gemv else gen
        r = torch.randn(n, cfg.hidden_size, device=dev, generator=g).to(dtype)
        nw = 1 + 0.05 * torch.randn(cfg.hidden_size, device=dev, generator=g)
        for tail_g in (1, 64) if gemv and n == 1 else (1,):
            with tuned.forced({**forced, "moe_w2": dict(forced["moe_w2"], TAIL_G=tail_g)} if gemv else forced):
                fused, normed = moe.moe_mxfp4(xb, (idx, wb), w1b, w1s, b1b, w2b, w2s, b2b, top_k=k, residual=r,
                                              norm=(nw, cfg.rms_norm_eps))
            ok = ok and bool(((fused.float() - (r + out).float()).abs()
                              <= (r + out).float().abs() * 2 ** -7 + 1e-6).all())
            ok = ok and rel_err(normed, rmsnorm_reference(fused.float(), nw, cfg.rms_norm_eps)) <= 2 ** -7
    return e, b, ok


def attention_case(cfg, seqs: list[tuple[int, int]], window, dev, dtype, gen, bs: int = 16, rope: bool = False,
                   kv8: bool = False):
    """seqs: (context length after the step, new tokens) per sequence; tables over shuffled blocks,
    blocks the window no longer sees set to NULL_BLOCK as the engine's BlockManager leaves them.
    rope (a decode step): q, and the new key and value, come unrotated; the launch rotates them and writes
    the cache (PagedMetadata.rotate_and_attend), against kernels.rope's reference and then attention's.
    kv8: an fp8 cache (EngineConfig.kv_cache_dtype "fp8"); both references read (and write) the same e4m3
    values, so the comparison is of the kernel's arithmetic, not of the cache's rounding."""
    from . import attention
    Hq, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    nblocks = 1 + sum(-(-c // bs) for c, _ in seqs)
    kc = torch.randn(nblocks, bs, K, D, device=dev, generator=gen)
    vc = torch.randn(nblocks, bs, K, D, device=dev, generator=gen)
    kc[NULL_BLOCK] = 0
    vc[NULL_BLOCK] = 0
    cache_dt = torch.float8_e4m3fn if kv8 else None
    if kv8:  # fp32 copies of e4m3 values: exact
        kc, vc = (to_cache(c, cache_dt).float() for c in (kc, vc))
    perm = (torch.randperm(nblocks - 1, device=dev, generator=gen) + 1).tolist()
    tables, used = [], 0
    for ctx, ql in seqs:
        t = perm[used:used + -(-ctx // bs)]
        used += len(t)
        if window is not None:
            t = [NULL_BLOCK if (j + 1) * bs <= ctx - ql - window + 1 else b for j, b in enumerate(t)]
        tables.append(t)
    width = max(map(len, tables))
    bt = torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in tables], device=dev)
    qs = torch.tensor([0] + torch.tensor([q for _, q in seqs]).cumsum(0).tolist(), device=dev)
    ctx = torch.tensor([c for c, _ in seqs], device=dev)
    q = torch.randn(int(qs[-1]), Hq, D, device=dev, generator=gen)
    sinks = torch.randn(Hq, device=dev, generator=gen)
    args = (bt, qs, ctx)
    if rope:
        return _rotary_attention_case(cfg, q, kc, vc, args, sinks, window, dev, dtype, gen, bs, cache_dt)
    ref32 = attention.paged_attention_reference(q, kc, vc, *args, sinks, window, D ** -0.5)
    qb, kb, vb, sb = q.to(dtype), kc.to(cache_dt or dtype), vc.to(cache_dt or dtype), sinks.to(dtype)
    ref16 = attention.paged_attention_reference(qb, kb, vb, *args, sb, window, D ** -0.5)
    out = attention.paged_attention(qb, kb, vb, *args, sb, window, D ** -0.5,
                                    max_query_len=max(q for _, q in seqs))
    return verdict(out, ref32, ref16)


def _rotary_attention_case(cfg, q, kc, vc, args, sinks, window, dev, dtype, gen, bs: int, cache_dt=None):
    from models.layers import Rotary

    from . import attention, rope
    bt, qs, ctx = args
    n, K, D = q.shape[0], kc.shape[2], kc.shape[3]
    kn, vn = (torch.randn(n, K, D, device=dev, generator=gen) for _ in range(2))
    last = ctx - 1
    slots = bt[torch.arange(n, device=dev), last // bs] * bs + last % bs
    rot = Rotary(cfg).to(dev)

    def reference(dt):
        kcc, vcc = kc.to(cache_dt or dt), vc.to(cache_dt or dt)  # copies: the reference writes them
        qr = rope.rope_into_cache_reference(q.to(dt), kn.to(dt), vn.to(dt), *rot.cos_sin(last, dt), kcc, vcc, slots)
        return attention.paged_attention_reference(qr, kcc, vcc, *args, sinks.to(dt), window, D ** -0.5)
    kb, vb = kc.to(cache_dt or dtype), vc.to(cache_dt or dtype)
    out = attention.paged_attention(q.to(dtype), kb, vb, *args, sinks.to(dtype), window, D ** -0.5, max_query_len=1,
                                    rope=(kn.to(dtype), vn.to(dtype), *rot.cos_sin(last, dtype), slots))
    return verdict(out, reference(torch.float32), reference(dtype))


def rmsnorm_case(cfg, n: int, dev, dtype, gen):
    from . import rmsnorm
    H = cfg.hidden_size
    x, r = (torch.randn(n, H, device=dev, generator=gen) for _ in range(2))
    w = 1 + 0.05 * torch.randn(H, device=dev, generator=gen)
    o32, h32 = rmsnorm.rmsnorm_reference(x, w, 1e-5, r)
    o16, h16 = rmsnorm.rmsnorm_reference(x.to(dtype), w, 1e-5, r.to(dtype))
    ok, hk = rmsnorm.rmsnorm_triton(x.to(dtype), w, 1e-5, r.to(dtype))
    (e1, b1, p1), (e2, b2, p2) = verdict(ok, o32, o16), verdict(hk, h32, h16)
    return max(e1, e2), max(b1, b2), p1 and p2


def rope_case(cfg, n: int, dev, dtype, gen):
    """q and k as views of one fused qkv output, cos/sin from Rotary.cos_sin at positions up to the
    longest context, each in the dtype compared; rotated into new tensors, and into the cache."""
    from models.layers import Rotary

    from . import rope
    Hq, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = torch.randn(n, (Hq + 2 * K) * D, device=dev, generator=gen)
    pos = torch.randint(0, cfg.max_position_embeddings, (n,), device=dev, generator=gen)
    rot = Rotary(cfg).to(dev)

    def views(t):
        q, k, _ = t.split([Hq * D, K * D, K * D], dim=-1)
        return q.view(-1, Hq, D), k.view(-1, K, D)

    q32, k32 = rope.rope_reference(*views(qkv), *rot.cos_sin(pos, torch.float32))
    xb, (cb, sb) = views(qkv.to(dtype)), rot.cos_sin(pos, dtype)
    q16, k16 = rope.rope_reference(*xb, cb, sb)
    qk, kk = rope.rope_triton(*xb, cb, sb)
    (e1, b1, p1), (e2, b2, p2) = verdict(qk, q32, q16), verdict(kk, k32, k16)
    # the paged step's form: k (rotated) and v written to their slots in the cache
    v = qkv.to(dtype)[:, (Hq + K) * D:].view(n, K, D)
    kc, vc = (torch.zeros(-(-n // 16), 16, K, D, dtype=dtype, device=dev) for _ in range(2))
    slots = torch.randperm(kc.shape[0] * 16, device=dev, generator=gen)[:n]
    qc = rope.rope_into_cache_triton(*xb, v, cb, sb, kc, vc, slots)
    flat = lambda c: c.view(-1, K, D)[slots]  # noqa: E731
    (e3, b3, p3), (e4, b4, p4) = verdict(qc, q32, q16), verdict(flat(kc), k32, k16)
    p5 = torch.equal(flat(vc), v)
    return max(e1, e2, e3, e4), max(b1, b2, b3, b4), p1 and p2 and p3 and p4 and p5


def sample_case(V: int, n: int, dev, dtype, gen):
    """n rows of V fp32 logits (what engine.sampler hands the kernel, whatever the model dtype): the
    kernel's draw against the reference's, as the gap between their Gumbel scores over the row's
    largest |score| (0 when they agree; a last-bit difference in log may flip a near tie)."""
    from . import sample
    x = torch.randn(n, V, device=dev, generator=gen) * 4
    inv_t = torch.rand(n, device=dev, generator=gen) + 0.5
    keys = torch.randint(-2**62, 2**62, (n,), device=dev, generator=gen)
    got, want = sample.sample_triton(x, inv_t, keys), sample.sample_reference(x, inv_t, keys)
    s = x * inv_t[:, None] - torch.log(-torch.log(sample.philox_uniform(keys, V).to(dev)))
    gap = ((s.gather(1, want[:, None]) - s.gather(1, got[:, None])).abs() / s.abs().amax(1, keepdim=True)).max()
    return float(gap), 0.0, bool(gap <= 1e-5)


def linear_case(cfg, which: str, n: int, dev, dtype, gen, dry: bool, split: bool = False):
    """One of a decode step's linears (kernels.linear) at n rows: at this GPU's measured config for the
    shape, else kernels.aot_workloads' sample tile (dry: a small one, and the vocabulary cut to 3000 rows).
    split: at kernels.aot_workloads' split-K sample (the tile's last program reduces, in the same launch)."""
    from . import _tune_cases as tc, aot_workloads, linear, tuned
    N, K, bias = tc.linear_shape(cfg, which)
    N = min(N, 3000) if dry else N
    x = torch.randn(n, K, device=dev, generator=gen)
    w = torch.randn(N, K, device=dev, generator=gen) * K ** -0.5
    b = torch.randn(N, device=dev, generator=gen) * 0.1 if bias else None
    xb, wb, bb = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    ref32, ref16 = linear.linear_reference(x, w, b), linear.linear_reference(xb, wb, bb).to(dtype)
    cfg_l = linear.config_for(xb, wb, bb) or (dict(BLOCK_N=32, BLOCK_K=64) if dry else aot_workloads.LINEAR_SAMPLE)
    if split:
        cfg_l = dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=3) if dry else aot_workloads.LINEAR_SPLIT_SAMPLE
    with tuned.forced({"linear": cfg_l}):
        out = linear.linear(xb, wb, bb)
    return verdict(out, ref32, ref16)


def gate_case(cfg, n: int, dev, dtype, gen):
    """kernels.moe_gate's fused block (add, MLP norm, router, routing and align in one launch, then the
    experts) against the launches it replaces, both at dtype: no further from the fp32 reference (the
    unfused chain's routing, in fp32) than the unfused chain, and the same expert load. As a decode graph
    calls it (MoE.forward_block): with the row mask, its padding rows (here the last of 2+) routed to no
    expert and not counted. The last program's handoff (an atomic ticket, logits read past L1) is only
    exercised on a GPU."""
    from . import moe, rmsnorm, route
    from .moe_gate import GATE_MAX_ROWS
    E, H, k, eps = cfg.num_local_experts, cfg.hidden_size, cfg.num_experts_per_tok, cfg.rms_norm_eps
    n = min(n, GATE_MAX_ROWS)
    ws = _experts(cfg, E, dev, gen)
    ws16 = tuple(t.to(dtype) if t.is_floating_point() else t for t in ws)
    rw = (torch.randn(E, H, device=dev, generator=gen) / math.sqrt(H)).to(dtype)
    rb = (torch.randn(E, device=dev, generator=gen) * 0.1).to(dtype)
    o, r = (torch.randn(n, H, device=dev, generator=gen).to(dtype) for _ in range(2))
    nw, nw2 = (1 + 0.05 * torch.randn(H, device=dev, generator=gen) for _ in range(2))
    g2l = torch.cat([torch.arange(E, device=dev), torch.full((1,), -1, device=dev)])
    loads = [torch.zeros(E, dtype=torch.long, device=dev) for _ in range(2)]
    mask = torch.arange(n, device=dev) < max(1, n - 1)
    fused, _ = moe.moe_block_mxfp4(o, r, (nw, eps), rw, rb, *ws16, top_k=k, global_to_local=g2l, load=loads[0],
                                   token_mask=mask, drop_masked=True, norm=(nw2, eps))
    h, x = rmsnorm.rmsnorm_triton(o, nw, eps, r)
    idx, w = route.route_triton(torch.nn.functional.linear(h, rw, rb), k, loads[1], mask, drop_masked=True)
    unfused, _ = moe.moe_mxfp4(h, (idx, w), *ws16, top_k=k, global_to_local=g2l, residual=x, norm=(nw2, eps))
    ref32 = x.float() + moe.moe_reference(h.float(), idx, w.float(), *ws, global_to_local=g2l)
    ek, e16, ok = verdict(fused, ref32, unfused)
    return ek, e16, ok and torch.equal(loads[0], loads[1])


def cases(models: list[str], tokens: list[int], dry: bool):
    """(name, thunk) per case; thunk(dev, dtype, gen) -> (kernel error, bf16 reference error, passed)."""
    for name in models:
        cfg = PRESETS[name]
        for n in tokens:
            yield f"{name} moe tokens={n}", lambda d, t, g, c=cfg, n=n: moe_case(c, n, d, t, g)
        for n in tokens[:2]:  # the single-pair tiles (kernels.moe_gemv; 16-bit activations, also in the dry run)
            yield f"{name} moe gemv tokens={n}", lambda d, t, g, c=cfg, n=n: moe_case(c, n, d, torch.bfloat16, g,
                                                                                      gemv=True)
        for n in tokens[1:]:  # the register-operand MMA tiles (kernels.moe_rs; 16-bit activations)
            yield f"{name} moe rs tokens={n}", lambda d, t, g, c=cfg, n=n: moe_case(c, n, d, torch.bfloat16, g,
                                                                                    rs=True)
        for n in tokens[:2]:  # the MMA tiles split over K (W2's combine tail at 1 token, the combine launch at 8)
            yield f"{name} moe split-K tokens={n}", lambda d, t, g, c=cfg, n=n: moe_case(c, n, d, t, g, split=True)
        for n in tokens[-2:]:  # the MMA tiles over weights decoded once a step (kernels.moe_dq; prefill-sized)
            yield f"{name} moe dq tokens={n}", lambda d, t, g, c=cfg, n=n: moe_case(c, n, d, t, g, dq=True)
        for n in tokens[:2]:  # a decode step's gate in one launch (kernels.moe_gate), then the experts
            yield f"{name} moe gate block rows={min(n, 16)}", lambda d, t, g, c=cfg, n=n: gate_case(c, n, d, t, g)
        from ._tune_cases import LINEARS
        for which in LINEARS:  # the decode linears (kernels.linear), at the configs a tuned file picks
            for n in tokens[:2]:
                yield f"{name} linear {which} rows={n}", \
                    lambda d, t, g, c=cfg, w=which, n=n: linear_case(c, w, n, d, t, g, dry)
        for which in ("router", "o"):  # split-K: its cross-program handoff is only real on a GPU
            yield f"{name} linear {which} split-K rows={tokens[0]}", \
                lambda d, t, g, c=cfg, w=which, n=tokens[0]: linear_case(c, w, n, d, t, g, dry, split=True)
        ep = 2 if dry else 8
        for n in (tokens[0], tokens[-1]):
            yield f"{name} moe ep{ep} rank rows={n}", lambda d, t, g, c=cfg, n=n, ep=ep: moe_case(c, n, d, t, g, ep)
        yield f"{name} rmsnorm+residual tokens={max(tokens)}", \
            lambda d, t, g, c=cfg, n=max(tokens): rmsnorm_case(c, n, d, t, g)
        for n in (tokens[0], tokens[-1]):
            yield f"{name} rope q+k tokens={n}", lambda d, t, g, c=cfg, n=n: rope_case(c, n, d, t, g)
        V = 3000 if dry else cfg.vocab_size  # the interpreter walks a 201k row slowly
        for n in (tokens[0], min(tokens[-1], 256)):
            yield f"{name} sample rows={n} vocab={V}", lambda d, t, g, V=V, n=n: sample_case(V, n, d, t, g)
        w = cfg.sliding_window
        long_ctx = 40 if dry else 4100
        decode = [(1, 1), (w - 1, 1), (w + 3, 1), (long_ctx, 1)]
        mixed = [(long_ctx, 1), (w + 40, w + 40), (2 * w + 17, 37), (5, 5)]
        for label, seqs in (("decode", decode), ("decode x64", decode * (2 if dry else 16)), ("prefill+decode", mixed)):
            for window in (w, None):
                yield (f"{name} attention {label} {'window' if window else 'full'}",
                       lambda d, t, g, c=cfg, s=seqs, win=window: attention_case(c, s, win, d, t, g))
        for window in (w, None):  # a decode step's rotary and cache writes in the attention's launch
            yield (f"{name} attention decode + rotary {'window' if window else 'full'}",
                   lambda d, t, g, c=cfg, s=decode, win=window: attention_case(c, s, win, d, t, g, rope=True))
        for window in (w, None):  # an fp8 cache: the decode launch's stores and reads, and a prefill's reads
            yield (f"{name} attention decode + rotary fp8 KV {'window' if window else 'full'}",
                   lambda d, t, g, c=cfg, s=decode, win=window: attention_case(c, s, win, d, t, g, rope=True,
                                                                               kv8=True))
            yield (f"{name} attention prefill+decode fp8 KV {'window' if window else 'full'}",
                   lambda d, t, g, c=cfg, s=mixed, win=window: attention_case(c, s, win, d, t, g, kv8=True))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=presets, default="gpt-oss-120b,gpt-oss-20b")
    ap.add_argument("--tokens", type=counts(), default="1,8,64,256,2048", help="MoE / RMSNorm / rotary token counts")
    ap.add_argument("--dry-run", action="store_true", help="tiny preset, CPU, Triton interpreter")
    ap.add_argument("--resume", type=Path, help=argparse.SUPPRESS)  # kernels.faults: a supervised child's state
    a = ap.parse_args(argv)
    if a.dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("kernels.check --dry-run: set TRITON_INTERPRET=1 (before Python starts)", file=sys.stderr)
            return 2
        models, tokens, dev, dtype = ["tiny"], [1, 5, 24], torch.device("cpu"), torch.bfloat16
    else:
        if not torch.cuda.is_available():
            print("kernels.check: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
            return 2
        if a.resume is None:  # a device fault must not fail every case after it (kernels.faults)
            return faults.supervise("kernels.check", argv)
        models, tokens, dev, dtype = a.models, a.tokens, torch.device("cuda"), torch.bfloat16
    st = faults.State.load(a.resume) if a.resume else None
    gen = torch.Generator(device=dev).manual_seed(0)
    if not (st and st.done):
        print(f"| case | kernel error | {dtype} reference error | ok |\n|---|---:|---:|---|")
    failed: list[str] = st.notes.setdefault("failed", []) if st else []
    for i, (name, run) in enumerate(cases(models, tokens, a.dry_run)):
        key = f"{i} {name}"  # a name can repeat (--tokens 1: both rotary cases)
        if st and key in st.done:
            continue
        try:
            ek, e16, ok = run(dev, dtype, gen)
            row = f"{ek:.2e} | {e16:.2e} | {'ok' if ok else 'FAIL'}"
        except Exception as e:  # noqa: BLE001 - one case's error (a compile error, no resources) fails that case
            if st and faults.is_sticky(e):
                fault = faults.DeviceFault(name, e)
                print(f"| {name} | - | - | FAULT ({fault.error[:200]}) |", flush=True)
                failed.append(name)
                st.fault(fault)
                st.finish(key)
                return faults.FAULT_EXIT
            ok, row = False, f"- | - | FAIL ({type(e).__name__}: {str(e)[:200]})"
        if not ok:
            failed.append(name)
        print(f"| {name} | {row} |", flush=True)
        if st:
            st.finish(key)
    print(f"{len(failed)} of the cases failed" if failed else "all cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
