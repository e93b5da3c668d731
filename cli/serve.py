"""`gptoss serve` (the OpenAI API on Ray Serve) and `gptoss serve-config` (its Serve YAML)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _add_common(p) -> None:
    p.add_argument("--model", default="demo", help="checkpoint directory, or 'demo'")
    p.add_argument("--name", default="gpt-oss", help="the model name clients send")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--attn-dp", action="store_true",
                   help="attention data parallelism: each of the ep/tp attention groups serves its own "
                        "sequences and holds only their KV (needs --ep > --tp)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="one GPU per rank")
    p.add_argument("--kv-cache-fraction", type=float, default=None,
                   help="with --gpu: the KV cache fills this fraction of each GPU's memory after weights and "
                        "activations (default 0.9 with --gpu)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="what the KV cache stores: the model's dtype (auto), or float8 e4m3 (fp8: twice the "
                        "tokens in the same memory, each cached value rounded to e4m3)")
    p.add_argument("--cpus-per-rank", type=float, default=1.0)
    # the engine's sizes (EngineConfig; unset: its defaults)
    p.add_argument("--max-num-seqs", type=int, help="sequences decoding at once (engine default 64)")
    p.add_argument("--max-tokens-per-step", type=int, help="prompt tokens a step may prefill (default 512)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + output, in tokens (default 8192)")
    p.add_argument("--max-draft-tokens", type=int, help="tokens of a request's `prediction` verified per step "
                                                        "(default 8; 0: predictions ignored)")
    p.add_argument("--flex-promote-s", type=float,
                   help="the floor under flex: a flex request waiting this long is scheduled as default work "
                        "(default 60; 0: flex may wait as long as other work keeps coming)")
    p.add_argument("--max-stored-responses", type=int, default=10_000,
                   help="Responses, conversations and stored chat completions kept for previous_response_id, "
                        "GET /v1/responses/{id}, /v1/conversations and GET /v1/chat/completions, least recently "
                        "used dropped first (0: store none)")
    p.add_argument("--prompts", metavar="FILE",
                   help="stored prompts Responses may name in `prompt` (a JSON or YAML list of {id, version, "
                        "instructions, input}; README, Serving)")
    p.add_argument("--batch-store-mb", type=float, default=1024.0,
                   help="memory for the Files and Batch APIs' uploads and results, in MiB (0: no /v1/files "
                        "or /v1/batches)")
    p.add_argument("--batch-concurrency", type=int, default=64,
                   help="requests of one batch in flight at once, per ingress replica running it")
    p.add_argument("--batch-file", metavar="PATH",
                   help="also keep uploaded files and batches in this SQLite file, so they (and running batches) "
                        "outlive a restart (default: memory only)")
    p.add_argument("--websocket-max-minutes", type=float, default=60.0,
                   help="how long a Responses WebSocket (ws://.../v1/responses, client.responses.connect()) "
                        "lasts before it closes, its work done (0: no WebSocket mode)")
    p.add_argument("--responses-file", metavar="PATH",
                   help="also keep stored responses and conversations in this SQLite file, read back when the "
                        "server starts again (default: memory only)")


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="serve the OpenAI API on Ray Serve")
    _add_common(s)
    s.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    s.add_argument("--metrics-port", type=int, default=8080,
                   help="local Ray only: port of Ray's Prometheus endpoint (/metrics) with the gptoss_* metrics")
    s.set_defaults(fn=run_serve)
    c = sub.add_parser("serve-config", help="write the Serve YAML for `serve deploy`")
    _add_common(c)
    c.add_argument("--out", default="-", help="file to write (default stdout)")
    c.set_defaults(fn=run_serve_config)
    k = sub.add_parser("reasoning-key", help="print a new key for env GPTOSS_REASONING_KEY (it seals reasoning "
                                             "items for include reasoning.encrypted_content)")
    k.set_defaults(fn=run_reasoning_key)


def run_reasoning_key(args) -> int:
    from deployments.sealed_reasoning import new_key
    print(new_key())
    return 0


def check_reasoning_key() -> None:
    """A malformed GPTOSS_REASONING_KEY stops the server here, not the ingress replicas after Ray started."""
    from cli.generate import UsageError
    from deployments.sealed_reasoning import key_from_env
    try:
        key_from_env()
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_config(args):
    from pydantic import ValidationError

    from cli.generate import UsageError
    from cluster.config import (AutoscalingConfig, BatchConfig, ModelGroupConfig, ResponseStoreConfig, ServeConfig,
                                WebSocketConfig)
    from engine.core import EngineConfig
    fraction = args.kv_cache_fraction if args.kv_cache_fraction is not None else 0.9 if args.gpu else None
    sizes = {k: getattr(args, k) for k in ("max_num_seqs", "max_tokens_per_step", "max_model_len", "max_draft_tokens",
                                           "flex_promote_s") if getattr(args, k) is not None}
    try:
        group = ModelGroupConfig(name=args.name, path=args.model, tp=args.tp, ep=args.ep, attn_dp=args.attn_dp,
                                 use_gpu=args.gpu,
                                 cpus_per_rank=args.cpus_per_rank,
                                 engine=EngineConfig(kv_cache_fraction=fraction, kv_cache_dtype=args.kv_cache_dtype,
                                                     **sizes),
                                 autoscaling=AutoscalingConfig(min_replicas=args.min_replicas,
                                                               max_replicas=args.max_replicas))
        cfg = ServeConfig(host=args.host, port=args.port, models=[group],
                          responses=ResponseStoreConfig(max_entries=args.max_stored_responses,
                                                        path=args.responses_file),
                          batches=BatchConfig(max_mb=args.batch_store_mb, concurrency=args.batch_concurrency,
                                              path=args.batch_file),
                          websockets=WebSocketConfig(max_minutes=args.websocket_max_minutes),
                          prompts=read_prompts(args.prompts) if args.prompts else [])
    except ValidationError as e:
        err = e.errors()[0]
        if err["loc"] and err["loc"][0] == "prompts":  # where in the file: prompt 2's input 0's role
            where = ".".join(f"[{x}]" if isinstance(x, int) else str(x) for x in err["loc"][1:]).replace(".[", "[")
            raise UsageError(f"--prompts: {where}: {err['msg']}" if where else f"--prompts: {err['msg']}") from None
        loc = [str(x) for x in err["loc"] if not str(x).isdigit()]
        # a model validator's error has no field: the message names the one it is about
        named = next((f for f in ("kv_cache_fraction", "attn_dp", "min_replicas", "max_replicas", "prompts")
                      if f in err["msg"]), None)
        field = named or (loc[-1] if loc else "config")
        flag = {"path": "model", "use_gpu": "gpu", "max_entries": "max_stored_responses",
                "max_mb": "batch_store_mb", "concurrency": "batch_concurrency",
                "max_minutes": "websocket_max_minutes"}.get(field, field)
        raise UsageError(f"--{flag.replace('_', '-')}: {err['msg']}") from None
    return cfg


def read_prompts(path: str) -> list:
    """The --prompts file: a list of prompt templates, JSON or YAML (JSON is YAML)."""
    import yaml

    from cli.generate import UsageError
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--prompts: cannot read {path}: {e}") from None
    if not isinstance(data, list):
        raise UsageError(f"--prompts: {path} must hold a list of prompts ({{id, version, instructions, input}})")
    return data


def check_store_file(path: str, flag: str = "--responses-file") -> None:
    """Here, not in the store replica: a path it cannot use is a usage error, not a failed deploy."""
    import sqlite3

    from cli.generate import UsageError
    from deployments.batch_file import BatchFile
    from deployments.store_file import StoreFile
    try:
        (BatchFile if flag == "--batch-file" else StoreFile)(path).close()
    except (OSError, sqlite3.Error) as e:
        raise UsageError(f"{flag}: cannot use {path}: {e}") from None


def run_serve_config(args) -> int:
    import yaml

    from cli.main import check_model, demo_dir
    cfg = build_config(args)
    path = demo_dir() if args.model == "demo" else Path(args.model)
    if path.exists():  # else it is the cluster's path, checked by its replicas
        check_model(path, args.tp, args.ep, args.attn_dp)
    text = yaml.safe_dump(cfg.serve_yaml(), sort_keys=False)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}; deploy with: serve deploy {args.out}", file=sys.stderr)
    return 0


def startup_failure(app_name: str) -> str:
    """Why Serve could not start the app: the failed deployment's last line (its error), not Ray's message
    ("Failed to update the deployments") nor the replica's traceback, which the controller's log holds."""
    from ray import serve
    try:
        app = serve.status().applications[app_name]
    except Exception as e:  # the controller itself is gone
        return f"Serve's status is unavailable ({e})"
    for name, d in app.deployments.items():
        lines = [ln.strip() for ln in (d.message or "").splitlines() if ln.strip()]
        if lines and str(d.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            return f"deployment {name}: {lines[-1]}"
    return app.message or str(app.status)


def check_port(host: str, port: int, flag: str) -> None:
    """Serve's proxy binds the API port only after Ray has started, and then fails with a traceback: a port
    already taken, or a host that is not this machine's, is found here first."""
    import errno
    import socket

    from cli.generate import UsageError
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"{flag}: {port} is in use on {host} (another server?)") from None
            raise UsageError(f"--host: cannot listen on {host}:{port} ({e.strerror or e})") from None


def run_serve(args) -> int:
    from cli.generate import UsageError
    from cli.main import check_model, check_vocabulary, resolve_model
    cfg = build_config(args)
    if cfg.responses.path and not args.address:  # a cluster's path may exist only on its head node
        check_store_file(cfg.responses.path)
    if cfg.batches.path and not args.address:
        check_store_file(cfg.batches.path, "--batch-file")
    check_vocabulary()
    check_reasoning_key()
    path = resolve_model(args.model)  # build the demo checkpoint once, before replicas race for it
    if not args.address or path.exists():  # a cluster's path may exist only on its nodes
        check_model(path, args.tp, args.ep, args.attn_dp)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.serve_app import build_application
    if args.address:
        ray.init(address=args.address)
    else:
        if not 0 < args.metrics_port < 65536:
            raise UsageError(f"--metrics-port: {args.metrics_port} is not a port number")
        if args.metrics_port == cfg.port:
            raise UsageError(f"--metrics-port: {args.metrics_port} is also --port")
        check_port(cfg.host, cfg.port, "--port")
        check_port("0.0.0.0", args.metrics_port, "--metrics-port")
        ray.init(num_cpus=max(os.cpu_count() or 2, cfg.models[0].world + 1), include_dashboard=True,
                 _metrics_export_port=args.metrics_port)
        # a local Ray has no autoscaler to add GPUs: the replicas would wait for them forever
        need = cfg.models[0].world * args.min_replicas
        if args.gpu and (have := int(ray.cluster_resources().get("GPU", 0))) < need:
            ray.shutdown()
            raise UsageError(f"--gpu: {args.min_replicas} replica(s) of {cfg.models[0].world} rank(s) need {need} "
                             f"GPU(s); Ray sees {have} on this machine")
    _interrupt_on_sigterm()  # after ray.init, which installs its own handler (a native stack dump)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        try:
            serve.run(build_application(cfg), name=cfg.app_name, route_prefix="/")
        except Exception:
            why = startup_failure(cfg.app_name)
            _stop(args.address, cfg.app_name)
            print(f"gptoss serve: the model group did not start: {why}", file=sys.stderr)
            return 1
        url = f"http://{cfg.host}:{cfg.port}"
        metrics = "see the cluster's metrics port" if args.address else f"http://127.0.0.1:{args.metrics_port}/metrics"
        print(f"\nOpenAI API ready at {url}/v1  (model '{args.name}')\n"
              f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{args.name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}], "
              f"\"max_tokens\": 64}}'\n"
              f"Ray dashboard: http://127.0.0.1:8265   metrics: {metrics}   (Ctrl-C or SIGTERM stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("gptoss serve: stopping", file=sys.stderr, flush=True)
        _stop(args.address, cfg.app_name)
    return 0


def _interrupt_on_sigterm() -> None:
    """SIGTERM (systemd, docker stop, kill) stops the server the way Ctrl-C does."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def _stop(address, app_name: str) -> None:
    """On a cluster, remove this app only (others may share its Serve); locally, stop Serve and Ray."""
    import ray
    from ray import serve
    if address:
        serve.delete(app_name)
    else:
        serve.shutdown()
        ray.shutdown()
