"""kernels.moe's launch choices: the default tiles, the forced ones (gemv, rs, dq, split-K) that tests and
kernels.check use, the measured ones from kernels.tuned, and a step's `Plan` (which path both expert
matmuls take). Kept apart from the kernels so the tuner and the benchmarks read the same rules."""

import math
from dataclasses import dataclass

import torch

from . import tuned
from ._triton import interpreting, on_gpu, triton


def default_config(pairs: int, n_local: int, interp: bool) -> dict:
    if interp:  # the interpreter's cost grows with tile volume: smallest legal tiles
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    per_expert = pairs / max(n_local, 1)
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
    return dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def gemv_config(interp: bool = False, kernel: str = "moe_w1") -> dict:
    """The single-pair tiles of kernels.moe_gemv (BLOCK_M 1 is align's tile): 32 W1 rows (16 column pairs) or
    32 W2 rows a program, one 16-byte block each per thread at 4 warps. Not a default yet: chosen where
    kernels.tune measured it faster (kernels/configs), or forced (gemv_configs)."""
    bn = 16 if kernel == "moe_w1" else 32
    return dict(GEMV=True, BLOCK_M=1, BLOCK_N=bn, BLOCK_KB=32 if interp else 64,
                **({} if interp else dict(num_warps=4, num_stages=2)))


def gemv_configs(interp: bool = False) -> dict:
    """{kernel: config} forcing the single-pair tiles for both matmuls (kernels.tuned.forced)."""
    return {k: gemv_config(interp, k) for k in ("moe_w1", "moe_w2")}


def rs_config(interp: bool = False, kernel: str = "moe_w1", block_m: int = 16) -> dict:
    """kernels.moe_rs's tiles (weights as the MMA's register operand): 64 W1 columns (gate and linear
    rows: two 64-row operands) or 128 W2 rows a program, 4 warps (one warpgroup), 2 scale blocks a K step.
    Not a default yet: chosen where kernels.tune measured it faster, or forced (rs_configs)."""
    if interp:
        return dict(RS=True, BLOCK_M=block_m, BLOCK_N=16, NSUB=1)
    return dict(RS=True, BLOCK_M=block_m, BLOCK_N=64 if kernel == "moe_w1" else 128, NSUB=6, num_warps=4,
                num_stages=3)


def rs_configs(interp: bool = False, block_m: int = 16) -> dict:
    """{kernel: config} forcing kernels.moe_rs's tiles for both matmuls (kernels.tuned.forced)."""
    return {k: rs_config(interp, k, block_m) for k in ("moe_w1", "moe_w2")}


def dq_config(interp: bool = False, kernel: str = "moe_w1", block_m: int = 128) -> dict:
    """The MMA tiles over weights decoded once a step to bf16 (kernels.moe_dq): prefill-sized, a GEMM's
    tiles (W1's two, gate and linear, 64 columns each; W2 128), 8 warps. Not a default: chosen where
    kernels.tune measured it faster, or forced (dq_configs)."""
    if interp:
        return dict(DQ=True, BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=32)
    return dict(DQ=True, BLOCK_M=block_m, BLOCK_N=64 if kernel == "moe_w1" else 128, BLOCK_K=64, num_warps=8,
                num_stages=3)


def dq_configs(interp: bool = False, block_m: int = 128) -> dict:
    """{kernel: config} forcing the dequantized-weight tiles for both matmuls (kernels.tuned.forced)."""
    return {k: dq_config(interp, k, block_m) for k in ("moe_w1", "moe_w2")}


def split_configs(interp: bool = False, splits: int = 4) -> dict:
    """{kernel: config} forcing the MMA tiles split over K in both matmuls (kernels.tuned.forced): the
    default tiles at BLOCK_M 16 with SPLIT_K. Not a default: chosen where kernels.tune measured it faster."""
    base = default_config(1, 1, interp)
    return {k: dict(base, SPLIT_K=splits) for k in ("moe_w1", "moe_w2")}


def tuning_shape(H: int, I: int, n_local: int, top_k: int, dtype) -> str:
    return tuned.shape_key(H=H, I=I, E=n_local, top_k=top_k, dtype=dtype)


def configs_for(n_tokens: int, H: int, I: int, n_local: int, top_k: int, x: torch.Tensor, interp: bool):
    """(w1 config, w2 config): the measured ones for this device and shape (kernels.tuned), else the default.

    Both or neither: the two kernels must agree on BLOCK_M (align's tiles) and on the path (GEMV, RS, DQ or
    none), since each path hands W2 its own activations (DQ: W2's decode reuses W1's scratch)."""
    shape = tuning_shape(H, I, n_local, top_k, x.dtype)
    c1 = tuned.lookup("moe_w1", shape, n_tokens, x.device)
    c2 = tuned.lookup("moe_w2", shape, n_tokens, x.device)
    if (c1 is not None and c2 is not None and c1["BLOCK_M"] == c2["BLOCK_M"]
            and all(bool(c1.get(p)) == bool(c2.get(p)) for p in ("GEMV", "RS", "DQ"))):
        return c1, c2
    d = default_config(n_tokens * top_k, n_local, interp)
    return d, d


def k_split(K: int, splits: int, block_k: int) -> int:
    """K per split: a whole number of K steps (the last split shorter, or empty)."""
    return triton.cdiv(triton.cdiv(K, splits), block_k) * block_k


def launch_args(cfg: dict) -> tuple[dict, dict]:
    """-> (constexprs, launch options)."""
    return ({k: v for k, v in cfg.items() if k.startswith("BLOCK") or k in ("NSUB", "L2PF")},
            {k: v for k, v in cfg.items() if k.startswith("num_")})


@dataclass
class Plan:
    """One step's expert-matmul choices: configs (kernels.tuned or the default), path, tile rows."""
    cfg1: dict
    cfg2: dict
    gemv: bool  # kernels.moe_gemv: W1 takes fp16(x * 2**-XS) and hands W2 its activations so
    rs: bool  # kernels.moe_rs: W1 takes bf16(x * 2**XC), K permuted (moe_rs.act_order), and hands W2 so
    dot_bf16: bool
    scaled: bool
    dq: bool = False  # the MMA tiles over a bf16 decode of the weights (kernels.moe_dq)

    @property
    def block_m(self) -> int:
        return self.cfg1["BLOCK_M"]


def step_plan(x: torch.Tensor, N: int, E: int, I: int, k: int, scaled: bool | None) -> Plan:
    H = x.shape[1]
    if H % 32 or I % 32:
        raise ValueError(f"hidden {H} and intermediate {I} must be multiples of 32 (MXFP4 blocks)")
    interp = interpreting()
    cfg1, cfg2 = configs_for(N, H, I, E, k, x, interp)
    if (cfg1.get("GEMV") or cfg1.get("RS")) and x.dtype == torch.float32:  # both serve 16-bit activations
        cfg1 = cfg2 = default_config(N * k, E, interp)
    if cfg1.get("RS"):  # a K step of NSUB scale blocks must divide the matmul's K (W1's H, W2's I)
        cfg1, cfg2 = ({**c, "NSUB": math.gcd(c["NSUB"], K // 32)} for c, K in ((cfg1, H), (cfg2, I)))
    dq = bool(cfg1.get("DQ"))
    if dq:  # its weights are the scratch, not the checkpoint's rows: nothing of theirs to prefetch
        cfg1, cfg2 = ({k: v for k, v in c.items() if k != "L2PF"} for c in (cfg1, cfg2))
    dot_bf16 = x.dtype in (torch.bfloat16, torch.float16)
    return Plan(cfg1, cfg2, bool(cfg1.get("GEMV")), bool(cfg1.get("RS")), dot_bf16,
                (dot_bf16 and on_gpu(x)) if scaled is None else scaled, dq)
