"""kernels.tune (no GPU here: its --dry-run flow on CPU) and the launchers obeying a tuned-config JSON."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels import tuned  # noqa: E402
from kernels._triton import capturing  # noqa: E402
from kernels.attention import paged_attention, tuning_shape as attn_shape  # noqa: E402
from kernels.moe import moe_mxfp4  # noqa: E402
from kernels.moe_configs import tuning_shape as moe_shape  # noqa: E402
from tests.kernels.cases import DECODE, H, HEAD_DIM, I, KV_HEADS, MIXED, E, TOP_K, attention_step, moe_module, \
    packed, tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_dry_run_tunes_every_family_and_writes_only_to_its_temp_dir(tmp_path):
    before = sorted(tuned.CONFIG_DIR.glob("*")) if tuned.CONFIG_DIR.exists() else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(tuned.ENV, None)
    r = subprocess.run([sys.executable, "-m", "kernels.tune", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "interpreter times, not GPU times" in r.stdout
    assert "| kernel" in r.stdout and "best config" in r.stdout
    (path,) = tmp_path.glob("*.json")
    res = json.loads(path.read_text())
    assert res["dry_run"] and "interpreter" in res["timer"]
    got = {(e["kernel"], e["batch"]) for e in res["entries"]}
    assert got == {(k, b) for k in ("moe_w1", "moe_w2", "gate", "linear") for b in (1, 8)} | {
        ("attn_decode", 1), ("attn_prefill", 8)}
    # qkv and o (the dry run leaves out the unembedding's real vocabulary, and up to 16 rows the router is
    # inside kernels.moe_gate's launch)
    assert len({e["shape"] for e in res["entries"] if e["kernel"] == "linear"}) == 2
    for e in res["entries"]:
        assert e["us"] > 0 and e["default_us"] > 0 and e["check_rel_err"] < 1e-4
        assert e["candidates_timed"] >= 1 and "interpreter" in e["timer"]
    # at one row the linears' sweep also times a GEMV tile (kernels.linear), compiled and checked like the rest
    assert all(e["candidates_timed"] == 3 and not e["rejected"] for e in res["entries"]
               if e["kernel"] == "linear" and e["batch"] == 1)
    assert {e["shape"] for e in res["entries"] if e["kernel"] == "attn_decode"} == {
        attn_shape(4, KV_HEADS, HEAD_DIM, 16, w, torch.float32) for w in (16, None)}
    after = sorted(tuned.CONFIG_DIR.glob("*")) if tuned.CONFIG_DIR.exists() else []
    assert after == before
    # and it refuses to put interpreter times where the launchers look
    r = subprocess.run([sys.executable, "-m", "kernels.tune", "--dry-run", "--out", str(tuned.CONFIG_DIR)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "interpreter times" in r.stderr


def test_router_is_tuned_only_past_the_fused_gate():
    from kernels.moe_gate import GATE_MAX_ROWS
    from kernels._tune_plans import tasks
    got = {(t.n, t.linear) for t in tasks(["gpt-oss-120b"], [1, GATE_MAX_ROWS, 64], {"linear"}, 8192)}
    assert ("router" not in {w for n, w in got if n <= GATE_MAX_ROWS}) and (64, "router") in got
    assert {(1, "qkv"), (1, "o"), (1, "unembed"), (64, "qkv")} <= got


def test_gate_sweep_and_its_check(monkeypatch):
    """The gate is tuned at decode steps only (up to GATE_MAX_ROWS rows); its sweep holds the one-pass rows,
    session 27's layout and the default, at <= 128 router weights a thread; its check fails on a wrong
    routing (the mismatch term) as well as on a wrong norm."""
    from kernels import _tune_cases as cases
    from kernels._tune_plans import plan_task, tasks
    from kernels.moe_gate import GATE_MAX_ROWS, gate_config
    from models.checkpoint import PRESETS
    big = PRESETS["gpt-oss-120b"]
    got = [(t.family, t.n) for t in tasks(["gpt-oss-120b"], [1, GATE_MAX_ROWS, 64], {"gate"}, 8192)]
    assert got == [("gate", 1), ("gate", GATE_MAX_ROWS)]
    (sweep,) = plan_task(tasks(["gpt-oss-120b"], [1], {"gate"}, 8192)[0], torch.bfloat16, False, 0).sweeps
    cands = sweep.cands
    assert gate_config(big.hidden_size, big.num_local_experts) in cands
    assert dict(EB=4, BLOCK_H=1024, num_warps=4) in cands and any(c["BLOCK_H"] >= big.hidden_size for c in cands)
    assert all(c["EB"] * c["BLOCK_H"] // (32 * c["num_warps"]) <= 128 for c in cands)
    assert sweep.timed == {"_gate_kernel"}
    launcher, args, kw, reference = cases.make_call("gate", PRESETS["tiny"], 3, None, 0, torch.float32, "cpu")

    def err():
        got, ref = launcher(*args, **kw), reference()
        return ((got - ref).abs().max() / ref.abs().max()).item()
    assert err() < 1e-5
    from kernels import moe_gate
    orig = moe_gate.gate_triton

    def wrong(*a, **k):  # a routing one expert off: the norm and the logits still right
        g = orig(*a, **k)
        g.idx[0, 0] = (g.idx[0, 0] + 1) % PRESETS["tiny"].num_local_experts
        return g
    monkeypatch.setattr(moe_gate, "gate_triton", wrong)
    launcher, args, kw, reference = cases.make_call("gate", PRESETS["tiny"], 3, None, 0, torch.float32, "cpu")
    assert err() > 0.5  # the tuner drops a winner past 2e-2


def test_gate_launcher_uses_the_file(tmp_path, monkeypatch):
    from kernels.moe_gate import gate_config, gate_triton, tuning_shape
    from tests.kernels.cases import W
    g = torch.Generator().manual_seed(3)
    o, r = torch.randn(2, H, generator=g), torch.randn(2, H, generator=g)
    nw, rw, rb = torch.rand(H, generator=g) + 0.5, W["router_w"], W["router_b"]
    cfg = dict(EB=2, BLOCK_H=H // 2, num_warps=4)
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(dict(device="test", entries=[
        _entry("gate", tuning_shape(H, E, TOP_K, torch.float32), 1, cfg)])))
    monkeypatch.setenv(tuned.ENV, str(path))
    kw = _launch_kwargs(gate_triton, o, r, nw, 1e-5, rw, rb, TOP_K, E, 16)
    assert _has(kw["_gate_kernel"], dict(EB=2, BLOCK_H=H // 2, ONE_PASS=False))
    a = gate_triton(o, r, nw, 1e-5, rw, rb, TOP_K, E, 16)
    monkeypatch.setenv(tuned.ENV, "off")
    kw = _launch_kwargs(gate_triton, o, r, nw, 1e-5, rw, rb, TOP_K, E, 16)
    d = gate_config(H, E)
    assert _has(kw["_gate_kernel"], dict(EB=d["EB"], BLOCK_H=d["BLOCK_H"], ONE_PASS=True))
    b = gate_triton(o, r, nw, 1e-5, rw, rb, TOP_K, E, 16)
    assert torch.equal(a.idx, b.idx) and all(torch.equal(p, q) for p, q in zip(a.aligned, b.aligned))
    torch.testing.assert_close(a.h, b.h, rtol=1e-6, atol=1e-6)


def test_batches_are_tuned_in_the_order_given():
    from kernels._tune_plans import tasks
    from kernels.tune import parse
    a = parse(["--models", "gpt-oss-120b", "--kernels", "moe", "--batches", "1,512,8,512,1024"])
    assert [t.n for t in tasks(a.models, a.batches, a.kernels, a.prefill_from)] == [1, 512, 8, 1024]


def _entry(kernel, shape, batch, config):
    return dict(kernel=kernel, shape=shape, batch=batch, config=config, us=1.0)


MOE_SHAPE = moe_shape(H, I, E, TOP_K, torch.float32)
MOE_W1 = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64)
MOE_W2 = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
DECODE_CFG = dict(BLOCK_M=16, BLOCK_N=32, NUM_SPLITS=2)
PREFILL_CFG = dict(BLOCK_M=32, BLOCK_N=32, NUM_SPLITS=1)


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    path = tmp_path / "configs.json"
    entries = [_entry("moe_w1", MOE_SHAPE, 8, MOE_W1), _entry("moe_w2", MOE_SHAPE, 8, MOE_W2),
               _entry("moe_w1", MOE_SHAPE, 1, dict(MOE_W1, BLOCK_K=32)), _entry("moe_w2", MOE_SHAPE, 1, MOE_W2),
               _entry("moe_w1", moe_shape(H, I, E, TOP_K, torch.bfloat16), 64, dict(MOE_W1, BLOCK_N=64))]
    for w in (None, 5):
        shape = attn_shape(2 * KV_HEADS, KV_HEADS, HEAD_DIM, 4, w, torch.float32)
        entries += [_entry("attn_decode", shape, 4, DECODE_CFG), _entry("attn_prefill", shape, 64, PREFILL_CFG)]
    path.write_text(json.dumps(dict(device="test", entries=entries)))
    monkeypatch.setenv(tuned.ENV, str(path))
    return path


def _launch_kwargs(fn, *args, **kw):
    with capturing() as launches:
        fn(*args, **kw)
    return {getattr(k, "fn", k).__name__: w for k, _, _, w in launches}


def _has(kwargs, cfg):
    return all(kwargs[k] == v for k, v in cfg.items() if k != "NUM_SPLITS")


def test_moe_launcher_uses_the_file_nearest_bucket_and_matches_the_module(config_file, monkeypatch):
    m = moe_module()
    for n, w1 in ((5, MOE_W1), (8, MOE_W1), (1, dict(MOE_W1, BLOCK_K=32)), (2, dict(MOE_W1, BLOCK_K=32)),
                  (24, MOE_W1)):
        x = tokens(n, seed=n)
        idx, w = m.route(x)
        kw = _launch_kwargs(moe_mxfp4, x, (idx, w), *packed(m))
        assert _has(kw["_w1_kernel"], w1) and _has(kw["_w2_kernel"], MOE_W2), n
        out = moe_mxfp4(x, (idx, w), *packed(m))
        ref = m.compute(x, idx, w)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6
    x = tokens(33, seed=9)  # past the largest bucket's reach (8 x REACH): the default
    kw = _launch_kwargs(moe_mxfp4, x, m.route(x), *packed(m))
    assert kw["_w1_kernel"]["BLOCK_N"] == 32 and kw["_w1_kernel"]["BLOCK_K"] == 32
    monkeypatch.setenv(tuned.ENV, "off")
    x = tokens(5, seed=5)
    kw = _launch_kwargs(moe_mxfp4, x, m.route(x), *packed(m))
    assert kw["_w1_kernel"]["BLOCK_N"] == 32


def test_attention_launcher_uses_the_file_and_matches_attend(config_file):
    for window in (None, 5):
        args, ref = attention_step(DECODE, 4, 2, window, seed=7)
        kw = _launch_kwargs(paged_attention, *args, max_query_len=1)
        assert _has(kw["_attn_kernel"], DECODE_CFG) and kw["_attn_kernel"]["NUM_SPLITS"] == 2
        assert set(kw) == {"_attn_kernel"}  # the splits merge in the same launch
        torch.testing.assert_close(paged_attention(*args, max_query_len=1), ref, rtol=1e-5, atol=2e-5)
        args, ref = attention_step(MIXED, 4, 2, window, seed=8)
        kw = _launch_kwargs(paged_attention, *args)
        assert _has(kw["_attn_kernel"], PREFILL_CFG) and set(kw) == {"_attn_kernel"}
        torch.testing.assert_close(paged_attention(*args), ref, rtol=1e-5, atol=2e-5)


def test_lookup_rules(config_file, monkeypatch):
    dev = torch.device("cpu")
    assert tuned.lookup("moe_w1", MOE_SHAPE, 3, dev) == MOE_W1  # nearer 8 than 1 as a ratio
    assert tuned.lookup("moe_w1", MOE_SHAPE, 2, dev) == dict(MOE_W1, BLOCK_K=32)  # nearer 1
    assert tuned.lookup("moe_w1", MOE_SHAPE, 32, dev) == MOE_W1  # past the largest bucket, within REACH
    assert tuned.lookup("moe_w1", MOE_SHAPE, 33, dev) is None
    assert tuned.lookup("moe_w1", MOE_SHAPE.replace("E=8", "E=4"), 2, dev) is None  # exact shape only
    assert tuned.lookup("moe_w1", MOE_SHAPE, 2, dev) is not tuned.lookup("moe_w1", MOE_SHAPE, 2, dev)  # copies
    with tuned.forced({"moe_w1": {"BLOCK_M": 32}}):
        assert tuned.lookup("moe_w1", MOE_SHAPE, 2, dev) == {"BLOCK_M": 32}
    monkeypatch.setenv(tuned.ENV, str(config_file.with_name("missing.json")))
    with pytest.raises(FileNotFoundError, match="off"):
        tuned.lookup("moe_w1", MOE_SHAPE, 2, dev)
    monkeypatch.delenv(tuned.ENV)
    assert tuned.lookup("moe_w1", MOE_SHAPE, 2, dev) is None  # CPU tensors: no device file
    assert tuned.device_file("NVIDIA H200").name == "NVIDIA_H200.json"


def test_nearest_bucket_by_ratio_within_reach(tmp_path, monkeypatch):
    """Sparse buckets as kernels.tune writes them: decode batches, then a prefill chunk. A decode step
    between them takes the nearer as a ratio, not the chunk's tiles; a null config (a baseline won) is the
    nearest measurement too and answers None; ties go to the larger bucket."""
    buckets = {1: "gemv", 8: "b8", 256: "b256", 8192: "p8192", 64: None}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict(entries=[_entry("k", "s", b, None if c is None else {"tag": c})
                                             for b, c in buckets.items()])))
    monkeypatch.setenv(tuned.ENV, str(path))
    dev = torch.device("cpu")
    want = {1: "gemv", 2: "gemv", 3: "b8", 4: "b8", 16: "b8", 22: "b8", 23: None, 64: None, 96: None, 128: "b256",
            512: "b256", 1024: "b256", 1025: None, 2047: None, 2048: "p8192", 8192: "p8192",
            32768: "p8192", 32769: None}
    got = {n: (tuned.lookup("k", "s", n, dev) or {}).get("tag") for n in want}
    assert got == want
    assert tuned.lookup("k", "s", 0, dev) == {"tag": "gemv"}  # an empty step asks as one row


def test_beaten_linear_is_written_as_a_null_config(tmp_path):
    from kernels._tune_results import Result, Store
    store = Store(tmp_path / "d.json", dict(device="test"))
    won = Result("linear", "s", "l", 8, best={"BLOCK_N": 16}, best_us=2.0, default_us=3.0, check_ok=True)
    lost = Result("linear", "s", "l", 64, best={"BLOCK_N": 32}, best_us=5.0, default_us=4.0, check_ok=True,
                  beaten=True)
    store.add(won, {})
    store.add(lost, {})
    entries = {e["batch"]: e for e in json.loads((tmp_path / "d.json").read_text())["entries"]}
    assert entries[8]["config"] == {"BLOCK_N": 16} and "best_candidate" not in entries[8]
    assert entries[64]["config"] is None and entries[64]["best_candidate"] == {"BLOCK_N": 32}


def test_moe_w1_w2_must_agree_on_block_m(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict(entries=[_entry("moe_w1", MOE_SHAPE, 8, MOE_W1),
                                             _entry("moe_w2", MOE_SHAPE, 8, dict(MOE_W2, BLOCK_M=32))])))
    monkeypatch.setenv(tuned.ENV, str(path))
    m, x = moe_module(), tokens(3)
    kw = _launch_kwargs(moe_mxfp4, x, m.route(x), *packed(m))
    assert kw["_w1_kernel"]["BLOCK_N"] == 32 and kw["_w2_kernel"]["BLOCK_N"] == 32  # both defaults


def test_aot_compiles_the_tuned_configs(tmp_path, monkeypatch):
    """kernels.aot records the launchers, so a config file changes what it compiles (no compiling here)."""
    from kernels import aot
    path = tmp_path / "h200.json"
    big = moe_shape(2880, 2880, 128, 4, torch.bfloat16)
    w1 = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=8, num_stages=4)
    dec = dict(BLOCK_M=16, BLOCK_N=128, NUM_SPLITS=16, num_warps=2, num_stages=3)
    path.write_text(json.dumps(dict(entries=[
        _entry("moe_w1", big, 1, w1), _entry("moe_w2", big, 1, dict(w1, BLOCK_N=16, TAIL_G=4)),
        _entry("attn_decode", attn_shape(64, 8, 64, 16, None, torch.bfloat16), 1, dec)])))
    monkeypatch.setenv(tuned.ENV, str(path))
    labels = {(c.kernel, c.label): c.uses for c in aot.plan(90)}
    w1_label = ("TOP_K=4 BLOCK_M=16 BLOCK_N=32 BLOCK_K=128 DOT_BF16=True SCALED=True SPLIT_K=1 L2PF=False PTX=True "
                "DQ=False PDL=True w8 s4")
    assert labels[("_w1_kernel", w1_label)] == ["120b d1"]
    # at batch 1 W2 ends with the combine (kernels.moe_combine's tail: its constexprs lead the label), here
    # holding 2880 columns in one pass of 4 chunks (TAIL_G)
    w2_label = ("TOP_K=4 HAS_RES=True NORM=True BLOCK_H=1024 COMBINE=True BLOCK_M=16 BLOCK_N=16 BLOCK_K=128 "
                "DOT_BF16=True SCALED=True SPLIT_K=1 L2PF=False PTX=True DQ=False PDL=True TAIL_G=4 TAIL_HOLD=True "
                "w8 s4")
    assert labels[("_w2_kernel", w2_label)] == ["120b d1"]
    # attention is the same on an expert-parallel rank; on an fp8 KV pool it is a compilation of its own
    assert [u for (k, lab), u in labels.items() if k == "_attn_kernel" and "NUM_SPLITS=16" in lab] == [
        ["20b d1", "120b d1", "120b ep8 d1", "120b ep8 dp d1"], ["120b kv8 d1"]]
    assert all("KV=fp8" in lab for (k, lab), u in labels.items() if u == ["120b kv8 d1"])


def test_decode_batches_also_sweep_single_pair_tiles():
    """Where a step has about one (token, expert) pair per expert, BLOCK_M 1 (kernels.moe_gemv) is swept
    beside the MMA tiles; its candidates are all single-pair configs; larger steps do not try it."""
    from kernels import _tune_cases as cases
    from models.checkpoint import PRESETS
    big = PRESETS["gpt-oss-120b"]
    assert cases.moe_block_ms(big, 1)[0] == 1 and cases.moe_block_ms(big, 32)[0] == 1
    assert 1 not in cases.moe_block_ms(big, 64)
    for kn in ("moe_w1", "moe_w2"):
        cands = cases.moe_candidates(kn, 1)
        assert len(cands) >= 6 and all(c["GEMV"] and c["BLOCK_M"] == 1 and "BLOCK_KB" in c for c in cands)
        # every program is resident at batch 1: bytes in flight = 4 pairs x rows x BLOCK_KB. The sweep reaches
        # the ~6 MB an H200's bandwidth wants (W2 has 2,880 rows), at no more than 8 blocks a thread
        rows = big.hidden_size * (2 if kn == "moe_w1" else 1)
        assert max(4 * rows * c["BLOCK_KB"] for c in cands) >= 6e6
        tiles = 2 if kn == "moe_w1" else 1
        assert all(tiles * c["BLOCK_N"] * c["BLOCK_KB"] / (32 * c["num_warps"]) <= 128 for c in cands)


def test_one_token_w2_also_sweeps_its_combine_tail_chunks():
    """At one token the combine is W2's tail: W2's phase 2 also tries 2 chunks a pass and the whole row
    (TAIL_G 4: 2,880 columns in chunks of 1,024), beside L2PF; W1, larger batches and the dry run do not."""
    from kernels._tune_plans import plan_task, tasks
    for n, want in ((1, [{"L2PF": True}, {"TAIL_G": 2}, {"TAIL_G": 4}]), (8, [{"L2PF": True}])):
        (task,) = tasks(["gpt-oss-120b"], [n], {"moe"}, 8192)
        sweeps = plan_task(task, torch.bfloat16, False, 0).sweeps
        assert {s.group for s in sweeps} >= {"gemv", "mma16"}
        for s in sweeps:
            assert list(s.extra) == (want if s.kernel == "moe_w2" else [{"L2PF": True}]), (n, s.group, s.kernel)
    (task,) = tasks(["gpt-oss-120b"], [1], {"moe"}, 8192)
    assert all(s.extra == () for s in plan_task(task, torch.bfloat16, True, 0).sweeps)


@pytest.mark.parametrize("model,n,gemv", [("gpt-oss-120b", 1, False), ("gpt-oss-120b", 1, True),
                                          ("gpt-oss-120b", 8, False), ("gpt-oss-20b", 1, True),
                                          ("gpt-oss-120b", 8192, False)])
def test_tuned_launches_are_the_ones_a_step_makes(model, n, gemv, monkeypatch):
    """What kernels.tune compiles and times for the MoE, the gate and attention is a compilation a step of
    the model launches (kernels.aot_workloads.step_launches, bound as kernels.aot does: decode steps and a
    prefill chunk), at the same configs: the gate with the expert map, load and row mask at the MoE plan's
    BLOCK_M (gemv: making the single-pair tiles' activations), decode attention rotating and writing the
    cache (ROPE), W2 adding the residual and taking the next norm. Before session 32 the gate and decode
    attention were timed without them."""
    import contextlib

    from kernels import _triton, _tune_cases as cases, aot, moe_configs
    from kernels._tune_plans import plan_task, tasks
    from kernels.aot_workloads import step_launches
    from models.checkpoint import PRESETS
    monkeypatch.setenv(tuned.ENV, "off")  # the defaults, wherever this runs
    cfg = PRESETS[model]

    def compiled(launches, names=None) -> set:
        launches = [ln for ln in launches if names is None or ln[0].__name__ in names]
        return {(c.kernel, c.label) for c in aot.bind([("step", launches)], 90)}
    with tuned.forced(moe_configs.gemv_configs()) if gemv else contextlib.nullcontext():
        prefill = n >= 1024
        served = compiled(step_launches(cfg, 1, n, n) if prefill else step_launches(cfg, n, 1, 2048))
        for task in tasks([model], [n], {"moe", "gate", "attn"}, 1024):
            checked = {k for s in plan_task(task, torch.bfloat16, False, 2048).sweeps for k in s.check}
            fn, args, kw, _ = cases.make_call(task.family, cfg, n, task.window, 2048, torch.bfloat16, "meta")
            with _triton.recording() as launches:
                fn(*args, **kw)
            got = compiled(launches, checked)
            assert got and got <= served, (task.family, task.window, sorted(got - served))
    if not prefill:
        assert any("ROPE=True" in label for k, label in served if k == "_attn_kernel")
        assert any("HAS_MASK=True" in label and "HAS_MAP=True" in label for k, label in served
                   if k == "_gate_kernel")


def test_the_gate_is_tuned_at_the_moe_plan_of_its_batch(tmp_path, monkeypatch):
    """The gate's sweep forces the expert configs the launchers would pick at its batch, read again when
    it runs (after this run's MoE at that batch is written), so the compile workers bind the launch a step
    makes without reading the file; under them the gate's call launches at that plan (gemv: BLOCK_M 1,
    making the single-pair tiles' activations)."""
    from types import SimpleNamespace

    from kernels import _triton, _tune_cases as cases, moe_configs
    from kernels._tune_plans import tasks
    from kernels.tune import Tuner
    from models.checkpoint import PRESETS
    big = PRESETS["gpt-oss-120b"]
    path = tmp_path / "configs.json"
    monkeypatch.setenv(tuned.ENV, str(path))
    path.write_text(json.dumps(dict(entries=[])))
    tuned.clear_cache()
    tuner = Tuner(SimpleNamespace(dry_run=False, context=2048), torch.device("cpu"), torch.bfloat16, 90, None)
    (task,) = tasks(["gpt-oss-120b"], [1], {"gate"}, 1024)
    plan = tuner.plan(task)
    d = moe_configs.default_config(big.num_experts_per_tok, big.num_local_experts, False)
    assert plan.sweeps[0].others == {"moe_w1": d, "moe_w2": d}
    gemv = moe_configs.gemv_configs()
    shape = moe_shape(big.hidden_size, big.intermediate_size, big.num_local_experts, big.num_experts_per_tok,
                      torch.bfloat16)
    path.write_text(json.dumps(dict(entries=[_entry(k, shape, 1, c) for k, c in gemv.items()])))
    tuned.clear_cache()  # as kernels.tune does after each write
    try:
        later = tuner._with_moe_plan(plan)
        assert later.sweeps[0].others == gemv and later.results is plan.results
        fn, args, kw, _ = cases.make_call("gate", big, 1, None, 0, torch.bfloat16, "meta")
        for others, block_m, x16 in ((plan.sweeps[0].others, d["BLOCK_M"], False), (gemv, 1, True)):
            with tuned.forced({"gate": plan.default, **others}), _triton.recording() as launches:
                fn(*args, **kw)
            (gate,) = [w for k, _, w in launches if k.__name__ == "_gate_kernel"]
            assert (gate["BLOCK_M"], gate["X16"]) == (block_m, x16)
    finally:
        tuned.clear_cache()


def test_decode_attention_splits_reach_a_wave_at_batch_1():
    """At batch 1 the full-attention layers' sweep reaches 32 key-range splits (256 programs on 132 SMs);
    under the sliding window at most 4; past 2,048 programs none is tried."""
    from kernels import _tune_cases as cases
    from models.checkpoint import PRESETS
    big = PRESETS["gpt-oss-120b"]
    splits = lambda n, w: {c["NUM_SPLITS"] for c in cases.attn_candidates(True, big, n, w)}  # noqa: E731
    assert splits(1, None) == {1, 2, 4, 8, 16, 32}
    assert splits(1, big.sliding_window) == {1, 2, 4}
    assert max(splits(16, None)) == 16 and splits(256, None) == {1}


def test_one_row_linears_also_sweep_gemv_tiles():
    """At one row the linear sweep adds the GEMV tiles (kernels.linear), 16-64 products a thread, some split
    over K; at 2+ rows it does not (a GEMV entry serves one row)."""
    from kernels import _tune_cases as cases
    gemv = [c for c in cases.linear_candidates(1) if c.get("GEMV")]
    assert len(gemv) >= 12 and {c.get("SPLIT_K", 1) for c in gemv} == {1, 2, 4}
    assert all(16 <= c["BLOCK_N"] * c["BLOCK_K"] / (32 * c["num_warps"]) <= 64 for c in gemv)
    assert not any(c.get("GEMV") for c in cases.linear_candidates(8))


def test_large_decode_batches_sweep_tiles_for_busy_experts():
    """At a 1k/1k run's decode batches an expert's rows vary about their mean: the sweep reaches the tile
    that holds a busy expert's rows in one (the ones above the mean would take two tiles at the mean's);
    where busy experts still fit 16 rows it stays at 16. Checked against the rows uniform routing gives."""
    from kernels import _tune_cases as cases
    from models.checkpoint import PRESETS
    big = PRESETS["gpt-oss-120b"]
    assert cases.moe_block_ms(big, 256) == [16] and cases.moe_block_ms(big, 512) == [16, 32]
    assert cases.moe_block_ms(big, 1024) == [16, 32, 64]
    for n in (256, 512, 1024):
        _, (idx, _) = cases.moe_tokens(big, n, torch.float32, "cpu")
        rows = torch.bincount(idx.flatten(), minlength=big.num_local_experts)
        # the largest tile swept holds nearly every expert's rows; at 512 and 1,024 the mean's tile does not
        assert (rows > max(cases.moe_block_ms(big, n))).float().mean() < 0.05, n
        if n > 256:
            assert (rows > n * 4 // 128).float().mean() > 0.25, n


def test_prefill_chunks_sweep_compute_sized_tiles():
    """A prefill chunk (120b at 8,192 tokens: ~256 pairs an expert) tries BLOCK_M 256 and tiles of 128
    accumulators a thread, among them the ones kernels.aot compiles for sm_90 ("120b mma256 p8192");
    decode tiles stay within 64, so a decode sweep is the size it was."""
    from kernels import _tune_cases as cases
    from kernels.aot_workloads import MOE_PREFILL_SAMPLE
    from models.checkpoint import PRESETS
    big = PRESETS["gpt-oss-120b"]
    assert 256 in cases.moe_block_ms(big, 8192) and 256 not in cases.moe_block_ms(big, 256)

    def acc(kn, c):  # fp32 accumulators a thread: W1 holds gate and linear rows (both paths)
        rows = c["BLOCK_N"] * (2 if kn == "moe_w1" else 1)
        return rows * c["BLOCK_M"] / (32 * c["num_warps"])
    for kn in ("moe_w1", "moe_w2"):
        wide = cases.moe_candidates(kn, 256)
        assert MOE_PREFILL_SAMPLE[kn] in wide
        assert max(acc(kn, c) for c in wide) == 128 and all(acc(kn, c) <= 128 for c in wide)
        assert max(acc(kn, c) for c in cases.moe_candidates(kn, 256, rs=True)) == 128
        for bm in (16, 32):
            for rs in (False, True):
                assert all(acc(kn, c) <= 64 for c in cases.moe_candidates(kn, bm, rs=rs))


def test_compile_pool_yields_in_order_and_serves_a_sweep_before_what_was_prefetched():
    from kernels._compile_pool import CompilePool
    pool = CompilePool(1)
    try:
        assert list(pool.results(abs, [-3, -1, -3, -2])) == [3, 1, 3, 2]  # in order, a repeat included
        slow = [0.3 + i / 1000 for i in range(8)]  # 2.4 s of queued work on the one worker
        pool.submit(time.sleep, slow)
        t0 = time.perf_counter()
        assert list(pool.results(abs, [-7])) == [7]
        # two of the queued jobs were handed to the worker already (0.6 s); the other six wait behind it
        assert time.perf_counter() - t0 < 1.5
        assert list(pool.results(time.sleep, slow)) == [None] * 8
    finally:
        pool.close()
