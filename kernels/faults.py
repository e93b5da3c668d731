"""Device faults in the GPU runs (kernels.check, kernels.tune, bench.moe_variants, bench.gpu): one bad launch
must not take the rest of a run with it.

An illegal address, a misaligned access or a bad instruction in a kernel leaves the process's CUDA context
unusable: every later launch fails with the same error, so a run would report every case after the faulty
one as failed, or a tuning call would reject every candidate after it and write nothing more. Here a run
started on a GPU becomes a supervisor that never touches the device: it starts the run as a child process
with a state file (`--resume FILE`). When the child meets such an error it records what faulted and what it
had finished, and exits FAULT_EXIT; the supervisor starts a fresh child, which skips both. Errors that
leave the context usable (a compile error, out of resources at launch) are handled in-process, as before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAULT_EXIT = 3
MAX_ATTEMPTS = 8
# cudaGetErrorString / cuGetErrorString texts of the errors after which the context is lost ("sticky")
_STICKY = ("illegal memory access", "misaligned address", "illegal instruction", "invalid program counter",
           "unspecified launch failure", "device-side assert", "hardware stack error", "launch timed out",
           "not supported on global/shared address space", "uncorrectable ecc error")


def is_sticky(e: BaseException) -> bool:
    """Whether e is a CUDA error that leaves the context unusable (torch's and Triton's launchers both
    raise them as RuntimeError subclasses carrying the driver's text)."""
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _STICKY)


class DeviceFault(Exception):
    """Raised by a run that met a sticky error: `what` names the work that faulted (a case, a tuning group)."""

    def __init__(self, what: str, error: BaseException):
        super().__init__(f"{what}: {type(error).__name__}: {error}")
        self.what, self.error = what, f"{type(error).__name__}: {error}"[:500]


@dataclass
class State:
    """What the children of one supervised run share, in a JSON file: when the run started (its time
    budget spans the children), the work each child finished, and what faulted."""
    path: Path
    started: float = field(default_factory=time.time)
    done: list[str] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)  # {"what": ..., "error": ...}
    notes: dict = field(default_factory=dict)  # the run's own (e.g. check's failed case names)

    @classmethod
    def load(cls, path: Path) -> State:
        path = Path(path)
        if not path.exists():
            return cls(path)
        body = json.loads(path.read_text())
        return cls(path, body["started"], body["done"], body["faults"], body.get("notes", {}))

    def save(self) -> None:
        body = {k: v for k, v in asdict(self).items() if k != "path"}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp, self.path)

    def finish(self, what: str) -> None:
        self.done.append(what)
        self.save()

    def fault(self, f: DeviceFault) -> None:
        self.faults.append(dict(what=f.what, error=f.error))
        self.save()

    def faulted(self, what: str) -> str | None:
        """The error `what` faulted with in an earlier child, or None."""
        return next((f["error"] for f in self.faults if f["what"] == what), None)

    def elapsed(self) -> float:
        return time.time() - self.started


def public_argv(argv: list[str]) -> list[str]:
    """argv without a supervised child's --resume FILE: the command a run's output names."""
    return [x for i, x in enumerate(argv) if x != "--resume" and (i == 0 or argv[i - 1] != "--resume")]


def supervise(module: str, argv: list[str], state_path: Path | None = None, max_barren: int | None = None) -> int:
    """Run `python -m module *argv --resume STATE` until it exits with something other than FAULT_EXIT.
    A child that faults without recording a new fault (so the next would meet the same one), the
    MAX_ATTEMPTS-th fault, or max_barren children in a row that faulted before finishing anything (the fault
    then lies on every piece of work's path, and each fresh child has a start-up cost: bench.gpu loads the
    model) end the run with FAULT_EXIT."""
    state_path = Path(state_path or Path(tempfile.mkdtemp(prefix=f"{module}-")) / "state.json")
    State(state_path).save()
    barren = 0
    for _ in range(MAX_ATTEMPTS):
        before = State.load(state_path)
        sys.stdout.flush()
        rc = subprocess.call([sys.executable, "-m", module, *argv, "--resume", str(state_path)])
        st = State.load(state_path)
        if rc != FAULT_EXIT:
            return rc
        if len(st.faults) == len(before.faults):
            print(f"{module}: the child exited {FAULT_EXIT} without recording a fault; stopping", file=sys.stderr)
            return rc
        f = st.faults[-1]
        barren = barren + 1 if set(st.done) <= set(before.done) else 0
        if max_barren and barren >= max_barren:
            print(f"{module}: device fault in {f['what']} ({f['error'][:200]}); {barren} processes in a row "
                  f"faulted before finishing anything, so the fault is on every path; stopping (state: "
                  f"{state_path})", file=sys.stderr)
            return FAULT_EXIT
        print(f"{module}: device fault in {f['what']} ({f['error'][:200]}); a fresh process goes on without "
              f"it ({len(st.done)} done so far)", file=sys.stderr, flush=True)
    print(f"{module}: {MAX_ATTEMPTS} device faults; stopping (state: {state_path})", file=sys.stderr)
    return FAULT_EXIT
