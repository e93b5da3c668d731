"""The typed configuration of a deployment: one source for `gptoss serve`,
`gptoss serve-config` (Serve YAML for `serve deploy`) and the helm values."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.core import EngineConfig


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_queue_depth: float = Field(4.0, gt=0, description="waiting + running requests per replica group")
    max_kv_usage: float = Field(0.9, gt=0, le=1, description="KV pressure that also triggers a scale-up")
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(10.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ModelGroupConfig(BaseModel):
    """One model served by a set of replica groups of tp x ep ranks each."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field("gpt-oss", description="the `model` clients ask for")
    path: str = Field("demo", description="checkpoint directory, or 'demo'")
    tp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    attn_dp: bool = Field(False, description="attention data parallelism: the group's ep/tp attention groups "
                                             "each serve their own sequences and hold only their KV (needs "
                                             "ep > tp); off, every attention group runs the whole batch")
    use_gpu: bool = False
    cpus_per_rank: float = Field(1.0, gt=0)
    max_pending: int = Field(256, ge=1, description="requests per group beyond which clients get 429")
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    engine: EngineConfig = EngineConfig()

    @model_validator(mode="after")
    def _name(self):
        if not re.fullmatch(r"[A-Za-z0-9._:/-]{1,128}", self.name):
            raise ValueError(f"invalid model name {self.name!r}")
        if self.attn_dp and self.ep <= self.tp:
            raise ValueError(f"attn_dp needs ep > tp (attention groups = ep / tp): tp={self.tp}, ep={self.ep} "
                             "has one attention group")
        if self.engine.kv_cache_fraction is not None and not self.use_gpu:
            raise ValueError("engine.kv_cache_fraction sizes the KV cache from GPU memory: it needs use_gpu "
                             "(on CPUs set engine.num_blocks)")
        return self

    @property
    def world(self) -> int:
        return max(self.tp, self.ep)

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    @property
    def dtype(self) -> str:
        """bf16 with MXFP4 experts on GPUs (the Triton kernels' path), fp32 on CPUs."""
        return "bfloat16" if self.use_gpu else "float32"


class ResponseStoreConfig(BaseModel):
    """Stored Responses (`store`, `previous_response_id`, GET /v1/responses/{id}) and conversations
    (/v1/conversations): one LRU store shared by the ingress replicas."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    max_entries: int = Field(10_000, ge=0, description="responses and conversations kept (least recently used "
                                                       "go first); 0: store nothing")
    max_mb: float = Field(256.0, gt=0, description="memory the stored responses and conversations may take, "
                                                   "in MiB")
    path: str | None = Field(None, description="a file (on a persistent volume) the store also writes its "
                                               "records to and reads back when it starts, so they outlive a "
                                               "restart; its replica then runs on the Ray head node. Unset: "
                                               "memory only")


class WebSocketConfig(BaseModel):
    """Responses over a WebSocket (ws(s)://.../v1/responses, the SDK's `client.responses.connect()`):
    deployments/responses_ws.py."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    max_minutes: float = Field(60.0, ge=0, description="how long a connection lasts: then, its queued work "
                                                       "done, it gets `websocket_connection_limit_reached` and "
                                                       "closes (OpenAI's limit); 0: no WebSocket mode")
    max_streams: int = Field(16, ge=1, description="lanes (`stream_id`s) one connection runs at once")
    cached_responses: int = Field(16, ge=1, description="responses a connection remembers to continue with "
                                                        "`previous_response_id`, store=false ones too")


class WebhookConfig(BaseModel):
    """Webhook deliveries (/v1/webhook_endpoints, `client.webhooks`): batch and background-response events,
    signed, POSTed to each endpoint of the key that made the batch or response (deployments/webhooks.py). The
    endpoints live in the batch store, so they need `batches.max_mb` > 0."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    max_attempts: int = Field(6, ge=1, description="tries per delivery: until the endpoint answers 2xx")
    first_retry_s: float = Field(5.0, gt=0, description="the wait before the second try; it doubles each try "
                                                        "after")
    timeout_s: float = Field(10.0, gt=0, description="how long one try waits for the endpoint's answer")


class BatchConfig(BaseModel):
    """The Files and Batch APIs (/v1/files, /v1/batches): one store shared by the ingress replicas, and a
    runner in each that runs batches on the flex tier."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    max_mb: float = Field(1024.0, ge=0, description="memory for uploaded files and batch results, in MiB; "
                                                    "0: no Files or Batch API")
    max_file_mb: float = Field(200.0, gt=0, description="the largest file an upload may be, in MiB")
    max_requests: int = Field(50_000, ge=1, description="requests one batch may hold")
    concurrency: int = Field(64, ge=1, description="batch requests in flight at once, per ingress replica")
    max_batches: int = Field(4, ge=1, description="batches an ingress replica runs at once, taking turns line "
                                                  "by line (so a small batch is not held behind a large one)")
    file_expiry_days: float = Field(30.0, ge=0, description="an uploaded batch file, and a batch's output and "
                                                            "error files, without `expires_after` are deleted "
                                                            "this long after they are made (OpenAI's default); "
                                                            "0: kept until deleted")
    path: str | None = Field(None, description="a SQLite file (on a persistent volume) the store also writes "
                                               "its files and batches to and reads back when it starts, so "
                                               "running batches go on after a restart; its replica then runs "
                                               "on the Ray head node. Unset: memory only")


class PromptMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class PromptTemplate(BaseModel):
    """A stored prompt (Responses' `prompt: {"id", "version", "variables"}`): instructions and messages that
    come before a request's own, with `{{name}}` filled from its variables (deployments/prompts.py)."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    version: str = Field("1", min_length=1, max_length=64, description="a request without one gets the version "
                                                                       "listed last")
    instructions: str | None = None
    input: list[PromptMessage] = Field(default_factory=list)


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "gptoss"
    models: list[ModelGroupConfig] = Field(default_factory=lambda: [ModelGroupConfig()])
    responses: ResponseStoreConfig = ResponseStoreConfig()
    batches: BatchConfig = BatchConfig()
    websockets: WebSocketConfig = WebSocketConfig()
    webhooks: WebhookConfig = WebhookConfig()
    prompts: list[PromptTemplate] = Field(default_factory=list, description="stored prompts Responses may "
                                                                          "name in `prompt`")

    @model_validator(mode="after")
    def _unique(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"model names must be unique and non-empty: {names}")
        versions = [(p.id, p.version) for p in self.prompts]
        if len(set(versions)) != len(versions):
            raise ValueError(f"prompts: each id and version at most once: {versions}")
        return self

    def serve_yaml(self) -> dict:
        """The Serve config file (`serve deploy FILE`) equivalent to `gptoss serve` with this config."""
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": self.host, "port": self.port},
            "applications": [{
                "name": self.app_name,
                "route_prefix": "/",
                "import_path": "deployments.serve_app:app_builder",
                "args": {"config": self.model_dump(mode="json")},
            }],
        }
