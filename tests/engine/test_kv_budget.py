"""EngineConfig.kv_cache_fraction: the KV pool sized from GPU memory (engine/kv_budget.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import kv_budget
from engine.core import EngineConfig, LLMEngine

GiB = 2**30


def test_plan_blocks_counts_what_is_used_and_what_a_step_needs():
    # 100 GiB card, 40 GiB in use (weights), 90%: 50 GiB left, less a 2 GiB step peak and a 1 GiB sliding pool
    assert kv_budget.plan_blocks(100 * GiB, 60 * GiB, 0.9, 2 * GiB, 2**20, GiB) == 47 * 1024
    assert kv_budget.plan_blocks(100 * GiB, 5 * GiB, 0.9, 0, 2**20, 0) == 0  # already past the fraction


def test_block_bytes_of_the_tiny_model(tiny_ckpt):
    from models import load_model
    m = load_model(tiny_ckpt)
    cfg = m.config
    per_layer = 2 * 16 * cfg.num_key_value_heads * cfg.head_dim * 4  # k and v, fp32
    sliding = sum(1 for i in range(cfg.num_hidden_layers) if cfg.window(i))
    assert 0 < sliding < cfg.num_hidden_layers
    assert kv_budget.block_bytes(m, 16) == (per_layer * (cfg.num_hidden_layers - sliding), per_layer * sliding)


def test_fit_takes_the_smallest_rank_and_refuses_too_little(caplog):
    cfg = EngineConfig(kv_cache_fraction=0.9, max_model_len=4096, block_size=16)
    assert kv_budget.fit(cfg, [9000, 7000, 8000]).num_blocks == 7000
    assert kv_budget.fit(EngineConfig(), [5]) == EngineConfig()  # no fraction: untouched
    assert kv_budget.fit(cfg, [None, 7000]) == cfg and "on the CPU" in caplog.text
    small = kv_budget.fit(cfg, [100])  # sequences capped below max_model_len: allowed, said
    assert small.num_blocks == 100 and "capped at 1584 tokens" in caplog.text
    with pytest.raises(ValueError, match="room for 1 KV blocks"):
        kv_budget.fit(cfg, [1])


def test_on_cpu_the_engine_keeps_num_blocks(tiny_ckpt):
    from models import load_model
    m = load_model(tiny_ckpt)
    eng = LLMEngine(m, EngineConfig(kv_cache_fraction=0.5, num_blocks=64))
    full = next(i for i in range(m.config.num_hidden_layers) if not m.config.window(i))
    assert eng.config.num_blocks == 64 and eng.executor.cache.k[full].shape[0] == 64
    assert kv_budget.measure_kv_blocks(m, eng.config) is None


def test_serve_cli_sets_the_fraction_with_gpu_only():
    from cli.generate import UsageError
    from cli.main import build_parser
    from cli.serve import build_config
    p = build_parser()
    assert build_config(p.parse_args(["serve-config", "--gpu"])).models[0].engine.kv_cache_fraction == 0.9
    assert build_config(p.parse_args(["serve-config"])).models[0].engine.kv_cache_fraction is None
    args = p.parse_args(["serve-config", "--gpu", "--kv-cache-fraction", "0.5"])
    assert build_config(args).models[0].engine.kv_cache_fraction == 0.5
    with pytest.raises(UsageError, match="--kv-cache-fraction: .*needs use_gpu"):
        build_config(p.parse_args(["serve-config", "--kv-cache-fraction", "0.5"]))


CUDA_CHECK = r"""
import json, sys, torch
from engine.core import EngineConfig, LLMEngine, output_tokens
from engine.kv_budget import block_bytes
from engine.request import GenerateRequest
from engine.sampler import SamplingParams
from models import load_model

m = load_model(sys.argv[1], torch.bfloat16, "cuda", keep_mxfp4=True)
free0, total = torch.cuda.mem_get_info()
eng = LLMEngine(m, EngineConfig(kv_cache_fraction=float(sys.argv[2]), max_tokens_per_step=256))
free1, _ = torch.cuda.mem_get_info()
full, _ = block_bytes(m, eng.config.block_size)
out = eng.generate([GenerateRequest("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                    harmony=False)])
print(json.dumps(dict(blocks=eng.config.num_blocks, full_block=full, total=total, used_before=total - free0,
                      used_after=total - free1, tokens=len(output_tokens(out["r"])))))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fraction_sizes_the_pool_on_cuda(tiny_ckpt):
    """On the GPU: the pool holds about `fraction` of the card less what was in use, the memory in use
    after allocating it stays under that fraction, and the engine serves."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0", "GPTOSS_KERNELS": "auto"}
    r = subprocess.run([sys.executable, "-c", CUDA_CHECK, str(tiny_ckpt), "0.05"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    kv = res["blocks"] * res["full_block"]
    assert res["tokens"] == 4
    assert 0.5 * (0.05 * res["total"] - res["used_before"]) < kv <= 0.05 * res["total"], res
    assert res["used_after"] <= 0.05 * res["total"] + 2**28, res  # + allocator rounding


def test_ranks_measure_and_the_driver_takes_their_answer(tiny_ckpt, monkeypatch):
    """Over rank workers each rank answers for its shard (None on CPU: num_blocks stays)."""
    from parallel.worker import RankWorkers, WorkerSpec, fit_kv
    w = RankWorkers(WorkerSpec(str(tiny_ckpt), 1, 2))
    try:
        cfg = EngineConfig(kv_cache_fraction=0.5, num_blocks=64)
        assert w.call("kv_blocks", cfg) == [None, None]
        assert fit_kv(w, cfg) == cfg
        monkeypatch.setattr(w, "call", lambda kind, payload=None, timeout=None: [900, 700])  # as GPUs would
        assert fit_kv(w, cfg).num_blocks == 700
    finally:
        monkeypatch.undo()
        w.shutdown()


def test_serve_cli_engine_sizes():
    from cli.generate import UsageError
    from cli.main import build_parser
    from cli.serve import build_config
    p = build_parser()
    eng = build_config(p.parse_args(["serve-config", "--gpu", "--max-num-seqs", "256", "--max-tokens-per-step",
                                     "4096", "--max-model-len", "32768"])).models[0].engine
    assert (eng.max_num_seqs, eng.max_tokens_per_step, eng.max_model_len) == (256, 4096, 32768)
    assert build_config(p.parse_args(["serve-config"])).models[0].engine == EngineConfig()  # unset: defaults
    with pytest.raises(UsageError, match="^--max-num-seqs: "):
        build_config(p.parse_args(["serve-config", "--max-num-seqs", "0"]))
    off = build_config(p.parse_args(["serve-config", "--max-draft-tokens", "0"]))
    assert off.models[0].engine.max_draft_tokens == 0
    with pytest.raises(UsageError, match="^--max-draft-tokens: "):
        build_config(p.parse_args(["serve-config", "--max-draft-tokens", "-1"]))
