"""bench/gpu.py cannot run without a GPU here; --dry-run runs its whole flow on CPU (tiny preset)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m bench.gpu --dry-run ARGS` with the torch kernels (no interpreter), one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GPTOSS_KERNELS="auto")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help():
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--dry-run" in r.stdout


@pytest.mark.parametrize("weights", ["memory", "disk"])
def test_dry_run_writes_results_and_markdown(tmp_path, weights):
    r = dry_run("--weights", weights, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    files = list(tmp_path.glob("gpu-tiny-*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res["model"] == "tiny" and res["dry_run"] and res["copy_bandwidth_GBps"] > 0
    assert res["complete"] and res["weights"] == weights
    kinds = [(x["kind"], x["batch"]) for x in res["results"]]
    assert kinds == [("decode", 1), ("decode", 2), ("decode", 4), ("prefill", 2), ("throughput", 3)]
    # each decode figure says which tiles it ran: no tuned file for the CPU, so the defaults and cuBLAS
    assert all(x["kernel_paths"] == {"moe": "default", "moe_config": None, "linears": []}
               for x in res["results"] if x["kind"] == "decode")
    for x in res["results"]:
        assert x["tokens_per_s"] > 0 and x["roofline_tokens_per_s"] > 0 and x["bytes_per_step"] > 0
        assert x["gpu"] == res["gpu"] and x["command"].startswith("python -m bench.gpu")
    assert "| workload | batch |" in r.stdout and "| decode | 4 |" in r.stdout
    assert "batch 1: MoE default, linears on kernels.linear: none (cuBLAS)" in r.stdout
    thr = res["results"][-1]
    assert thr["requests_finished"] == 5
    # where its time went: 5 requests of 12 prompt and 6 output tokens at concurrency 3 need both kinds of
    # step, and every generated token is counted in one of them
    assert thr["prefill_steps"] > 0 and thr["decode_steps"] > 0 and thr["prefill_s"] > 0 and thr["decode_s"] > 0
    assert thr["prefill_generated"] + thr["decode_generated"] == 5 * 6
    assert "steps with prompt tokens (" in r.stdout and "decode-only steps (" in r.stdout
    # batch 1 is measured with overlapped scheduling off too (--lockstep-batches 1,8 by default)
    [lock] = [x for x in res["results"] if "lockstep_tokens_per_s" in x]
    assert lock["batch"] == 1 and lock["lockstep_tokens_per_s"] > 0 and lock["overlap_speedup"] > 0
    assert "Overlapped scheduling" in r.stdout and "batch 1:" in r.stdout
    # and batch 2 at temperature 1 (--sampled-batches; 1,64 by default)
    [smp] = [x for x in res["results"] if "sampled_tokens_per_s" in x]
    assert smp["batch"] == 2 and smp["sampled_tokens_per_s"] > 0 and smp["sampled_step_ms"] > 0
    assert "Decode at temperature 1" in r.stdout
    # and batch 1 padded to the bucket of 2 (--padded-batches; 1 by default)
    [pad] = [x for x in res["results"] if "padded_tokens_per_s" in x]
    assert pad["batch"] == 1 and pad["padded_tokens_per_s"] > 0 and pad["padded_step_ms"] > 0
    assert "Decode padded to the next graph bucket" in r.stdout
    # and batch 1 with the one-launch MoE gate off (--unfused-gate-batches; 1 by default)
    [ung] = [x for x in res["results"] if "unfused_gate_tokens_per_s" in x]
    assert ung["batch"] == 1 and ung["unfused_gate_tokens_per_s"] > 0 and ung["unfused_gate_step_ms"] > 0
    assert "Decode with the one-launch MoE gate" in r.stdout
    # and batch 1 with programmatic dependent launch (--pdl-batches; 1 by default; off by default, never on a CPU)
    [npd] = [x for x in res["results"] if "pdl_tokens_per_s" in x]
    assert npd["batch"] == 1 and npd["pdl_tokens_per_s"] > 0 and npd["pdl_step_ms"] > 0
    assert res["pdl"] is False and "Decode with programmatic dependent launch" in r.stdout
    assert npd["pdl_exit_tokens_per_s"] > 0 and "launch at each kernel's exit" in r.stdout
    # and profiled last (--profile-batches; 1,64 by default): time by category, the trace beside the JSON
    prof, pre = res["profiles"]
    p = prof["profile"]
    assert prof["batch"] == 2 and prof["step_ms"] > 0 and prof["tokens_per_s"] > 0
    # at the decode figures' context, not the throughput phase's (which runs before it)
    assert prof["context"] == [x["context"] for x in res["results"] if x["kind"] == "decode"][0]
    assert p["steps"] == 2 and p["busy_ms_per_step"] > 0 and p["kernels_per_step"] > 10
    assert sum(c["share"] for c in p["categories"]) == pytest.approx(1)
    [lin] = [c for c in p["categories"] if c["category"] == "linear"]  # on CPU every matmul is aten::linear
    assert lin["ms_per_step"] > 0 and lin["bytes_per_step"] > 0 and lin["GBps"] > 0
    assert (tmp_path / p["trace"]).stat().st_size > 1000
    assert "Decode batch 2, where a step's time goes" in r.stdout and "| linear |" in r.stdout
    # profiled without PDL (a kernel's span would hold its wait for the one before): said so
    assert prof["pdl"] is False and pre["pdl"] is False
    assert "Without programmatic dependent launch (GPTOSS_PDL=0" in r.stdout
    # then full prefill chunks (--profile-prefill-steps; 3 by default): 32-token chunks of 24-token prompts
    q = pre["profile"]
    assert (pre["kind"], pre["tokens"], pre["batch"], pre["context"]) == ("prefill", 32, 1, 24)
    assert q["steps"] == 2 and q["busy_ms_per_step"] > 0 and (tmp_path / q["trace"]).stat().st_size > 1000
    assert "Prefill chunks of 32 tokens (1 prompt of 24), where a step's time goes" in r.stdout


def test_throughput_cap_keeps_partial_results(tmp_path):
    """--throughput-seconds stops the phase early and the JSON written so far survives a cut-short run."""
    r = dry_run("--batches", "1", "--requests", "400", "--throughput-seconds", "0.5", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("gpu-tiny-*.json")).read_text())
    thr = res["results"][-1]
    assert thr["kind"] == "throughput" and thr["tokens_per_s"] > 0 and thr["requests_finished"] < 400


def test_phases_run_a_subset_and_a_bad_phase_names_the_flag(tmp_path):
    r = dry_run("--phases", "decode", "--batches", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("gpu-tiny-*.json")).read_text())
    assert [x["kind"] for x in res["results"]] == ["decode"] and res["complete"]
    assert "profiles" not in res and not list(tmp_path.glob("profile-*"))
    r = dry_run("--phases", "decode,warmup", timeout=60)
    assert r.returncode == 2 and "--phases" in r.stderr and "warmup" in r.stderr and "Traceback" not in r.stderr


def test_prefill_flops_count_attention_per_query():
    from bench.roofline import Roofline
    from models.checkpoint import PRESETS
    cfg = PRESETS["gpt-oss-120b"]
    roof = Roofline(cfg)
    per_query = sum(4 * cfg.num_attention_heads * cfg.head_dim * (min(4096, cfg.window(i)) if cfg.window(i) else 4096)
                    for i in range(cfg.num_hidden_layers))
    # one 8192-token chunk attending 4096 positions on average: every query pays for its context
    assert roof.step_flops(8192, [4096], 1) - roof.step_flops(8192, [0], 1) == pytest.approx(8192 * per_query)
    # decode: one query per sequence
    assert roof.step_flops(4, [4096] * 4, 4) - roof.step_flops(4, [0] * 4, 4) == pytest.approx(4 * per_query)


def test_roofline_matches_the_published_estimate():
    """NOTES §5: gpt-oss-120b batch-1 decode moves ~1.9 GB attention + ~1.9 GB experts + ~1.2 GB unembedding."""
    from bench.roofline import Roofline
    from models.checkpoint import PRESETS
    roof = Roofline(PRESETS["gpt-oss-120b"])
    nbytes = roof.step_bytes(1, [1], 1)
    assert 4.8e9 < nbytes < 5.3e9
    assert 800 < 1 / (nbytes / 4.3e12) < 900
    assert roof.step_bytes(64, [1024] * 64, 64) > roof.step_bytes(8, [1024] * 8, 8)


def test_update_benchmarks_writes_the_newest_result_per_gpu_and_model(tmp_path):
    """GPU JSON that came back from the device machine goes into BENCHMARKS.md between markers,
    newest per (GPU, model), replacing the previous block; dry runs are never written."""
    from bench.gpu import main
    from bench.gpu_report import BEGIN, END

    def result(model, date, tok_s, dry=False):
        row = {"kind": "decode", "batch": 1, "context": 1024, "tokens_per_s": tok_s, "roofline_tokens_per_s": 860.0,
               "roofline_bound": "memory", "fraction_of_roofline": tok_s / 860.0}
        return {"gpu": "NVIDIA H200", "model": model, "date": date, "dry_run": dry, "kernels": "auto",
                "use_triton": True, "copy_bandwidth_GBps": 4300.0, "matmul_TFLOPs": 700.0, "complete": True,
                "command": "python -m bench.gpu", "results": [row]}

    res = tmp_path / "results"
    res.mkdir()
    for name, r in {"a": result("gpt-oss-120b", "2026-12-01T10:00:00", 300.0),
                    "b": result("gpt-oss-120b", "2026-12-01T11:00:00", 450.5),
                    "c": result("gpt-oss-20b", "2026-12-01T10:30:00", 900.25),
                    "d": result("tiny", "2026-12-01T12:00:00", 5.0, dry=True)}.items():
        (res / f"gpu-{name}.json").write_text(json.dumps(r))
    bm = tmp_path / "BENCHMARKS.md"
    bm.write_text("# Benchmarks\n\nearlier text\n")
    assert main(["--update-benchmarks", str(res), "--benchmarks-file", str(bm)]) == 0
    text = bm.read_text()
    assert text.startswith("# Benchmarks\n\nearlier text\n") and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "| decode | 1 | 1024 | 450.5 | 860.0 | memory | 52.4 |" in text and "| 300.0 |" not in text
    assert "900.2" in text and "tiny" not in text
    # a profile that came back with a result is written too, as its table
    prof = {"source": "cuda kernels", "busy_ms_per_step": 1.8, "kernels_per_step": 409.0,
            "categories": [{"category": "moe w1", "ms_per_step": 0.5, "share": 0.3, "bytes_per_step": 1.3e9,
                            "GBps": 2600.0, "of_copy_bandwidth": 0.6}],
            "top_kernels": [{"name": "_w1_kernel", "ms_per_step": 0.5, "calls_per_step": 36, "us_per_call": 13.9}]}
    withp = result("gpt-oss-20b", "2026-12-01T13:00:00", 950.0)
    withp["profiles"] = [{"kind": "decode", "batch": 1, "step_ms": 2.1, "profile": prof}]
    (res / "gpu-e.json").write_text(json.dumps(withp))
    assert main(["--update-benchmarks", str(res), "--benchmarks-file", str(bm)]) == 0
    text = bm.read_text()
    assert "| moe w1 | 0.500 | 30.0% | 1300.0 MB | 2600 | 60% |" in text and "409 kernels per step" in text
    (res / "gpu-e.json").unlink()
    (res / "gpu-b.json").unlink()
    assert main(["--update-benchmarks", str(res), "--benchmarks-file", str(bm)]) == 0
    text = bm.read_text()
    assert text.count(BEGIN) == 1 and "| 300.0 |" in text and "450.5" not in text
    empty = tmp_path / "none"
    empty.mkdir()
    assert main(["--update-benchmarks", str(empty), "--benchmarks-file", str(bm)]) == 2


def test_padded_engine_has_no_graph_of_its_own_batch():
    """--padded-batches: the engine's graph buckets skip the batch, so its decode steps pad to the next."""
    import torch

    from bench.gpu_measure import engine
    from models import load_model
    from models.checkpoint import RandomCheckpoint
    model = load_model(RandomCheckpoint("tiny"), dtype=torch.float32, keep_mxfp4=True)
    assert engine(model, 1, 64, 32, padded=True).executor.buckets == (2,)
    assert engine(model, 1, 64, 32).executor.buckets == (1,)
    b8 = engine(model, 8, 64, 32, padded=True).executor.buckets
    assert 8 not in b8 and b8[-1] == 16


def test_kernel_paths_follow_the_tuned_file(tmp_path, monkeypatch):
    """bench.gpu's record of which MoE tiles and decode linears a decode batch ran: from the same lookup
    the launchers make (here a file given by GPTOSS_KERNEL_CONFIGS)."""
    import torch

    from bench.gpu_kernels import paths
    from kernels import _tune_cases as cases, linear, tuned
    from kernels.moe_configs import gemv_config, tuning_shape
    from models.checkpoint import PRESETS
    cfg = PRESETS["gpt-oss-120b"]
    shape = tuning_shape(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                         torch.bfloat16)
    mma = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    entries = [dict(kernel=k, shape=shape, batch=1, config=gemv_config(False, k)) for k in ("moe_w1", "moe_w2")]
    entries += [dict(kernel=k, shape=shape, batch=64, config=mma) for k in ("moe_w1", "moe_w2")]
    qkv = linear.tuning_shape(*cases.linear_shape(cfg, "qkv"), torch.bfloat16)
    entries.append(dict(kernel="linear", shape=qkv, batch=8, config=dict(BLOCK_N=32, BLOCK_K=128)))
    (tmp_path / "c.json").write_text(json.dumps(dict(entries=entries)))
    monkeypatch.setenv(tuned.ENV, str(tmp_path / "c.json"))
    tuned.clear_cache()
    try:
        cpu = torch.device("cpu")
        p1, p8, p16, p256, p512 = [paths(cfg, b, cpu) for b in (1, 8, 16, 256, 512)]
    finally:
        tuned.clear_cache()
    assert p1["moe"] == "gemv" and p1["moe_config"]["GEMV"] and p1["linears"] == []  # 8x from the linear's 8
    assert p8["moe"] == "default" and p8["linears"] == ["qkv"]  # 8x from both MoE buckets: beyond tuned.REACH
    assert p16["moe"] == "tuned" and p16["moe_config"] == mma and p16["linears"] == ["qkv"]
    assert p256["moe"] == "tuned" and p256["linears"] == []  # 4x the 64 bucket: within tuned.REACH
    assert p512 == {"moe": "default", "moe_config": None, "linears": []}


def test_a_run_of_some_phases_completes_its_sessions_newest(tmp_path):
    """The device session's throughput-only call (--phases throughput: a whole 1k/1k, in a call of its own)
    joins the decode run before it in one table, its row marked with its own command; a run from an
    earlier session is not mixed in; a cut-short throughput window says so."""
    from bench.gpu import main

    def row(kind, batch, tok_s, **extra):
        return {"kind": kind, "batch": batch, "context": 1536, "tokens_per_s": tok_s, "roofline_tokens_per_s": 1e4,
                "roofline_bound": "memory", "fraction_of_roofline": tok_s / 1e4, **extra}

    def run(date, rows, command):
        return {"gpu": "NVIDIA H200", "model": "gpt-oss-120b", "date": date, "dry_run": False, "kernels": "auto",
                "use_triton": True, "copy_bandwidth_GBps": 4300.0, "matmul_TFLOPs": 700.0, "complete": True,
                "command": command, "results": rows}

    thr = dict(isl=1024, osl=1024, requests=1024)
    res = tmp_path / "results"
    res.mkdir()
    files = {"old": run("2026-11-20T10:00:00+00:00", [row("decode", 8, 111.0)], "python -m bench.gpu old"),
             "dec": run("2026-12-01T10:00:00+00:00", [row("decode", 1, 400.0),
                                                      row("throughput", 512, 3000.0, requests_finished=0, **thr)],
                        "python -m bench.gpu --throughput-seconds 75"),
             "thr": run("2026-12-01T10:20:00+00:00", [row("throughput", 512, 7100.0, requests_finished=1024, **thr)],
                        "python -m bench.gpu --phases throughput")}
    for name, r in files.items():
        (res / f"gpu-{name}.json").write_text(json.dumps(r))
    bm = tmp_path / "BENCHMARKS.md"
    assert main(["--update-benchmarks", str(res), "--benchmarks-file", str(bm)]) == 0
    text = bm.read_text()
    assert "| throughput | 512 | 1536 | 7100.0 |" in text and "3000.0" not in text  # the newest run's own row
    assert "| decode* | 1 | 1536 | 400.0 |" in text  # from the session's decode run, marked
    assert "* measured by `python -m bench.gpu --throughput-seconds 75 (2026-12-01T10:00:00+00:00)`" in text
    assert "111.0" not in text  # another session's
    assert "1024 of 1024 requests finished" in text and "cut short" not in text
    assert "Goal decode batch 1 > 430 tok/s: not met (400.0 tok/s)." in text
    assert "Goal throughput (1k/1k) >= 7,000 tok/s: met (7,100.0 tok/s)." in text
    files["thr"]["results"][0]["requests_finished"] = 700
    (res / "gpu-thr.json").write_text(json.dumps(files["thr"]))
    assert main(["--update-benchmarks", str(res), "--benchmarks-file", str(bm)]) == 0
    text = bm.read_text()
    assert "700 of 1024 requests finished in the measured window (cut short" in text
    assert "Goal throughput (1k/1k) >= 7,000 tok/s: not established (window cut short) (7,100.0 tok/s)." in text


def test_fp8_kv_cache_run_labels_its_rows_and_its_roofline_counts_its_bytes(tmp_path):
    """--kv-cache-dtype fp8: every engine of the run on an fp8 cache (the engines' own pools are checked in
    tests/engine/test_kv_fp8.py), each row saying so, its roofline counting a byte a cached value."""
    from bench.roofline import Roofline
    from models.checkpoint import PRESETS
    r = dry_run("--kv-cache-dtype", "fp8", "--phases", "decode,throughput", "--batches", "1", "--lockstep-batches",
                "", "--sampled-batches", "", "--padded-batches", "", "--unfused-gate-batches", "", "--pdl-batches",
                "", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("gpu-tiny-*.json")).read_text())
    assert res["kv_cache_dtype"] == "fp8" and {x["kv_cache_dtype"] for x in res["results"]} == {"fp8"}
    assert "| decode (fp8 KV) | 1 |" in r.stdout and "Throughput (fp8 KV) (12 in, " in r.stdout
    cfg = PRESETS["gpt-oss-120b"]
    bf16, fp8 = Roofline(cfg), Roofline(cfg, kv_bytes=1)
    kv = lambda roof: sum(roof.step_parts(64, [2048] * 64, 64)[k] for k in ("kv read", "kv write"))  # noqa: E731
    assert kv(fp8) == kv(bf16) / 2 > 0
    assert bf16.step_bytes(64, [2048] * 64, 64) - fp8.step_bytes(64, [2048] * 64, 64) == kv(fp8)


def test_fp8_kv_rows_join_the_table_beside_the_model_dtype_ones(tmp_path):
    """The session's fp8-cache 1k/1k (a call of its own at its own concurrency) is a row of its own, marked,
    and the goal line names each throughput row's cache and batch."""
    from bench.gpu import main

    def run(date, rows, command):
        return {"gpu": "NVIDIA H200", "model": "gpt-oss-120b", "date": date, "dry_run": False, "kernels": "auto",
                "use_triton": True, "copy_bandwidth_GBps": 4300.0, "matmul_TFLOPs": 700.0, "complete": True,
                "command": command, "results": rows}

    def thr(batch, tok_s, kv=None):
        return {"kind": "throughput", "batch": batch, "context": 1536, "tokens_per_s": tok_s,
                "roofline_tokens_per_s": 2e4, "roofline_bound": "memory", "fraction_of_roofline": tok_s / 2e4,
                "isl": 1024, "osl": 1024, "requests": 1024, "requests_finished": 1024,
                **({"kv_cache_dtype": kv} if kv else {})}
    res = tmp_path / "results"
    res.mkdir()
    (res / "gpu-a.json").write_text(json.dumps(run("2026-12-01T10:00:00+00:00", [thr(512, 5000.0)],
                                                   "python -m bench.gpu --phases throughput")))
    (res / "gpu-b.json").write_text(json.dumps(run("2026-12-01T10:10:00+00:00", [thr(1024, 7200.0, "fp8")],
                                                   "python -m bench.gpu --phases throughput --kv-cache-dtype fp8")))
    (res / "gpu-c.json").write_text(json.dumps(run("2026-12-01T10:20:00+00:00", [thr(1024, 7300.0, "auto")],
                                                   "python -m bench.gpu --phases throughput --concurrency 1024")))
    bm = tmp_path / "BENCHMARKS.md"
    assert main(["--update-benchmarks", str(res), "--benchmarks-file", str(bm)]) == 0
    text = bm.read_text()
    assert "| throughput | 1024 | 1536 | 7300.0 |" in text
    assert "| throughput (fp8 KV)* | 1024 | 1536 | 7200.0 |" in text
    assert "| throughput** | 512 | 1536 | 5000.0 |" in text
    assert ("Goal throughput (1k/1k) >= 7,000 tok/s: met (7,300.0 tok/s, model-dtype KV cache, batch 1024); "
            "met (7,200.0 tok/s, fp8 KV cache, batch 1024); not met (5,000.0 tok/s, model-dtype KV cache, "
            "batch 512).") in text
    assert "Throughput (fp8 KV) (1024 in, 1024 out, concurrency 1024): 1024 of 1024 requests finished" in text


def test_decode_batch_past_the_step_budget_keeps_every_sequence(tmp_path):
    """64 sequences of 12-token prompts through a 32-token step budget (as the runbook's bench step profiles
    batch 256 with its real sizes): the first sequences must not run out of tokens, and finish, before the
    last prompt is in."""
    r = dry_run("--phases", "decode", "--batches", "64", "--lockstep-batches", "0", "--sampled-batches", "0",
                "--padded-batches", "0", "--unfused-gate-batches", "0", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(next(tmp_path.glob("gpu-tiny-*.json")).read_text())["results"]
    assert row["batch"] == 64 and row["tokens_per_s"] > 0


def test_a_failing_measurement_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    """An error at one batch (an OOM, say) goes into the JSON and the tables, and the later measurements
    still run; a device fault (the CUDA context is lost) is recorded and ends the run."""
    from bench import gpu
    real = gpu.bench_decode

    def decode(model, dev, B, *args, **kw):
        if B == 2 and set(kw) == {"kv"}:  # the plain run (its variants then do not run)
            raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")
        if B == 1 and kw.get("overlap") is False:
            raise ValueError("the lockstep variant broke")
        if B == 4 and fault:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, dev, B, *args, **kw)

    monkeypatch.setattr(gpu, "bench_decode", decode)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fault = False
    argv = ["--dry-run", "--phases", "decode,prefill", "--batches", "1,2,4", "--out", str(tmp_path / "a")]
    assert gpu.main(argv) == 1
    out = capsys.readouterr().out
    (f,) = (tmp_path / "a").glob("gpu-tiny-*.json")
    res = json.loads(f.read_text())
    assert [(x["kind"], x["batch"]) for x in res["results"]] == [("decode", 1), ("decode", 4), ("prefill", 2)]
    assert res["complete"] and "lockstep_tokens_per_s" not in res["results"][0]
    assert [(e["what"], e["device_fault"]) for e in res["errors"]] == [
        ("decode batch 1 lockstep", False), ("decode batch 2", False)]
    assert "Failed in decode batch 2: RuntimeError: CUDA out of memory" in out
    assert "Failed in decode batch 1 lockstep: ValueError: the lockstep variant broke" in out
    fault = True
    argv[-1] = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gpu.main(argv)
    (f,) = (tmp_path / "b").glob("gpu-tiny-*.json")
    res = json.loads(f.read_text())
    assert not res["complete"] and res["errors"][-1] == {
        "what": "decode batch 4", "device_fault": True,
        "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert [(x["kind"], x["batch"]) for x in res["results"]] == [("decode", 1)]


def test_update_benchmarks_shows_each_runs_errors(tmp_path):
    """A run that faulted before its first figure still reaches BENCHMARKS.md: its error, beside the
    figures its session's other runs measured, each error marked with the command that met it."""
    from bench.gpu import main
    row = {"kind": "throughput", "batch": 512, "context": 1536, "tokens_per_s": 4000.0,
           "roofline_tokens_per_s": 20000.0, "roofline_bound": "memory", "fraction_of_roofline": 0.2}
    base = {"gpu": "NVIDIA H200", "model": "gpt-oss-120b", "dry_run": False, "kernels": "auto", "use_triton": True,
            "copy_bandwidth_GBps": 4300.0, "matmul_TFLOPs": 700.0}
    faulted = dict(base, date="2026-12-01T11:00:00", complete=False, command="python -m bench.gpu --phases decode",
                   results=[], errors=[{"what": "decode batch 1", "device_fault": True,
                                        "error": "RuntimeError: CUDA error: an illegal memory access"}])
    thr = dict(base, date="2026-12-01T10:50:00", complete=True, command="python -m bench.gpu --phases throughput",
               results=[row], errors=[{"what": "prefill", "device_fault": False, "error": "ValueError: x"}])
    res = tmp_path / "results"
    res.mkdir()
    for name, r in (("a", faulted), ("b", thr)):
        (res / f"gpu-{name}.json").write_text(json.dumps(r))
    bm = tmp_path / "BENCHMARKS.md"
    assert main(["--update-benchmarks", str(res), "--benchmarks-file", str(bm)]) == 0
    text = bm.read_text()
    assert "Device fault in decode batch 1: RuntimeError: CUDA error: an illegal memory access\n" in text
    assert "Failed in prefill: ValueError: x (`python -m bench.gpu --phases throughput (2026-12-01T10:50:00)`)" in text
    assert "| 4000.0 |" in text and "(cut short: the run ended before its last measurement)" in text


def test_a_device_fault_ends_only_its_process_and_a_fresh_one_measures_the_rest(tmp_path, monkeypatch, capsys):
    """On a GPU bench.gpu runs under kernels.faults' supervisor: each child process goes on from the JSON and
    the state the one before it left, without what faulted. Three children here, as the supervisor would
    start them: a fault in batch 1's padded variant, then one in batch 4's plain run."""
    from bench import gpu
    from kernels import faults
    real, calls = gpu.bench_decode, []

    def decode(model, dev, B, *args, **kw):
        name = ("lockstep" if kw.get("overlap") is False else "sampled" if kw.get("temperature") else
                "padded" if kw.get("padded") else "unfused_gate" if os.environ.get("GPTOSS_GATE_MAX_ROWS") == "0"
                else "pdl" if os.environ.get("GPTOSS_PDL") == "1"
                else "pdl_exit" if os.environ.get("GPTOSS_PDL") == "exit" else "plain")
        calls.append((B, name))
        if (B, name) in {(1, "padded"), (4, "plain")}:  # they fault in whichever process runs them
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, dev, B, *args, **kw)

    monkeypatch.setattr(gpu, "bench_decode", decode)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    peaks = iter([7.0, 3.0, 5.0])  # each child's own peak (GiB), as torch.cuda would report it on a GPU
    peak = {}
    monkeypatch.setattr(gpu, "peak_gib", lambda dev: peak["now"])
    state = tmp_path / "state.json"
    argv = ["--dry-run", "--phases", "decode,prefill", "--batches", "1,2,4", "--out", str(tmp_path / "r"),
            "--resume", str(state)]

    def child():
        peak["now"] = next(peaks)
        return gpu.main(argv)

    assert child() == faults.FAULT_EXIT
    assert calls == [(1, "plain"), (1, "lockstep"), (1, "padded")]
    assert child() == faults.FAULT_EXIT
    assert calls[3:] == [(1, "unfused_gate"), (1, "pdl"), (1, "pdl_exit"), (2, "plain"), (2, "sampled"),
                         (4, "plain")]
    capsys.readouterr()
    assert child() == 1  # nothing measured twice, nothing faulted retried; the prefill still ran
    assert len(calls) == 9
    out = capsys.readouterr().out
    (f,) = (tmp_path / "r").glob("gpu-tiny-*.json")  # one file for the run, whatever its processes
    res = json.loads(f.read_text())
    assert res["complete"] and "--resume" not in res["command"]
    assert res["peak_memory_GiB"] == 7.0  # the largest of the children's, not the last one's
    assert [(x["kind"], x["batch"]) for x in res["results"]] == [("decode", 1), ("decode", 2), ("prefill", 2)]
    b1 = res["results"][0]
    assert all(b1[f"{v}_tokens_per_s"] > 0 for v in ("lockstep", "unfused_gate", "pdl", "pdl_exit"))
    assert "padded_tokens_per_s" not in b1 and b1["overlap_speedup"] > 0
    assert [(e["what"], e["device_fault"]) for e in res["errors"]] == [("decode batch 1 padded", True),
                                                                       ("decode batch 4", True)]
    assert "Device fault in decode batch 1 padded" in out and "Device fault in decode batch 4" in out
    assert [x["what"] for x in faults.State.load(state).faults] == ["tiny decode batch 1 padded",
                                                                   "tiny decode batch 4"]


def test_a_profile_that_faults_the_device_is_not_taken_for_a_failed_profile(monkeypatch):
    """A profiler error costs only the profile, but a device fault under it must reach the measurement around it
    (bench.gpu's attempt), else the next measurement would meet it and be skipped in its place."""
    import types

    import torch

    from bench import gpu
    roof = types.SimpleNamespace(step_parts=lambda *a: {})
    prof = gpu._profiler(roof, torch.device("cpu"), 1.0, 1, [1], 1, None, "batch 1")
    for err, sticky in ((RuntimeError("CUPTI_ERROR_NOT_INITIALIZED"), False),
                        (RuntimeError("CUDA error: misaligned address"), True)):
        def profile(*args, err=err):
            raise err

        monkeypatch.setattr(gpu.step_profile, "profile", profile)
        if sticky:
            with pytest.raises(RuntimeError, match="misaligned address"):
                prof(lambda: None, 1)
        else:
            assert prof(lambda: None, 1) == {"error": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"}


def test_delete_created_removes_a_checkpoint_an_earlier_process_wrote(tmp_path, monkeypatch):
    """The child that writes the checkpoint can fault before the end; the one that finishes finds it on disk
    (not written by itself), and --delete-created must still remove it. One it did not write stays."""
    from bench import gpu
    from kernels import faults
    real, calls = gpu.bench_decode, []

    def decode(model, dev, B, *args, **kw):
        calls.append(B)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, dev, B, *args, **kw)

    monkeypatch.setattr(gpu, "bench_decode", decode)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt = tmp_path / "ckpt"
    argv = ["--dry-run", "--phases", "decode", "--batches", "1", "--lockstep-batches", "0", "--sampled-batches", "0",
            "--padded-batches", "0", "--unfused-gate-batches", "0", "--pdl-batches", "0", "--weights", "disk",
            "--ckpt-dir", str(ckpt), "--delete-created", "--out", str(tmp_path / "r")]
    assert gpu.main([*argv, "--resume", str(tmp_path / "s1")]) == faults.FAULT_EXIT
    assert (ckpt / "tiny" / "config.json").exists()  # written by the process that faulted
    assert gpu.main([*argv, "--resume", str(tmp_path / "s1")]) == 1  # the fault stays in the errors
    assert calls == [1] and not (ckpt / "tiny").exists()
    gpu.checkpoint("tiny", ckpt)  # there before the run: a later run's own child never wrote it
    assert gpu.main([*argv, "--resume", str(tmp_path / "s2")]) == 0
    assert calls == [1, 1] and (ckpt / "tiny" / "config.json").exists()
