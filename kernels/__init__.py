"""Triton kernels for gpt-oss serving (paged attention with sinks, MXFP4 MoE, fused RMSNorm).

Call them through `kernels.dispatch`, which picks Triton on CUDA and the torch
reference elsewhere and documents how models/ should wire them in. Each kernel
module holds its kernel and the torch reference it is tested against;
`kernels.cuda_graphs` replays decode steps as CUDA graphs per batch bucket.
Launch configs are hand-written defaults unless `python -m kernels.tune` has
measured this GPU (kernels/configs/<GPU>.json, read through `kernels.tuned`).
Nothing here imports triton until a kernel is launched.
"""

from .dispatch import use_triton

__all__ = ["use_triton"]
