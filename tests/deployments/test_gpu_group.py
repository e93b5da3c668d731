"""A replica group with use_gpu runs its model on the GPU: bf16 with MXFP4 experts (the Triton
kernels' path), warmed up (kernels compiled, decode graphs captured) before its first request.
Without a GPU it refuses to start with a message that says why."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.config import ModelGroupConfig


def test_group_runtime_follows_use_gpu():
    cpu, gpu = ModelGroupConfig(), ModelGroupConfig(use_gpu=True)
    assert (cpu.device, cpu.dtype) == ("cpu", "float32")
    assert (gpu.device, gpu.dtype) == ("cuda", "bfloat16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_group_without_cuda_refuses_to_start(tiny_ckpt):
    from deployments.serve_app import ReplicaGroup  # the Serve replica builds its engine through group_engine
    with pytest.raises(RuntimeError, match="use_gpu is set but this replica sees no CUDA device"):
        ReplicaGroup({"path": str(tiny_ckpt), "use_gpu": True})


def test_group_engine_over_local_ranks(tiny_ckpt):
    from deployments.group_engine import build_group_engine
    from engine.core import output_tokens
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams
    req = GenerateRequest("r", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), harmony=False)
    one, _ = build_group_engine(ModelGroupConfig(path=str(tiny_ckpt)))
    two, workers = build_group_engine(ModelGroupConfig(path=str(tiny_ckpt), ep=2))
    try:
        assert workers is not None and output_tokens(two.generate([req])["r"]) == output_tokens(one.generate([req])["r"])
    finally:
        two.shutdown()


CUDA_GROUP = r"""
import asyncio, json, sys, torch
from cluster.config import ModelGroupConfig
from deployments.group_engine import build_group_engine
from engine.async_engine import AsyncEngine
from engine.request import GenerateRequest
from engine.sampler import SamplingParams

cfg = ModelGroupConfig(path=sys.argv[1], use_gpu=True,
                       engine={"block_size": 16, "num_blocks": 64, "max_tokens_per_step": 64, "max_model_len": 512})
eng, workers = build_group_engine(cfg)  # what ReplicaGroup runs, without Ray (not on the GPU image)
model, served = eng.executor.model, AsyncEngine(eng)

async def main():
    req = GenerateRequest("g", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          harmony=False)
    return [o async for o in served.generate(req)]

outs = asyncio.run(main())
served.shutdown()
print(json.dumps(dict(device=model.device.type, dtype=str(model.dtype), overlap=eng.overlap,
                      graphs=len(eng.executor.graphs.graphs) if eng.executor.graphs else 0,
                      tokens=sum(len(o.token_ids) for o in outs), finished=outs[-1].finished)))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_group_serves_on_the_gpu(tiny_ckpt):
    env = {**os.environ, "TRITON_INTERPRET": "0", "GPTOSS_KERNELS": "auto"}
    r = subprocess.run([sys.executable, "-c", CUDA_GROUP, str(tiny_ckpt)], cwd=Path(__file__).parents[2], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["device"] == "cuda" and res["dtype"] == "torch.bfloat16" and res["overlap"]
    assert res["graphs"] > 0 and res["tokens"] == 6 and res["finished"], res
