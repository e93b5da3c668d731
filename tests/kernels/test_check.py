"""kernels.check: the kernels against their references at given shapes (real ones on a GPU);
here its dry run on tiny shapes under the interpreter, and its verdict on a wrong kernel."""

import pytest

from kernels import check

pytest.importorskip("triton")


def test_dry_run_passes_every_case(capsys):
    assert check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny ")]
    assert len(rows) == 42 and all(line.endswith("| ok |") for line in rows)
    assert "attention decode + rotary window" in out and "attention decode + rotary full" in out
    assert all(f"attention {w} fp8 KV {x}" in out for w in ("decode + rotary", "prefill+decode")
               for x in ("window", "full"))
    assert "moe split-K tokens=1" in out and "moe split-K tokens=5" in out
    assert "moe gate block rows=1" in out and "moe gate block rows=5" in out
    assert "moe tokens=24" in out and "moe ep2 rank rows=24" in out and "moe gemv tokens=1" in out
    assert "moe rs tokens=24" in out and "attention prefill+decode window" in out
    assert "moe dq tokens=5" in out and "moe dq tokens=24" in out
    assert "sample rows=24 vocab=3000" in out
    assert all(f"linear {w} rows={n}" in out for w in ("qkv", "o", "router", "unembed") for n in (1, 5))
    assert "linear router split-K rows=1" in out and "linear o split-K rows=1" in out


def only(monkeypatch, *families):
    """The dry run's cases of these families (a name holds one of the words), and rmsnorm's: a
    correct kernel run beside the wrong one, which must still pass. The whole dry run is the test
    above; each of these costs its families' seconds, not all 42 cases'."""
    real = check.cases
    monkeypatch.setattr(check, "cases", lambda *a: [(n, run) for n, run in real(*a)
                                                    if any(w in n for w in (*families, "rmsnorm"))])


def control_passed(out: str) -> bool:
    return any(ln.startswith("| tiny rmsnorm+residual") and ln.endswith("| ok |") for ln in out.splitlines())


def test_a_wrong_kernel_fails(monkeypatch, capsys):
    only(monkeypatch, " moe ")
    from kernels import moe
    real = moe.moe_mxfp4
    def wrong(*a, **kw):  # 3% off (bf16 cases allow ~1.3%), in whichever of its forms (the sum, or (sum, its
        out = real(*a, **kw)  # norm)) is asked for
        return tuple(t * 1.03 for t in out) if isinstance(out, tuple) else out * 1.03
    monkeypatch.setattr(moe, "moe_mxfp4", wrong)
    assert check.main(["--dry-run"]) == 1
    out = capsys.readouterr().out
    # the 3 token counts, the 2 single-pair (gemv), 2 rs, 2 split-K, 2 dq and the 2 EP rank cases
    assert "| tiny moe tokens=1 |" in out and "FAIL" in out and "13 of the cases failed" in out
    assert control_passed(out)


def test_a_wrong_gate_fails(monkeypatch, capsys):
    from kernels import moe
    real = moe.moe_block_mxfp4
    monkeypatch.setattr(moe, "moe_block_mxfp4", lambda *a, **kw: tuple(t * 1.03 for t in real(*a, **kw)))
    only(monkeypatch, " moe gate ", " moe tokens=")
    assert check.main(["--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "| tiny moe gate block rows=1 |" in out and "2 of the cases failed" in out
    assert control_passed(out)


def test_a_wrong_linear_fails(monkeypatch, capsys):
    from kernels import linear
    real = linear.linear
    monkeypatch.setattr(linear, "linear", lambda *a, **kw: real(*a, **kw) * 1.01)
    only(monkeypatch, " linear ")
    assert check.main(["--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "| tiny linear qkv rows=1 |" in out and "10 of the cases failed" in out
    assert control_passed(out)


def test_verdict_allows_twice_the_bf16_reference_error():
    import torch
    ref = torch.tensor([1.0, -2.0, 4.0])
    assert check.verdict(ref + 0.004, ref, ref + 0.002)[2]        # 1e-3 vs 5e-4: within 2x + 1e-3
    assert not check.verdict(ref + 0.04, ref, ref + 0.002)[2]     # 1e-2: not
    assert not check.verdict(ref * float("nan"), ref, ref)[2]


def test_cli_errors_name_the_flag(capsys):
    for argv, says in ((["--models", "gpt-oss-120b,nope"], "argument --models: unknown model nope"),
                       (["--tokens", "8,x"], "argument --tokens: expected integers >= 1")):
        with pytest.raises(SystemExit) as e:
            check.main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert check.main([]) == 2 and "no CUDA device" in capsys.readouterr().err
