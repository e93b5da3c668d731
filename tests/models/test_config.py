import json

import pytest

from models.checkpoint import PRESETS
from models.config import ConfigError, config_from_dict, load_config


def test_hf_and_original_dicts_agree():
    cfg = PRESETS["gpt-oss-20b"]
    assert config_from_dict(cfg.to_hf_dict()) == cfg
    assert config_from_dict(cfg.to_original_dict()) == cfg
    assert cfg.window(0) == 128 and cfg.window(1) is None


def test_transformers_v5_rope_parameters_are_read():
    d = PRESETS["tiny"].to_hf_dict()
    rope = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {**rope, "rope_theta": 10000.0}
    cfg = config_from_dict(d)
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling.factor == 32.0


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "num_experts_per_tok", "vocab_size"])
def test_missing_field_is_named(field):
    d = PRESETS["tiny"].to_hf_dict()
    del d[field]
    with pytest.raises(ConfigError, match=f"missing required field '{field}'"):
        config_from_dict(d)


def test_missing_field_original_layout():
    d = PRESETS["tiny"].to_original_dict()
    del d["experts_per_token"]
    d["num_local_experts"] = 8  # still detected as...? no: now looks like HF, which lacks num_experts_per_tok
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        config_from_dict(d)
    d = PRESETS["tiny"].to_original_dict()
    del d["head_dim"]
    del d["num_experts"]
    d["experts_per_token"] = 4
    with pytest.raises(ConfigError):
        config_from_dict(d)


@pytest.mark.parametrize("patch,needle", [
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"num_experts_per_tok": 9}, "exceeds num_local_experts"),
    ({"layer_types": ["full_attention"]}, "layer_types has 1 entries"),
    ({"hidden_size": -1}, "hidden_size must be positive"),
    ({"layer_types": ["full_attention", "global"]}, "layer_types"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope_type"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
])
def test_inconsistent_fields(patch, needle):
    d = PRESETS["tiny"].to_hf_dict()
    d.update(patch)
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(d)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)
