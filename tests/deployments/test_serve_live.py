"""The whole stack on a live local Ray: ingress -> replica groups -> engine, through the openai SDK."""

import os
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
