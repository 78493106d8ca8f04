"""The background service: find it, start it, stop it.

``foundry-local service start`` (and ``model run`` / the SDK when nothing is running) launches
``foundry-local serve`` as a detached process and records it in ``<cache>/.service/service.json``
(pid, host, port). Everything else finds the service through that record, checking that the pid
is alive and ``/health`` answers, so a stale record from a crashed service is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from ..config import Settings
from ..errors import ServiceUnavailableError

STATE_DIR = ".service"


@dataclass(frozen=True)
class ServiceInfo:
    pid: int
    host: str
    port: int
    started_at: float
    log_path: str

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host  # noqa: S104
        return f"http://{host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return self.base_url + "/v1"


def state_path(settings: Settings) -> Path:
    return settings.cache_dir / STATE_DIR / "service.json"


def _headers(settings: Settings) -> dict[str, str]:
    key = settings.api_key_value()
    return {"Authorization": f"Bearer {key}"} if key else {}


def read_state(settings: Settings) -> ServiceInfo | None:
    try:
        data = json.loads(state_path(settings).read_text())
        return ServiceInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def health(base_url: str, settings: Settings, timeout: float = 2.0) -> int | None:
    """The /health status code, or None if nothing answers."""
    try:
        return httpx.get(base_url + "/health", timeout=timeout, headers=_headers(settings)).status_code
    except httpx.HTTPError:
        return None


def find_service(settings: Settings) -> ServiceInfo | None:
    """The running service: the one recorded for this cache if it is alive and answering, else one
    answering on the configured host and port (``foundry-local serve`` in a terminal; pid 0)."""
    info = read_state(settings)
    if info is not None and _alive(info.pid) and health(info.base_url, settings) is not None:
        return info
    probe = ServiceInfo(0, settings.host, settings.port, 0.0, "")
    try:
        r = httpx.get(probe.base_url + "/health", timeout=1.0, headers=_headers(settings))
        if r.status_code in (200, 503) and "loaded" in r.json():
            return probe
    except (httpx.HTTPError, ValueError):
        pass
    return None


def start_service(settings: Settings, *, wait_ready: bool = True, timeout: float = 120.0) -> ServiceInfo:
    """Start ``foundry-local serve`` detached, record it, and wait until it answers."""
    running = find_service(settings)
    if running is not None:
        return running
    state = state_path(settings)
    state.parent.mkdir(parents=True, exist_ok=True)
    log_path = state.parent / "service.log"
    args = [sys.executable, "-m", "foundry_local_py.cli.main", "serve"]
    # Every setting travels by environment: the caller's (a key or device given in code included);
    # argv would show the API key to anyone running `ps`.
    env = {**os.environ, **settings.to_env()}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    info = ServiceInfo(proc.pid, settings.host, settings.port, time.time(), str(log_path))
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info)))
    os.replace(tmp, state)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            state.unlink(missing_ok=True)
            raise ServiceUnavailableError(
                f"the service exited at start (code {proc.returncode}); see 'foundry-local service logs'"
            )
        code = health(info.base_url, settings, timeout=1.0)
        if code == 200 or (code == 503 and not wait_ready):
            return info
        time.sleep(0.2)
    raise ServiceUnavailableError(f"the service did not become ready within {timeout:.0f}s")


def stop_service(settings: Settings, *, timeout: float = 60.0) -> bool:
    """SIGTERM the recorded service and wait for it to drain and exit. False if none ran."""
    info = read_state(settings)
    state_path(settings).unlink(missing_ok=True)
    if info is None or info.pid <= 0 or not _alive(info.pid):
        return False
    proc = psutil.Process(info.pid)
    proc.send_signal(signal.SIGTERM)
    if not _wait_exit(info.pid, timeout):
        with contextlib.suppress(psutil.Error):
            proc.kill()
        _wait_exit(info.pid, 10)
    with contextlib.suppress(psutil.Error):  # reap it when it is our own child (no-op otherwise)
        proc.wait(timeout=0)
    return True


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited. A zombie counts as exited: the service started by another
    program (the SDK in a notebook) stays a zombie until that program reaps it, and
    ``psutil.Process.wait`` would wait for it to disappear until the timeout."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
