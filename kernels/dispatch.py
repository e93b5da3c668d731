"""The one place that chooses between the Triton kernels and the torch references.

    from kernels import dispatch
    dispatch.use_triton(device) -> bool
    dispatch.paged_attention(q, k_cache, v_cache, block_table, query_start, context_lens, sinks,
                             window, scale, max_query_len=None) -> [N, Hq, D]
    dispatch.moe(x, routing, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, *, top_k=4,
                 global_to_local=None, limit=7.0, alpha=1.702) -> [N, H]
    dispatch.rmsnorm(x, weight, eps, residual=None) -> out | (out, x + residual)

Each call runs the Triton kernel when `use_triton(device)`, else the torch
reference beside it (kernels/attention.py, moe.py, rmsnorm.py), whose numbers
are the model's. GPTOSS_KERNELS picks: `auto` (default; Triton on CUDA when
triton imports), `torch` (always the references), `triton` (always Triton; on
CPU only under TRITON_INTERPRET=1, which is how the tests run the kernels).

(These live in kernels.dispatch, not kernels/__init__: a function `kernels.moe`
would be overwritten by the submodule kernels/moe.py as soon as it is imported.)

Wiring into models/. Kernel modules are imported lazily, so `from kernels
import dispatch` at the top of models/attention.py or models/layers.py makes
no import cycle. The torch paths never call PagedMetadata.attend, MoE.compute
or RMSNorm.forward, so calling these from there cannot recurse; still, keep
the model's own torch code for CPU where it is cheaper (attend caches its plan
per layer group; the reference rebuilds it per call):

* PagedMetadata.attend, after writing the new k/v into their slots:
      if dispatch.use_triton(q.device):
          return dispatch.paged_attention(q, kc, vc, self.block_tables[group], self.query_start,
                                          self.context_lens, sinks, window, scale,
                                          max_query_len=self._vl.qmax)
* MoE.compute(x, idx, weights), packed experts only (self.w1_blocks present):
      if dispatch.use_triton(x.device):
          return dispatch.moe(x, (idx, weights), self.w1_blocks, self.w1_scales, self.b1,
                              self.w2_blocks, self.w2_scales, self.b2, top_k=self.top_k,
                              global_to_local=self.global_to_local, limit=self.limit, alpha=self.alpha)
  MoE.run_experts(rows, local_ids) (expert-parallel path: unweighted, ids already local) is
      dispatch.moe(rows, (local_ids[:, None], rows.new_ones(len(rows), 1)), <same weights>,
                   top_k=1, global_to_local=None)
  Dense (unquantised) experts keep the module's torch path.
* Block.forward, fusing the residual add into the next norm:
      h, x = dispatch.rmsnorm(attn_out, self.mlp_norm.weight, self.mlp_norm.eps, residual=x)
  gives h = mlp_norm(x + attn_out) and x = x + attn_out, rounded as the unfused code rounds them.

Decode steps can be replayed as CUDA graphs per batch bucket: kernels.cuda_graphs.DecodeGraphRunner.
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


def paged_attention(q, k_cache, v_cache, block_table, query_start, context_lens, sinks, window, scale,
                    max_query_len: int | None = None) -> torch.Tensor:
    from . import attention
    if use_triton(q.device):
        return attention.paged_attention(q, k_cache, v_cache, block_table, query_start, context_lens, sinks,
                                         window, scale, max_query_len=max_query_len)
    return attention.paged_attention_reference(q, k_cache, v_cache, block_table, query_start, context_lens,
                                               sinks, window, scale)


def moe(x, routing, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, *, top_k: int = 4,
        global_to_local=None, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """routing: router logits [N, E_global] (routed as MoE.route) or (idx [N, k], weights [N, k])."""
    from . import moe as m
    if use_triton(x.device):
        return m.moe_mxfp4(x, routing, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, top_k=top_k,
                           global_to_local=global_to_local, limit=limit, alpha=alpha)
    idx, weights = m.route(routing, top_k, x.dtype) if isinstance(routing, torch.Tensor) else routing
    return m.moe_reference(x, idx, weights, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                           global_to_local=global_to_local, limit=limit, alpha=alpha)


def rmsnorm(x, weight, eps: float, residual=None):
    from . import rmsnorm as r
    if use_triton(x.device):
        return r.rmsnorm_triton(x, weight, eps, residual)
    return r.rmsnorm_reference(x, weight, eps, residual)


__all__ = ["moe", "paged_attention", "rmsnorm", "triton_available", "use_triton"]
