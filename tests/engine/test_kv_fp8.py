"""EngineConfig.kv_cache_dtype "fp8": the KV pools in float8 e4m3 (models.attention.to_cache), end to end.

The attention over the rounded values is checked in tests/models/test_forward_paged.py (paged fp8 = the
full forward over e4m3-rounded k and v) and the kernels' bytes in tests/kernels (test_rope, test_attention,
test_model_wiring); here: the engine, its memory plan, the CLI and the config."""

import pytest
import torch
from pydantic import ValidationError

from engine import kv_budget
from engine.core import EngineConfig, LLMEngine
from engine.request import GenerateRequest
from engine.sampler import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def _greedy(model, kv_cache_dtype):
    eng = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=4, max_tokens_per_step=16,
                                        kv_cache_dtype=kv_cache_dtype))
    g = torch.Generator().manual_seed(5)
    reqs = [GenerateRequest(f"r{i}", torch.randint(0, 199998, (n,), generator=g).tolist(),
                            SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True),
                            harmony=False) for i, n in enumerate((21, 7, 12))]
    outs = eng.generate(reqs)
    return eng, {rid: [lp["logprob"] for o in os_ for lp in o.logprobs] for rid, os_ in outs.items()}, outs


def test_engine_runs_on_an_fp8_pool(tiny_ckpt):
    """Chunked prefill and decode of three sequences (windows sliding past freed blocks) on fp8 pools: every
    pool is float8 e4m3 and written; every request completes; the chosen tokens' logprobs differ from the
    same run on a pool in the model's dtype (the rounding is in effect)."""
    from models import load_model
    m = load_model(tiny_ckpt)
    eng, lp8, outs = _greedy(m, "fp8")
    cache = eng.executor.cache
    assert all(t.dtype == torch.float8_e4m3fn for t in cache.k + cache.v)
    assert all(t.view(torch.uint8)[1:].any() for t in cache.k + cache.v)  # beyond the null block
    assert all(sum(len(o.token_ids) for o in os_) == 6 for os_ in outs.values())
    _, lp, _ = _greedy(m, "auto")
    assert lp8 != lp
    assert all(len(a) == len(b) == 6 for a, b in zip(lp8.values(), lp.values()))


def test_fp8_halves_a_bf16_block_and_the_config_refuses_other_dtypes(tiny_ckpt):
    from models import load_model
    m32, m16 = load_model(tiny_ckpt), load_model(tiny_ckpt, dtype=torch.bfloat16)
    f32, f16, f8 = (kv_budget.block_bytes(m, 16, d) for m, d in ((m32, "auto"), (m16, "auto"), (m16, "fp8")))
    assert f8 == tuple(x // 2 for x in f16) == tuple(x // 4 for x in f32)
    assert kv_budget.block_bytes(m32, 16, "fp8") == f8
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp16")


def test_cli_flag_reaches_the_serve_config(capsys):
    import yaml

    from cli.main import build_parser, main
    from cli.serve import build_config
    p = build_parser()
    assert build_config(p.parse_args(["serve-config"])).models[0].engine.kv_cache_dtype == "auto"
    cfg = build_config(p.parse_args(["serve-config", "--kv-cache-dtype", "fp8"]))
    assert cfg.models[0].engine.kv_cache_dtype == "fp8"
    assert main(["serve-config", "--kv-cache-dtype", "fp8"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert "'kv_cache_dtype': 'fp8'" in str(doc)
    with pytest.raises(SystemExit):
        p.parse_args(["serve-config", "--kv-cache-dtype", "fp16"])
    assert "--kv-cache-dtype: invalid choice: 'fp16'" in capsys.readouterr().err


FP8_CUDA = r"""
import json, sys, torch
from models import load_model
from tests.engine.test_kv_fp8 import _greedy
m = load_model(sys.argv[1], dtype=torch.float32, device="cuda", keep_mxfp4=True)
eng, lp, outs = _greedy(m, "fp8")
print(json.dumps(dict(lp=lp, dtypes=sorted({str(t.dtype) for t in eng.executor.cache.k + eng.executor.cache.v}),
                      tokens={k: [t for o in v for t in o.token_ids] for k, v in outs.items()})))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_and_triton_paths_agree_on_an_fp8_pool_on_cuda(tiny_ckpt):
    """On a GPU the torch path (GPTOSS_KERNELS=torch: its cache writes and gathers through the pool's bytes)
    and the Triton kernels run the same fp32 engine on fp8 pools: same tokens, logprobs within 1e-3 (the
    stored bytes are the same; only the attention's summation order differs). Fresh processes with
    TRITON_INTERPRET=0, CUDA graphs off in both."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    res = {}
    for kernels in ("torch", "triton"):
        env = {**os.environ, "TRITON_INTERPRET": "0", "GPTOSS_KERNELS": kernels, "GPTOSS_CUDA_GRAPHS": "0"}
        r = subprocess.run([sys.executable, "-c", FP8_CUDA, str(tiny_ckpt)], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{kernels}: {r.stderr[-4000:]}"
        res[kernels] = json.loads(r.stdout.strip().splitlines()[-1])
    a, b = res["torch"], res["triton"]
    assert a["dtypes"] == b["dtypes"] == ["torch.float8_e4m3fn"]
    assert a["tokens"] == b["tokens"]
    assert max(abs(x - y) for k in a["lp"] for x, y in zip(a["lp"][k], b["lp"][k])) <= 1e-3
