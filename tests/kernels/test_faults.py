"""kernels.faults: a device fault in kernels.check or kernels.tune ends only its own process; a fresh one
goes on without the faulting case or group. No GPU here: the faults are raised where a launch would raise
them, with the driver's text, and the supervisor runs real child processes."""

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from kernels import faults

ROOT = Path(__file__).resolve().parents[2]
ILLEGAL = "CUDA error: an illegal memory access was encountered"


@pytest.mark.parametrize("err,sticky", [
    (RuntimeError(ILLEGAL), True),
    (RuntimeError("Triton Error [CUDA]: misaligned address"), True),
    (RuntimeError("Triton Error [CUDA]: an illegal instruction was encountered"), True),
    (RuntimeError("CUDA error: unspecified launch failure"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448"), False),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),  # the context survives an OOM
    (ValueError("an illegal memory access was encountered"), False),  # not a launcher's error type
])
def test_sticky_errors_are_the_ones_that_lose_the_context(err, sticky):
    assert faults.is_sticky(err) is sticky


def _child(tmp_path, body: str) -> None:
    (tmp_path / "fake_run.py").write_text(textwrap.dedent("""\
        import sys
        from pathlib import Path
        from kernels import faults
        st = faults.State.load(Path(sys.argv[sys.argv.index("--resume") + 1]))
        """) + textwrap.dedent(body))


def test_supervisor_restarts_a_faulted_child_until_it_finishes(tmp_path, monkeypatch, capfd):
    _child(tmp_path, """\
        assert sys.argv[1:3] == ["--flag", "x"]
        if len(st.faults) < 2:  # two faults, each recorded, then a clean finish
            st.finish(f"case {len(st.done)}")
            st.fault(faults.DeviceFault(f"case {len(st.done)}", RuntimeError("an illegal memory access")))
            sys.exit(faults.FAULT_EXIT)
        print("children:", len(st.faults) + 1, "done:", ",".join(st.done))
        sys.exit(0)
        """)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{ROOT}")
    state = tmp_path / "state.json"
    assert faults.supervise("fake_run", ["--flag", "x"], state) == 0
    out, err = capfd.readouterr()
    assert "children: 3 done: case 0,case 1" in out
    assert err.count("device fault in case") == 2 and "a fresh process goes on without it" in err
    assert [f["what"] for f in json.loads(state.read_text())["faults"]] == ["case 1", "case 2"]


def test_supervisor_stops_when_a_child_faults_without_recording_it(tmp_path, monkeypatch, capfd):
    _child(tmp_path, "sys.exit(faults.FAULT_EXIT)\n")  # restarting would meet the same fault forever
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{ROOT}")
    assert faults.supervise("fake_run", [], tmp_path / "s.json") == faults.FAULT_EXIT
    assert "without recording a fault; stopping" in capfd.readouterr().err


def test_supervisor_gives_up_after_max_attempts(tmp_path, monkeypatch, capfd):
    _child(tmp_path, """\
        st.fault(faults.DeviceFault(f"case {len(st.faults)}", RuntimeError("misaligned address")))
        sys.exit(faults.FAULT_EXIT)
        """)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{ROOT}")
    monkeypatch.setattr(faults, "MAX_ATTEMPTS", 3)
    assert faults.supervise("fake_run", [], tmp_path / "s.json") == faults.FAULT_EXIT
    assert "3 device faults; stopping" in capfd.readouterr().err
    assert len(json.loads((tmp_path / "s.json").read_text())["faults"]) == 3


def test_supervisor_stops_after_children_in_a_row_that_fault_before_finishing_anything(tmp_path, monkeypatch,
                                                                                          capfd):
    """bench.gpu's children each load the model first: a fault on every measurement's path (a broken kernel
    all of them launch) ends the run after max_barren such children, not MAX_ATTEMPTS model loads."""
    _child(tmp_path, """\
        n = len(st.faults)
        if n in (0, 2):  # the 1st and 3rd children finish one piece of work before they fault
            st.finish(f"work {n}")
        st.fault(faults.DeviceFault(f"work {n} + 1", RuntimeError("misaligned address")))
        sys.exit(faults.FAULT_EXIT)
        """)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{ROOT}")
    state = tmp_path / "s.json"
    assert faults.supervise("fake_run", [], state, max_barren=2) == faults.FAULT_EXIT
    err = capfd.readouterr().err
    # children 1 and 3 made progress, 2 did not (one barren child is not enough), 4 and 5 did not: stop
    assert len(json.loads(state.read_text())["faults"]) == 5 < faults.MAX_ATTEMPTS
    assert err.count("a fresh process goes on without it") == 4
    assert "2 processes in a row faulted before finishing anything" in err


@pytest.fixture
def fake_cases(monkeypatch):
    """kernels.check's cases replaced by four: ok, a device fault, a compile error, ok."""
    pytest.importorskip("triton")
    from kernels import check
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ran = []

    def case(name, outcome):
        def run(dev, dtype, gen):
            ran.append(name)
            if isinstance(outcome, Exception):
                raise outcome
            return 1e-3, 1e-3, True
        return f"fake {name}", run

    monkeypatch.setattr(check, "cases", lambda *a: iter([
        case("a", None), case("b", RuntimeError(ILLEGAL)), case("c", RuntimeError("out of resource: shared memory")),
        case("d", None)]))
    return check, ran


def test_check_fails_the_faulting_case_and_a_fresh_process_checks_the_rest(fake_cases, tmp_path, capsys):
    check, ran = fake_cases
    state = tmp_path / "s.json"
    assert check.main(["--dry-run", "--resume", str(state)]) == faults.FAULT_EXIT
    out = capsys.readouterr().out
    assert ran == ["a", "b"] and "| fake a | 1.00e-03 | 1.00e-03 | ok |" in out
    assert "| fake b | - | - | FAULT (RuntimeError: CUDA error: an illegal memory access" in out
    st = faults.State.load(state)
    assert st.done == ["0 fake a", "1 fake b"] and [f["what"] for f in st.faults] == ["fake b"]
    # the next process: neither a nor b again, no second table header; c fails alone and d still runs
    assert check.main(["--dry-run", "--resume", str(state)]) == 1
    out = capsys.readouterr().out
    assert ran == ["a", "b", "c", "d"] and "| case |" not in out
    assert "| fake c | - | - | FAIL (RuntimeError: out of resource: shared memory) |" in out
    assert "| fake d | 1.00e-03 | 1.00e-03 | ok |" in out and "2 of the cases failed" in out


def test_check_without_a_supervisor_fails_an_erroring_case_and_goes_on(fake_cases, capsys):
    check, ran = fake_cases
    assert check.main(["--dry-run"]) == 1
    assert ran == ["a", "b", "c", "d"] and "2 of the cases failed" in capsys.readouterr().out


def test_tune_skips_the_faulting_group_and_the_written_shapes_after_a_fault(tmp_path, monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sys, "argv", ["kernels.tune"])
    from kernels import tune
    measure, run = tune.Tuner.measure, tune.Tuner.run
    seen = []

    def run_noting_batch(self, plan):
        self.batch = plan.task.n
        seen.append(self.batch)
        return run(self, plan)

    def measure_faulting_dq_at_8(self, call, forced, timed):
        if self.batch == 8 and any(isinstance(c, dict) and c.get("DQ") for c in forced.values()):
            raise RuntimeError(f"Triton Error [CUDA]: {ILLEGAL.split(': ')[1]}")
        return measure(self, call, forced, timed)

    monkeypatch.setattr(tune.Tuner, "run", run_noting_batch)
    monkeypatch.setattr(tune.Tuner, "measure", measure_faulting_dq_at_8)
    state, out = tmp_path / "s.json", tmp_path / "cfg"
    argv = ["--dry-run", "--kernels", "moe", "--batches", "1,8", "--out", str(out), "--resume", str(state)]
    assert tune.main(argv) == faults.FAULT_EXIT
    st = faults.State.load(state)
    assert seen == [1, 8] and len(st.done) == 1 and st.faults[0]["what"].startswith("moe dq")
    (path,) = out.glob("*.json")
    body = json.loads(path.read_text())
    assert {e["batch"] for e in body["entries"]} == {1} and "--resume" not in body["command"]
    capsys.readouterr()
    # the fresh process: batch 1 is not tuned again, batch 8 without the dq group
    assert tune.main(argv) == 0
    out_text = capsys.readouterr()
    assert seen == [1, 8, 8] and "1 shapes tuned by this run's earlier processes" in out_text.err
    assert "device fault, skipped for the rest of the run: moe dq" in out_text.out
    entries = {(e["kernel"], e["batch"]): e for e in json.loads(path.read_text())["entries"]}
    assert set(entries) == {(k, b) for k in ("moe_w1", "moe_w2") for b in (1, 8)}
    assert not entries["moe_w1", 8]["config"].get("DQ")
    assert any("skipped, it faulted the device earlier in this run" in r for r in entries["moe_w1", 8]["rejected"])


def test_moe_variants_prints_each_row_and_skips_a_faulted_variant_afterwards(tmp_path, monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from bench import moe_variants
    timer, calls = moe_variants._timer, []

    def timer_with_errors(fn, cuda):  # the third variant timed faults the device, the fourth lacks resources
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError(ILLEGAL)
        if len(calls) == 4:
            raise RuntimeError("out of resource: shared memory")
        return timer(fn, cuda)

    monkeypatch.setattr(moe_variants, "_timer", timer_with_errors)
    state = tmp_path / "s.json"
    argv = ["--dry-run", "--tokens", "1,2", "--resume", str(state)]
    assert moe_variants.main(argv) == faults.FAULT_EXIT
    rows = [r.split("|")[3:6] for r in capsys.readouterr().out.splitlines() if r.startswith("| 1 ")]
    assert [v.strip() for v, _, _ in rows] == ["own", "scaled", "gemv"]
    assert rows[2][2].strip().startswith("FAULT (RuntimeError: CUDA error: an illegal memory access")
    assert moe_variants.main(argv) == 0
    out = capsys.readouterr().out
    assert "### MoE variants" not in out  # one header per run, not per process
    rows = {(r.split("|")[1].strip(), r.split("|")[3].strip()): r for r in out.splitlines() if r.startswith("| ")}
    assert list(rows) == [("1", v) for v in ("rs", "split", "dq")] + [
        ("2", v) for v in ("own", "scaled", "gemv", "rs", "split", "dq")]
    assert "RuntimeError: out of resource" in rows["1", "rs"]
    assert "skipped: faulted the device earlier in this run" in rows["2", "gemv"]
    assert float(rows["2", "rs"].split("|")[5]) < 3e-2  # the variant that only lacked resources runs again at 2


@pytest.mark.parametrize("module", ["kernels.check", "kernels.tune", "bench.moe_variants", "bench.gpu"])
def test_gpu_runs_are_supervised(module, monkeypatch):
    """On a GPU each of the three starts as the supervisor, before it makes a CUDA context; --resume (what
    the supervisor adds) runs the work itself."""
    import importlib

    import torch
    mod = importlib.import_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    got = []
    monkeypatch.setattr(faults, "supervise", lambda m, argv, **kw: got.append((m, argv)) or 7)
    assert mod.main(["--models" if module != "bench.moe_variants" else "--model", "gpt-oss-20b"]) == 7
    assert got == [(module, ["--models" if module != "bench.moe_variants" else "--model", "gpt-oss-20b"])]
    assert faults.public_argv(["--a", "--resume", "/s.json", "--b"]) == ["--a", "--b"]
