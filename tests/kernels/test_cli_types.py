"""The kernel and benchmark tools refuse a bad list flag through argparse, naming it (kernels/_cli.py)."""

import argparse

import pytest

from bench import gpu_args
from kernels import _cli, tune


def test_types_accept_and_refuse():
    assert _cli.counts()("1,8, 64,") == [1, 8, 64]
    assert _cli.counts(none_ok=True)("0") == [0] and _cli.counts(none_ok=True)("") == []
    assert _cli.presets("gpt-oss-120b,tiny") == ["gpt-oss-120b", "tiny"]
    assert _cli.one_of(("moe", "attn"))("attn,moe") == {"moe", "attn"}
    for conv, bad in ((_cli.counts(), "0"), (_cli.counts(), "8,x"), (_cli.counts(), ""),
                      (_cli.counts(none_ok=True), "-1"), (_cli.presets, "gpt-oss-120b,nope"), (_cli.presets, ","),
                      (_cli.one_of(("moe",)), "moe,mlp")):
        with pytest.raises(argparse.ArgumentTypeError):
            conv(bad)


@pytest.mark.parametrize("parse", [tune.parse, gpu_args.parse], ids=["kernels.tune", "bench.gpu"])
@pytest.mark.parametrize("flags, says", [
    (["--models", "nope"], "argument --models: unknown model nope"),
    (["--batches", "0"], "argument --batches: expected integers >= 1"),
    (["--batches", "1,x"], "argument --batches: expected integers >= 1"),
])
def test_tools_name_the_bad_flag(parse, flags, says, capsys):
    with pytest.raises(SystemExit) as e:
        parse(flags)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_lists_convert_and_dry_run_defaults_still_apply(capsys):
    a = tune.parse(["--dry-run"])
    assert (a.models, a.batches) == (["tiny"], [1, 8])  # DRY, not the GPU defaults
    a = tune.parse(["--models", "gpt-oss-20b", "--batches", "8,1,8", "--kernels", "moe,gate"])
    assert (a.models, a.batches, a.kernels) == (["gpt-oss-20b"], [8, 1], {"moe", "gate"})
    with pytest.raises(SystemExit):
        tune.parse(["--kernels", "moe,mlp"])
    assert "argument --kernels: unknown mlp (choose from moe, gate, attn, linear)" in capsys.readouterr().err
    b = gpu_args.parse(["--dry-run"])
    assert b.models == ["tiny"] and b.batches == [1, 2, 4]
    b = gpu_args.parse(["--pdl-batches", "0", "--models", "gpt-oss-120b"])  # "0 for none" lists take 0
    assert b.pdl_batches == [0] and b.models == ["gpt-oss-120b"] and b.batches == [1, 8, 64, 256]


def test_single_numbers_and_layouts(capsys):
    assert _cli.at_least(0)("0") == 0 and _cli.tp_x_ep("2X4") == (2, 4)
    for conv, bad in ((_cli.at_least(1), "0"), (_cli.at_least(1), "1.5"), (_cli.tp_x_ep, "3x"),
                      (_cli.tp_x_ep, "0x2"), (_cli.tp_x_ep, "2x2x2")):
        with pytest.raises(argparse.ArgumentTypeError):
            conv(bad)
    from bench import engine_overhead
    for argv, says in ((["--ranks", "3x"], "argument --ranks: expected TPxEP"),
                       (["--steps", "0"], "argument --steps: expected an integer >= 1")):
        with pytest.raises(SystemExit) as e:
            engine_overhead.main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err
