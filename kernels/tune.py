"""Measure the kernels' launch configs on this GPU and write them where the launchers look (kernels.tuned).

    python -m kernels.tune [--models gpt-oss-120b,gpt-oss-20b] [--batches 1,8,64,256,8192] [--out kernels/configs]
    python -m kernels.tune --dry-run    # the whole flow on CPU under TRITON_INTERPRET=1, tiny shapes

Per model shape and batch bucket (tokens per step): MoE w1 and w2, swept per
BLOCK_M (the two must share it) keeping the BLOCK_M with the lowest sum (BLOCK_M 1,
tried where there is about one pair per expert, is kernels.moe_gemv's single-pair tiles);
the MoE's one-launch front (kernels.moe_gate) at decode steps of up to 16 rows;
paged attention for the sliding and the full layers, as decode (batch =
sequences of --context tokens) below --prefill-from and as one prefill chunk
of that many tokens from there on; the dense linears of a decode step (qkv, o,
router, unembedding; batches up to 64) against cuBLAS, timed the same way, an
entry written only where kernels.linear wins (without one the model calls
cuBLAS). Every candidate is compiled first for this
GPU's arch in worker processes and dropped when kernels.aot reports a compile
error, a spill, too much shared memory or wgmma that ptxas serialized (under
Triton 3.6, the GPU image's, 19 of a 120b batch-1 run's 516, no default among
them; the workers also fill Triton's cache, so the timing process compiles nothing). The workers run
ahead: while one candidate is timed they compile the rest of its task's and the next task's, so
compiling and timing overlap (each shape's line says how long timing still
waited for a compile). The rest are timed on random inputs
(MXFP4 weights, bf16 activations, routing uniform over experts), each launch as a decode step of the
model makes it (kernels._tune_cases: the gate with the expert map, load and row mask at its batch's MoE
plan, as this run has tuned it so far; attention with its rotary and cache writes),
captured in a CUDA graph and replayed under triton.testing.do_bench (L2 flushed before each
rep, median), and the three fastest are retried at other num_stages. The
winner must match the torch reference or nothing is written for it. Results
merge into <out>/<device name>.json, rewritten after every shape so a run cut
short keeps what it measured. A candidate that faults the device (an illegal address: the CUDA
context is lost) ends its process; the supervising process (kernels.faults) starts a fresh one, which
skips the shapes already written and the faulting MoE group (or config) for the rest of the call.
Tasks and sweeps: kernels/_tune_plans.py; candidate sets: kernels/_tune_cases.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import _tune_cases as cases
from . import faults, tuned
from ._cli import counts, one_of, presets
from ._compile_pool import CompilePool
from ._tune_plans import Plan, Sweep, Task, plan_task, tasks
from ._tune_results import Result, Store, _fmt, _now, _us, table

FAMILIES = ("moe", "gate", "attn", "linear")
DRY = dict(models="tiny", batches="1,8", prefill_from=8, context=40)
DRY_TIMER = "time.perf_counter around the Triton interpreter on CPU: interpreter times, not GPU times"
GPU_TIMER = "triton.testing.do_bench of a CUDA-graph replay (CUDA events, L2 flushed per rep, median)"
PLAIN_TIMER = "triton.testing.do_bench of plain launches (CUDA events, L2 flushed per rep, median)"


class Tuner:
    def __init__(self, a, device: torch.device, dtype, arch: int, pool, state: faults.State | None = None):
        self.a, self.device, self.dtype, self.arch, self.pool = a, device, dtype, arch, pool
        self.state = state  # a supervised child's (kernels.faults): what faulted in an earlier child is skipped
        self.dry = a.dry_run
        self.graphs = True
        self._weights: dict[str, tuple] = {}

    # ------------------------------------------------------------- timing
    def time_us(self, fns) -> float:
        def run():
            for f in fns:
                f()
        if self.dry:  # the interpreter compiles nothing: no warm-up
            reps = []
            for _ in range(2):
                t0 = time.perf_counter()
                run()
                reps.append(time.perf_counter() - t0)
            return statistics.median(reps) * 1e6
        import triton.testing
        run()  # loads the kernels the compile workers left in Triton's cache, outside the capture
        torch.cuda.synchronize()
        fn = run
        if self.graphs:
            # replayed as one graph, as decode runs (kernels.cuda_graphs): back-to-back launches (attention +
            # merge) leave no host-launch gaps in the measured time, and the host's launch cost is not counted
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                fn = graph.replay
            except Exception as e:  # noqa: BLE001 - still a GPU time, with launch gaps; the JSON says so
                if faults.is_sticky(e):
                    raise
                self.graphs = False
                print(f"CUDA graph capture failed ({type(e).__name__}: {e}); timing plain launches", file=sys.stderr)
        return triton.testing.do_bench(fn, warmup=self.a.warmup_ms, rep=self.a.rep_ms, return_mode="median") * 1e3

    @property
    def timer(self) -> str:
        return DRY_TIMER if self.dry else GPU_TIMER if self.graphs else PLAIN_TIMER

    def measure(self, call, forced: dict, timed: set[str] | None) -> float:
        """Time the launches of kernels `timed` (None: all) that the launcher makes under `forced`,
        after running the ones before them once (w2 reads w1's output)."""
        from ._triton import capturing
        fn, args, kw, _ = call
        with tuned.forced(forced), capturing() as launches:
            fn(*args, **kw)
        replays = [(getattr(k, "fn", k).__name__, lambda k=k, g=g, a=a, w=w: k[g](*a, **w))
                   for k, g, a, w in launches]
        first = next(i for i, (name, _) in enumerate(replays) if timed is None or name in timed)
        for _, f in replays[:first]:
            f()
        return self.time_us([f for name, f in replays[first:] if timed is None or name in timed])

    # ------------------------------------------------------------- sweeping
    def job(self, task: Task, forced: dict, check: list[str]) -> dict:
        return dict(family=task.family, model=task.model, n=task.n, window=task.window, linear=task.linear,
                    context=self.a.context,
                    dtype=str(self.dtype).removeprefix("torch."), forced=forced, check=check, arch=self.arch)

    def prefetch(self, plan: Plan) -> None:
        """Queue the compiles of every phase-1 candidate of a task on the workers, so they run while this
        process times the task before (and the task's own first candidates): timing is one process on the
        GPU, compiling ~1 s a candidate on each worker, and the two no longer wait for each other."""
        self.pool.submit(cases.compile_job, [self.job(plan.task, {s.kernel: c, **s.others}, s.check)
                                             for s in plan.sweeps if not (s.group and self._faulted(plan.task, s, None))
                                             for c in s.cands])

    def sweep(self, task, call, s: Sweep, res: Result) -> list[tuple[float, dict]]:
        """-> [(us, config)] fastest first; phase 2 retries the three fastest at `s.stages`, and with each of
        the `s.extra` settings (e.g. L2PF: the program's weights bulk-prefetched into L2 first)."""
        out: list[tuple[float, dict]] = []
        seen: list[dict] = []
        cands = s.cands
        if s.group and (err := self._faulted(task, s, None)):
            res.rejected.append(f"group {s.group}: skipped, it faulted the device earlier in this run ({err})"[:300])
            return out
        for phase in (0, 1):
            if phase:
                cands = ([{**c, "num_stages": n} for _, c in out[:3] for n in s.stages]
                         + [{**c, **x} for _, c in out[:3] for x in s.extra if c.get("SPLIT_K", 1) == 1])
            cands = [c for c in cands if c not in seen]
            seen += cands
            # each compile is taken as it finishes: the workers go on compiling the rest while this one is timed
            usages = self.pool.results(cases.compile_job,
                                       [self.job(task, {s.kernel: c, **s.others}, s.check) for c in cands])
            for c, us in zip(cands, usages):
                bad = [f"{u['kernel']}: {'; '.join(_problems(u, self.arch))}" for u in us if _problems(u, self.arch)]
                if bad:
                    res.rejected.append(f"{_fmt(c)} -> {bad[0]}"[:300])
                    continue
                if err := self._faulted(task, s, c):
                    res.rejected.append(f"{_fmt(c)} -> skipped, it faulted the device earlier in this run ({err})"
                                        [:300])
                    continue
                try:
                    out.append((self.measure(call, {s.kernel: c, **s.others}, s.timed), c))
                except Exception as e:  # noqa: BLE001 - e.g. out of resources at launch: not a candidate
                    if faults.is_sticky(e):
                        raise faults.DeviceFault(self.fault_key(task, s, c), e) from e
                    res.rejected.append(f"{_fmt(c)} -> {type(e).__name__}: {e}"[:300])
                    continue
                res.timed += 1
            out.sort(key=lambda t: t[0])
            if not (s.stages or s.extra) or not out:
                break
        return out

    @staticmethod
    def fault_key(task: Task, s: Sweep, c: dict | None) -> str:
        """What a device fault rules out for the rest of the run: an MoE group (one path's W1 and W2 at one
        BLOCK_M, the same kernel source at every shape, so its other configs would most likely fault too:
        each fault costs a fresh process), else the one config."""
        return f"{task.family} {s.group}" if s.group else f"{task.family} {s.kernel} {_fmt(c)}"

    def _faulted(self, task: Task, s: Sweep, c: dict | None) -> str | None:
        return self.state.faulted(self.fault_key(task, s, c)) if self.state else None

    def check(self, call, forced: dict, fault_key: str) -> tuple[float, bool]:
        fn, args, kw, reference = call
        try:
            with tuned.forced(forced):
                got = fn(*args, **kw).float()
            ref = reference().float()
        except Exception as e:  # noqa: BLE001 - re-raised: only a device fault is the candidate's
            if faults.is_sticky(e):
                raise faults.DeviceFault(fault_key, e) from e
            raise
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        return err, err <= (1e-4 if self.dtype == torch.float32 else 2e-2)

    # ------------------------------------------------------------- families
    def plan(self, task: Task) -> Plan:
        return self._with_moe_plan(plan_task(task, self.dtype, self.dry, self.a.context))

    def run(self, plan: Plan) -> list[Result]:
        plan = self._with_moe_plan(plan)  # planned before this run's MoE at its batch was written
        return (self.moe if plan.task.family == "moe" else self.linear if plan.task.family == "linear"
                else self.single)(plan)

    def _with_moe_plan(self, plan: Plan) -> Plan:
        """The gate's launch follows the MoE plan of its batch (BLOCK_M, the gemv activations): the expert
        configs the launchers pick now (this run's file, re-read after each write) go into the gate's forced
        configs, so the compile workers bind the same launch without reading the file or touching the GPU,
        and a plan changed by this run's MoE result is compiled and timed afresh."""
        if plan.task.family != "gate":
            return plan
        from models.checkpoint import PRESETS

        from .moe_configs import configs_for
        c = PRESETS[plan.task.model]
        x = torch.empty(plan.task.n, c.hidden_size, dtype=self.dtype, device=self.device)
        w1, w2 = configs_for(plan.task.n, c.hidden_size, c.intermediate_size, c.num_local_experts,
                             c.num_experts_per_tok, x, self.dry)
        others = {"moe_w1": w1, "moe_w2": w2}
        return dataclasses.replace(plan, sweeps=[dataclasses.replace(s, others={**s.others, **others})
                                                 for s in plan.sweeps])

    def moe(self, plan: Plan) -> list[Result]:
        from models.checkpoint import PRESETS
        task, results, d = plan.task, plan.results, plan.default
        cfg = PRESETS[task.model]
        if task.model not in self._weights:
            self._weights = {task.model: cases.moe_weights(cfg, self.dtype, self.device)}  # one model's at a time
        call = cases.make_call("moe", cfg, task.n, None, 0, self.dtype, self.device, self._weights[task.model])
        per_group: dict[str, dict[str, list]] = {}
        for s in plan.sweeps:
            runs = self.sweep(task, call, s, results[s.kernel])
            per_group.setdefault(s.group, {})[s.kernel] = runs
            if s.group == f"mma{d['BLOCK_M']}":
                results[s.kernel].default_us = next((t for t, c in runs if c == d), None)
        full = {key: r for key, r in per_group.items() if r.get("moe_w1") and r.get("moe_w2")}
        if full:
            key = min(full, key=lambda g: full[g]["moe_w1"][0][0] + full[g]["moe_w2"][0][0])
            for kn in results:
                results[kn].best_us, results[kn].best = full[key][kn][0]
            err, ok = self.check(call, {kn: r.best for kn, r in results.items()}, f"{task.family} {key}")
            for r in results.values():
                r.check_err, r.check_ok = err, ok
        return list(results.values())

    def single(self, plan: Plan) -> list[Result]:
        """Attention and the gate: one kernel's sweep, its fastest checked against the reference."""
        from models.checkpoint import PRESETS
        task, (s,), res = plan.task, plan.sweeps, plan.results[plan.task.family]
        call = cases.make_call(task.family, PRESETS[task.model], task.n, task.window, self.a.context, self.dtype,
                               self.device)
        runs = self.sweep(task, call, s, res)
        res.default_us = next((t for t, c in runs if c == plan.default), None)
        if runs:
            res.best_us, res.best = runs[0]
            res.check_err, res.check_ok = self.check(call, {task.family: res.best, **s.others},
                                                     self.fault_key(task, s, res.best))
        return [res]

    def linear(self, plan: Plan) -> list[Result]:
        """kernels.linear against cuBLAS (F.linear, timed the same way): the kernel's config is written
        only where it is faster, since without an entry the model calls cuBLAS."""
        from models.checkpoint import PRESETS
        task, (s,), res = plan.task, plan.sweeps, plan.results["linear"]
        call = cases.make_call("linear", PRESETS[task.model], task.n, None, 0, self.dtype, self.device,
                               linear=task.linear)
        _, args, _, _ = call
        res.default_us = self.time_us([lambda: torch.nn.functional.linear(*args)])  # cuBLAS on a GPU
        runs = self.sweep(task, call, s, res)
        if runs:
            res.best_us, res.best = runs[0]
            res.check_err, res.check_ok = self.check(call, {"linear": res.best},
                                                     self.fault_key(task, s, res.best))
            res.beaten = not self.dry and res.best_us >= res.default_us
        return [res]


def _task_key(t: Task) -> str:
    return f"{t.family} {t.model} {t.n} {t.window} {t.linear}"


def _problems(u: dict, arch: int) -> list[str]:
    from .aot import Usage
    return Usage(**u).problems(arch)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt-oss-120b,gpt-oss-20b")
    p.add_argument("--batches", default="1,8,64,256,8192",
                   help="tokens per step (decode: sequences), tuned in this order (--max-seconds cuts the last)")
    p.add_argument("--kernels", default="moe,gate,attn,linear",
                   help="families to tune: moe, gate (the MoE's one-launch front, batches <= 16), attn, "
                        "linear (decode linears against cuBLAS, batches <= 64)")
    p.add_argument("--out", type=Path, default=None, help=f"default {tuned.CONFIG_DIR} (dry run: a temp dir)")
    p.add_argument("--context", type=int, default=2048, help="decode attention context (tokens)")
    p.add_argument("--prefill-from", type=int, default=1024, help="batches from here tune attention as prefill")
    p.add_argument("--jobs", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)), help="compile workers")
    p.add_argument("--warmup-ms", type=int, default=10)
    p.add_argument("--rep-ms", type=int, default=40)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new shape after this long (what is done is written; for capped device time)")
    p.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes, 2 candidates each")
    p.add_argument("--resume", type=Path, help=argparse.SUPPRESS)  # kernels.faults: a supervised child's state
    a = p.parse_args(argv)
    if a.dry_run:
        for k, v in DRY.items():
            if p.get_default(k) == getattr(a, k):
                setattr(a, k, v)
    # converted after the dry run's defaults, which compare with the flags' raw defaults
    for flag, conv in (("models", presets), ("batches", counts()), ("kernels", one_of(FAMILIES))):
        try:
            setattr(a, flag, conv(getattr(a, flag)))
        except argparse.ArgumentTypeError as e:
            p.error(f"argument --{flag}: {e}")
    a.batches = list(dict.fromkeys(a.batches))  # in the order given: priority
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            sys.exit("--dry-run needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        out = Path(a.out or tempfile.mkdtemp(prefix="kernel-tune-dry-"))
        if out.resolve().is_relative_to(tuned.CONFIG_DIR):
            sys.exit(f"--dry-run writes interpreter times: not into {tuned.CONFIG_DIR}")
        device, dtype, arch, name = torch.device("cpu"), torch.float32, 90, "cpu interpreter"
        torch.set_num_threads(1)  # the interpreter runs numpy per program; threads only add overhead
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: kernels.tune measures on a GPU (--dry-run runs the flow on CPU)")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("unset TRITON_INTERPRET: interpreter times are not GPU times")
        if a.resume is None:  # a device fault must not end the call's tuning (kernels.faults); the supervisor
            return faults.supervise("kernels.tune", argv)  # itself makes no CUDA context
        from .aot import SMEM_LIMIT
        device, dtype = torch.device("cuda"), torch.bfloat16
        major, minor = torch.cuda.get_device_capability()
        arch, name = 10 * major + minor, torch.cuda.get_device_name()
        if arch not in SMEM_LIMIT:
            sys.exit(f"sm_{arch}: kernels.aot knows no shared-memory limit for it")
        out = a.out or tuned.CONFIG_DIR
    st = faults.State.load(a.resume) if a.resume else None
    import triton
    path = tuned.device_file(name, out)
    header = dict(device=name, arch=arch, dry_run=a.dry_run, timer=DRY_TIMER if a.dry_run else GPU_TIMER,
                  triton=triton.__version__, torch=torch.__version__,
                  command="python -m kernels.tune " + " ".join(faults.public_argv(argv)))
    store = Store(path, header)
    # the dry run leaves out the unembedding: the real vocabulary through the interpreter takes minutes
    todo = tasks(a.models, a.batches, a.kernels, a.prefill_from,
                 tuple(w for w in cases.LINEARS if not (a.dry_run and w == "unembed")))
    if a.dry_run:
        print(f"DRY RUN on CPU: times below are {DRY_TIMER}; writing {path}, never {tuned.CONFIG_DIR}", flush=True)
    earlier = [t for t in todo if st and _task_key(t) in st.done]
    if earlier:
        todo = [t for t in todo if t not in earlier]
        print(f"{len(earlier)} shapes tuned by this run's earlier processes (above); "
              f"skipped after a device fault: {', '.join(f['what'] for f in st.faults)}", file=sys.stderr)
    pool = CompilePool(min(a.jobs, 2 if a.dry_run else 16))  # the dry run compiles ~2 candidates at a time
    rows: list[Result] = []
    tuner = Tuner(a, device, dtype, arch, pool, st)
    started = st.started if st else time.time()  # wall time: a supervised run's budget spans its processes
    plans: dict[int, Plan] = {}

    def planned(i: int) -> Plan | None:
        if i < len(todo) and i not in plans:
            plans[i] = tuner.plan(todo[i])
            tuner.prefetch(plans[i])
        return plans.get(i)

    try:
        for i, t in enumerate(todo):
            t0 = time.perf_counter()
            if a.max_seconds is not None and time.time() - started > a.max_seconds:
                print(f"--max-seconds {a.max_seconds:g} reached: {len(todo) - i} shapes not tuned", file=sys.stderr)
                break
            plan, waited0 = planned(i), pool.waited
            planned(i + 1)  # its compiles fill the workers' idle time while this task is timed
            res = tuner.run(plan)
            for r in res:
                print(f"  {r.kernel} {r.label} batch {r.batch}: default {_us(r.default_us)} -> best {_us(r.best_us)}"
                      f" ({_fmt(r.best)})", file=sys.stderr)
                if r.beaten:
                    print(f"{r.kernel} {r.label} batch {r.batch}: cuBLAS {_us(r.default_us)} beats the best "
                          f"candidate ({_us(r.best_us)}); written as config null (the model keeps cuBLAS)",
                          file=sys.stderr)
                if r.best is not None and r.check_ok:
                    store.add(r, dict(models=t.models, measured=_now(), timer=tuner.timer,
                                      **({"context": a.context} if t.family == "attn_decode" else {})))
                    tuned.clear_cache()  # the gate's call runs the MoE plan the file now holds for its batch
                elif r.best is not None:
                    print(f"{r.kernel} {r.label} batch {r.batch}: best config {_fmt(r.best)} does not match the "
                          f"reference (relative error {r.check_err:.2e}); not written", file=sys.stderr)
            rows += res
            print(f"{t.family} {','.join(t.models)} batch {t.n}"
                  f"{f' window {t.window}' if t.window else ''}: {sum(r.timed for r in res)} timed, "
                  f"{sum(len(r.rejected) for r in res)} rejected, {time.perf_counter() - t0:.1f} s "
                  f"({pool.waited - waited0:.1f} s of it waiting for compiles)", file=sys.stderr)
            if st:
                st.finish(_task_key(t))
    except faults.DeviceFault as f:
        if st is None:
            raise
        st.fault(f)
        print(f"device fault in {f.what} ({f.error}); this process ends here, the CUDA context is lost "
              f"(the shapes above are written)", file=sys.stderr)
        return faults.FAULT_EXIT
    finally:
        pool.close()
    if a.dry_run:
        print(f"times: {DRY_TIMER}")
    print(table(rows))
    failed = [r for r in rows if r.best is not None and not r.check_ok]
    print(f"\n{len(rows)} configs, {len(failed)} failed the reference check; {time.time() - started:.0f} s "
          f"({pool.waited:.0f} s waiting for compiles); "
          f"written to {path}" + (" (interpreter times: a dry run)" if a.dry_run else ""))
    for f in st.faults if st else []:
        print(f"device fault, skipped for the rest of the run: {f['what']} ({f['error']})")
    return 1 if failed or any(r.best is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
