"""Shared inputs for the kernel tests: a tiny MoE with MXFP4 experts, and paged-attention steps.

Importing this needs no triton, so the torch-path tests run where it is missing."""

import math

import torch

from models.attention import NULL_BLOCK, KVCache, PagedMetadata
from models.checkpoint import PRESETS
from models.layers import MoE
from models.weights import ExpertWeights

CFG = PRESETS["tiny"]  # H=64, I=64, 8 experts, top-4
E, H, I, TOP_K = CFG.num_local_experts, CFG.hidden_size, CFG.intermediate_size, CFG.num_experts_per_tok


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    # random bytes hit every E2M1 code (incl. -0); scales ~2**-4.5 keep weights near 1/sqrt(fan-in)
    blocks = lambda o, i: torch.randint(0, 256, (E, o, i // 32, 16), dtype=torch.uint8, generator=g)  # noqa: E731
    scales = lambda o, i: torch.randint(121, 125, (E, o, i // 32), dtype=torch.uint8, generator=g)  # noqa: E731
    return dict(w1_blocks=blocks(2 * I, H), w1_scales=scales(2 * I, H), w2_blocks=blocks(H, I),
                w2_scales=scales(H, I), b1=torch.randn(E, 2 * I, generator=g) * 0.1,
                b2=torch.randn(E, H, generator=g) * 0.1,
                router_w=torch.randn(E, H, generator=g) / math.sqrt(H), router_b=torch.randn(E, generator=g) * 0.1)


W = _weights()


def moe_module(dtype=torch.float32, ids=tuple(range(E))) -> MoE:
    sel = list(ids)
    ex = ExpertWeights(tuple(ids), W["b1"][sel].to(dtype), W["b2"][sel].to(dtype),
                       w1_blocks=W["w1_blocks"][sel], w1_scales=W["w1_scales"][sel],
                       w2_blocks=W["w2_blocks"][sel], w2_scales=W["w2_scales"][sel])
    return MoE(CFG, W["router_w"].to(dtype), W["router_b"].to(dtype), ex)


def packed(m: MoE):
    return (m.w1_blocks, m.w1_scales, m.b1, m.w2_blocks, m.w2_scales, m.b2)


def tokens(n, seed=1, dtype=torch.float32):
    return (torch.randn(n, H, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


def split_layer(forced: dict, n: int, dtype, seed: int, scaled: bool | None = None):
    """The layer as two ranks' halves of the experts (through the map), expert 2 taking every token, under
    `forced` configs (and `scaled`) and under the default MMA path -> (out, fp32 module's output, out's max
    error, MMA's)."""
    from kernels import tuned
    from kernels.moe import moe_mxfp4
    x = tokens(n, seed=seed)
    full = moe_module()
    idx, w = full.route(x)
    idx[:, 0] = 2
    ma, mb = moe_module(dtype, ids=(1, 3, 4, 6)), moe_module(dtype, ids=(0, 2, 5, 7))
    run = lambda m, sc=None: moe_mxfp4(x.to(dtype), (idx, w.to(dtype)), *packed(m),  # noqa: E731
                                       global_to_local=m.global_to_local, scaled=sc).float()
    with tuned.forced(forced):
        out = run(ma, scaled) + run(mb, scaled)
    mma = run(ma) + run(mb)
    ref = full.compute(x, idx, w)
    return out, ref, (out - ref).abs().max().item(), (mma - ref).abs().max().item()


KV_HEADS, HEAD_DIM = 2, 16
MIXED = [(1, 1), (6, 1), (23, 1), (40, 9), (13, 13), (9, 4)]  # (context_len after the step, new tokens)
DECODE = [(1, 1), (17, 1), (33, 1), (8, 1)]


def attention_step(seqs, bs, G, window, dtype=torch.float32, seed=0, cache_dtype=None):
    """Cache (of cache_dtype, default dtype) full of stale random K/V (NULL block too), tables over shuffled
    blocks with window-freed entries set to NULL_BLOCK; attend() writes the step's new k/v and returns the
    model's output. -> (paged_attention args, attend's output)."""
    g = torch.Generator().manual_seed(seed)
    K, D = KV_HEADS, HEAD_DIM
    Hq = K * G
    nblocks = 3 + sum(-(-c // bs) for c, _ in seqs)
    cache = KVCache.allocate(1, [nblocks], bs, K, D, cache_dtype or dtype)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    perm = (torch.randperm(nblocks - 1, generator=g) + 1).tolist()
    tables, slots, used = [], [], 0
    for ctx, ql in seqs:
        t = perm[used:used + -(-ctx // bs)]
        used += len(t)
        if window is not None:  # what BlockManager.slide releases: blocks no query of this step sees
            t = [NULL_BLOCK if (j + 1) * bs <= ctx - ql - window + 1 else b for j, b in enumerate(t)]
        slots += [t[p // bs] * bs + p % bs for p in range(ctx - ql, ctx)]
        tables.append(t)
    width = max(map(len, tables)) + 2
    bt = torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in tables])
    qs = torch.tensor([0] + torch.tensor([q for _, q in seqs]).cumsum(0).tolist())
    ctx = torch.tensor([c for c, _ in seqs])
    n = int(qs[-1])
    q = torch.randn(n, Hq, D, generator=g).to(dtype)
    k, v = (torch.randn(n, K, D, generator=g).to(dtype) for _ in range(2))
    sinks = torch.randn(Hq, generator=g).to(dtype)
    meta = PagedMetadata(cache, qs, ctx, {"g": bt}, {"g": torch.tensor(slots)}, ["g"])
    ref = meta.attend(0, q, k, v, sinks, window, D ** -0.5)
    return (q, cache.k[0], cache.v[0], bt, qs, ctx, sinks, window, D ** -0.5), ref
