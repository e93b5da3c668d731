"""Greedy generation through the engine over rank workers equals one process."""

import json
import subprocess
import sys

import pytest
import torch

from engine.core import EngineConfig, build_engine, output_tokens
from engine.request import GenerateRequest
from engine.sampler import SamplingParams


def _reqs():
    g = torch.Generator().manual_seed(5)
    return [GenerateRequest(f"r{i}", torch.randint(0, 199000, (n,), generator=g).tolist(),
                            SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), harmony=False)
            for i, (n, m) in enumerate([(5, 12), (23, 8), (40, 20), (9, 15), (17, 4), (33, 10)])]


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    e = build_engine(tiny_ckpt, EngineConfig(block_size=4, max_tokens_per_step=32))
    return {k: output_tokens(v) for k, v in e.generate(_reqs()).items()}


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1), (2, 2)])
def test_engine_over_ranks_matches_one_process(tiny_ckpt, reference, tp, ep):
    e = build_engine(tiny_ckpt, EngineConfig(block_size=4, max_tokens_per_step=32), tp=tp, ep=ep)
    try:
        got = {k: output_tokens(v) for k, v in e.generate(_reqs()).items()}
        load = e.expert_load()
    finally:
        e.shutdown()
    assert got == reference
    assert int(load.sum()) > 0


def test_cli_generate_ep2_tp2_equals_single(tiny_ckpt):
    base = [sys.executable, "-m", "cli.main", "generate", "--model", str(tiny_ckpt), "--temperature", "0",
            "--max-tokens", "24", "--max-reasoning-tokens", "6", "--json", "--prompt", "Hello there"]
    one = subprocess.run(base + ["--tp", "1", "--ep", "1"], capture_output=True, text=True, timeout=300)
    two = subprocess.run(base + ["--tp", "2", "--ep", "2"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a == b and a["usage"]["completion_tokens"] > 0
