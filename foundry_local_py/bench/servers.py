"""Start and stop the servers a benchmark compares: ours and llama-cpp-python's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def rss_bytes(self) -> int:
        """Resident memory of the server process and its children."""
        try:
            p = psutil.Process(self.proc.pid)
            return int(p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True)))
        except psutil.Error:
            return 0

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _wait_ready(server: ServerProcess, probe: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited early; see {server.log_path}")
        try:
            r = httpx.get(probe, timeout=2)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.name} did not become ready in {timeout_s:.0f}s")


def _spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir.resolve() / f"{name}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return proc, log_path


def start_ours(model: str, *, n_threads: int, log_dir: Path, cache_dir: Path | None = None,
               extra: list[str] | None = None, name: str = "foundry-local-py",
               source: Path | None = None) -> ServerProcess:
    """Our server; ``source``: run the code of another checkout (e.g. a baseline commit)."""
    port = free_port()
    args = [sys.executable, "-m", "foundry_local_py.cli.main", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--model", model, "--n-threads", str(n_threads), *(extra or [])]
    if cache_dir is not None:
        args += ["--cache-dir", str(cache_dir)]
    env = dict(os.environ)
    if source is not None:  # its folder first on sys.path: run from it (``-m`` puts the cwd first)
        env["PYTHONPATH"] = str(source.resolve())
    proc, log_path = _spawn(name, args, log_dir, env=env, cwd=source.resolve() if source else None)
    server = ServerProcess(name, proc, f"http://127.0.0.1:{port}/v1", log_path)
    _wait_ready(server, f"http://127.0.0.1:{port}/health", 300)
    return server


def start_llama_cpp_server(gguf: Path, *, n_threads: int, n_ctx: int, log_dir: Path) -> ServerProcess:
    """llama-cpp-python's server, as its users run it but with all cores and no interruption."""
    port = free_port()
    args = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads),
            "--n_ctx", str(n_ctx), "--interrupt_requests", "False", "--model_alias", "peer"]
    proc, log_path = _spawn("llama_cpp.server", args, log_dir)
    server = ServerProcess("llama_cpp.server", proc, f"http://127.0.0.1:{port}/v1", log_path)
    _wait_ready(server, f"http://127.0.0.1:{port}/v1/models", 300)
    return server


def llama_server_binary(explicit: Path | None = None) -> Path:
    """llama.cpp's ``llama-server``, as ``scripts/build_llama_server.sh`` builds it (benchmark
    only) from the sources vendored in the pinned llama-cpp-python sdist: ``explicit`` if given,
    else the script's cache folder (``FOUNDRY_PEER_CACHE``, default ~/.cache/foundry-local-py/peers)."""
    if explicit is not None:
        return explicit
    import re
    from importlib.metadata import version

    root = Path(os.environ.get("FOUNDRY_PEER_CACHE") or Path.home() / ".cache" / "foundry-local-py" / "peers")
    pinned = None
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        m = re.search(r"llama-cpp-python==([0-9.]+)", pyproject.read_text())
        pinned = m.group(1) if m else None
    binary = root / f"llama-server-{pinned or version('llama-cpp-python')}" / "build" / "bin" / "llama-server"
    if not binary.is_file():
        raise SystemExit(f"no llama-server at {binary}; build it once with scripts/build_llama_server.sh "
                         "(about 20 minutes on 2 cores) or pass --llama-server PATH")
    return binary


def start_llama_server(binary: Path, gguf: Path, *, n_threads: int, parallel: int, kv_tokens: int,
                       log_dir: Path, cache_types: tuple[str, str] = ("f16", "f16")) -> ServerProcess:
    """llama.cpp's C++ server with the same pool as ours: ``--parallel`` slots sharing one unified
    KV cache of ``kv_tokens`` cells (``-c``, ``--kv-unified``) of the same K and V types (``-ctk``,
    ``-ctv``), flash attention on as ours."""
    port = free_port()
    args = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(n_threads), "-tb", str(n_threads), "--parallel", str(parallel),
            "-c", str(kv_tokens), "--kv-unified", "-fa", "on", "-ctk", cache_types[0],
            "-ctv", cache_types[1], "--alias", "peer"]
    proc, log_path = _spawn("llama-server", args, log_dir)
    server = ServerProcess("llama-server", proc, f"http://127.0.0.1:{port}/v1", log_path)
    _wait_ready(server, f"http://127.0.0.1:{port}/health", 300)
    return server
