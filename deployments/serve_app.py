"""The Ray Serve application: an OpenAI ingress and one replica-group deployment per model.

    Ingress (FastAPI, deployments.openai_api) --model--> ReplicaGroup[model] (autoscaled)
                                                          each replica: placement group of
                                                          tp x ep bundles, rank actors, engine

Routing by `model` happens in the ingress (one handle per model); within a
model, deployments.router.PrefixAffinityRouter picks the replica group by
prefix affinity and queue length.
Autoscaling uses cluster.autoscaling.QueueDepthPolicy on the groups'
published queue depth and KV pressure.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import AsyncIterator, Optional

from ray import serve

from cluster.config import ModelGroupConfig, ServeConfig

from .sealed_reasoning import key_from_env, new_key

log = logging.getLogger(__name__)
METRICS_INTERVAL_S = 2.0
REPLICA_CPUS = 0.1  # the driver of a multi-rank group: scheduler + sampler, the ranks do the math


class ReplicaGroup:
    """One replica group: a model sharded over tp x ep ranks, and its engine."""

    def __init__(self, group: dict):
        from engine.async_engine import AsyncEngine

        from .group_engine import build_group_engine
        from .ray_workers import RayRankWorkers
        self.cfg = cfg = ModelGroupConfig(**group)
        llm, self.workers = build_group_engine(
            cfg, lambda spec: RayRankWorkers(spec, cfg.use_gpu, cfg.cpus_per_rank, label=cfg.name))
        self.engine = AsyncEngine(llm)
        self.failed: str | None = None
        self._publisher = threading.Thread(target=self._publish_metrics, name="metrics", daemon=True)
        self._publisher.start()

    def _publish_metrics(self) -> None:
        """Engine state -> Ray metrics, every METRICS_INTERVAL_S, between engine steps."""
        from observability.metrics import MetricsRecorder
        from observability.tracking import EnginePublisher
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (tests constructing the class directly)
            replica = "local"
        pub = EnginePublisher(MetricsRecorder("ray", model=self.cfg.name, replica=replica))
        while not self.failed:
            time.sleep(METRICS_INTERVAL_S)
            try:
                pub.publish(self.engine.snapshot())
            except Exception:  # a dead rank shows up in check_health, not here
                log.debug("metrics snapshot failed", exc_info=True)

    async def generate(self, request) -> AsyncIterator:
        from engine.request import EngineOverloadedError
        if self.failed:
            raise EngineOverloadedError(f"replica group unhealthy: {self.failed}")
        async for out in self.engine.generate(request):
            if out.finish_reason == "error":
                self.failed = out.error  # a rank died or a step failed: let Serve replace us
            yield out

    def stats(self) -> dict:
        return self.engine.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.engine.stats()
        used, free = s.get("kv_full_used", 0), s.get("kv_full_free", 1)
        return {"queue_depth": float(s["waiting"] + s["running"]), "kv_usage": used / max(used + free, 1)}

    def check_health(self) -> None:
        if self.failed:
            raise RuntimeError(self.failed)
        if self.workers is not None and not self.workers.alive():
            raise RuntimeError("a rank worker died")


class RemoteEngine:
    """EngineClient over a replica-group handle. Leaving the stream cancels the
    call, which closes the replica's generator and aborts the request there."""

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name

    async def generate(self, request) -> AsyncIterator:
        gen = self.handle.options(stream=True).generate.remote(request)
        try:
            async for out in gen:
                yield out
        finally:
            gen.cancel()

    def abort(self, request_id: str) -> None:
        pass  # cancellation of the stream aborts in the replica

    def stats(self) -> dict:
        return {}


class Ingress:
    def __init__(self, handles: dict, config: dict, store=None, reasoning_key: Optional[str] = None,
                 batch_store=None):
        """reasoning_key: made by build_application so every replica of the app seals alike; env
        GPTOSS_REASONING_KEY, when set, is used instead (it outlives the app)."""
        self.cfg = ServeConfig(**config)
        self.handles, self.store, self.reasoning_key = handles, store, reasoning_key
        self.batch_store = batch_store

    def __serve_build_asgi_app__(self):
        from observability.metrics import MetricsRecorder

        from .api_common import api_keys_from_env
        from .batch_store import BatchStoreClient
        from .openai_api import build_app
        from .response_store import RemoteResponseStore
        engines = {name: RemoteEngine(h, name) for name, h in self.handles.items()}
        limits = {m.name: m.max_pending * max(1, m.autoscaling.max_replicas) for m in self.cfg.models}
        store = RemoteResponseStore(self.store) if self.store is not None else None
        return build_app(engines, max_pending=limits, metrics=MetricsRecorder("ray"), api_keys=api_keys_from_env(),
                         response_store=store, reasoning_key=key_from_env() or self.reasoning_key,
                         prompts=self.cfg.prompts, batches=self.cfg.batches, websockets=self.cfg.websockets,
                         webhooks=self.cfg.webhooks,
                         batch_store=None if self.batch_store is None else BatchStoreClient(handle=self.batch_store))


def group_deployment(m: ModelGroupConfig):
    a = m.autoscaling
    bundles = [{"GPU": 1, "CPU": m.cpus_per_rank} if m.use_gpu else {"CPU": m.cpus_per_rank}
               for _ in range(m.world)]
    bundles[0] = {**bundles[0], "CPU": bundles[0]["CPU"] + REPLICA_CPUS}  # the replica itself lands in bundle 0
    opts = dict(
        name=f"group-{m.name.replace('/', '-')}",
        autoscaling_config={
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "initial_replicas": a.min_replicas,
            "upscale_delay_s": 0, "downscale_delay_s": 0,  # our policy does the smoothing
            "metrics_interval_s": 0.5, "look_back_period_s": 2,
            "policy": {"policy_function": "cluster.autoscaling:QueueDepthPolicy",
                       "policy_kwargs": {"model": m.name, "target_queue_depth": a.target_queue_depth,
                                         "max_kv_usage": a.max_kv_usage,
                                         "upscale_delay_s": a.upscale_delay_s,
                                         "downscale_delay_s": a.downscale_delay_s}},
        },
        request_router_config={"request_router_class": "deployments.router.PrefixAffinityRouter",
                               "request_router_kwargs": {"block": m.engine.block_size}},
        max_ongoing_requests=m.max_pending,
        health_check_period_s=2, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=120,  # scale-down drains in-flight requests
    )
    if m.world > 1:
        opts.update(placement_group_bundles=bundles, placement_group_strategy="PACK",
                    ray_actor_options={"num_cpus": REPLICA_CPUS})
    else:
        opts["ray_actor_options"] = {"num_cpus": m.cpus_per_rank, "num_gpus": 1 if m.use_gpu else 0}
    return serve.deployment(ReplicaGroup).options(**opts)


def build_application(cfg: ServeConfig):
    handles = {m.name: group_deployment(m).bind(m.model_dump(mode="json")) for m in cfg.models}
    # Serve's default (5 in flight per replica) would cap every model's batch at 5; the ingress
    # does its own per-model admission (429 past max_pending x max_replicas).
    in_flight = sum(m.max_pending * max(1, m.autoscaling.max_replicas) for m in cfg.models) + 16
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=in_flight)
    return ingress.bind(handles, cfg.model_dump(mode="json"), store_deployment(cfg, in_flight), new_key(),
                        batch_store_deployment(cfg, in_flight))


# The stores' calls are the app's own (a runner polls for batches every few seconds, a background run sends
# its progress): one access-log line each would bury the log; their errors are still logged.
_QUIET = {"enable_access_log": False}


def store_deployment(cfg: ServeConfig, in_flight: int):
    """The one replica every ingress replica stores Responses in (None when storing nothing). One, not
    autoscaled: its calls are dict lookups, and a second replica would not see the first's records."""
    from .response_store import ResponseStoreServer
    r = cfg.responses
    if r.max_entries == 0:
        return None
    actor = {"num_cpus": 0}
    if r.path:  # the file is on the head node's volume (the Helm chart mounts it there)
        actor["resources"] = {"node:__internal_head__": 0.001}
    return serve.deployment(ResponseStoreServer).options(
        name="responses", num_replicas=1, ray_actor_options=actor, max_ongoing_requests=in_flight,
        logging_config=_QUIET).bind(r.max_entries, int(r.max_mb * (1 << 20)), r.path)


def batch_store_deployment(cfg: ServeConfig, in_flight: int):
    """The one replica holding the Files and Batch APIs' files and batches (None when they are off), for the
    same reason as the response store's: any ingress replica answers for any batch, and runs any."""
    from .batch_store import BatchStoreServer
    b = cfg.batches
    if b.max_mb == 0:
        return None
    actor = {"num_cpus": 0}
    if b.path:  # on the head node's volume, as the response store's file
        actor["resources"] = {"node:__internal_head__": 0.001}
    return serve.deployment(BatchStoreServer).options(
        name="batches", num_replicas=1, ray_actor_options=actor, max_ongoing_requests=in_flight,
        logging_config=_QUIET).bind(int(b.max_mb * (1 << 20)), b.path)


def app_builder(args: dict):
    """Import path for `serve deploy` / `serve run` (see `gptoss serve-config`)."""
    return build_application(ServeConfig(**args["config"]))
