"""Logits parity with Hugging Face transformers' GptOssForCausalLM (fp32)."""

import pytest
import torch

from models import load_model
from models.checkpoint import make_checkpoint
from models.config import GptOssConfig, RopeScaling

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # GQA 3:1, top-2 of 6, YaRN with truncation and a tiny original context, window 5
    "gqa_yarn_trunc": GptOssConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=24, num_local_experts=6, num_experts_per_tok=2, sliding_window=5,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"), rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=8.0, beta_fast=16.0, beta_slow=2.0, original_max_position_embeddings=64,
                                 truncate=True), max_position_embeddings=512),
    # no GQA, top-k = all experts, plain RoPE, non-alternating layer types
    "mha_topall_norope_scaling": GptOssConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, head_dim=8, num_local_experts=4, num_experts_per_tok=4, sliding_window=3,
        layer_types=("full_attention", "sliding_attention"), rope_theta=500.0,
        rope_scaling=RopeScaling(factor=1.0), max_position_embeddings=256),
    # MQA, 16 experts top-3, gpt-oss YaRN (factor 32, no truncation), 4 layers
    "mqa_gptoss_yarn": GptOssConfig(
        vocab_size=2048, hidden_size=96, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, num_local_experts=16, num_experts_per_tok=3, sliding_window=7,
        layer_types=("sliding_attention", "full_attention") * 2, rope_theta=150000.0,
        rope_scaling=RopeScaling(factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096,
                                 truncate=False), max_position_embeddings=131072),
}


def hf_logits(path, ids):
    m = transformers.GptOssForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(ids[None]).logits[0].float()


def assert_close(ours, ref):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert torch.isfinite(ours).all()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3e} vs logits scale {scale:.3e}"


def _ids(cfg, n=24, seed=0):
    return torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_bf16_experts(tmp_path, name):
    cfg = CONFIGS[name]
    path = make_checkpoint(tmp_path / name, cfg, "hf", "bf16", seed=3)
    ids = _ids(cfg)
    assert ids.numel() > cfg.sliding_window
    assert_close(load_model(path).logits(ids), hf_logits(path, ids))


@pytest.mark.parametrize("name", ["gqa_yarn_trunc", "mqa_gptoss_yarn"])
def test_parity_mxfp4_checkpoint(tmp_path, name):
    cfg = CONFIGS[name]
    path = make_checkpoint(tmp_path / name, cfg, "hf", "mxfp4", seed=5)
    ids = _ids(cfg, 30, seed=1)
    ref = hf_logits(path, ids)
    assert_close(load_model(path).logits(ids), ref)
    # keeping the experts packed (decoded per forward) is the same function
    assert_close(load_model(path, keep_mxfp4=True).logits(ids), ref)


def test_parity_tiny_demo_preset(tiny_ckpt):
    ids = _ids(load_model(tiny_ckpt).config, 40, seed=2)
    assert_close(load_model(tiny_ckpt).logits(ids), hf_logits(tiny_ckpt, ids))


def test_parity_on_checkpoint_written_by_transformers(tmp_path):
    hcfg = transformers.GptOssConfig(
        vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=5, num_experts_per_tok=2, sliding_window=4)
    torch.manual_seed(0)
    m = transformers.GptOssForCausalLM(hcfg).eval()
    with torch.no_grad():  # transformers' init is tiny (std 0.02): widen it so the comparison means something
        for p in m.parameters():
            p.normal_(0, 0.3)
    m.save_pretrained(tmp_path / "hfmodel")
    ids = _ids(load_model(tmp_path / "hfmodel").config, 20)
    with torch.no_grad():
        ref = m(ids[None]).logits[0]
    assert ref.std() > 0.1
    assert_close(load_model(tmp_path / "hfmodel").logits(ids), ref)


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_original_layout_gives_identical_logits(tmp_path, experts):
    cfg = CONFIGS["mqa_gptoss_yarn"]
    hf = make_checkpoint(tmp_path / "hf", cfg, "hf", experts, seed=7)
    orig = make_checkpoint(tmp_path / "orig", cfg, "original", experts, seed=7)
    ids = _ids(cfg, 20)
    a, b = load_model(hf).logits(ids), load_model(orig).logits(ids)
    assert torch.equal(a, b)


def test_snapshot_with_both_layouts(tmp_path):
    """An HF snapshot (root + original/) loads from the root and from original/ alike."""
    cfg = CONFIGS["gqa_yarn_trunc"].model_copy(update={"layer_types": ("sliding_attention", "full_attention") * 1 +
                                                       ("sliding_attention",),
                                                       "rope_scaling": RopeScaling(factor=4.0, truncate=False)})
    snap = make_checkpoint(tmp_path / "snap", cfg, "both", "mxfp4", seed=1)
    ids = _ids(cfg)
    assert torch.equal(load_model(snap).logits(ids), load_model(snap / "original").logits(ids))


def test_bf16_model_close_to_fp32(tiny_ckpt):
    ids = _ids(load_model(tiny_ckpt).config, 16)
    a = load_model(tiny_ckpt).logits(ids)
    b = load_model(tiny_ckpt, dtype=torch.bfloat16).logits(ids)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.1 * a.abs().max()
