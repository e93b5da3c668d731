"""The Files API (for batch input) and the Batch API, as OpenAI's SDK calls them:

POST /v1/files (multipart: file, purpose="batch", optional expires_after), GET /v1/files,
GET /v1/files/{id}, GET /v1/files/{id}/content, DELETE /v1/files/{id};
POST /v1/batches, GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel.

A batch is validated when it is created: an input that does not hold one model's requests
for the batch's endpoint gives a batch that is `failed` at once, its `errors` naming each
bad line, as OpenAI's validation does. Otherwise it is `in_progress` and an ingress
replica's runner (deployments.batch_runner) takes it.

With API keys, each key sees only the files it uploaded and the batches it created (with their output
files): another key's ids are not found, and its lists hold only its own. Without keys, all are shared.
"""

from __future__ import annotations

from typing import Callable, Collection, Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .api_common import APIError, describe_errors, new_id, now, who
from .batch_runner import ENDPOINTS, BatchRunner, read_input
from .batch_store import BatchJob, BatchStoreClient, StoredFile, new_batch
from .protocol import ErrorResponse, Metadata
from .stored_responses import cursor_page

MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 2_592_000  # OpenAI's bounds on expires_after.seconds


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRY_S, le=MAX_EXPIRY_S)


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Optional[Metadata] = None
    output_expires_after: Optional[ExpiresAfter] = None


def _form_expiry(form) -> Optional[int]:
    """expires_after[anchor] / expires_after[seconds] of an upload's form (how the SDK sends the object),
    checked as the JSON object is."""
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    try:
        return ExpiresAfter(anchor=anchor, seconds=seconds).seconds
    except ValidationError as e:
        param, msg = describe_errors(e.errors())
        param = f"expires_after.{param}" if param else "expires_after"
        raise APIError(400, f"{param}: {msg}", param=param, code="invalid_value") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"file: larger than this server's limit of {limit} bytes", param="file",
                    code="file_too_large")


def router(store: BatchStoreClient, runner: BatchRunner, models: Callable[[], Collection[str]],
           max_file_bytes: int, max_requests: int, default_expiry_s: Optional[int] = None) -> APIRouter:
    """default_expiry_s: the lifetime of a file (uploaded, or a batch's output) made without `expires_after`
    (None: until deleted)."""
    r = APIRouter()
    errors = {status: {"model": ErrorResponse} for status in (400, 404, 409, 413)}

    def file_missing(fid: str, param: str = "file_id") -> APIError:
        return APIError(404, f"No such File object: {fid}", param=param, code="file_not_found")

    # ---------------------------------------------------------------- files
    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]},
                       "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                       "expires_after[seconds]": {"type": "integer", "minimum": MIN_EXPIRY_S,
                                                  "maximum": MAX_EXPIRY_S}}}}}}}

    @r.post("/v1/files", responses=errors, openapi_extra=upload_body)  # the form is parsed here, not by FastAPI
    async def upload_file(request: Request):
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > max_file_bytes + (1 << 16):  # refused before the upload is spooled
            raise _too_large(max_file_bytes)
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception:  # noqa: BLE001 - not multipart, or a malformed one
            form = None
        upload = None if form is None else form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file: a file is required, sent as multipart/form-data with `file` and `purpose`",
                           param="file", code="missing_required_parameter")
        purpose = form.get("purpose")
        if purpose != "batch":
            raise APIError(400, f"purpose: this server keeps files for the Batch API only ('batch'), not "
                                f"{purpose!r}", param="purpose", code="invalid_value")
        expires_s = _form_expiry(form) or default_expiry_s
        data = await upload.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            raise _too_large(max_file_bytes)
        t = now()
        f = StoredFile(new_id("file-"), upload.filename or "upload.jsonl", purpose, data, created_at=t,
                       expires_at=t + expires_s if expires_s else None, principal=who(request))
        if not await store.call("add_file", f):
            raise APIError(400, "the server's file storage is full: delete files you no longer need",
                           param="file", code="storage_limit_exceeded")
        return f.object()

    @r.get("/v1/files", responses=errors)
    async def list_files(request: Request, purpose: Optional[str] = None,
                         limit: int = Query(10_000, ge=1, le=10_000), order: Literal["asc", "desc"] = "desc",
                         after: Optional[str] = None):
        return cursor_page(await store.call("list_files", purpose, who(request)), limit, order, after, "the files")

    @r.get("/v1/files/{file_id}", responses=errors)
    async def get_file(file_id: str, request: Request):
        f = await store.call("file", file_id, who(request))
        if f is None:
            raise file_missing(file_id)
        return f

    @r.get("/v1/files/{file_id}/content", responses=errors)
    async def file_content(file_id: str, request: Request):
        data = await store.call("content", file_id, who(request))
        if data is None:
            raise file_missing(file_id)
        return Response(data, media_type="application/octet-stream")

    @r.delete("/v1/files/{file_id}", responses=errors)
    async def delete_file(file_id: str, request: Request):
        got = await store.call("delete_file", file_id, who(request))
        if got == "missing":
            raise file_missing(file_id)
        if got is not None:
            raise APIError(409, f"File {file_id} is the input of batch {got}, which is still running: cancel it "
                                "first", param="file_id", code="file_in_use")
        return {"id": file_id, "object": "file", "deleted": True}

    # -------------------------------------------------------------- batches
    @r.post("/v1/batches", responses=errors)
    async def create_batch(body: BatchCreateRequest, request: Request):
        if body.endpoint not in ENDPOINTS:
            raise APIError(400, f"endpoint: {body.endpoint!r} is not one this server runs batches for "
                                f"({', '.join(ENDPOINTS)})", param="endpoint", code="invalid_value")
        if body.completion_window != "24h":
            raise APIError(400, "completion_window: only '24h' is supported", param="completion_window",
                           code="invalid_value")
        f = await store.call("file", body.input_file_id, who(request))
        if f is None:
            raise file_missing(body.input_file_id, "input_file_id")
        if f["purpose"] != "batch":
            raise APIError(400, f"input_file_id: {body.input_file_id} was uploaded with purpose {f['purpose']!r}, "
                                "not 'batch'", param="input_file_id", code="invalid_value")
        data = await store.call("content", body.input_file_id, who(request))
        lines, problems, model = await run_in_threadpool(read_input, data, body.endpoint, max_requests,
                                                         list(models()))
        expiry = body.output_expires_after.seconds if body.output_expires_after else default_expiry_s
        job = BatchJob(new_batch(body.input_file_id, body.endpoint, model, len(lines), body.metadata, problems),
                       tier_cap=getattr(request.state, "tier_cap", None), output_expires_s=expiry,
                       principal=who(request))
        await store.call("add_batch", job)
        if job.batch["status"] == "failed":
            runner.ended(job.batch, who(request))
        runner.wake()
        return job.batch

    async def batch_or_404(batch_id: str, request: Request) -> dict:
        b = await store.call("batch", batch_id, who(request))
        if b is None:
            raise APIError(404, f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")
        return b

    @r.get("/v1/batches", responses=errors)
    async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100), after: Optional[str] = None):
        return cursor_page(await store.call("list_batches", who(request)), limit, "desc", after, "the batches")

    @r.get("/v1/batches/{batch_id}", responses=errors)
    async def get_batch(batch_id: str, request: Request):
        return await batch_or_404(batch_id, request)

    @r.post("/v1/batches/{batch_id}/cancel", responses=errors)
    async def cancel_batch(batch_id: str, request: Request):
        await batch_or_404(batch_id, request)
        b = await store.call("cancel", batch_id, who(request))
        if b["status"] in ("completed", "failed", "expired"):
            raise APIError(409, f"Cannot cancel a batch that is {b['status']}.", param="batch_id",
                           code="invalid_state")
        if b["status"] == "cancelled":  # nobody ran it: cancelled here, not by a runner
            runner.ended(b, who(request))
        return b

    return r
