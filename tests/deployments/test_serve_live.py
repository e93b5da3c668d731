"""The whole stack on a live local Ray: ingress -> replica groups -> engine, through the openai SDK."""

import os
import threading
import time

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

from cluster.config import AutoscalingConfig, ModelGroupConfig, ServeConfig  # noqa: E402
from engine.core import EngineConfig  # noqa: E402

PORT = 8765


@pytest.fixture(scope="module")
def app(tiny_ckpt):
    from deployments.serve_app import build_application
    eng = EngineConfig(block_size=16, num_blocks=256, max_num_seqs=16, max_tokens_per_step=256, max_model_len=2048)
    cfg = ServeConfig(port=PORT, models=[
        ModelGroupConfig(name="tiny", path=str(tiny_ckpt), cpus_per_rank=0.5, engine=eng,
                         autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2, target_queue_depth=2,
                                                       upscale_delay_s=0.5, downscale_delay_s=3)),
        ModelGroupConfig(name="tiny-ep2", path=str(tiny_ckpt), ep=2, cpus_per_rank=0.5, engine=eng),
    ])
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": {
        "TIKTOKEN_ENCODINGS_BASE": os.environ.get("TIKTOKEN_ENCODINGS_BASE", ""), "OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_application(cfg), name="gptoss", route_prefix="/")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="x", max_retries=0, timeout=120)
    serve.shutdown()
    ray.shutdown()


def _chat(client, model, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                          temperature=0, max_tokens=24, extra_body={"max_reasoning_tokens": 6},
                                          **kw)


def test_models_and_chat(app):
    ids = {m.id for m in app.models.list().data}
    assert {"tiny", "tiny-ep2"} <= ids
    r = _chat(app, "tiny")
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0


def test_ep2_group_gives_the_same_greedy_output(app):
    a, b = _chat(app, "tiny"), _chat(app, "tiny-ep2")
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens


def _replicas(name: str) -> int:
    st = serve.status().applications["gptoss"].deployments[name]
    return sum(st.replica_states.values()) if st.replica_states else 0


def test_burst_scales_up_then_back_down(app):
    errors, done = [], []

    def one():
        try:
            r = app.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}],
                                            max_tokens=60, temperature=1.0, extra_body={"max_reasoning_tokens": 4})
            done.append(r.usage.completion_tokens)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t0, peak = time.time(), 1
    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and time.time() - t0 < 150:
        peak = max(peak, _replicas("group-tiny"))
        time.sleep(0.5)
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(done) == 16
    assert peak == 2, "the burst never brought a second replica group"
    deadline = time.time() + 60
    while _replicas("group-tiny") > 1 and time.time() < deadline:
        time.sleep(1)
    assert _replicas("group-tiny") == 1


def test_killing_a_rank_ends_its_streams_and_the_group_recovers(app):
    from ray.util.state import list_actors
    stream = app.chat.completions.create(model="tiny-ep2", messages=[{"role": "user", "content": "long"}],
                                         max_tokens=400, temperature=1.0, stream=True,
                                         extra_body={"max_reasoning_tokens": 300})
    it = iter(stream)
    next(it)
    ranks = [a for a in list_actors(filters=[("class_name", "=", "RankRuntime"), ("state", "=", "ALIVE")])]
    assert ranks, "no rank actors found"
    ray.kill(ray.get_actor(ranks[0].name, namespace="gptoss"), no_restart=True)
    got_error = False
    try:
        for _ in it:
            pass
    except Exception:  # noqa: BLE001  the SDK raises on an error event
        got_error = True
    assert got_error, "the stream ended without an error after its rank died"
    other = _chat(app, "tiny")  # the other model's group is unaffected
    assert other.usage.completion_tokens > 0
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            r = _chat(app, "tiny-ep2")
            if r.usage.completion_tokens > 0:
                return
        except Exception:  # noqa: BLE001
            time.sleep(2)
    pytest.fail("the EP2 group was not replaced")
