"""Webhook endpoints through the openai SDK (`client.webhooks`): each API key registers its own; batch and
background-response events reach them signed, so `client.webhooks.unwrap` verifies them with the endpoint's
secret; a delivery is retried until a 2xx; a rotation that keeps the old secret signs with both."""

import http.server
import io
import json
import threading
import time

import openai
import pytest

from cluster.config import WebhookConfig
from engine.core import EngineConfig
from observability.metrics import BY_NAME, MetricsRecorder

from .conftest import own_server

pytestmark = pytest.mark.timeout(180)


class Receiver:
    """An HTTP endpoint that records each POST (headers, body) and answers the statuses queued, then 200."""

    def __init__(self):
        self.got: list[tuple[dict, str]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 30.0) -> list[tuple[dict, str]]:
        t0 = time.time()
        while len(self.got) < n and time.time() - t0 < timeout:
            time.sleep(0.05)
        assert len(self.got) >= n, self.got
        return self.got


METRICS = MetricsRecorder("prometheus")


def deliveries(outcome: str) -> float:
    name = BY_NAME["gptoss_webhook_deliveries"].exported_name()
    return METRICS.registry.get_sample_value(name, {"outcome": outcome}) or 0.0


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    from deployments.response_store import MemoryResponseStore
    with own_server(tiny_ckpt, "demo", EngineConfig(max_model_len=512, num_blocks=64), metrics=METRICS,
                    response_store=MemoryResponseStore(), api_keys={"a": "priority", "b": "priority"},
                    webhooks=WebhookConfig(first_retry_s=0.2, max_attempts=3, timeout_s=5)) as s:
        yield s


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def client(srv, key="a"):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_endpoints_are_managed_per_key_and_bad_ones_are_400s(srv, receiver):
    c = client(srv)
    made = c.webhooks.create(name="ops", url=receiver.url, event_types=["batch.completed", "response.completed"])
    assert made.id.startswith("whep_") and made.signing_secret.startswith("whsec_")
    assert made.signing_secret_hint.endswith(made.signing_secret[-4:]) and made.object == "webhook_endpoint"
    assert c.webhooks.retrieve(made.id).url == receiver.url
    assert made.id in [e.id for e in c.webhooks.list()]
    other = client(srv, "b")
    assert made.id not in [e.id for e in other.webhooks.list()]
    with pytest.raises(openai.NotFoundError):
        other.webhooks.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        other.webhooks.delete(made.id)
    upd = c.webhooks.update(made.id, name="ops-2", event_types=["batch.failed"])
    assert (upd.name, upd.event_types, upd.url) == ("ops-2", ["batch.failed"], receiver.url)
    assert sorted(c.webhooks.event_types.list().data) == sorted([
        "batch.completed", "batch.failed", "batch.expired", "batch.cancelled", "response.completed",
        "response.failed", "response.cancelled", "response.incomplete"])
    with pytest.raises(openai.BadRequestError) as e:
        c.webhooks.create(name="x", url=receiver.url, event_types=["eval.run.failed"])
    assert e.value.body["param"].startswith("event_types")
    with pytest.raises(openai.BadRequestError) as e:
        c.webhooks.create(name="x", url="ftp://nowhere", event_types=["batch.failed"])
    assert e.value.body["param"] == "url"
    gone = c.webhooks.delete(made.id)
    assert gone.deleted and gone.id == made.id
    with pytest.raises(openai.NotFoundError):
        c.webhooks.retrieve(made.id)


def test_a_test_delivery_verifies_with_the_secret_and_a_rotation_signs_with_both(srv, receiver):
    c = client(srv)
    made = c.webhooks.create(name="t", url=receiver.url, event_types=["batch.completed"])
    receiver.statuses = [418]
    res = c.webhooks.test(made.id, event_type="response.failed")
    assert (res.status_code, res.success, res.webhook_endpoint_id) == (418, True, made.id)
    headers, body = receiver.wait(1)[0]
    ev = c.webhooks.unwrap(body, headers, secret=made.signing_secret)
    assert ev.type == "response.failed" and ev.id == headers["webhook-id"] and ev.id.startswith("evt_")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        c.webhooks.unwrap(body.replace("resp_test", "resp_evil"), headers, secret=made.signing_secret)
    rotated = c.webhooks.rotate_secret(made.id, keep_old_secret_active_for_24_hours=True)
    assert rotated.signing_secret != made.signing_secret
    c.webhooks.test(made.id, event_type="batch.completed")
    headers, body = receiver.wait(2)[1]
    for secret in (made.signing_secret, rotated.signing_secret):  # both verify while the old one is kept
        assert c.webhooks.unwrap(body, headers, secret=secret).type == "batch.completed"
    again = c.webhooks.rotate_secret(made.id)  # not kept: only the newest signs
    c.webhooks.test(made.id, event_type="batch.completed")
    headers, body = receiver.wait(3)[2]
    assert c.webhooks.unwrap(body, headers, secret=again.signing_secret).type == "batch.completed"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        c.webhooks.unwrap(body, headers, secret=rotated.signing_secret)
    c.webhooks.update(made.id, url="http://127.0.0.1:9/none")
    with pytest.raises(openai.BadRequestError) as e:
        c.webhooks.test(made.id, event_type="batch.completed")
    assert e.value.body["code"] == "webhook_endpoint_unreachable"
    c.webhooks.delete(made.id)


def test_a_background_response_and_a_batch_send_their_events_retried_until_a_2xx(srv, receiver):
    c = client(srv)
    made = c.webhooks.create(name="events", url=receiver.url,
                             event_types=["response.incomplete", "response.completed", "batch.completed"])
    client(srv, "b").webhooks.create(name="theirs", url=receiver.url + "/b", event_types=["response.completed",
                                                                                         "response.incomplete"])
    down = c.webhooks.create(name="down", url="http://127.0.0.1:9/none", event_types=["batch.completed"])
    delivered, gave_up = deliveries("delivered"), deliveries("gave_up")
    receiver.statuses = [503]  # the first try fails: it is sent again
    r = c.responses.create(model="demo", input="Hi", background=True, max_output_tokens=4,
                           extra_body={"max_reasoning_tokens": 0})
    got = receiver.wait(2)
    assert all(h["webhook-id"] == got[0][0]["webhook-id"] for h, _ in got[:2])  # the same event, twice
    ev = c.webhooks.unwrap(got[1][1], got[1][0], secret=made.signing_secret)
    assert ev.data.id == r.id and ev.type == f"response.{c.responses.retrieve(r.id).status}"
    lines = [{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}]
    f = c.files.create(file=("in.jsonl", io.BytesIO("\n".join(json.dumps(x) for x in lines).encode())),
                       purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    headers, body = receiver.wait(3)[2]
    ev = c.webhooks.unwrap(body, headers, secret=made.signing_secret)
    assert (ev.type, ev.data.id) == ("batch.completed", b.id) and c.batches.retrieve(b.id).status == "completed"
    t0 = time.time()
    while deliveries("gave_up") == gave_up and time.time() - t0 < 10:  # 3 tries to a closed port: 0.6 s
        time.sleep(0.05)
    assert (deliveries("delivered") - delivered, deliveries("gave_up") - gave_up) == (2, 1)
    assert len(receiver.got) == 3  # key b's endpoint heard nothing of key a's work
    c.webhooks.delete(down.id)
