"""Stored responses (``/v1/responses`` with ``store: true``) in an embedded SQLite database.

One file in the cache folder (``<cache>/.responses.sqlite3``), so a conversation continued with
``previous_response_id`` survives a server restart. WAL mode (readers never wait for the writer),
one connection guarded by a lock (sqlite3 objects are not for concurrent use), a busy timeout for
other processes on the same cache. Bounded by count and age: each insert drops what is over
either bound, and reads treat an expired row as gone.

Each row is self-contained: ``input_items`` holds every item the response was generated from
(the previous responses' inputs and outputs, then this turn's input), so continuing a conversation
is one read, and deleting or expiring an earlier response never breaks a later one.

The methods are blocking (short SQLite calls): call them off the event loop (``anyio.to_thread``),
as the ``a*`` wrappers do.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

DB_NAME = ".responses.sqlite3"
BUSY_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    model TEXT NOT NULL,
    previous_response_id TEXT,
    input_items TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""


@dataclass(frozen=True)
class StoredResponse:
    id: str
    created_at: float
    model: str
    previous_response_id: str | None
    input_items: list[dict[str, Any]]
    """Every item the response was generated from, oldest first, each with an ``id``."""
    response: dict[str, Any]
    """The response object as returned to the client."""

    def conversation(self) -> list[dict[str, Any]]:
        """The items a follow-up continues from: this response's input, then its output."""
        return [*self.input_items, *self.response.get("output", [])]


@dataclass(frozen=True)
class ItemPage:
    items: list[dict[str, Any]]
    has_more: bool


class ResponseStore:
    def __init__(
        self, path: Path, *, max_stored: int, max_age_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.max_stored = max_stored
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False,
                                   isolation_level=None)
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
            self.prune()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def in_cache(cls, cache_dir: Path, *, max_stored: int, max_age_s: float) -> ResponseStore:
        """The store of a cache folder. A database file that is not one (corrupt, truncated) is
        moved aside as ``<name>.corrupt`` and a new one started: the server still starts."""
        path = cache_dir / DB_NAME
        try:
            return cls(path, max_stored=max_stored, max_age_s=max_age_s)
        except sqlite3.DatabaseError as exc:
            log.error("stored responses: %s is unreadable (%s); moving it aside and starting anew",
                      path.name, exc)
            for suffix in ("", "-wal", "-shm"):
                old = path.with_name(path.name + suffix)
                if old.exists():
                    old.replace(old.with_name(old.name + ".corrupt"))
            return cls(path, max_stored=max_stored, max_age_s=max_age_s)

    @property
    def enabled(self) -> bool:
        return self.max_stored > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- blocking API ---------------------------------------------------------------------------

    def put(self, record: StoredResponse) -> None:
        """Store (or replace) one response, then drop what is over the bounds."""
        if not self.enabled:
            return
        row = (record.id, record.created_at, record.model, record.previous_response_id,
               json.dumps(record.input_items, ensure_ascii=False),
               json.dumps(record.response, ensure_ascii=False))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)
                self._prune_locked()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, created_at, model, previous_response_id, input_items, response "
                "FROM responses WHERE id = ? AND created_at >= ?",
                (response_id, self._oldest_allowed()),
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], row[2], row[3], json.loads(row[4]), json.loads(row[5]))

    def delete(self, response_id: str) -> bool:
        """True when a (live) response was deleted."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM responses WHERE id = ? AND created_at >= ?",
                (response_id, self._oldest_allowed()),
            )
            return cur.rowcount > 0

    def input_items(
        self, response_id: str, *, limit: int = 20, order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> ItemPage | None:
        """A page of a response's input items (OpenAI's default order: newest first); None when
        the response is unknown. ``after`` is an item id: the page starts after it."""
        stored = self.get(response_id)
        if stored is None:
            return None
        items = stored.input_items if order == "asc" else stored.input_items[::-1]
        if after is not None:
            ids = [item.get("id") for item in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        return ItemPage(items[:limit], len(items) > limit)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def prune(self) -> int:
        """Drop responses over the age or count bound; returns how many went."""
        with self._lock:
            return self._prune_locked()

    def _oldest_allowed(self) -> float:
        return self._clock() - self.max_age_s

    def _prune_locked(self) -> int:
        gone = self._db.execute(
            "DELETE FROM responses WHERE created_at < ?", (self._oldest_allowed(),)
        ).rowcount
        gone += self._db.execute(
            "DELETE FROM responses WHERE id IN (SELECT id FROM responses "
            "ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)", (self.max_stored,)
        ).rowcount
        return int(gone)

    # --- async wrappers (off the event loop) ----------------------------------------------------

    async def aput(self, record: StoredResponse) -> None:
        await anyio.to_thread.run_sync(self.put, record)

    async def aget(self, response_id: str) -> StoredResponse | None:
        return await anyio.to_thread.run_sync(self.get, response_id)

    async def adelete(self, response_id: str) -> bool:
        return await anyio.to_thread.run_sync(self.delete, response_id)

    async def ainput_items(
        self, response_id: str, *, limit: int = 20, order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> ItemPage | None:
        return await anyio.to_thread.run_sync(
            lambda: self.input_items(response_id, limit=limit, order=order, after=after))
