"""Crash isolation for model files: load a model in a child process before the server loads it.

Model files are untrusted input to native code (llama.cpp's GGUF parser, onnxruntime). A file
that makes the runtime segfault, abort or allocate without bound must not take the server and
every other model with it. :func:`probe_model` runs ``python -m foundry_local_py.engines.probe``,
which loads the file with the same engine code, tokenizes, decodes one token and exits 0. A
crash (signal), a non-zero exit or a timeout becomes a :class:`ModelLoadError`
(``model_load_failed``) for the request that wanted the model; the server keeps serving.

Verdicts are cached per file (format, resolved path, size, mtime; a folder's every file), in
``<cache>/.probe-verdicts.json`` (setting ``probe_verdicts``), so a file is probed
once, not on every load, and a file that failed is not re-run on every request (a crash per
request would be a cheap denial of service).
A changed file has a new key and is probed again.

ONNX folders are checked statically first: every external-data location in every ``.onnx`` file,
and every file named by ``genai_config.json``, must resolve inside the model's folder (an
external-data path like ``../../etc/shadow`` or ``/dev/zero`` is refused without loading).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 180.0
VERDICTS_NAME = ".probe-verdicts.json"
"""In the model cache (the one place the server must be able to write, read-only root included)."""


_lock = threading.Lock()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str = ""


# --- the key of a file's verdict ------------------------------------------------------------------


def file_key(fmt: str, path: Path) -> str:
    """Identity of the bytes a load would read: path, size and mtime of the file (or of every file
    of a folder). A replaced or modified file gets another key."""
    path = path.resolve()
    parts = [fmt, str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        parts.append(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_verdicts(store: Path) -> dict[str, Any]:
    try:
        data = json.loads(store.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_verdict(store: Path, key: str, verdict: Verdict) -> None:
    """Keep a verdict; a store that cannot be written only costs a probe next time."""
    try:
        _write_verdict_file(store, key, verdict)
    except OSError as exc:
        log.warning("could not keep the probe verdict (%s): the file will be probed again", exc.strerror)


def _write_verdict_file(store: Path, key: str, verdict: Verdict) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        data = _read_verdicts(store)
        data[key] = {"ok": verdict.ok, "message": verdict.message, "at": int(time.time())}
        fd, tmp = tempfile.mkstemp(dir=store.parent, prefix=".verdicts-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, store)  # atomic: a concurrent reader sees the old or the new file
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# --- ONNX: external data must stay inside the folder -----------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; bytes for length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


# Where TensorProtos and GraphProtos nest in onnx.proto (field numbers).
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTE = 5
_FUNCTION_NODE = 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13


def onnx_external_locations(model_bytes: bytes) -> list[str]:
    """Every external-data ``location`` in an ONNX model (initializers, constants, subgraphs)."""
    out: list[str] = []

    def tensor(buf: bytes) -> None:
        for num, wire, value in _fields(buf):
            if num == _TENSOR_EXTERNAL_DATA and wire == 2:
                entry = {n: v for n, w, v in _fields(value) if w == 2}
                if entry.get(1) == b"location":
                    out.append(entry.get(2, b"").decode("utf-8", errors="replace"))

    def sparse(buf: bytes) -> None:
        for num, wire, value in _fields(buf):
            if num in (_SPARSE_VALUES, _SPARSE_INDICES) and wire == 2:
                tensor(value)

    def node(buf: bytes) -> None:
        for num, wire, value in _fields(buf):
            if num == _NODE_ATTRIBUTE and wire == 2:
                for anum, awire, avalue in _fields(value):
                    if awire != 2:
                        continue
                    if anum in (_ATTR_T, _ATTR_TENSORS):
                        tensor(avalue)
                    elif anum in (_ATTR_G, _ATTR_GRAPHS):
                        graph(avalue)
                    elif anum in (_ATTR_SPARSE, _ATTR_SPARSES):
                        sparse(avalue)

    def graph(buf: bytes) -> None:
        for num, wire, value in _fields(buf):
            if wire != 2:
                continue
            if num == _GRAPH_INITIALIZER:
                tensor(value)
            elif num == _GRAPH_SPARSE:
                sparse(value)
            elif num == _GRAPH_NODE:
                node(value)

    for num, wire, value in _fields(model_bytes):
        if wire != 2:
            continue
        if num == _MODEL_GRAPH:
            graph(value)
        elif num == _MODEL_FUNCTIONS:
            for fnum, fwire, fvalue in _fields(value):
                if fnum == _FUNCTION_NODE and fwire == 2:
                    node(fvalue)
    return out


def _inside(base: Path, relative: str, root: Path) -> bool:
    """Whether ``relative`` (a path written in a model file, taken from ``base``) stays in ``root``."""
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")) or Path(relative).is_absolute():
        return False
    if len(relative) > 1 and relative[1] == ":":  # a Windows drive
        return False
    target = (base / relative).resolve()
    return target == root or root in target.parents


def _config_filenames(config: Any) -> Iterator[str]:
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "filename" and isinstance(value, str):
                yield value
            else:
                yield from _config_filenames(value)
    elif isinstance(config, list):
        for item in config:
            yield from _config_filenames(item)


def check_onnx_folder(folder: Path) -> None:
    """Refuse an ONNX model folder that reads files outside itself (ModelLoadError)."""
    root = folder.resolve()
    refused = "the ONNX model was refused: it refers to a file outside its folder"
    for f in root.rglob("*"):
        if f.is_symlink() and not _inside(root, os.path.relpath(f.resolve(), root), root):
            raise ModelLoadError(f"{refused} (a link)")
    config = root / "genai_config.json"
    if config.is_file():
        try:
            names = list(_config_filenames(json.loads(config.read_text())))
        except ValueError:
            raise ModelLoadError("the ONNX model's genai_config.json is not valid JSON") from None
        if any(not _inside(root, name, root) for name in names):
            raise ModelLoadError(f"{refused} (genai_config.json)")
    for onnx_file in root.rglob("*.onnx"):
        try:
            locations = onnx_external_locations(onnx_file.read_bytes())
        except (ValueError, IndexError, RecursionError):
            raise ModelLoadError("the ONNX model file could not be parsed") from None
        if any(not _inside(onnx_file.parent, loc, root) for loc in locations):
            raise ModelLoadError(f"{refused} (external data)")


# --- the probe -----------------------------------------------------------------------------------


def probe_command(fmt: str, path: Path) -> list[str]:
    return [sys.executable, "-m", "foundry_local_py.engines.probe", fmt, str(path)]


def run_probe(cmd: Sequence[str], *, timeout_s: float = PROBE_TIMEOUT_S) -> Verdict:
    """Run a probe child; the verdict from how it ended."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    started = time.monotonic()
    try:
        proc = subprocess.run(list(cmd), capture_output=True, timeout=timeout_s, env=env,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return Verdict(False, f"loading the model did not finish within {timeout_s:g} s")
    log.debug("probe %s: exit %s in %.2fs", cmd[-1], proc.returncode, time.monotonic() - started)
    if proc.returncode == 0:
        return Verdict(True)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return Verdict(False, f"the model file crashed the runtime while loading ({name})")
    reason = proc.stdout.decode("utf-8", errors="replace").strip().splitlines()
    message = reason[-1] if reason and reason[-1].startswith("probe-error: ") else ""
    detail = message[len("probe-error: "):] if message else f"exit status {proc.returncode}"
    if not detail.startswith("the model"):
        detail = f"the model could not be loaded: {detail}"
    return Verdict(False, detail)


def probe_model(fmt: str, path: Path, settings: Any, *, command: Sequence[str] | None = None) -> None:
    """Raise :class:`ModelLoadError` unless the model at ``path`` loads in a child process.

    ``settings`` gives ``probe_models`` (off: no probe), ``probe_verdicts`` (default: in
    ``cache_dir``) and ``probe_timeout_s``.
    """
    if not getattr(settings, "probe_models", True):
        return
    if fmt == "onnx" and path.is_dir():
        check_onnx_folder(path)
    store = Path(getattr(settings, "probe_verdicts", None) or Path(settings.cache_dir) / VERDICTS_NAME)
    try:
        key = file_key(fmt, path)
    except OSError:
        raise ModelLoadError("the model file could not be read") from None
    cached = _read_verdicts(store).get(key)
    if isinstance(cached, dict):
        if cached.get("ok"):
            return
        raise ModelLoadError(str(cached.get("message") or "the model could not be loaded"))
    timeout = float(getattr(settings, "probe_timeout_s", PROBE_TIMEOUT_S))
    verdict = run_probe(command or probe_command(fmt, path), timeout_s=timeout)
    if verdict.ok or not verdict.message.startswith("loading the model did not finish"):
        _write_verdict(store, key, verdict)  # a timeout may be a busy machine: not remembered
    if not verdict.ok:
        log.warning("model probe failed: %s", verdict.message)
        raise ModelLoadError(verdict.message)


# --- the child -----------------------------------------------------------------------------------


def _child(fmt: str, path: Path) -> None:
    from .backends import EngineOptions, load_engine
    from .base import GenerationRequest, SamplingParams

    engine = load_engine(fmt, path, EngineOptions(n_threads=1, max_batch=1, n_ctx=128, kv_tokens=256))
    try:
        tokens = engine.tokenize("Hello", add_special=True) or [0]
        runner = engine.create_runner()
        try:
            runner.add(GenerationRequest("probe", tokens[:8], max_tokens=1,
                                         sampling=SamplingParams(temperature=0.0)))
            for _ in range(16):  # prompt chunks, then one token
                if runner.step():
                    break
        finally:
            runner.close()
    finally:
        engine.close()


def main(argv: list[str]) -> int:
    fmt, path = argv[0], Path(argv[1])
    try:
        _child(fmt, path)
    except ModelLoadError as exc:
        print(f"probe-error: {exc.message}", flush=True)
        return 1
    except Exception as exc:  # an error the engine did not wrap: its class only (no paths)
        print(f"probe-error: {type(exc).__name__}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
