"""The stored-responses database: round trips, conversation chains, bounds, restart, concurrency."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from foundry_local_py.server.response_store import DB_NAME, ResponseStore, StoredResponse


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def record(
    rid: str, t: float, *, inputs: int = 1, prev: str | None = None, text: str = "ok"
) -> StoredResponse:
    items = [{"id": f"{rid}_in{i}", "type": "message", "role": "user",
              "content": [{"type": "input_text", "text": f"q{i}"}]} for i in range(inputs)]
    response = {"id": rid, "object": "response", "status": "completed", "output": [
        {"id": f"{rid}_out", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": text, "annotations": []}]}]}
    return StoredResponse(rid, t, "smollm2-135m", prev, items, response)


def make(tmp_path: Path, clock: Clock | None = None, **kw: Any) -> ResponseStore:
    kw.setdefault("max_stored", 100)
    kw.setdefault("max_age_s", 3600.0)
    return ResponseStore(tmp_path / DB_NAME, clock=clock or Clock(), **kw)


def test_round_trip_and_delete(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path, clock)
    rec = record("resp_1", clock.t, inputs=2, text="héllo ✓")
    store.put(rec)
    got = store.get("resp_1")
    assert got == rec
    assert got.conversation() == [*rec.input_items, *rec.response["output"]]
    assert store.get("resp_unknown") is None
    assert store.delete("resp_1") is True
    assert store.get("resp_1") is None
    assert store.delete("resp_1") is False
    assert store.input_items("resp_1") is None


def test_input_items_pages_newest_first_by_default(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path, clock)
    store.put(record("resp_1", clock.t, inputs=5))
    ids = [f"resp_1_in{i}" for i in range(5)]

    page = store.input_items("resp_1")
    assert page is not None and [i["id"] for i in page.items] == ids[::-1] and not page.has_more
    page = store.input_items("resp_1", order="asc", limit=2)
    assert page is not None and [i["id"] for i in page.items] == ids[:2] and page.has_more
    page = store.input_items("resp_1", order="asc", limit=2, after=ids[1])
    assert page is not None and [i["id"] for i in page.items] == ids[2:4] and page.has_more
    page = store.input_items("resp_1", order="asc", limit=2, after=ids[3])
    assert page is not None and [i["id"] for i in page.items] == ids[4:] and not page.has_more
    page = store.input_items("resp_1", after="no_such_item")
    assert page is not None and page.items == [] and not page.has_more


def test_count_bound_drops_the_oldest(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path, clock, max_stored=5)
    for i in range(8):
        clock.t += 1
        store.put(record(f"resp_{i}", clock.t))
    assert store.count() == 5
    assert [store.get(f"resp_{i}") is not None for i in range(8)] == [False] * 3 + [True] * 5


def test_age_bound_expires_on_read_and_prunes(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path, clock, max_age_s=60)
    store.put(record("resp_old", clock.t))
    clock.t += 30
    store.put(record("resp_new", clock.t))
    clock.t += 45  # resp_old is 75 s old, resp_new 45 s
    assert store.get("resp_old") is None
    assert store.delete("resp_old") is False  # expired counts as gone
    assert store.get("resp_new") is not None
    assert store.count() == 2  # still on disk until pruned...
    assert store.prune() == 1  # ...which the next insert (or a restart) does
    assert store.count() == 1


def test_survives_restart_in_wal_mode(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path, clock)
    store.put(record("resp_a", clock.t, inputs=3))
    store.close()

    reopened = make(tmp_path, clock)
    got = reopened.get("resp_a")
    assert got is not None and len(got.input_items) == 3
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()


def test_restart_applies_bounds(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path, clock, max_stored=10)
    for i in range(6):
        store.put(record(f"resp_{i}", clock.t + i))
    store.close()
    smaller = make(tmp_path, clock, max_stored=2)
    assert smaller.count() == 2
    assert smaller.get("resp_5") is not None and smaller.get("resp_0") is None


def test_store_disabled_keeps_nothing(tmp_path: Path) -> None:
    store = make(tmp_path, max_stored=0)
    store.put(record("resp_1", 0))
    assert store.get("resp_1") is None and store.count() == 0


def test_concurrent_threads_and_connections(tmp_path: Path) -> None:
    """8 threads over two stores on one file (as two servers on one cache would be): every write
    lands, every read sees a whole record, nothing raises (SQLite's busy timeout, WAL readers)."""
    clock = Clock()
    stores = [make(tmp_path, clock, max_stored=10_000), make(tmp_path, clock, max_stored=10_000)]
    errors: list[BaseException] = []
    n_threads, per_thread = 8, 40

    def work(k: int) -> None:
        store = stores[k % 2]
        try:
            for i in range(per_thread):
                rid = f"resp_{k}_{i}"
                store.put(record(rid, clock.t, inputs=3, prev=f"resp_{k}_{i - 1}" if i else None))
                got = store.get(rid)
                assert got is not None and got.id == rid and len(got.input_items) == 3
                if i % 5 == 4:
                    assert store.delete(f"resp_{k}_{i - 1}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert stores[0].count() == n_threads * (per_thread - per_thread // 5)
    for store in stores:
        store.close()


def test_async_wrappers_run_off_the_loop(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path, clock, max_stored=1000)

    async def main() -> None:
        loop_thread = threading.get_ident()
        seen_threads: set[int] = set()
        original = store.put

        def put(rec: StoredResponse) -> None:
            seen_threads.add(threading.get_ident())
            original(rec)

        store.put = put  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(store.aput, record(f"resp_{i}", clock.t))
        assert loop_thread not in seen_threads
        got = await store.aget("resp_7")
        assert got is not None
        page = await store.ainput_items("resp_7")
        assert page is not None and len(page.items) == 1
        assert await store.adelete("resp_7")
        assert await store.aget("resp_7") is None

    anyio.run(main)
    assert store.count() == 29


@pytest.mark.parametrize("max_stored", [1, 3])
def test_replacing_a_record_does_not_count_twice(tmp_path: Path, max_stored: int) -> None:
    clock = Clock()
    store = make(tmp_path, clock, max_stored=max_stored)
    for _ in range(5):
        store.put(record("resp_same", clock.t))
    assert store.count() == 1


def test_a_corrupt_database_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    store = ResponseStore.in_cache(tmp_path, max_stored=10, max_age_s=60)
    store.put(record("resp_1", time.time()))
    assert store.get("resp_1") is not None
    assert (tmp_path / (DB_NAME + ".corrupt")).read_bytes().startswith(b"this is not")
    store.close()
