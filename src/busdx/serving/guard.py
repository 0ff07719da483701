"""What every POST passes before the application parses it, and the model-call gate."""

from __future__ import annotations

import functools
import hmac
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from busdx.serving.errors import ApiError, json_error
from busdx.serving.settings import API_KEY_HEADER, ServeSettings

__all__ = ["Gate", "RequestGuard"]


class RequestGuard:
    """ASGI middleware for every POST to an upload route (``paths``), before the application
    parses it: the API key, then ``multipart/form-data``, then the body size (declared or, for
    chunked uploads, counted while reading), answering 401 / 415 / 413 without reading more than
    ``settings.max_upload_bytes``. A POST elsewhere goes on to the router and its 405."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, paths: frozenset[str]) -> None:
        self.app, self.settings, self.paths = app, settings, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["method"] == "POST"
        if not guarded or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        refusal = self._refusal({k.decode("latin-1"): v.decode("latin-1")
                                 for k, v in scope["headers"]})  # fmt: skip
        if refusal is not None:
            return await refusal(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.settings.max_upload_bytes:
                return await self._too_large()(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> JSONResponse:
        return json_error(413, "too_large", f"upload exceeds {self.settings.max_upload_mb:g} MB")

    def _refusal(self, headers: dict[str, str]) -> JSONResponse | None:
        key = self.settings.api_key
        if key and not hmac.compare_digest(headers.get(API_KEY_HEADER.lower(), ""), key):
            return json_error(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header")
        if not headers.get("content-type", "").startswith("multipart/form-data"):
            return json_error(
                415, "unsupported_media_type", "send multipart/form-data with the image file(s)"
            )
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.settings.max_upload_bytes:
            return self._too_large()
        return None


class Gate:
    """At most ``workers`` model calls at once and ``queue_size`` waiting; else 503."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self.limiter = anyio.CapacityLimiter(workers)
        self.queue_size, self.waiting = queue_size, 0

    async def run(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        if self.waiting >= self.queue_size:
            raise ApiError(503, "busy", "too many requests are waiting; retry shortly")
        self.waiting += 1
        call = functools.partial(function, *args, **kwargs)
        try:
            return await anyio.to_thread.run_sync(call, limiter=self.limiter)
        finally:
            self.waiting -= 1
