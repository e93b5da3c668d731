"""The API's server-sent event responses: they watch for the client going away, and always clean up."""

from __future__ import annotations

from typing import Awaitable, Callable

import anyio
from fastapi.responses import StreamingResponse


class SSEResponse(StreamingResponse):
    """SSE that always watches for the client going away (whatever the ASGI
    version) and always runs `on_close`, so the engine request is aborted."""
    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-send
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                try:
                    await self.listen_for_disconnect(receive)
                except Exception:  # noqa: BLE001 - Ray Serve's receive raises once it cancels the request
                    pass  # (its client went away): a disconnect, not an error
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.body_iterator.aclose()
                except BaseException:  # noqa: BLE001
                    pass
                await self._on_close()


async def nothing() -> None:
    pass
