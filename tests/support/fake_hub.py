"""A local HTTP server that speaks the Hugging Face Hub's file protocol, with fault knobs.

Enough of the protocol for huggingface-hub's ``get_hf_file_metadata`` and ``http_get``:

- ``HEAD``/``GET /{org}/{repo}/resolve/{revision}/{path}``: ``ETag``, ``X-Repo-Commit``,
  ``Content-Length``, ``Accept-Ranges``; LFS files also ``X-Linked-Etag`` (their sha256) and
  ``X-Linked-Size``; non-LFS files carry their git blob sha1 as ``ETag`` (as the Hub does).
  ``Range: bytes=N-[M]`` answers 206 with ``Content-Range``.
- Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), which
  huggingface-hub turns into its typed exceptions.
- ``GET /api/models/{org}/{repo}/revision/{revision}``: id, sha and siblings (``model_info``).
- ``GET /api/models/{org}/{repo}/tree/{revision}[/{path}]?recursive=...``: the file listing
  (``list_repo_tree``): files with size, git oid and, for LFS files, ``lfs.oid`` (sha256);
  folders as ``directory`` entries. ``listing_pages`` > 1 splits it with ``Link: rel="next"``
  headers, as the Hub paginates.

Fault knobs (:class:`Faults`, changed between or during requests, applied to file GETs):
``cut_after`` bytes then drop the connection (``cut_times`` GETs), answer ``fail_status``
(``fail_times`` GETs, -1 for all; ``fail_after_gets`` spares the first ones), flip the byte at
``flip_at``, ``ignore_range``, throttle to ``rate_bytes_per_s``. Every request is logged
(method, path, Range header, status, body bytes sent) so a test can prove what was (not)
re-fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

LFS_THRESHOLD = 10 * 1024
CHUNK = 64 * 1024


@dataclass
class HostedFile:
    data_path: Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool


@dataclass
class Faults:
    cut_after: int | None = None
    cut_times: int = 0
    fail_status: int | None = None
    fail_times: int = 0
    fail_after_gets: int = 0
    """Fail only GETs after this many file GETs were served (e.g. 1: cut the first, fail the rest)."""
    flip_at: int | None = None
    ignore_range: bool = False
    rate_bytes_per_s: float | None = None
    require_token: str | None = None
    """Treat every repo as private: without ``Authorization: Bearer <token>`` answer 401."""


@dataclass
class Record:
    method: str
    path: str
    range: str | None
    status: int = 0
    sent: int = 0
    start: int = 0


@dataclass
class FakeHub:
    commit: str = field(default_factory=lambda: secrets.token_hex(20))
    faults: Faults = field(default_factory=Faults)
    log: list[Record] = field(default_factory=list)
    repos: dict[str, dict[str, HostedFile]] = field(default_factory=dict)
    listing_pages: int = 1

    def __post_init__(self) -> None:
        self._gets = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- content ---------------------------------------------------------------------------

    def add_file(self, repo: str, path: str, data_path: Path, *, lfs: bool | None = None) -> HostedFile:
        size = data_path.stat().st_size
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(f"blob {size}\0".encode())
        with data_path.open("rb") as f:
            while block := f.read(4 << 20):
                sha256.update(block)
                sha1.update(block)
        hosted = HostedFile(
            data_path=data_path,
            size=size,
            sha256=sha256.hexdigest(),
            git_sha1=sha1.hexdigest(),
            lfs=size > LFS_THRESHOLD if lfs is None else lfs,
        )
        self.repos.setdefault(repo, {})[path] = hosted
        return hosted

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- log -------------------------------------------------------------------------------

    def record(self, rec: Record) -> None:
        with self._lock:
            self.log.append(rec)

    def gets(self, suffix: str = "") -> list[Record]:
        with self._lock:
            return [r for r in self.log if r.method == "GET" and r.path.endswith(suffix)]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def reset(self) -> None:
        """No faults, empty log."""
        with self._lock:
            self.faults = Faults()
            self.log.clear()
            self._gets = 0

    def repo_files(self, repo: str) -> tuple[str, dict[str, HostedFile]] | None:
        """A repo by id, case-insensitively as the Hub resolves them: (its id, its files)."""
        for name, files in self.repos.items():
            if name.lower() == repo.lower():
                return name, files
        return None

    def count_get(self) -> int:
        with self._lock:
            self._gets += 1
            return self._gets

    def take_fault(self, name: str, get_number: int = 0) -> bool:
        """Consume one use of a counted fault ('cut' or 'fail')."""
        with self._lock:
            f = self.faults
            if name == "cut" and f.cut_after is not None and f.cut_times != 0:
                f.cut_times -= 1
                return True
            if (
                name == "fail"
                and f.fail_status is not None
                and f.fail_times != 0
                and get_number > f.fail_after_gets
            ):
                f.fail_times -= 1
                return True
            return False


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    # --- routing ---------------------------------------------------------------------------

    def _serve(self, *, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        rec = Record("HEAD" if head else "GET", unquote(path), self.headers.get("Range"))
        try:
            api = _API.match(path)
            if api and not head:
                self._api(rec, api["repo"], unquote(api["rev"]))
                return
            tree = _TREE.match(path)
            if tree and not head:
                query = self.path.split("?", 1)[1] if "?" in self.path else ""
                self._tree(rec, tree["repo"], unquote(tree["rev"]), unquote(tree["path"] or ""), query)
                return
            m = _RESOLVE.match(path)
            if not m:
                self._error(rec, 404, "EntryNotFound")
                return
            self._resolve(rec, m["repo"], unquote(m["rev"]), unquote(m["path"]), head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.hub.record(rec)

    def _error(self, rec: Record, status: int, code: str | None = None) -> None:
        rec.status = status
        body = json.dumps({"error": code or "error"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if code == "EntryNotFound":
            self.send_header("X-Repo-Commit", self.hub.commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _api(self, rec: Record, repo: str, rev: str) -> None:
        found = self.hub.repo_files(repo)
        if found is None:
            self._error(rec, 404, "RepoNotFound")
            return
        repo, files = found
        if rev not in ("main", self.hub.commit):
            self._error(rec, 404, "RevisionNotFound")
            return
        body = json.dumps(
            {"id": repo, "sha": self.hub.commit, "siblings": [{"rfilename": p} for p in sorted(files)]}
        ).encode()
        rec.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _tree(self, rec: Record, repo: str, rev: str, prefix: str, query: str) -> None:
        found = self.hub.repo_files(repo)
        if found is None:
            self._error(rec, 404, "RepoNotFound")
            return
        files = found[1]
        if rev not in ("main", self.hub.commit):
            self._error(rec, 404, "RevisionNotFound")
            return
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        recursive = params.get("recursive", "false").lower() in ("true", "1")
        base = prefix.strip("/")
        base_slash = f"{base}/" if base else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, hosted in sorted(files.items()):
            if not path.startswith(base_slash):
                continue
            rest = path[len(base_slash):].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                if not recursive and depth > 1:
                    break
                folder = base_slash + "/".join(rest[:depth])
                entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0,
                                            "path": folder})
            if not recursive and len(rest) > 1:
                continue
            entry: dict[str, Any] = {"type": "file", "oid": hosted.git_sha1, "size": hosted.size,
                                     "path": path}
            if hosted.lfs:
                entry["lfs"] = {"oid": hosted.sha256, "size": hosted.size, "pointerSize": 134}
            entries[path] = entry
        if base and not entries:
            self._error(rec, 404, "EntryNotFound")
            return
        listing = list(entries.values())
        pages = max(1, self.hub.listing_pages)
        per_page = max(1, -(-len(listing) // pages))
        cursor = int(params.get("cursor", "0") or 0)
        page = listing[cursor: cursor + per_page]
        body = json.dumps(page).encode()
        rec.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if cursor + per_page < len(listing):
            path = self.path.split("?", 1)[0]
            rest = "&".join(f"{k}={v}" for k, v in params.items() if k != "cursor")
            self.send_header("Link", f'<{self.hub.url}{path}?{rest}&cursor={cursor + per_page}>; rel="next"')
        self.end_headers()
        self.wfile.write(body)

    def _resolve(self, rec: Record, repo: str, rev: str, name: str, *, head: bool) -> None:
        hub = self.hub
        found = hub.repo_files(repo)
        files = found[1] if found else None
        token = hub.faults.require_token
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            self._error(rec, 401, "RepoNotFound")  # what the Hub answers for a private repo
            return
        if files is None:
            self._error(rec, 404, "RepoNotFound")
            return
        if rev not in ("main", hub.commit):
            self._error(rec, 404, "RevisionNotFound")
            return
        hosted = files.get(name)
        if hosted is None:
            self._error(rec, 404, "EntryNotFound")
            return
        if not head and hub.take_fault("fail", hub.count_get()):
            self._error(rec, hub.faults.fail_status or 500)
            return

        start, end = 0, hosted.size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header and not head and not hub.faults.ignore_range:
            rm = _RANGE.match(range_header.strip())
            if rm:
                start = int(rm["start"])
                end = min(int(rm["end"]), hosted.size - 1) if rm["end"] else hosted.size - 1
                if start >= hosted.size:
                    self._error(rec, 416)
                    return
                status = 206
        length = end - start + 1
        rec.status, rec.start = status, start

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", hub.commit)
        if hosted.lfs:
            pointer = (
                "version https://git-lfs.github.com/spec/v1\n"
                f"oid sha256:{hosted.sha256}\nsize {hosted.size}\n"
            )
            pointer_sha1 = hashlib.sha1(f"blob {len(pointer)}\0{pointer}".encode()).hexdigest()
            self.send_header("ETag", f'"{pointer_sha1}"')
            self.send_header("X-Linked-Etag", f'"{hosted.sha256}"')
            self.send_header("X-Linked-Size", str(hosted.size))
        else:
            self.send_header("ETag", f'"{hosted.git_sha1}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{hosted.size}")
        self.end_headers()
        if head:
            return
        self._body(rec, hosted, start, length)

    def _body(self, rec: Record, hosted: HostedFile, start: int, length: int) -> None:
        faults = self.hub.faults
        cut = faults.cut_after if self.hub.take_fault("cut") else None
        fd = os.open(hosted.data_path, os.O_RDONLY)
        try:
            pos, remaining = start, length
            while remaining > 0:
                n = min(CHUNK, remaining)
                if cut is not None:
                    n = min(n, cut - rec.sent)
                    if n <= 0:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                data = bytearray(os.pread(fd, n, pos))
                flip = faults.flip_at
                if flip is not None and pos <= flip < pos + len(data):
                    data[flip - pos] ^= 0xFF
                self.wfile.write(data)
                rec.sent += len(data)
                pos += len(data)
                remaining -= len(data)
                rate = faults.rate_bytes_per_s
                if rate:
                    time.sleep(len(data) / rate)
        finally:
            os.close(fd)
