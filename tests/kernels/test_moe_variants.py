"""bench.moe_variants flow on CPU (tiny preset, interpreter): every variant runs, checked and tabled."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from bench import moe_variants  # noqa: E402


def test_dry_run_checks_every_variant(capsys):
    assert moe_variants.main(["--dry-run", "--tokens", "1,5"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 5 ")]
    assert [r.split("|")[3].strip() for r in rows] == ["own", "scaled", "gemv", "rs", "split", "dq"] * 2
    for r in rows:  # both within bf16 rounding of the fp32 reference
        assert float(r.split("|")[5]) < 3e-2, r


def test_errors_are_measured_not_assumed():
    rows = list(moe_variants.run("tiny", [3], "cpu", torch.bfloat16))
    assert {r["variant"] for r in rows} == {"own", "scaled", "gemv", "rs", "split", "dq"}
    assert all(0 < r["rel_err"] < 3e-2 and r["us"] > 0 and r["experts"] >= 4 for r in rows)


def test_bad_tokens_name_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        moe_variants.main(["--dry-run", "--tokens", "1,x"])
    assert e.value.code == 2 and "--tokens" in capsys.readouterr().err
