"""Which tuned kernel paths a decode step takes on a device (bench.gpu records it beside each figure)."""

import torch


def paths(cfg, batch: int, dev: torch.device, dtype=torch.bfloat16) -> dict:
    """{"moe": "gemv" | "tuned" | "default", "moe_config": the W1 config or None, "linears": the decode
    linears with a kernels.linear entry at this batch (the others run cuBLAS)}."""
    from kernels import _tune_cases as cases, linear, tuned
    from kernels.moe import tuning_shape
    shape = tuning_shape(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                         dtype)
    w1, w2 = (tuned.lookup(k, shape, batch, dev) for k in ("moe_w1", "moe_w2"))
    moe = "default" if w1 is None or w2 is None else "gemv" if w1.get("GEMV") else "tuned"
    lin = [which for which in cases.LINEARS if batch <= linear.MAX_ROWS and tuned.lookup(
        "linear", linear.tuning_shape(*cases.linear_shape(cfg, which), dtype), batch, dev) is not None]
    return {"moe": moe, "moe_config": w1 if moe != "default" else None, "linears": lin}
