"""Seeded random shapes, paths and tiles for the MoE and attention kernels (Triton interpreter) against their
torch references: the other tests fix the tiny preset's shapes (H = I = 64, 8 experts, top-4) and vary one
thing at a time, these draw hidden and intermediate sizes that are not multiples of the tiles, 1-10 local
experts of up to 13 (an EP rank's map), top-1 to top-4, residual and norm, every MoE path (MMA, dot_scaled,
split-K, gemv, register-operand, DQ); the decode gate at 1-40 router experts, top-1 to top-6, with maps,
masks and layouts; and attention batches of decode or mixed prefill over shuffled pages with windows, fp8
caches and up to 32 key-range splits."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels import tuned  # noqa: E402
from kernels._tune_cases import moe_weights  # noqa: E402
from kernels.attention import paged_attention  # noqa: E402
from kernels.moe import moe_mxfp4, moe_reference  # noqa: E402
from kernels.moe_configs import dq_config, gemv_config, rs_config  # noqa: E402
from kernels.moe_gate import GATE_MAX_ROWS, align, gate_reference, gate_triton  # noqa: E402
from kernels.rmsnorm import rmsnorm_reference  # noqa: E402
from models.checkpoint import PRESETS  # noqa: E402
from tests.kernels.cases import attention_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # the interpreter runs numpy per program (tests/conftest.py)

MOE_PATHS = ("default", "mma", "scaled", "split", "gemv", "rs", "dq")


def _rel_err(got, want) -> float:
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def _moe_tiles(path: str, r: random.Random) -> dict | None:
    bm = r.choice([16, 32, 64])
    if path == "gemv":
        return {k: dict(gemv_config(True, k), BLOCK_KB=r.choice([16, 32, 64])) for k in ("moe_w1", "moe_w2")}
    if path == "rs":
        return {k: dict(rs_config(True, k, bm), NSUB=r.choice([1, 2, 3])) for k in ("moe_w1", "moe_w2")}
    if path == "dq":
        return {k: dict(dq_config(True, k, bm), BLOCK_K=r.choice([32, 64])) for k in ("moe_w1", "moe_w2")}
    if path == "default":
        return None
    base = dict(BLOCK_M=bm, BLOCK_N=r.choice([16, 32, 64]), BLOCK_K=r.choice([32, 64, 128]))
    if path == "split":
        base["SPLIT_K"] = r.choice([2, 3, 4])
    return {"moe_w1": base, "moe_w2": dict(base)}


@pytest.mark.parametrize("seed", range(14))
def test_moe_random_shapes_match_the_reference(seed):
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    path = MOE_PATHS[seed % len(MOE_PATHS)]
    dtype = torch.bfloat16 if path in ("gemv", "rs") or seed % 2 else torch.float32  # gemv and rs: 16-bit only
    H, I = 32 * r.randint(1, 6), 32 * r.randint(1, 5)
    E = r.randint(1, 10)
    n_glob = E + r.choice([0, 1, 3])
    N = r.choice([1, 2, 3, 5, 13, 33])
    if path == "gemv":
        N = min(N, 5)  # a decode path (a program a pair): more rows only cost interpreter time
    shape = PRESETS["tiny"].model_copy(update=dict(hidden_size=H, intermediate_size=I, num_local_experts=E))
    w1b, w1s, b1, w2b, w2s, b2 = moe_weights(shape, dtype, "cpu", seed)
    local = sorted(r.sample(range(n_glob), E))  # this rank's experts among n_glob
    gmap = torch.full((n_glob,), -1, dtype=torch.long)
    gmap[local] = torch.arange(E)
    k = r.randint(1, min(4, n_glob))
    idx = torch.rand(N, n_glob, generator=g).topk(k, dim=1).indices
    if r.random() < 0.4:
        idx[:, 0] = local[0]  # one expert takes every token: several tiles of one expert
    w = torch.softmax(torch.randn(N, k, generator=g), -1).to(dtype)
    x = (torch.randn(N, H, generator=g) * 2).to(dtype)
    res = torch.randn(N, H, generator=g).to(dtype) if r.random() < 0.6 else None
    nw = (torch.randn(H, generator=g) * 0.2 + 1).to(dtype) if res is not None and r.random() < 0.5 else None
    tiles = _moe_tiles(path, r)
    kw = dict(global_to_local=gmap, top_k=k, scaled=True if path == "scaled" else None,
              **({} if res is None else dict(residual=res)), **({} if nw is None else dict(norm=(nw, 1e-5))))
    with tuned.forced(tiles or {}):
        out = moe_mxfp4(x, (idx, w), w1b, w1s, b1, w2b, w2s, b2, **kw)
    ref = moe_reference(x.float(), idx, w.float(), w1b, w1s, b1.float(), w2b, w2s, b2.float(), global_to_local=gmap)
    want = [ref if res is None else ref + res.float()]
    got = [out] if nw is None else list(out)
    if nw is not None:
        want.append(rmsnorm_reference(want[0], nw.float(), 1e-5))
    # fp32: the same sums in another order; 16-bit (and dot_scaled, whose activations enter as bf16): rounding
    tol = 1e-4 if dtype == torch.float32 and path != "scaled" else 3e-2
    case = dict(path=path, dtype=dtype, H=H, I=I, E=E, n_glob=n_glob, k=k, N=N, tiles=tiles, norm=nw is not None)
    for o, ref_o in zip(got, want):
        assert _rel_err(o, ref_o) <= tol, (_rel_err(o, ref_o), case)


@pytest.mark.parametrize("seed", range(16))
def test_attention_random_batches_match_attend(seed):
    r = random.Random(1000 + seed)
    decode = seed % 2 == 0
    seqs = []
    for _ in range(r.randint(1, 6)):
        ctx = r.randint(1, r.choice([20, 90, 300]))
        seqs.append((ctx, 1 if decode else r.randint(1, min(ctx, 24))))
    bs, G = r.choice([4, 8, 16]), r.choice([1, 2, 4, 8])
    window = r.choice([None, r.randint(1, 40)])
    dtype = torch.bfloat16 if seed % 4 >= 2 else torch.float32
    cache = torch.float8_e4m3fn if dtype == torch.bfloat16 and r.random() < 0.5 else None
    args, ref = attention_step(seqs, bs, G, window, dtype=dtype, seed=seed, cache_dtype=cache)
    splits = r.choice([1, 2, 3, 5, 8, 32]) if decode else r.choice([1, 1, 2, 3])
    cfg = dict(BLOCK_M=max(16, G), BLOCK_N=r.choice([16, 32]), NUM_SPLITS=splits)
    if not decode:
        cfg["BLOCK_M"] = max(16, G * r.choice([1, 2, 4]))
    with tuned.forced({"attn_decode" if decode else "attn_prefill": cfg}):
        out = paged_attention(*args, max_query_len=max(q for _, q in seqs) if r.random() < 0.7 else None)
    err = _rel_err(out, ref.float())
    assert err <= (2e-5 if dtype == torch.float32 else 2e-2), (err, seqs, bs, G, window, dtype, cache, cfg)


@pytest.mark.parametrize("seed", range(10))
def test_gate_random_shapes_match_the_unfused_ops(seed):
    """fp32, so that no two logits tie (the kernel takes the lower id, torch.topk either)."""
    r = random.Random(2000 + seed)
    g = torch.Generator().manual_seed(seed)
    H, E, n = r.choice([32, 64, 96, 160, 192]), r.randint(1, 40), r.randint(1, GATE_MAX_ROWS)
    k = r.randint(1, min(6, E))
    o, res = (torch.randn(n, H, generator=g) for _ in range(2))
    nw = torch.rand(H, generator=g) + 0.5
    rw, rb = torch.randn(E, H, generator=g) / H ** 0.5, torch.randn(E, generator=g) * 0.1
    local = sorted(r.sample(range(E), r.randint(1, E)))
    gmap = torch.full((E + 1,), -1, dtype=torch.long)  # id E: a dropped row's
    gmap[local] = torch.arange(len(local))
    mask = torch.rand(n, generator=g) < 0.7 if r.random() < 0.5 else None
    bm = r.choice([1, 2, 4, 16])
    hb = 1 << (H - 1).bit_length()
    config = r.choice([None, dict(EB=r.choice([1, 2, 4, 8]), BLOCK_H=r.choice([hb, max(16, hb // 4)]))])
    load, load_ref = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
    gt = gate_triton(o, res, nw, 1e-5, rw, rb, k, len(local), bm, gmap, load, mask, mask is not None, x16=True,
                     config=config)
    x, h, idx, w = gate_reference(o, res, nw, 1e-5, rw, rb, k, load_ref, mask, mask is not None)
    case = dict(H=H, E=E, n=n, k=k, local=len(local), mask=mask is not None, bm=bm, config=config)
    assert torch.equal(gt.x, x) and torch.equal(gt.idx.long(), idx) and torch.equal(load, load_ref), case
    torch.testing.assert_close(gt.h, h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt.weights, w.flatten(), rtol=1e-6, atol=1e-6)
    for got, want in zip(gt.aligned, align(idx, gmap, len(local), bm)):
        assert torch.equal(got, want.to(got.dtype)), case
