"""bench.engine_overhead measures the engine's host time per decode step; a short run on CPU."""

from bench.engine_overhead import measure


def test_measure_reports_each_part():
    r = measure(batch=4, context=24, steps=3)
    parts = [r[k] for k in ("schedule_ms", "build_ms", "sampling_batch_ms", "update_ms")]
    assert all(p > 0 for p in parts)
    assert abs(sum(parts) - r["host_ms_per_step"]) < 1e-6
    assert r["wall_ms_per_step"] > r["host_ms_per_step"]
