"""Bounded load test of ``busdx serve`` on loopback: latency percentiles and errors.

Starts ``busdx serve`` on a free 127.0.0.1 port, sends ``--requests`` POST /predict requests
(one synthetic image each) with ``--concurrency`` in flight, then stops the server with SIGINT
and checks that it shut down cleanly. Only loopback traffic; the loop is bounded in count and
time.

    python benchmarks/load_test.py --run busdx-demo/<time>/run --requests 500 --concurrency 8 \
        --out docs/benchmarks/load_test.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from busdx.synthetic import make_lesion_image

from _common import REPO, machine_info, write_json


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running ``busdx serve``: its URL, and its exit code once stopped."""

    url: str
    exit_code: int | None = None


@contextlib.contextmanager
def running_server(run: str | Path, *options: str, timeout: float = 120) -> Iterator[Server]:
    """``busdx serve`` in a subprocess on loopback; stopped with SIGINT on exit."""
    port = free_port()
    command = [sys.executable, "-m", "busdx", "serve", "--run", str(run),
               "--port", str(port), *options]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                raise RuntimeError(f"busdx serve did not start: {output[-2000:]}")
            time.sleep(0.3)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            server.exit_code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _images(count: int) -> list[bytes]:
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        make_lesion_image(index % 2 == 1, seed=index)[0].save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


async def hammer(url: str, requests: int, concurrency: int, time_limit: float) -> dict:
    """Send the requests; return latency percentiles (ms), error count and throughput."""
    images = _images(16)
    latencies: list[float] = []
    errors: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    deadline = time.monotonic() + time_limit

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and time.monotonic() < deadline:
            index = queue.get_nowait()
            files = {"files": (f"scan-{index}.png", images[index % len(images)], "image/png")}
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/predict", files=files)
                ok = (
                    response.status_code == 200
                    and response.json()["predictions"][0]["error"] is None
                )
                if not ok:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return {"requests": len(latencies), "concurrency": concurrency, "errors": len(errors),
            "error_examples": errors[:5], "p50_ms": round(p50, 1), "p90_ms": round(p90, 1),
            "p99_ms": round(p99, 1), "max_ms": round(max(latencies), 1),
            "seconds": round(seconds, 1),
            "requests_per_s": round(len(latencies) / seconds, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds, at most")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "load_test.json"))
    args = parser.parse_args()
    with running_server(args.run, "--backend", args.backend) as server:
        result = asyncio.run(hammer(server.url, args.requests, args.concurrency, args.time_limit))
    result["server_exit_code"] = server.exit_code
    result["backend"] = args.backend
    write_json(Path(args.out), {"machine": machine_info(), **result})
    print({k: v for k, v in result.items() if k != "error_examples"})
    if result["errors"] or result["requests"] < args.requests or result["server_exit_code"] != 0:
        raise SystemExit(f"load test failed: {result['error_examples']}")


if __name__ == "__main__":
    main()
