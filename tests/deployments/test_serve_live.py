"""The whole stack on a live local Ray: ingress -> replica groups -> engine, through the openai SDK.

One Ray cluster for the module; tests run in file order and later ones rely on
the load the earlier ones made (the Prometheus test reads their metrics).
"""

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

from cluster.config import AutoscalingConfig, ModelGroupConfig, ServeConfig  # noqa: E402
from engine.core import EngineConfig  # noqa: E402

PORT = 8765
METRICS_PORT = 18765
PROM_PORT = 19090


ALERTS = os.path.join(os.path.dirname(__file__), "..", "..", "helm", "gptoss", "alerts", "gptoss-alerts.yaml")
PROM_CONFIG = """
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ["%s"]
scrape_configs:
  - job_name: ray
    static_configs: [{targets: ["127.0.0.1:%d"]}]
"""


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real Prometheus (Debian's package; .ci/run installs it) scraping Ray's metrics endpoint
    from the start, so rates and quantiles see the load of every test in this module."""
    import shutil
    import subprocess
    exe = shutil.which("prometheus")
    if exe is None:
        yield None
        return
    d = tmp_path_factory.mktemp("prom")
    (d / "prometheus.yml").write_text(PROM_CONFIG % (os.path.abspath(ALERTS), METRICS_PORT))
    proc = subprocess.Popen([exe, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{PROM_PORT}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield f"http://127.0.0.1:{PROM_PORT}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def app(tiny_ckpt, prometheus):
    from deployments.serve_app import build_application
    eng = EngineConfig(block_size=16, num_blocks=256, max_num_seqs=16, max_tokens_per_step=256, max_model_len=2048)
    # a KV pool the burst overflows: requests get preempted and must still all finish
    small = EngineConfig(block_size=16, num_blocks=32, max_num_seqs=16, max_tokens_per_step=256, max_model_len=480)
    cfg = ServeConfig(port=PORT, models=[
        ModelGroupConfig(name="tiny", path=str(tiny_ckpt), cpus_per_rank=0.5, engine=small,
                         autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2, target_queue_depth=2,
                                                       upscale_delay_s=0.5, downscale_delay_s=3)),
        ModelGroupConfig(name="tiny-ep2", path=str(tiny_ckpt), ep=2, cpus_per_rank=0.5, engine=eng),
        ModelGroupConfig(name="tiny-dp2", path=str(tiny_ckpt), ep=2, attn_dp=True, cpus_per_rank=0.5, engine=eng),
        ModelGroupConfig(name="tiny-fp8", path=str(tiny_ckpt), ep=2, cpus_per_rank=0.5,
                         engine=eng.model_copy(update={"kv_cache_dtype": "fp8"})),
    ])
    ray.init(num_cpus=8, include_dashboard=False, _metrics_export_port=METRICS_PORT, runtime_env={"env_vars": {
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
    assert {"tiny", "tiny-ep2", "tiny-dp2", "tiny-fp8"} <= ids
    r = _chat(app, "tiny")
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    # the engine's refusals cross from the group's replica (and a rank) as their own 400s
    for model in ("tiny", "tiny-ep2"):
        with pytest.raises(openai.BadRequestError) as e:
            _chat(app, model, logit_bias={"201088": 1})
        assert e.value.body["param"] == "logit_bias" and "outside the vocabulary" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            app.completions.create(model=model, prompt="x", max_tokens=5000)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"


def test_responses_are_stored_and_continued_through_the_store_replica(app):
    kw = dict(model="tiny", max_output_tokens=4, extra_body={"max_reasoning_tokens": 0})
    r1 = app.responses.create(input="One", **kw)
    r2 = app.responses.create(input="Two", previous_response_id=r1.id, **kw)
    assert r2.previous_response_id == r1.id and r2.usage.input_tokens > r1.usage.input_tokens
    assert app.responses.retrieve(r2.id).output_text == r2.output_text
    # a background response runs on in the ingress replica and is read back through the store
    bg = app.responses.create(input="Three", background=True, previous_response_id=r2.id, **kw)
    assert bg.status == "in_progress" and bg.background
    t0 = time.time()
    while (got := app.responses.retrieve(bg.id)).status == "in_progress" and time.time() - t0 < 60:
        time.sleep(0.1)
    assert got.status in ("completed", "incomplete") and got.usage.input_tokens > r2.usage.input_tokens
    # a background stream: its client leaves, and it resumes from the store (the run ended, so any replica)
    with app.responses.stream(input="Four", background=True, **{**kw, "max_output_tokens": 24}) as s:
        first = [ev for ev, _ in zip(s, range(3))]
    t0 = time.time()
    while app.responses.retrieve(first[0].response.id).status == "in_progress" and time.time() - t0 < 60:
        time.sleep(0.1)
    rest = list(app.responses.retrieve(first[0].response.id, stream=True, starting_after=2))
    assert [e.sequence_number for e in first + rest] == list(range(len(first) + len(rest)))
    assert rest[-1].type in ("response.completed", "response.incomplete")
    # a conversation lives in the store replica too, edited there
    conv = app.conversations.create(items=[{"role": "user", "content": "Five"}])
    r5 = app.responses.create(conversation=conv.id, input="Six", **kw)
    assert r5.conversation.id == conv.id and r5.usage.input_tokens > 0
    assert len(list(app.conversations.items.list(conv.id))) == 2 + len(r5.output)
    # compaction through Serve: the item continues a stored conversation from the store replica
    compact = app.responses.compact(model="tiny", previous_response_id=r5.id, extra_body={"max_output_tokens": 8})
    assert compact.output[-1].type == "compaction"
    on = app.responses.create(input=[compact.output[-1].model_dump(exclude_none=True),
                                     {"role": "user", "content": "Go on"}], **kw)
    assert on.status in ("completed", "incomplete")
    # a stored chat completion: kept in the store replica and listed there (the page is built where it is held)
    tag = f"live-{time.time()}"
    chat = app.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Seven"}], max_tokens=4,
                                       store=True, metadata={"run": tag})
    assert [c.id for c in app.chat.completions.list(metadata={"run": tag})] == [chat.id]
    assert app.chat.completions.retrieve(chat.id).choices[0].message.content == chat.choices[0].message.content
    # truncation="auto" past the group's 480 tokens: the engine's refusal crosses Ray with its limit
    long = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " + "lorem ipsum " * 40} for i in range(8)]
    long.append({"role": "user", "content": "Last?"})
    with pytest.raises(openai.BadRequestError) as e:
        app.responses.create(input=long, **kw)
    assert e.value.body["code"] == "context_length_exceeded"
    r6 = app.responses.create(input=long, truncation="auto", **kw)
    assert r6.truncation == "auto" and 0 < r6.usage.input_tokens <= 480 - 4
    # the store replica's progress calls, as a run on another replica makes them
    from deployments.response_store import RemoteResponseStore, StoredResponse
    store = RemoteResponseStore(serve.get_deployment_handle("responses", app_name="gptoss"))

    async def progress():
        run = {"id": "resp_live", "status": "in_progress", "output": []}
        await store.put(StoredResponse("resp_live", None, [], run, events=["a"]))
        assert await store.update("resp_live", {**run, "output": [1]}, 1, ["b", "c"]) == ("in_progress", 3)
        return await store.events("resp_live", 1)

    assert asyncio.run(progress()) == ("in_progress", ["b", "c"])
    app.responses.delete(r1.id)
    with pytest.raises(openai.BadRequestError) as e:
        app.responses.create(input="Four", previous_response_id=r2.id, **kw)
    assert r1.id in e.value.body["message"] and e.value.body["param"] == "previous_response_id"


def test_a_responses_websocket_runs_through_the_serve_proxy(app):
    """Serve's proxy upgrades the connection to the ingress replica: lanes run, a store=false turn is continued
    on the connection, a stored one from the store replica."""
    final = ("response.completed", "response.incomplete", "response.failed", "error")
    kw = {"type": "response.create", "model": "tiny", "max_output_tokens": 4, "max_reasoning_tokens": 0}
    with app.responses.connect() as conn:
        for sid in ("x", "y"):
            conn.send({**kw, "input": f"Hi {sid}", "store": sid == "y", "stream_id": sid})
        done = {}
        for ev in conn:
            if ev.type in final:
                done[ev.stream_id] = ev
                if len(done) == 2:
                    break
        assert {k: ev.type in ("response.completed", "response.incomplete") for k, ev in done.items()} == {
            "x": True, "y": True}
        for sid in ("x", "y"):
            conn.send({**kw, "input": "More", "previous_response_id": done[sid].response.id, "store": False})
            ev = next(ev for ev in conn if ev.type in final)
            assert ev.response.previous_response_id == done[sid].response.id
            assert ev.response.usage.input_tokens > done[sid].response.usage.input_tokens
    assert app.responses.retrieve(done["y"].response.id).id == done["y"].response.id


def test_a_batch_runs_through_the_batch_store_replica(app):
    """Upload, create, poll, download through Serve: the files and the batch live in the batch store replica,
    an ingress replica's runner runs the lines (on the flex tier) over the EP2 group."""
    import io
    import json
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny-ep2", "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 6,
                       "temperature": 0}} for i in range(3)]
    lines[2]["body"].update(store=True, metadata={"from": "live-batch"})  # stored by the store replica
    from tests.api.test_webhooks import Receiver
    hook = Receiver()  # its endpoint is kept in the batch store replica; the runner's replica delivers
    endpoint = app.webhooks.create(name="live", url=hook.url, event_types=["batch.completed"])
    f = app.files.create(file=("in.jsonl", io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())),
                         purpose="batch")
    b = app.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    t0 = time.time()
    while (b := app.batches.retrieve(b.id)).status == "in_progress" and time.time() - t0 < 120:
        time.sleep(0.2)
    assert b.status == "completed" and b.request_counts.completed == 3 and b.usage.output_tokens == 18, b
    out = [json.loads(x) for x in app.files.content(b.output_file_id).text.splitlines()]
    direct = app.chat.completions.create(**lines[1]["body"])
    assert out[1]["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert {x["response"]["body"]["service_tier"] for x in out} == {"flex"}
    stored = app.chat.completions.list(metadata={"from": "live-batch"})
    assert [c.id for c in stored] == [out[2]["response"]["body"]["id"]]
    headers, body = hook.wait(1)[0]
    assert app.webhooks.unwrap(body, headers, secret=endpoint.signing_secret).data.id == b.id
    app.webhooks.delete(endpoint.id)
    hook.server.shutdown()


def test_ep2_group_gives_the_same_greedy_output(app):
    a, b = _chat(app, "tiny"), _chat(app, "tiny-ep2")
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens


def test_attention_data_parallel_group_serves_like_one_process(app):
    """A tp1 x ep2 group with attention data parallelism (two attention groups, each with its own
    sequences and KV on its Ray actor): concurrent chats, plain and streamed, give one process's text."""
    prompts = [f"Say something about {w}" for w in ("cats", "the sea", "Paris", "numbers", "rain", "tea")]

    def chat(model, p, stream=False):
        kw = dict(model=model, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=24,
                  extra_body={"max_reasoning_tokens": 6})
        if not stream:
            return app.chat.completions.create(**kw).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in app.chat.completions.create(stream=True, **kw)
                       if c.choices)
    with ThreadPoolExecutor(6) as pool:
        want = list(pool.map(lambda p: chat("tiny", p), prompts))
        got = list(pool.map(lambda ip: chat("tiny-dp2", ip[1], stream=ip[0] % 2 == 1), enumerate(prompts)))
    assert got == want and all(want)


def test_fp8_kv_cache_group_serves_through_its_rank_actors(app):
    """engine.kv_cache_dtype fp8 on a tp1 x ep2 group (the cache spec crosses to the rank actors, whose pools
    are e4m3): a chat completes, and its tokens' logprobs are not the model-dtype cache's (the same prompt on
    the tp1 x ep2 group beside it)."""
    def lps(model):
        r = _chat(app, model, logprobs=True)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
        return [t.logprob for t in r.choices[0].logprobs.content]
    assert lps("tiny-fp8") != lps("tiny-ep2")


def test_rank_actors_meet_at_rank_0s_node_address(app, tiny_ckpt):
    """A group may span nodes (helm's 120b EP8: two 4-GPU pods), so its ranks rendezvous at the address
    rank 0's actor reports for its node, not at 127.0.0.1; a tp1 x ep2 group started so computes
    one process's logits. Then rank 1 fails before a collective: the driver reports it within the
    grace, not the call's timeout, while rank 0 still waits in the collective, and the group is broken."""
    import time

    import torch

    from deployments.ray_workers import RayRankWorkers
    from models import load_model
    from parallel.replies import GroupBroken
    from parallel.worker import WorkerSpec
    w = RayRankWorkers(WorkerSpec(str(tiny_ckpt), 1, 2), use_gpu=False, cpus_per_rank=0.5, grace=3)
    try:
        assert w.init_method.startswith(f"tcp://{ray.util.get_node_ip_address()}:"), w.init_method
        seq = torch.randint(0, 199000, (11,), generator=torch.Generator().manual_seed(3))
        got = w.call("logits", [[seq]])[0]
        t0 = time.monotonic()
        with pytest.raises(GroupBroken, match=r"(?s)rank 1 failed on 'logits'.*TypeError.*ranks \[0\] were still busy"):
            w.collect(w.submit_each("logits", [[[seq]], None]))
        assert time.monotonic() - t0 < 30 and not w.alive()
        with pytest.raises(GroupBroken, match="broken and must be restarted"):
            w.call("memory")
    finally:
        w.shutdown()
    want = load_model(tiny_ckpt).logits(seq)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _running(deployment: str) -> int:
    st = serve.status().applications["gptoss"].deployments[deployment]
    return st.replica_states.get("RUNNING", 0)


def _burst_request(client, i):
    r = client.completions.create(model="tiny", prompt=f"burst {i}", max_tokens=120, temperature=0,
                                  extra_body={"ignore_eos": True})
    return r.usage.completion_tokens


def test_burst_scales_groups_up_then_back_down(app):
    """Queue depth drives the group count 1 -> 2 -> 1 and no request of the burst is lost."""
    assert _running("group-tiny") == 1
    seen, futures = 1, []
    with ThreadPoolExecutor(24) as pool:
        deadline = time.time() + 90
        while seen < 2 and time.time() < deadline:
            while sum(not f.done() for f in futures) < 16:  # keep the queue deep until a 2nd group runs
                futures.append(pool.submit(_burst_request, app, len(futures)))
            time.sleep(0.5)
            seen = max(seen, _running("group-tiny"))
        results = [f.result(timeout=180) for f in futures]
    assert seen == 2, "the group count never rose to 2 under the burst"
    assert results and all(n == 120 for n in results), results
    deadline = time.time() + 60
    while _running("group-tiny") > 1 and time.time() < deadline:
        time.sleep(1)
    assert _running("group-tiny") == 1, "the group count did not return to 1 after the load"


def _stream(client, model, progress, key):
    """Stream a long completion; returns (chunks, or the usage's completion tokens at the end; error or None)."""
    chunks = 0
    try:
        stream = client.completions.create(model=model, prompt=f"stream {key}", max_tokens=150, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        for chunk in stream:
            chunks += 1
            progress[key] = chunks
            if chunk.usage is not None:
                return chunk.usage.completion_tokens, None
    except openai.APIError as e:
        return chunks, e
    return chunks, None


def test_killing_a_rank_ends_its_streams_with_an_error_and_the_group_is_replaced(app):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("gptoss-rank-tiny-ep2-")]
    assert len(names) == 2, names  # the EP2 group's two ranks
    progress: dict = {}
    with ThreadPoolExecutor(2) as pool:
        victim = pool.submit(_stream, app, "tiny-ep2", progress, "victim")
        other = pool.submit(_stream, app, "tiny", progress, "other")
        deadline = time.time() + 60
        while progress.get("victim", 0) < 5 and time.time() < deadline:
            time.sleep(0.1)
        assert progress.get("victim", 0) >= 5, "the EP2 stream never started"
        ray.kill(ray.get_actor(sorted(names)[1], namespace="gptoss"), no_restart=True)
        v_chunks, v_err = victim.result(timeout=120)
        o_chunks, o_err = other.result(timeout=180)
    assert v_err is not None and v_chunks < 150, "the broken group's stream did not end with an error"
    assert o_err is None and o_chunks == 150, (o_chunks, o_err)  # the other group was not disturbed
    deadline, last = time.time() + 150, None
    while time.time() < deadline:
        try:
            r = _chat(app, "tiny-ep2")
            assert r.usage.completion_tokens > 0
            break
        except openai.APIError as e:  # 503 until Serve has replaced the unhealthy group
            last = e
            time.sleep(2)
    else:
        pytest.fail(f"the EP2 group was not replaced: {last}")
    fresh = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("gptoss-rank-tiny-ep2-")]
    assert len(fresh) == 2 and not set(fresh) & set(names)


def test_prometheus_scrapes_every_dashboard_query_under_load(app, prometheus):
    """A real Prometheus scrapes Ray's metrics endpoint; every panel's PromQL returns data."""
    if prometheus is None:
        pytest.skip("prometheus is not installed (.ci/run installs it: apt-get install prometheus)")
    import httpx

    from observability.dashboards import panel_queries
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    # A random model answers on the final channel; a bias towards "analysis" makes it reason
    # (within max_reasoning_tokens), so the reasoning-token series exist too.
    analysis = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS).encode("analysis")
    bias = {str(t): 100 for t in analysis}
    with ThreadPoolExecutor(16) as pool:  # fresh load on both models, so rates over the window are live
        futs = [pool.submit(_chat, app, m, logit_bias=bias) for m in ("tiny", "tiny-ep2") * 4]
        # more KV than the small pool holds, sent at once: preemptions
        futs += [pool.submit(_burst_request, app, i) for i in range(10)]
        results = [f.result(timeout=240) for f in futs]
    assert any(r.usage.completion_tokens_details.reasoning_tokens for r in results[:8])
    # a predicted output, over a replica group's two EP ranks: the same text, most of it drafted
    body = dict(model="tiny-ep2", prompt="Once upon a time", max_tokens=24, temperature=0)
    text = app.completions.create(**body, extra_body={"ignore_eos": True}).choices[0].text
    predicted = app.completions.create(**body, extra_body={"ignore_eos": True, "service_tier": "flex",
                                                           "prediction": {"type": "content", "content": text}})
    assert predicted.choices[0].text == text and predicted.model_extra["service_tier"] == "flex"
    assert predicted.usage.completion_tokens_details.accepted_prediction_tokens > 0
    stored = app.responses.create(model="tiny", input="Hi", max_output_tokens=2)  # the store's panels count it
    app.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, store=True)
    queries = panel_queries(__rate_interval="5m")
    assert len(queries) >= 20
    # Ray exports every few seconds and Prometheus scrapes every second: poll until every
    # query has returned data at least once.
    pending = {(uid, title, expr) for uid, title, expr in queries}
    deadline = time.time() + 90
    while pending and time.time() < deadline:
        for uid, title, expr in sorted(pending):
            r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
            assert r["status"] == "success", (uid, title, expr, r)
            if r["data"]["result"]:
                pending.discard((uid, title, expr))
        time.sleep(2)
    assert not pending, "panels without data:\n" + "\n".join(f"{u} / {t}: {e}" for u, t, e in sorted(pending))
    # the chart's alerting rules, loaded as a rules file: each evaluated against the live series without error
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 7 and all(r["health"] == "ok" and r["evaluationTime"] > 0 for r in rules), rules
    kinds = httpx.get(f"{prometheus}/api/v1/query", params={"query": "max by (kind) (ray_gptoss_stored_records)"},
                      timeout=10).json()["data"]["result"]
    by_kind = {k["metric"]["kind"]: float(k["value"][1]) for k in kinds}
    assert by_kind["response"] >= 1 and by_kind["chat_completion"] >= 1, (stored.id, kinds)
