"""The engine of one replica group, built from its typed config, without Ray: a group of one rank
runs its model in this process; larger groups drive rank workers made by `make_workers`
(Ray actors in a Serve replica, deployments.ray_workers)."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from cluster.config import ModelGroupConfig

log = logging.getLogger(__name__)


def build_group_engine(cfg: ModelGroupConfig, make_workers: Callable | None = None):
    """-> (LLMEngine, rank workers or None). On GPUs (use_gpu): bf16 with MXFP4 experts, the Triton
    kernels' path, and the group warms up (kernels compiled, decode graphs captured, on every rank)
    before it returns; without CUDA a one-rank group refuses to start."""
    from cli.main import resolve_model
    from engine.core import LLMEngine, engine_over_workers
    from models import load_model
    path = resolve_model(cfg.path)
    dtype, keep_mxfp4 = getattr(torch, cfg.dtype), True if cfg.use_gpu else None
    if cfg.world == 1:
        torch.set_num_threads(max(1, int(cfg.cpus_per_rank)))
        if cfg.use_gpu and not torch.cuda.is_available():
            raise RuntimeError(f"model group '{cfg.name}': use_gpu is set but this replica sees no CUDA "
                               "device (is the GPU resource available to Ray?)")
        llm = LLMEngine(load_model(path, dtype, cfg.device, keep_mxfp4=keep_mxfp4), cfg.engine)
        if cfg.use_gpu:
            log.info("model group '%s' warmed up: %s", cfg.name, llm.warmup())
        return llm, None
    from parallel.worker import RankWorkers, WorkerSpec
    spec = WorkerSpec(str(path), cfg.tp, cfg.ep, dtype=dtype, device=cfg.device, keep_mxfp4=keep_mxfp4,
                      attn_dp=cfg.attn_dp)
    workers = (make_workers or RankWorkers)(spec)
    try:
        llm = engine_over_workers(workers, cfg.engine)
    except BaseException:
        workers.shutdown()
        raise
    if cfg.use_gpu:
        try:
            log.info("model group '%s' warmed up: %s", cfg.name, llm.warmup())
        except BaseException:
            llm.shutdown()  # the rank workers hold GPUs
            raise
    return llm, workers
