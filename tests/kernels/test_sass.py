"""kernels.sass: the longest loop of a kernel's SASS, compiled for sm_90 without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.sass import (Loop, bytes_per_iteration, instructions, longest_loop, macs_per_iteration, opcode, per_byte,
                          per_kmac)

ROOT = Path(__file__).resolve().parents[2]

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   IMAD R2, R0, 0x4, RZ ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   HFMA2 R6, R4, R5, R6 ;
        /*0050*/               @P0 BRA 0x30 ;
        /*0060*/                   FADD R7, R6, R6 ;
        /*0070*/              @!P1 BRA 0x60 ;
        /*0080*/                   EXIT ;
"""


def test_longest_backward_branch_is_the_loop():
    ins = instructions(SASS)
    assert len(ins) == 9 and ins[3] == (0x30, "LDG.E.128 R4, desc[UR4][R2.64]")
    body = longest_loop(ins)
    assert [opcode(t) for t in body] == ["LDG", "HFMA2", "BRA"]
    assert longest_loop(instructions(SASS.replace("BRA 0x30", "BRA 0x80").replace("BRA 0x60", "BRA 0x90"))) == []
    # a longer loop that stores (an epilogue's, a row at a time) is not the main loop
    tail = SASS.replace("FADD R7, R6, R6", "STG.E desc[UR4][R2.64], R6").replace("BRA 0x60", "BRA 0x10")
    assert [opcode(t) for t in longest_loop(instructions(tail))] == ["LDG", "HFMA2", "BRA"]
    assert len(longest_loop(instructions(tail.replace("HFMA2 R6", "STG.E R6")))) == 7  # all store: the longest


def test_cli_reports_the_gemv_loop():
    """The single-pair W2 tiles at 120b batch 1: their PTX block's half2 FMAs (16 per 16-byte block) and
    table lookups are what the loop issues. Under 0.19 warp-instructions a weight byte: with the lookup
    table's register rematerialised before each lookup (the half a constant, not kernels.moe_gemv.lut's
    words) the served default issued 0.205."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "kernels.sass", "--kernel", "_w2_gemv_kernel", "--use", "120b gemv d1",
                        "--ops"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    head, ops = r.stdout.splitlines()[:2]
    n = int(head.split("loop ")[1].split()[0])
    assert 50 < n < 200, head
    assert "HFMA2 16" in ops and "PRMT" in ops, ops
    assert head.endswith("of the issue rate at copy bandwidth)"), head
    assert float(head.split("; ")[1].split()[0]) < 0.19, head
    bad = subprocess.run([sys.executable, "-m", "kernels.sass", "--kernel", "_nope_kernel"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no planned configuration" in bad.stderr


def test_macs_per_iteration_of_the_expert_tiles():
    """W1's tile holds gate and linear columns (2 BLOCK_N); rs tiles step NSUB 32-value blocks; no tensor
    cores, no figure."""
    assert macs_per_iteration("_w1_kernel", "TOP_K=4 BLOCK_M=64 BLOCK_N=64 BLOCK_K=64 DQ=False w4 s3") == 64 * 128 * 64
    assert macs_per_iteration("_w2_kernel", "TOP_K=1 BLOCK_M=256 BLOCK_N=128 BLOCK_K=64 w8 s3") == 256 * 128 * 64
    assert macs_per_iteration("_w2_rs_kernel", "BLOCK_M=128 BLOCK_N=128 NSUB=6 PTX=True w8 s3") == 128 * 128 * 192
    assert macs_per_iteration("_w1_rs_kernel", "BLOCK_M=16 BLOCK_N=32 NSUB=2 w4 s3") == 16 * 64 * 64
    assert macs_per_iteration("_w1_gemv_kernel", "BLOCK_M=1 BLOCK_N=16 BLOCK_KB=64 w4 s2") is None
    lp = Loop("_w1_kernel", "TOP_K=4 BLOCK_M=64 BLOCK_N=64 BLOCK_K=64 w4 s3", "", 598, 1840, None)
    assert per_kmac(lp) == pytest.approx(1000 * 598 * 4 / (64 * 128 * 64))
    assert per_kmac(Loop("_w1_gemv_kernel", "BLOCK_M=1 w4", "", 109, 376, None)) is None


def test_bytes_per_iteration_of_the_gemv_tiles():
    """A single-pair tile's K step reads BLOCK_KB bytes of each row: W1's 2 BLOCK_N (gate and linear), W2's
    BLOCK_N; the tensor-core tiles have their MACs instead."""
    cfg = "TOP_K=4 BLOCK_M=1 BLOCK_N=16 BLOCK_KB=128 PTX=True w4 s4"
    assert bytes_per_iteration("_w1_gemv_kernel", cfg) == 2 * 16 * 128
    assert bytes_per_iteration("_w2_gemv_kernel", cfg) == 16 * 128
    assert bytes_per_iteration("_w1_kernel", "BLOCK_M=16 BLOCK_N=64 BLOCK_K=64 w4 s3") is None
    assert per_byte(Loop("_w1_gemv_kernel", cfg, "", 185, 560, None)) == pytest.approx(185 * 4 / 4096)
    assert per_byte(Loop("_w1_rs_kernel", "BLOCK_M=16 BLOCK_N=32 NSUB=2 w4 s3", "", 271, 900, None)) is None


def test_cli_reports_the_rs_prefill_tile_under_the_tensor_cores_time():
    """rs at BLOCK_M 128 (a prefill chunk's candidate): its weight decode (~2.25 instructions a value,
    kernels.moe_rs) serves 128 tokens, so the loop issues less than the tensor cores take (BENCHMARKS.md,
    "Prefill expert matmuls")."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "kernels.sass", "--kernel", "_w1_rs_kernel", "--use", "rs128 p8192"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.splitlines()[0]
    per = float(line.split("; ")[1].split()[0])
    ratio = float(line.split("(")[-1].split("x")[0])
    assert 0.5 < per < 1.9 and ratio < 1, line
