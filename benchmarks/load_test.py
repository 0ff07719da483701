"""Bounded load and soak tests of ``busdx serve`` on loopback: latency, errors, memory.

Starts ``busdx serve`` on a free 127.0.0.1 port, sends ``--requests`` POST /predict requests
(one image each) with ``--concurrency`` in flight, then stops the server with SIGINT and checks
that it shut down cleanly. With ``--bad-share F`` that share of the requests carries a bad
upload (zero bytes, text, a truncated PNG, a 30000 x 30000 decompression bomb, a body over the
size limit): each must get its 4xx ``{error, detail}`` answer, never a 5xx. The server's
resident memory is sampled every 100 requests; the soak passes when it grows by less than
``--max-rss-growth-mb`` from request 200 to the last. Only loopback traffic; the loop is
bounded in count and time.

    python benchmarks/load_test.py --run busdx-demo/<time>/run --requests 500 --concurrency 8 \
        --out docs/benchmarks/load_test.json
    python benchmarks/load_test.py --run RUN --backend onnx --requests 2000 --concurrency 16 \
        --bad-share 0.5 --out docs/benchmarks/soak_test.json
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

from busdx.data.synthetic import decompression_bomb_png, make_lesion_image

from _common import REPO, machine_info, write_json


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running ``busdx serve``: its URL, and its exit code once stopped."""

    url: str
    pid: int
    exit_code: int | None = None

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux), in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


@contextlib.contextmanager
def running_server(run: str | Path, *options: str, timeout: float = 120) -> Iterator[Server]:
    """``busdx serve`` in a subprocess on loopback; stopped with SIGINT on exit."""
    port = free_port()
    command = [sys.executable, "-m", "busdx", "serve", "--run", str(run),
               "--port", str(port), *options]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process.pid)
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


def _bad_uploads(good: bytes) -> dict[str, tuple[bytes, int]]:
    """Bad uploads and the status each must get (the server runs with a 20 MB body limit)."""
    return {"empty.png": (b"", 400), "notes.png": (b"not an image", 400),
            "truncated.png": (good[: len(good) // 2], 400),
            "bomb.png": (decompression_bomb_png(), 413),
            "huge.bin": (bytes(21 * 1024 * 1024), 413)}  # fmt: skip


async def hammer(
    url: str,
    requests: int,
    concurrency: int,
    time_limit: float,
    *,
    bad_share: float = 0.0,
    server: Server | None = None,
) -> dict:
    """Send the requests; return latency percentiles (ms), errors, throughput and the server's
    memory every 100 requests."""
    images = _images(16)
    bad = _bad_uploads(images[0])
    bad_names = list(bad)
    every = round(1 / bad_share) if bad_share else 0  # request i is bad when i % every == 0
    latencies: list[float] = []
    errors: list[str] = []
    rss: list[tuple[int, float]] = []
    answered = {"good": 0, "bad": 0}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    deadline = time.monotonic() + time_limit

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and time.monotonic() < deadline:
            index = queue.get_nowait()
            is_bad = bool(every) and index % every == 0
            if is_bad:
                name = bad_names[(index // every) % len(bad_names)]
                data, expected = bad[name]
            else:
                name, data, expected = f"scan-{index}.png", images[index % len(images)], 200
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/predict", files={"files": (name, data)})
                body = response.json()
                ok = response.status_code == expected and (
                    body["predictions"][0]["error"] is None
                    if expected == 200
                    else set(body) == {"error", "detail"}
                )
                if not ok:
                    errors.append(f"{name} {response.status_code}: {response.text[:200]}")
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                errors.append(f"{name} {type(exc).__name__}: {exc}")
            latencies.append((time.perf_counter() - started) * 1000)
            answered["bad" if is_bad else "good"] += 1
            if server is not None and len(latencies) % 100 == 0:
                rss.append((len(latencies), round(server.rss_mb(), 1)))

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    p50, p90, p99 = (float(v) for v in np.percentile(latencies, [50, 90, 99]))
    after_warmup = [mb for done, mb in rss if done >= 200]
    memory = {"rss_mb_every_100": rss,
              "rss_growth_mb_from_200": round(after_warmup[-1] - after_warmup[0], 1)
              if len(after_warmup) > 1 else None}  # fmt: skip
    return {"requests": len(latencies), "concurrency": concurrency, "errors": len(errors),
            "good_requests": answered["good"], "bad_requests": answered["bad"], **memory,
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
    parser.add_argument("--bad-share", type=float, default=0.0, help="share of bad uploads")
    parser.add_argument("--max-rss-growth-mb", type=float, default=100.0)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "load_test.json"))
    args = parser.parse_args()
    with running_server(args.run, "--backend", args.backend) as server:
        result = asyncio.run(hammer(server.url, args.requests, args.concurrency, args.time_limit,
                                    bad_share=args.bad_share, server=server))  # fmt: skip
    result["server_exit_code"] = server.exit_code
    result["backend"] = args.backend
    write_json(Path(args.out), {"machine": machine_info(), **result})
    print({k: v for k, v in result.items() if k not in {"error_examples", "rss_mb_every_100"}})
    growth = result["rss_growth_mb_from_200"]
    if result["errors"] or result["requests"] < args.requests or result["server_exit_code"] != 0:
        raise SystemExit(f"load test failed: {result['error_examples']}")
    if growth is not None and growth >= args.max_rss_growth_mb:
        raise SystemExit(f"soak failed: the server grew by {growth} MB from request 200")


if __name__ == "__main__":
    main()
