"""The CUDA path, run on the meta device: a stand-in for a GPU that holds no data. Any host read of
a device value (.item(), bool(t), .tolist(), nonzero, boolean-mask indexing) raises there, and so
does any CPU tensor meeting a device tensor. So a forward that completes on meta, with the Triton
launches recorded instead of run, has no host syncs (a CUDA graph can capture it, and overlapped
scheduling is never stalled by it) and creates no tensor on the wrong device."""

import pytest
import torch

from engine.executor import CacheSpec, LocalExecutor, null_step, pad_decode_step, run_step
from engine.sampler import SamplingParams
from engine.sampler_state import SampleSpec
from kernels import _triton
from models import load_model

pytest.importorskip("triton")
BS = 16


@pytest.fixture(scope="module")
def meta_executor(tiny_ckpt):
    m = load_model(tiny_ckpt, torch.bfloat16, "meta", keep_mxfp4=True)
    groups = tuple("sliding" if m.config.window(i) else "full" for i in range(m.config.num_hidden_layers))
    return LocalExecutor(m, CacheSpec(BS, {"full": 64, "sliding": 64}, groups), cuda_graphs=False)


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")  # with the suite's TRITON_INTERPRET=1: meta counts as a GPU


def _decode_step(n: int, spec: CacheSpec):
    """n decoding sequences of different lengths, in their own blocks."""
    ctx = [3 + 7 * i for i in range(n)]
    tables, slots, nxt = {g: [] for g in spec.blocks}, {g: [] for g in spec.blocks}, 1
    for c in ctx:
        k = -(-c // BS)
        for g in spec.blocks:
            tables[g].append(list(range(nxt, nxt + k)))
            slots[g].append((nxt + (c - 1) // BS) * BS + (c - 1) % BS)
        nxt += k
    w = max(len(t) for t in tables["full"])
    from engine.executor import StepInput
    return StepInput(torch.arange(n), torch.tensor([c - 1 for c in ctx]), torch.arange(n + 1), torch.tensor(ctx),
                     {g: torch.tensor([t + [0] * (w - len(t)) for t in tables[g]]) for g in spec.blocks},
                     {g: torch.tensor(slots[g]) for g in spec.blocks}, torch.arange(n))


@pytest.mark.parametrize("n,bucket,gate", [(1, 1, True), (3, 4, True), (5, 8, True), (5, 8, False)])
def test_graph_forward_has_no_host_reads(meta_executor, n, bucket, gate, monkeypatch):
    """gate: kernels.moe_gate's one launch takes the decode step's MoE front half (the default up to
    GATE_MAX_ROWS rows), and up to 2 rows W2's tail the combine; without, the rmsnorm, router, routing,
    align and combine launches."""
    if not gate:
        monkeypatch.setenv("GPTOSS_GATE_MAX_ROWS", "0")
    ex = meta_executor
    padded = pad_decode_step(_decode_step(n, ex.spec), bucket, ex.graph_width, BS, full_width=True)
    inputs, rows = ex._graph_inputs(padded, n)
    with _triton.recording() as launches:
        hidden = ex._graph_forward(inputs)
        logits = ex.model.compute_logits(hidden[rows])
    assert hidden.device.type == "meta" and hidden.shape == (bucket, ex.model.config.hidden_size)
    assert logits.shape == (n, ex.model.config.vocab_size)
    kernels = {fn.__name__ for fn, _, _ in launches}
    # the few-row fusions (kernels.moe_gate): the gate, and up to 2 rows the combine as the W2 launch's tail
    front = {"_gate_kernel"} if gate else {"_rmsnorm_kernel", "_route_kernel", "_align_kernel"}
    combine = set() if gate and bucket <= 2 else {"_combine_kernel"}
    assert {"_attn_kernel", "_w1_kernel", "_w2_kernel"} | front | combine <= kernels
    assert not ({"_gate_kernel", "_route_kernel", "_align_kernel", "_combine_kernel"} - front - combine) & kernels


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_eager_prefill_and_sampling_have_no_host_reads(meta_executor, tokens):
    ex = meta_executor
    with _triton.recording():
        logits = run_step(ex.model, ex.cache, ex.spec, null_step(tokens, ex.spec), num_real_tokens=tokens)
        for p in (SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9, top_k=50),
                  SamplingParams(temperature=1.0, logprobs=True)):
            out = ex.sampling.sample(logits, SampleSpec([p], seeds=[None]))
            assert out.token_ids.device.type == "meta"


@pytest.mark.parametrize("preset", ["gpt-oss-20b", "gpt-oss-120b"])
def test_full_size_models_on_meta(preset):
    """The real shapes through the whole GPU path, in seconds and no memory: weights drawn as shapes
    (RandomCheckpoint on meta), a decode graph forward at batch 64 with the engine's table width,
    an 8192-token eager prefill, and greedy sampling over the 201k vocabulary."""
    from models.checkpoint import RandomCheckpoint
    m = load_model(RandomCheckpoint(preset, "mxfp4", device="meta"), torch.bfloat16, "meta", keep_mxfp4=True)
    nbytes = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    assert (12e9 < nbytes < 14.5e9) if preset == "gpt-oss-20b" else (60e9 < nbytes < 66e9), nbytes
    groups = tuple("sliding" if m.config.window(i) else "full" for i in range(m.config.num_hidden_layers))
    ex = LocalExecutor(m, CacheSpec(BS, {"full": 8192, "sliding": 2048}, groups), cuda_graphs=False)
    padded = pad_decode_step(_decode_step(40, ex.spec), 64, ex.graph_width, BS, full_width=True)
    inputs, rows = ex._graph_inputs(padded, 40)
    with _triton.recording() as launches:
        hidden = ex._graph_forward(inputs)
        logits = run_step(m, ex.cache, ex.spec, null_step(8192, ex.spec), num_real_tokens=8192)
        out = ex.sampling.sample(m.compute_logits(hidden[rows]), SampleSpec([SamplingParams(temperature=0)] * 40,
                                                                            seeds=[None] * 40))
    assert hidden.shape == (64, 2880) and logits.shape == (1, 201088) and out.token_ids.shape == (40,)
    # per layer: the MLP norm (with the residual add), rope (into the cache; the decode's attention does it
    # itself), attention, route, align, w1, w2, the combine (adding the residual and applying the next norm);
    # once a forward: the first norm
    assert len(launches) == (7 + 8) * m.config.num_hidden_layers + 2


def variants(launches) -> set:
    """The kernel variants launched: kernel, constexprs and launch options (what a compilation is keyed by)."""
    return {(fn.__name__, tuple(sorted((k, v) for k, v in kw.items() if not isinstance(v, torch.Tensor))))
            for fn, _, kw in launches}


def test_warmup_compiles_what_a_real_prefill_launches(meta_executor):
    """The warm-up exists so that no kernel variant compiles in the middle of serving (seconds on a
    GPU). Its prefill steps must launch every variant a real prefill does: same kernels, same
    constexprs and launch options (a real prefill has no padding mask, so neither may they)."""
    ex = meta_executor
    with _triton.recording() as warm:
        ex.warmup(128)
    seen = variants(warm)
    for tokens in (3, 37, 100):
        with _triton.recording() as real:
            run_step(ex.model, ex.cache, ex.spec, null_step(tokens, ex.spec))
        missing = variants(real) - seen
        assert not missing, (tokens, missing)


def _verify_step(n: int, draft: int, spec: CacheSpec):
    """n sequences verifying a predicted output's draft (engine.prediction): each brings its own token and
    `draft` more, after a context of its own, and samples every one of them."""
    from engine.executor import StepInput
    q = draft + 1
    ctx = [20 + 9 * i for i in range(n)]
    tables, slots, nxt, pos = {g: [] for g in spec.blocks}, {g: [] for g in spec.blocks}, 1, []
    for c in ctx:
        k = -(-c // BS)
        for g in spec.blocks:
            tables[g].append(list(range(nxt, nxt + k)))
            slots[g].extend((nxt + p // BS) * BS + p % BS for p in range(c - q, c))
        pos.extend(range(c - q, c))
        nxt += k
    w = max(len(t) for t in tables["full"])
    return StepInput(torch.zeros(n * q, dtype=torch.long), torch.tensor(pos), torch.arange(0, n * q + 1, q),
                     torch.tensor(ctx), {g: torch.tensor([t + [0] * (w - len(t)) for t in tables[g]])
                                         for g in spec.blocks},
                     {g: torch.tensor(slots[g]) for g in spec.blocks}, torch.arange(n * q))


@pytest.mark.parametrize("n,draft", [(1, 8), (4, 3)])
def test_warmup_compiles_what_a_draft_verifying_step_launches(meta_executor, n, draft):
    """A step verifying drafts runs eagerly, as a prefill of several short queries over a cached context
    does; the warm-up's variants must cover it too, and it must read nothing back to the host."""
    ex = meta_executor
    with _triton.recording() as warm:
        ex.warmup(128)
    with _triton.recording() as real:
        logits = run_step(ex.model, ex.cache, ex.spec, _verify_step(n, draft, ex.spec))
    assert logits.shape == (n * (draft + 1), ex.model.config.vocab_size) and logits.device.type == "meta"
    assert {"_w1_kernel", "_w2_kernel"} <= {fn.__name__ for fn, _, _ in real}  # the Triton path ran
    missing = variants(real) - variants(warm)
    assert not missing, missing
