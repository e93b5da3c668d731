"""The model and engine run the Triton kernels through kernels.dispatch (interpreter on CPU).

* GPTOSS_KERNELS=triton: a whole tiny-model forward over paged metadata (chunked prefill mixed
  with decode, sliding-window layers with freed blocks, packed MXFP4 experts) matches the torch
  path, every kernel having run; an engine run gives the same greedy tokens.
* GPTOSS_KERNELS=auto on CPU: no kernel is reached, whatever the model holds.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.core import EngineConfig, LLMEngine, output_tokens  # noqa: E402
from engine.request import GenerateRequest  # noqa: E402
from engine.sampler import SamplingParams  # noqa: E402
from kernels import dispatch  # noqa: E402
from models import load_model  # noqa: E402
from models.attention import NULL_BLOCK, KVCache, PagedMetadata  # noqa: E402

BS = 4
# (tokens of seq 0, tokens of seq 1) per step: prefill chunks, a chunk beside a decode, then decodes.
# Seq 0 reaches 23 tokens > the tiny window (16), so sliding layers mask by window and read
# tables whose first block was freed (NULL_BLOCK).
PLAN = [(9, 0), (11, 5), (1, 7), (1, 1), (1, 1)]
LENS = (23, 14)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packed_model(tiny_ckpt):
    m = load_model(tiny_ckpt, keep_mxfp4=True)
    assert all(b.moe.packed for b in m.blocks)
    return m


@pytest.fixture
def spy(monkeypatch):
    """Counts the dispatcher's calls (still running them)."""
    calls = {"paged_attention": 0, "moe": 0, "moe_block": 0, "rmsnorm": 0}
    for name in calls:
        real = getattr(dispatch, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(dispatch, name, counted)
    return calls


def paged_run(m, cache_dtype=torch.float32) -> list[torch.Tensor]:
    """Runs PLAN through PagedMetadata as the engine builds it; the logits of every step."""
    cfg = m.config
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 199998, (n,), generator=g) for n in LENS]
    groups = ["sliding" if cfg.window(i) else "full" for i in range(cfg.num_hidden_layers)]
    n_blocks = {"full": 16, "sliding": 12}
    cache = KVCache.allocate(cfg.num_hidden_layers, [n_blocks[x] for x in groups], BS,
                             cfg.num_key_value_heads, cfg.head_dim, cache_dtype)
    free = {k: list(range(1, n)) for k, n in n_blocks.items()}
    tables = {"full": [[], []], "sliding": [[], []]}
    done, outs = [0, 0], []
    for step in PLAN:
        rows, ids, pos, qs, ctx, slot = [], [], [], [0], [], {"full": [], "sliding": []}
        for b, n in enumerate(step):
            if n == 0:
                continue
            p = list(range(done[b], done[b] + n))
            for grp, t in tables.items():
                while len(t[b]) * BS < done[b] + n:
                    t[b].append(free[grp].pop(0))
                slot[grp] += [t[b][i // BS] * BS + i % BS for i in p]
            rows.append(b)
            ids.append(seqs[b][done[b]:done[b] + n])
            pos += p
            done[b] += n
            qs.append(qs[-1] + n)
            ctx.append(done[b])
        width = max(len(tables[x][b]) for x in tables for b in rows)
        bt = {x: torch.tensor([tables[x][b] + [NULL_BLOCK] * (width - len(tables[x][b])) for b in rows])
              for x in tables}
        meta = PagedMetadata(cache, torch.tensor(qs), torch.tensor(ctx), bt,
                             {k: torch.tensor(v) for k, v in slot.items()}, groups)
        outs.append(m.compute_logits(m(torch.cat(ids), torch.tensor(pos), meta)))
        for b in rows:  # release sliding blocks no later query sees (the engine's BlockManager does this)
            t = tables["sliding"][b]
            for i, blk in enumerate(t):
                if blk != NULL_BLOCK and (i + 1) * BS <= done[b] - cfg.sliding_window + 1:
                    free["sliding"].append(blk)
                    t[i] = NULL_BLOCK
    assert list(done) == list(LENS) and NULL_BLOCK in tables["sliding"][0]
    return outs


@pytest.mark.parametrize("gate_rows", ["", "8", "0"])
def test_triton_forward_over_paged_metadata_matches_torch(packed_model, spy, monkeypatch, gate_rows):
    """gate_rows (GPTOSS_GATE_MAX_ROWS): the fused gate (kernels.moe_gate) takes steps of up to that many
    tokens: every step of PLAN by default, none at 0, the 2 of more than 8 tokens not at 8."""
    monkeypatch.setenv("GPTOSS_KERNELS", "torch")
    ref = paged_run(packed_model)
    assert not any(spy.values())  # the torch mode never reaches the dispatcher
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    monkeypatch.setenv("GPTOSS_GATE_MAX_ROWS", gate_rows)
    got = paged_run(packed_model)
    layers, steps = packed_model.config.num_hidden_layers, len(PLAN)
    fused = sum(sum(step) <= int(gate_rows or 16) for step in PLAN)
    assert 0 < fused < steps or gate_rows != "8"
    # per layer and step: one attention, one MoE (its combine adds the residual and applies the next
    # attention norm, or the final one), and the fused residual+MLP norm unless the gate (moe_block) holds
    # it; plus the first attention norm per step
    assert spy == {"paged_attention": layers * steps, "moe": layers * (steps - fused), "moe_block": layers * fused,
                   "rmsnorm": layers * (steps - fused) + steps}
    # fp32 throughout: the kernels differ from the references only in summation order (tiled dots,
    # online softmax with exp2; MXFP4 is decoded exactly in registers), a few ulps per op. Through
    # two layers that measured <= 6e-7 of the logits' max |value| (~5, std ~1) on every step here;
    # 1e-5 of it leaves 15x headroom for other BLAS builds, while any wiring error (a wrong table,
    # window, slot, expert or residual) moves logits by O(1).
    for r, x in zip(ref, got):
        scale = r.abs().max().item()
        assert (x - r).abs().max().item() <= 1e-5 * scale
        assert torch.equal(x.argmax(-1), r.argmax(-1))


def test_triton_forward_over_an_fp8_cache_matches_torch(packed_model, monkeypatch):
    """EngineConfig.kv_cache_dtype "fp8": the prefill chunks' rope_into_cache launch and the decode steps'
    attention launch store e4m3 bytes (kernels.rope._e4m3) and read them back; the torch path rounds with
    torch's cast. The same fp8 values in both caches leave the logits as close as with an fp32 cache."""
    monkeypatch.setenv("GPTOSS_KERNELS", "torch")
    ref = paged_run(packed_model, torch.float8_e4m3fn)
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    got = paged_run(packed_model, torch.float8_e4m3fn)
    for r, x in zip(ref, got):
        assert (x - r).abs().max().item() <= 1e-5 * r.abs().max().item()
        assert torch.equal(x.argmax(-1), r.argmax(-1))


def test_triton_forward_with_a_top3_router_matches_torch(ckpt_root, spy, monkeypatch):
    """A checkpoint whose experts_per_token is not a power of 2 (the route and gate kernels' k lanes are
    padded to one): the same logits as the torch path, through both the gate and the unfused routing."""
    from models.checkpoint import PRESETS, make_checkpoint
    cfg = PRESETS["tiny"].model_copy(update=dict(num_experts_per_tok=3))
    m = load_model(make_checkpoint(ckpt_root / "tiny-top3", cfg, "hf", "mxfp4", seed=0), keep_mxfp4=True)
    assert m.blocks[0].moe.top_k == 3
    monkeypatch.setenv("GPTOSS_KERNELS", "torch")
    ref = paged_run(m)
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    monkeypatch.setenv("GPTOSS_GATE_MAX_ROWS", "8")  # the 2 steps of more than 8 tokens route unfused
    got = paged_run(m)
    assert spy["moe_block"] and spy["moe"]
    for r, x in zip(ref, got):
        assert (x - r).abs().max().item() <= 1e-5 * r.abs().max().item()
        assert torch.equal(x.argmax(-1), r.argmax(-1))


def test_auto_on_cpu_never_reaches_a_kernel(packed_model, monkeypatch):
    import kernels.attention
    import kernels.moe
    import kernels.rmsnorm

    def boom(*a, **kw):
        raise AssertionError("a kernel was called on CPU in auto mode")
    for mod, name in [(dispatch, "paged_attention"), (dispatch, "moe"), (dispatch, "rmsnorm"),
                      (kernels.attention, "paged_attention"), (kernels.moe, "moe_mxfp4"),
                      (kernels.rmsnorm, "rmsnorm_triton")]:
        monkeypatch.setattr(mod, name, boom)
    monkeypatch.setenv("GPTOSS_KERNELS", "auto")
    out = paged_run(packed_model)
    assert all(torch.isfinite(o).all() for o in out)
    # the expert-parallel entry point too
    moe = packed_model.blocks[0].moe
    rows = torch.randn(5, packed_model.config.hidden_size)
    assert moe.run_experts(rows, torch.tensor([0, 3, 3, 7, 1])).shape == rows.shape


def test_run_experts_goes_through_the_kernel(packed_model, spy, monkeypatch):
    """The EP path (rows already sent to this rank, local expert ids, unweighted)."""
    moe = packed_model.blocks[1].moe
    rows = torch.randn(7, packed_model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([2, 0, 7, 2, 5, 5, 2])
    monkeypatch.setenv("GPTOSS_KERNELS", "torch")
    ref = moe.run_experts(rows, ids)
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    got = moe.run_experts(rows, ids)
    assert spy["moe"] == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def greedy_engine_run(model, graph_buckets=None) -> tuple[dict[str, list[int]], LLMEngine]:
    """Three greedy requests through LLMEngine: chunked prefill, then decode steps of 3 sequences.
    graph_buckets: route decode steps through the executor's CUDA-graph path (eager off CUDA)."""
    eng = LLMEngine(model, EngineConfig(block_size=BS, num_blocks=32, max_tokens_per_step=12, max_num_seqs=4))
    if graph_buckets is not None:
        from kernels.cuda_graphs import DecodeGraphRunner
        eng.executor.graphs = DecodeGraphRunner(eng.executor._graph_forward, buckets=graph_buckets)
    g = torch.Generator().manual_seed(11)
    reqs = [GenerateRequest(f"r{i}", torch.randint(0, 199998, (n,), generator=g).tolist(),
                            SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), harmony=False)
            for i, n in enumerate((15, 6, 9))]
    outs = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.add_request(r)
    for _ in range(50):
        if not eng.has_work():
            break
        for o in eng.step():
            outs[o.request_id].append(o)
    assert not eng.has_work()
    return {rid: output_tokens(o) for rid, o in outs.items()}, eng


def test_engine_greedy_tokens_same_with_triton(packed_model, spy, monkeypatch):
    monkeypatch.setenv("GPTOSS_KERNELS", "torch")
    ref, _ = greedy_engine_run(packed_model)
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    monkeypatch.setenv("GPTOSS_GATE_MAX_ROWS", "4")  # decode steps (3 rows) fused, prefill chunks (12) not
    got, _ = greedy_engine_run(packed_model)
    assert spy["paged_attention"] and spy["moe"] and spy["moe_block"] and spy["rmsnorm"]
    assert got == ref and all(len(t) == 3 for t in ref.values())


def test_tuned_decode_kernels_serve_through_the_model(tiny_ckpt, monkeypatch):
    """Where a tuned file picks them (forced here), the decode linears (kernels.linear, through
    dispatch.linear: qkv, o, router, unembedding) and the single-pair expert tiles (kernels.moe_gemv,
    with its fp16 activations) run inside an engine's steps of a bf16 model: every step's logits
    within bf16 rounding of the same run on the untuned Triton path (cuBLAS-style F.linear, MMA tiles)."""
    from kernels import linear as lin, moe, moe_configs, tuned
    m = load_model(tiny_ckpt, dtype=torch.bfloat16, keep_mxfp4=True)
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")

    def run():
        eng = LLMEngine(m, EngineConfig(block_size=BS, num_blocks=32, max_tokens_per_step=12, max_num_seqs=4))
        logits, real = [], eng.executor.execute
        eng.executor.execute = lambda s: logits.append(real(s).float()) or logits[-1]
        g = torch.Generator().manual_seed(5)
        for i, n in enumerate((7, 4)):
            eng.add_request(GenerateRequest(f"r{i}", torch.randint(0, 199998, (n,), generator=g).tolist(),
                                            SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                            harmony=False))
        while eng.has_work():
            eng.step()
        return logits

    launched: list[str] = []
    for mod in (moe, lin):
        real_launch = mod.launch
        monkeypatch.setattr(mod, "launch", lambda k, *a, _r=real_launch, **kw: (
            launched.append(getattr(k, "fn", k).__name__), _r(k, *a, **kw))[1])
    ref = run()
    assert "_linear_kernel" not in launched and "_w1_kernel" in launched
    launched.clear()
    # wide tiles: the interpreter walks the unembedding's 201k rows program by program
    with tuned.forced({"linear": dict(BLOCK_N=1024, BLOCK_K=64), **moe_configs.gemv_configs(True)}):
        got = run()
    assert {"_linear_kernel", "_w1_gemv_kernel", "_w2_gemv_kernel"} <= set(launched)
    assert len(got) == len(ref) >= 3
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        if a.numel():
            assert (a - b).abs().max() <= 3e-2 * b.abs().max() + 1e-3, (a - b).abs().max()
