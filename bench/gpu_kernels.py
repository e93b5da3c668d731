"""Which tuned kernel paths a decode step takes on a device (bench.gpu records it beside each figure)."""

import torch


def paths(cfg, batch: int, dev: torch.device, dtype=torch.bfloat16) -> dict:
    """{"moe": "gemv" | "rs" | "tuned" | "default", "moe_config": the W1 config or None, "linears": the decode
    linears with a kernels.linear entry at this batch (the others run cuBLAS)}, by the launchers' own
    lookups (kernels.moe_configs.configs_for, kernels.linear.entry). One process: every expert local."""
    from kernels import _tune_cases as cases, linear
    from kernels.moe_configs import configs_for, default_config
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    w1, _ = configs_for(batch, cfg.hidden_size, cfg.intermediate_size, E, k, torch.empty(0, dtype=dtype, device=dev),
                    False)
    path = "gemv" if w1.get("GEMV") else "rs" if w1.get("RS") else None
    moe = path or ("default" if w1 == default_config(batch * k, E, False) else "tuned")
    lin = [which for which in cases.LINEARS if linear.entry(*cases.linear_shape(cfg, which), batch, dtype, dev)]
    return {"moe": moe, "moe_config": None if moe == "default" else w1, "linears": lin}
