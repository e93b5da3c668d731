"""MXFP4 MoE kernel (Triton interpreter) against models.layers.MoE on the tiny config."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from kernels.moe import align, align_triton, moe_mxfp4, moe_reference, route  # noqa: E402
from tests.kernels.cases import E, H, TOP_K as K, moe_module, packed, split_layer, tokens  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the interpreter runs numpy per program; threads only add overhead
    yield
    torch.set_num_threads(n)


def _close(out, ref, rel):
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item() + 1e-6, f"max err {err}, ref max {ref.abs().max()}"


@pytest.mark.parametrize("n", [1, 5, 33])
def test_routed_from_logits_matches_module_fp32(n):
    m, x = moe_module(), tokens(n, seed=n)
    logits = F.linear(x, m.router_w, m.router_b)
    out = moe_mxfp4(x, logits, *packed(m), top_k=K, limit=m.limit, alpha=m.alpha)
    _close(out, m(x), 1e-4)


def test_expert_with_all_tokens_and_expert_with_none():
    m, x = moe_module(), tokens(33, seed=7)
    g = torch.Generator().manual_seed(3)
    others = torch.stack([torch.randperm(6, generator=g)[:K - 1] for _ in range(33)])
    others = torch.tensor([0, 1, 3, 4, 5, 6])[others]               # expert 7 never chosen
    idx = torch.cat([torch.full((33, 1), 2), others], dim=1)          # expert 2 takes every token (3 tiles)
    weights = torch.softmax(torch.randn(33, K, generator=g), -1)
    ref = m.compute(x, idx, weights)
    _close(moe_mxfp4(x, (idx, weights), *packed(m)), ref, 1e-4)
    torch.testing.assert_close(moe_reference(x, idx, weights, *packed(m)), ref, rtol=1e-6, atol=1e-6)


def test_bf16_error_no_worse_than_the_bf16_module():
    """Through the tiles' bf16 tl.dot, the GPU's branch (the interpreter multiplies bf16 by value,
    kernels._interp), without _settle's PTX."""
    from kernels import _triton
    n = 17
    m32, m16 = moe_module(torch.float32), moe_module(torch.bfloat16)
    x16 = tokens(n, seed=11, dtype=torch.bfloat16)
    idx, w = route(F.linear(x16.float(), m32.router_w, m32.router_b), K)
    truth = moe_module(torch.float32)
    truth.b1, truth.b2 = m16.b1.float(), m16.b2.float()  # same (bf16-rounded) biases, fp32 math
    ref = truth.compute(x16.float(), idx, w.bfloat16().float())
    with _triton.capturing() as launches:  # the launches, not run
        moe_mxfp4(x16, (idx, w.bfloat16()), *packed(m16))
    mma = [kw for k, _, _, kw in launches if k.fn.__name__ in ("_w1_kernel", "_w2_kernel")]
    assert len(mma) == 2 and all(kw["DOT_BF16"] and not kw["SCALED"] and not kw["PTX"] for kw in mma)
    out = moe_mxfp4(x16, (idx, w.bfloat16()), *packed(m16))
    assert out.dtype == torch.bfloat16
    err_kernel = (out.float() - ref).abs().max().item()
    err_model = (m16.compute(x16, idx, w.bfloat16()).float() - ref).abs().max().item()
    assert err_kernel <= 2 * err_model + 1e-3, (err_kernel, err_model)
    assert err_kernel <= 2e-2 * ref.abs().max().item()


@pytest.mark.parametrize("block_k", [32, 128])  # two K steps (scales prefetched across them); one, half masked
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_dot_path_matches_the_module(dtype, block_k):
    """The GPU default for 16-bit activations (tl.dot_scaled on the stored E2M1 bytes and E8M0 scales,
    the scales loaded one K step ahead), forced here under the interpreter: within bf16 rounding of the
    fp32 module (the activations enter the dot as bf16), on local experts through the map, and in bf16
    equal to the kernels' own decode up to the summation order."""
    from kernels import tuned
    ids = (1, 3, 4, 6)
    m32, m = moe_module(ids=ids), moe_module(dtype, ids=ids)
    x = tokens(9, seed=4)
    idx, w = moe_module().route(x)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k)
    with tuned.forced({"moe_w1": cfg, "moe_w2": cfg}):
        out = moe_mxfp4(x.to(dtype), (idx, w.to(dtype)), *packed(m), global_to_local=m.global_to_local, scaled=True)
        own = moe_mxfp4(x.to(dtype), (idx, w.to(dtype)), *packed(m), global_to_local=m.global_to_local, scaled=False)
    ref = m32.compute(x, idx, w)
    _close(out, ref, 2e-2)
    if dtype == torch.bfloat16:
        _close(out, own, 1e-2)


# block_kb: two K steps, or one with a spare block; n: x16 made by the align program, or (past X16_IN_ALIGN
# rows) by a launch of its own
@pytest.mark.parametrize("dtype,block_kb,n", [(torch.bfloat16, 16, 9), (torch.bfloat16, 64, 20),
                                              (torch.float16, 16, 20), (torch.float16, 64, 9)])
def test_gemv_tiles_match_the_module(dtype, block_kb, n):
    """kernels.moe_gemv (one pair per tile, activations as fp16(x * 2**-XS), E2M1 through fp16 patterns,
    a scale per 16-byte block, fp32 rows to the combine): no further from the fp32 module than the MMA
    path at the same dtype; a local subset through the map (pairs of absent experts skipped: summed with the
    other half, the full layer); an expert taking every token (many single-pair tiles of one expert)."""
    from kernels.moe_configs import gemv_configs
    cfg = {k: dict(c, BLOCK_KB=block_kb) for k, c in gemv_configs(True).items()}
    out, ref, err, err_mma = split_layer(cfg, n, dtype, seed=4)
    assert err <= err_mma + 1e-4, (err, err_mma)  # fp16 products, fp32 rows to the combine: no worse
    _close(out, ref, 2e-2)


def test_gemv_k_steps_around_a_partial_last_one():
    """K = 96 (3 scale blocks a row): 1 block a step (the loop, then a full last step), 2 (a loop step, then
    the peeled last step with a spare block summed as 0) and 4 (the last step alone): the same layer."""
    from kernels import _triton, _tune_cases as cases, tuned
    from kernels.moe_configs import gemv_configs
    from models.checkpoint import PRESETS
    cfg = PRESETS["tiny"].model_copy(update=dict(hidden_size=96, intermediate_size=96))
    fn, args, kw, reference = cases.make_call("moe", cfg, 2, None, 0, torch.bfloat16, "cpu")
    ref = reference().float()
    outs = []
    for kb in (16, 32, 64):
        with tuned.forced({k: dict(c, BLOCK_KB=kb) for k, c in gemv_configs(True).items()}):
            with _triton.recording() as launches:
                fn(*args, **kw)
            assert any(k.__name__ == "_w2_gemv_kernel" and w["BLOCK_KB"] == kb for k, _, w in launches)
            outs.append(fn(*args, **kw).float())
        assert (outs[-1] - ref).abs().max() <= 2e-2 * ref.abs().max(), kb
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-2, atol=1e-3)


# block_m: one tile per expert's run or several; nsub: K steps of one and two scale blocks
@pytest.mark.parametrize("dtype,block_m,nsub,n", [(torch.bfloat16, 16, 1, 9), (torch.bfloat16, 16, 2, 20),
                                                  (torch.float16, 32, 2, 20)])
def test_rs_tiles_match_the_module(dtype, block_m, nsub, n):
    """kernels.moe_rs (weights as the MMA's operand, K permuted, activations as bf16(x * 2**XC)): at bf16 no
    further from the fp32 module than the MMA path (fp16 activations go through bf16 here, as tl.dot_scaled's
    do on a GPU, so against the module only); a local subset through the map; an expert taking every token
    (several tiles of one expert, a padded last one)."""
    from kernels.moe_configs import rs_configs
    cfg = {k: dict(c, NSUB=nsub) for k, c in rs_configs(True, block_m).items()}
    out, ref, err, err_mma = split_layer(cfg, n, dtype, seed=5)
    assert dtype != torch.bfloat16 or err <= 1.5 * err_mma + 1e-4, (err, err_mma)
    _close(out, ref, 2e-2)


@pytest.mark.parametrize("path", ["own", "scaled", "rs"])
def test_prefill_sized_tiles_match_the_module(path):
    """BLOCK_M 256, the widest tiles kernels.tune tries for a prefill chunk (kernels._tune_cases.acc_cap): the
    expert taking all 40 tokens fills one tile and the others' runs are mostly padding; the kernels' own
    E2M1 decode, tl.dot_scaled and kernels.moe_rs all within bf16 rounding of the fp32 module, and the
    MMA paths no further from it than the default tiles."""
    from kernels.moe_configs import rs_configs
    cfg = (rs_configs(True, 256) if path == "rs" else
           {k: dict(BLOCK_M=256, BLOCK_N=32, BLOCK_K=32) for k in ("moe_w1", "moe_w2")})
    out, ref, err, err_mma = split_layer(cfg, 40, torch.bfloat16, seed=6, scaled=path == "scaled")
    assert err <= (1.5 if path == "rs" else 1.0) * err_mma + 1e-4, (err, err_mma)
    _close(out, ref, 2e-2)


@pytest.mark.parametrize("nsub", [3, 6])
def test_rs_steps_of_several_blocks(nsub):
    """K steps of several scale blocks at 6 blocks a row (H = I = 192): odd steps run one MMA a block,
    even ones pair the blocks into K=64 MMAs (6: three a step); both against the fp32 reference."""
    from kernels import _tune_cases as cases, tuned
    from kernels.moe_configs import rs_configs
    from tests.kernels.cases import CFG
    cfg = CFG.model_copy(update=dict(hidden_size=192, intermediate_size=192))
    w = cases.moe_weights(cfg, torch.bfloat16, "cpu", seed=3)
    x, (idx, rw) = cases.moe_tokens(cfg, 12, torch.bfloat16, "cpu", seed=4)
    ref = moe_reference(x.float(), idx, rw.float(), *(t.float() if t.is_floating_point() else t for t in w))
    with tuned.forced({k: dict(c, NSUB=nsub) for k, c in rs_configs(True, 16).items()}):
        out = moe_mxfp4(x, (idx, rw), *w).float()
    _close(out, ref, 2e-2)


def test_w1_and_w2_entries_on_different_paths_fall_back_to_the_default():
    """Each path hands W2 its own activations (rs: permuted and scaled; gemv: fp16): a tuned W1 on one path
    and W2 on another, even at the same BLOCK_M, is not run; both take the default tiles."""
    from kernels import tuned
    from kernels.moe_configs import configs_for, default_config, rs_config
    x = tokens(4, seed=2).bfloat16()
    d = default_config(4 * K, E, True)
    mixed = {"moe_w1": rs_config(True, "moe_w1", d["BLOCK_M"]), "moe_w2": d}
    with tuned.forced(mixed):
        assert configs_for(4, H, 64, E, K, x, True) == (d, d)
    with tuned.forced({"moe_w1": mixed["moe_w1"], "moe_w2": rs_config(True, "moe_w2", d["BLOCK_M"])}):
        assert configs_for(4, H, 64, E, K, x, True)[0]["RS"]


def test_rs_activation_order_is_a_permutation_of_each_block():
    """moe_rs.act_order: a bijection of each 32-block; the low nibble of byte 4c + 2h + i sits at operand
    column 8h + 2c + i, its high nibble 16 further on."""
    from kernels.moe_rs import act_order
    pos = [act_order(k) for k in range(96)]
    assert sorted(pos) == list(range(96)) and all(p // 32 == k // 32 for k, p in enumerate(pos))
    assert [pos[2 * b] for b in range(16)] == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    assert all(pos[2 * b + 1] == pos[2 * b] + 16 for b in range(48))


def test_gemv_config_leaves_fp32_on_the_mma_path():
    """fp32 activations keep fp32 products: a forced gemv config runs the MMA path (identical output)."""
    from kernels import tuned
    from kernels.moe_configs import gemv_configs
    m, x = moe_module(), tokens(5, seed=8)
    idx, w = m.route(x)
    with tuned.forced(gemv_configs(True)):
        out = moe_mxfp4(x, (idx, w), *packed(m))
    torch.testing.assert_close(out, moe_mxfp4(x, (idx, w), *packed(m)), rtol=0, atol=0)
    _close(out, m.compute(x, idx, w), 1e-4)


def test_local_expert_subset_skips_absent_experts():
    ids_a, ids_b = (1, 3, 4, 6), (0, 2, 5, 7)
    ma, mb, full = moe_module(ids=ids_a), moe_module(ids=ids_b), moe_module()
    x = tokens(9, seed=5)
    idx, w = full.route(x)
    out_a = moe_mxfp4(x, (idx, w), *packed(ma), global_to_local=ma.global_to_local)
    _close(out_a, ma.compute(x, idx, w), 1e-4)
    out_b = moe_mxfp4(x, (idx, w), *packed(mb), global_to_local=mb.global_to_local)
    _close(out_a + out_b, full.compute(x, idx, w), 1e-4)
    # a token none of whose experts is local gets exactly zero
    only7 = torch.tensor([[7, 5, 2, 0]])
    z = moe_mxfp4(x[:1], (only7, torch.full((1, 4), 0.25)), *packed(ma), global_to_local=ma.global_to_local)
    assert torch.equal(z, torch.zeros_like(z))


def test_expert_parallel_rows_form_matches_run_experts():
    m = moe_module(ids=(1, 3, 4, 6))
    rows = tokens(6, seed=9)
    local = torch.tensor([3, 0, 0, 2, 1, 3])
    out = moe_mxfp4(rows, (local[:, None], torch.ones(6, 1)), *packed(m), top_k=1)
    _close(out, m.run_experts(rows, local), 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_added_in_the_combine_is_the_unfused_add(dtype):
    """The block's `x + moe(h)` in the combine: the MoE output rounded first, then added, as unfused.
    Bit for bit (the interpreter rounds fp32 -> bf16 to nearest even as a GPU and torch do,
    kernels._interp)."""
    m, h = moe_module(dtype), tokens(7, seed=4, dtype=dtype)
    res = tokens(7, seed=5, dtype=dtype) * 4
    routing = route(F.linear(h.float(), m.router_w.float(), m.router_b.float()), K, dtype)
    plain = moe_mxfp4(h, routing, *packed(m))

    def same(out):
        return torch.equal(out, res + plain)
    assert same(moe_mxfp4(h, routing, *packed(m), residual=res))
    wide = torch.zeros(7, 2 * H, dtype=dtype)
    wide[:, ::2] = res                                            # a strided residual view
    assert same(moe_mxfp4(h, routing, *packed(m), residual=wide[:, ::2]))
    assert not same(moe_mxfp4(h, routing, *packed(m), residual=res * 2))
    assert torch.equal(moe_mxfp4(h[:0], routing[0][:0], *packed(m), residual=res[:0]), res[:0])


@pytest.mark.parametrize("chunk", [None, 16])  # 16: a row in several chunks (kernels.moe_combine.CHUNK), 2 passes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_norm_in_the_combine_is_the_rmsnorm_of_the_sum(dtype, chunk, monkeypatch):
    """With `norm`, the combine also writes the next RMSNorm of the (rounded) residual sum, which the
    block would otherwise launch apart (the next attention norm): the sum is the residual variant's
    to the bit, its norm the rmsnorm reference's within the summation order of the squares."""
    from kernels import moe_combine
    from kernels.rmsnorm import rmsnorm_reference
    if chunk:
        monkeypatch.setattr(moe_combine, "CHUNK", chunk)
    m, h = moe_module(dtype), tokens(7, seed=4, dtype=dtype)
    res = tokens(7, seed=5, dtype=dtype) * 4
    w = torch.rand(H, generator=torch.Generator().manual_seed(9)) + 0.5
    routing = route(F.linear(h.float(), m.router_w.float(), m.router_b.float()), K, dtype)
    summed = moe_mxfp4(h, routing, *packed(m), residual=res)
    out, normed = moe_mxfp4(h, routing, *packed(m), residual=res, norm=(w, 1e-5))
    assert torch.equal(out, summed)
    want = rmsnorm_reference(summed, w, 1e-5)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(normed, want, **tol)
    assert not torch.allclose(normed, rmsnorm_reference(summed, w * 2, 1e-5), **tol)  # the weight is applied
    with pytest.raises(ValueError, match="residual"):
        moe_mxfp4(h, routing, *packed(m), norm=(w, 1e-5))
    empty = moe_mxfp4(h[:0], routing[0][:0], *packed(m), residual=res[:0], norm=(w, 1e-5))
    assert [t.shape for t in empty] == [(0, H), (0, H)]


@pytest.mark.parametrize("path", ["mma", "gemv", "rs"])
@pytest.mark.parametrize("with_norm,chunk,tail_g", [(True, None, 1), (False, None, 1), (True, 16, 1), (True, 16, 2),
                                                    (True, 16, 4), (False, 16, 4)])
def test_combine_as_the_w2_tail_equals_its_own_launch(path, with_norm, chunk, tail_g, monkeypatch):
    """Up to TAIL_MAX_ROWS rows the combine is the W2 launch's tail (kernels.moe_combine: the last of its
    programs, spare tiles included, combines every token); the same bits as the combine's own launch (which
    holds a normed row in one pass), also where the tail takes a row in several chunks (chunk 16: 4 passes
    of one, 2 of two) or holds it too (W2's TAIL_G 4). TAIL_G applies to one token only (kernels.moe)."""
    from kernels import moe_combine
    if chunk:
        monkeypatch.setattr(moe_combine, "CHUNK", chunk)
    from kernels import _triton, tuned
    from kernels.moe_configs import default_config, gemv_configs, rs_configs
    dtype = torch.float32 if path == "mma" else torch.bfloat16
    from kernels.moe_combine import TAIL_MAX_ROWS
    n = 1 if tail_g > 1 else TAIL_MAX_ROWS
    m, h = moe_module(dtype), tokens(n, seed=14, dtype=dtype)
    res = tokens(n, seed=15, dtype=dtype)
    w = torch.rand(H, generator=torch.Generator().manual_seed(16)) + 0.5
    idx, rw = route(F.linear(h.float(), m.router_w.float(), m.router_b.float()), K, dtype)
    if n > 1:
        idx[-1] = E  # a token no expert takes (a graph's padding row): its sum is the residual alone
    g2l = torch.cat([torch.arange(E), torch.tensor([-1])])
    kw = dict(global_to_local=g2l, residual=res, norm=(w, 1e-5) if with_norm else None)
    forced = {"mma": {kn: default_config(0, E, True) for kn in ("moe_w1", "moe_w2")}, "gemv": gemv_configs(True),
              "rs": rs_configs(True)}[path]
    forced["moe_w2"] = dict(forced["moe_w2"], TAIL_G=tail_g)
    with tuned.forced(forced):
        with _triton.capturing() as launches:
            moe_mxfp4(h, (idx, rw), *packed(m), **kw)
        names = [getattr(k, "fn", k).__name__ for k, *_ in launches]
        assert launches[-1][3]["TAIL_G"] == (tail_g if chunk else 1)  # H = 64 is one chunk of 1,024
        tail = moe_mxfp4(h, (idx, rw), *packed(m), **kw)
        monkeypatch.setenv("GPTOSS_GATE_MAX_ROWS", "0")
        apart = moe_mxfp4(h, (idx, rw), *packed(m), **kw)
    assert "_combine_kernel" not in names and names[-1].startswith("_w2_"), names
    for a, b in zip(tail if with_norm else (tail,), apart if with_norm else (apart,)):
        assert torch.equal(a, b)
    if n > 1:
        assert torch.equal((tail[0] if with_norm else tail)[-1], res[-1])

    def launched(rows):
        with tuned.forced(forced), _triton.capturing() as launches:
            moe_mxfp4(tokens(rows, dtype=dtype), (idx[:1].expand(rows, -1), rw[:1].expand(rows, -1)), *packed(m),
                      **dict(kw, residual=tokens(rows, seed=3, dtype=dtype)))
        return getattr(launches[-1][0], "fn", launches[-1][0]).__name__, launches[-1][3]
    monkeypatch.delenv("GPTOSS_GATE_MAX_ROWS")
    name, kwargs = launched(TAIL_MAX_ROWS)
    assert name.startswith("_w2_") and kwargs["TAIL_G"] == 1  # past one token the tail takes a chunk a pass
    assert launched(TAIL_MAX_ROWS + 1)[0] == "_combine_kernel"  # one row more: the combine's own launch
    assert not _triton.tickets(h.device, 1).any()


@pytest.mark.parametrize("split1,split2", [(2, 3), (3, 1), (1, 2)])
@pytest.mark.parametrize("n", [1, 5])
def test_mma_tiles_split_over_k_match_the_whole_k(split1, split2, n):
    """SPLIT_K (kernels.tune may pick it for a decode step's few tiles): W1's last split to finish sums the
    partials and applies the bias and SwiGLU; W2's splits land in slabs of y that the combine sums (its
    W2 tail at 1 row, its own launch at 5). 3 splits of H = I = 64 at BLOCK_K 32 leave one empty."""
    from kernels import _triton, tuned
    m, h = moe_module(), tokens(n, seed=21)
    res = tokens(n, seed=22)
    w = torch.rand(H, generator=torch.Generator().manual_seed(23)) + 0.5
    routing = route(F.linear(h, m.router_w, m.router_b), K)
    ref, ref_normed = moe_mxfp4(h, routing, *packed(m), residual=res, norm=(w, 1e-5))
    base = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    with tuned.forced({"moe_w1": dict(base, SPLIT_K=split1), "moe_w2": dict(base, SPLIT_K=split2)}):
        out, normed = moe_mxfp4(h, routing, *packed(m), residual=res, norm=(w, 1e-5))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed, ref_normed, rtol=1e-5, atol=1e-5)
    assert not _triton.tickets(h.device, 1).any()


def test_empty_batch():
    m = moe_module()
    out = moe_mxfp4(torch.zeros(0, H), torch.zeros(0, E), *packed(m))
    assert out.shape == (0, H)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_covers_each_local_pair_once_in_expert_order(block_m):
    g = torch.Generator().manual_seed(block_m)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(13)])
    g2l = torch.tensor([-1, 0, 1, -1, 2, 3, -1, 4])
    sorted_ids, tile_e, valid = align(idx, g2l, 5, block_m)
    P = idx.numel()
    local = g2l[idx.flatten()]
    assert torch.equal(valid, local >= 0)
    assert sorted_ids.numel() == tile_e.numel() * block_m
    real = sorted_ids[sorted_ids < P]
    assert sorted(real.tolist()) == (local >= 0).nonzero().squeeze(1).tolist()
    for t, e in enumerate(tile_e.tolist()):
        ids = sorted_ids[t * block_m:(t + 1) * block_m]
        ids = ids[ids < P]
        if e < 0:
            assert ids.numel() == 0
        else:
            assert ids.numel() > 0 and bool((local[ids.long()] == e).all())
    used = tile_e[tile_e >= 0]
    assert torch.equal(used, used.sort().values)  # tiles in expert order, spare tiles at the end


def _align_case(seed):
    """A random routing: P = 1..300 pairs, n_local 1/8/16/128, block_m 16/32/64, maybe an EP map."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    n_local, bm, k = pick([1, 8, 16, 128]), pick([16, 32, 64]), pick([1, 2, 4])
    n = int(torch.randint(1, 300 // k + 1, (1,), generator=g))
    mapped = seed % 2 == 1
    n_global = 2 * n_local + 3 if mapped else n_local
    g2l = None
    if mapped:  # n_local of the n_global experts are here, in a random order; the rest map to -1
        g2l = torch.full((n_global,), -1, dtype=torch.long)
        g2l[torch.randperm(n_global, generator=g)[:n_local]] = torch.arange(n_local)
    kind = seed % 5
    if kind == 0:    # skewed: one expert takes every pair
        idx = torch.full((n, k), int(torch.randint(n_global, (1,), generator=g)))
    elif kind == 1:  # skewed: a few hot experts
        hot = torch.randint(n_global, (3,), generator=g)
        idx = hot[torch.randint(3, (n, k), generator=g)]
    else:
        idx = torch.randint(n_global, (n, k), generator=g)
    return idx, g2l, n_local, bm


def _runs_sorted(sorted_ids: torch.Tensor, tile_expert: torch.Tensor, bm: int) -> torch.Tensor:
    """sorted_ids with each expert's slots (its consecutive tiles) in ascending order: align_triton's pairs
    may take their expert's slots in any order on a GPU (atomic cursors), and that is all that may differ."""
    out = sorted_ids.clone()
    t = 0
    while t < len(tile_expert):
        end = t
        while end < len(tile_expert) and tile_expert[end] == tile_expert[t]:
            end += 1
        out[t * bm:end * bm] = out[t * bm:end * bm].sort().values
        t = end
    return out


def test_runs_sorted_orders_within_an_expert_only():
    te = torch.tensor([0, 0, 2, -1], dtype=torch.int32)
    ids = torch.tensor([5, 1, 9, 3, 8, 7, 6, 6], dtype=torch.int32)
    assert _runs_sorted(ids, te, 2).tolist() == [1, 3, 5, 9, 7, 8, 6, 6]


@pytest.mark.parametrize("seed", range(40))
def test_align_triton_equals_torch_align(seed):
    idx, g2l, n_local, bm = _align_case(seed)
    ref = align(idx, g2l, n_local, bm)
    out = align_triton(idx, g2l, n_local, bm)
    assert out[0].dtype == ref[0].dtype == out[1].dtype == ref[1].dtype == torch.int32
    assert out[0].shape == ref[0].shape and out[1].shape == ref[1].shape
    assert torch.equal(_runs_sorted(out[0], out[1], bm), ref[0]), (seed, idx.shape, n_local, bm)
    assert torch.equal(out[1], ref[1])
    assert out[2].dtype == torch.int8 and torch.equal(out[2].bool(), ref[2])


@pytest.mark.parametrize("rows", [1, 3])
def test_align_also_makes_the_gemv_activations(rows):
    """With x and x16, the align program also writes fp16(x * 2**-XS) (strided rows, past 1024 values),
    and sorts exactly as without them."""
    from kernels.moe_gemv import _XS
    idx, g2l, n_local, bm = _align_case(3)
    wide = torch.randn(rows, 1200) * 100
    x, x16 = wide[:, 100:1100], torch.full((rows, 1000), float("nan"), dtype=torch.float16)
    out = align_triton(idx, g2l, n_local, bm, x, x16)
    assert all(torch.equal(a, b) for a, b in zip(out, align_triton(idx, g2l, n_local, bm)))
    assert torch.equal(x16, (x * 2.0 ** -_XS).half())


@pytest.mark.parametrize("n_local,g2l", [(8, None), (5, torch.tensor([-1, 0, 1, -1, 2, 3, -1, 4]))])
def test_align_triton_edge_cases(n_local, g2l):
    n_global = 8
    cases = [torch.zeros(1, 1, dtype=torch.long),                       # one pair
             torch.full((1, 4), 3),                                     # absent (under the map) or one expert
             torch.tensor([[7, 5, 2, 0]]),
             torch.arange(n_global).repeat(40, 1)[:, :4],               # exact multiples of block_m
             torch.arange(64 * 4).reshape(64, 4) % n_global]
    for idx in cases:
        for bm in (4, 16, 32):
            ref = align(idx, g2l, n_local, bm)
            out = align_triton(idx, g2l, n_local, bm)
            assert torch.equal(out[1], ref[1]), (idx.tolist(), bm)
            assert torch.equal(_runs_sorted(out[0], out[1], bm), ref[0]), (idx.tolist(), bm)
            assert torch.equal(out[2].bool(), ref[2])


@pytest.mark.parametrize("path", ["mma", "gemv", "rs"])
def test_l2_prefetch_changes_no_bit(path):
    """L2PF (each expert's first tile bulk-prefetches its program's rows into L2) only asks for bytes: the
    same output as without it, on every path, with an expert taking every token (tiles after its first
    ask for nothing), and the launches carry it."""
    from kernels import _triton, tuned
    from kernels.moe_configs import gemv_configs, rs_configs
    dtype = torch.float32 if path == "mma" else torch.bfloat16
    base = {"mma": {k: dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32) for k in ("moe_w1", "moe_w2")},
            "gemv": gemv_configs(True), "rs": rs_configs(True)}[path]
    m, x = moe_module(dtype), tokens(20, seed=21, dtype=dtype)
    idx, w = moe_module().route(x.float())
    idx[:, 0] = 2
    run = lambda: moe_mxfp4(x, (idx, w.to(dtype)), *packed(m))  # noqa: E731
    with tuned.forced(base):
        plain = run()
    with tuned.forced({k: dict(c, L2PF=True) for k, c in base.items()}):
        with _triton.capturing() as launches:
            run()
        pf = run()
    assert torch.equal(plain, pf)
    assert [kw.get("L2PF") for k, _, _, kw in launches if getattr(k, "fn", k).__name__.startswith(("_w1", "_w2"))
            ] == [True, True]
