"""kernels.linear (Triton interpreter) against F.linear, and the dispatch that picks it only where a
measured config exists."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from kernels import _triton, tuned  # noqa: E402
from kernels.linear import MAX_ROWS, linear, linear_reference, linear_triton, tuning_shape  # noqa: E402


def _case(M, N, K, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.1).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("M,N,K,cfg", [
    (1, 40, 96, dict(BLOCK_N=16, BLOCK_K=32)),     # N and K past the last full tile
    (3, 64, 64, dict(BLOCK_N=32, BLOCK_K=64)),     # one K step
    (17, 24, 80, dict(BLOCK_N=16, BLOCK_K=32, BLOCK_M=16)),  # two row tiles
    (17, 40, 96, dict(BLOCK_N=16, BLOCK_K=32, BLOCK_M=16, L2PF=True)),  # and W's rows asked of L2 first
])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear_fp32(M, N, K, cfg, bias):
    x, w, b = _case(M, N, K, bias=bias, seed=M)
    torch.testing.assert_close(linear_triton(x, w, b, cfg), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_bf16_within_the_bf16_reference_error():
    x, w, b = _case(5, 48, 128, torch.bfloat16)
    out = linear_triton(x, w, b, dict(BLOCK_N=16, BLOCK_K=64))
    assert out.dtype == torch.bfloat16
    ref = linear_reference(x, w, b)
    err, err_torch = (out.float() - ref).abs().max(), (F.linear(x, w, b).float() - ref).abs().max()
    assert err <= 2 * err_torch + 1e-3, (err, err_torch)


def test_strided_rows_and_a_bad_shape():
    x, w, b = _case(4, 32, 64)
    wide = torch.randn(4, 100)
    wide[:, 10:74] = x
    torch.testing.assert_close(linear_triton(wide[:, 10:74], w, b, dict(BLOCK_N=16, BLOCK_K=32)), F.linear(x, w, b),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        linear_triton(x, w[:, :32], b, dict(BLOCK_N=16, BLOCK_K=32))


def test_linear_runs_the_kernel_only_with_a_measured_config():
    """No entry: F.linear (cuBLAS on a GPU), not a launch. An entry for the shape and batch bucket: the
    kernel. Rows past MAX_ROWS: F.linear whatever the file says."""
    x, w, b = _case(2, 32, 64)
    with _triton.recording() as launches:
        linear(x, w, b)
    assert launches == []
    cfg = dict(BLOCK_N=16, BLOCK_K=32)
    with tuned.forced({"linear": cfg}), _triton.recording() as launches:
        linear(x, w, b)
    assert [fn.__name__ for fn, _, _ in launches] == ["_linear_kernel"]
    with tuned.forced({"linear": cfg}):
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        big = torch.randn(MAX_ROWS + 1, 64)
        with _triton.recording() as launches:
            linear(big, w, b)
        assert launches == []


def test_entry_is_found_by_shape_and_batch(tmp_path, monkeypatch):
    import json
    x, w, b = _case(3, 32, 64)
    shape = tuning_shape(32, 64, True, torch.float32)
    (tmp_path / "c.json").write_text(json.dumps(dict(entries=[
        dict(kernel="linear", shape=shape, batch=8, config=dict(BLOCK_N=16, BLOCK_K=32))])))
    monkeypatch.setenv(tuned.ENV, str(tmp_path / "c.json"))
    tuned.clear_cache()
    try:
        with _triton.recording() as launches:
            linear(x, w, b)       # 3 rows: the bucket of 8
            linear(x, w, None)    # no bias: another shape, no entry
            linear(torch.randn(33, 64), w, b)  # past the largest bucket's reach (tuned.REACH)
        assert [fn.__name__ for fn, _, _ in launches] == ["_linear_kernel"]
    finally:
        tuned.clear_cache()


SPLITS = [  # K past a whole number of splits of whole steps; N past the last tile; two row tiles
    (3, 40, 200, dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)),
    (17, 40, 200, dict(BLOCK_N=16, BLOCK_K=32, BLOCK_M=16, SPLIT_K=3)),
    (5, 24, 64, dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=3)),  # splits of one step: the third is empty
]


@pytest.mark.parametrize("M,N,K,cfg", SPLITS)
@pytest.mark.parametrize("bias", [True, False])
def test_split_k_matches_f_linear_fp32_in_one_launch(M, N, K, cfg, bias):
    x, w, b = _case(M, N, K, bias=bias, seed=M)
    with tuned.forced({"linear": cfg}), _triton.recording() as launches:
        linear(x, w, b)
    assert [fn.__name__ for fn, _, _ in launches] == ["_linear_kernel"]  # the reduction is in the same launch
    assert launches[0][2]["SPLIT_K"] == cfg["SPLIT_K"]
    torch.testing.assert_close(linear_triton(x, w, b, cfg), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_split_k_counters_reset_themselves_for_the_next_launch():
    """The tile tickets are zeroed once, not per call: each tile's last program sets its ticket back to
    0, so a second launch (a CUDA graph replay) on the same counters reduces again, to the same bits."""
    M, N, K, cfg = SPLITS[1]
    x, w, b = _case(M, N, K)
    first = linear_triton(x, w, b, cfg)
    counters = _triton.tickets(x.device, 1)
    tiles = -(-N // cfg["BLOCK_N"]) * -(-M // cfg["BLOCK_M"])
    assert counters.numel() >= tiles and not counters.any()
    again = linear_triton(x, w, b, cfg)
    assert _triton.tickets(x.device, 1) is counters and not counters.any()
    assert torch.equal(first, again)


def test_split_k_bf16_within_the_bf16_reference_error():
    """Splits of 64, 64 and 32."""
    x, w, b = _case(5, 48, 160, torch.bfloat16)
    out = linear_triton(x, w, b, dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=3))
    assert out.dtype == torch.bfloat16
    ref = linear_reference(x, w, b)
    err, err_torch = (out.float() - ref).abs().max(), (F.linear(x, w, b).float() - ref).abs().max()
    assert err <= 2 * err_torch + 1e-3, (err, err_torch)


@pytest.mark.parametrize("N,K,cfg", [
    (40, 96, dict(BLOCK_N=16, BLOCK_K=32)),  # N and K past the last full tile
    (24, 64, dict(BLOCK_N=8, BLOCK_K=64)),  # one K step
    (40, 96, dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)),  # split over K, the tile's last program sums
    (40, 96, dict(BLOCK_N=16, BLOCK_K=32, L2PF=True)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_one_row_matches_f_linear(N, K, cfg, bias):
    """GEMV: one row's products summed in registers, no MMA: F.linear within fp32 rounding (another
    summation order); bf16 within the bf16 reference's error."""
    x, w, b = _case(1, N, K, bias=bias, seed=N)
    cfg = dict(cfg, GEMV=True)
    with _triton.capturing() as launches:
        linear_triton(x, w, b, cfg)
    assert launches[0][3]["GEMV"] and launches[0][3]["BLOCK_M"] == 1
    torch.testing.assert_close(linear_triton(x, w, b, cfg), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    xb, wb, bb = (t.to(torch.bfloat16) if t is not None else None for t in (x, w, b))
    ref = linear_reference(x, w, b)
    err = (linear_triton(xb, wb, bb, cfg).float() - ref).abs().max()
    assert err <= 1.5 * (F.linear(xb, wb, bb).float() - ref).abs().max() + 1e-2
    with pytest.raises(ValueError, match="one row"):
        linear_triton(torch.cat([x, x]), w, b, cfg)


def test_a_gemv_entry_serves_one_row_only(tmp_path, monkeypatch):
    """A GEMV entry (bucket 1, which reaches 4 rows) runs the kernel at one row; at 2 the call is F.linear."""
    import json
    x, w, b = _case(2, 40, 96)
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(dict(entries=[dict(kernel="linear", shape=tuning_shape(40, 96, True, torch.float32),
                                                  batch=1, config=dict(GEMV=True, BLOCK_N=16, BLOCK_K=32), us=1.0)])))
    monkeypatch.setenv(tuned.ENV, str(path))
    tuned.clear_cache()
    for rows, kernel in ((1, True), (2, False)):
        with _triton.capturing() as launches:
            out = linear(x[:rows], w, b)
        assert bool(launches) == kernel, rows
        if not kernel:
            assert torch.equal(out, F.linear(x[:rows], w, b))
    tuned.clear_cache()


_FP32_PTX = """
import torch, triton
from triton.backends.compiler import GPUTarget
from kernels import _triton, aot, linear
x, w = torch.empty(16, 256, device="meta"), torch.empty(64, 256, device="meta")
with _triton.recording() as launches:
    linear.linear_triton(x, w, None, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64))
(c,) = aot.bind([("fp32", launches)])
k = triton.compile(c.src, target=GPUTarget("cuda", 90, 32), options=c.options.__dict__)
print("tf32" if "tf32" in k.asm["ptx"] else "no tf32")
"""


def test_fp32_activations_take_an_fp32_dot_on_the_gpu():
    """A GPU's fp32 tl.dot defaults to tf32 (10-bit mantissas), which the interpreter never shows; fp32
    activations must get F.linear's fp32 arithmetic. Compiled for sm_90 in a fresh process (the suite's
    triton.language is interpreted), its PTX is checked for tf32."""
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _FP32_PTX], env=env, cwd=Path(__file__).resolve().parents[2],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["no", "tf32"], r.stdout
