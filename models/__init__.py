"""gpt-oss model: config, checkpoint reading/writing, torch implementation."""

from .config import ConfigError, GptOssConfig, load_config
from .gpt_oss import GptOssForCausalLM, load_model
from .weights import CheckpointError, CheckpointReader, ShardSpec

__all__ = ["ConfigError", "CheckpointError", "CheckpointReader", "GptOssConfig", "GptOssForCausalLM",
           "ShardSpec", "load_config", "load_model"]
