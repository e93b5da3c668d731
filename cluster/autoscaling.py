"""Queue-depth autoscaling for replica groups (a Ray Serve custom policy).

Each replica group publishes `queue_depth` (waiting + running requests) and
`kv_usage` through `record_autoscaling_stats`. The policy wants
ceil(total depth / target) groups (one more when KV pressure is high), clamps
to [min, max], and only moves after the desire has held for the upscale or
downscale delay, so a burst does not flap the group count. Serve drains a
replica it removes: in-flight requests finish before it stops.
"""

from __future__ import annotations

import math


def desired_groups(depths: list[float], kv: list[float], current: int, target: float, max_kv: float,
                   lo: int, hi: int) -> int:
    total = sum(depths)
    want = math.ceil(total / target) if total > 0 else lo
    if kv and max(kv) >= max_kv and total > 0:
        want = max(want, current + 1)
    return max(lo, min(hi, want))


def decide(want: int, current: int, state: dict, now: float, up_delay: float, down_delay: float) -> tuple[int, dict]:
    """Smoothing: act on a change of desire only once it has held long enough."""
    if want == current:
        return current, {}
    direction = "up" if want > current else "down"
    since = state.get("since") if state.get("direction") == direction else None
    since = now if since is None else since
    delay = up_delay if direction == "up" else down_delay
    if now - since >= delay:
        return want, {}
    return current, {"direction": direction, "since": since}


class QueueDepthPolicy:
    """Ray Serve autoscaling policy class (`policy_function` + `policy_kwargs`)."""

    def __init__(self, target_queue_depth: float = 4.0, max_kv_usage: float = 0.9,
                 upscale_delay_s: float = 2.0, downscale_delay_s: float = 10.0, model: str = "",
                 metrics_backend: str | None = "ray"):
        self.target, self.max_kv = target_queue_depth, max_kv_usage
        self.up, self.down = upscale_delay_s, downscale_delay_s
        self.model, self.metrics_backend = model, metrics_backend
        self._rec = None

    def __call__(self, ctx) -> tuple[int, dict]:
        """ctx is ray.serve.config.AutoscalingContext."""
        import time

        metrics = ctx.aggregated_metrics or {}
        depths = list((metrics.get("queue_depth") or {}).values())
        kv = list((metrics.get("kv_usage") or {}).values())
        if not depths:  # no stats yet: fall back to Serve's own request count
            depths = [float(ctx.total_num_requests or 0)]
        # The baseline is the target we set last time, not the running count: while a new group
        # starts, returning the running count would cancel the scale-up we just asked for.
        target = getattr(ctx, "target_num_replicas", None) or ctx.current_num_replicas
        want = desired_groups(depths, kv, target, self.target, self.max_kv,
                              ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
        now = ctx.current_time if ctx.current_time is not None else time.time()
        n, state = decide(want, target, dict(ctx.policy_state or {}), now, self.up, self.down)
        self._record(sum(depths), target, n)
        return n, state

    def _record(self, depth: float, current: int, decided: int) -> None:
        if self._rec is None:  # made on first use: the policy object is built in Serve's controller
            from observability.metrics import MetricsRecorder
            self._rec = MetricsRecorder(self.metrics_backend, model=self.model)
        self._rec.set("gptoss_queue_depth", depth)
        self._rec.set("gptoss_replica_groups", decided)
        if decided != current:
            self._rec.inc("gptoss_autoscaling_decisions", 1, direction="up" if decided > current else "down")
