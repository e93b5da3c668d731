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
