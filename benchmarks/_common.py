"""Shared helpers of the benchmarks: machine facts, a throughput timer, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from busdx.hardware import cpu_flags

REPO = Path(__file__).resolve().parents[1]


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import onnxruntime
    import torch

    model = next(
        (row.split(":", 1)[1].strip() for row in Path("/proc/cpuinfo").read_text().splitlines()
         if row.startswith("model name")), platform.processor())  # fmt: skip
    flags = cpu_flags()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "simd": sorted(f for f in flags if f.startswith(("avx", "amx"))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def throughput(
    run_batch: Callable[[], object], batch: int, *, min_seconds: float, min_batches: int = 2
) -> float:
    """Images per second of ``run_batch`` after one warm-up call."""
    run_batch()
    done, started = 0, time.perf_counter()
    while done < min_batches or time.perf_counter() - started < min_seconds:
        run_batch()
        done += 1
    return done * batch / (time.perf_counter() - started)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def peak_rss_mb(command: list[str], **kwargs: Any) -> tuple[float, float]:
    """Peak resident memory (MB) and wall time (s) of one process (``wait4`` rusage)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds


def lean_install(root: Path) -> Path:
    """``pip install .`` (no extras: inference only) of this checkout's files (tracked, or
    untracked and not ignored: no stale build/ folder rides along) into a fresh virtual
    environment under ``root``; its ``bin`` folder."""
    import shutil

    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / "src" / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(root / "src")],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the lean install failed: {done.stderr[-2000:]}")
    return venv / "bin"


ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_installed() -> bool:
    """Debian's orthanc and orthanc-dicomweb packages are there."""
    return Path(ORTHANC).is_file() and DICOMWEB_PLUGIN.is_file()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_orthanc(folder: Path, users: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh Orthanc with its DICOMweb plugin on loopback, storing into ``folder`` (with
    ``users``: HTTP basic authentication); yields its DICOMweb root and stops it afterwards."""
    config = {
        "Name": "busdx-test", "HttpPort": free_port(), "DicomPort": free_port(),
        "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    (folder / "orthanc.json").write_text(json.dumps(config))
    with (folder / "orthanc.log").open("w") as log:
        process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{config['HttpPort']}"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"{url}/system", timeout=1).close()
                break
            except urllib.error.HTTPError:  # up, and asking for credentials
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()}")
        yield f"{url}/dicom-web"
    finally:
        process.terminate()
        process.wait(timeout=30)
