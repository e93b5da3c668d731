"""bench.gpu's measurements, each through engine.core.LLMEngine: decode at a batch, prefill, profiled prefill
chunks and the 1k/1k throughput run (what each measures: bench.gpu's docstring)."""

from __future__ import annotations

import random
import sys
import time

from bench.roofline import sync


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, file=sys.stderr, flush=True)


def requests(n: int, prompt_len: int, max_tokens: int, seed: int, vocab: int = 199998, temperature: float = 0):
    from engine.request import GenerateRequest
    from engine.sampler import SamplingParams
    rng = random.Random(seed)
    return [GenerateRequest(f"r{seed}-{i}", [rng.randrange(vocab) for _ in range(prompt_len)],
                            SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True),
                            harmony=False)
            for i in range(n)]


def engine(model, seqs: int, max_len: int, step_tokens: int, overlap: bool | None = None, padded: bool = False,
           kv: str = "auto"):
    """padded: no decode graph of `seqs` rows: a step of `seqs` sequences pads to the next bucket up.
    kv: EngineConfig.kv_cache_dtype."""
    from engine.core import EngineConfig, LLMEngine
    from engine.executor import LocalExecutor, graph_buckets
    bs = 16
    cfg = EngineConfig(block_size=bs, num_blocks=seqs * -(-max_len // bs) + 64, max_num_seqs=seqs,
                       max_tokens_per_step=step_tokens, max_model_len=max_len + bs, enable_prefix_cache=False,
                       overlap_scheduling=overlap, kv_cache_dtype=kv)
    buckets = tuple(b for b in graph_buckets(2 * seqs) if b != seqs)
    eng = LLMEngine(model, cfg, executor_factory=(lambda spec: LocalExecutor(model, spec, graph_buckets=buckets))
                    if padded else None)
    eng.generate(requests(1, 8, 2, seed=999))  # warm-up: allocations, Triton compiles
    return eng


def bench_decode(model, dev, B: int, ctx: int, steps: int, warm: int, step_tokens: int,
                 overlap: bool | None = None, temperature: float = 0, profile_steps: int = 0, profile=None,
                 padded: bool = False, kv: str = "auto"):
    """-> (tokens/s, s/step, profile(eng.step, profile_steps) run after the timing, or None)."""
    # sequences prefilled early decode while the rest prefill: leave them tokens for the timed steps. The
    # running decodes take at most B of a step's budget, so with a budget of 2B or more the prompts advance
    # at least B tokens a step, and every sequence has its first token within `fill` steps (with a budget of
    # B, the last prompts would crawl while the first sequences ran out of tokens and finished)
    budget = max(step_tokens, 2 * B)
    fill = -(-B * ctx // (budget - B)) + 1
    out_len = steps + warm + profile_steps + fill + 2
    eng = engine(model, B, ctx + out_len, budget, overlap, padded, kv)
    reqs = requests(B, ctx, out_len, seed=B, temperature=temperature)
    for r in reqs:
        eng.add_request(r)
    while not all(len(s.output_ids) for r in reqs for s in eng.seqs[r.request_id]):
        eng.step()
    for _ in range(warm):
        eng.step()
    sync(dev)
    g0, t0 = eng.generated_tokens, time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync(dev)
    dt = time.perf_counter() - t0
    prof = profile(eng.step, profile_steps) if profile_steps and profile else None
    return (eng.generated_tokens - g0) / dt, dt / steps, prof


def bench_prefill(model, dev, n: int, length: int, step_tokens: int, kv: str = "auto"):
    eng = engine(model, n, length + 2, step_tokens, kv=kv)
    reqs = requests(n, length, 1, seed=7)
    sync(dev)
    t0 = time.perf_counter()
    eng.generate(reqs)
    sync(dev)
    return n * length / (time.perf_counter() - t0)


def profile_prefill(model, dev, length: int, step_tokens: int, steps: int, profile, kv: str = "auto"):
    """profile(eng.step, steps) over full prefill chunks of step_tokens tokens (prompts of `length`),
    after one chunk unprofiled; -> (the profile, the chunk's sequences)."""
    seqs = -(-(steps + 1) * step_tokens // length)
    eng = engine(model, seqs, length + 2, step_tokens, kv=kv)
    for r in requests(seqs, length, 1, seed=8):
        eng.add_request(r)
    eng.step()
    return profile(eng.step, steps), max(1, step_tokens // length)


def bench_throughput(model, dev, n: int, isl: int, osl: int, conc: int, step_tokens: int, cap_s: float = 0,
                     kv: str = "auto"):
    """-> (output tokens/s, requests finished, where the time went: split_steps); stops stepping after cap_s
    seconds when cap_s > 0."""
    eng = engine(model, conc, isl + osl + 2, step_tokens, kv=kv)
    log(f"throughput engine warmed up: {eng.warmup()}")
    reqs = requests(n, isl, osl, seed=11)
    for r in reqs:
        eng.add_request(r)
    sync(dev)
    g0, t0 = eng.generated_tokens, time.perf_counter()
    finished, steps = 0, []
    while eng.has_work() and not (cap_s and time.perf_counter() - t0 > cap_s):
        prefill, g, ts = carries_prefill(eng.scheduler), eng.generated_tokens, time.perf_counter()
        finished += sum(o.finished for o in eng.step())
        steps.append((prefill, time.perf_counter() - ts, eng.generated_tokens - g))
    sync(dev)
    return (eng.generated_tokens - g0) / (time.perf_counter() - t0), finished, split_steps(steps)


def carries_prefill(sched) -> bool:
    """Whether the step about to be scheduled computes prompt tokens: a running sequence's prompt is not all
    in, or a waiting one will be admitted."""
    return any(s.num_computed < s.prompt_len for s in sched.running) or bool(
        sched.waiting and len(sched.running) < sched.max_num_seqs)


def split_steps(steps: list[tuple[bool, float, int]]) -> dict:
    """[(carries prefill, wall s, tokens generated)] a step -> totals for steps with and without prefill. With
    overlapped scheduling a step's call waits for the step before it, so each time belongs to its neighbour:
    one step of error at each boundary between the two kinds."""
    out = {}
    for kind, flag in (("prefill", True), ("decode", False)):
        mine = [(dt, g) for p, dt, g in steps if p == flag]
        out.update({f"{kind}_steps": len(mine), f"{kind}_s": sum(dt for dt, _ in mine),
                    f"{kind}_generated": sum(g for _, g in mine)})
    return out
