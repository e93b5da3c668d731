"""The one place that chooses between the Triton kernels and the torch references.

    from kernels import dispatch
    dispatch.use_triton(device) -> bool
    dispatch.paged_attention(q, k_cache, v_cache, block_table, query_start, context_lens, sinks,
                             window, scale, max_query_len=None) -> [N, Hq, D]
    dispatch.moe(x, routing, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, *, top_k=4,
                 global_to_local=None, limit=7.0, alpha=1.702, residual=None) -> [N, H]
    dispatch.moe_block(o, residual, mlp_norm, router_w, router_b, w1_blocks, ..., b2, *, top_k, global_to_local,
                       load, token_mask, drop_masked, limit, alpha, norm) -> residual + o + moe(...) [, its norm]
    dispatch.fuses_gate(x) -> bool: whether moe_block's one-launch gate takes this step
    dispatch.rmsnorm(x, weight, eps, residual=None) -> out | (out, x + residual)
    dispatch.rope(q, k, cos, sin) -> (q, k) rotated (q [N, Hq, D], k [N, K, D], cos/sin [N, D/2])
    dispatch.rope_into_cache(q, k, v, cos, sin, k_cache, v_cache, slots) -> q rotated; k (rotated), v stored
    dispatch.sample(x, inv_temperature, keys) -> [B] token ids drawn from softmax(x * inv_temperature)
    dispatch.linear(x, weight, bias=None) -> F.linear, or kernels/linear.py where a measured config says

Each call runs the Triton kernel when `use_triton(device)`, else the torch
reference beside it (kernels/attention.py, moe.py, rmsnorm.py, rope.py), whose numbers
are the model's. GPTOSS_KERNELS picks: `auto` (default; Triton on CUDA when
triton imports), `torch` (always the references), `triton` (always Triton; on
CPU only under TRITON_INTERPRET=1, which is how the tests run the kernels).

(These live in kernels.dispatch, not kernels/__init__: a function `kernels.moe`
would be overwritten by the submodule kernels/moe.py as soon as it is imported.)

Where models/ calls these (each site keeps the model's own torch code for
the torch mode, so CPU numbers are unchanged and no site can recurse: the
references here never call back into the modules):

* PagedMetadata.attend, after writing the new k/v into their slots ->
  paged_attention(..., max_query_len=meta.max_query_len) (the executor passes
  it from its CPU tensors; 1 under CUDA graphs, so no host read).
* MoE.compute (packed MXFP4 experts) -> moe(x, (idx, weights), ...), and the
  expert-parallel MoE.run_experts -> moe(rows, (local_ids[:, None], ones), top_k=1,
  global_to_local=None). Dense (unquantised) experts keep the torch path.
* Block.forward, where fuses_gate (a decode step's few rows) and the MoE is single-process and packed ->
  MoE.forward_block -> moe_block: the MLP's residual add and norm, the router, routing and align in one
  launch (kernels/moe_gate.py), then the experts as moe.
* RMSNorm.forward -> rmsnorm(x, ...); Block.forward fuses the residual add into
  the MoE's norm: h, x = rmsnorm(attn_out, w, eps, residual=x).
* Rotary.apply_qk (Attention.forward's rotation of q and k) -> rope(q, k, cos, sin): one launch
  for both, instead of the ~14 small kernels of two torch rotations; over the paged cache,
  PagedMetadata.rope_into_cache -> rope_into_cache: the rotation and both cache writes in one; in a
  decode step PagedMetadata.rotate_and_attend -> paged_attention(..., rope=...): all of it in the
  attention's launch.
* QKVLinear, RowLinear, MoE.route's router and the unembedding (PackedLinear off its oneDNN path) ->
  linear(x, w, b): kernels/linear.py only where kernels.tune wrote an entry (it beat cuBLAS), else F.linear.
* engine.sampler.Sampler, for sampled rows that only scale by temperature, when
  engine.sampler_state.SamplerState gives them Philox keys (it does where use_triton) -> sample(x, inv_t, keys):
  one pass per row.

Decode steps are replayed as CUDA graphs per batch bucket by engine.executor.LocalExecutor
(kernels.cuda_graphs.DecodeGraphRunner); those steps need the Triton path, which has no host syncs.
"""

import functools
import os

import torch

MODES = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:  # importing (not just finding) it: a broken install must mean torch, not a crash mid-step
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(device) -> bool:
    """True when the Triton kernels should run for tensors on `device` (see GPTOSS_KERNELS above)."""
    mode = os.environ.get("GPTOSS_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"GPTOSS_KERNELS={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "torch":
        return False
    on_cuda = torch.device(device).type == "cuda"
    if mode == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("GPTOSS_KERNELS=triton but triton is not installed")
    if not on_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("GPTOSS_KERNELS=triton on a non-CUDA device needs TRITON_INTERPRET=1")
    return True


def linear(x, weight, bias=None):
    """F.linear, or kernels.linear's launch where use_triton and kernels.tune measured it faster than
    cuBLAS for this GPU, shape and row count (kernels/configs): a decode step's weight streams."""
    if use_triton(x.device):
        from . import linear as lin
        return lin.linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def paged_attention(q, k_cache, v_cache, block_table, query_start, context_lens, sinks, window, scale,
                    max_query_len: int | None = None, rope=None) -> torch.Tensor:
    """rope = (k, v, cos, sin, slots): q and k not yet rotated; rotate both and store k and v at their cache
    slots first (rope_into_cache), in the attention's own launch on the Triton path (decode steps)."""
    from . import attention
    if use_triton(q.device):
        return attention.paged_attention(q, k_cache, v_cache, block_table, query_start, context_lens, sinks,
                                         window, scale, max_query_len=max_query_len, rope=rope)
    if rope is not None:
        from .rope import rope_into_cache_reference
        k, v, cos, sin, slots = rope
        q = rope_into_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    return attention.paged_attention_reference(q, k_cache, v_cache, block_table, query_start, context_lens,
                                               sinks, window, scale)


def moe(x, routing, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, *, top_k: int = 4,
        global_to_local=None, limit: float = 7.0, alpha: float = 1.702, residual=None, norm=None):
    """routing: router logits [N, E_global] (routed as MoE.route) or (idx [N, k], weights [N, k]);
    residual: return residual + the MoE output (fused into the kernel's combine); norm (weight, eps),
    with residual: return (that sum, its RMSNorm) (fused too)."""
    from . import moe as m
    if use_triton(x.device):
        return m.moe_mxfp4(x, routing, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, top_k=top_k,
                           global_to_local=global_to_local, limit=limit, alpha=alpha, residual=residual,
                           norm=norm)
    idx, weights = m.route(routing, top_k, x.dtype) if isinstance(routing, torch.Tensor) else routing
    out = m.moe_reference(x, idx, weights, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                          global_to_local=global_to_local, limit=limit, alpha=alpha)
    out = out if residual is None else residual + out
    return out if norm is None else (out, rmsnorm(out, norm[0], norm[1]))


def fuses_gate(x) -> bool:
    """Whether moe_block's fused gate (kernels/moe_gate.py) takes a step of x's rows: the Triton path, at
    most GATE_MAX_ROWS rows (GPTOSS_GATE_MAX_ROWS overrides it; 0 turns the fusion off, for A/B runs)."""
    if not use_triton(x.device):
        return False
    from .moe_gate import fused_rows
    return fused_rows(x.shape[0])


def moe_block(o, residual, mlp_norm, router_w, router_b, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, *,
              top_k: int = 4, global_to_local=None, load=None, token_mask=None, drop_masked: bool = False,
              limit: float = 7.0, alpha: float = 1.702, norm=None):
    """A block's MLP half from the attention output: x = residual + o, h = rmsnorm(x) (mlp_norm: weight, eps),
    routed (as route) and through the experts (as moe) -> x + moe(h), or with norm (that, its rmsnorm)."""
    from . import moe as m
    if use_triton(o.device):
        return m.moe_block_mxfp4(o, residual, mlp_norm, router_w, router_b, w1_blocks, w1_scales, b1, w2_blocks,
                                 w2_scales, b2, top_k=top_k, global_to_local=global_to_local, load=load,
                                 token_mask=token_mask, drop_masked=drop_masked, limit=limit, alpha=alpha,
                                 norm=norm)
    from .moe_gate import gate_reference
    x, h, idx, w = gate_reference(o, residual, mlp_norm[0], mlp_norm[1], router_w, router_b, top_k, load,
                                  token_mask, drop_masked)
    out = x + m.moe_reference(h, idx, w, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                              global_to_local=global_to_local, limit=limit, alpha=alpha)
    return out if norm is None else (out, rmsnorm(out, norm[0], norm[1]))


def rmsnorm(x, weight, eps: float, residual=None):
    from . import rmsnorm as r
    if use_triton(x.device):
        return r.rmsnorm_triton(x, weight, eps, residual)
    return r.rmsnorm_reference(x, weight, eps, residual)


def route(logits, top_k: int, load=None, token_mask=None, drop_masked: bool = False):
    """Top-k of router logits, softmax over the picked, expert-load count -> (idx [N, k], weights [N, k]);
    drop_masked: rows token_mask leaves out (padding) get expert id E, which no rank holds."""
    from . import route as r
    if use_triton(logits.device):
        return r.route_triton(logits, top_k, load, token_mask, drop_masked)
    return r.route_reference(logits, top_k, load, token_mask, drop_masked)


def rope(q, k, cos, sin):
    from . import rope as r
    if use_triton(q.device):
        return r.rope_triton(q, k, cos, sin)
    return r.rope_reference(q, k, cos, sin)


def rope_into_cache(q, k, v, cos, sin, k_cache, v_cache, slots):
    """Rotate q and k, store k and v at their cache slots -> the rotated q (kernels/rope.py)."""
    from . import rope as r
    if use_triton(q.device):
        return r.rope_into_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slots)
    return r.rope_into_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slots)


def sample(x: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Exact draws from softmax(x * inv_temperature), one per row, keyed per row (kernels/sample.py)."""
    from . import sample as s
    if use_triton(x.device):
        return s.sample_triton(x, inv_temperature, keys)
    return s.sample_reference(x, inv_temperature, keys)


__all__ = ["fuses_gate", "moe", "moe_block", "paged_attention", "rmsnorm", "rope", "rope_into_cache", "route", "sample",
           "triton_available", "use_triton"]
