"""bench/device_round.sh runs only on the GPU machine, whose minutes are few: a bad flag, a renamed test or a
step over the device tool's 10-minute limit would be found there. These check its commands here, without
running them: every step is reachable and in the runbook's table, every `python3 -m` call's flags parse with
that module's own parser, every CUDA test it names exists, each call's time caps fit the tool's limit, and
what the calls import loads with only the packages the GPU image has (and the wheels carried to it)."""

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # as the other kernel tests: before triton is imported anywhere

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_round.sh"
TOOL_LIMIT_S = 600  # the device tool's per-command limit
SETUP_S = 20  # a margin for what runs uncapped: the wheel install, the nvidia-smi and version lines


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


@pytest.mark.parametrize("python, says", [("/nonexistent/python", "no Python at /nonexistent/python"),
                                          ("FAKE", "pydantic is not installed in")])
def test_device_prep_names_what_is_missing_before_any_download(tmp_path, python, says):
    # Under `set -o pipefail` a failing `pip show` inside $(...) used to end the script silently.
    if python == "FAKE":
        python = tmp_path / "python"
        python.write_text("#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
        python.chmod(0o755)
    prep = ROOT / "bench" / "device_prep.sh"
    r = subprocess.run(["bash", str(prep)], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHON=str(python)))
    assert r.returncode == 2 and says in r.stderr and "make setup" in r.stderr, (r.returncode, r.stderr)


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


# the modules whose whole command line is a public function; the others' parsers live inside their main
PARSERS = {"kernels.tune": ("kernels.tune", "parse"), "bench.gpu": ("bench.gpu_args", "parse")}


def _parse(module: str, args: list[str], monkeypatch) -> argparse.Namespace:
    """`args` through `module`'s own parser, types and choices (a bad flag or value exits 2); nothing run."""
    if module in PARSERS:
        where, name = PARSERS[module]
        return getattr(importlib.import_module(where), name)(args)
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, argv=None, namespace=None):  # main's parsing, then out before any work
        raise _Parsed(real(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(_Parsed) as parsed:
        importlib.import_module(module).main(args)
    return parsed.value.args[0]


@pytest.mark.parametrize("step,cmd", CALLS, ids=[f"{s}:{c[2]}" for s, c in CALLS])
def test_python_calls_parse_with_their_modules_parsers(step, cmd, monkeypatch):
    from models.checkpoint import PRESETS
    module, args = cmd[2], cmd[3:]
    if module == "pytest":
        for node in (a for a in args if "::" in a):
            path, name = node.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), node
        return
    a = _parse(module, args, monkeypatch)
    models = getattr(a, "models", None) or getattr(a, "model", "")
    assert set(models.split(",") if isinstance(models, str) else models) <= set(PRESETS), models
    if module == "kernels.tune":
        from kernels._tune_plans import tasks
        assert tasks(a.models, a.batches, a.kernels, a.prefill_from) and a.out is None  # merges the committed file
    if module == "bench.gpu":
        assert a.out == "/tmp/out"  # what the device tool brings back


# The GPU image's Python has these distributions, with what they require, besides the standard library
# (BENCHMARKS.md, Runbook); bench/device_prep.sh carries the rest as wheels.
IMAGE = {"torch", "triton", "numpy", "safetensors", "pytest"}


def _carried() -> set[str]:
    """The distributions bench/device_prep.sh downloads as wheels."""
    return set(re.search(r"^for p in ([\w\- ]+); do", (ROOT / "bench" / "device_prep.sh").read_text(),
                         re.M).group(1).split())


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _required(dists: set[str]) -> set[str]:
    """`dists` and everything they require (extras left out), as installed here; normalised names."""
    from importlib import metadata

    from packaging.requirements import Requirement
    todo, seen = [_norm(d) for d in dists], set()
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        for spec in metadata.requires(d) or []:
            r = Requirement(spec)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(_norm(r.name))
    return seen


def _image_site(into: Path) -> set[str]:
    """A site-packages holding only what the GPU image has (links into this one's): its top-level import
    names, their .libs folders and their distributions' metadata."""
    import sysconfig
    from importlib import metadata
    dists = _required(IMAGE | _carried())
    tops = {top for top, ds in metadata.packages_distributions().items() if any(_norm(d) in dists for d in ds)}
    into.mkdir()
    for site in {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}:
        for e in site.iterdir():
            keep = (_norm(e.name.split("-")[0]) in dists if e.name.endswith(".dist-info")
                    else e.name.split(".")[0] in tops)
            if keep and not (into / e.name).exists():
                (into / e.name).symlink_to(e)
    return tops


def test_device_calls_import_only_what_the_gpu_image_has(tmp_path):
    """What the calls import (their modules, the CUDA tests' modules, the GPU group script's imports) loads
    from a site-packages with only the image's and the carried packages: Ray, FastAPI and the rest are not
    on the image. (`python -S`: this environment's site-packages stays off the path.)"""
    modules = sorted({cmd[2] for _, cmd in CALLS if cmd[2] != "pytest"})
    modules += sorted({node.split("::")[0].removesuffix(".py").replace("/", ".")
                       for _, cmd in CALLS if cmd[2] == "pytest" for node in cmd[3:] if "::" in node})
    modules += ["cluster.config", "deployments.group_engine", "engine.async_engine"]  # test_gpu_group's script
    tops = _image_site(tmp_path / "site")
    assert {"torch", "torchgen", "triton", "pydantic", "pydantic_core", "openai_harmony", "llguidance"} <= tops
    assert not {"ray", "fastapi", "transformers", "prometheus_client"} & tops
    r = _on_image(tmp_path / "site", f"import importlib\nfor m in {modules!r}: importlib.import_module(m)")
    assert r.returncode == 0, r.stderr[-3000:]


def _on_image(site: Path, code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a Python that sees `site` (_image_site) instead of this environment's site-packages."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}, **env}
    return subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(1, {str(site)!r})\n{code}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_gpu_bench_dry_run_runs_on_the_image_packages(tmp_path):
    """Past its imports: bench.gpu's whole flow (every phase, on CPU) imports nothing the image lacks."""
    _image_site(tmp_path / "site")
    code = (f"import runpy; sys.argv = ['bench.gpu', '--dry-run', '--out', {str(tmp_path / 'out')!r}]\n"
            "runpy.run_module('bench.gpu', run_name='__main__')")
    r = _on_image(tmp_path / "site", code, OMP_NUM_THREADS="1", GPTOSS_KERNELS="auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("gpu-*.json"))) == 1
