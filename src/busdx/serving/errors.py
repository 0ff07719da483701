"""Exceptions to ``{"error", "detail"}`` answers, by class: the one place of that mapping."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from busdx.errors import BoxError, ImageDecodeError, ImageTooLargeError
from busdx.serving.settings import first_problem

__all__ = ["ApiError", "add_error_handlers", "json_error"]

logger = logging.getLogger("busdx.serving")


class ApiError(Exception):
    """An answer other than 200, with its status and error code."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def json_error(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The body of every error answer."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


# exception class -> (status, error code, detail, headers) of its answer
ANSWERS: dict[type[Exception], Any] = {
    ApiError: lambda exc: (exc.status, exc.error, exc.detail, None),
    ImageTooLargeError: lambda exc: (413, "image_too_large", str(exc), None),
    ImageDecodeError: lambda exc: (400, "bad_image", str(exc), None),
    BoxError: lambda exc: (422, "bad_box", str(exc), None),
    # a 405 keeps its Allow header (RFC 9110); other HTTP errors keep theirs too
    HTTPException: lambda exc: (exc.status_code, "http_error", str(exc.detail), exc.headers),
    RequestValidationError: lambda exc: (422, "invalid_request", first_problem(exc), None),
}


def add_error_handlers(app: FastAPI) -> None:
    """Answer each exception class of :data:`ANSWERS` as it says, anything else as a 500
    whose traceback stays in the server log."""
    for kind, answer in ANSWERS.items():

        async def handler(_: Request, exc: Exception, answer: Any = answer) -> JSONResponse:
            return json_error(*answer(exc))

        app.add_exception_handler(kind, handler)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return json_error(500, "internal_error", "the server could not process this request")
