"""One uvicorn server for the whole API suite: the app from deployments.openai_api over
in-process engines on the tiny random checkpoint.

Models served:
  demo, demo-b  two independent engines (routing by `model`)
  limited       demo-b's engine behind max_pending=2 (admission / 429)
  flaky         an engine whose steps start failing when armed (engine error mid-stream)
  dropping      a client whose stream raises after a few outputs (transport failure)
  overloaded    refuses with EngineOverloadedError (503 engine_overloaded)
  down          fails with a ConnectionError before any output (503 engine_unavailable)
"""

import contextlib
import socket
import threading
import time

import pytest
import torch



def _failing_engine_cls():
    from engine.core import LLMEngine

    class Failing(LLMEngine):
        fail_after = None

        def step(self):
            if self.fail_after is not None:
                if self.fail_after <= 0:
                    raise RuntimeError("simulated device failure")
                self.fail_after -= 1
            return super().step()

    return Failing


class DroppingClient:
    """An EngineClient whose stream breaks (as a lost connection to a remote engine would)."""

    def __init__(self, inner, after: int = 3):
        self.inner, self.after = inner, after
        self.aborted = []

    async def generate(self, request):
        n = 0
        async for out in self.inner.generate(request):
            yield out
            n += 1
            if n >= self.after:
                raise ConnectionError("lost the engine")

    def abort(self, request_id):
        self.aborted.append(request_id)
        return self.inner.abort(request_id)

    def stats(self):
        return self.inner.stats()


class DownClient:
    """An EngineClient that refuses every request before producing anything."""

    def __init__(self, exc: Exception):
        self.exc = exc

    async def generate(self, request):
        raise self.exc
        yield  # an async generator, like the real ones

    def abort(self, request_id):
        pass

    def stats(self):
        return {"running": 0, "waiting": 0}


class Server:
    def __init__(self, app, engines):
        import uvicorn
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.engines = engines
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def client(self, **kw):
        from openai import OpenAI
        return OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60, **kw)

    def wait_idle(self, name: str, timeout: float = 10.0) -> dict:
        """Engine stats once nothing is running or waiting (aborts land asynchronously)."""
        t0 = time.time()
        while True:
            s = self.engines[name].stats()
            if (s["running"] == 0 and s["waiting"] == 0) or time.time() - t0 > timeout:
                return s
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def own_server(ckpt, name: str, engine_config, **app_kw):
    """A server of its own for one model `name`: an in-process engine with `engine_config` on `ckpt`, the app
    built with `app_kw` (build_app's), torch on one thread while it runs."""
    from deployments.openai_api import build_app
    from engine.async_engine import AsyncEngine
    from engine.core import LLMEngine
    from models import load_model
    eng = AsyncEngine(LLMEngine(load_model(ckpt), engine_config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    srv = Server(build_app({name: eng}, **app_kw), {name: eng})
    try:
        yield srv
    finally:
        srv.stop()
        eng.shutdown()
        torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def api(tiny_ckpt):
    from deployments.openai_api import build_app
    from deployments.response_store import MemoryResponseStore
    from engine.async_engine import AsyncEngine
    from engine.core import EngineConfig, LLMEngine
    from engine.grammar import get_lltokenizer
    from engine.request import EngineOverloadedError
    from models import load_model

    # Torch's spinning OpenMP workers starve llguidance's mask threads (and the
    # event loop) on small hosts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    get_lltokenizer()  # ~2 s once; otherwise the first grammar request pays it
    model = load_model(tiny_ckpt)
    cfg = EngineConfig(max_model_len=1024, num_blocks=256)
    demo, demo_b = AsyncEngine(LLMEngine(model, cfg)), AsyncEngine(LLMEngine(model, cfg))
    flaky = AsyncEngine(_failing_engine_cls()(model, cfg))
    engines = {"demo": demo, "demo-b": demo_b, "limited": demo_b, "flaky": flaky,
               "dropping": DroppingClient(demo_b), "overloaded": DownClient(EngineOverloadedError("queue full")),
               "down": DownClient(ConnectionError("no route to the replica"))}
    state = {"ready": True}
    store = MemoryResponseStore(max_entries=64)
    app = build_app(engines, max_pending={"limited": 2}, ready=lambda: state["ready"], response_store=store)
    srv = Server(app, engines)
    srv.app = app
    srv.ready_state = state
    srv.response_store = store
    yield srv
    srv.stop()
    for e in (demo, demo_b, flaky):
        e.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def client(api):
    return api.client()
