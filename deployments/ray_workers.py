"""Rank workers as Ray actors inside a replica's placement group.

Same `call` interface as parallel.worker.RankWorkers, so the engine's
MultiProcessExecutor drives either. Actor death surfaces as `WorkerError`,
which fails the step; the replica then reports itself unhealthy and Serve
replaces it.
"""

from __future__ import annotations

import re
import uuid

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from parallel.layout import resolve_layout
from parallel.replies import FAILURE_GRACE_S, BrokenGuard
from parallel.worker import RankRuntime, WorkerSpec


NAMESPACE = "gptoss"


class RankActor:
    """One rank as a Ray actor. Made empty first, so that rank 0 can say where the group's rendezvous
    will be (its node's address: a group may span nodes, e.g. helm's 120b EP8 over two 4-GPU pods,
    where 127.0.0.1 would be each rank's own host); `start` then loads the shard and joins."""

    def __init__(self):
        self.rt: RankRuntime | None = None

    def address(self) -> tuple[str, int]:
        from parallel.comm import free_port
        return ray.util.get_node_ip_address(), free_port("0.0.0.0")

    def start(self, spec: WorkerSpec, rank: int) -> bool:
        self.rt = RankRuntime(spec, rank)
        return True

    def ping(self) -> bool:
        return True

    def handle(self, kind: str, payload=None):
        return self.rt.handle(kind, payload)


def rendezvous_url(ip: str, port: int) -> str:
    return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"


class _Sent(list):
    """The per-rank refs of one message, and its kind (for error messages)."""

    def __init__(self, kind: str, refs: list):
        super().__init__(refs)
        self.kind = kind


class RayRankWorkers:
    def __init__(self, spec: WorkerSpec, use_gpu: bool, cpus_per_rank: float, timeout: float = 180.0,
                 startup_timeout: float = 1800.0, label: str = "", grace: float = FAILURE_GRACE_S):
        """timeout: per call; startup_timeout: for the ranks to load their shards (a 120b EP8 rank
        reads ~11 GB) and for warmup (every kernel size class compiled, every decode graph captured);
        grace: how long the other ranks may take to answer once one failed (parallel.replies)."""
        from models.config import load_config
        from models.weights import resolve_layout as resolve_ckpt

        self.config = load_config(resolve_ckpt(spec.path)[0])
        self.layout = resolve_layout(self.config, spec.tp, spec.ep, placement=spec.placement,
                                     attn_dp=spec.attn_dp)
        self.attn_dp = spec.attn_dp
        self.timeout, self.grace = timeout, grace
        self.guard = BrokenGuard()
        pg = ray.util.get_current_placement_group()
        actor = ray.remote(RankActor)
        self.actors = []
        # named "gptoss-rank-<model>-<group>-<rank>", so operators (and tests) find a model's ranks
        group = (re.sub(r"[^A-Za-z0-9._-]", "_", label) + "-" if label else "") + uuid.uuid4().hex[:8]
        for r in range(len(self.layout)):
            opts = {"num_cpus": cpus_per_rank, "num_gpus": 1 if use_gpu else 0, "max_restarts": 0,
                    "name": f"gptoss-rank-{group}-{r}", "namespace": NAMESPACE}
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
            self.actors.append(actor.options(**opts).remote())
        self.startup_timeout = startup_timeout
        if not spec.init_method:  # at rank 0's node, which every rank can reach
            spec.init_method = rendezvous_url(*self._get([self.actors[0].address.remote()], startup_timeout, "address")[0])
        self.init_method = spec.init_method
        self._get([a.start.remote(spec, r) for r, a in enumerate(self.actors)], startup_timeout, "start")

    def _get(self, refs: list, timeout: float | None = None, what: str = "call") -> list:
        """Every rank's result (parallel.replies.gather: a failed rank does not leave the driver
        waiting on its peers, stuck in a collective, for the whole timeout)."""
        index = {ref: r for r, ref in enumerate(refs)}

        def wait(pending: list[int], seconds: float) -> list[tuple[int, bool, object]]:
            ready, _ = ray.wait([refs[r] for r in pending], num_returns=1, timeout=seconds)
            out = []
            for ref in ready:
                try:
                    out.append((index[ref], True, ray.get(ref)))
                except Exception as e:  # the actor raised (its traceback inside) or died
                    out.append((index[ref], False, f"{type(e).__name__}: {e}"))
            return out
        return self.guard.gather(len(refs), wait, what, timeout or self.timeout, self.grace)

    def submit(self, kind: str, payload=None) -> list:
        """Send to every rank now (a Ray actor runs its calls in the order sent); `collect` later."""
        return self.submit_each(kind, [payload] * len(self.actors))

    def submit_each(self, kind: str, payloads: list) -> list:
        """Send each rank its own payload (payloads[rank])."""
        self.guard.check()
        return _Sent(kind, [a.handle.remote(kind, p) for a, p in zip(self.actors, payloads, strict=True)])

    def collect(self, refs: list, timeout: float | None = None) -> list:
        return self._get(refs, timeout, getattr(refs, "kind", "call"))

    def call(self, kind: str, payload=None, timeout: float | None = None) -> list:
        return self.collect(self.submit(kind, payload), timeout)

    def alive(self) -> bool:
        if self.guard.broken is not None:
            return False
        try:
            ray.get([a.ping.remote() for a in self.actors], timeout=10)
            return True
        except Exception:
            return False

    def shutdown(self):
        for a in self.actors:
            ray.kill(a, no_restart=True)
