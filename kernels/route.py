"""MoE routing after the router's linear layer: top-k, softmax over the k picked, expert-load count.

torch needs five kernels for this per layer (topk, a cast, softmax, a cast
back, the load's index_add_); at batch 1 on a GPU each costs more to start than
to run, so one program per token does it all: k rounds of "take the row's
maximum, then mask it", the softmax of the k picked in fp32, and an atomic add
of the token's k experts into the load counter (skipped for padding rows).
Ties pick the lowest expert id; torch.topk leaves their order unspecified.
With `drop_masked`, padding rows route to expert id E, which no rank holds
(MoE.local_or_skip maps it to -1): a CUDA graph's padding rows then cost no
expert reads and no matmul rows, where they would otherwise pull in up to k
experts more per layer (all padding rows are the same token; at batch 3 in the
bucket of 4 about a third more MoE bytes under uniform routing).
"""

import torch

from ._triton import jit_module, launch, next_pow2, tl
from .pdl import enter as _pdl_enter


def route_reference(logits: torch.Tensor, top_k: int, load: torch.Tensor | None = None,
                    token_mask: torch.Tensor | None = None, drop_masked: bool = False):
    """MoE.route's arithmetic after its linear layer -> (idx [N, k] int64, weights [N, k] logits.dtype);
    drop_masked: rows token_mask leaves out get expert id E (none)."""
    top, idx = torch.topk(logits, top_k, dim=-1)
    if load is not None:
        ones = torch.ones_like(idx) if token_mask is None else token_mask.to(idx.dtype)[:, None].expand_as(idx)
        load.index_add_(0, idx.flatten(), ones.flatten())
    if drop_masked and token_mask is not None:
        idx = torch.where(token_mask[:, None], idx, logits.shape[-1])
    return idx, torch.softmax(top.float(), dim=-1).to(logits.dtype)


def _route_row(l_ptr, idx_ptr, w_ptr, load_ptr, mask_ptr, row, E, s_l,
               TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, HAS_LOAD: tl.constexpr,
               HAS_MASK: tl.constexpr, DROP_MASKED: tl.constexpr, L2_ONLY: tl.constexpr):
    """Route token `row`. K_PAD: TOP_K rounded up to a power of 2 (a block's length), the lanes past TOP_K
    masked. L2_ONLY: the logits were written by other programs of this launch (kernels.moe_gate), so they are
    read past this SM's L1, which may hold a stale copy."""
    e = tl.arange(0, BLOCK_E)
    if L2_ONLY:
        x = tl.load(l_ptr + row * s_l + e, mask=e < E, other=float("-inf"), cache_modifier=".cg")
    else:
        x = tl.load(l_ptr + row * s_l + e, mask=e < E, other=float("-inf"))
    x = x.to(tl.float32)
    count = 1
    if HAS_MASK:
        count = tl.load(mask_ptr + row).to(tl.int32)
    kk = tl.arange(0, K_PAD)
    km = kk < TOP_K
    vals = tl.full((K_PAD,), float("-inf"), tl.float32)  # a spare lane's softmax term is exp(-inf) = 0
    ids = tl.zeros((K_PAD,), tl.int32)
    for i in tl.static_range(TOP_K):
        m = tl.max(x, 0)
        j = tl.min(tl.where(x == m, e, BLOCK_E), 0)  # the lowest id holding the maximum
        vals = tl.where(kk == i, m, vals)
        ids = tl.where(kk == i, j, ids)
        x = tl.where(e == j, float("-inf"), x)
    # softmax of the picked logits rounded to the logits' dtype first, as torch.topk returns them
    v = vals.to(l_ptr.dtype.element_ty).to(tl.float32)
    p = tl.exp(v - tl.max(v, 0))
    p = p / tl.sum(p, 0)
    if DROP_MASKED:
        ids_out = tl.where(count != 0, ids, E)
    else:
        ids_out = ids
    tl.store(idx_ptr + row * TOP_K + kk, ids_out.to(idx_ptr.dtype.element_ty), mask=km)
    tl.store(w_ptr + row * TOP_K + kk, p.to(w_ptr.dtype.element_ty), mask=km)
    if HAS_LOAD:
        add = tl.zeros((K_PAD,), tl.int64) + count
        tl.atomic_add(load_ptr + ids, add, mask=km & (add != 0))


def _route_kernel(l_ptr, idx_ptr, w_ptr, load_ptr, mask_ptr, E, s_l,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, HAS_LOAD: tl.constexpr,
                  HAS_MASK: tl.constexpr, DROP_MASKED: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    _route_row(l_ptr, idx_ptr, w_ptr, load_ptr, mask_ptr, tl.program_id(0).to(tl.int64), E, s_l, TOP_K, K_PAD,
               BLOCK_E, HAS_LOAD, HAS_MASK, DROP_MASKED, False)


_KERNELS = ("_pdl_enter", "_route_row", "_route_kernel")


def route_triton(logits: torch.Tensor, top_k: int, load: torch.Tensor | None = None,
                 token_mask: torch.Tensor | None = None, drop_masked: bool = False):
    """logits [N, E] (last dim contiguous) -> (idx [N, k] int64, weights [N, k]); adds to `load` [E] int64;
    drop_masked: rows token_mask leaves out get expert id E (none)."""
    jit_module(globals(), _KERNELS)
    N, E = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    idx = torch.empty(N, top_k, dtype=torch.long, device=logits.device)
    w = torch.empty(N, top_k, dtype=logits.dtype, device=logits.device)
    if N:
        if load is not None and load.dtype != torch.long:
            raise ValueError(f"load must be int64, got {load.dtype}")
        launch(_route_kernel, (N,), logits, idx, w, load if load is not None else idx,
               token_mask if token_mask is not None else idx, E, logits.stride(0),
               TOP_K=top_k, K_PAD=next_pow2(top_k), BLOCK_E=max(16, next_pow2(E)), HAS_LOAD=load is not None,
               HAS_MASK=token_mask is not None, DROP_MASKED=drop_masked and token_mask is not None)
    return idx, w


__all__ = ["route_reference", "route_triton"]
