"""bench/device_round.sh runs only on the GPU machine, whose minutes are few: a bad flag, a renamed test or a
step over the device tool's 10-minute limit would be found there. These check its commands here, without
running them: every step is reachable and in the runbook's table, every `python3 -m` call's flags parse with
that module's own parser, every CUDA test it names exists, and each call's time caps fit the tool's limit."""

import argparse
import importlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # as the other kernel tests: before triton is imported anywhere

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_round.sh"
TOOL_LIMIT_S = 600  # the device tool's per-command limit
SETUP_S = 20  # the wheel install and the nvidia-smi/version lines before the first capped run


def _steps() -> dict[str, list[str]]:
    """step -> its case branch's commands, continuation lines joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    body = text[text.index("case $step in\n"):]
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"^(\w+)\)\n(.*?)^\s*;;", body, re.S | re.M):
        lines = [ln.split(" #")[0].strip() for ln in m.group(2).splitlines()]
        out[m.group(1)] = [ln for ln in lines if ln and not ln.startswith("#")]
    return out


def _runs(step: str) -> list[tuple[int, list[list[str]]]]:
    """The step's `run CAP CMD` lines as (cap, [argv]): a `bash -c '...; ...'` is split into its commands."""
    out = []
    for line in _steps()[step]:
        argv = shlex.split(line.replace("$OUT", "/tmp/out").replace('"', ""))
        if argv[:1] != ["run"]:
            continue
        cap, cmd = int(argv[1]), argv[2:]
        cmds = [shlex.split(c) for c in cmd[2].split(";") if c.strip()] if cmd[:2] == ["bash", "-c"] else [cmd]
        out.append((cap, cmds))
    return out


STEPS = list(_steps())
CALLS = [(step, cmd) for step in STEPS for _, cmds in _runs(step) for cmd in cmds if cmd[:2] == ["python3", "-m"]]


def test_every_step_is_listed_validated_and_in_the_runbook():
    text = SCRIPT.read_text()
    usage = set(re.search(r'usage: bench/device_round.sh ([\w|]+)"', text).group(1).split("|"))
    accepted = set(re.search(r"case \$step in ([\w|]+)\) ;;", text).group(1).split("|"))
    runbook = set(re.findall(r"^\| `(\w+)` \|", (ROOT / "BENCHMARKS.md").read_text(), re.M))
    assert set(STEPS) == usage == accepted == runbook, (STEPS, usage, accepted, runbook)
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_an_unknown_step_is_refused_before_any_work(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "tunning"], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, OUT=str(tmp_path)))
    assert r.returncode == 2 and "unknown step tunning" in r.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("step", STEPS)
def test_each_call_fits_the_tool_limit_as_the_runbook_says(step):
    """The caps, one after another, plus the setup, stay inside one device command; the runbook's table
    quotes the same total in minutes."""
    caps = sum(cap for cap, _ in _runs(step))
    assert 0 < caps + SETUP_S <= TOOL_LIMIT_S, (step, caps)
    row = re.search(rf"^\| `{step}` \|.*\(([\d.]+)\) \|$", (ROOT / "BENCHMARKS.md").read_text(), re.M)
    assert row and abs(float(row.group(1)) - caps / 60) < 0.05, (step, caps, row and row.group(0))


class _Parsed(Exception):
    pass


def _parse(module: str, args: list[str]) -> argparse.Namespace:
    """`module`'s main(args) up to its argument parsing: its own parser, types and choices, nothing run."""
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, argv=None, namespace=None):
        raise _Parsed(real(self, argv, namespace))

    mod = importlib.import_module(module)
    argparse.ArgumentParser.parse_args = parse_args
    try:
        mod.main(args)
    except _Parsed as p:
        return p.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{module}.main parsed no arguments")


@pytest.mark.parametrize("step,cmd", CALLS, ids=[f"{s}:{c[2]}" for s, c in CALLS])
def test_python_calls_parse_with_their_modules_parsers(step, cmd):
    from models.checkpoint import PRESETS
    module, args = cmd[2], cmd[3:]
    if module == "pytest":
        for node in (a for a in args if "::" in a):
            path, name = node.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), node
        return
    a = _parse(module, args)  # a bad flag or value exits 2 here
    models = getattr(a, "models", None) or getattr(a, "model", "")
    assert set(models.split(",") if isinstance(models, str) else models) <= set(PRESETS), models
    if module == "kernels.tune":
        from kernels._tune_plans import tasks
        from kernels.tune import parse
        t = parse(args)
        assert tasks(t.models, t.batches, t.kernels, t.prefill_from) and t.out is None  # merges the committed file
    if module == "bench.gpu":
        from bench.gpu_args import parse
        assert parse(args).out == "/tmp/out"  # what the device tool brings back
