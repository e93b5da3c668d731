"""An agent loop's turn latency over HTTP and over a Responses WebSocket, side by side on one server.

    python -m bench.ws_turns [--url http://127.0.0.1:8000] [--model gpt-oss] [--api-key KEY] [--turns 20]
                             [--rounds 3] [--out bench/results/ws_turns.json]

Against a running server (`make serve`). One conversation of `--turns` short turns (a user message of a few
words, 8 output tokens, no reasoning, greedy) is run three ways, in turn, `--rounds` times:
  http_stored  POST /v1/responses, each turn continuing the last by previous_response_id (stored);
  http_resend  POST /v1/responses, store=false, the whole conversation sent again each turn;
  websocket    one `client.responses.connect()`, store=false, each turn continuing the last by
               previous_response_id (the connection remembers it).
Reported per way: each turn's latency (request sent to final response) median and p90, over all rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

FINAL = ("response.completed", "response.incomplete", "response.failed")


def _turns(n: int) -> list[str]:
    return [f"Step {i}: list the next file." for i in range(n)]


def http_stored(c, a) -> list[float]:
    prev, out = None, []
    for text in _turns(a.turns):
        t0 = time.perf_counter()
        r = c.responses.create(model=a.model, input=text, previous_response_id=prev, **a.kw)
        out.append(time.perf_counter() - t0)
        prev = r.id
    return out


def http_resend(c, a) -> list[float]:
    history, out = [], []
    for text in _turns(a.turns):
        history.append({"role": "user", "content": text})
        t0 = time.perf_counter()
        r = c.responses.create(model=a.model, input=history, store=False, **a.kw)
        out.append(time.perf_counter() - t0)
        history += [it.model_dump(exclude_none=True) for it in r.output]
    return out


def websocket(c, a) -> list[float]:
    prev, out = None, []
    with c.responses.connect() as conn:
        for text in _turns(a.turns):
            t0 = time.perf_counter()
            conn.send({"type": "response.create", "model": a.model, "input": text, "store": False,
                       "previous_response_id": prev, **{k: v for k, v in a.kw.items() if k != "extra_body"},
                       **a.kw["extra_body"]})
            ev = next(ev for ev in conn if ev.type in FINAL or ev.type == "error")
            if ev.type == "error":
                raise SystemExit(f"websocket turn failed: {ev.error.message}")
            out.append(time.perf_counter() - t0)
            prev = ev.response.id
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ws_turns", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="gpt-oss")
    p.add_argument("--api-key", default="x")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results/ws_turns.json")
    a = p.parse_args(argv)
    if a.turns < 1 or a.rounds < 1:
        p.error("--turns and --rounds: at least 1")
    import openai
    c = openai.OpenAI(base_url=f"{a.url}/v1", api_key=a.api_key, max_retries=0, timeout=120)
    a.kw = dict(max_output_tokens=8, temperature=0, extra_body={"max_reasoning_tokens": 0})
    ways = {"http_stored": http_stored, "http_resend": http_resend, "websocket": websocket}
    websocket(c, argparse.Namespace(**{**vars(a), "turns": 2}))  # warm-up: the first requests compile, connect
    lat: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(a.rounds):
        for name, fn in ways.items():
            lat[name] += fn(c, a)
    rows = {k: {"median_ms": 1e3 * statistics.median(v), "p90_ms": 1e3 * statistics.quantiles(v, n=10)[-1],
                "turns": len(v)} for k, v in lat.items()}
    print(f"{'way':<12} {'median ms':>10} {'p90 ms':>8}  ({a.turns} turns x {a.rounds} rounds)")
    for k, r in rows.items():
        print(f"{k:<12} {r['median_ms']:>10.1f} {r['p90_ms']:>8.1f}")
    out = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python -m bench.ws_turns " + " ".join(sys.argv[1:] if argv is None else argv),
           "url": a.url, "model": a.model, "turns": a.turns, "rounds": a.rounds, "ways": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
