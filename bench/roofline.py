"""What a step of gpt-oss must move and compute (`Roofline`), and the device's measured copy bandwidth
and bf16 matmul rate to set beside it: bench.gpu's roofline columns and bench.step_profile's parts."""

import time

import torch


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_bandwidth(dev: torch.device, nbytes: int, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(dev)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def matmul_flops(dev: torch.device, n: int, reps: int = 10, warm_s: float = 0.5) -> float:
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm_s:  # an idle GPU clocks down: bring it to speed first
        a @ b
        sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


class Roofline:
    """Bytes (and FLOPs) of one engine step of a gpt-oss config, weights in bf16 + MXFP4 experts."""

    def __init__(self, cfg, kv_bytes: int = 2):
        """kv_bytes: a cached value's (2: bf16; 1: an fp8 cache, EngineConfig.kv_cache_dtype)."""
        self.cfg = c = cfg
        H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
        # q, k, v, o projections and the router, bf16
        self.dense = ((c.num_attention_heads + 2 * c.num_key_value_heads) * D * H
                      + c.num_attention_heads * D * H) * 2 + c.num_local_experts * H * 2
        self.norms = 2 * H * 4  # fp32
        self.attn = self.dense + self.norms
        # 4 bits + 1 scale byte per 32 weights, bf16 biases
        self.w1, self.w2 = 2 * I * H * 17 / 32 + 2 * I * 2, I * H * 17 / 32 + H * 2
        self.expert = self.w1 + self.w2
        self.kv_token = 2 * c.num_key_value_heads * D * kv_bytes  # k and v, per layer
        self.unembed = c.vocab_size * H * 2
        self.active_params = (self.attn // 2) + c.num_experts_per_tok * 3 * I * H

    def experts_touched(self, tokens: int) -> float:
        E, k = self.cfg.num_local_experts, self.cfg.num_experts_per_tok
        return E * (1 - (1 - k / E) ** tokens)

    def step_parts(self, tokens: int, contexts: list[int], sampled: int) -> dict[str, float]:
        """Bytes one step moves, by what moves them (bench.step_profile puts kernels beside these)."""
        c, L = self.cfg, self.cfg.num_hidden_layers
        kv = 0
        for layer in range(L):
            w = c.window(layer)
            kv += sum(min(n, w) if w else n for n in contexts) * self.kv_token
        touched = self.experts_touched(tokens)
        return {"dense weights": L * self.dense, "norm weights": L * self.norms, "experts w1": L * touched * self.w1,
                "experts w2": L * touched * self.w2, "kv read": kv, "kv write": tokens * self.kv_token * L,
                "embedding": tokens * c.hidden_size * 2,
                "unembedding": self.unembed + sampled * c.vocab_size * 4 if sampled else 0}

    def step_bytes(self, tokens: int, contexts: list[int], sampled: int) -> float:
        return sum(self.step_parts(tokens, contexts, sampled).values())

    def step_flops(self, tokens: int, contexts: list[int], sampled: int) -> float:
        """contexts: one (mean) attended length per sequence; the step's tokens are its sequences'
        queries, evenly (decode: one each; a prefill chunk: its length each)."""
        c = self.cfg
        queries = tokens / max(len(contexts), 1)
        attn = queries * sum(4 * c.num_attention_heads * c.head_dim * (min(n, c.window(i)) if c.window(i) else n)
                             for i in range(c.num_hidden_layers) for n in contexts)
        unembed_params = c.vocab_size * c.hidden_size
        return 2 * self.active_params * c.num_hidden_layers * tokens + attn + 2 * sampled * unembed_params
