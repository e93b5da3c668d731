"""`gptoss batch`: a Batch API input file run through the model in this process, no server.

    gptoss batch --model PATH|demo -i requests.jsonl -o results.jsonl [--concurrency 64] [--tp N] [--ep M] [--gpu]

The input is OpenAI's batch input (one `{custom_id, method, url, body}` a line, one endpoint and one
model); the output is OpenAI's batch output lines, successes and errors alike, in input order. The
file runs through the same app and batch runner as a server's `POST /v1/batches`
(deployments.batch_routes, deployments.batch_runner), in process: each line gets what that request
over HTTP would.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from cli.generate import UsageError

ENDED = ("completed", "failed", "cancelled", "expired")


def add_parser(sub) -> None:
    b = sub.add_parser("batch", help="run a Batch API input file (JSONL) through the model here, without a server")
    b.add_argument("--model", default="demo", help="checkpoint directory, or 'demo'")
    b.add_argument("-i", "--input", required=True, help="JSONL, a request a line: {custom_id, method, url, body}")
    b.add_argument("-o", "--output", required=True,
                   help="JSONL the results go to, in input order (OpenAI's batch output lines); '-': stdout")
    b.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    b.add_argument("--max-num-seqs", type=int, help="sequences decoding at once (engine default 64)")
    b.add_argument("--tp", type=int, default=1, help="tensor-parallel size for attention (local rank processes)")
    b.add_argument("--ep", type=int, default=1, help="expert-parallel size (local rank processes)")
    b.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    b.add_argument("--gpu", action="store_true", help="run on CUDA in bf16 with MXFP4 experts")
    b.set_defaults(fn=run)


def read(path: str) -> tuple[bytes, str, str]:
    """The input's bytes, its endpoint and its model; a file that does not validate is a usage error naming
    its lines."""
    from deployments.batch_runner import ENDPOINTS, read_input
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"--input: cannot read {path}: {e}") from None
    first = next((ln for ln in data.splitlines() if ln.strip()), b"")
    try:
        endpoint = json.loads(first).get("url")
    except (ValueError, AttributeError):
        endpoint = None
    if endpoint not in ENDPOINTS:
        raise UsageError(f"--input: the first line's url must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}")
    lines, errors, model = read_input(data, endpoint, sys.maxsize)
    if errors:
        where = "; ".join(f"line {e['line']}: {e['message']}" if e["line"] else e["message"] for e in errors[:5])
        raise UsageError(f"--input: {path}: {where}" + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    return data, endpoint, model


async def run_file(app, data: bytes, endpoint: str, progress=None) -> tuple[dict, list[str]]:
    """Uploads `data`, runs it as a batch on `app` and waits: (the Batch object, its output lines in input
    order)."""
    import httpx
    async with app.router.lifespan_context(app):  # starts the app's batch runner
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as c:
            f = (await c.post("/v1/files", files={"file": ("input.jsonl", data)}, data={"purpose": "batch"})).json()
            b = (await c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": endpoint,
                                                   "completion_window": "24h"})).json()
            while b["status"] not in ENDED:
                await asyncio.sleep(0.2)
                b = (await c.get(f"/v1/batches/{b['id']}")).json()
                if progress is not None:
                    progress(b)
            lines = []
            for key in ("output_file_id", "error_file_id"):
                if b.get(key):
                    lines += (await c.get(f"/v1/files/{b[key]}/content")).text.splitlines()
    order = {json.loads(ln)["custom_id"]: i for i, ln in enumerate(data.splitlines()) if ln.strip()}
    return b, sorted(lines, key=lambda ln: order[json.loads(ln)["custom_id"]])


def run(args) -> int:
    import torch

    from cli.main import check_model, check_vocabulary, resolve_model
    from cluster.config import BatchConfig
    from deployments.openai_api import build_app
    from engine.async_engine import AsyncEngine
    from engine.core import EngineConfig, build_engine

    if args.concurrency < 1:
        raise UsageError("--concurrency: at least 1")
    check_vocabulary()
    data, endpoint, model = read(args.input)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if args.output != "-" and not os.access(out_dir, os.W_OK):
        raise UsageError(f"--output: cannot write to {out_dir}")
    path = resolve_model(args.model)
    check_model(path, args.tp, args.ep, False)
    if args.gpu and not torch.cuda.is_available():
        raise UsageError("--gpu: no CUDA device on this machine")
    runtime = dict(dtype=torch.bfloat16, device="cuda", keep_mxfp4=True) if args.gpu else dict(dtype=torch.float32)
    sizes = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    engine = AsyncEngine(build_engine(path, EngineConfig(kv_cache_dtype=args.kv_cache_dtype, **sizes), args.tp,
                                      args.ep, **runtime))
    # the lines name the model: it is served under that name; the whole file fits in memory, as it did here
    limits = BatchConfig(max_mb=max(1.0, 4 * len(data) / 2**20), max_file_mb=max(1.0, 2 * len(data) / 2**20),
                         max_requests=sys.maxsize, concurrency=args.concurrency)
    app = build_app({model: engine}, max_pending=2 * args.concurrency + 8, batches=limits)  # flex: no 429s
    t0 = time.time()

    def progress(b: dict) -> None:
        c = b["request_counts"]
        print(f"\r{c['completed'] + c['failed']}/{c['total']} done ({c['failed']} failed), "
              f"{time.time() - t0:.0f} s", end="", file=sys.stderr, flush=True)
    try:
        batch, lines = asyncio.run(run_file(app, data, endpoint, progress))
    finally:
        engine.shutdown()
    text = "".join(ln + "\n" for ln in lines)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
    c, u = batch["request_counts"], batch["usage"]
    print(f"\n{batch['status']}: {c['completed']} of {c['total']} succeeded, {c['failed']} failed; "
          f"{u['input_tokens']} input and {u['output_tokens']} output tokens in {time.time() - t0:.1f} s",
          file=sys.stderr)
    return 0 if batch["status"] == "completed" and not c["failed"] else 1
