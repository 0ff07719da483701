"""A small DICOMweb client (standard library only): find instances (QIDO-RS), fetch one
(WADO-RS) and store objects (STOW-RS), with bounded retries on network errors.

Only what ``busdx pacs`` needs, written against the standard (PS3.18) and checked against
Orthanc's DICOMweb plugin in ``tests/test_pacs.py``. A part without the DICOM preamble (which
some servers return for objects stored without one) is read all the same.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pydicom

from busdx.errors import BusdxError

__all__ = ["DicomWeb", "InstanceRef", "NetworkError", "RefusedError"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
DICOM_JSON = "application/dicom+json"
_UIDS = {"study": "0020000D", "series": "0020000E", "instance": "00080018"}


class NetworkError(BusdxError, OSError):
    """The server could not be reached or answered 5xx, even after the retries."""


class RefusedError(BusdxError, OSError):
    """The server answered 4xx: a request it will not serve (not retried)."""


@dataclass(frozen=True)
class InstanceRef:
    """Where an instance is: its study, series and SOP instance UIDs."""

    study: str
    series: str
    instance: str


@dataclass
class DicomWeb:
    """A DICOMweb service at ``url`` (for Orthanc: ``http://host:8042/dicom-web``). Network
    errors and 5xx answers are retried ``retries`` times, waiting ``backoff`` seconds, doubled
    each time up to 30 s; a 4xx answer is not retried. ``auth``: user and password for HTTP
    basic authentication."""

    url: str
    auth: tuple[str, str] | None = None
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.5
    sleep: Callable[[float], None] = time.sleep

    def search_instances(
        self, filters: dict[str, str], *, page: int = 500
    ) -> Iterator[InstanceRef]:
        """Every instance matching ``filters`` (QIDO-RS), page by page."""
        offset = 0
        while True:
            query = urllib.parse.urlencode({**filters, "limit": page, "offset": offset})
            found = json.loads(self._call("GET", f"/instances?{query}", accept=DICOM_JSON) or b"[]")
            for item in found:
                yield InstanceRef(
                    *(item[_UIDS[k]]["Value"][0] for k in ("study", "series", "instance"))
                )
            if len(found) < page:
                return
            offset += len(found)

    def retrieve(self, ref: InstanceRef) -> pydicom.Dataset:
        """One instance (WADO-RS), as it is stored."""
        path = f"/studies/{ref.study}/series/{ref.series}/instances/{ref.instance}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        body, content_type = self._call("GET", path, accept=accept, with_type=True)
        (part,) = _parts(body, content_type)[:1]
        return pydicom.dcmread(io.BytesIO(part), force=True)

    def store(self, datasets: Sequence[pydicom.Dataset]) -> None:
        """Store objects (STOW-RS), in one request."""
        boundary = uuid.uuid4().hex
        chunks = []
        for dataset in datasets:
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                       buffer.getvalue(), b"\r\n"]  # fmt: skip
        chunks.append(f"--{boundary}--\r\n".encode())
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        self._call("POST", "/studies", accept=DICOM_JSON, data=b"".join(chunks),
                   content_type=content_type)  # fmt: skip

    def _call(self, method: str, path: str, *, accept: str, data: bytes | None = None,
              content_type: str | None = None, with_type: bool = False) -> Any:  # fmt: skip
        headers = {"Accept": accept, **({"Content-Type": content_type} if content_type else {})}
        if self.auth is not None:
            token = base64.b64encode(":".join(self.auth).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(self.url.rstrip("/") + path, data, headers, method=method)

        def attempt() -> Any:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                body = answer.read()
                return (body, answer.headers.get("Content-Type", "")) if with_type else body

        return self._retrying(attempt, f"{method} {path.split('?')[0]}")

    def _retrying(self, attempt: Callable[[], T], what: str) -> T:
        wait = self.backoff
        for tries in range(self.retries + 1):
            try:
                return attempt()
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    hint = " (give --user, and the password in the environment)" * (exc.code == 401)
                    raise RefusedError(
                        f"{self.url}: {what}: HTTP {exc.code} {exc.reason}{hint}"
                    ) from exc
                error: Exception = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                error = exc
            if tries == self.retries:
                raise NetworkError(
                    f"{self.url}: {what} failed {tries + 1} times: {error}"
                ) from error
            logger.warning("%s: %s (%s); retrying in %.1f s", self.url, what, error, wait)
            self.sleep(wait)
            wait = min(wait * 2, 30.0)
        raise AssertionError("unreachable")


def _parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart/related answer."""
    params = dict(
        p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p
    )  # fmt: skip
    boundary = params.get("boundary", "").strip('"').encode()
    if not boundary:
        raise ValueError(f"not a multipart answer ({content_type or 'no content type'})")
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, payload = chunk.partition(b"\r\n\r\n")
        parts.append(payload.removesuffix(b"\r\n"))
    return parts
