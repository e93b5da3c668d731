"""bench.step_profile: kernels into categories, trace events into per-step time, time beside bytes."""

import pytest
import torch

from bench import step_profile as sp
from kernels import _triton

pytest.importorskip("triton")


def test_every_kernel_a_decode_step_launches_has_a_category(tiny_ckpt, monkeypatch):
    """The names come from the GPU path's own launches (recorded on meta), so a kernel added or renamed
    without a category fails here rather than landing in `other` on the GPU."""
    from engine.executor import CacheSpec, LocalExecutor, empty_step, pad_decode_step
    from engine.sampler import SamplingParams
    from engine.sampler_state import SampleSpec
    from models import load_model
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    m = load_model(tiny_ckpt, torch.bfloat16, "meta", keep_mxfp4=True)
    groups = tuple("sliding" if m.config.window(i) else "full" for i in range(m.config.num_hidden_layers))
    ex = LocalExecutor(m, CacheSpec(16, {"full": 64, "sliding": 64}, groups), cuda_graphs=False)
    inputs, _ = ex._graph_inputs(pad_decode_step(empty_step(ex.spec.blocks), 4, ex.graph_width, 16,
                                                    full_width=True), 4)
    with _triton.recording() as launches:
        logits = m.compute_logits(ex._graph_forward(inputs))  # the 4 padded rows stand for 4 sequences
        ex.sampling.sample(logits, SampleSpec([SamplingParams(temperature=1.0)] * 4, seeds=[None] * 4))
    names = {fn.__name__ for fn, _, _ in launches}
    cats = {n: sp.categorize(n) for n in names}
    assert "other" not in cats.values(), cats
    assert cats["_w1_kernel"] == "moe w1" and cats["_w2_kernel"] == "moe w2"
    assert cats["_attn_kernel"] == "attention" and cats["_sample_kernel"] == "sampling"
    assert {"rmsnorm", "moe route/align/combine"} <= set(cats.values())
    assert "rope + kv write" not in cats.values()  # a decode step rotates inside the attention launch


def test_every_triton_kernel_of_the_project_has_a_category():
    """Tuned paths a default decode step never launches (gemv, rs, split-K linears) included."""
    import importlib
    import pkgutil
    import kernels
    cats = sp.triton_categories()
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"kernels.{info.name}")
        for n in getattr(mod, "_KERNELS", ()):
            if n.endswith("_kernel"):
                assert cats.get(n, "other") != "other", (info.name, n)


@pytest.mark.parametrize("name,cat,expect", [
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "kernel", "linear"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_execute_kernel__5x_cublas", "kernel", "linear"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4>", "kernel", "linear"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "kernel", "comm"),
    ("Memcpy DtoD (Device -> Device)", "gpu_memcpy", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "kernel", "other"),
    ("aten::addmm", "cpu_op", "linear"),
    ("_linear_kernel", "kernel", "linear"),  # kernels.linear, where tuned
    ("_x16_kernel", "kernel", "moe w1"),  # the gemv W1's fp16 activations
    ("aten::index_add_", "cpu_op", "other"),
])
def test_vendor_kernel_names(name, cat, expect):
    assert sp.categorize(name, cat) == expect


def _ev(name, ts, dur, cat="kernel", tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}


def test_device_events_cuda_kernels_and_cpu_top_level_ops():
    trace = {"traceEvents": [
        _ev("aten::linear", 0, 10, "cpu_op"), _ev("aten::addmm", 1, 8, "cpu_op"),   # child of linear
        _ev("aten::add", 12, 2, "cpu_op"), _ev("aten::mul", 3, 2, "cpu_op", tid=2),  # another thread
        _ev("cudaGraphLaunch", 0, 1, "cuda_runtime"), _ev("_w1_kernel", 2, 5), _ev("Memset", 7, 1, "gpu_memset"),
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 0}]}
    assert [e["name"] for e in sp.device_events(trace, on_cuda=True)] == ["_w1_kernel", "Memset"]
    assert sorted(e["name"] for e in sp.device_events(trace, on_cuda=False)) == ["aten::add", "aten::linear",
                                                                                  "aten::mul"]


def test_busy_time_counts_overlap_once():
    assert sp.busy_us([_ev("a", 0, 10), _ev("b", 5, 10), _ev("c", 30, 5), _ev("d", 31, 1)]) == 20


def test_summary_puts_time_beside_bytes():
    events = [_ev("_w1_kernel", 0, 100), _ev("_w1_kernel", 200, 100), _ev("nvjet_x", 100, 50), _ev("nvjet_x", 300, 50),
              _ev("_route_kernel", 150, 10), _ev("_route_kernel", 350, 10)]
    parts = {"experts w1": 1e6, "dense weights": 2e5, "unembedding": 3e5, "kv read": 7.0}
    s = sp.summarize(events, steps=2, parts=parts, bandwidth=20e9)
    assert s["kernels_per_step"] == 3 and s["busy_ms_per_step"] == pytest.approx(0.16)
    rows = {r["category"]: r for r in s["categories"]}
    assert [r["category"] for r in s["categories"]] == ["moe w1", "linear", "moe route/align/combine"]
    w1 = rows["moe w1"]
    assert w1["ms_per_step"] == pytest.approx(0.1) and w1["GBps"] == pytest.approx(10.0)  # 1 MB in 0.1 ms
    assert w1["of_copy_bandwidth"] == pytest.approx(0.5) and w1["share"] == pytest.approx(200 / 320)
    assert rows["linear"]["bytes_per_step"] == 5e5 and rows["linear"]["GBps"] == pytest.approx(10.0)
    assert rows["moe route/align/combine"]["GBps"] is None
    assert sum(r["share"] for r in s["categories"]) == pytest.approx(1)
    top = s["top_kernels"][0]
    assert top["name"] == "_w1_kernel" and top["calls_per_step"] == 1 and top["us_per_call"] == 100


def test_roofline_parts_sum_to_the_step_bytes():
    from bench.roofline import Roofline
    from models.checkpoint import PRESETS
    roof = Roofline(PRESETS["gpt-oss-120b"])
    parts = roof.step_parts(64, [1024] * 64, 64)
    assert sum(parts.values()) == roof.step_bytes(64, [1024] * 64, 64)
    # every part a category claims exists, and the experts' split is w1:w2 = 2:1 in weights
    assert {p for ps in sp.PART_OF.values() for p in ps} <= set(parts)
    assert parts["experts w1"] / parts["experts w2"] == pytest.approx(2, rel=0.01)
