"""The service's limits and security, from options, ``BUSDX_*`` variables and defaults."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from busdx.errors import ConfigError

__all__ = ["API_KEY_HEADER", "ServeSettings", "check_bind", "first_problem"]

API_KEY_HEADER = "X-API-Key"


class ServeSettings(BaseSettings):
    """Limits and security of the service; each also read from ``BUSDX_<NAME>`` (for example
    ``BUSDX_API_KEY``, ``BUSDX_MAX_UPLOAD_MB``), command-line options winning over both."""

    model_config = SettingsConfigDict(env_prefix="BUSDX_", frozen=True, extra="forbid")

    max_upload_mb: float = Field(20.0, gt=0, description="whole request body")
    max_pixels: int = Field(50_000_000, gt=0, description="per image: refuse decompression bombs")
    max_files: int = Field(32, ge=1, description="per /predict request")
    workers: int = Field(1, ge=1, description="model calls at a time")
    queue_size: int = Field(64, ge=0, description="requests waiting for a worker; more get 503")
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    backend: Literal["auto", "torch", "onnx"] = "auto"

    @classmethod
    def from_options(cls, **options: Any) -> ServeSettings:
        """Settings from the options given (``None`` = not given: environment, then default);
        a bad value is a :class:`ConfigError` naming it."""
        try:
            return cls(**{name: value for name, value in options.items() if value is not None})
        except ValidationError as exc:
            raise ConfigError(f"serve setting {first_problem(exc)}") from None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def check_bind(host: str, api_key: str | None, allow_no_key: bool) -> None:
    """Refuse to serve beyond the loopback interface without an API key, unless told to."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key and not allow_no_key:
        raise ConfigError(
            f"binding to {host} exposes the model to the network: set an API key "
            "(--api-key or $BUSDX_API_KEY), or pass --no-api-key to serve without one"
        )


def first_problem(exc: Any) -> str:
    """``where: what`` of a pydantic validation error's first problem."""
    problem = exc.errors()[0]
    where = ".".join(str(part) for part in problem.get("loc", ()))
    return f"{where}: {problem.get('msg', 'invalid')}"
